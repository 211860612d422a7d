//! Request-smuggling guard in front of hyper's HTTP/1 parser.
//!
//! hyper accepts a request carrying both `Content-Length` and
//! `Transfer-Encoding` (it drops the length, reads chunked and closes the
//! connection afterwards) and hands the service no sign of it. A proxy must
//! refuse such a request outright, so this reader sits between the socket and
//! hyper: it holds each request head until it is complete, checks its framing,
//! and follows the body's framing (length or chunks) to find the next head.
//! A bad head is replaced by a synthetic request carrying
//! [`FRAMING_ERROR_HEADER`], which the proxy answers with 400 and
//! `Connection: close`; nothing after it is read.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Set on the synthetic request that replaces a refused head.
pub const FRAMING_ERROR_HEADER: &str = "x-hatch-framing-error";

/// Heads longer than this are passed to hyper as they are (it answers 431).
const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    /// `n` body bytes left.
    Body(u64),
    /// Inside a chunk-size line.
    ChunkSize,
    /// `n` chunk bytes left, then CRLF.
    ChunkData(u64),
    ChunkCrlf,
    /// Trailer lines after the last chunk, until an empty line.
    Trailers,
    /// Not HTTP/1 any more (HTTP/2, an upgrade) or beyond our checks: hyper decides.
    Passthrough,
}

