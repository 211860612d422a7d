//! QEMU driver: one `qemu-system-x86_64` process per VM.
//!
//! Per-VM files in `BootSpec::work_dir`:
//! - `qmp.sock`   QMP control socket (QEMU is the server; we connect per operation)
//! - `serial.log` the guest's serial console (truncated on boot, appended on restore)
//! - `qemu.log`   QEMU's own stdout/stderr
//! - `user_data`  the VM's user data, given to the guest as fw_cfg `opt/hatch/user_data`
//!
//! Guest contract (see `guest/init`, built by `scripts/build-image`): the VM id is
//! appended to the kernel command line as `hatch.vm_id=<id>`; the guest prints
//! [`READY_MARKER`] on the serial console once networking is up.
//!
//! Networking is QEMU user-mode (`restrict=on`), guest ports forwarded from
//! `127.0.0.1:<port chosen by QEMU>`; the chosen ports are read back with
//! `info usernet`. A restore re-creates the forwards listed in the spec, with new
//! host ports.

mod qmp;

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::sync::{oneshot, watch};

use self::qmp::{parse_usernet, Qmp};
use super::{BootSpec, ExitInfo, Hypervisor, Machine, VmmError};

/// Line prefix the guest prints on its serial console when it is up.
pub const READY_MARKER: &str = "HATCH_GUEST_READY";
/// Kernel command-line parameter carrying the VM id.
pub const VM_ID_PARAM: &str = "hatch.vm_id";
/// fw_cfg name under which the guest finds its user data.
pub const USER_DATA_FW_CFG: &str = "opt/hatch/user_data";
/// Environment variable an operator can set to force the accelerator (`tcg`, `kvm`, `auto`).
pub const ACCEL_ENV: &str = "HATCH_QEMU_ACCEL";

const QMP_SOCKET: &str = "qmp.sock";
const SERIAL_LOG: &str = "serial.log";
const QEMU_LOG: &str = "qemu.log";
const USER_DATA: &str = "user_data";
const NETDEV_ID: &str = "net0";
/// How long `quit` may take before the process is killed.
const QUIT_GRACE: Duration = Duration::from_secs(5);
/// Deadline for a migration (save or load) to complete.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
/// The VM id of the guest `detect` boots to try KVM.
const KVM_PROBE_ID: &str = "kvm-probe";

/// The QEMU process id, for reconciliation after a hatchd crash.
pub const PID_FILE: &str = "qemu.pid";

/// Deadline for the QMP socket to appear after spawn.
const QMP_SOCKET_TIMEOUT: Duration = Duration::from_secs(20);

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// Probe KVM by booting a guest with it ([`QemuHypervisor::detect`]); fall back to TCG.
    #[default]
    Auto,
    /// Software emulation.
    Tcg,
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
}

impl AccelChoice {
    /// The value of `HATCH_QEMU_ACCEL`, when set and valid.
    pub fn from_env() -> Option<AccelChoice> {
        std::env::var(ACCEL_ENV).ok().and_then(|v| v.parse().ok())
    }
}

impl FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(AccelChoice::Auto),
            "tcg" => Ok(AccelChoice::Tcg),
            "kvm" => Ok(AccelChoice::Kvm),
            other => Err(format!("unknown accelerator {other:?} (auto, tcg or kvm)")),
        }
    }
}

impl fmt::Display for AccelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccelChoice::Auto => "auto",
            AccelChoice::Tcg => "tcg",
            AccelChoice::Kvm => "kvm",
        })
    }
}

/// Configuration of the QEMU driver.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// QEMU binary (`qemu-system-x86_64`, looked up on PATH).
    pub binary: PathBuf,
    /// Accelerator. `Auto` is resolved by [`QemuHypervisor::detect`]; given to
    /// [`QemuHypervisor::new`] it means TCG.
    pub accel: AccelChoice,
    /// How long a cold boot may take to print the ready marker.
    pub ready_timeout: Duration,
    /// How long the KVM probe boot may take in [`QemuHypervisor::detect`].
    pub probe_timeout: Duration,
    /// QEMU machine type.
    pub machine: String,
    /// Kill the QEMU process when its [`QemuMachine`] is dropped without a
    /// shutdown/snapshot. Off by default so guests survive a hatchd restart; tests
    /// turn it on so a panicking test leaves no QEMU behind.
    pub kill_on_drop: bool,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: AccelChoice::Auto,
            ready_timeout: Duration::from_secs(60),
            probe_timeout: Duration::from_secs(8),
            machine: "q35".to_string(),
            kill_on_drop: false,
        }
    }
}

