#![allow(clippy::unwrap_used)]
//! Real-QEMU tests of the QEMU driver, against the image built by `scripts/build-image`
//! (directory from `HATCH_TEST_IMAGE_DIR`, default `/var/lib/hatch/images/default`).
//! They fail, never skip, when QEMU or the image is missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hatch::vmm::qemu::{AccelChoice, QemuConfig, QemuHypervisor};
use hatch::vmm::{BootSpec, Hypervisor, Machine, VmmError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{RwLock, Semaphore};

/// At most two guests at a time (2-core hosts, TCG).
static GUESTS: Semaphore = Semaphore::const_new(2);
/// The leak test counts this process's fds and children: it runs alone (write
/// lock); every other test holds a read lock.
static EXCLUSIVE: RwLock<()> = RwLock::const_new(());

struct Image {
    kernel: PathBuf,
    initrd: PathBuf,
    boot_args: String,
}

fn image() -> Image {
    let dir = std::env::var_os("HATCH_TEST_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/hatch/images/default"));
    let kernel = dir.join("vmlinux");
    let initrd = dir.join("initrd.img");
    let args = dir.join("boot_args");
    for f in [&kernel, &initrd, &args] {
        assert!(
            f.is_file(),
            "guest image file {} is missing: run `scripts/build-image {}` (as root) first, \
             or set HATCH_TEST_IMAGE_DIR",
            f.display(),
            dir.display()
        );
    }
    let boot_args = std::fs::read_to_string(&args)
        .expect("read boot_args")
        .trim()
        .to_string();
    Image {
        kernel,
        initrd,
        boot_args,
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "hatch=info".into()),
        )
        .with_test_writer()
        .try_init();
}

fn hypervisor() -> QemuHypervisor {
    QemuHypervisor::new(QemuConfig {
        accel: AccelChoice::from_env().unwrap_or(AccelChoice::Tcg),
        ready_timeout: Duration::from_secs(90),
        kill_on_drop: true,
        ..QemuConfig::default()
    })
}

fn spec(img: &Image, vm_id: &str, work_dir: &Path, user_data: &str, ports: &[u16]) -> BootSpec {
    BootSpec {
        vm_id: vm_id.to_string(),
        kernel: img.kernel.clone(),
        initrd: Some(img.initrd.clone()),
        boot_args: img.boot_args.clone(),
        vcpus: 1,
        mem_mib: 256,
        user_data: user_data.to_string(),
        work_dir: work_dir.to_path_buf(),
        guest_ports: ports.to_vec(),
    }
}

