#![allow(clippy::unwrap_used)]
//! The proxy and the wake logic with the fake hypervisor: deterministic checks of
//! host parsing (cases H1–H3) and the wake rules (W1–W5), plus auto_wake=false,
//! stopped VMs, request bodies and restarts. The same flows run against real QEMU
//! guests in `e2e_qemu.rs`.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use common::{proxy_get, raw, FakeDaemon};
use serde_json::{json, Value};

async fn running_vm_with_route(d: &FakeDaemon, sub: &str, auto_wake: bool) -> String {
    let vm = d.create_vm().await;
    d.wait_state(&vm, "running").await;
    d.route(&vm, sub, auto_wake).await;
    vm
}

async fn cold_vm(d: &FakeDaemon, sub: &str, auto_wake: bool) -> String {
    let vm = running_vm_with_route(d, sub, auto_wake).await;
    let (s, v) = d.call("POST", &format!("/vms/{vm}/snapshot"), None).await;
    assert_eq!(s, 201, "{v}");
    vm
}

fn is_json_error(body: &str) -> bool {
    serde_json::from_str::<Value>(body).is_ok_and(|v| v["error"].is_string())
}

#[tokio::test]
async fn h1_host_case_and_port_are_ignored() {
    let d = FakeDaemon::start(&[]).await;
    let vm = running_vm_with_route(&d, "myapp", true).await;
    for host in [
        "MyApp.Hatch.Local:9090",
        "myapp.hatch.local:80",
        "myapp.hatch.local.",
    ] {
        let (s, body) = d.get(host).await;
        assert_eq!(s, 200, "{host}: {body}");
        assert!(body.contains(&vm), "{host}: {body}");
    }
}

#[tokio::test]
async fn h2_uppercase_route_refused_uppercase_host_routes() {
    let d = FakeDaemon::start(&[]).await;
    let vm = running_vm_with_route(&d, "myapp", true).await;
    let (s, v) = d
        .call(
            "POST",
            &format!("/vms/{vm}/routes"),
            Some(json!({"subdomain": "MyApp", "target_port": 8080})),
        )
        .await;
    assert_eq!(s, 400);
    assert_eq!(
        v["error"],
        "subdomain must be lowercase alphanumeric with optional hyphens (max 63 chars)"
    );
    let (s, body) = d.get("MYAPP.HATCH.LOCAL").await;
    assert_eq!(s, 200);
    assert!(body.contains(&vm));
}

#[tokio::test]
async fn h3_malformed_hosts_get_json_4xx_and_reach_no_vm() {
    let d = FakeDaemon::start(&[]).await;
    let vm = cold_vm(&d, "myapp", true).await;
    let restores = d.fake.restores.load(SeqCst);
    let mut requests: Vec<String> = [
        "[::1]:9090",
        "myapp.hatch.local:",
        "myapp.hatch.local:abc",
        ".hatch.local",
        "a.b.hatch.local",
    ]
    .iter()
    .map(|h| format!("GET / HTTP/1.1\r\nHost: {h}\r\nConnection: close\r\n\r\n"))
    .collect();
    requests.push("GET / HTTP/1.1\r\nConnection: close\r\n\r\n".into());
    requests.push(
        "GET / HTTP/1.1\r\nHost: myapp.hatch.local\r\nHost: other.hatch.local\r\nConnection: close\r\n\r\n".into(),
    );
    for r in &requests {
        let (s, body) = raw(d.proxy, r).await;
        assert!((400..500).contains(&s), "{r:?} → {s} {body}");
        assert!(is_json_error(&body), "{r:?} → {body}");
    }
    assert_eq!(
        d.fake.restores.load(SeqCst),
        restores,
        "no bad request woke the vm"
    );
    let (_, v) = d.call("GET", &format!("/vms/{vm}"), None).await;
    assert_eq!(v["state"], "snapshotted");
    let (s, body) = d.get("myapp.hatch.local:9090").await;
    assert_eq!(s, 200);
    assert!(body.contains(&vm));
}

