//! Many idle keep-alive client connections, for `bench/scale`.
//!
//! ```text
//! bench_conns --addr 127.0.0.1:9090 --host r0.hatch.local --conns 10000 [--parallel 256] [--hold-secs 8]
//! ```
//!
//! Opens `--conns` connections (at most `--parallel` being set up at once), sends
//! one keep-alive `GET /` on each and reads the whole response, then keeps every
//! connection open and idle. Prints on stdout:
//!
//! - `ready ok=N failed=F alive=A setup_ms=T span_ms=S` once all are set up
//!   (`alive`: not closed by the server at that moment; `span_ms`: between the
//!   first and the last response), then
//! - `after_hold alive=A held_ms=H` after `--hold-secs` (shows the server's idle
//!   keep-alive timeout), and exits.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Args {
    addr: SocketAddr,
    host: String,
    conns: usize,
    parallel: usize,
    hold_secs: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let (mut addr, mut host) = (None, "r0.hatch.local".to_string());
    let (mut conns, mut parallel, mut hold_secs) = (10_000usize, 256usize, 8u64);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--addr" => addr = Some(val()?.parse().context("--addr")?),
            "--host" => host = val()?,
            "--conns" => conns = val()?.parse().context("--conns")?,
            "--parallel" => parallel = val()?.parse().context("--parallel")?,
            "--hold-secs" => hold_secs = val()?.parse().context("--hold-secs")?,
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(Args {
        addr: addr.context("--addr is required")?,
        host,
        conns,
        parallel: parallel.max(1),
        hold_secs,
    })
}

/// One request on a fresh connection; returns the open connection after the
/// whole response (Content-Length framed) was read.
async fn one(addr: SocketAddr, req: &[u8]) -> anyhow::Result<(TcpStream, Instant)> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(req).await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed before the response ended");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                bail!("status: {}", head.lines().next().unwrap_or(""));
            }
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .context("no content-length")?;
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    bail!("closed in the body");
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok((s, Instant::now()));
        }
    }
}

/// Connections the server has not closed (a non-blocking read that would block).
fn alive(conns: &[TcpStream]) -> usize {
    let mut buf = [0u8; 1];
    conns
        .iter()
        .filter(|c| matches!(c.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock))
        .count()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let req = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", args.host).into_bytes();
    let start = Instant::now();
    let results: Vec<_> = futures::stream::iter(0..args.conns)
        .map(|_| one(args.addr, &req))
        .buffer_unordered(args.parallel)
        .collect()
        .await;
    let setup_ms = start.elapsed().as_millis();
    let mut conns = Vec::with_capacity(results.len());
    let (mut first, mut last, mut failed, mut first_err) =
        (None::<Instant>, None::<Instant>, 0, None);
    for r in results {
        match r {
            Ok((s, t)) => {
                first = Some(first.map_or(t, |f| f.min(t)));
                last = Some(last.map_or(t, |l| l.max(t)));
                conns.push(s);
            }
            Err(e) => {
                failed += 1;
                first_err.get_or_insert(e.to_string());
            }
        }
    }
    if let Some(e) = first_err {
        eprintln!("bench_conns: {failed} failed, first error: {e}");
    }
    let span_ms = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_millis(),
        _ => 0,
    };
    let ready_at = Instant::now();
    println!(
        "ready ok={} failed={failed} alive={} setup_ms={setup_ms} span_ms={span_ms}",
        conns.len(),
        alive(&conns)
    );
    std::io::Write::flush(&mut std::io::stdout())?;
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    println!(
        "after_hold alive={} held_ms={}",
        alive(&conns),
        ready_at.elapsed().as_millis()
    );
    Ok(())
}