/// The QEMU [`Hypervisor`].
#[derive(Debug, Clone)]
pub struct QemuHypervisor {
    config: QemuConfig,
    accel: AccelChoice,
}

impl QemuHypervisor {
    /// A driver using `config.accel` as is (`Auto` means TCG: no probing here).
    pub fn new(config: QemuConfig) -> QemuHypervisor {
        let accel = match config.accel {
            AccelChoice::Kvm => AccelChoice::Kvm,
            AccelChoice::Tcg | AccelChoice::Auto => AccelChoice::Tcg,
        };
        QemuHypervisor { config, accel }
    }

    /// A driver whose accelerator is resolved: an explicit `Tcg`/`Kvm` in `config`
    /// (or, for `Auto`, in `HATCH_QEMU_ACCEL`) is used as is; otherwise, if `/dev/kvm`
    /// exists, a probe guest (the given kernel/initrd) is booted with KVM within
    /// `config.probe_timeout`, and KVM is chosen only if it reached its ready marker.
    pub async fn detect(
        config: QemuConfig,
        kernel: &Path,
        initrd: Option<&Path>,
        boot_args: &str,
    ) -> QemuHypervisor {
        let mut choice = config.accel;
        if choice == AccelChoice::Auto {
            if let Some(forced) = AccelChoice::from_env() {
                choice = forced;
            }
        }
        if choice != AccelChoice::Auto {
            tracing::info!(accel = %choice, "qemu accelerator set explicitly");
            return QemuHypervisor {
                config,
                accel: choice,
            };
        }
        let accel = match Self::probe_kvm(&config, kernel, initrd, boot_args).await {
            Ok(elapsed) => {
                tracing::info!(
                    probe_ms = elapsed.as_millis() as u64,
                    "qemu accelerator: kvm (probe guest booted)"
                );
                AccelChoice::Kvm
            }
            Err(reason) => {
                tracing::info!(
                    reason = %reason.lines().next().unwrap_or(""),
                    "qemu accelerator: tcg (a guest could not run under kvm here; this is expected on nested or unsupported hosts)"
                );
                tracing::debug!(%reason, "kvm probe details");
                AccelChoice::Tcg
            }
        };
        QemuHypervisor { config, accel }
    }

    async fn probe_kvm(
        config: &QemuConfig,
        kernel: &Path,
        initrd: Option<&Path>,
        boot_args: &str,
    ) -> Result<Duration, String> {
        if !Path::new("/dev/kvm").exists() {
            return Err("/dev/kvm does not exist".into());
        }
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            return Err(format!("cannot open /dev/kvm: {e}"));
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("hatch-kvm-probe-{}-{nanos}", std::process::id()));
        let spec = BootSpec {
            vm_id: KVM_PROBE_ID.into(),
            kernel: kernel.to_path_buf(),
            initrd: initrd.map(Path::to_path_buf),
            boot_args: boot_args.to_string(),
            vcpus: 1,
            mem_mib: 256,
            user_data: String::new(),
            work_dir: dir.clone(),
            guest_ports: Vec::new(),
        };
        let mut probe_config = config.clone();
        probe_config.ready_timeout = config.probe_timeout;
        let probe = QemuHypervisor {
            config: probe_config,
            accel: AccelChoice::Kvm,
        };
        let started = Instant::now();
        let result = match probe.boot(&spec).await {
            Ok(machine) => {
                let elapsed = started.elapsed();
                let _ = machine.shutdown().await;
                Ok(elapsed)
            }
            Err(e) => Err(format!("probe boot with kvm failed: {e}")),
        };
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    /// The resolved accelerator (`Tcg` or `Kvm`).
    pub fn accel(&self) -> AccelChoice {
        self.accel
    }

