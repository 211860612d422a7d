//! Wires the parts together: store → hypervisor → manager → API and proxy
//! listeners. `hatchd`'s `main` is a thin shell around [`start`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Utc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::api::{self, AppState};
use crate::config::{Accel, Config, DEFAULT_BOOT_ARGS};
use crate::manager::{Manager, ManagerConfig};
use crate::model::{Image, DEFAULT_IMAGE_ID};
use crate::proxy::{Proxy, ProxyConfig};
use crate::snapstore::{S3Config, SnapStore, SnapStoreConfig};
use crate::store::Store;
use crate::vmm::qemu::{AccelChoice, QemuConfig, QemuHypervisor};
use crate::vmm::Hypervisor;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("data dir {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("manager: {0}")]
    Manager(#[from] crate::manager::ManagerError),
    #[error("listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("api key: {0}")]
    Key(String),
    #[error("snapshot store: {0}")]
    SnapStore(String),
}

/// A started daemon.
pub struct Running {
    pub api_addr: SocketAddr,
    pub proxy_addr: SocketAddr,
    pub manager: Arc<Manager>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    data_dir: PathBuf,
}

impl Running {
    /// Stops accepting, snapshots running VMs so they come back as they were, and
    /// returns when the listeners are closed.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        // Nothing listens at these addresses any more.
        remove_addrs(&self.data_dir);
        self.manager.shutdown_all().await;
    }
}

/// The default image's files: the env paths when set, else what
/// `scripts/build-image` left in the image dir.
fn default_image_files(cfg: &Config) -> Option<(PathBuf, PathBuf, String)> {
    let dir = &cfg.default_image_dir;
    let kernel = cfg
        .default_kernel_path
        .clone()
        .unwrap_or_else(|| dir.join("vmlinux"));
    let rootfs = cfg
        .default_rootfs_path
        .clone()
        .unwrap_or_else(|| dir.join("initrd.img"));
    if !kernel.exists() || !rootfs.exists() {
        return None;
    }
    let args = if !cfg.default_boot_args.is_empty() {
        cfg.default_boot_args.clone()
    } else {
        std::fs::read_to_string(dir.join("boot_args"))
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string())
    };
    Some((kernel, rootfs, args))
}

/// Builds the hypervisor the configuration asks for.
pub async fn hypervisor(
    cfg: &Config,
    image: Option<&(PathBuf, PathBuf, String)>,
) -> Arc<dyn Hypervisor> {
    let accel = match cfg.qemu_accel {
        Accel::Auto => AccelChoice::Auto,
        Accel::Tcg => AccelChoice::Tcg,
        Accel::Kvm => AccelChoice::Kvm,
    };
    let qcfg = QemuConfig {
        binary: PathBuf::from(&cfg.qemu_bin),
        accel,
        // A machine dropped before it was handed over (a wake that timed out)
        // must not leave its process behind. Machines that are handed over are
        // only dropped after their process has exited.
        kill_on_drop: true,
        ..QemuConfig::default()
    };
    let hv = match image {
        Some((kernel, initrd, args)) => {
            QemuHypervisor::detect(qcfg, kernel, Some(initrd.as_path()), args).await
        }
        None => {
            warn!("no default image to probe KVM with; using the configured accelerator (tcg for auto)");
            QemuHypervisor::new(qcfg)
        }
    };
    info!(hypervisor = %hv.name(), "hypervisor ready");
    Arc::new(hv)
}

/// Starts hatchd with the real hypervisor.
pub async fn start(cfg: Config) -> Result<Running, DaemonError> {
    let image = default_image_files(&cfg);
    let hv = hypervisor(&cfg, image.as_ref()).await;
    start_with(cfg, hv).await
}