/// One HTTP/1.0 GET of `/`; returns the whole response.
async fn get_once(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// GET until a 200 response arrives or the deadline passes; returns the body.
async fn get_until_ok(addr: SocketAddr, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut last;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), get_once(addr)).await {
            Ok(Ok(resp)) if resp.starts_with("HTTP/1.") && resp.contains(" 200 ") => {
                let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
                return body;
            }
            Ok(Ok(resp)) => last = format!("response {resp:?}"),
            Ok(Err(e)) => last = format!("error {e}"),
            Err(_) => last = "timeout".into(),
        }
        assert!(
            Instant::now() < deadline,
            "no HTTP 200 from {addr} within {within:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn process_alive(pid: u32) -> bool {
    // A zombie is not alive for our purposes (it is reaped by the driver's wait task).
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

async fn assert_exits(machine: &dyn Machine, pid: u32) {
    let info = tokio::time::timeout(Duration::from_secs(15), machine.exited())
        .await
        .expect("exited() did not resolve");
    assert!(!info.description.is_empty());
    assert!(!process_alive(pid), "qemu pid {pid} still alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_snapshot_restore_shutdown() {
    init_tracing();
    let img = image();
    let _shared = EXCLUSIVE.read().await;
    let _slot = GUESTS.acquire().await.expect("semaphore");
    let hv = hypervisor();
    assert_eq!(hv.name(), "qemu-tcg");
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm_id = "vm-test-one";
    let spec = spec(&img, vm_id, &tmp.path().join("vm"), "", &[8080]);

    let t = Instant::now();
    let m = hv.boot(&spec).await.expect("boot");
    let boot_time = t.elapsed();
    let pid = m.pid().expect("pid");
    assert!(process_alive(pid));
    let addr = m.forwarded(8080).expect("8080 forwarded");
    assert!(addr.ip().is_loopback());
    assert_eq!(m.forward_port(8080).await.expect("forward_port"), addr);
    let body = get_until_ok(addr, Duration::from_secs(20)).await;
    assert_eq!(body, format!("hatch guest {vm_id}\n"));
    let serial = std::fs::read_to_string(tmp.path().join("vm/serial.log")).expect("serial log");
    assert!(serial.contains("HATCH_GUEST_READY"));

    let snap = tmp.path().join("snaps/vm.snap");
    let t = Instant::now();
    m.snapshot(&snap).await.expect("snapshot");
    let snap_time = t.elapsed();
    assert!(snap.is_file(), "snapshot file missing");
    assert!(std::fs::metadata(&snap).expect("meta").len() > 1_000_000);
    assert_exits(m.as_ref(), pid).await;
    m.shutdown()
        .await
        .expect("shutdown after snapshot is a no-op");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path().join("snaps"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "temporary files left: {leftovers:?}");

    // Restore twice from the same file (scale-to-zero wakes many times).
    for round in 0..2 {
        let t = Instant::now();
        let r = hv.restore(&spec, &snap).await.expect("restore");
        let restore_time = t.elapsed();
        let rpid = r.pid().expect("pid");
        assert_ne!(rpid, pid);
        let raddr = r.forwarded(8080).expect("8080 forwarded after restore");
        let body = get_until_ok(raddr, Duration::from_secs(10)).await;
        let ready_time = t.elapsed();
        assert_eq!(body, format!("hatch guest {vm_id}\n"));
        eprintln!(
            "round {round}: boot {boot_time:?}, snapshot {snap_time:?}, restore {restore_time:?}, \
             restore→HTTP {ready_time:?}"
        );
        r.shutdown().await.expect("shutdown");
        assert_exits(r.as_ref(), rpid).await;
        r.shutdown().await.expect("second shutdown");
        assert!(r.forward_port(9999).await.is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_data_script_and_runtime_forward() {
    init_tracing();
    let img = image();
    let _shared = EXCLUSIVE.read().await;
    let _slot = GUESTS.acquire().await.expect("semaphore");
    let hv = hypervisor();
    let tmp = tempfile::tempdir().expect("tempdir");
    let user_data = "#!/bin/sh\nsleep 2\nmkdir -p /www2\necho \"script page $(hostname)\" > /www2/index.html\necho user-data-started\nexec httpd -f -p 8081 -h /www2\n";
    let spec0 = spec(&img, "vm-script", &tmp.path().join("vm"), user_data, &[]);
    let m = hv.boot(&spec0).await.expect("boot");
    assert_eq!(m.forwarded(8081), None);
    assert_eq!(m.forwarded(8080), None);
    let addr = m.forward_port(8081).await.expect("forward 8081");
    assert_eq!(m.forwarded(8081), Some(addr));
    assert_eq!(m.forward_port(8081).await.expect("again"), addr);
    let body = get_until_ok(addr, Duration::from_secs(30)).await;
    assert_eq!(body, "script page hatch-vm-script\n");
    // No default httpd when user data is a script.
    let a8080 = m.forward_port(8080).await.expect("forward 8080");
    let r = tokio::time::timeout(Duration::from_secs(3), get_once(a8080)).await;
    assert!(
        !matches!(&r, Ok(Ok(resp)) if resp.contains(" 200 ")),
        "unexpected answer on 8080: {r:?}"
    );

    // A snapshot that cannot be written fails and leaves the guest running.
    let pid = m.pid().expect("pid");
    let bad = Path::new("/proc/hatch-cannot-write.snap");
    assert!(
        m.snapshot(bad).await.is_err(),
        "snapshot into /proc succeeded"
    );
    assert!(process_alive(pid));
    let body = get_until_ok(addr, Duration::from_secs(10)).await;
    assert_eq!(body, "script page hatch-vm-script\n");

    // Snapshot and restore with the runtime-added port in the spec.
    let snap = tmp.path().join("vm.snap");
    m.snapshot(&snap).await.expect("snapshot");
    assert_exits(m.as_ref(), pid).await;
    let spec1 = BootSpec {
        guest_ports: vec![8081],
        ..spec0.clone()
    };
    let r = hv.restore(&spec1, &snap).await.expect("restore");
    let raddr = r.forwarded(8081).expect("8081 after restore");
    let body = get_until_ok(raddr, Duration::from_secs(10)).await;
    assert_eq!(body, "script page hatch-vm-script\n");
    let serial = std::fs::read_to_string(tmp.path().join("vm/serial.log")).expect("serial");
    assert!(serial.contains("user-data-started"), "serial: {serial}");
    let rpid = r.pid().expect("pid");
    r.shutdown().await.expect("shutdown");
    assert_exits(r.as_ref(), rpid).await;
}

#[tokio::test]
async fn restore_from_missing_file_fails() {
    let img = image();
    let _shared = EXCLUSIVE.read().await;
    let hv = hypervisor();
    let tmp = tempfile::tempdir().expect("tempdir");
    let spec = spec(&img, "vm-missing", &tmp.path().join("vm"), "", &[8080]);
    let err = match hv.restore(&spec, &tmp.path().join("nope.snap")).await {
        Ok(_) => panic!("restore from a missing file succeeded"),
        Err(e) => e,
    };
    assert!(matches!(err, VmmError::Snapshot { .. }), "{err:?}");
}

#[tokio::test]
async fn boot_failure_reports_exit() {
    let img = image();
    let _shared = EXCLUSIVE.read().await;
    let hv = hypervisor();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut spec = spec(&img, "vm-bad", &tmp.path().join("vm"), "", &[8080]);
    spec.kernel = tmp.path().join("no-such-kernel");
    let err = match hv.boot(&spec).await {
        Ok(_) => panic!("boot with a missing kernel succeeded"),
        Err(e) => e,
    };
    match err {
        VmmError::Exited(msg) => assert!(msg.contains("no-such-kernel"), "{msg}"),
        other => panic!("expected Exited, got {other:?}"),
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("fd dir").count()
}

/// Live (non-zombie) child processes of this test process.
fn children() -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let rest: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if rest.len() > 1 && rest[0] != "Z" && rest[1] == me.to_string() {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_snapshot_restore_leaks_nothing() {
    init_tracing();
    let img = image();
    let _alone = EXCLUSIVE.write().await;
    let hv = hypervisor();
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm_id = "vm-cycles";
    let mut spec = spec(&img, vm_id, &tmp.path().join("vm"), "", &[8080]);
    let mut m = hv.boot(&spec).await.expect("boot");
    m.forward_port(8081).await.expect("runtime forward");
    spec.guest_ports = vec![8080, 8081];
    let snap = tmp.path().join("vm.snap");
    let mut baseline: Option<(usize, usize)> = None;
    for cycle in 0..6 {
        let body = get_until_ok(m.forwarded(8080).expect("8080"), Duration::from_secs(20)).await;
        assert_eq!(body, format!("hatch guest {vm_id}\n"));
        assert!(m.forwarded(8081).is_some(), "8081 lost in cycle {cycle}");
        let now = (open_fds(), children().len());
        assert_eq!(
            now.1,
            1,
            "expected exactly one qemu child: {:?}",
            children()
        );
        match baseline {
            None => baseline = Some(now),
            Some(b) => assert_eq!(now, b, "fds/children changed in cycle {cycle}"),
        }
        let pid = m.pid().expect("pid");
        m.snapshot(&snap).await.expect("snapshot");
        assert_exits(m.as_ref(), pid).await;
        drop(m);
        m = hv.restore(&spec, &snap).await.expect("restore");
    }
    m.shutdown().await.expect("shutdown");
    drop(m);
    assert!(children().is_empty(), "children left: {:?}", children());

    // With kill_on_drop (set by these tests), dropping a machine ends its process.
    let m = hv.restore(&spec, &snap).await.expect("restore");
    let pid = m.pid().expect("pid");
    drop(m);
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "dropped machine's qemu still alive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn detect_picks_a_working_accelerator() {
    init_tracing();
    let img = image();
    let _shared = EXCLUSIVE.read().await;
    let _slot = GUESTS.acquire().await.expect("semaphore");
    let t = Instant::now();
    let hv = QemuHypervisor::detect(
        QemuConfig {
            kill_on_drop: true,
            ..QemuConfig::default()
        },
        &img.kernel,
        Some(&img.initrd),
        &img.boot_args,
    )
    .await;
    eprintln!("detect chose {} in {:?}", hv.name(), t.elapsed());
    assert!(matches!(hv.accel(), AccelChoice::Tcg | AccelChoice::Kvm));
    assert!(t.elapsed() < Duration::from_secs(40));
}
