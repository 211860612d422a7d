//! The VM manager: owns the lifecycle of every VM (create, boot, stop, snapshot,
//! restore, delete), the single-flight wake used by the proxy, the route index and
//! the reconciliation of the store with reality at start.
//!
//! Concurrency model: each VM has a runtime with an async `op` lock that
//! serialises lifecycle operations, and a small sync `inner` lock (never held
//! across `.await`) for the live machine handle, the transient state shown by the
//! API and the in-flight wake. A wake is a spawned task whose result is shared by
//! every waiter through a `watch` channel: one restore however many requests wait,
//! and a waiter that gives up does not cancel it.

mod activity;
mod route_index;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use activity::{ActivityGuard, Closer};
pub use route_index::{RouteIndex, RouteTarget};

use activity::{now_ms, Activity};

use crate::model::{
    new_id, random_alnum, validate_subdomain, Image, Route, SleepMode, Snapshot, Vm, VmEvent,
    VmState, DEFAULT_IMAGE_ID,
};
use crate::snapstore::{snapshot_key, SnapStore};
use crate::store::{Store, StoreError};
use crate::vmm::{BootSpec, Hypervisor, Machine};

/// Errors of manager operations; `api` maps each to one status code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ManagerError {
    /// The VM, route or snapshot does not exist (or belongs to someone else).
    #[error("not found")]
    NotFound,
    /// The client sent something invalid.
    #[error("{0}")]
    BadRequest(String),
    /// The operation is not allowed in the VM's current state, or a name is taken.
    #[error("{0}")]
    Conflict(String),
    /// A quota would be exceeded.
    #[error("{0}")]
    Quota(String),
    /// The VM did not come up within the wake timeout.
    #[error("{0}")]
    Timeout(String),
    /// The hypervisor failed.
    #[error("{0}")]
    Vmm(String),
    /// A bug or an environment failure (database, filesystem).
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for ManagerError {
    fn from(e: StoreError) -> Self {
        ManagerError::Internal(e.to_string())
    }
}

impl From<std::io::Error> for ManagerError {
    fn from(e: std::io::Error) -> Self {
        ManagerError::Internal(e.to_string())
    }
}

type Result<T> = std::result::Result<T, ManagerError>;

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub data_dir: PathBuf,
    /// Bound on one boot or restore, and on how long a proxied request waits.
    pub wake_timeout: Duration,
    pub max_vms_per_user: u32,
    pub max_snapshots_per_vm: u32,
    pub default_vcpu: u32,
    pub default_mem_mib: u32,
    pub default_boot_args: String,
    /// Requests that may wait for one VM's wake at once; more get 503.
    pub max_wake_waiters: usize,
    /// Default idle time before a VM is put to sleep.
    pub idle_timeout: Duration,
    /// Default interval between idleness checks.
    pub idle_check_interval: Duration,
}

/// Body of `POST /vms` (unknown fields are refused by the API layer).
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CreateVm {
    pub image_id: Option<String>,
    pub vcpu_count: Option<i64>,
    pub mem_mib: Option<i64>,
    pub boot_args: Option<String>,
    pub enable_network: Option<bool>,
    pub user_data: Option<String>,
    /// Go duration (`10m`); default `HATCH_IDLE_TIMEOUT`.
    pub idle_timeout: Option<String>,
    /// Go duration; default `HATCH_IDLE_CHECK_INTERVAL`.
    pub idle_check_interval: Option<String>,
    /// `snapshot` (default) or `stop`.
    pub sleep_mode: Option<SleepMode>,
}

/// Body of `POST /vms/{id}/routes`.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CreateRoute {
    pub subdomain: Option<String>,
    pub target_port: Option<i64>,
    pub auto_wake: Option<bool>,
}

/// Why the proxy cannot reach a VM.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The route's VM is gone.
    #[error("vm not found")]
    VmGone,
    /// The VM sleeps and the route does not wake it, or it is in a state that
    /// cannot serve.
    #[error("vm is {0} and {1}")]
    NotServing(VmState, &'static str),
    /// The wake did not finish before the deadline.
    #[error("vm did not wake within {0:?}")]
    Timeout(Duration),
    /// The wake failed.
    #[error("failed to wake vm: {0}")]
    WakeFailed(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// Too many requests already wait for this VM to wake.
    #[error("too many requests are waiting for this vm to wake ({0}); retry shortly")]
    Overloaded(usize),
}

/// Counts a request among the VM's wake waiters while alive.
struct WaiterGuard(Arc<VmRuntime>);

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where to send a proxied request.
#[derive(Debug, Clone, Copy)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// The VM was asleep or starting when the request arrived: the guest's service
    /// may still be coming up, so the proxy retries refused connections.
    pub woke: bool,
}

/// Who asked for a VM to sleep.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Trigger {
    Api,
    Idle,
    Shutdown,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Api => "api",
            Trigger::Idle => "idle",
            Trigger::Shutdown => "shutdown",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WakeMode {
    /// Proxy wake or create: from stopped or snapshotted.
    Auto,
    /// `POST /start`: also from error.
    Start,
    /// `POST /restore`: from snapshotted, or from error when a snapshot exists
    /// (a restore that failed for a reason outside the snapshot can be retried).
    Restore,
}

impl WakeMode {
    fn as_str(self) -> &'static str {
        match self {
            WakeMode::Auto => "auto",
            WakeMode::Start => "start",
            WakeMode::Restore => "restore",
        }
    }
}

type WakeResult = std::result::Result<(), ManagerError>;

/// A wake in progress, as its waiters see it.
#[derive(Clone, Debug)]
enum WakeStatus {
    Pending,
    /// The machine runs; the store and events are being updated. The proxy
    /// forwards from here, API calls wait for `Done`.
    Up,
    Done(WakeResult),
}

#[derive(Default)]
struct Inner {
    machine: Option<Arc<dyn Machine>>,
    /// Bumped each time a machine is installed, so a late exit notice of an old
    /// machine is not taken for the new one.
    generation: u64,
    /// `starting` / `stopping` while an operation runs.
    transient: Option<VmState>,
    wake: Option<watch::Receiver<WakeStatus>>,
}

#[derive(Default)]
struct VmRuntime {
    op: tokio::sync::Mutex<()>,
    inner: Mutex<Inner>,
    /// Requests currently waiting for a wake (bounded by `max_wake_waiters`).
    waiters: AtomicUsize,
    /// Requests, streams and connections in flight; the idle clock.
    activity: Arc<Activity>,
    /// Set by a wake; the first response after it records its latency.
    first_byte_pending: std::sync::atomic::AtomicBool,
}

