//! hatch-guest-httpd: the default page server of the Hatch guest image.
//!
//!     hatch-guest-httpd <port> <file>
//!
//! Answers every request (any method, any path) with `200 OK`,
//! `Content-Type: text/plain` and the contents of <file> (read once at start;
//! no body for HEAD). HTTP/1.1 keep-alive is supported: each request's head is
//! read, a `Content-Length` or chunked body is read and discarded, and the
//! connection stays open until the client sends `Connection: close`, speaks
//! HTTP/1.0 without `Connection: keep-alive`, or is idle for 60 s.
//!
//! Why not busybox httpd: it listens with a backlog of 9, and under QEMU
//! user-mode networking a burst of 20+ concurrent connections loses some of them
//! (clients hang until busybox's 408). std's listener uses a much larger backlog
//! and every connection gets its own thread.
//!
//! Prints nothing once listening; errors go to stderr.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// Idle time after which a (keep-alive) connection is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest accepted request head (request line + headers).
const MAX_HEAD: usize = 64 * 1024;
/// Stack of a connection thread (the guest has little memory).
const THREAD_STACK: usize = 128 * 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: hatch-guest-httpd <port> <file>");
        std::process::exit(2);
    }
    let port: u16 = match args[1].parse() {
        Ok(p) => p,
        Err(_) => {
            eprintln!("hatch-guest-httpd: bad port {:?}", args[1]);
            std::process::exit(2);
        }
    };
    let body: Arc<[u8]> = match std::fs::read(&args[2]) {
        Ok(b) => b.into(),
        Err(e) => {
            eprintln!("hatch-guest-httpd: cannot read {}: {e}", args[2]);
            std::process::exit(1);
        }
    };
    let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hatch-guest-httpd: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let body = Arc::clone(&body);
                // If no thread can be spawned the stream is dropped (closed).
                let _ = std::thread::Builder::new()
                    .stack_size(THREAD_STACK)
                    .spawn(move || {
                        let _ = serve_stream(stream, &body);
                    });
            }
            // EMFILE, ECONNABORTED, ...: back off a little and keep going.
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn serve_stream(stream: TcpStream, body: &[u8]) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
    let _ = stream.set_nodelay(true);
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(8 * 1024, stream);
    serve(&mut reader, &mut writer, body)
}

