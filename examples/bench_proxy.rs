//! Hatch's real proxy in front of a loopback backend, for `bench/proxy` and
//! `bench/scale`.
//!
//! ```text
//! cargo run --release --example bench_proxy -- --backend 127.0.0.1:8081 [--routes N] [--create-concurrency C]
//! ```
//!
//! Starts hatchd in-process (API and proxy on ephemeral loopback ports, a temp
//! data dir) with the fake hypervisor, whose every forwarded guest port points
//! at `--backend`. Creates one VM and N routes `r0 … r{N-1}` (port 8080): the
//! first `--api-routes` (default 1000) through `Manager::create_route`, the API's
//! path, whose time per route is reported; the rest, when N is larger, in one
//! SQLite transaction while hatchd is stopped, after which hatchd is started
//! again on the same data dir and loads them all into its route index (there is
//! no bulk route API; one by one, 100 000 creates take about a minute here,
//! ~0.5 ms each with 8 in flight). Then it prints one line of `key=value` pairs on stdout
//! (`proxy= api= pid= data= vm= routes= api_create_ms= seed_secs= total_secs=`) and waits for SIGTERM or
//! SIGINT (or, with `--exit-on-stdin-eof`, stdin closing: scripts that start it
//! in the background give it /dev/null). Progress goes to stderr.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use hatch::daemon;
use hatch::manager::{CreateRoute, CreateVm};
use hatch::model::VmState;
use hatch::vmm::fake::{FakeHypervisor, SharedFake};
use tokio::io::AsyncReadExt;

const USER: &str = "admin";

struct Args {
    backend: SocketAddr,
    routes: usize,
    create_concurrency: usize,
    api_routes: usize,
    exit_on_stdin_eof: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut backend = None;
    let mut routes = 1usize;
    let mut create_concurrency = 8usize;
    let mut exit_on_stdin_eof = false;
    let mut api_routes = 1000usize;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--backend" => backend = Some(val()?.parse().context("--backend")?),
            "--routes" => routes = val()?.parse().context("--routes")?,
            "--create-concurrency" => {
                create_concurrency = val()?.parse().context("--create-concurrency")?
            }
            "--api-routes" => api_routes = val()?.parse().context("--api-routes")?,
            "--exit-on-stdin-eof" => exit_on_stdin_eof = true,
            "-h" | "--help" => {
                eprintln!(
                    "usage: bench_proxy --backend ADDR [--routes N] [--create-concurrency C]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(Args {
        backend: backend.context("--backend ADDR is required")?,
        routes: routes.max(1),
        create_concurrency: create_concurrency.max(1),
        api_routes: api_routes.max(1),
        exit_on_stdin_eof,
    })
}

fn config(dir: &std::path::Path) -> anyhow::Result<hatch::config::Config> {
    let kernel = dir.join("vmlinux");
    let rootfs = dir.join("initrd.img");
    std::fs::write(&kernel, b"fake kernel")?;
    std::fs::write(&rootfs, b"fake initrd")?;
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let m: HashMap<&str, String> = [
        ("HATCH_HTTP_ADDR", "127.0.0.1:0".to_string()),
        ("HATCH_PROXY_ADDR", "127.0.0.1:0".to_string()),
        ("HATCH_DATA_DIR", path(&dir.join("data"))),
        ("HATCH_DEFAULT_KERNEL_PATH", path(&kernel)),
        ("HATCH_DEFAULT_ROOTFS_PATH", path(&rootfs)),
        ("HATCH_DEFAULT_IMAGE_DIR", path(dir)),
        // The VM must stay awake for the whole run.
        ("HATCH_IDLE_TIMEOUT", "24h".to_string()),
    ]
    .into_iter()
    .collect();
    hatch::config::from_lookup(|k| m.get(k).cloned()).map_err(|e| anyhow::anyhow!("config: {e}"))
}

