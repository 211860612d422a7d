#![allow(clippy::unwrap_used)]
//! Snapshots in an S3-compatible bucket (moto, a real server started by the
//! test) with real QEMU guests: a snapshot taken by one hatchd is restored by
//! another whose data dir is empty (what a second node does), and deleting the
//! VM deletes its objects.

mod common;

use common::moto::{Moto, BUCKET};
use common::proxy_get;
use common::real::{Hatchd, QEMU_LOCK};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn a_snapshot_in_the_bucket_restores_on_a_node_with_an_empty_data_dir() {
    let _g = QEMU_LOCK.lock().await;
    let moto = Moto::start().await;
    let db_dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", db_dir.path().join("shared.db").display());
    let env = [
        ("HATCH_S3_BUCKET", BUCKET),
        ("HATCH_S3_ENDPOINT", moto.endpoint.as_str()),
        ("HATCH_S3_ACCESS_KEY", "hatch-test"),
        ("HATCH_S3_SECRET_KEY", "hatch-test-secret"),
        ("DATABASE_URL", db.as_str()),
    ];
    let mut a = Hatchd::start(&env).await;
    let (_, vm) = a.call("POST", "/vms", Some(json!({}))).await;
    let vm = vm["id"].as_str().unwrap().to_string();
    a.call(
        "POST",
        &format!("/vms/{vm}/routes"),
        Some(json!({"subdomain": "roam", "target_port": 8080})),
    )
    .await;
    a.wait_state(&vm, "running", Duration::from_secs(90)).await;
    let (s, body) = proxy_get(a.proxy, "roam.hatch.local").await;
    assert_eq!((s, body.clone()), (200, format!("hatch guest {vm}\n")));
    let (s, snap) = a.call("POST", &format!("/vms/{vm}/snapshot"), None).await;
    assert_eq!(s, 201, "{snap}");
    let keys = moto.keys(&format!("snapshots/{vm}/")).await;
    assert_eq!(
        keys,
        [snap["state_key"].as_str().unwrap().to_string()],
        "one compressed object in the bucket"
    );
    let (_, events) = a.call("GET", &format!("/vms/{vm}/events"), None).await;
    assert!(
        common::lifecycle(&events)[0]["detail"]["store"]
            .as_str()
            .unwrap()
            .starts_with("s3 "),
        "{events}"
    );
    let key = a.key.clone();
    a.stop(false);

    // Node B: same database and bucket, nothing local.
    let mut b = Hatchd::start(&env).await;
    b.key = key;
    assert!(!b.data_dir().join("snapshots").exists());
    let (s, body) = proxy_get(b.proxy, "roam.hatch.local").await;
    assert_eq!(
        (s, body),
        (200, format!("hatch guest {vm}\n")),
        "log:\n{}",
        b.log()
    );
    let path = format!("/vms/{vm}/events");
    let events = common::events_with(|| b.call("GET", &path, None), "first_byte").await;
    let life = common::lifecycle(&events);
    assert_eq!(life[0]["kind"], "restore", "{events}");
    assert!(
        life[0]["detail"]["download_ms"].as_u64().unwrap() > 0,
        "{events}"
    );

    let (s, _) = b.call("DELETE", &format!("/vms/{vm}"), None).await;
    assert_eq!(s, 200);
    assert!(
        moto.keys(&format!("snapshots/{vm}/")).await.is_empty(),
        "deleting the vm deleted its objects"
    );
}
