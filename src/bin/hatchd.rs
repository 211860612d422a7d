//! `hatchd`: the Hatch daemon. Configuration comes from `HATCH_*` variables.

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// hatchd runs microVMs, serves the Hatch API and the subdomain proxy.
///
/// It takes no arguments: configuration comes from HATCH_* environment
/// variables (see the README), among them HATCH_DATA_DIR (./data),
/// HATCH_HTTP_ADDR (:8080), HATCH_PROXY_ADDR (:9090), HATCH_PROXY_BASE_DOMAIN
/// (hatch.local), HATCH_PROXY_WAKE_TIMEOUT (60s) and HATCH_QEMU_ACCEL (auto).
/// On first start an API key is written to $HATCH_DATA_DIR/admin.key.
#[derive(Parser)]
#[command(version)]
struct Args {}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Args::parse();
    let filter = EnvFilter::try_from_env("HATCH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if std::env::var("HATCH_LOG_FORMAT").as_deref() == Ok("json") {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_ansi(std::io::stdout().is_terminal())
            .with_env_filter(filter)
            .init();
    }
    let cfg = match hatch::config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hatchd: {e}");
            std::process::exit(2);
        }
    };
    let running = match hatch::daemon::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hatchd: {e}");
            std::process::exit(1);
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: snapshotting running vms");
    running.shutdown().await;
    tracing::info!("hatchd stopped");
    Ok(())
}