    /// The configuration this driver was built with.
    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    fn command_args(&self, spec: &BootSpec, restore: bool) -> Vec<String> {
        let wd = &spec.work_dir;
        let mut append = spec.boot_args.trim().to_string();
        if !append.is_empty() {
            append.push(' ');
        }
        append.push_str(&format!("{VM_ID_PARAM}={}", spec.vm_id));
        let mut netdev = format!("user,id={NETDEV_ID},restrict=on");
        let mut ports = spec.guest_ports.clone();
        ports.sort_unstable();
        ports.dedup();
        for p in ports {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:0-:{p}"));
        }
        let mut args: Vec<String> = vec![
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-name".into(),
            format!("hatch-{}", spec.vm_id),
            "-machine".into(),
            self.config.machine.clone(),
        ];
        match self.accel {
            AccelChoice::Kvm => {
                args.extend(["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()]);
            }
            _ => args.extend(["-accel".into(), "tcg".into()]),
        }
        args.extend([
            "-m".into(),
            spec.mem_mib.max(64).to_string(),
            "-smp".into(),
            spec.vcpus.max(1).to_string(),
            "-kernel".into(),
            spec.kernel.display().to_string(),
        ]);
        if let Some(initrd) = &spec.initrd {
            args.extend(["-initrd".into(), initrd.display().to_string()]);
        }
        args.extend([
            "-append".into(),
            append,
            "-chardev".into(),
            format!(
                "file,id=ser0,path={}{}",
                escape_opt(&wd.join(SERIAL_LOG)),
                if restore { ",append=on" } else { "" }
            ),
            "-serial".into(),
            "chardev:ser0".into(),
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                escape_opt(&wd.join(QMP_SOCKET))
            ),
            "-netdev".into(),
            netdev,
            "-device".into(),
            format!("virtio-net-pci,netdev={NETDEV_ID},romfile="),
            "-fw_cfg".into(),
            format!(
                "name={USER_DATA_FW_CFG},file={}",
                escape_opt(&wd.join(USER_DATA))
            ),
            "-no-reboot".into(),
            // Lets a restarted hatchd find and end a guest it lost track of.
            "-pidfile".into(),
            escape_opt(&wd.join(PID_FILE)),
        ]);
        if restore {
            args.extend(["-incoming".into(), "defer".into()]);
        }
        args
    }

    /// Prepare the work dir and start QEMU. Returns the machine with its wait task.
    async fn spawn(&self, spec: &BootSpec, restore: bool) -> Result<QemuMachine, VmmError> {
        // QEMU runs inside the work dir and is given paths in it: they must be
        // absolute, or a relative HATCH_DATA_DIR would point nowhere.
        let spec = &BootSpec {
            work_dir: std::path::absolute(&spec.work_dir)?,
            kernel: std::path::absolute(&spec.kernel)?,
            initrd: spec
                .initrd
                .as_deref()
                .map(std::path::absolute)
                .transpose()?,
            ..spec.clone()
        };
        let wd = &spec.work_dir;
        tokio::fs::create_dir_all(wd).await?;
        if !restore {
            // The ready marker of a previous boot must not count for this one.
            match tokio::fs::remove_file(wd.join(SERIAL_LOG)).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        let sock = wd.join(QMP_SOCKET);
        if sock.as_os_str().len() > 100 {
            return Err(VmmError::Spawn {
                what: self.config.binary.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "work dir path too long for a unix socket: {}",
                        sock.display()
                    ),
                ),
            });
        }
        match tokio::fs::remove_file(&sock).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        tokio::fs::write(wd.join(USER_DATA), spec.user_data.as_bytes()).await?;
        let log = std::fs::File::create(wd.join(QEMU_LOG))?;
        let log2 = log.try_clone()?;

        let args = self.command_args(spec, restore);
        tracing::debug!(vm_id = %spec.vm_id, binary = %self.config.binary.display(), ?args, "spawning qemu");
        let mut cmd = tokio::process::Command::new(&self.config.binary);
        cmd.args(&args)
            .current_dir(wd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(self.config.kill_on_drop);
        let child = cmd.spawn().map_err(|source| VmmError::Spawn {
            what: self.config.binary.display().to_string(),
            source,
        })?;
        drop(cmd);
        let pid = child.id();

        let (exit_tx, exit_rx) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        tokio::spawn(wait_child(
            child,
            kill_rx,
            exit_tx,
            spec.vm_id.clone(),
            self.config.kill_on_drop,
        ));

        Ok(QemuMachine {
            vm_id: spec.vm_id.clone(),
            work_dir: wd.clone(),
            pid,
            ports: Mutex::new(HashMap::new()),
            op: tokio::sync::Mutex::new(()),
            exit_rx,
            kill_tx: Mutex::new(Some(kill_tx)),
        })
    }
}

/// The pid of a live QEMU that runs the VM of this work dir, from its pid file.
/// Only a process whose command line names the work dir counts (pids are reused).
fn leftover_pid(work_dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(work_dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (pid > 1 && cmdline.contains(work_dir.to_string_lossy().as_ref())).then_some(pid)
}

fn pid_alive(pid: i32) -> bool {
    // A zombie counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Exit watch for a QEMU that is not our child (taken over after a restart):
/// poll for its end, kill it on request.
async fn watch_adopted(
    pid: i32,
    mut kill_rx: oneshot::Receiver<()>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    vm_id: String,
) {
    let mut killing = false;
    loop {
        if !pid_alive(pid) {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            res = &mut kill_rx, if !killing => {
                killing = true;
                if res.is_ok() {
                    super::kill_pid(pid);
                }
            }
        }
    }
    tracing::debug!(%vm_id, pid, "taken-over qemu process ended");
    let _ = exit_tx.send(Some(ExitInfo {
        description: "qemu (taken over after a restart) ended".into(),
    }));
}

/// After `migrate_cancel`, wait until no migration is active (bounded).
async fn machine_wait_migration_end(qmp: &mut Qmp) -> Result<(), VmmError> {
    for _ in 0..100 {
        let info = qmp.execute("query-migrate", None).await?;
        match info["status"].as_str() {
            Some("active")
            | Some("setup")
            | Some("cancelling")
            | Some("pre-switchover")
            | Some("device") => tokio::time::sleep(Duration::from_millis(20)).await,
            _ => return Ok(()),
        }
    }
    Ok(())
}

/// Quote a path for a QEMU option value (commas are doubled).
fn escape_opt(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// Quote a string for `/bin/sh` (QEMU runs `exec:` URIs with `sh -c`).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

async fn wait_child(
    mut child: tokio::process::Child,
    mut kill_rx: oneshot::Receiver<()>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    vm_id: String,
    kill_on_drop: bool,
) {
    let status = tokio::select! {
        status = child.wait() => status,
        // Err: the machine was dropped without shutdown. The process keeps running
        // unless kill_on_drop is set (guests survive a hatchd restart by default).
        res = &mut kill_rx => {
            if res.is_ok() || kill_on_drop {
                if let Err(e) = child.start_kill() {
                    tracing::debug!(%vm_id, error = %e, "kill qemu");
                }
            }
            child.wait().await
        }
    };
    let description = match status {
        Ok(s) => format!("qemu {s}"),
        Err(e) => format!("qemu wait failed: {e}"),
    };
    tracing::debug!(%vm_id, %description, "qemu process ended");
    let _ = exit_tx.send(Some(ExitInfo { description }));
}

/// A running QEMU process.
pub struct QemuMachine {
    vm_id: String,
    work_dir: PathBuf,
    pid: Option<u32>,
    /// guest port → host port on 127.0.0.1.
    ports: Mutex<HashMap<u16, u16>>,
    /// Serialises control operations (QMP accepts one client at a time).
    op: tokio::sync::Mutex<()>,
    exit_rx: watch::Receiver<Option<ExitInfo>>,
    kill_tx: Mutex<Option<oneshot::Sender<()>>>,
}

impl fmt::Debug for QemuMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QemuMachine")
            .field("vm_id", &self.vm_id)
            .field("pid", &self.pid)
            .field("work_dir", &self.work_dir)
            .finish()
    }
}

impl QemuMachine {
    /// The VM's serial console log.
    pub fn serial_log_path(&self) -> PathBuf {
        self.work_dir.join(SERIAL_LOG)
    }

    fn has_exited(&self) -> bool {
        self.exit_rx.borrow().is_some()
    }

    async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit_rx.clone();
        loop {
            if let Some(info) = rx.borrow_and_update().clone() {
                return info;
            }
            if rx.changed().await.is_err() {
                // Sender gone without a value: cannot happen (the task always sends),
                // but do not hang.
                return rx.borrow().clone().unwrap_or(ExitInfo {
                    description: "qemu wait task ended".into(),
                });
            }
        }
    }

    fn kill(&self) {
        if let Some(tx) = self
            .kill_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = tx.send(());
        }
    }

