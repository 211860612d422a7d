//! A real S3-compatible server for tests: moto in server mode, started through
//! `scripts/s3-test-server` on a free loopback port and killed by its PID when
//! dropped, panics included. If moto cannot be installed or started, the test
//! fails: it never skips.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hatch::snapstore::{S3Config, SnapStore, SnapStoreConfig};

pub const BUCKET: &str = "hatch-snapshots";
/// First start may have to create the venv and pip-install moto.
const START_TIMEOUT: Duration = Duration::from_secs(300);

/// A running moto server; killed on drop.
pub struct Moto {
    child: Child,
    pub endpoint: String,
    _log_dir: tempfile::TempDir,
}

impl Moto {
    pub async fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/s3-test-server");
        let log_dir = tempfile::tempdir().unwrap();
        let log_path = log_dir.path().join("moto.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(&script)
            .args(["127.0.0.1", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        let mut moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            _log_dir: log_dir,
        };
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let started = Instant::now();
        loop {
            if let Some(status) = moto.child.try_wait().unwrap() {
                panic!(
                    "S3 test server (moto) exited with {status} before answering; \
                     scripts/install-deps sets it up. Its output:\n{}",
                    log()
                );
            }
            if let Ok(r) = http.get(&moto.endpoint).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if started.elapsed() > START_TIMEOUT {
                panic!(
                    "S3 test server (moto) did not answer on {} within {:?}. Its output:\n{}",
                    moto.endpoint,
                    START_TIMEOUT,
                    log()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // object_store cannot create buckets: a plain PUT does (moto takes it unsigned).
        let r = http
            .put(format!("{}/{BUCKET}", moto.endpoint))
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "create bucket: {}",
            r.text().await.unwrap_or_default()
        );
        moto
    }

    pub fn store(&self) -> SnapStore {
        SnapStore::new(&SnapStoreConfig {
            local_root: PathBuf::from("/nonexistent/unused"),
            s3: Some(S3Config {
                bucket: BUCKET.into(),
                endpoint: Some(self.endpoint.clone()),
                region: "us-east-1".into(),
                access_key: Some("hatch-test".into()),
                secret_key: Some("hatch-test-secret".into()),
            }),
        })
        .unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Object keys in the bucket under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let xml = reqwest::get(format!(
            "{}/{BUCKET}?list-type=2&prefix={prefix}",
            self.endpoint
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
        xml.split("<Key>")
            .skip(1)
            .filter_map(|p| p.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }
}
