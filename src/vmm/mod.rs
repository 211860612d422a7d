//! Hypervisor drivers. `manager` talks to VMs only through [`Hypervisor`] and
//! [`Machine`], so a Firecracker driver can sit beside QEMU and unit tests can use
//! the fake driver.

pub mod fake;
pub mod qemu;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

/// Errors from a hypervisor driver. The message is what the operator sees in the log.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The hypervisor process could not be started.
    #[error("spawn {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The guest did not become ready within the deadline.
    #[error("guest not ready after {0:?}")]
    NotReady(std::time::Duration),
    /// The hypervisor process exited.
    #[error("hypervisor process exited: {0}")]
    Exited(String),
    /// A control-channel (QMP) command failed.
    #[error("control: {0}")]
    Control(String),
    /// A snapshot file is missing or unreadable.
    #[error("snapshot {path}: {reason}")]
    Snapshot { path: PathBuf, reason: String },
    /// Filesystem error around the VM's work dir.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Everything a driver needs to start (or restore) one VM. A restore is given the
/// same spec that booted the VM, so the device model matches the saved state.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub vm_id: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub boot_args: String,
    pub vcpus: u32,
    pub mem_mib: u32,
    /// The VM's user data; a guest runs it when it starts with `#!`.
    pub user_data: String,
    /// Per-VM directory for the control socket, serial log and other files.
    pub work_dir: PathBuf,
    /// Guest TCP ports to forward to host loopback ports from the start.
    pub guest_ports: Vec<u16>,
}

/// How a machine's process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    pub description: String,
}

#[async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    /// Short name for logs (`qemu-tcg`, `qemu-kvm`, `fake`).
    fn name(&self) -> String;

    /// Cold boot. Returns once the guest signalled that it is up (network
    /// configured); the guest's own services may still be starting.
    async fn boot(&self, spec: &BootSpec) -> Result<Box<dyn Machine>, VmmError>;

    /// Restore from a file written by [`Machine::snapshot`] and resume the guest.
    async fn restore(&self, spec: &BootSpec, snapshot: &Path)
        -> Result<Box<dyn Machine>, VmmError>;

    /// Takes over a VM whose hypervisor process outlived a previous hatchd (a
    /// crash): the guest keeps its memory. An interrupted snapshot is cancelled
    /// and a paused guest resumed. `None` when there is nothing to take over.
    async fn adopt(&self, _spec: &BootSpec) -> Option<Box<dyn Machine>> {
        None
    }

    /// Ends a hypervisor process that a previous hatchd left running for the VM
    /// whose work dir this is. True when one was ended.
    fn reap_leftover(&self, _work_dir: &Path) -> bool {
        false
    }
}

#[async_trait]
pub trait Machine: Send + Sync {
    /// OS process id of the hypervisor process, if there is one.
    fn pid(&self) -> Option<u32>;

    /// Host loopback address that forwards to `guest_port`, when forwarded.
    fn forwarded(&self, guest_port: u16) -> Option<SocketAddr>;

    /// Forward `guest_port` (idempotent: an existing forward is returned).
    async fn forward_port(&self, guest_port: u16) -> Result<SocketAddr, VmmError>;

    /// Pause the guest and save CPU, devices and memory to `path` (written to a
    /// temporary name and renamed, so `path` is complete or absent). On success the
    /// hypervisor process has ended; on failure the guest is resumed and keeps running.
    async fn snapshot(&self, path: &Path) -> Result<(), VmmError>;

    /// Power the VM off and end its process. Idempotent.
    async fn shutdown(&self) -> Result<(), VmmError>;

    /// Resolves when the hypervisor process has exited, for whatever reason.
    async fn exited(&self) -> ExitInfo;
}

/// Sends SIGKILL to `pid`; true when the signal was delivered.
pub fn kill_pid(pid: i32) -> bool {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .is_ok()
}