impl VmRuntime {
    /// Makes `machine` the VM's machine; its generation tells a later exit
    /// watcher whether the machine it watches is still the current one.
    fn install(&self, machine: Arc<dyn Machine>) -> u64 {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.machine = Some(machine);
        inner.generation
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The live machine when the VM is running and no operation is under way.
    fn ready_machine(&self) -> Option<Arc<dyn Machine>> {
        let inner = self.lock();
        match (&inner.machine, inner.transient, &inner.wake) {
            (Some(m), None, None) => Some(m.clone()),
            _ => None,
        }
    }
}

pub struct Manager {
    store: Store,
    hv: Arc<dyn Hypervisor>,
    /// Where snapshots are kept (a local directory or an S3 bucket); the
    /// newest raw snapshot of each VM is also cached under the data dir.
    snaps: SnapStore,
    cfg: ManagerConfig,
    runtimes: Mutex<HashMap<String, Arc<VmRuntime>>>,
    routes: RouteIndex,
}

impl Manager {
    /// Builds the manager, loads the route index and reconciles VMs whose
    /// process did not survive a hatchd restart.
    pub async fn new(
        store: Store,
        hv: Arc<dyn Hypervisor>,
        snaps: SnapStore,
        cfg: ManagerConfig,
    ) -> Result<Arc<Manager>> {
        let routes = RouteIndex::load(&store.list_routes(None).await?);
        let mgr = Arc::new(Manager {
            store,
            hv,
            snaps,
            cfg,
            runtimes: Mutex::new(HashMap::new()),
            routes,
        });
        mgr.reconcile().await?;
        Ok(mgr)
    }

    pub fn hypervisor_name(&self) -> String {
        self.hv.name()
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.cfg
    }

    /// Brings the store in line with reality after a start. A VM recorded as
    /// running (or mid-operation) whose hypervisor process outlived the previous
    /// hatchd is taken over with its memory; one that was being snapshotted when
    /// hatchd died is resumed, or, when its snapshot file was complete, recorded
    /// as snapshotted; otherwise its memory is gone and it is marked stopped (the
    /// next request boots it). Snapshotted and stopped VMs stay as they are.
    async fn reconcile(self: &Arc<Self>) -> Result<()> {
        for vm in self.store.list_vms(None).await? {
            if !matches!(
                vm.state,
                VmState::Running | VmState::Starting | VmState::Stopping
            ) {
                continue;
            }
            let adopted = match self.boot_spec(&vm).await {
                Ok(spec) => self.hv.adopt(&spec).await,
                Err(e) => {
                    warn!(vm_id = %vm.id, error = %e, "cannot describe the vm to take it over");
                    None
                }
            };
            if let Some(machine) = adopted {
                let rt = self.runtime(&vm.id);
                let machine: Arc<dyn Machine> = Arc::from(machine);
                let generation = rt.install(machine.clone());
                rt.activity.touch();
                self.store
                    .set_vm_state(&vm.id, VmState::Running, None)
                    .await?;
                self.watch_exit(&vm.id, rt, machine, generation);
                info!(vm_id = %vm.id, "vm kept running across the hatchd restart (process taken over)");
                self.event(
                    &vm.id,
                    "adopt",
                    serde_json::json!({"previous_state": vm.state.as_str()}),
                )
                .await;
                self.orphan_snapshots(&vm, false).await;
                continue;
            }
            let killed = self.hv.reap_leftover(&self.work_dir(&vm.id));
            if self.orphan_snapshots(&vm, true).await {
                continue;
            }
            warn!(
                vm_id = %vm.id,
                previous_state = %vm.state,
                killed_leftover_process = killed,
                "vm was {} when hatchd last stopped and its memory is lost; marking it stopped (the next request boots it)",
                vm.state
            );
            self.store
                .set_vm_state(
                    &vm.id,
                    VmState::Stopped,
                    Some("hatchd restarted while the vm was running"),
                )
                .await?;
        }
        Ok(())
    }

    /// Raw snapshot files of a VM with no row: written completely (the driver
    /// renames them into place) by a snapshot that hatchd died before
    /// recording. With `register`, the newest one written during the VM's current
    /// run is stored and recorded and the VM marked snapshotted (true); the rest
    /// are removed.
    async fn orphan_snapshots(&self, vm: &Vm, register: bool) -> bool {
        let known: std::collections::HashSet<String> = match self.store.list_snapshots(&vm.id).await
        {
            Ok(s) => s.into_iter().map(|s| s.id).collect(),
            Err(_) => return false,
        };
        let Ok(mut dir) = tokio::fs::read_dir(self.snapshot_dir(&vm.id)).await else {
            return false;
        };
        let mut orphans = Vec::new();
        while let Ok(Some(e)) = dir.next_entry().await {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".vmstate") else {
                // Temporary files of an interrupted write.
                let _ = tokio::fs::remove_file(e.path()).await;
                continue;
            };
            if known.contains(id) {
                continue;
            }
            let modified = e.metadata().await.ok().and_then(|m| m.modified().ok());
            orphans.push((modified, id.to_string(), e.path()));
        }
        orphans.sort();
        let newest = orphans.pop();
        for (_, _, path) in orphans {
            let _ = tokio::fs::remove_file(path).await;
        }
        let Some((modified, snap_id, path)) = newest else {
            return false;
        };
        let current_run =
            modified.is_some_and(|m| chrono::DateTime::<Utc>::from(m) >= vm.updated_at);
        if !register || !current_run {
            let _ = tokio::fs::remove_file(path).await;
            return false;
        }
        let key = snapshot_key(&vm.id, &snap_id);
        if let Err(e) = self.snaps.upload(&key, &path).await {
            warn!(vm_id = %vm.id, error = %e, "could not store a recovered snapshot; keeping the local copy only");
        }
        let size = tokio::fs::metadata(&path)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        let snap = Snapshot {
            id: snap_id,
            vm_id: vm.id.clone(),
            state_key: key,
            size_bytes: size as i64,
            created_at: modified
                .map(chrono::DateTime::<Utc>::from)
                .unwrap_or_else(Utc::now),
        };
        if self.store.insert_snapshot(&snap).await.is_err()
            || self
                .store
                .set_vm_state(&vm.id, VmState::Snapshotted, None)
                .await
                .is_err()
        {
            return false;
        }
        info!(vm_id = %vm.id, snapshot_id = %snap.id, "recovered the snapshot hatchd was writing when it stopped; vm is snapshotted");
        self.event(
            &vm.id,
            "snapshot",
            serde_json::json!({"trigger": "recovered", "snapshot_id": snap.id, "size_bytes": size}),
        )
        .await;
        true
    }