    /// Kill and wait (used when boot/restore fails after spawning).
    async fn kill_and_wait(&self) {
        self.kill();
        let _ = tokio::time::timeout(QUIT_GRACE, self.wait_exit()).await;
    }

    async fn qmp(&self) -> Result<Qmp, VmmError> {
        if self.has_exited() {
            return Err(self.exited_error().await);
        }
        Qmp::connect(&self.work_dir.join(QMP_SOCKET)).await
    }

    /// `VmmError::Exited` with the exit status and the tails of the logs.
    async fn exited_error(&self) -> VmmError {
        let info = self
            .exit_rx
            .borrow()
            .clone()
            .map(|i| i.description)
            .unwrap_or_else(|| "running".into());
        let serial = tail_of(&self.work_dir.join(SERIAL_LOG), 1500).await;
        let qemu = tail_of(&self.work_dir.join(QEMU_LOG), 1500).await;
        VmmError::Exited(format!(
            "{info}; qemu output: {}; serial console tail: {}",
            qemu.trim(),
            serial.trim()
        ))
    }

    /// Wait for the QMP socket to accept a connection (QEMU creates it early).
    async fn wait_qmp(&self) -> Result<Qmp, VmmError> {
        let deadline = Instant::now() + QMP_SOCKET_TIMEOUT;
        loop {
            if self.has_exited() {
                return Err(self.exited_error().await);
            }
            match Qmp::connect(&self.work_dir.join(QMP_SOCKET)).await {
                Ok(q) => return Ok(q),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }

    /// Poll the serial log until the ready marker appears.
    async fn wait_ready(&self, timeout: Duration) -> Result<(), VmmError> {
        let path = self.work_dir.join(SERIAL_LOG);
        let deadline = Instant::now() + timeout;
        let mut file: Option<tokio::fs::File> = None;
        let mut window: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 8192];
        let marker = READY_MARKER.as_bytes();
        loop {
            if file.is_none() {
                file = tokio::fs::File::open(&path).await.ok();
            }
            if let Some(f) = file.as_mut() {
                loop {
                    let n = f.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    window.extend_from_slice(&buf[..n]);
                    if window.windows(marker.len()).any(|w| w == marker) {
                        return Ok(());
                    }
                    let keep = marker.len();
                    if window.len() > keep {
                        window.drain(..window.len() - keep);
                    }
                }
            }
            if self.has_exited() {
                return Err(self.exited_error().await);
            }
            if Instant::now() >= deadline {
                return Err(VmmError::NotReady(timeout));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Re-read the forwarded ports from `info usernet`.
    async fn refresh_ports(&self, qmp: &mut Qmp) -> Result<(), VmmError> {
        let text = qmp.hmp("info usernet").await?;
        let map: HashMap<u16, u16> = parse_usernet(&text).into_iter().collect();
        *self.ports.lock().unwrap_or_else(|e| e.into_inner()) = map;
        Ok(())
    }

    async fn wait_migration(
        qmp: &mut Qmp,
        what: &str,
        cancel_on_timeout: bool,
    ) -> Result<(), VmmError> {
        let deadline = Instant::now() + MIGRATE_TIMEOUT;
        let mut delay = Duration::from_millis(2);
        loop {
            let info = qmp.execute("query-migrate", None).await?;
            let status = info
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_string();
            match status.as_str() {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let detail = info
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no detail");
                    return Err(VmmError::Control(format!("{what} {status}: {detail}")));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                if cancel_on_timeout {
                    let _ = qmp.execute("migrate_cancel", None).await;
                }
                return Err(VmmError::Control(format!(
                    "{what} not completed within {MIGRATE_TIMEOUT:?} (status {status})"
                )));
            }
            tokio::time::sleep(delay).await;
            // query-migrate is cheap: poll often, a wake waits on it.
            delay = (delay * 2).min(Duration::from_millis(5));
        }
    }

    async fn do_snapshot(&self, qmp: &mut Qmp, tmp: &Path, path: &Path) -> Result<(), VmmError> {
        qmp.execute("stop", None).await?;
        // Default migration bandwidth cap is 32 MiB/s; lift it (it is a local file).
        let _ = qmp
            .execute(
                "migrate-set-parameters",
                Some(json!({ "max-bandwidth": 1u64 << 40 })),
            )
            .await;
        let uri = format!("exec:cat > {}", shell_quote(&tmp.display().to_string()));
        qmp.execute("migrate", Some(json!({ "uri": uri }))).await?;
        Self::wait_migration(qmp, "migration", true).await?;
        let tmp2 = tmp.to_path_buf();
        let path2 = path.to_path_buf();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let meta = std::fs::metadata(&tmp2)?;
            if meta.len() == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "snapshot file is empty",
                ));
            }
            std::fs::File::open(&tmp2)?.sync_all()?;
            std::fs::rename(&tmp2, &path2)?;
            if let Some(dir) = path2.parent() {
                if let Ok(d) = std::fs::File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| VmmError::Control(format!("snapshot finish task: {e}")))??;
        Ok(())
    }

    async fn quit_and_wait(&self, qmp: Option<Qmp>) {
        if self.has_exited() {
            return;
        }
        let qmp = match qmp {
            Some(q) => Some(q),
            None => Qmp::connect(&self.work_dir.join(QMP_SOCKET)).await.ok(),
        };
        if let Some(mut q) = qmp {
            // The connection may close before the reply arrives: ignore errors.
            let _ = tokio::time::timeout(QUIT_GRACE, q.execute("quit", None)).await;
        }
        if tokio::time::timeout(QUIT_GRACE, self.wait_exit())
            .await
            .is_err()
        {
            tracing::warn!(vm_id = %self.vm_id, "qemu did not quit in time; killing it");
            self.kill_and_wait().await;
        }
    }
}

async fn tail_of(path: &Path, max: usize) -> String {
    match tokio::fs::read(path).await {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max);
            String::from_utf8_lossy(&bytes[start..]).into_owned()
        }
        Err(_) => String::new(),
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

#[async_trait]
impl Hypervisor for QemuHypervisor {
    async fn adopt(&self, spec: &BootSpec) -> Option<Box<dyn Machine>> {
        let wd = std::path::absolute(&spec.work_dir).ok()?;
        let pid = leftover_pid(&wd)?;
        let (exit_tx, exit_rx) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        tokio::spawn(watch_adopted(pid, kill_rx, exit_tx, spec.vm_id.clone()));
        let machine = QemuMachine {
            vm_id: spec.vm_id.clone(),
            work_dir: wd,
            pid: Some(pid as u32),
            ports: Mutex::new(HashMap::new()),
            op: tokio::sync::Mutex::new(()),
            exit_rx,
            kill_tx: Mutex::new(Some(kill_tx)),
        };
        let resumed = async {
            let mut qmp = machine.qmp().await?;
            let status = qmp.execute("query-status", None).await?;
            let status = status["status"].as_str().unwrap_or("").to_string();
            if status != "running" {
                // A snapshot was being written when hatchd died: give it up and
                // let the guest go on (its memory is intact).
                let _ = qmp.execute("migrate_cancel", None).await;
                let _ = machine_wait_migration_end(&mut qmp).await;
                qmp.execute("cont", None).await?;
            }
            machine.refresh_ports(&mut qmp).await?;
            Ok::<String, VmmError>(status)
        }
        .await;
        match resumed {
            Ok(status) => {
                tracing::info!(vm_id = %spec.vm_id, pid, previous_status = %status, "qemu guest taken over after a hatchd restart");
                Some(Box::new(machine))
            }
            Err(e) => {
                tracing::warn!(vm_id = %spec.vm_id, pid, error = %e, "could not take over a leftover qemu; ending it");
                machine.kill_and_wait().await;
                None
            }
        }
    }

