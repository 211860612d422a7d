//! `hatch`: command-line client of the hatchd API.
//!
//! The API address comes from `--api` / `HATCH_API` (default
//! `http://127.0.0.1:8080`), the key from `--key` / `HATCH_API_KEY`, else from
//! `$HATCH_DATA_DIR/admin.key` (default `./data/admin.key`).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

/// Client for the hatchd API.
///
/// The key comes from --key, HATCH_API_KEY, or else $HATCH_DATA_DIR/admin.key
/// (default ./data/admin.key), the file hatchd writes on its first start.
#[derive(Parser)]
#[command(name = "hatch", version)]
struct Cli {
    #[arg(long, env = "HATCH_API", default_value = "http://127.0.0.1:8080")]
    api: String,
    #[arg(long, env = "HATCH_API_KEY", hide_env_values = true)]
    key: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Manage VMs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Manage routes.
    #[command(subcommand)]
    Route(RouteCmd),
}

#[derive(Subcommand)]
enum VmCmd {
    /// Create a VM and wait until it runs.
    Create {
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        vcpus: Option<i64>,
        #[arg(long)]
        mem_mib: Option<i64>,
        /// A file whose contents become the VM's user data.
        #[arg(long)]
        user_data: Option<std::path::PathBuf>,
        /// Return at once instead of waiting for `running`.
        #[arg(long)]
        no_wait: bool,
    },
    /// List your VMs, newest first.
    List,
    /// Show one VM.
    Get { id: String },
    /// Delete a VM with its routes and snapshots.
    Delete { id: String },
    /// Power a running VM off.
    Stop { id: String },
    /// Make a VM run: cold boot from stopped or error, resume from snapshotted.
    Start { id: String },
    /// Save a running VM's memory and put it to sleep.
    Snapshot { id: String },
    /// Resume a snapshotted VM.
    Restore { id: String },
    /// List a VM's snapshots, newest first.
    Snapshots { id: String },
    /// A VM's lifecycle events with their durations, newest first.
    Events { id: String },
}

#[derive(Subcommand)]
enum RouteCmd {
    /// Expose a guest port on a subdomain.
    Add {
        /// The VM's id (vm_...).
        vm: String,
        /// The guest port to expose (1-65535).
        #[arg(long)]
        port: i64,
        /// The subdomain (lowercase letters, digits, hyphens); random when absent.
        #[arg(long)]
        subdomain: Option<String>,
        /// Answer 503 while the VM sleeps instead of waking it.
        #[arg(long)]
        no_auto_wake: bool,
    },
    /// List a VM's routes, newest first.
    List { vm: String },
    /// Delete a route.
    Delete { id: String },
}

struct Client {
    api: String,
    key: String,
    http: reqwest::Client,
}

impl Client {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(
                method,
                format!("{}{}", self.api.trim_end_matches('/'), path),
            )
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach hatchd at {}", self.api))?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "{}: {}",
                status.as_u16(),
                v["error"].as_str().unwrap_or("request failed")
            );
        }
        Ok(v)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let key = match cli.key {
        Some(k) => k,
        None => {
            let dir = std::env::var("HATCH_DATA_DIR").unwrap_or_else(|_| "./data".into());
            let path = std::path::Path::new(&dir).join("admin.key");
            std::fs::read_to_string(&path)
                .with_context(|| {
                    format!(
                        "no --key, no HATCH_API_KEY and cannot read {}",
                        path.display()
                    )
                })?
                .trim()
                .to_string()
        }
    };
    let c = Client {
        api: cli.api,
        key,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()?,
    };
    use reqwest::Method as M;
    let out = match cli.cmd {
        Cmd::Vm(VmCmd::Create {
            image,
            vcpus,
            mem_mib,
            user_data,
            no_wait,
        }) => {
            let mut body = json!({});
            if let Some(i) = image {
                body["image_id"] = json!(i);
            }
            if let Some(v) = vcpus {
                body["vcpu_count"] = json!(v);
            }
            if let Some(m) = mem_mib {
                body["mem_mib"] = json!(m);
            }
            if let Some(p) = user_data {
                body["user_data"] =
                    json!(std::fs::read_to_string(&p).with_context(|| p.display().to_string())?);
            }
            let vm = c.call(M::POST, "/vms", Some(body)).await?;
            if no_wait {
                vm
            } else {
                wait_running(&c, vm["id"].as_str().unwrap_or_default()).await?
            }
        }
        Cmd::Vm(VmCmd::List) => c.call(M::GET, "/vms", None).await?,
        Cmd::Vm(VmCmd::Get { id }) => c.call(M::GET, &format!("/vms/{id}"), None).await?,
        Cmd::Vm(VmCmd::Delete { id }) => c.call(M::DELETE, &format!("/vms/{id}"), None).await?,
        Cmd::Vm(VmCmd::Stop { id }) => c.call(M::POST, &format!("/vms/{id}/stop"), None).await?,
        Cmd::Vm(VmCmd::Start { id }) => c.call(M::POST, &format!("/vms/{id}/start"), None).await?,
        Cmd::Vm(VmCmd::Snapshot { id }) => {
            c.call(M::POST, &format!("/vms/{id}/snapshot"), None)
                .await?
        }
        Cmd::Vm(VmCmd::Restore { id }) => {
            c.call(M::POST, &format!("/vms/{id}/restore"), None).await?
        }
        Cmd::Vm(VmCmd::Snapshots { id }) => {
            c.call(M::GET, &format!("/vms/{id}/snapshots"), None)
                .await?
        }
        Cmd::Vm(VmCmd::Events { id }) => c.call(M::GET, &format!("/vms/{id}/events"), None).await?,
        Cmd::Route(RouteCmd::Add {
            vm,
            port,
            subdomain,
            no_auto_wake,
        }) => {
            let mut body = json!({"target_port": port, "auto_wake": !no_auto_wake});
            if let Some(s) = subdomain {
                body["subdomain"] = json!(s);
            }
            c.call(M::POST, &format!("/vms/{vm}/routes"), Some(body))
                .await?
        }
        Cmd::Route(RouteCmd::List { vm }) => {
            c.call(M::GET, &format!("/vms/{vm}/routes"), None).await?
        }
        Cmd::Route(RouteCmd::Delete { id }) => {
            c.call(M::DELETE, &format!("/routes/{id}"), None).await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Shows progress on stderr while the VM boots.
async fn wait_running(c: &Client, id: &str) -> anyhow::Result<Value> {
    let t0 = Instant::now();
    loop {
        let vm = c
            .call(reqwest::Method::GET, &format!("/vms/{id}"), None)
            .await?;
        match vm["state"].as_str() {
            Some("running") => {
                let cr = if std::io::stderr().is_terminal() {
                    "\r"
                } else {
                    ""
                };
                eprintln!("{cr}{id}: running after {:.1}s", t0.elapsed().as_secs_f64());
                return Ok(vm);
            }
            Some("error") => bail!(
                "{id} failed: {}",
                vm["last_error"].as_str().unwrap_or("unknown")
            ),
            Some(s) if std::io::stderr().is_terminal() => {
                eprint!("\r{id}: {s} ({:.0}s)", t0.elapsed().as_secs_f64())
            }
            Some(_) => {}
            None => bail!("unexpected answer: {vm}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
