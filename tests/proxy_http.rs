#![allow(clippy::unwrap_used)]
//! The proxy speaks HTTP like a production reverse proxy: forwarding headers
//! (P1, P2), streaming (P3), WebSockets (P4, W8), framing safety, HTTP/2 from
//! clients, Expect: 100-continue and the per-VM hold cap (W7). The behaviour
//! does not depend on the guest, so the fake driver forwards to loopback
//! backends written here.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use common::backends::{echo_head_backend, sse_backend, ws_backend};
use common::{raw, FakeDaemon};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

async fn daemon_with_backend(extra: &[(&str, &str)], backend: SocketAddr) -> (FakeDaemon, String) {
    let d = FakeDaemon::start(extra).await;
    d.fake.set(|b| b.backend = Some(backend));
    let vm = d.create_vm().await;
    d.wait_state(&vm, "running").await;
    d.route(&vm, "myapp", true).await;
    (d, vm)
}

async fn snapshot(d: &FakeDaemon, vm: &str) {
    let (s, v) = d.call("POST", &format!("/vms/{vm}/snapshot"), None).await;
    assert_eq!(s, 201, "{v}");
}

fn header_lines<'a>(body: &'a str, name: &str) -> Vec<&'a str> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}:")))
        .collect()
}

#[tokio::test]
async fn p1_forwarding_headers() {
    let (backend, _) = echo_head_backend().await;
    let (d, _) = daemon_with_backend(&[], backend).await;
    let (s, body) = raw(
        d.proxy,
        "GET /x HTTP/1.1\r\nHost: myapp.hatch.local:9090\r\nX-Forwarded-For: 1.2.3.4\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        header_lines(&body, "x-forwarded-for"),
        ["x-forwarded-for: 1.2.3.4, 127.0.0.1"]
    );
    assert_eq!(
        header_lines(&body, "x-forwarded-host"),
        ["x-forwarded-host: myapp.hatch.local:9090"]
    );
    assert_eq!(
        header_lines(&body, "x-forwarded-proto"),
        ["x-forwarded-proto: http"]
    );
    assert_eq!(
        header_lines(&body, "host"),
        ["host: myapp.hatch.local:9090"],
        "original Host kept"
    );
    let (_, body) = raw(
        d.proxy,
        "GET / HTTP/1.1\r\nHost: myapp.hatch.local:9090\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        header_lines(&body, "x-forwarded-for"),
        ["x-forwarded-for: 127.0.0.1"]
    );
    // Two incoming X-Forwarded-For headers become one list.
    let (_, body) = raw(
        d.proxy,
        "GET / HTTP/1.1\r\nHost: myapp.hatch.local\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        header_lines(&body, "x-forwarded-for"),
        ["x-forwarded-for: 1.1.1.1, 2.2.2.2, 127.0.0.1"]
    );
}

#[tokio::test]
async fn incoming_forwarding_headers_are_dropped_from_untrusted_peers() {
    let (backend, _) = echo_head_backend().await;
    let (d, _) = daemon_with_backend(
        &[("HATCH_PROXY_TRUSTED_PROXIES", "10.9.9.9, 192.168.0.0/16")],
        backend,
    )
    .await;
    let (_, body) = raw(
        d.proxy,
        "GET / HTTP/1.1\r\nHost: myapp.hatch.local\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        header_lines(&body, "x-forwarded-for"),
        ["x-forwarded-for: 127.0.0.1"]
    );
    assert_eq!(
        header_lines(&body, "x-forwarded-proto"),
        ["x-forwarded-proto: http"]
    );
    assert_eq!(
        header_lines(&body, "x-forwarded-host"),
        ["x-forwarded-host: myapp.hatch.local"]
    );
    // Loopback listed as trusted: kept.
    let (backend, _) = echo_head_backend().await;
    let (d, _) =
        daemon_with_backend(&[("HATCH_PROXY_TRUSTED_PROXIES", "127.0.0.1")], backend).await;
    let (_, body) = raw(
        d.proxy,
        "GET / HTTP/1.1\r\nHost: myapp.hatch.local\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        header_lines(&body, "x-forwarded-for"),
        ["x-forwarded-for: 1.2.3.4, 127.0.0.1"]
    );
    assert_eq!(
        header_lines(&body, "x-forwarded-proto"),
        ["x-forwarded-proto: https"]
    );
}