async fn wait_running(mgr: &hatch::manager::Manager, vm_id: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = mgr
            .get_vm(USER, vm_id)
            .await
            .map_err(|e| anyhow::anyhow!("get vm: {e}"))?;
        if v.state == VmState::Running {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("vm {vm_id} never reached running (state {:?})", v.state);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Inserts routes `r{from}` … `r{to-1}` in one transaction, with the columns
/// `Store::insert_route` writes.
async fn seed_routes(
    db: &std::path::Path,
    vm_id: &str,
    from: usize,
    to: usize,
) -> anyhow::Result<()> {
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::{ConnectOptions, Connection};
    let mut conn = SqliteConnectOptions::new()
        .filename(db)
        .foreign_keys(true)
        .connect()
        .await?;
    let now = hatch::model::ts(&chrono::Utc::now());
    let mut tx = conn.begin().await?;
    for i in from..to {
        sqlx::query(
            "INSERT INTO proxy_routes (id, vm_id, subdomain, target_port, auto_wake, created_at, updated_at) VALUES (?,?,?,?,?,?,?)",
        )
        .bind(hatch::model::new_id("rt"))
        .bind(vm_id)
        .bind(format!("r{i}"))
        .bind(8080i64)
        .bind(true)
        .bind(&now)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    conn.close().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let dir = tempfile::Builder::new().prefix("hatch-bench-").tempdir()?;
    let fake = FakeHypervisor::new();
    fake.set(|b| b.backend = Some(args.backend));
    let t_all = Instant::now();
    let start = |dir: &std::path::Path| -> anyhow::Result<_> {
        let cfg = config(dir)?;
        let hv = Arc::new(SharedFake(fake.clone()));
        Ok(async move {
            daemon::start_with(cfg, hv)
                .await
                .map_err(|e| anyhow::anyhow!("start: {e}"))
        })
    };
    let mut running = start(dir.path())?.await?;

    let vm = running
        .manager
        .create_vm(USER, CreateVm::default())
        .await
        .map_err(|e| anyhow::anyhow!("create vm: {e}"))?;
    wait_running(&running.manager, &vm.id).await?;

    // Through the manager, as the API does.
    let api_routes = args.api_routes.min(args.routes);
    let t = Instant::now();
    let mgr = running.manager.clone();
    let mut creates = futures::stream::iter(0..api_routes)
        .map(|i| {
            let mgr = mgr.clone();
            let vm_id = vm.id.clone();
            async move {
                mgr.create_route(
                    USER,
                    &vm_id,
                    CreateRoute {
                        subdomain: Some(format!("r{i}")),
                        target_port: Some(8080),
                        auto_wake: Some(true),
                    },
                )
                .await
                .map_err(|e| anyhow::anyhow!("create route r{i}: {e}"))
            }
        })
        .buffer_unordered(args.create_concurrency);
    while let Some(r) = creates.next().await {
        r?;
    }
    drop(creates);
    drop(mgr);
    let api_create_ms = t.elapsed().as_secs_f64() * 1000.0 / api_routes as f64;
    eprintln!(
        "bench_proxy: {api_routes} routes through Manager::create_route in {:.1}s ({api_create_ms:.2} ms each, concurrency {})",
        t.elapsed().as_secs_f64(),
        args.create_concurrency
    );

    // The rest in one transaction, then a restart loads them.
    let mut seed_secs = 0.0;
    if args.routes > api_routes {
        let t = Instant::now();
        running.shutdown().await;
        seed_routes(
            &dir.path().join("data/hatch.db"),
            &vm.id,
            api_routes,
            args.routes,
        )
        .await?;
        running = start(dir.path())?.await?;
        running
            .manager
            .start_vm(USER, &vm.id)
            .await
            .map_err(|e| anyhow::anyhow!("start vm: {e}"))?;
        wait_running(&running.manager, &vm.id).await?;
        seed_secs = t.elapsed().as_secs_f64();
        let (_, n) = running
            .manager
            .counts()
            .await
            .map_err(|e| anyhow::anyhow!("counts: {e}"))?;
        if n != args.routes {
            bail!("the route index holds {n} routes, not {}", args.routes);
        }
        eprintln!(
            "bench_proxy: {} more routes seeded and loaded by a restart in {seed_secs:.1}s",
            args.routes - api_routes
        );
    }

    println!(
        "proxy={} api={} pid={} data={} vm={} routes={} api_create_ms={api_create_ms:.2} seed_secs={seed_secs:.2} total_secs={:.2}",
        running.proxy_addr,
        running.api_addr,
        std::process::id(),
        dir.path().join("data").display(),
        vm.id,
        args.routes,
        t_all.elapsed().as_secs_f64()
    );
    std::io::stdout().flush()?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let watch_stdin = args.exit_on_stdin_eof;
    let stdin_closed = async move {
        if !watch_stdin {
            std::future::pending::<()>().await;
        }
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 256];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = stdin_closed => {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), running.shutdown()).await;
    drop(dir);
    Ok(())
}
