//! `hatchd`: the Hatch daemon. Configuration comes from `HATCH_*` variables.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