#[tokio::test]
async fn p2_hop_by_hop_headers_do_not_reach_the_guest() {
    let (backend, _) = echo_head_backend().await;
    let (d, _) = daemon_with_backend(&[("HATCH_PROXY_IDLE_TIMEOUT", "1s")], backend).await;
    let (s, body) = raw(
        d.proxy,
        "GET / HTTP/1.1\r\nHost: myapp.hatch.local\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nX-Kept: yes\r\n\r\n",
    )
    .await; // keep-alive was asked for: the proxy closes it when idle (1 s)
    assert_eq!(s, 200, "{body}");
    for h in ["x-hop", "keep-alive", "proxy-connection"] {
        assert!(
            header_lines(&body, h).is_empty(),
            "{h} reached the backend: {body}"
        );
    }
    assert!(!body.contains("connection: keep-alive, x-hop"), "{body}");
    assert_eq!(header_lines(&body, "x-kept"), ["x-kept: yes"]);

    // A WebSocket upgrade still carries Connection: upgrade and Upgrade: websocket.
    let (ws_addr, seen, _) = ws_backend().await;
    d.fake.set(|b| b.backend = Some(ws_addr));
    let vm2 = d.create_vm().await;
    d.wait_state(&vm2, "running").await;
    d.route(&vm2, "ws", true).await;
    let (mut ws, _) = ws_connect(d.proxy, "ws.hatch.local", &[("X-Hop", "1")]).await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|h| h.eq_ignore_ascii_case("connection: upgrade")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|h| h.eq_ignore_ascii_case("upgrade: websocket")),
        "{seen:?}"
    );
}

async fn ws_connect(
    proxy: SocketAddr,
    host: &str,
    extra: &[(&str, &str)],
) -> (
    tokio_tungstenite::WebSocketStream<TcpStream>,
    tokio_tungstenite::tungstenite::handshake::client::Response,
) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{host}/socket").into_client_request().unwrap();
    for (k, v) in extra {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let sock = TcpStream::connect(proxy).await.unwrap();
    tokio_tungstenite::client_async(req, sock).await.unwrap()
}

async fn first_event_latency(proxy: SocketAddr) -> (Duration, Duration, usize) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let t0 = Instant::now();
    s.write_all(b"GET /events HTTP/1.1\r\nHost: myapp.hatch.local\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let mut seen = String::new();
    let mut first = None;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        if first.is_none() && seen.contains("data: event 0") {
            first = Some(t0.elapsed());
        }
    }
    (
        first.unwrap(),
        t0.elapsed(),
        seen.matches("data: event").count(),
    )
}

#[tokio::test]
async fn p3_server_sent_events_are_not_buffered() {
    let backend = sse_backend(10, Duration::from_millis(200)).await;
    let (d, vm) = daemon_with_backend(&[], backend).await;
    let (first, total, events) = first_event_latency(d.proxy).await;
    assert_eq!(events, 10);
    assert!(total >= Duration::from_millis(1800), "{total:?}");
    assert!(
        first < total / 2,
        "first event after {first:?} of {total:?}"
    );
    // Right after a wake too.
    snapshot(&d, &vm).await;
    let (first, total, events) = first_event_latency(d.proxy).await;
    assert_eq!(events, 10);
    assert!(
        first < total / 2,
        "after wake: first event after {first:?} of {total:?}"
    );
    assert_eq!(d.fake.restores.load(SeqCst), 1);
}