/// Serves requests from `r` until the connection is to be closed.
fn serve<R: BufRead, W: Write>(r: &mut R, w: &mut W, body: &[u8]) -> io::Result<()> {
    loop {
        let req = match read_head(r) {
            Ok(Some(req)) => req,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let _ = w.write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                let _ = w.flush();
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if req.expect_continue && req.http11 && (req.chunked || req.content_length > 0) {
            w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            w.flush()?;
        }
        if req.chunked {
            discard_chunked(r)?;
        } else if req.content_length > 0 {
            let n = io::copy(&mut r.take(req.content_length), &mut io::sink())?;
            if n < req.content_length {
                return Ok(()); // EOF in the body
            }
        }
        let mut out = Vec::with_capacity(160 + body.len());
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n",
            body.len()
        )?;
        if !req.keep_alive {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if !req.http11 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !req.head {
            out.extend_from_slice(body);
        }
        w.write_all(&out)?;
        w.flush()?;
        if !req.keep_alive {
            return Ok(());
        }
    }
}

#[derive(Debug, Default, PartialEq)]
struct Request {
    head: bool,
    http11: bool,
    keep_alive: bool,
    content_length: u64,
    chunked: bool,
    expect_continue: bool,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Reads one line (up to and including `\n`, at most `limit` bytes).
/// Returns it without the line ending; `None` at EOF before any byte.
fn read_line<R: BufRead>(r: &mut R, limit: &mut usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = r.take(*limit as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if n > *limit {
        return Err(bad("request head too large"));
    }
    *limit -= n;
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "EOF in the request head",
        ));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

/// Reads a request line and headers. `Ok(None)`: the client closed the
/// connection between requests.
fn read_head<R: BufRead>(r: &mut R) -> io::Result<Option<Request>> {
    let mut limit = MAX_HEAD;
    // Empty lines before a request line are ignored (RFC 9112 §2.2).
    let line = loop {
        match read_line(r, &mut limit)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue,
            Some(l) => break l,
        }
    };
    let line = String::from_utf8(line).map_err(|_| bad("request line is not UTF-8"))?;
    let mut parts = line.split_ascii_whitespace();
    let (method, _target, version) = match (parts.next(), parts.next(), parts.next(), parts.next())
    {
        (Some(m), Some(t), Some(v), None) => (m, t, v),
        _ => return Err(bad("malformed request line")),
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(bad("unsupported HTTP version")),
    };
    let mut req = Request {
        head: method == "HEAD",
        http11,
        ..Request::default()
    };
    let (mut close, mut keep_alive, mut content_length) = (false, false, None::<u64>);
    loop {
        let Some(h) = read_line(r, &mut limit)? else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF in the request head",
            ));
        };
        if h.is_empty() {
            break;
        }
        let h = String::from_utf8_lossy(&h);
        let Some((name, value)) = h.split_once(':') else {
            return Err(bad("malformed header"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value.parse().map_err(|_| bad("bad Content-Length"))?;
            if content_length.is_some_and(|c| c != n) {
                return Err(bad("conflicting Content-Length"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value.rsplit(',').next().unwrap_or("").trim();
            if !last.eq_ignore_ascii_case("chunked") {
                return Err(bad("unsupported Transfer-Encoding"));
            }
            req.chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for t in value.split(',').map(str::trim) {
                close |= t.eq_ignore_ascii_case("close");
                keep_alive |= t.eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            req.expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    if req.chunked && content_length.is_some() {
        return Err(bad("both Content-Length and Transfer-Encoding"));
    }
    req.content_length = content_length.unwrap_or(0);
    req.keep_alive = !close && (http11 || keep_alive);
    Ok(Some(req))
}

/// Reads and discards a chunked body, including its trailer section.
fn discard_chunked<R: BufRead>(r: &mut R) -> io::Result<()> {
    let eof = || io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in a chunked body");
    loop {
        let mut limit = MAX_HEAD;
        let line = read_line(r, &mut limit)?.ok_or_else(eof)?;
        let line = String::from_utf8_lossy(&line);
        let size = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size, 16).map_err(|_| bad("bad chunk size"))?;
        if size == 0 {
            break;
        }
        // The chunk and its CRLF.
        let n = io::copy(&mut r.take(size), &mut io::sink())?;
        if n < size || read_line(r, &mut limit)?.is_none() {
            return Err(eof());
        }
    }
    let mut limit = MAX_HEAD;
    loop {
        match read_line(r, &mut limit)? {
            None => return Err(eof()),
            Some(l) if l.is_empty() => return Ok(()),
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn run(input: &str) -> String {
        let mut r = Cursor::new(input.as_bytes().to_vec());
        let mut out = Vec::new();
        serve(&mut r, &mut out, b"hatch guest x\n").unwrap();
        String::from_utf8(out).unwrap()
    }

    const OK: &str =
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n\r\nhatch guest x\n";

    #[test]
    fn keep_alive_serves_pipelined_requests_and_skips_bodies() {
        let out = run(concat!(
            "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "PUT /y HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n0\r\nT: 1\r\n\r\n",
            "GET /z HTTP/1.1\r\n\r\n",
        ));
        assert_eq!(out, OK.repeat(4));
    }

    #[test]
    fn head_close_and_http10() {
        let out = run("HEAD / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n\r\n\
             HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 14\r\nConnection: close\r\n\r\nhatch guest x\n"
        );
        let out = run("GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\n\r\n");
        assert_eq!(out.matches("200 OK").count(), 1);
        assert!(out.contains("Connection: close\r\n"));
        let out = run("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\nGET / HTTP/1.0\r\n\r\n");
        assert_eq!(out.matches("200 OK").count(), 2);
        assert!(out.contains("Connection: keep-alive\r\n"));
    }

    #[test]
    fn garbage_gets_400_and_eof_mid_head_is_quiet() {
        assert!(run("NONSENSE\r\n\r\n").starts_with("HTTP/1.1 400 "));
        assert!(run("GET / HTTP/2.0\r\n\r\n").starts_with("HTTP/1.1 400 "));
        let mut r = Cursor::new(b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec());
        let mut out = Vec::new();
        assert!(serve(&mut r, &mut out, b"x").is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn listens_and_answers_over_tcp() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            serve_stream(s, b"hatch guest x\n").unwrap();
        });
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        t.join().unwrap();
        assert_eq!(got.matches("hatch guest x\n").count(), 2);
    }
}
