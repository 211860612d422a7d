#![allow(clippy::unwrap_used)]
//! Harness for end-to-end tests: the real `hatchd` binary as a child process on
//! ephemeral loopback ports with a temp data dir, running real QEMU guests from
//! the image that `scripts/build-image` builds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// QEMU tests share two cores: run one at a time.
pub static QEMU_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn image_dir() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("HATCH_TEST_IMAGE_DIR")
            .unwrap_or_else(|_| "/var/lib/hatch/images/default".into()),
    );
    assert!(
        dir.join("vmlinux").exists() && dir.join("initrd.img").exists(),
        "no guest image in {}: run scripts/build-image first (scripts/test does)",
        dir.display()
    );
    dir
}

pub struct Hatchd {
    pub child: Option<Child>,
    pub root: tempfile::TempDir,
    pub api: String,
    pub proxy: SocketAddr,
    pub key: String,
    pub http: reqwest::Client,
    env: Vec<(String, String)>,
}

impl Hatchd {
    pub async fn start(env: &[(&str, &str)]) -> Hatchd {
        let root = tempfile::tempdir().unwrap();
        let mut h = Hatchd {
            child: None,
            root,
            api: String::new(),
            proxy: "127.0.0.1:1".parse().unwrap(),
            key: String::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        h.spawn().await;
        h
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.path().join("hatchd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    async fn spawn(&mut self) {
        let data = self.data_dir();
        let _ = std::fs::remove_file(data.join("api.addr"));
        let _ = std::fs::remove_file(data.join("proxy.addr"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hatchd"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HATCH_HTTP_ADDR", "127.0.0.1:0")
            .env("HATCH_PROXY_ADDR", "127.0.0.1:0")
            // Relative, as with the quick start's default `./data`.
            .current_dir(self.root.path())
            .env("HATCH_DATA_DIR", "data")
            .env("HATCH_DEFAULT_IMAGE_DIR", image_dir())
            .env("HATCH_DEFAULT_MEM_MIB", "256")
            .env(
                "HATCH_QEMU_ACCEL",
                std::env::var("HATCH_QEMU_ACCEL").unwrap_or_else(|_| "tcg".into()),
            )
            .env("HATCH_LOG", "info,hatch=debug")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let api = std::fs::read_to_string(data.join("api.addr"));
            let proxy = std::fs::read_to_string(data.join("proxy.addr"));
            if let (Ok(a), Ok(p)) = (api, proxy) {
                self.api = format!("http://{}", a.trim());
                self.proxy = p.trim().parse().unwrap();
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("hatchd exited with {status}:\n{}", self.log());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "hatchd did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A node sharing another's database has no key file of its own.
        if let Ok(k) = std::fs::read_to_string(data.join("admin.key")) {
            self.key = k.trim().to_string();
        }
    }

    /// SIGTERM (graceful) or SIGKILL, then start again on the same data dir.
    pub async fn restart(&mut self, kill: bool) {
        self.stop(kill);
        self.spawn().await;
    }

    pub fn stop(&mut self, kill: bool) {
        if let Some(mut c) = self.child.take() {
            let sig = if kill { "-KILL" } else { "-TERM" };
            let _ = Command::new("kill")
                .arg(sig)
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        super::api_call(&self.http, &self.api, &self.key, method, path, body).await
    }

    pub async fn vm(&self, id: &str) -> Value {
        let (s, v) = self.call("GET", &format!("/vms/{id}"), None).await;
        assert_eq!(s, 200, "{v}");
        v
    }

    pub async fn wait_state(&self, vm: &str, want: &str, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let v = self.vm(vm).await;
            if v["state"] == want {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "vm never reached {want}: {v}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn serial_log(&self, vm: &str) -> String {
        std::fs::read_to_string(self.data_dir().join("vms").join(vm).join("serial.log"))
            .unwrap_or_default()
    }
}

impl Drop for Hatchd {
    fn drop(&mut self) {
        // Kill hatchd, then the guests it left (their pid files are in the data dir).
        self.stop(true);
        kill_guests(&self.data_dir());
    }
}

/// Ends QEMU processes whose pid files sit under `data/vms/*/`.
pub fn kill_guests(data: &Path) {
    let Ok(entries) = std::fs::read_dir(data.join("vms")) else {
        return;
    };
    for e in entries.flatten() {
        if let Ok(pid) = std::fs::read_to_string(e.path().join("qemu.pid")) {
            let pid = pid.trim();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&*e.path().to_string_lossy()) {
                let _ = Command::new("kill").arg("-KILL").arg(pid).status();
            }
        }
    }
}

/// Child processes of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            // ppid is the 2nd field after the parenthesised command name.
            if let Some(rest) = stat.rsplit_once(')').map(|x| x.1) {
                if rest
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse::<u32>().ok())
                    == Some(pid)
                {
                    out.push(p);
                }
            }
        }
    }
    out
}

pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// TCP sockets listening on 127.0.0.1 held by `pid` (QEMU's forwarded ports).
pub fn listening_ports(pid: u32) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let s = l.to_string_lossy().to_string();
                    s.strip_prefix("socket:[")
                        .map(|x| x.trim_end_matches(']').to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    tcp.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 9 && f[3] == "0A" && inodes.contains(f[9])
        })
        .count()
}