#[tokio::test]
async fn p4_websocket_echo_and_close_both_ways() {
    let (ws_addr, _, closes) = ws_backend().await;
    let (d, _) = daemon_with_backend(&[], ws_addr).await;
    let (mut ws, resp) = ws_connect(d.proxy, "myapp.hatch.local", &[]).await;
    assert_eq!(resp.status(), 101);
    for i in 0..200 {
        let m = if i % 2 == 0 {
            Message::text(format!("msg {i}"))
        } else {
            Message::binary(vec![i as u8; 1000])
        };
        ws.send(m.clone()).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), m);
    }
    // Client closes → the backend sees the close.
    ws.close(None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while closes.load(SeqCst) == 0 {
        assert!(Instant::now() < deadline, "backend never saw the close");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Backend closes → the client sees the close.
    let (mut ws, _) = ws_connect(d.proxy, "myapp.hatch.local", &[]).await;
    ws.send(Message::text("close-please")).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "client never saw the backend's close");
}

#[tokio::test]
async fn w8_websocket_to_a_cold_vm_wakes_it() {
    let (ws_addr, _, _) = ws_backend().await;
    let (d, vm) = daemon_with_backend(&[], ws_addr).await;
    snapshot(&d, &vm).await;
    d.fake.set(|b| b.restore_delay = Duration::from_millis(300));
    let (mut ws, resp) = ws_connect(d.proxy, "myapp.hatch.local", &[]).await;
    assert_eq!(resp.status(), 101);
    assert!(resp.headers().contains_key("sec-websocket-accept"));
    for i in 0..20 {
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text(format!("m{i}"))
        );
    }
    assert_eq!(d.fake.restores.load(SeqCst), 1);
    let (_, v) = d.call("GET", &format!("/vms/{vm}"), None).await;
    assert_eq!(v["state"], "running");
}

#[tokio::test]
async fn w7_hold_cap_gives_fast_503_with_retry_after() {
    let (backend, _) = echo_head_backend().await;
    let (d, vm) = daemon_with_backend(&[("HATCH_PROXY_MAX_WAKE_WAITERS", "10")], backend).await;
    // A second, running VM with the built-in guest.
    let other = d.create_vm().await;
    d.wait_state(&other, "running").await;
    d.route(&other, "other", true).await;
    snapshot(&d, &vm).await;
    d.fake.set(|b| b.restore_delay = Duration::from_secs(2));
    let proxy = d.proxy;
    let tasks: Vec<_> = (0..60)
        .map(|_| {
            tokio::spawn(async move {
                let t0 = Instant::now();
                let mut s = TcpStream::connect(proxy).await.unwrap();
                s.write_all(
                    b"GET / HTTP/1.1\r\nHost: myapp.hatch.local\r\nConnection: close\r\n\r\n",
                )
                .await
                .unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).await.unwrap();
                (out, t0.elapsed())
            })
        })
        .collect();
    // Meanwhile the other route answers normally.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let (s, _) = d.get("other.hatch.local").await;
    assert_eq!(s, 200);
    assert!(t0.elapsed() < Duration::from_secs(1));
    let (mut ok, mut busy) = (0, 0);
    for t in tasks {
        let (out, took) = t.await.unwrap();
        if out.starts_with("HTTP/1.1 200") {
            ok += 1;
        } else {
            assert!(out.starts_with("HTTP/1.1 503"), "{out}");
            assert!(out.to_ascii_lowercase().contains("retry-after: 1"), "{out}");
            assert!(
                took < Duration::from_secs(1),
                "a refused request was held {took:?}"
            );
            busy += 1;
        }
    }
    assert_eq!((ok, busy), (10, 50));
}

