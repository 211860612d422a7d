//! Test harness: an in-process hatchd on ephemeral loopback ports, a temp data
//! dir and the fake hypervisor (unit-level tests of API, proxy and wake logic).
#![allow(dead_code, clippy::unwrap_used)]

pub mod backends;
pub mod moto;
pub mod real;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hatch::daemon::{self, Running};
use hatch::vmm::fake::{FakeHypervisor, SharedFake};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct FakeDaemon {
    pub running: Option<Running>,
    pub api: String,
    pub proxy: SocketAddr,
    pub key: String,
    pub fake: Arc<FakeHypervisor>,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    env: Vec<(String, String)>,
}

fn config(dir: &std::path::Path, extra: &[(&str, &str)]) -> hatch::config::Config {
    let kernel = dir.join("vmlinux");
    let rootfs = dir.join("initrd.img");
    std::fs::write(&kernel, b"fake kernel").unwrap();
    std::fs::write(&rootfs, b"fake initrd").unwrap();
    let mut m: HashMap<String, String> = [
        ("HATCH_HTTP_ADDR", "127.0.0.1:0".to_string()),
        ("HATCH_PROXY_ADDR", "127.0.0.1:0".to_string()),
        (
            "HATCH_DATA_DIR",
            dir.join("data").to_string_lossy().into_owned(),
        ),
        (
            "HATCH_DEFAULT_KERNEL_PATH",
            kernel.to_string_lossy().into_owned(),
        ),
        (
            "HATCH_DEFAULT_ROOTFS_PATH",
            rootfs.to_string_lossy().into_owned(),
        ),
        (
            "HATCH_DEFAULT_IMAGE_DIR",
            dir.to_string_lossy().into_owned(),
        ),
        ("HATCH_PROXY_WAKE_TIMEOUT", "10s".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in extra {
        m.insert(k.to_string(), v.to_string());
    }
    hatch::config::from_lookup(|k| m.get(k).cloned()).unwrap()
}

impl FakeDaemon {
    pub async fn start(extra: &[(&str, &str)]) -> FakeDaemon {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeHypervisor::new();
        let running = daemon::start_with(
            config(dir.path(), extra),
            Arc::new(SharedFake(fake.clone())),
        )
        .await
        .unwrap();
        let key = std::fs::read_to_string(dir.path().join("data/admin.key"))
            .unwrap()
            .trim()
            .to_string();
        FakeDaemon {
            api: format!("http://{}", running.api_addr),
            proxy: running.proxy_addr,
            running: Some(running),
            key,
            fake,
            dir,
            http: reqwest::Client::new(),
            env: extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Stops and starts hatchd on the same data dir (same fake hypervisor).
    pub async fn restart(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        let extra: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let running = daemon::start_with(
            config(self.dir.path(), &extra),
            Arc::new(SharedFake(self.fake.clone())),
        )
        .await
        .unwrap();
        self.api = format!("http://{}", running.api_addr);
        self.proxy = running.proxy_addr;
        self.running = Some(running);
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self::api_call(&self.http, &self.api, &self.key, method, path, body).await
    }

    pub async fn create_vm(&self) -> String {
        let (s, v) = self.call("POST", "/vms", Some(serde_json::json!({}))).await;
        assert_eq!(s, 201, "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    pub async fn wait_state(&self, vm: &str, want: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, v) = self.call("GET", &format!("/vms/{vm}"), None).await;
            if v["state"] == want {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "vm never reached {want}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn route(&self, vm: &str, sub: &str, auto_wake: bool) -> Value {
        let (s, v) = self
            .call(
                "POST",
                &format!("/vms/{vm}/routes"),
                Some(serde_json::json!({"subdomain": sub, "target_port": 8080, "auto_wake": auto_wake})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        v
    }

    pub async fn get(&self, host: &str) -> (u16, String) {
        proxy_get(self.proxy, host).await
    }
}

/// Loses a snapshot for good: its local copy and its object in the default
/// (local directory) snapshot store.
pub fn lose_snapshot(data_dir: &std::path::Path, snapshot: &Value) {
    let vm = snapshot["vm_id"].as_str().unwrap();
    let id = snapshot["id"].as_str().unwrap();
    let key = snapshot["state_key"].as_str().unwrap();
    std::fs::remove_file(
        data_dir
            .join("snapshots")
            .join(vm)
            .join(format!("{id}.vmstate")),
    )
    .unwrap();
    std::fs::remove_file(data_dir.join("snapshot-store").join(key)).unwrap();
}

/// An authenticated API call; the body is parsed as JSON when it is JSON.
pub async fn api_call(
    http: &reqwest::Client,
    api: &str,
    key: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = http.request(m, format!("{api}{path}")).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A GET through the proxy with the given Host, over a raw socket.
pub async fn proxy_get(proxy: SocketAddr, host: &str) -> (u16, String) {
    raw(
        proxy,
        &format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// Sends raw bytes, reads the whole response (the request must ask for
/// `Connection: close`), returns status and body.
pub async fn raw(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(120), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, dechunk(&text, body))
}

fn dechunk(head: &str, body: String) -> String {
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body;
    }
    let mut out = String::new();
    let mut rest = body.as_str();
    while let Some((len, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// A VM's events (newest first) once one of `kind` is among them: events
/// written just after an answer, such as `first_byte`, may follow it by a few
/// ms. Gives up after 5 s and returns what is there.
pub async fn events_with<Fut>(fetch: impl Fn() -> Fut, kind: &str) -> Value
where
    Fut: std::future::Future<Output = (u16, Value)>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, events) = fetch().await;
        let found = events
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["kind"] == kind));
        if found || tokio::time::Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The lifecycle events (boot, restore, snapshot, …) without the `first_byte`
/// ones, newest first.
pub fn lifecycle(events: &Value) -> Vec<Value> {
    events
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["kind"] != "first_byte")
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}
