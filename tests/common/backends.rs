//! Loopback backends standing in for guest services in tests whose behaviour
//! does not depend on the guest.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// A backend that answers every request with its head (request line and headers,
/// lowercased names) as the body, then `|` and the body it received. Counts requests.
pub async fn echo_head_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let (sock, _) = l.accept().await.unwrap();
            let h = h.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(sock);
                loop {
                    let mut head = String::new();
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        head.push_str(&lower);
                    }
                    h.fetch_add(1, SeqCst);
                    let mut body = vec![0u8; len];
                    r.read_exact(&mut body).await.unwrap();
                    let out = format!("{head}|{}", String::from_utf8_lossy(&body));
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{out}",
                        out.len()
                    );
                    if r.get_mut().write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, hits)
}

/// A backend that streams `n` server-sent events, one every `every`.
pub async fn sse_backend(n: usize, every: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                for i in 0..n {
                    let ev = format!("data: event {i}\n\n");
                    let chunk = format!("{:x}\r\n{ev}\r\n", ev.len());
                    if sock.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(every).await;
                }
                let _ = sock.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    addr
}

/// A WebSocket echo backend that records the Connection/Upgrade headers it saw
/// and counts closes it received.
pub async fn ws_backend() -> (
    SocketAddr,
    Arc<std::sync::Mutex<Vec<String>>>,
    Arc<AtomicUsize>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let closes = Arc::new(AtomicUsize::new(0));
    let (s2, c2) = (seen.clone(), closes.clone());
    tokio::spawn(async move {
        loop {
            let (sock, _) = l.accept().await.unwrap();
            let (seen, closes) = (s2.clone(), c2.clone());
            tokio::spawn(async move {
                #[allow(clippy::result_large_err)]
                let cb = |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                          resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
                    let mut s = seen.lock().unwrap();
                    for (k, v) in req.headers() {
                        s.push(format!("{}: {}", k.as_str(), v.to_str().unwrap_or("")));
                    }
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(sock, cb).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    match msg {
                        Message::Text(t) if t.as_str() == "close-please" => {
                            let _ = ws.close(None).await;
                        }
                        Message::Text(_) | Message::Binary(_) => {
                            // A failed send ends the loop at the next read.
                            let _ = ws.send(msg).await;
                        }
                        Message::Close(_) => {
                            closes.fetch_add(1, SeqCst);
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, seen, closes)
}