/// Starts hatchd with the given hypervisor (tests pass the fake one).
pub async fn start_with(mut cfg: Config, hv: Arc<dyn Hypervisor>) -> Result<Running, DaemonError> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| DaemonError::DataDir(cfg.data_dir.clone(), e))?;
    // Every path derived from the data dir (work dirs, snapshots) is absolute.
    cfg.data_dir = std::fs::canonicalize(&cfg.data_dir)
        .map_err(|e| DaemonError::DataDir(cfg.data_dir.clone(), e))?;
    let store = match &cfg.database_url {
        Some(url) => Store::open_url(url).await?,
        None => Store::open_dir(&cfg.data_dir).await?,
    };
    seed_default_image(&cfg, &store).await?;
    let snaps = SnapStore::new(&SnapStoreConfig {
        local_root: cfg.data_dir.join("snapshot-store"),
        s3: cfg.s3_bucket.clone().map(|bucket| S3Config {
            bucket,
            endpoint: cfg.s3_endpoint.clone(),
            region: cfg.s3_region.clone(),
            access_key: cfg.s3_access_key.clone(),
            secret_key: cfg.s3_secret_key.clone(),
        }),
    })
    .map_err(|e| DaemonError::SnapStore(e.to_string()))?;
    info!(store = %snaps.describe(), "snapshot store ready");
    let mgr = Manager::new(
        store,
        hv,
        snaps,
        ManagerConfig {
            data_dir: cfg.data_dir.clone(),
            wake_timeout: cfg.proxy_wake_timeout,
            max_vms_per_user: cfg.max_vms_per_user,
            max_snapshots_per_vm: cfg.max_snapshots_per_vm,
            default_vcpu: cfg.default_vcpu,
            default_mem_mib: cfg.default_mem_mib,
            max_wake_waiters: cfg.proxy_max_wake_waiters,
            idle_timeout: cfg.idle_timeout,
            idle_check_interval: cfg.idle_check_interval,
            default_boot_args: if cfg.default_boot_args.is_empty() {
                DEFAULT_BOOT_ARGS.to_string()
            } else {
                cfg.default_boot_args.clone()
            },
        },
    )
    .await?;
    if let Some(path) = api::ensure_admin_key(&mgr, &cfg.data_dir)
        .await
        .map_err(DaemonError::Key)?
    {
        info!(path = %path.display(), "created the first API key; read it from this file");
    }

    // The address files of an earlier run must not be read as this one's.
    remove_addrs(&cfg.data_dir);
    let api_listener = TcpListener::bind(cfg.http_addr)
        .await
        .map_err(|e| DaemonError::Listen(cfg.http_addr, e))?;
    let proxy_listener = TcpListener::bind(cfg.proxy_addr)
        .await
        .map_err(|e| DaemonError::Listen(cfg.proxy_addr, e))?;
    let api_addr = api_listener
        .local_addr()
        .map_err(|e| DaemonError::Listen(cfg.http_addr, e))?;
    let proxy_addr = proxy_listener
        .local_addr()
        .map_err(|e| DaemonError::Listen(cfg.proxy_addr, e))?;
    write_addr(&cfg.data_dir, "api.addr", api_addr);
    write_addr(&cfg.data_dir, "proxy.addr", proxy_addr);

    let (shutdown, shutdown_rx) = watch::channel(false);
    let app = api::router(AppState { mgr: mgr.clone() });
    let mut api_shutdown = shutdown_rx.clone();
    let api_task = tokio::spawn(async move {
        let serve = axum::serve(api_listener, app).with_graceful_shutdown(async move {
            let _ = api_shutdown.wait_for(|v| *v).await;
        });
        if let Err(e) = serve.await {
            warn!(error = %e, "api server failed");
        }
    });
    let proxy = Proxy::new(
        mgr.clone(),
        ProxyConfig {
            base_domain: cfg.proxy_base_domain.clone(),
            wake_timeout: cfg.proxy_wake_timeout,
            max_wake_body: cfg.proxy_max_wake_body,
            header_read_timeout: cfg.proxy_header_timeout,
            idle_timeout: cfg.proxy_idle_timeout,
            trusted_proxies: cfg.proxy_trusted_proxies.clone(),
            workers: cfg.proxy_workers,
        },
    );
    let reaper_task = mgr.spawn_reaper(shutdown_rx.clone());
    let proxy_task = tokio::spawn(proxy.serve(proxy_listener, shutdown_rx));
    info!(%api_addr, %proxy_addr, base_domain = %cfg.proxy_base_domain, data_dir = %cfg.data_dir.display(), "hatchd listening");
    Ok(Running {
        api_addr,
        proxy_addr,
        manager: mgr,
        shutdown,
        tasks: vec![api_task, proxy_task, reaper_task],
        data_dir: cfg.data_dir.clone(),
    })
}

async fn seed_default_image(cfg: &Config, store: &Store) -> Result<(), DaemonError> {
    match default_image_files(cfg) {
        Some((kernel, rootfs, args)) => {
            let img = Image {
                id: DEFAULT_IMAGE_ID.into(),
                kernel_path: kernel.to_string_lossy().into_owned(),
                rootfs_path: rootfs.to_string_lossy().into_owned(),
                boot_args: args,
                created_at: Utc::now(),
            };
            if store.ensure_image(&img).await? {
                info!(kernel = %img.kernel_path, rootfs = %img.rootfs_path, "registered the default image as img_default");
            }
        }
        None => warn!(
            image_dir = %cfg.default_image_dir.display(),
            "no default image found; run scripts/build-image (or set HATCH_DEFAULT_KERNEL_PATH and HATCH_DEFAULT_ROOTFS_PATH)"
        ),
    }
    Ok(())
}

/// Tells scripts and tests where we listen (ports may be ephemeral).
const ADDR_FILES: [&str; 2] = ["api.addr", "proxy.addr"];

fn remove_addrs(dir: &Path) {
    for name in ADDR_FILES {
        let _ = std::fs::remove_file(dir.join(name));
    }
}

fn write_addr(dir: &Path, name: &str, addr: SocketAddr) {
    let tmp = dir.join(format!(".{name}.tmp"));
    if std::fs::write(&tmp, format!("{addr}\n")).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join(name));
    }
}