/// Wraps a client connection; see the module doc.
pub struct FramingGuard<S> {
    inner: S,
    state: State,
    /// Bytes of the head (or chunk line) being collected.
    held: Vec<u8>,
    /// Checked bytes ready for hyper.
    out: Vec<u8>,
    out_pos: usize,
    /// After `out` is drained, report end of stream.
    eof_after_out: bool,
    /// After `out` (a synthetic refused request) is drained, never yield more:
    /// hyper answers it with `Connection: close` and ends the connection. (An
    /// end of stream instead would make hyper drop the connection unanswered.)
    stall_after_out: bool,
    first_bytes: bool,
    /// Time allowed for a request head once its first byte arrived.
    head_timeout: Option<Duration>,
    head_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> FramingGuard<S> {
    /// `head_timeout`: a request head must be complete this long after its first
    /// byte (slow clients), independently of how long a keep-alive connection
    /// may sit idle between requests.
    pub fn with_head_timeout(inner: S, head_timeout: Duration) -> Self {
        FramingGuard {
            head_timeout: Some(head_timeout),
            ..FramingGuard::new(inner)
        }
    }

    pub fn new(inner: S) -> Self {
        FramingGuard {
            inner,
            state: State::Head,
            held: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            eof_after_out: false,
            stall_after_out: false,
            first_bytes: true,
            head_timeout: None,
            head_deadline: None,
        }
    }

    fn refuse(&mut self, reason: &str) {
        self.held.clear();
        self.out.extend_from_slice(
            format!(
                "GET / HTTP/1.1\r\n{FRAMING_ERROR_HEADER}: {reason}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        self.stall_after_out = true;
        self.state = State::Passthrough;
    }

    /// Runs newly read bytes through the state machine.
    fn feed(&mut self, mut data: &[u8]) {
        if self.first_bytes {
            self.first_bytes = false;
            if data.starts_with(b"PRI * HTTP/2.0") {
                self.state = State::Passthrough;
            }
        }
        while !data.is_empty() && !self.stall_after_out {
            match self.state {
                State::Passthrough => {
                    self.out.extend_from_slice(data);
                    return;
                }
                State::Body(n) => {
                    let left;
                    (data, left) = self.pass_counted(data, n);
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Body(left)
                    };
                }
                State::ChunkData(n) => {
                    let left;
                    (data, left) = self.pass_counted(data, n);
                    self.state = if left == 0 {
                        State::ChunkCrlf
                    } else {
                        State::ChunkData(left)
                    };
                }
                State::Head | State::ChunkSize | State::ChunkCrlf | State::Trailers => {
                    // Line-oriented states: collect up to the next LF.
                    let (line_part, rest, complete) = match data.iter().position(|b| *b == b'\n') {
                        Some(i) => (&data[..=i], &data[i + 1..], true),
                        None => (data, &data[data.len()..], false),
                    };
                    self.held.extend_from_slice(line_part);
                    data = rest;
                    if self.held.len() > MAX_HEAD {
                        self.release_held();
                        self.state = State::Passthrough;
                        continue;
                    }
                    if complete {
                        self.on_line();
                    }
                }
            }
        }
    }

    /// Passes up to `n` counted bytes (a body or a chunk) on; returns the rest
    /// of `data` and how many counted bytes are still to come.
    fn pass_counted<'a>(&mut self, data: &'a [u8], n: u64) -> (&'a [u8], u64) {
        let take = n.min(data.len() as u64) as usize;
        self.out.extend_from_slice(&data[..take]);
        (&data[take..], n - take as u64)
    }

    fn release_held(&mut self) {
        self.out.append(&mut self.held);
    }

    /// `held` ends with LF.
    fn on_line(&mut self) {
        match self.state {
            State::Head => {
                // A head ends with an empty line (hyper skips empty lines before one).
                let only_blank = self.held.iter().all(|b| *b == b'\r' || *b == b'\n');
                if only_blank {
                    self.release_held();
                    return;
                }
                if self.held.ends_with(b"\n\r\n") || self.held.ends_with(b"\n\n") {
                    self.on_head();
                }
            }
            State::ChunkSize => {
                let line = String::from_utf8_lossy(&self.held).to_string();
                self.release_held();
                let size = line.split(';').next().map(str::trim).unwrap_or("");
                match u64::from_str_radix(size, 16) {
                    Ok(0) => self.state = State::Trailers,
                    Ok(n) => self.state = State::ChunkData(n),
                    Err(_) => self.state = State::Passthrough, // hyper rejects it
                }
            }
            State::ChunkCrlf => {
                self.release_held();
                self.state = State::ChunkSize;
            }
            State::Trailers => {
                let blank = self.held.iter().all(|b| *b == b'\r' || *b == b'\n');
                self.release_held();
                if blank {
                    self.state = State::Head;
                }
            }
            _ => self.release_held(),
        }
    }

    fn on_head(&mut self) {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        let parsed = req.parse(&self.held);
        if !matches!(parsed, Ok(httparse::Status::Complete(_))) {
            // Malformed or too many headers: hyper answers it.
            self.release_held();
            self.state = State::Passthrough;
            return;
        }
        let mut lengths = Vec::new();
        let mut te: Vec<String> = Vec::new();
        let mut upgrade = req.method == Some("CONNECT");
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths.push(String::from_utf8_lossy(h.value).trim().to_string());
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te.push(String::from_utf8_lossy(h.value).trim().to_ascii_lowercase());
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if !te.is_empty() && !lengths.is_empty() {
            return self.refuse("both Content-Length and Transfer-Encoding");
        }
        if lengths.windows(2).any(|w| w[0] != w[1]) {
            return self.refuse("conflicting Content-Length headers");
        }
        let chunked = te
            .last()
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|last| last.trim() == "chunked");
        if !te.is_empty() && !chunked {
            return self.refuse("unsupported Transfer-Encoding");
        }
        self.release_held();
        if upgrade {
            // After a 101 the bytes are not HTTP; hyper's own checks still apply.
            self.state = State::Passthrough;
        } else if chunked {
            self.state = State::ChunkSize;
        } else if let Some(n) = lengths.first().and_then(|v| v.parse::<u64>().ok()) {
            self.state = if n == 0 { State::Head } else { State::Body(n) };
        } else if !lengths.is_empty() {
            self.state = State::Passthrough; // invalid length: hyper answers 400
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FramingGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.stall_after_out {
                return Poll::Pending;
            }
            if this.eof_after_out {
                return Poll::Ready(Ok(()));
            }
            // Read straight into hyper's buffer. When the state machine passes
            // every new byte on unchanged (the usual case), they stay there;
            // otherwise they are taken back and served from `out`.
            let start = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Pending => {
                    // A head has started and is not complete: it has a deadline.
                    let in_head = this.state == State::Head && !this.held.is_empty();
                    match (in_head, this.head_timeout) {
                        (true, Some(t)) => {
                            let deadline = this
                                .head_deadline
                                .get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
                            if deadline.as_mut().poll(cx).is_ready() {
                                return Poll::Ready(Err(io::Error::new(
                                    io::ErrorKind::TimedOut,
                                    "request head not complete in time",
                                )));
                            }
                        }
                        _ => this.head_deadline = None,
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let new = &buf.filled()[start..];
                    if new.is_empty() {
                        // End of stream: whatever is held goes to hyper as is.
                        this.release_held();
                        this.eof_after_out = true;
                        continue;
                    }
                    if this.state == State::Passthrough {
                        return Poll::Ready(Ok(()));
                    }
                    let unchanged = this.held.is_empty();
                    let len = new.len();
                    this.feed(new);
                    if unchanged
                        && !this.stall_after_out
                        && this.held.is_empty()
                        && this.out.len() == len
                    {
                        // `out` is a copy of the new bytes: they are already in `buf`.
                        this.out.clear();
                        return Poll::Ready(Ok(()));
                    }
                    buf.set_filled(start);
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FramingGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8], split: usize) -> String {
        let mut g = FramingGuard::new(());
        for part in input.chunks(split.max(1)) {
            g.feed(part);
        }
        g.release_held();
        String::from_utf8_lossy(&g.out).to_string()
    }

    #[test]
    fn good_pipelined_requests_pass_unchanged_whatever_the_split() {
        let input = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloPOST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nworld\r\n0\r\nX-T: 1\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        for split in [1, 2, 3, 7, 64, 4096] {
            assert_eq!(
                run(input, split),
                String::from_utf8_lossy(input),
                "split {split}"
            );
        }
    }

    #[test]
    fn a_body_that_looks_like_a_bad_head_is_not_refused() {
        let body = "GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let input = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(run(input.as_bytes(), 5), input);
    }

    #[test]
    fn smuggling_heads_are_replaced() {
        for (input, why) in [
            (&b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /s HTTP/1.1\r\n\r\n"[..], "both"),
            (&b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"[..], "both"),
            (&b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"[..], "conflicting"),
            (&b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nabc"[..], "unsupported"),
            (&b"GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"[..], "both"),
        ] {
            let out = run(input, 3);
            assert!(out.contains(FRAMING_ERROR_HEADER), "{out}");
            assert!(out.contains(why), "{out}");
            assert!(!out.contains("/s HTTP"), "nothing after the bad head: {out}");
        }
    }

    #[test]
    fn http2_preface_passes_through() {
        let input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04";
        assert_eq!(run(input, 4096).as_bytes(), input);
    }
}