    fn work_dir(&self, vm_id: &str) -> PathBuf {
        self.cfg.data_dir.join("vms").join(vm_id)
    }

    /// The local copy of a raw snapshot (what QEMU reads and writes).
    fn snapshot_cache(&self, vm_id: &str, snap_id: &str) -> PathBuf {
        self.snapshot_dir(vm_id).join(format!("{snap_id}.vmstate"))
    }

    fn snapshot_dir(&self, vm_id: &str) -> PathBuf {
        self.cfg.data_dir.join("snapshots").join(vm_id)
    }

    fn runtime(&self, vm_id: &str) -> Arc<VmRuntime> {
        let mut map = self.runtimes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rt) = map.get(vm_id) {
            return rt.clone();
        }
        map.entry(vm_id.to_string()).or_default().clone()
    }

    /// The VM as the API shows it: the stored state, or the transient one while an
    /// operation runs.
    fn present(&self, mut vm: Vm) -> Vm {
        let map = self.runtimes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rt) = map.get(&vm.id) {
            if let Some(t) = rt.lock().transient {
                vm.state = t;
            }
            let ms = rt.activity.last_ms.load(Ordering::SeqCst);
            if ms > 0 {
                vm.last_activity_at = chrono::DateTime::from_timestamp_millis(ms as i64);
            }
        }
        vm
    }

    async fn owned_vm(&self, user: &str, vm_id: &str) -> Result<Vm> {
        match self.store.get_vm(vm_id).await? {
            Some(vm) if vm.user_id == user => Ok(vm),
            _ => Err(ManagerError::NotFound),
        }
    }

    // ---------------------------------------------------------------- VMs

    pub async fn create_vm(self: &Arc<Self>, user: &str, req: CreateVm) -> Result<Vm> {
        let image_id = req
            .image_id
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_IMAGE_ID.to_string());
        let image = self.store.get_image(&image_id).await?.ok_or_else(|| {
            if image_id == DEFAULT_IMAGE_ID {
                ManagerError::BadRequest(
                    "no image_id provided and no default image configured (run scripts/build-image, or set HATCH_DEFAULT_KERNEL_PATH and HATCH_DEFAULT_ROOTFS_PATH)".into(),
                )
            } else {
                ManagerError::BadRequest(format!("image not found: {image_id}"))
            }
        })?;
        let count = self.store.count_vms(user).await?;
        if count >= self.cfg.max_vms_per_user as i64 {
            return Err(ManagerError::Quota(format!(
                "vm limit reached ({count}/{})",
                self.cfg.max_vms_per_user
            )));
        }
        let vcpu = match req.vcpu_count.unwrap_or(0) {
            0 => self.cfg.default_vcpu,
            n => n.clamp(1, 32) as u32,
        };
        let mem = match req.mem_mib.unwrap_or(0) {
            0 => self.cfg.default_mem_mib,
            n => n.clamp(128, 65536) as u32,
        };
        let dur = |field: &str, v: Option<String>| -> Result<Option<Duration>> {
            v.filter(|s| !s.is_empty())
                .map(|s| {
                    crate::config::parse_duration(&s)
                        .ok()
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| {
                            ManagerError::BadRequest(format!(
                                "{field} must be a positive duration such as 30s, 10m or 1h (got {s:?})"
                            ))
                        })
                })
                .transpose()
        };
        let idle_timeout = dur("idle_timeout", req.idle_timeout)?;
        let idle_check_interval = dur("idle_check_interval", req.idle_check_interval)?;
        let now = Utc::now();
        let vm = Vm {
            id: new_id("vm"),
            image_id: image.id.clone(),
            user_id: user.to_string(),
            // Stored as stopped until the boot completes: if hatchd dies during
            // the boot, the VM is simply asleep. The API shows `starting`.
            state: VmState::Stopped,
            vcpu_count: vcpu,
            mem_mib: mem,
            boot_args: req.boot_args.unwrap_or_default(),
            user_data: req.user_data.unwrap_or_default(),
            enable_network: req.enable_network.unwrap_or(true),
            boot_count: 0,
            restore_count: 0,
            last_error: None,
            idle_timeout,
            idle_check_interval,
            sleep_mode: req.sleep_mode.unwrap_or_default(),
            last_activity_at: Some(now),
            created_at: now,
            updated_at: now,
        };
        self.store.insert_vm(&vm).await?;
        self.runtime(&vm.id).activity.touch();
        info!(vm_id = %vm.id, image_id = %vm.image_id, vcpu, mem_mib = mem, "vm created; booting");
        let _ = self.wake(&vm.id, WakeMode::Auto);
        Ok(self.present(vm))
    }

    pub async fn list_vms(&self, user: &str) -> Result<Vec<Vm>> {
        self.settled(None).await;
        let vms = self.store.list_vms(Some(user)).await?;
        Ok(vms.into_iter().map(|v| self.present(v)).collect())
    }

    pub async fn get_vm(&self, user: &str, vm_id: &str) -> Result<Vm> {
        self.settled(Some(vm_id)).await;
        let vm = self.owned_vm(user, vm_id).await?;
        Ok(self.present(vm))
    }

    /// Waits (a few ms) for wakes whose machine is up but whose bookkeeping is
    /// still being written, of one VM or of all: the proxy forwards before it
    /// is done, and what the API shows must match what the proxy did.
    async fn settled(&self, vm_id: Option<&str>) {
        let up: Vec<watch::Receiver<WakeStatus>> = {
            let map = self.runtimes.lock().unwrap_or_else(|e| e.into_inner());
            let wake = |rt: &Arc<VmRuntime>| rt.lock().wake.clone();
            match vm_id {
                Some(id) => map.get(id).and_then(wake).into_iter().collect(),
                None => map.values().filter_map(wake).collect(),
            }
        };
        for mut rx in up {
            if matches!(*rx.borrow(), WakeStatus::Up) {
                let done = rx.wait_for(|v| matches!(v, WakeStatus::Done(_)));
                let _ = tokio::time::timeout(Duration::from_secs(5), done).await;
            }
        }
    }

    pub async fn delete_vm(&self, user: &str, vm_id: &str) -> Result<()> {
        self.owned_vm(user, vm_id).await?;
        let rt = self.runtime(vm_id);
        let _op = rt.op.lock().await;
        let machine = {
            let mut inner = rt.lock();
            inner.transient = Some(VmState::Stopping);
            inner.machine.take()
        };
        if let Some(m) = machine {
            if let Err(e) = m.shutdown().await {
                warn!(vm_id, error = %e, "shutdown during delete failed");
            }
        }
        self.routes.remove_vm(vm_id);
        self.store.delete_vm(vm_id).await?;
        if let Err(e) = self
            .snaps
            .delete_prefix(&format!("snapshots/{vm_id}/"))
            .await
        {
            warn!(vm_id, error = %e, "could not delete the vm's snapshots from the store");
        }
        for dir in [self.snapshot_dir(vm_id), self.work_dir(vm_id)] {
            if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(vm_id, dir = %dir.display(), error = %e, "could not remove vm files");
                }
            }
        }
        rt.lock().transient = None;
        self.runtimes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(vm_id);
        info!(vm_id, "vm deleted");
        Ok(())
    }

    pub async fn stop_vm(&self, user: &str, vm_id: &str) -> Result<Vm> {
        self.owned_vm(user, vm_id).await?;
        self.stop_inner(vm_id, Trigger::Api).await?;
        self.get_vm(user, vm_id).await
    }

    /// Powers the VM off. For [`Trigger::Idle`] nothing happens (`Ok(false)`)
    /// when the VM turned out to be busy after all.
    async fn stop_inner(&self, vm_id: &str, trigger: Trigger) -> Result<bool> {
        let rt = self.runtime(vm_id);
        let _op = rt.op.lock().await;
        let vm = self
            .store
            .get_vm(vm_id)
            .await?
            .ok_or(ManagerError::NotFound)?;
        if !matches!(vm.state, VmState::Running | VmState::Error) {
            return Err(wrong_state("stop", vm.state, "running or error"));
        }
        rt.lock().transient = Some(VmState::Stopping);
        if trigger == Trigger::Idle && !self.still_idle(&rt, &vm) {
            rt.lock().transient = None;
            return Ok(false);
        }
        let t0 = Instant::now();
        let closed = self.close_connections(&rt).await;
        let machine = rt.lock().machine.take();
        let res = match machine {
            Some(m) => m.shutdown().await,
            None => Ok(()),
        };
        rt.lock().transient = None;
        if let Err(e) = res {
            // The process is being ended either way; record what happened.
            warn!(vm_id, error = %e, "shutdown reported an error");
        }
        self.store
            .set_vm_state(vm_id, VmState::Stopped, None)
            .await?;
        let total_ms = t0.elapsed().as_millis() as u64;
        info!(
            vm_id,
            trigger = trigger.as_str(),
            closed_connections = closed,
            total_ms,
            "vm stopped"
        );
        self.event(
            vm_id,
            "stop",
            serde_json::json!({"trigger": trigger.as_str(), "total_ms": total_ms, "closed_connections": closed}),
        )
        .await;
        Ok(true)
    }

    /// Asks open connections and streams of the VM to finish cleanly (WebSocket
    /// close 1001, end of stream) and waits briefly for them to do so.
    async fn close_connections(&self, rt: &VmRuntime) -> usize {
        let n = rt.activity.close_all();
        if n > 0 {
            let deadline = Instant::now() + Duration::from_secs(2);
            while rt.activity.busy() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        n
    }

    /// Under the VM's op lock with the transient state set, so no new request
    /// can start using it: is it still idle?
    fn still_idle(&self, rt: &VmRuntime, vm: &Vm) -> bool {
        let timeout = vm.idle_timeout.unwrap_or(self.cfg.idle_timeout);
        let last = rt.activity.last_ms.load(Ordering::SeqCst);
        !rt.activity.busy() && now_ms().saturating_sub(last) >= timeout.as_millis() as u64
    }

    pub async fn start_vm(self: &Arc<Self>, user: &str, vm_id: &str) -> Result<Vm> {
        let vm = self.owned_vm(user, vm_id).await?;
        let vm = self.present(vm);
        match vm.state {
            // A snapshotted VM is resumed from its snapshot (its memory is kept).
            VmState::Stopped | VmState::Error | VmState::Starting | VmState::Snapshotted => {}
            s => return Err(wrong_state("start", s, "stopped, snapshotted or error")),
        }
        self.wake_and_wait(vm_id, WakeMode::Start).await?;
        self.get_vm(user, vm_id).await
    }

    pub async fn restore_vm(self: &Arc<Self>, user: &str, vm_id: &str) -> Result<Vm> {
        let vm = self.owned_vm(user, vm_id).await?;
        let vm = self.present(vm);
        let retry_after_error =
            vm.state == VmState::Error && !self.store.list_snapshots(vm_id).await?.is_empty();
        if !(matches!(vm.state, VmState::Snapshotted | VmState::Starting) || retry_after_error) {
            return Err(wrong_state(
                "restore",
                vm.state,
                "snapshotted, or error with a snapshot",
            ));
        }
        self.wake_and_wait(vm_id, WakeMode::Restore).await?;
        self.get_vm(user, vm_id).await
    }

    pub async fn snapshot_vm(&self, user: &str, vm_id: &str) -> Result<Snapshot> {
        self.owned_vm(user, vm_id).await?;
        self.snapshot_inner(vm_id, Trigger::Api)
            .await?
            .ok_or_else(|| ManagerError::Internal("snapshot skipped".into()))
    }

    /// Saves the VM and puts it to sleep. For [`Trigger::Idle`] nothing happens
    /// (`Ok(None)`) when the VM turned out to be busy after all. Requests that
    /// arrive meanwhile wait for the snapshot, then wake the VM again.
    async fn snapshot_inner(&self, vm_id: &str, trigger: Trigger) -> Result<Option<Snapshot>> {
        let rt = self.runtime(vm_id);
        let _op = rt.op.lock().await;
        let vm = self
            .store
            .get_vm(vm_id)
            .await?
            .ok_or(ManagerError::NotFound)?;
        let machine = rt.lock().machine.clone();
        let (VmState::Running, Some(machine)) = (vm.state, machine) else {
            return Err(ManagerError::Conflict(format!(
                "vm must be running to snapshot (current state: {})",
                vm.state
            )));
        };
        rt.lock().transient = Some(VmState::Stopping);
        if trigger == Trigger::Idle && !self.still_idle(&rt, &vm) {
            rt.lock().transient = None;
            return Ok(None);
        }
        let t0 = Instant::now();
        let closed = self.close_connections(&rt).await;
        let snap_id = new_id("snap");
        let dir = self.snapshot_dir(vm_id);
        let path = self.snapshot_cache(vm_id, &snap_id);
        let res = async {
            tokio::fs::create_dir_all(&dir).await?;
            machine
                .snapshot(&path)
                .await
                .map_err(|e| ManagerError::Vmm(format!("snapshot failed: {e}")))
        }
        .await;
        let write_ms = t0.elapsed().as_millis() as u64;
        if let Err(e) = res {
            // The driver resumed the guest: it keeps running and serving.
            rt.lock().transient = None;
            warn!(vm_id, error = %e, "snapshot failed; vm left running");
            self.event(vm_id, "error", serde_json::json!({"op": "snapshot", "trigger": trigger.as_str(), "error": e.to_string()}))
                .await;
            return Err(e);
        }
        {
            let mut inner = rt.lock();
            inner.machine = None;
            inner.transient = None;
        }
        let size = tokio::fs::metadata(&path)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        // The raw file is complete (the driver renames it into place); the
        // store gets a compressed copy, written atomically. Its row is written
        // last, so a crash before that leaves no snapshot that looks complete.
        let key = snapshot_key(vm_id, &snap_id);
        let t_up = Instant::now();
        let stored = self.snaps.upload(&key, &path).await;
        let upload_ms = t_up.elapsed().as_millis() as u64;
        let stored_bytes = match stored {
            Ok(n) => Some(n),
            Err(e) => {
                // The local copy still restores this VM on this node.
                warn!(vm_id, error = %e, store = %self.snaps.describe(), "snapshot upload failed; keeping the local copy only");
                None
            }
        };
        let snap = Snapshot {
            id: snap_id,
            vm_id: vm_id.to_string(),
            state_key: key,
            size_bytes: size as i64,
            created_at: Utc::now(),
        };
        self.store.insert_snapshot(&snap).await?;
        self.store
            .set_vm_state(vm_id, VmState::Snapshotted, None)
            .await?;
        let total_ms = t0.elapsed().as_millis() as u64;
        info!(
            vm_id,
            snapshot_id = %snap.id,
            trigger = trigger.as_str(),
            size_bytes = size,
            closed_connections = closed,
            write_ms,
            upload_ms,
            stored_bytes,
            total_ms,
            "vm snapshotted"
        );
        self.event(
            vm_id,
            "snapshot",
            serde_json::json!({
                "trigger": trigger.as_str(), "snapshot_id": snap.id, "size_bytes": size,
                "closed_connections": closed, "pause_write_ms": write_ms, "upload_ms": upload_ms,
                "stored_bytes": stored_bytes, "store": self.snaps.describe(), "total_ms": total_ms,
            }),
        )
        .await;
        self.prune_snapshots(vm_id).await;
        Ok(Some(snap))
    }

    /// Keeps the newest `max_snapshots_per_vm` snapshots of a VM, and the raw
    /// local copy of the newest only.
    async fn prune_snapshots(&self, vm_id: &str) {
        let Ok(snaps) = self.store.list_snapshots(vm_id).await else {
            return;
        };
        let keep = self.cfg.max_snapshots_per_vm.max(1) as usize;
        for (i, old) in snaps.iter().enumerate().skip(1) {
            let cache = self.snapshot_cache(vm_id, &old.id);
            if let Err(e) = tokio::fs::remove_file(&cache).await {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(vm_id, snapshot_id = %old.id, error = %e, "could not remove a cached snapshot");
                }
            }
            if i < keep {
                continue;
            }
            if let Err(e) = self.store.delete_snapshot(&old.id).await {
                warn!(vm_id, snapshot_id = %old.id, error = %e, "could not prune snapshot row");
                continue;
            }
            if let Err(e) = self.snaps.delete(&old.state_key).await {
                warn!(vm_id, snapshot_id = %old.id, error = %e, "could not delete a pruned snapshot from the store");
            }
        }
    }

    pub async fn list_snapshots(&self, user: &str, vm_id: &str) -> Result<Vec<Snapshot>> {
        self.owned_vm(user, vm_id).await?;
        self.touch(vm_id);
        Ok(self.store.list_snapshots(vm_id).await?)
    }

    pub async fn list_images(&self) -> Result<Vec<Image>> {
        Ok(self.store.list_images().await?)
    }

    pub async fn get_image(&self, id: &str) -> Result<Image> {
        self.store
            .get_image(id)
            .await?
            .ok_or(ManagerError::NotFound)
    }

    /// Shuts every running VM down (graceful hatchd stop): each is snapshotted so
    /// that it comes back as it was; one that cannot be is stopped.
    pub async fn shutdown_all(&self) {
        let Ok(vms) = self.store.list_vms(None).await else {
            return;
        };
        for vm in vms.into_iter().filter(|v| v.state == VmState::Running) {
            match self.snapshot_inner(&vm.id, Trigger::Shutdown).await {
                Ok(_) => info!(vm_id = %vm.id, "vm snapshotted for hatchd shutdown"),
                Err(e) => {
                    warn!(vm_id = %vm.id, error = %e, "snapshot at shutdown failed; stopping the vm");
                    let _ = self.stop_inner(&vm.id, Trigger::Shutdown).await;
                }
            }
        }
    }

    // ---------------------------------------------------------------- idle

    /// Puts idle VMs to sleep until `shutdown` turns true. Every running VM is
    /// covered, with or without routes; activity is tracked in memory and
    /// written to the store on each pass, so it survives a restart.
    pub fn spawn_reaper(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let next = this.reap_once().await;
                tokio::select! {
                    _ = tokio::time::sleep(next) => {}
                    _ = async { let _ = shutdown.wait_for(|v| *v).await; } => return,
                }
            }
        })
    }

    /// One pass of the reaper; returns when to run the next.
    async fn reap_once(self: &Arc<Self>) -> Duration {
        let mut next = self.cfg.idle_check_interval;
        let vms = match self.store.list_vms(None).await {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "idle reaper could not list vms");
                return next;
            }
        };
        let now = now_ms();
        for vm in vms.into_iter().filter(|v| v.state == VmState::Running) {
            next = next.min(
                vm.idle_check_interval
                    .unwrap_or(self.cfg.idle_check_interval),
            );
            let rt = self.runtime(&vm.id);
            let mut last = rt.activity.last_ms.load(Ordering::SeqCst);
            if last == 0 {
                // First sight of this VM since hatchd started.
                last = vm
                    .last_activity_at
                    .map(|t| t.timestamp_millis().max(0) as u64)
                    .unwrap_or(now);
                rt.activity.last_ms.fetch_max(last, Ordering::SeqCst);
            }
            if last > rt.activity.persisted_ms.load(Ordering::SeqCst) {
                if let Some(at) = chrono::DateTime::from_timestamp_millis(last as i64) {
                    if self.store.set_last_activity(&vm.id, at).await.is_ok() {
                        rt.activity.persisted_ms.store(last, Ordering::SeqCst);
                    }
                }
            }
            let timeout = vm.idle_timeout.unwrap_or(self.cfg.idle_timeout);
            let idle_for = now.saturating_sub(last);
            if rt.ready_machine().is_none()
                || rt.activity.busy()
                || idle_for < timeout.as_millis() as u64
            {
                continue;
            }
            let this = self.clone();
            tokio::spawn(async move {
                info!(vm_id = %vm.id, idle_ms = idle_for, mode = vm.sleep_mode.as_str(), "vm idle; putting it to sleep");
                let res = match vm.sleep_mode {
                    SleepMode::Snapshot => this
                        .snapshot_inner(&vm.id, Trigger::Idle)
                        .await
                        .map(|s| s.is_some()),
                    SleepMode::Stop => this.stop_inner(&vm.id, Trigger::Idle).await,
                };
                match res {
                    Ok(true) => {}
                    Ok(false) => info!(vm_id = %vm.id, "vm became busy; left running"),
                    Err(ManagerError::Conflict(_)) => {} // already asleep
                    Err(e) => warn!(vm_id = %vm.id, error = %e, "could not put idle vm to sleep"),
                }
            });
        }
        next.max(Duration::from_millis(50))
    }

    // ---------------------------------------------------------------- wake

    async fn wake_and_wait(self: &Arc<Self>, vm_id: &str, mode: WakeMode) -> Result<()> {
        let mut rx = self.wake(vm_id, mode);
        let res = rx
            .wait_for(|v| matches!(v, WakeStatus::Done(_)))
            .await
            .map(|v| v.clone())
            .map_err(|_| ManagerError::Internal("wake task ended without a result".into()))?;
        match res {
            WakeStatus::Done(r) => r,
            _ => Err(ManagerError::Internal("no wake result".into())),
        }
    }

    /// Joins the VM's in-flight wake or starts one; the result is shared.
    fn wake(self: &Arc<Self>, vm_id: &str, mode: WakeMode) -> watch::Receiver<WakeStatus> {
        let rt = self.runtime(vm_id);
        let mut inner = rt.lock();
        if let Some(rx) = &inner.wake {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(WakeStatus::Pending);
        inner.wake = Some(rx.clone());
        if inner.transient.is_none() && inner.machine.is_none() {
            inner.transient = Some(VmState::Starting);
        }
        drop(inner);
        let this = self.clone();
        let vm_id = vm_id.to_string();
        let rt2 = rt.clone();
        tokio::spawn(async move {
            let res = this.run_wake(&rt2, &vm_id, mode, &tx).await;
            {
                let mut inner = rt2.lock();
                inner.wake = None;
                if inner.transient == Some(VmState::Starting) {
                    inner.transient = None;
                }
            }
            let _ = tx.send(WakeStatus::Done(res));
        });
        rx
    }

    /// Wakes the VM. Waiters on `tx` are released as soon as the machine is up;
    /// the bookkeeping (store, events) follows while they are forwarded.
    async fn run_wake(
        self: &Arc<Self>,
        rt: &Arc<VmRuntime>,
        vm_id: &str,
        mode: WakeMode,
        tx: &watch::Sender<WakeStatus>,
    ) -> WakeResult {
        let _op = rt.op.lock().await;
        let Some(vm) = self.store.get_vm(vm_id).await? else {
            return Err(ManagerError::NotFound);
        };
        if rt.lock().machine.is_some() {
            return Ok(()); // someone woke it while we queued
        }
        let restore = match (vm.state, mode) {
            (VmState::Snapshotted, _) | (VmState::Error, WakeMode::Restore) => true,
            (VmState::Stopped | VmState::Running, WakeMode::Auto | WakeMode::Start) => false,
            (VmState::Error, WakeMode::Start) => false,
            (s, _) => {
                return Err(ManagerError::Conflict(format!(
                    "vm is in state {s} and cannot be woken; start it with POST /vms/{vm_id}/start"
                )))
            }
        };
        rt.lock().transient = Some(VmState::Starting);
        let spec = self.boot_spec(&vm).await?;
        let snapshot = if restore {
            match self.store.list_snapshots(vm_id).await?.into_iter().next() {
                Some(s) => Some(s),
                None => {
                    let msg = "vm is snapshotted but has no snapshot record".to_string();
                    self.store
                        .set_vm_state(vm_id, VmState::Error, Some(&msg))
                        .await?;
                    return Err(ManagerError::Vmm(msg));
                }
            }
        } else {
            None
        };
        let kind = if restore { "restore" } else { "boot" };
        let t0 = Instant::now();
        let download_ms = std::sync::atomic::AtomicU64::new(0);
        let attempt = async {
            match &snapshot {
                Some(s) => {
                    let cache = self.snapshot_cache(vm_id, &s.id);
                    if !tokio::fs::try_exists(&cache).await.unwrap_or(false) {
                        // Not on this node (or pruned locally): fetch it.
                        let t = Instant::now();
                        tokio::fs::create_dir_all(self.snapshot_dir(vm_id)).await?;
                        self.snaps
                            .download(&s.state_key, &cache)
                            .await
                            .map_err(|e| crate::vmm::VmmError::Snapshot {
                                path: cache.clone(),
                                reason: e.to_string(),
                            })?;
                        download_ms.store(t.elapsed().as_millis() as u64, Ordering::SeqCst);
                    }
                    self.hv.restore(&spec, &cache).await
                }
                None => self.hv.boot(&spec).await,
            }
        };
        match tokio::time::timeout(self.cfg.wake_timeout, attempt).await {
            Ok(Ok(machine)) => {
                let machine: Arc<dyn Machine> = Arc::from(machine);
                let generation = rt.install(machine.clone());
                let total_ms = t0.elapsed().as_millis() as u64;
                let _ = tx.send(WakeStatus::Up);
                self.store.record_wake(vm_id, restore).await?;
                rt.activity.touch();
                rt.first_byte_pending.store(true, Ordering::SeqCst);
                self.watch_exit(vm_id, rt.clone(), machine, generation);
                self.event(
                    vm_id,
                    kind,
                    serde_json::json!({
                        "mode": mode.as_str(),
                        "download_ms": download_ms.load(Ordering::SeqCst),
                        "total_ms": total_ms,
                    }),
                )
                .await;
                info!(
                    vm_id,
                    kind,
                    hypervisor = %self.hv.name(),
                    elapsed_ms = total_ms,
                    "vm woken"
                );
                Ok(())
            }
            Ok(Err(e)) => {
                let msg = format!("{kind} failed: {e}");
                warn!(vm_id, kind, error = %e, "wake failed; vm marked error");
                self.store
                    .set_vm_state(vm_id, VmState::Error, Some(&msg))
                    .await?;
                self.event(
                    vm_id,
                    "error",
                    serde_json::json!({"op": kind, "error": msg}),
                )
                .await;
                Err(ManagerError::Vmm(msg))
            }
            Err(_) => {
                // The snapshot (or the image) is still good: leave the stored
                // state as it was so the next request tries again.
                let msg = format!("{kind} did not complete within {:?}", self.cfg.wake_timeout);
                warn!(vm_id, kind, "{msg}; vm left asleep");
                Err(ManagerError::Timeout(msg))
            }
        }
    }

    async fn boot_spec(&self, vm: &Vm) -> Result<BootSpec> {
        let image = self
            .store
            .get_image(&vm.image_id)
            .await?
            .ok_or_else(|| ManagerError::Vmm(format!("image not found: {}", vm.image_id)))?;
        let boot_args = [&vm.boot_args, &image.boot_args, &self.cfg.default_boot_args]
            .into_iter()
            .find(|s| !s.is_empty())
            .cloned()
            .unwrap_or_default();
        let work_dir = self.work_dir(&vm.id);
        tokio::fs::create_dir_all(&work_dir).await?;
        Ok(BootSpec {
            vm_id: vm.id.clone(),
            kernel: image.kernel_path.into(),
            initrd: Some(image.rootfs_path.into()).filter(|p: &PathBuf| !p.as_os_str().is_empty()),
            boot_args,
            vcpus: vm.vcpu_count,
            mem_mib: vm.mem_mib,
            user_data: vm.user_data.clone(),
            work_dir,
            guest_ports: self.routes.ports_of(&vm.id),
        })
    }

    /// Records a VM whose process ended without hatchd asking.
    fn watch_exit(
        self: &Arc<Self>,
        vm_id: &str,
        rt: Arc<VmRuntime>,
        machine: Arc<dyn Machine>,
        generation: u64,
    ) {
        let this = Arc::downgrade(self);
        let vm_id = vm_id.to_string();
        tokio::spawn(async move {
            let exit = machine.exited().await;
            drop(machine);
            let Some(this) = this.upgrade() else { return };
            // After any operation in progress (a snapshot ends the process on purpose).
            let _op = rt.op.lock().await;
            let unexpected = {
                let mut inner = rt.lock();
                if inner.generation == generation && inner.machine.is_some() {
                    inner.machine = None;
                    true
                } else {
                    false
                }
            };
            if unexpected {
                let msg = format!("vm process exited unexpectedly: {}", exit.description);
                warn!(vm_id, "{msg}; marked stopped (the next request boots it)");
                if let Err(e) = this
                    .store
                    .set_vm_state(&vm_id, VmState::Stopped, Some(&msg))
                    .await
                {
                    warn!(vm_id, error = %e, "could not record vm exit");
                }
            }
        });
    }

    // ---------------------------------------------------------------- routes

    pub async fn create_route(&self, user: &str, vm_id: &str, req: CreateRoute) -> Result<Route> {
        let port = req.target_port.unwrap_or(0);
        if !(1..=65535).contains(&port) {
            return Err(ManagerError::BadRequest(
                "target_port must be between 1 and 65535".into(),
            ));
        }
        let requested = req.subdomain.filter(|s| !s.is_empty());
        if let Some(s) = &requested {
            validate_subdomain(s).map_err(|e| ManagerError::BadRequest(e.to_string()))?;
        }
        self.owned_vm(user, vm_id).await?;
        self.touch(vm_id);
        let now = Utc::now();
        let mut route = Route {
            id: new_id("rt"),
            vm_id: vm_id.to_string(),
            subdomain: String::new(),
            target_port: port as u16,
            auto_wake: req.auto_wake.unwrap_or(true),
            created_at: now,
            updated_at: now,
        };
        match requested {
            Some(s) => {
                route.subdomain = s;
                if self.store.subdomain_taken(&route.subdomain).await? {
                    return Err(taken(&route.subdomain));
                }
                match self.store.insert_route(&route).await {
                    Err(StoreError::Conflict) => return Err(taken(&route.subdomain)),
                    r => r?,
                }
            }
            None => loop {
                route.subdomain = random_alnum(12);
                match self.store.insert_route(&route).await {
                    Err(StoreError::Conflict) => continue,
                    r => break r?,
                }
            },
        }
        self.routes.insert(&route);
        // A running VM gets the new port forwarded now, not on the first request.
        if let Some(m) = self.runtime(vm_id).ready_machine() {
            if let Err(e) = m.forward_port(route.target_port).await {
                warn!(vm_id, port, error = %e, "could not forward the route's port yet; the first request retries");
            }
        }
        info!(route_id = %route.id, vm_id, subdomain = %route.subdomain, port, "route created");
        Ok(route)
    }

    pub async fn list_routes(&self, user: &str, vm_id: &str) -> Result<Vec<Route>> {
        self.owned_vm(user, vm_id).await?;
        self.touch(vm_id);
        Ok(self.store.list_routes(Some(vm_id)).await?)
    }

    pub async fn delete_route(&self, user: &str, route_id: &str) -> Result<()> {
        let route = self
            .store
            .get_route(route_id)
            .await?
            .ok_or(ManagerError::NotFound)?;
        self.owned_vm(user, &route.vm_id).await?;
        self.store.delete_route(route_id).await?;
        self.routes.remove_route(route_id);
        info!(route_id, subdomain = %route.subdomain, "route deleted");
        Ok(())
    }

    pub async fn counts(&self) -> Result<(usize, usize)> {
        Ok((self.store.list_vms(None).await?.len(), self.routes.len()))
    }

    // ---------------------------------------------------------------- proxy

    /// Marks the VM active until the guard is dropped (a proxied request until
    /// its response's last byte, an upgraded connection until it closes).
    pub fn activity_guard(&self, vm_id: &str) -> ActivityGuard {
        ActivityGuard::new(self.runtime(vm_id).activity.clone())
    }

    /// The proxy answered a request that waited for a wake, `ms` after it
    /// arrived: the first such answer after each wake is recorded as an event.
    /// `attempts` requests were sent to the guest, the last taking `guest_ms`.
    pub async fn first_byte_after_wake(&self, vm_id: &str, ms: u64, attempts: u32, guest_ms: f64) {
        // After the wake's own event, though the answer may have been faster.
        self.settled(Some(vm_id)).await;
        if self
            .runtime(vm_id)
            .first_byte_pending
            .swap(false, Ordering::SeqCst)
        {
            self.event(
                vm_id,
                "first_byte",
                serde_json::json!({
                    "first_byte_ms": ms,
                    "attempts": attempts,
                    "guest_ms": (guest_ms * 10.0).round() / 10.0,
                }),
            )
            .await;
        }
    }

    /// An API operation on the VM counts as activity.
    fn touch(&self, vm_id: &str) {
        self.runtime(vm_id).activity.touch();
    }

    pub async fn list_events(&self, user: &str, vm_id: &str) -> Result<Vec<VmEvent>> {
        self.owned_vm(user, vm_id).await?;
        Ok(self.store.list_events(vm_id).await?)
    }

    async fn event(&self, vm_id: &str, kind: &str, detail: serde_json::Value) {
        if let Err(e) = self.store.add_event(vm_id, kind, &detail).await {
            warn!(vm_id, kind, error = %e, "could not record vm event");
        }
    }

    /// The proxy's route lookup: memory only.
    pub fn lookup(&self, subdomain: &str) -> Option<RouteTarget> {
        self.routes.get(subdomain)
    }

    /// The proxy's fast path: where a running VM's already forwarded port is,
    /// without waiting for anything; `None` means [`Manager::upstream`] must run
    /// (a wake, or a port forward to add).
    pub fn ready_upstream(&self, target: &RouteTarget) -> Option<Upstream> {
        let m = self.runtime(&target.vm_id).ready_machine()?;
        m.forwarded(target.port)
            .map(|addr| Upstream { addr, woke: false })
    }

    /// Finds (waking the VM if it sleeps and the route allows it) the host
    /// address that reaches the route's guest port, waiting until `deadline`.
    pub async fn upstream(
        self: &Arc<Self>,
        target: &RouteTarget,
        deadline: tokio::time::Instant,
    ) -> std::result::Result<Upstream, UpstreamError> {
        let rt = self.runtime(&target.vm_id);
        if let Some(m) = rt.ready_machine() {
            return forward(&*m, target.port, false).await;
        }
        let in_flight = {
            let inner = rt.lock();
            inner.wake.is_some() || inner.transient == Some(VmState::Starting)
        };
        if !in_flight {
            let vm = self
                .store
                .get_vm(&target.vm_id)
                .await
                .map_err(|e| UpstreamError::Internal(e.to_string()))?
                .ok_or(UpstreamError::VmGone)?;
            let state = self.present(vm).state;
            match state {
                VmState::Error => {
                    return Err(UpstreamError::NotServing(
                        state,
                        "must be started with POST /vms/{id}/start",
                    ))
                }
                _ if !target.auto_wake => {
                    return Err(UpstreamError::NotServing(
                        state,
                        "auto_wake is disabled for this route",
                    ))
                }
                _ => {}
            }
        } else if !target.auto_wake {
            return Err(UpstreamError::NotServing(
                VmState::Starting,
                "auto_wake is disabled for this route",
            ));
        }
        let queued = rt.waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = WaiterGuard(rt.clone());
        if queued >= self.cfg.max_wake_waiters {
            return Err(UpstreamError::Overloaded(self.cfg.max_wake_waiters));
        }
        let mut rx = self.wake(&target.vm_id, WakeMode::Auto);
        let waited = tokio::time::timeout_at(deadline, async {
            rx.wait_for(|v| !matches!(v, WakeStatus::Pending))
                .await
                .map(|v| v.clone())
        })
        .await;
        let res = match waited {
            Err(_) => return Err(UpstreamError::Timeout(self.cfg.wake_timeout)),
            Ok(Err(_)) => return Err(UpstreamError::Internal("wake task vanished".into())),
            Ok(Ok(v)) => v,
        };
        match res {
            WakeStatus::Up | WakeStatus::Done(Ok(())) => {}
            WakeStatus::Done(Err(ManagerError::Timeout(_))) => {
                return Err(UpstreamError::Timeout(self.cfg.wake_timeout))
            }
            WakeStatus::Done(Err(ManagerError::NotFound)) => return Err(UpstreamError::VmGone),
            WakeStatus::Done(Err(e)) => return Err(UpstreamError::WakeFailed(e.to_string())),
            WakeStatus::Pending => return Err(UpstreamError::Internal("no wake result".into())),
        }
        let machine = rt.lock().machine.clone();
        match machine {
            Some(m) => forward(&*m, target.port, true).await,
            None => Err(UpstreamError::WakeFailed("vm went back to sleep".into())),
        }
    }
}

