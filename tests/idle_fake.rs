#![allow(clippy::unwrap_used)]
//! Scale to zero with the fake driver: the idle reaper (cases I1–I3), what counts
//! as activity, clean closing of connections before a VM sleeps, requests that
//! arrive during a snapshot, per-VM settings and the event log.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use common::backends::{sse_backend, ws_backend};
use common::FakeDaemon;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const IDLE: &[(&str, &str)] = &[
    ("HATCH_IDLE_TIMEOUT", "2s"),
    ("HATCH_IDLE_CHECK_INTERVAL", "100ms"),
];

async fn state(d: &FakeDaemon, vm: &str) -> String {
    let (_, v) = d.call("GET", &format!("/vms/{vm}"), None).await;
    v["state"].as_str().unwrap().to_string()
}

async fn vm_with_route(d: &FakeDaemon, body: Value) -> String {
    let (s, v) = d.call("POST", "/vms", Some(body)).await;
    assert_eq!(s, 201, "{v}");
    let vm = v["id"].as_str().unwrap().to_string();
    d.wait_state(&vm, "running").await;
    d.route(&vm, "myapp", true).await;
    vm
}

/// Waits until the VM reaches `want`, returning how long that took.
async fn until_state(d: &FakeDaemon, vm: &str, want: &str, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        if state(d, vm).await == want {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < within, "{vm} not {want} within {within:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn i1_a_long_streaming_response_keeps_the_vm_awake_until_its_last_byte() {
    let d = FakeDaemon::start(IDLE).await;
    d.fake.set(|b| b.backend = None);
    let backend = sse_backend(6, Duration::from_secs(1)).await;
    d.fake.set(|b| b.backend = Some(backend));
    let vm = vm_with_route(&d, json!({})).await;
    let proxy = d.proxy;
    let stream = tokio::spawn(async move {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(
            b"GET /events HTTP/1.1\r\nHost: myapp.hatch.local\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        (out, Instant::now())
    });
    // During the 6 s stream (three idle timeouts) the VM stays up.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(state(&d, &vm).await, "running");
    }
    let (out, last_byte) = stream.await.unwrap();
    assert_eq!(
        out.matches("data: event").count(),
        6,
        "the stream was not cut: {out}"
    );
    assert_eq!(d.fake.snapshots.load(SeqCst), 0);
    // Asleep only after the last byte plus the timeout.
    until_state(&d, &vm, "snapshotted", Duration::from_secs(6)).await;
    let slept_after = last_byte.elapsed();
    assert!(
        slept_after >= Duration::from_millis(1800),
        "slept {slept_after:?} after the last byte"
    );
    let (_, events) = d.call("GET", &format!("/vms/{vm}/events"), None).await;
    assert_eq!(events[0]["kind"], "snapshot");
    assert_eq!(events[0]["detail"]["trigger"], "idle");
    // The next request wakes it; the wake and its first byte are recorded.
    let (s, _) = d.get("myapp.hatch.local").await;
    assert_eq!(s, 200);
    let path = format!("/vms/{vm}/events");
    let events = common::events_with(|| d.call("GET", &path, None), "first_byte").await;
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .take(3)
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["first_byte", "restore", "snapshot"], "{events}");
    assert!(events[0]["detail"]["first_byte_ms"].is_u64());
    assert_eq!(events[0]["detail"]["attempts"], 1);
    assert!(events[0]["detail"]["guest_ms"].is_f64(), "{events}");
}

/// A VM with route `myapp` whose guest is a WebSocket echo server, and a
/// WebSocket opened to it through the proxy.
async fn vm_with_websocket(
    d: &FakeDaemon,
) -> (String, tokio_tungstenite::WebSocketStream<TcpStream>) {
    let (ws_addr, _, _) = ws_backend().await;
    d.fake.set(|b| b.backend = Some(ws_addr));
    let vm = vm_with_route(d, json!({})).await;
    let sock = TcpStream::connect(d.proxy).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async("ws://myapp.hatch.local/", sock)
        .await
        .unwrap();
    (vm, ws)
}

#[tokio::test]
async fn i2_an_open_websocket_keeps_the_vm_awake_and_sleep_follows_its_close() {
    let d = FakeDaemon::start(IDLE).await;
    let (vm, mut ws) = vm_with_websocket(&d).await;
    for i in 0..6 {
        ws.send(Message::text(format!("tick {i}"))).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text(format!("tick {i}"))
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(state(&d, &vm).await, "running", "after {i} s");
    }
    ws.close(None).await.unwrap();
    let closed = Instant::now();
    until_state(&d, &vm, "snapshotted", Duration::from_secs(6)).await;
    assert!(closed.elapsed() >= Duration::from_millis(1800));
}

#[tokio::test]
async fn i3_a_vm_without_routes_sleeps_and_wakes_on_start_or_restore() {
    let d = FakeDaemon::start(IDLE).await;
    let vm = d.create_vm().await;
    d.wait_state(&vm, "running").await;
    until_state(&d, &vm, "snapshotted", Duration::from_secs(6)).await;
    let (s, v) = d.call("POST", &format!("/vms/{vm}/start"), None).await;
    assert_eq!((s, v["state"].clone()), (200, json!("running")), "{v}");
    assert_eq!(
        d.fake.restores.load(SeqCst),
        1,
        "start resumed the snapshot"
    );
    until_state(&d, &vm, "snapshotted", Duration::from_secs(6)).await;
    let (s, v) = d.call("POST", &format!("/vms/{vm}/restore"), None).await;
    assert_eq!((s, v["state"].clone()), (200, json!("running")), "{v}");
    assert_eq!(d.fake.restores.load(SeqCst), 2);
}