    fn reap_leftover(&self, work_dir: &Path) -> bool {
        let Some(pid) = std::path::absolute(work_dir)
            .ok()
            .and_then(|wd| leftover_pid(&wd))
        else {
            return false;
        };
        let killed = super::kill_pid(pid);
        let _ = std::fs::remove_file(work_dir.join(PID_FILE));
        killed
    }

    fn name(&self) -> String {
        match self.accel {
            AccelChoice::Kvm => "qemu-kvm".into(),
            _ => "qemu-tcg".into(),
        }
    }

    async fn boot(&self, spec: &BootSpec) -> Result<Box<dyn Machine>, VmmError> {
        let started = Instant::now();
        let machine = self.spawn(spec, false).await?;
        let result = async {
            machine.wait_ready(self.config.ready_timeout).await?;
            let mut qmp = machine.wait_qmp().await?;
            machine.refresh_ports(&mut qmp).await?;
            Ok::<(), VmmError>(())
        }
        .await;
        if let Err(e) = result {
            if spec.vm_id == KVM_PROBE_ID {
                // Expected on hosts where KVM cannot run guests: `detect` says so.
                tracing::debug!(error = %e, "kvm probe boot failed");
            } else {
                tracing::warn!(vm_id = %spec.vm_id, error = %e, "qemu boot failed");
            }
            machine.kill_and_wait().await;
            return Err(e);
        }
        tracing::info!(
            vm_id = %spec.vm_id,
            accel = %self.accel,
            boot_ms = started.elapsed().as_millis() as u64,
            pid = ?machine.pid,
            "qemu guest booted"
        );
        Ok(Box::new(machine))
    }