async fn forward(
    m: &dyn Machine,
    port: u16,
    woke: bool,
) -> std::result::Result<Upstream, UpstreamError> {
    if let Some(addr) = m.forwarded(port) {
        return Ok(Upstream { addr, woke });
    }
    let addr = m
        .forward_port(port)
        .await
        .map_err(|e| UpstreamError::Internal(format!("forward guest port {port}: {e}")))?;
    // A port forwarded just now may reach a service that is not listening yet.
    Ok(Upstream { addr, woke: true })
}

fn wrong_state(op: &str, state: VmState, allowed: &str) -> ManagerError {
    ManagerError::Conflict(format!(
        "cannot {op} vm in state {state} (allowed: {allowed})"
    ))
}

fn taken(subdomain: &str) -> ManagerError {
    ManagerError::Conflict(format!("subdomain {subdomain:?} is already in use"))
}

impl Manager {
    /// The user owning the key with this hash.
    pub async fn authenticate(&self, key_hash: &str) -> Result<Option<String>> {
        Ok(self.store.key_user(key_hash).await?)
    }

    pub async fn key_count(&self) -> Result<i64> {
        Ok(self.store.count_keys().await?)
    }

    /// Registers a key (by its hash) for `user_id`.
    pub async fn add_key(&self, user_id: &str, key_hash: &str) -> Result<()> {
        self.store
            .insert_key(&new_id("key"), user_id, key_hash)
            .await
            .map_err(ManagerError::from)
    }
}
