//! A fake hypervisor for deterministic unit tests of the wake and idle logic.
//! Never the product path: `hatchd` only runs real guests.
//!
//! A fake "guest" is a loopback HTTP server per forwarded port answering
//! `hatch guest <vm_id>`. Boot and restore delays, failures and hangs can be set.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{BootSpec, ExitInfo, Hypervisor, Machine, VmmError};

/// Knobs a test turns.
#[derive(Debug, Default)]
pub struct FakeBehaviour {
    pub boot_delay: Duration,
    pub restore_delay: Duration,
    /// Boot and restore never complete.
    pub hang: bool,
    /// Boot and restore fail with this message.
    pub fail: Option<String>,
    /// The guest's service starts listening this long after the VM is up.
    pub service_delay: Duration,
    /// Forward every guest port to this loopback server instead of the built-in
    /// one (tests of HTTP behaviour that does not depend on the guest).
    pub backend: Option<SocketAddr>,
    /// How long writing a snapshot takes.
    pub snapshot_delay: Duration,
}

#[derive(Default)]
pub struct FakeHypervisor {
    pub behaviour: Mutex<FakeBehaviour>,
    pub boots: AtomicU64,
    pub restores: AtomicU64,
    pub snapshots: AtomicU64,
    /// Machines currently alive.
    pub live: AtomicU64,
}

impl FakeHypervisor {
    pub fn new() -> Arc<FakeHypervisor> {
        Arc::new(FakeHypervisor::default())
    }

    pub fn set(&self, f: impl FnOnce(&mut FakeBehaviour)) {
        f(&mut self.behaviour.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn params(&self) -> (Duration, Duration, bool, Option<String>, Duration) {
        let b = self.behaviour.lock().unwrap_or_else(|e| e.into_inner());
        (
            b.boot_delay,
            b.restore_delay,
            b.hang,
            b.fail.clone(),
            b.service_delay,
        )
    }

    async fn start(
        self: &Arc<Self>,
        spec: &BootSpec,
        restore: bool,
    ) -> Result<Box<dyn Machine>, VmmError> {
        let (boot_delay, restore_delay, hang, fail, service_delay) = self.params();
        if hang {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(if restore { restore_delay } else { boot_delay }).await;
        if let Some(msg) = fail {
            return Err(VmmError::Exited(msg));
        }
        let (exit_tx, exit_rx) = watch::channel(None);
        let m = FakeMachine {
            vm_id: spec.vm_id.clone(),
            service_delay,
            ports: Mutex::new(HashMap::new()),
            exit_tx,
            exit_rx,
            hv: self.clone(),
        };
        for p in &spec.guest_ports {
            m.forward_port(*p).await?;
        }
        self.live.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(m))
    }
}

/// Wrapper so the fake can be used as `Arc<dyn Hypervisor>` while tests keep
/// a handle on the counters.
pub struct SharedFake(pub Arc<FakeHypervisor>);

#[async_trait]
impl Hypervisor for SharedFake {
    fn name(&self) -> String {
        "fake".into()
    }

    async fn boot(&self, spec: &BootSpec) -> Result<Box<dyn Machine>, VmmError> {
        self.0.boots.fetch_add(1, Ordering::SeqCst);
        self.0.start(spec, false).await
    }

    async fn restore(
        &self,
        spec: &BootSpec,
        snapshot: &Path,
    ) -> Result<Box<dyn Machine>, VmmError> {
        self.0.restores.fetch_add(1, Ordering::SeqCst);
        if !snapshot.exists() {
            return Err(VmmError::Snapshot {
                path: snapshot.to_path_buf(),
                reason: "no such file".into(),
            });
        }
        self.0.start(spec, true).await
    }
}

struct FakeMachine {
    vm_id: String,
    service_delay: Duration,
    ports: Mutex<HashMap<u16, (SocketAddr, JoinHandle<()>)>>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    exit_rx: watch::Receiver<Option<ExitInfo>>,
    hv: Arc<FakeHypervisor>,
}

impl FakeMachine {
    fn end(&self, why: &str) {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        for (_, (_, task)) in ports.drain() {
            task.abort();
        }
        if self.exit_rx.borrow().is_none() {
            self.hv.live.fetch_sub(1, Ordering::SeqCst);
            let _ = self.exit_tx.send(Some(ExitInfo {
                description: why.to_string(),
            }));
        }
    }
}

async fn serve_guest(listener: TcpListener, vm_id: String, service_delay: Duration) {
    let started = tokio::time::Instant::now();
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            return;
        };
        if started.elapsed() < service_delay {
            // Like slirp when the guest refuses: accept, then close at once.
            drop(sock);
            continue;
        }
        let body = format!("hatch guest {vm_id}\n");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            let mut seen = Vec::new();
            loop {
                let n = match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                seen.extend_from_slice(&buf[..n]);
                while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if seen.len() < end + 4 + len {
                        break;
                    }
                    let req_body = seen[end + 4..end + 4 + len].to_vec();
                    seen.drain(..end + 4 + len);
                    let mut resp_body = body.clone().into_bytes();
                    resp_body.extend_from_slice(&req_body);
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n",
                        resp_body.len()
                    );
                    if sock.write_all(resp.as_bytes()).await.is_err()
                        || sock.write_all(&resp_body).await.is_err()
                    {
                        return;
                    }
                }
            }
        });
    }
}

#[async_trait]
impl Machine for FakeMachine {
    fn pid(&self) -> Option<u32> {
        None
    }

    fn forwarded(&self, guest_port: u16) -> Option<SocketAddr> {
        self.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&guest_port)
            .map(|(a, _)| *a)
    }

    async fn forward_port(&self, guest_port: u16) -> Result<SocketAddr, VmmError> {
        if let Some(a) = self.forwarded(guest_port) {
            return Ok(a);
        }
        let backend = self
            .hv
            .behaviour
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .backend;
        if let Some(addr) = backend {
            let task = tokio::spawn(async {});
            self.ports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(guest_port, (addr, task));
            return Ok(addr);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(serve_guest(
            listener,
            self.vm_id.clone(),
            self.service_delay,
        ));
        self.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(guest_port, (addr, task));
        Ok(addr)
    }

    async fn snapshot(&self, path: &Path) -> Result<(), VmmError> {
        self.hv.snapshots.fetch_add(1, Ordering::SeqCst);
        let delay = self
            .hv
            .behaviour
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot_delay;
        tokio::time::sleep(delay).await;
        tokio::fs::write(path, self.vm_id.as_bytes()).await?;
        self.end("snapshotted");
        Ok(())
    }

    async fn shutdown(&self) -> Result<(), VmmError> {
        self.end("shutdown");
        Ok(())
    }

    async fn exited(&self) -> ExitInfo {
        let mut rx = self.exit_rx.clone();
        let got = rx.wait_for(|v| v.is_some()).await.map(|v| v.clone());
        match got {
            Ok(Some(info)) => info,
            _ => ExitInfo {
                description: "dropped".into(),
            },
        }
    }
}