    async fn restore(
        &self,
        spec: &BootSpec,
        snapshot: &Path,
    ) -> Result<Box<dyn Machine>, VmmError> {
        let started = Instant::now();
        match tokio::fs::metadata(snapshot).await {
            Ok(m) if m.is_file() && m.len() > 0 => {}
            Ok(_) => {
                return Err(VmmError::Snapshot {
                    path: snapshot.to_path_buf(),
                    reason: "not a non-empty regular file".into(),
                })
            }
            Err(e) => {
                return Err(VmmError::Snapshot {
                    path: snapshot.to_path_buf(),
                    reason: e.to_string(),
                })
            }
        }
        let snapshot_abs = if snapshot.is_absolute() {
            snapshot.to_path_buf()
        } else {
            std::env::current_dir()?.join(snapshot)
        };
        let machine = self.spawn(spec, true).await?;
        let result = async {
            let mut qmp = machine.wait_qmp().await?;
            let uri = format!(
                "exec:cat {}",
                shell_quote(&snapshot_abs.display().to_string())
            );
            qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))
                .await?;
            QemuMachine::wait_migration(&mut qmp, "incoming migration", false).await?;
            qmp.execute("cont", None).await?;
            machine.refresh_ports(&mut qmp).await?;
            Ok::<(), VmmError>(())
        }
        .await;
        if let Err(e) = result {
            let e = if machine.has_exited() {
                machine.exited_error().await
            } else {
                e
            };
            tracing::warn!(vm_id = %spec.vm_id, error = %e, "qemu restore failed");
            machine.kill_and_wait().await;
            return Err(match e {
                VmmError::Control(reason) | VmmError::Exited(reason) => VmmError::Snapshot {
                    path: snapshot.to_path_buf(),
                    reason,
                },
                other => other,
            });
        }
        tracing::info!(
            vm_id = %spec.vm_id,
            accel = %self.accel,
            restore_ms = started.elapsed().as_millis() as u64,
            pid = ?machine.pid,
            "qemu guest restored"
        );
        Ok(Box::new(machine))
    }
}