#[tokio::test]
async fn per_vm_settings_and_stop_mode() {
    // Global default: never within this test.
    let d = FakeDaemon::start(&[
        ("HATCH_IDLE_TIMEOUT", "1h"),
        ("HATCH_IDLE_CHECK_INTERVAL", "100ms"),
    ])
    .await;
    let (s, v) = d
        .call("POST", "/vms", Some(json!({"idle_timeout": "soon"})))
        .await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("idle_timeout"), "{v}");
    let (s, v) = d
        .call("POST", "/vms", Some(json!({"sleep_mode": "hibernate"})))
        .await;
    assert_eq!(s, 400, "{v}");

    let stay = d.create_vm().await;
    let (s, v) = d
        .call(
            "POST",
            "/vms",
            Some(
                json!({"idle_timeout": "1s", "idle_check_interval": "100ms", "sleep_mode": "stop"}),
            ),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["idle_timeout"], "1s");
    assert_eq!(v["sleep_mode"], "stop");
    let short = v["id"].as_str().unwrap().to_string();
    d.route(&short, "short", true).await;
    until_state(&d, &short, "stopped", Duration::from_secs(5)).await;
    assert_eq!(state(&d, &stay).await, "running");
    assert_eq!(d.fake.snapshots.load(SeqCst), 0);
    // A request boots it again.
    let boots = d.fake.boots.load(SeqCst);
    let (s, _) = d.get("short.hatch.local").await;
    assert_eq!(s, 200);
    assert_eq!(d.fake.boots.load(SeqCst), boots + 1);
}

#[tokio::test]
async fn a_snapshot_closes_websockets_with_1001_and_ends_streams_cleanly() {
    let d = FakeDaemon::start(&[]).await;
    let (vm, mut ws) = vm_with_websocket(&d).await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));

    let sse = sse_backend(100, Duration::from_millis(100)).await;
    let vm2 = d.create_vm().await;
    d.wait_state(&vm2, "running").await;
    d.fake.set(|b| b.backend = Some(sse));
    d.route(&vm2, "events", true).await;
    let proxy = d.proxy;
    let stream = tokio::spawn(async move {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: events.hatch.local\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let r = s.read_to_string(&mut out).await;
        (r.is_ok(), out)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (s, _) = d.call("POST", &format!("/vms/{vm}/snapshot"), None).await;
    assert_eq!(s, 201);
    let close = tokio::time::timeout(Duration::from_secs(3), ws.next())
        .await
        .unwrap();
    match close {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected a close frame 1001, got {other:?}"),
    }
    let (s, _) = d.call("POST", &format!("/vms/{vm2}/snapshot"), None).await;
    assert_eq!(s, 201);
    let (clean, out) = tokio::time::timeout(Duration::from_secs(3), stream)
        .await
        .unwrap()
        .unwrap();
    assert!(clean, "the stream ended cleanly");
    assert!(
        out.ends_with("0\r\n\r\n"),
        "a complete chunked stream: {out:?}"
    );
    let (_, events) = d.call("GET", &format!("/vms/{vm}/events"), None).await;
    assert_eq!(events[0]["detail"]["closed_connections"], 1, "{events}");
}

#[tokio::test]
async fn requests_during_a_snapshot_are_answered_not_failed() {
    let d = FakeDaemon::start(&[]).await;
    let vm = vm_with_route(&d, json!({})).await;
    d.fake.set(|b| b.snapshot_delay = Duration::from_secs(1));
    let snap = {
        let http = d.http.clone();
        let url = format!("{}/vms/{vm}/snapshot", d.api);
        let key = d.key.clone();
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(state(&d, &vm).await, "stopping");
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(common::proxy_get(d.proxy, "myapp.hatch.local")))
        .collect();
    for t in tasks {
        let (s, body) = t.await.unwrap();
        assert_eq!(s, 200, "{body}");
        assert!(body.contains(&vm));
    }
    assert_eq!(snap.await.unwrap(), 201);
    assert_eq!(
        d.fake.restores.load(SeqCst),
        1,
        "woken once after the snapshot"
    );
    assert_eq!(state(&d, &vm).await, "running");
}

#[tokio::test]
async fn last_activity_survives_a_restart_and_events_have_durations() {
    let mut d = FakeDaemon::start(&[("HATCH_IDLE_CHECK_INTERVAL", "100ms")]).await;
    let vm = vm_with_route(&d, json!({})).await;
    let (s, _) = d.get("myapp.hatch.local").await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(400)).await; // a reaper pass stores it
    let (_, before) = d.call("GET", &format!("/vms/{vm}"), None).await;
    let at = before["last_activity_at"].as_str().unwrap().to_string();
    d.restart().await;
    let (_, after) = d.call("GET", &format!("/vms/{vm}"), None).await;
    let persisted =
        chrono::DateTime::parse_from_rfc3339(after["last_activity_at"].as_str().unwrap()).unwrap();
    let original = chrono::DateTime::parse_from_rfc3339(&at).unwrap();
    assert!(
        (persisted - original).num_milliseconds().abs() < 5,
        "{at} vs {persisted}"
    );
    let (_, events) = d.call("GET", &format!("/vms/{vm}/events"), None).await;
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["snapshot", "boot"], "newest first: {events}");
    assert_eq!(events[0]["detail"]["trigger"], "shutdown");
    assert!(events[0]["detail"]["pause_write_ms"].is_u64());
    assert!(events[0]["detail"]["upload_ms"].is_u64());
    assert!(events[0]["detail"]["stored_bytes"].is_u64());
    assert!(events[1]["detail"]["total_ms"].is_u64());
}