#[tokio::test]
async fn framing_attacks_are_refused_and_reach_no_guest() {
    let (backend, hits) = echo_head_backend().await;
    let (d, _) = daemon_with_backend(&[], backend).await;
    let attacks = [
        "POST / HTTP/1.1\r\nHost: myapp.hatch.local\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: myapp.hatch.local\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: myapp.hatch.local\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "POST / HTTP/1.1\r\nHost: myapp.hatch.local\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        "POST / HTTP/1.1\r\nHost: myapp.hatch.local\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    ];
    for a in attacks {
        let mut s = TcpStream::connect(d.proxy).await.unwrap();
        s.write_all(a.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        assert!(r.is_ok(), "connection not closed after {a:?}");
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 400"), "{a:?} → {out}");
        assert_eq!(
            out.matches("HTTP/1.1").count(),
            1,
            "only one response: {out}"
        );
    }
    assert_eq!(hits.load(SeqCst), 0, "nothing reached the guest");
    // Oversized headers → 431.
    let big = "x".repeat(100 * 1024);
    let (s, _) = raw(d.proxy, &format!("GET / HTTP/1.1\r\nHost: myapp.hatch.local\r\nX-Big: {big}\r\nConnection: close\r\n\r\n")).await;
    assert_eq!(s, 431);
    let (s, _) = d.get("myapp.hatch.local").await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn slow_and_idle_clients_are_cut_off() {
    let (backend, _) = echo_head_backend().await;
    let (d, _) = daemon_with_backend(
        &[
            ("HATCH_PROXY_HEADER_TIMEOUT", "2s"),
            ("HATCH_PROXY_IDLE_TIMEOUT", "4s"),
        ],
        backend,
    )
    .await;
    // Half a request head, then nothing: cut by the head timeout (2 s), not
    // left for the idle timeout (4 s).
    let mut s = TcpStream::connect(d.proxy).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: myapp").await.unwrap();
    let t0 = Instant::now();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "a slow client held the connection");
    assert!(
        t0.elapsed() < Duration::from_millis(3800),
        "cut after {:?}",
        t0.elapsed()
    );
    // An idle keep-alive connection after one request: kept past the head
    // timeout, closed at the idle timeout.
    let mut s = TcpStream::connect(d.proxy).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: myapp.hatch.local\r\n\r\n")
        .await
        .unwrap();
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "an idle keep-alive connection was never closed");
    assert!(
        t0.elapsed() > Duration::from_millis(3000),
        "closed after {:?}",
        t0.elapsed()
    );
    assert!(String::from_utf8_lossy(&out).contains("200 OK"));
}

#[tokio::test]
async fn expect_100_continue_for_running_and_sleeping_vms() {
    let (backend, _) = echo_head_backend().await;
    let (d, vm) = daemon_with_backend(&[], backend).await;
    for round in 0..2 {
        if round == 1 {
            snapshot(&d, &vm).await;
        }
        let mut s = TcpStream::connect(d.proxy).await.unwrap();
        s.write_all(b"POST /up HTTP/1.1\r\nHost: myapp.hatch.local\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let interim = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(
            interim.starts_with("HTTP/1.1 100 Continue"),
            "round {round}: {interim}"
        );
        s.write_all(b"hello").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let all = format!("{interim}{out}");
        assert!(all.contains("HTTP/1.1 200 OK"), "{all}");
        assert!(all.ends_with("|hello"), "{all}");
        assert!(
            !all.contains("expect:"),
            "Expect is handled by the proxy: {all}"
        );
    }
}

#[tokio::test]
async fn http2_prior_knowledge_clients_are_routed_by_authority() {
    use http_body_util::{BodyExt, Empty};
    let (backend, _) = echo_head_backend().await;
    let (d, _) = daemon_with_backend(&[], backend).await;
    let sock = TcpStream::connect(d.proxy).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(sock),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for uri in [
        "http://myapp.hatch.local/h2",
        "http://MYAPP.hatch.local:9090/h2",
    ] {
        let req = http::Request::get(uri)
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "{uri}");
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.starts_with("get /h2 http/1.1"),
            "HTTP/1.1 to the guest: {body}"
        );
        assert_eq!(header_lines(&body, "host").len(), 1, "{body}");
    }
    let req = http::Request::get("http://nothing.hatch.local/")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 404);
}

#[tokio::test]
async fn large_uploads_stream_through() {
    let (backend, _) = echo_head_backend().await;
    let (d, _) = daemon_with_backend(&[], backend).await;
    let payload = "y".repeat(8 * 1024 * 1024);
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("http://{}/big", d.proxy))
        .header("host", "myapp.hatch.local")
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    assert!(body.ends_with(&format!("|{payload}")));
}