#[tokio::test]
async fn unknown_subdomain_is_404_json() {
    let d = FakeDaemon::start(&[]).await;
    let (s, body) = d.get("nothing.hatch.local").await;
    assert_eq!(s, 404);
    assert_eq!(body, r#"{"error":"no route for subdomain \"nothing\""}"#);
}

#[tokio::test]
async fn w1_one_get_to_a_cold_vm_restores_once() {
    let d = FakeDaemon::start(&[]).await;
    let vm = cold_vm(&d, "myapp", true).await;
    let (s, body) = d.get("myapp.hatch.local").await;
    assert_eq!(s, 200, "{body}");
    assert!(body.contains(&vm));
    assert_eq!(d.fake.restores.load(SeqCst), 1);
    let (_, v) = d.call("GET", &format!("/vms/{vm}"), None).await;
    assert_eq!(v["state"], "running");
    assert_eq!(v["restore_count"], 1);
}

#[tokio::test]
async fn w2_fifty_concurrent_gets_share_one_restore() {
    let d = FakeDaemon::start(&[]).await;
    let vm = cold_vm(&d, "myapp", true).await;
    d.fake.set(|b| b.restore_delay = Duration::from_millis(300));
    let tasks: Vec<_> = (0..50)
        .map(|_| tokio::spawn(proxy_get(d.proxy, "myapp.hatch.local")))
        .collect();
    for t in tasks {
        let (s, body) = t.await.unwrap();
        assert_eq!(s, 200, "{body}");
        assert!(body.contains(&vm));
    }
    assert_eq!(d.fake.restores.load(SeqCst), 1);
}

#[tokio::test]
async fn w3_service_that_listens_late_still_gets_200() {
    let d = FakeDaemon::start(&[]).await;
    let vm = cold_vm(&d, "myapp", true).await;
    d.fake
        .set(|b| b.service_delay = Duration::from_millis(1500));
    let t0 = Instant::now();
    let (s, body) = d.get("myapp.hatch.local").await;
    assert_eq!(s, 200, "{body}");
    assert!(body.contains(&vm));
    assert!(t0.elapsed() >= Duration::from_millis(1400));
}

#[tokio::test]
async fn w4_wake_timeout_is_504_and_the_next_request_tries_again() {
    let d = FakeDaemon::start(&[("HATCH_PROXY_WAKE_TIMEOUT", "2s")]).await;
    let vm = cold_vm(&d, "myapp", true).await;
    d.fake.set(|b| b.hang = true);
    let t0 = Instant::now();
    let (s, body) = d.get("myapp.hatch.local").await;
    let took = t0.elapsed();
    assert_eq!(s, 504, "{body}");
    assert!(is_json_error(&body), "{body}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
        "{took:?}"
    );
    // Not stuck "waking": the snapshot is still good, and the next request starts
    // a fresh attempt that succeeds.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, v) = d.call("GET", &format!("/vms/{vm}"), None).await;
    assert_eq!(v["state"], "snapshotted", "{v}");
    d.fake.set(|b| b.hang = false);
    let (s, body) = d.get("myapp.hatch.local").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(d.fake.restores.load(SeqCst), 2);
}

#[tokio::test]
async fn w5_failed_wake_is_503_and_state_tells_the_truth() {
    let d = FakeDaemon::start(&[]).await;
    let vm = cold_vm(&d, "myapp", true).await;
    // The snapshot file is gone.
    let (_, snaps) = d.call("GET", &format!("/vms/{vm}/snapshots"), None).await;
    common::lose_snapshot(&d.dir.path().join("data"), &snaps[0]);
    let (s, body) = d.get("myapp.hatch.local").await;
    assert!(s == 502 || s == 503, "{s} {body}");
    assert!(is_json_error(&body));
    let (_, v) = d.call("GET", &format!("/vms/{vm}"), None).await;
    assert_eq!(v["state"], "error", "{v}");
    assert!(
        v["last_error"].as_str().unwrap().contains("restore failed"),
        "{v}"
    );
    // An error VM is not woken behind the user's back, but can be started.
    let (s, _) = d.get("myapp.hatch.local").await;
    assert_eq!(s, 503);
    let (s, v) = d.call("POST", &format!("/vms/{vm}/start"), None).await;
    assert_eq!((s, v["state"].clone()), (200, json!("running")));
    let (s, _) = d.get("myapp.hatch.local").await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn a_restore_that_failed_for_a_host_reason_can_be_retried() {
    let d = FakeDaemon::start(&[]).await;
    let vm = cold_vm(&d, "myapp", true).await;
    d.fake
        .set(|b| b.fail = Some("cannot create PID file".into()));
    let (s, _) = d.get("myapp.hatch.local").await;
    assert_eq!(s, 503);
    let (_, v) = d.call("GET", &format!("/vms/{vm}"), None).await;
    assert_eq!(v["state"], "error");
    // Still failing: the API says so and the VM stays in error.
    let (s, v) = d.call("POST", &format!("/vms/{vm}/restore"), None).await;
    assert_eq!(s, 500, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("cannot create PID file"),
        "{v}"
    );
    // Fixed: the snapshot (the VM's memory) is restored, not thrown away.
    d.fake.set(|b| b.fail = None);
    let (s, v) = d.call("POST", &format!("/vms/{vm}/restore"), None).await;
    assert_eq!((s, v["state"].clone()), (200, json!("running")), "{v}");
    assert_eq!(d.fake.restores.load(SeqCst), 3);
    assert_eq!(d.fake.boots.load(SeqCst), 1, "no cold boot");
}

#[tokio::test]
async fn auto_wake_false_is_503_and_vm_stays_asleep() {
    let d = FakeDaemon::start(&[]).await;
    let vm = cold_vm(&d, "sleepy", false).await;
    let (s, body) = d.get("sleepy.hatch.local").await;
    assert_eq!(s, 503, "{body}");
    assert!(is_json_error(&body));
    assert_eq!(d.fake.restores.load(SeqCst), 0);
    let (_, v) = d.call("GET", &format!("/vms/{vm}"), None).await;
    assert_eq!(v["state"], "snapshotted");
}

#[tokio::test]
async fn a_stopped_vm_is_booted_by_a_request() {
    let d = FakeDaemon::start(&[]).await;
    let vm = running_vm_with_route(&d, "myapp", true).await;
    let (s, _) = d.call("POST", &format!("/vms/{vm}/stop"), None).await;
    assert_eq!(s, 200);
    let boots = d.fake.boots.load(SeqCst);
    let (s, body) = d.get("myapp.hatch.local").await;
    assert_eq!(s, 200);
    assert!(body.contains(&vm));
    assert_eq!(d.fake.boots.load(SeqCst), boots + 1);
}

#[tokio::test]
async fn request_body_survives_the_wake() {
    let d = FakeDaemon::start(&[]).await;
    cold_vm(&d, "myapp", true).await;
    d.fake.set(|b| b.service_delay = Duration::from_millis(300));
    let payload = "x".repeat(100_000);
    let req = format!(
        "POST /upload HTTP/1.1\r\nHost: myapp.hatch.local\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    let (s, body) = raw(d.proxy, &req).await;
    assert_eq!(s, 200);
    assert!(body.ends_with(&payload), "the guest got the whole body");
}

#[tokio::test]
async fn restart_keeps_vms_and_routes_reachable() {
    let mut d = FakeDaemon::start(&[]).await;
    let a = running_vm_with_route(&d, "alive", true).await;
    let b = cold_vm(&d, "asleep", true).await;
    d.restart().await;
    let (_, list) = d.call("GET", "/vms", None).await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    for (host, vm) in [("alive.hatch.local", &a), ("asleep.hatch.local", &b)] {
        let (s, body) = d.get(host).await;
        assert_eq!(s, 200, "{host}: {body}");
        assert!(body.contains(vm.as_str()));
    }
    let (_, routes) = d.call("GET", &format!("/vms/{a}/routes"), None).await;
    assert_eq!(routes[0]["subdomain"], "alive");
}

#[tokio::test]
async fn any_number_of_proxy_workers_serves_and_wakes() {
    for workers in ["1", "3"] {
        let d = FakeDaemon::start(&[("HATCH_PROXY_WORKERS", workers)]).await;
        let vm = cold_vm(&d, "myapp", true).await;
        // More connections than workers, at once: each lands on some worker,
        // and the one wake they share runs on the main runtime.
        let tasks: Vec<_> = (0..12)
            .map(|_| tokio::spawn(common::proxy_get(d.proxy, "myapp.hatch.local")))
            .collect();
        for t in tasks {
            let (s, body) = t.await.unwrap();
            assert_eq!(s, 200, "{workers} workers: {body}");
            assert!(body.contains(&vm));
        }
        assert_eq!(d.fake.restores.load(SeqCst), 1, "{workers} workers");
    }
}