#[async_trait]
impl Machine for QemuMachine {
    fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn forwarded(&self, guest_port: u16) -> Option<SocketAddr> {
        self.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&guest_port)
            .map(|p| loopback(*p))
    }

    async fn forward_port(&self, guest_port: u16) -> Result<SocketAddr, VmmError> {
        if let Some(addr) = self.forwarded(guest_port) {
            return Ok(addr);
        }
        let _op = self.op.lock().await;
        if let Some(addr) = self.forwarded(guest_port) {
            return Ok(addr);
        }
        let mut qmp = self.qmp().await?;
        let out = qmp
            .hmp(&format!(
                "hostfwd_add {NETDEV_ID} tcp:127.0.0.1:0-:{guest_port}"
            ))
            .await?;
        if !out.trim().is_empty() {
            return Err(VmmError::Control(format!(
                "hostfwd_add {guest_port}: {}",
                out.trim()
            )));
        }
        self.refresh_ports(&mut qmp).await?;
        let addr = self.forwarded(guest_port).ok_or_else(|| {
            VmmError::Control(format!(
                "guest port {guest_port} not listed by info usernet after hostfwd_add"
            ))
        })?;
        tracing::info!(vm_id = %self.vm_id, guest_port, %addr, "qemu port forwarded");
        Ok(addr)
    }

    async fn snapshot(&self, path: &Path) -> Result<(), VmmError> {
        let started = Instant::now();
        let _op = self.op.lock().await;
        let mut qmp = self.qmp().await?;
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()?.join(path)
        };
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp_name);
        let _ = tokio::fs::remove_file(&tmp).await;

        if let Err(e) = self.do_snapshot(&mut qmp, &tmp, &path).await {
            tracing::warn!(vm_id = %self.vm_id, error = %e, "qemu snapshot failed; resuming guest");
            let _ = tokio::fs::remove_file(&tmp).await;
            if !self.has_exited() {
                // The QMP connection may be broken: use a fresh one if needed.
                let resumed = match qmp.execute("cont", None).await {
                    Ok(_) => true,
                    Err(_) => match self.qmp().await {
                        Ok(mut q) => q.execute("cont", None).await.is_ok(),
                        Err(_) => false,
                    },
                };
                if !resumed {
                    tracing::warn!(vm_id = %self.vm_id, "could not resume guest after failed snapshot");
                }
            }
            return Err(e);
        }
        let saved = started.elapsed();
        self.quit_and_wait(Some(qmp)).await;
        let size = tokio::fs::metadata(&path)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        tracing::info!(
            vm_id = %self.vm_id,
            snapshot_ms = saved.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            bytes = size,
            path = %path.display(),
            "qemu guest snapshotted"
        );
        Ok(())
    }

    async fn shutdown(&self) -> Result<(), VmmError> {
        let _op = self.op.lock().await;
        if self.has_exited() {
            return Ok(());
        }
        let started = Instant::now();
        self.quit_and_wait(None).await;
        tracing::info!(
            vm_id = %self.vm_id,
            shutdown_ms = started.elapsed().as_millis() as u64,
            "qemu guest shut down"
        );
        Ok(())
    }

    async fn exited(&self) -> ExitInfo {
        self.wait_exit().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_parses() {
        assert_eq!("TCG".parse::<AccelChoice>(), Ok(AccelChoice::Tcg));
        assert_eq!("kvm".parse::<AccelChoice>(), Ok(AccelChoice::Kvm));
        assert_eq!("auto".parse::<AccelChoice>(), Ok(AccelChoice::Auto));
        assert!("xen".parse::<AccelChoice>().is_err());
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("/a b/c'd"), r"'/a b/c'\''d'");
    }

    #[test]
    fn args_contain_forwards_and_vm_id() {
        let h = QemuHypervisor::new(QemuConfig::default());
        let spec = BootSpec {
            vm_id: "vm1".into(),
            kernel: "/k".into(),
            initrd: Some("/i".into()),
            boot_args: "console=ttyS0".into(),
            vcpus: 1,
            mem_mib: 256,
            user_data: String::new(),
            work_dir: "/w".into(),
            guest_ports: vec![8081, 8080, 8080],
        };
        let args = h.command_args(&spec, true);
        assert!(args.contains(&"console=ttyS0 hatch.vm_id=vm1".to_string()));
        assert!(args.contains(
            &"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:0-:8080,hostfwd=tcp:127.0.0.1:0-:8081"
                .to_string()
        ));
        assert!(args.ends_with(&["-incoming".to_string(), "defer".to_string()]));
        assert_eq!(h.name(), "qemu-tcg");
    }
}
