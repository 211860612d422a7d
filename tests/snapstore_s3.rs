#![allow(clippy::unwrap_used)]
//! The snapshot store against a real S3-compatible server: moto in server mode,
//! started by each test through `scripts/s3-test-server` on a free loopback port
//! and killed by its PID when the test ends, panics included. If moto cannot be
//! installed or started, the tests fail: they never skip.

use std::path::{Path, PathBuf};

mod common;

use common::moto::{Moto, BUCKET};
use hatch::snapstore::{snapshot_key, S3Config, SnapStore, SnapStoreConfig};
use rand::RngCore;

/// `len` bytes of alternating 1 MiB runs of zeros and random data (half each).
fn mixed_file(path: &Path, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut rng = rand::thread_rng();
    for (i, block) in data.chunks_mut(1 << 20).enumerate() {
        if i % 2 == 1 {
            rng.fill_bytes(block);
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}

#[tokio::test]
async fn s3_round_trip() {
    let moto = Moto::start().await;
    let store = moto.store();
    let desc = store.describe();
    assert_eq!(desc, format!("s3 {BUCKET} ({})", moto.endpoint));

    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("memory");
    // Half random: ~12 MiB compressed, so a multipart upload of several parts.
    let data = mixed_file(&raw, 24 << 20);
    let key = snapshot_key("vm-a", "snap-1");

    assert!(!store.exists(&key).await.unwrap());
    let stored = store.upload(&key, &raw).await.unwrap();
    assert!(
        stored > 8 << 20 && stored < data.len() as u64,
        "stored {stored} bytes"
    );
    assert!(store.exists(&key).await.unwrap());

    let dest = dir.path().join("restored");
    let n = store.download(&key, &dest).await.unwrap();
    assert_eq!(n, data.len() as u64);
    assert!(
        std::fs::read(&dest).unwrap() == data,
        "restored bytes differ"
    );

    // Overwrite with a small, zero-only snapshot: a single-part upload.
    std::fs::write(&raw, vec![0u8; 4 << 20]).unwrap();
    let stored = store.upload(&key, &raw).await.unwrap();
    assert!(stored < 64 << 10, "stored {stored} bytes");
    assert_eq!(store.download(&key, &dest).await.unwrap(), 4 << 20);
    assert_eq!(std::fs::read(&dest).unwrap(), vec![0u8; 4 << 20]);

    store.delete(&key).await.unwrap();
    assert!(!store.exists(&key).await.unwrap());
    store.delete(&key).await.unwrap(); // missing: still Ok
}

#[tokio::test]
async fn s3_delete_prefix() {
    let moto = Moto::start().await;
    let store = moto.store();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("memory");
    std::fs::write(&raw, b"a small snapshot").unwrap();

    let vm1 = [snapshot_key("vm1", "s1"), snapshot_key("vm1", "s2")];
    let vm10 = snapshot_key("vm10", "s1");
    for k in vm1.iter().chain([&vm10]) {
        store.upload(k, &raw).await.unwrap();
    }
    store.delete_prefix("snapshots/vm1/").await.unwrap();
    for k in &vm1 {
        assert!(!store.exists(k).await.unwrap(), "{k} survived");
    }
    assert!(store.exists(&vm10).await.unwrap(), "vm10 is not under vm1/");
    store.delete_prefix("snapshots/vm1").await.unwrap(); // nothing left: Ok
    assert!(store.delete_prefix("").await.is_err());
}

#[tokio::test]
async fn s3_missing_key_errors() {
    let moto = Moto::start().await;
    let store = moto.store();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("restored");
    let key = snapshot_key("vm1", "never-uploaded");
    let err = store.download(&key, &dest).await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert!(
        err.to_string().starts_with(&format!("download {key}")),
        "{err}"
    );
    assert!(!dest.exists());
    assert!(!store.exists(&key).await.unwrap());

    // A bucket that does not exist is an error too, not "missing".
    let bad = SnapStore::new(&SnapStoreConfig {
        local_root: PathBuf::new(),
        s3: Some(S3Config {
            bucket: "no-such-bucket".into(),
            endpoint: Some(moto.endpoint.clone()),
            region: "us-east-1".into(),
            access_key: Some("x".into()),
            secret_key: Some("y".into()),
        }),
    })
    .unwrap();
    let raw = dir.path().join("memory");
    std::fs::write(&raw, b"x").unwrap();
    let err = bad.upload(&key, &raw).await.unwrap_err();
    assert!(
        err.to_string().starts_with(&format!("upload {key}")),
        "{err}"
    );
}
