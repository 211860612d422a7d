//! The subdomain reverse proxy on `HATCH_PROXY_ADDR`.
//!
//! A request passes through named phases: `resolve_host` (Host → route, from the
//! manager's in-memory index), `ensure_awake` (the manager's single-flight wake),
//! `connect_upstream` (retrying refused connections while a just-woken guest's
//! service comes up, until the wake deadline), `upstream_request_filter`
//! (hop-by-hop headers out, forwarding headers in) and `response_filter`.
//! Errors are JSON `{"error": "..."}` bodies with a status that says whose fault
//! it was.

mod framing;
pub mod host;
mod ws_frames;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::manager::{ActivityGuard, Manager, RouteTarget, Upstream, UpstreamError};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub base_domain: String,
    pub wake_timeout: Duration,
    /// Largest request body held while a VM wakes (bigger → 413).
    pub max_wake_body: usize,
    /// Time allowed for a request's head to arrive. hyper starts this clock when
    /// it waits for a request, so it also closes idle keep-alive connections.
    pub header_read_timeout: Duration,
    /// Idle keep-alive connections (no request under way) are closed after this.
    pub idle_timeout: Duration,
    /// Peers whose incoming `X-Forwarded-*` headers are kept; empty = every peer.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Worker threads; 0 = one per CPU.
    pub workers: usize,
}

pub struct Proxy {
    mgr: Arc<Manager>,
    cfg: ProxyConfig,
    /// The daemon's runtime. Wakes, port forwards and store writes run there,
    /// so their QMP sockets, timers and tasks never belong to a proxy worker.
    main: tokio::runtime::Handle,
    /// Connection settings, built once (builders hold no runtime state).
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

/// The pool of keep-alive connections to guests, one per worker thread: a
/// request and the guest connection serving it are polled by the same thread.
type UpstreamClient = Client<HttpConnector, ProxyBody>;

/// A client connection handed from the acceptor to a worker.
type Accepted = (std::net::TcpStream, SocketAddr);

/// How long a worker lets its open connections finish after the listener closed.
const WORKER_DRAIN: Duration = Duration::from_secs(30);

impl Proxy {
    /// Must be called inside the daemon's runtime (see [`Proxy::main`]).
    pub fn new(mgr: Arc<Manager>, cfg: ProxyConfig) -> Arc<Proxy> {
        let main = tokio::runtime::Handle::current();
        let mut h1 = hyper::server::conn::http1::Builder::new();
        // hyper's clock runs from when it waits for a request: the keep-alive
        // idle limit. The head itself must then arrive within
        // `header_read_timeout` of its first byte (the framing guard's clock).
        h1.timer(TokioTimer::new())
            .header_read_timeout(cfg.idle_timeout)
            .max_buf_size(MAX_HEAD_BUF);
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)));
        Arc::new(Proxy {
            mgr,
            cfg,
            main,
            h1,
            h2,
        })
    }

    fn upstream_client() -> UpstreamClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .timer(TokioTimer::new())
            .build(connector)
    }

    /// Serves connections from `listener` until `shutdown` turns true.
    ///
    /// The proxy runs like nginx: `workers` threads (one per CPU by default),
    /// each a single-threaded event loop with its own guest connection pool, so
    /// a proxied request never hops between threads. This task accepts and
    /// hands connections out round-robin. On shutdown, idle keep-alive
    /// connections are closed and requests under way may finish.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: watch::Receiver<bool>) {
        let n = match self.cfg.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Accepted>();
            let (this, sd) = (self.clone(), shutdown.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("hatch-proxy-{i}"))
                .spawn(move || this.run_worker(rx, sd));
            match spawned {
                Ok(_) => workers.push(tx),
                Err(e) => warn!(error = %e, "could not start a proxy worker thread"),
            }
        }
        info!(workers = workers.len(), "proxy workers started");
        // Without any worker thread, serve on this runtime.
        let fallback = Self::upstream_client();
        let mut shutdown_rx = shutdown.clone();
        let mut next = 0usize;
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "proxy accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = async { let _ = shutdown_rx.wait_for(|v| *v).await; } => return,
            };
            let std_stream = match stream.into_std() {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "could not hand a connection to a worker");
                    continue;
                }
            };
            // Round-robin; a worker whose thread ended (its channel is closed)
            // is skipped.
            let mut item = Some((std_stream, peer));
            for _ in 0..workers.len() {
                next = (next + 1) % workers.len();
                if let Some(x) = item.take() {
                    match workers[next].send(x) {
                        Ok(()) => break,
                        Err(tokio::sync::mpsc::error::SendError(back)) => item = Some(back),
                    }
                }
            }
            if let Some((std_stream, peer)) = item {
                match tokio::net::TcpStream::from_std(std_stream) {
                    Ok(stream) => {
                        let (client, sd) = (fallback.clone(), shutdown.clone());
                        tokio::spawn(self.clone().serve_conn(client, stream, peer, sd));
                    }
                    Err(e) => debug!(error = %e, "could not register a client connection"),
                }
            }
        }
    }

    /// One worker thread: a single-threaded runtime serving the connections it
    /// is handed until the acceptor stops, then draining them.
    fn run_worker(
        self: Arc<Self>,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<Accepted>,
        shutdown: watch::Receiver<bool>,
    ) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                warn!(error = %e, "could not start a proxy worker runtime");
                return;
            }
        };
        rt.block_on(async move {
            let client = Self::upstream_client();
            let mut conns = tokio::task::JoinSet::new();
            while let Some((std_stream, peer)) = rx.recv().await {
                while conns.try_join_next().is_some() {}
                match tokio::net::TcpStream::from_std(std_stream) {
                    Ok(stream) => {
                        let this = self.clone();
                        conns.spawn(this.serve_conn(
                            client.clone(),
                            stream,
                            peer,
                            shutdown.clone(),
                        ));
                    }
                    Err(e) => debug!(error = %e, "could not register a client connection"),
                }
            }
            let drained = tokio::time::timeout(WORKER_DRAIN, async {
                while conns.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                debug!(
                    open = conns.len(),
                    "proxy worker ends with connections still open"
                );
            }
        });
    }

    /// Serves one client connection: HTTP/2 with prior knowledge or HTTP/1.1,
    /// told apart by the preface; a client that sends nothing is dropped.
    async fn serve_conn(
        self: Arc<Self>,
        client: UpstreamClient,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let _ = stream.set_nodelay(true);
        let header_timeout = self.cfg.header_read_timeout;
        let is_h2 = match tokio::time::timeout(header_timeout, sniff_h2(&stream)).await {
            Ok(Ok(v)) => v,
            _ => return,
        };
        let this = self.clone();
        let svc = service_fn(move |req| {
            let (this, client) = (this.clone(), client.clone());
            async move { Ok::<_, Infallible>(this.handle(&client, req, peer).await) }
        });
        let stop = async move {
            let _ = shutdown.wait_for(|v| *v).await;
        };
        let res = if is_h2 {
            let conn = self.h2.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn, stop);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = &mut stop => { conn.as_mut().graceful_shutdown(); conn.await }
            }
        } else {
            let io = TokioIo::new(framing::FramingGuard::with_head_timeout(
                stream,
                header_timeout,
            ));
            let conn = self.h1.serve_connection(io, svc).with_upgrades();
            tokio::pin!(conn, stop);
            tokio::select! {
                r = conn.as_mut() => r,
                _ = &mut stop => { conn.as_mut().graceful_shutdown(); conn.await }
            }
        };
        if let Err(e) = res {
            debug!(error = %e, "proxy connection ended with an error");
        }
    }

    /// Runs `fut` on the daemon's runtime; dropping the returned future (the
    /// client went away) cancels it.
    async fn on_main<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
        impl<T> Drop for AbortOnDrop<T> {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let mut task = AbortOnDrop(self.main.spawn(fut));
        (&mut task.0).await.ok()
    }

    async fn handle(
        &self,
        client: &UpstreamClient,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let started = tokio::time::Instant::now();
        if let Err(msg) = framing_check(req.headers()) {
            let mut resp = json_error(StatusCode::BAD_REQUEST, &msg);
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
        let (host, target) = match self.resolve_host(&req) {
            Ok(x) => x,
            Err((status, msg)) => return json_error(status, &msg),
        };
        // The VM is busy from here until the response's last byte (or, for an
        // upgrade, until the connection closes): the idle reaper leaves it alone.
        let activity = self.mgr.activity_guard(&target.vm_id);
        let deadline = started + self.cfg.wake_timeout;
        // A running VM whose port is forwarded: no await, nothing leaves this
        // thread. Anything else (a wake, a new port forward) runs on the main
        // runtime.
        let upstream = match self.mgr.ready_upstream(&target) {
            Some(u) => Ok(u),
            None => {
                let (mgr, t) = (self.mgr.clone(), target.clone());
                self.on_main(async move { mgr.upstream(&t, deadline).await })
                    .await
                    .unwrap_or_else(|| Err(UpstreamError::Internal("wake task failed".into())))
            }
        };
        let upstream = match upstream {
            Ok(u) => u,
            Err(e) => return upstream_error(&target, e),
        };
        // An Upgrade (WebSocket, …): relay the 101, then splice both directions.
        let upgrade = upgrade_protocol(req.headers());
        let websocket = upgrade
            .as_ref()
            .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"websocket"));
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let mut head = Request::from_parts(parts, ());
        self.upstream_request_filter(&mut head, &host, peer, upgrade);
        let mut tries = None;
        let resp = if upstream.woke {
            // The guest may not be listening yet: hold the body so the request can
            // be sent again while the service comes up.
            let body = match Limited::new(body, self.cfg.max_wake_body).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) => {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        return json_error(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "request body too large to hold while the vm wakes",
                        );
                    }
                    return json_error(StatusCode::BAD_REQUEST, "could not read request body");
                }
            };
            self.send_with_retry(client, &head, body, upstream, deadline)
                .await
                .map(|(resp, t)| {
                    tries = Some(t);
                    resp
                })
        } else {
            let req = into_upstream(head, upstream.addr, body.map_err(BoxError::from).boxed());
            client.request(req).await.map_err(|e| e.to_string())
        };
        match resp {
            Ok(mut resp) => {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client_upgrade) = client_upgrade {
                        let upstream_upgrade = hyper::upgrade::on(&mut resp);
                        tokio::spawn(splice(
                            client_upgrade,
                            upstream_upgrade,
                            activity,
                            websocket,
                        ));
                        let (parts, _) = resp.into_parts();
                        return Response::from_parts(parts, empty_body());
                    }
                }
                if let Some(tries) = tries {
                    let ms = started.elapsed().as_millis() as u64;
                    info!(vm_id = %target.vm_id, first_byte_ms = ms, attempts = tries.attempts, guest_ms = tries.last_ms, "request answered after wake");
                    let (mgr, vm_id) = (self.mgr.clone(), target.vm_id.clone());
                    self.main.spawn(async move {
                        mgr.first_byte_after_wake(&vm_id, ms, tries.attempts, tries.last_ms)
                            .await
                    });
                }
                response_filter(resp, activity)
            }
            Err(e) => {
                warn!(subdomain = %host, vm_id = %target.vm_id, error = %e, "upstream request failed");
                json_error(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "vm {} is not answering on port {}",
                        target.vm_id, target.port
                    ),
                )
            }
        }
    }

    /// Phase 1: Host → route.
    fn resolve_host<B>(
        &self,
        req: &Request<B>,
    ) -> Result<(String, RouteTarget), (StatusCode, String)> {
        let base = &self.cfg.base_domain;
        let mut hosts = req.headers().get_all(header::HOST).iter();
        let host = match (hosts.next(), hosts.next()) {
            (Some(_), Some(_)) => Err(host::HostError::Multiple),
            (Some(h), None) => h.to_str().map_err(|_| host::HostError::Malformed),
            (None, _) => req
                .uri()
                .authority()
                .map(|a| a.as_str())
                .ok_or(host::HostError::Missing),
        };
        let sub = host.and_then(|h| host::subdomain_of(h, base).map(|s| (h.to_string(), s)));
        let (host, sub) = match sub {
            Ok(x) => x,
            Err(e) => {
                let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
                return Err((status, e.message(base)));
            }
        };
        match self.mgr.lookup(&sub) {
            Some(t) => Ok((host, t)),
            None => Err((
                StatusCode::NOT_FOUND,
                format!("no route for subdomain {sub:?}"),
            )),
        }
    }

    /// Phase 4: what the guest sees. Hop-by-hop headers go (an upgrade's own
    /// `Connection: upgrade` / `Upgrade` are put back); `X-Forwarded-For` is
    /// appended to (one header), `X-Forwarded-Host` and `-Proto` are set. Incoming
    /// forwarding headers are kept only from trusted peers when a trust list is set.
    fn upstream_request_filter(
        &self,
        req: &mut Request<()>,
        host: &str,
        peer: SocketAddr,
        upgrade: Option<HeaderValue>,
    ) {
        let trusted = self.cfg.trusted_proxies.is_empty()
            || self
                .cfg
                .trusted_proxies
                .iter()
                .any(|n| n.contains(&peer.ip()));
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        headers.remove(header::EXPECT); // answered here, not by the guest
        let mut xff = String::new();
        if trusted {
            for v in headers.get_all(X_FORWARDED_FOR).iter() {
                let v = v.to_str().map(str::trim).unwrap_or("");
                if !v.is_empty() {
                    xff.push_str(v);
                    xff.push_str(", ");
                }
            }
        }
        use std::fmt::Write as _;
        let _ = write!(xff, "{}", peer.ip());
        headers.remove(X_FORWARDED_FOR);
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert(X_FORWARDED_FOR, v);
        }
        if let Ok(v) = HeaderValue::from_str(host) {
            if !(trusted && headers.contains_key("x-forwarded-host")) {
                headers.insert("x-forwarded-host", v.clone());
            }
            // HTTP/2 clients send :authority, not Host; the guest gets a Host.
            headers.entry(header::HOST).or_insert(v);
        }
        if !(trusted && headers.contains_key("x-forwarded-proto")) {
            headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        }
        if let Some(proto) = upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, proto);
        }
    }

    /// Phase 3 for a just-woken VM: a refused or reset connection means the
    /// guest's service is not listening yet (user-mode networking accepts on the
    /// host side, then closes when the guest refuses), so send again, polling
    /// fast, until the deadline.
    async fn send_with_retry(
        &self,
        client: &UpstreamClient,
        head: &Request<()>,
        body: Bytes,
        upstream: Upstream,
        deadline: tokio::time::Instant,
    ) -> Result<(Response<Incoming>, Tries), String> {
        let mut backoff = Duration::from_millis(2);
        let mut attempts = 0;
        loop {
            let req = build_upstream(
                head,
                upstream.addr,
                Full::new(body.clone()).map_err(BoxError::from).boxed(),
            );
            attempts += 1;
            let sent = tokio::time::Instant::now();
            match client.request(req).await {
                Ok(r) => {
                    let last_ms = sent.elapsed().as_secs_f64() * 1000.0;
                    return Ok((r, Tries { attempts, last_ms }));
                }
                Err(e) => {
                    let now = tokio::time::Instant::now();
                    if now + backoff >= deadline {
                        return Err(format!(
                            "guest port did not answer before the wake deadline: {e}"
                        ));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX_BACKOFF);
                }
            }
        }
    }
}

/// How a request that waited for a wake reached the guest.
#[derive(Debug, Clone, Copy)]
struct Tries {
    /// Requests sent until one was answered (1 = the guest answered the first).
    attempts: u32,
    /// The answered attempt, from sending to the response head: the guest's
    /// own time to answer once woken.
    last_ms: f64,
}

/// Refused connections to a just-woken guest are retried after 2, 4, 8, then
/// every 10 ms.
const RETRY_MAX_BACKOFF: Duration = Duration::from_millis(10);

/// Largest request head hyper buffers; beyond it the client gets 431.
const MAX_HEAD_BUF: usize = 64 * 1024;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// True when the connection starts with the HTTP/2 preface (prior knowledge).
async fn sniff_h2(stream: &tokio::net::TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; 24];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        // A prefix of the preface so far: wait for more.
        stream.readable().await?;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Headers that belong to one connection and are never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names instead of nine removals.
    if !headers
        .keys()
        .any(|k| k == header::UPGRADE || HOP_BY_HOP.contains(k))
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(n);
    }
    headers.remove(header::UPGRADE);
}

/// The request to send again and again while a guest wakes (a copy each time).
fn build_upstream(head: &Request<()>, addr: SocketAddr, body: ProxyBody) -> Request<ProxyBody> {
    let mut req = Request::new(body);
    *req.method_mut() = head.method().clone();
    *req.uri_mut() = upstream_uri(head.uri(), addr);
    *req.headers_mut() = head.headers().clone();
    req
}

/// The request to send once: the client's head moves to the guest.
fn into_upstream(head: Request<()>, addr: SocketAddr, body: ProxyBody) -> Request<ProxyBody> {
    let (mut parts, ()) = head.into_parts();
    parts.uri = upstream_uri(&parts.uri, addr);
    parts.version = http::Version::HTTP_11;
    parts.extensions = http::Extensions::new();
    Request::from_parts(parts, body)
}

fn upstream_uri(uri: &Uri, addr: SocketAddr) -> Uri {
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    format!("http://{addr}{pq}")
        .parse()
        .unwrap_or_else(|_| Uri::from_static("/"))
}

/// Phase 5: what the client sees.
/// The protocol asked for by an HTTP/1.1 upgrade request.
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if wants {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// The framing guard replaced a refused head with a request carrying this header.
fn framing_check(headers: &HeaderMap) -> Result<(), String> {
    match headers.get(framing::FRAMING_ERROR_HEADER) {
        Some(v) => Err(format!(
            "bad request framing: {}",
            v.to_str().unwrap_or("invalid")
        )),
        None => Ok(()),
    }
}

/// Relays bytes both ways between an upgraded client connection and the guest
/// until either side closes. When the VM is put to sleep meanwhile, a WebSocket
/// client gets a close frame (1001, going away) at a frame boundary, then FIN.
async fn splice(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    activity: ActivityGuard,
    websocket: bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(x) => x,
        Err(e) => {
            debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let (mut cr, mut cw) = tokio::io::split(TokioIo::new(client));
    let (mut ur, mut uw) = tokio::io::split(TokioIo::new(upstream));
    let closer = activity.closer();
    let client_to_guest = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = tokio::select! {
                r = cr.read(&mut buf) => r.unwrap_or(0),
                _ = closer.closing() => 0,
            };
            if n == 0 || uw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = uw.shutdown().await;
    };
    let guest_to_client = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut frames = ws_frames::Tracker::default();
        let mut closing = false;
        loop {
            let n = tokio::select! {
                r = ur.read(&mut buf) => r.unwrap_or(0),
                _ = closer.closing() => { closing = true; 0 }
            };
            if n == 0 {
                break;
            }
            frames.feed(&buf[..n]);
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        if closing && websocket && frames.at_boundary() {
            let _ = cw.write_all(&ws_frames::CLOSE_GOING_AWAY).await;
        }
        let _ = cw.shutdown().await;
    };
    // When the guest side ends, the tunnel ends (as Go's ReverseProxy does); when
    // the client stops sending, the guest may still finish its answer.
    tokio::pin!(client_to_guest, guest_to_client);
    tokio::select! {
        _ = &mut guest_to_client => {}
        _ = &mut client_to_guest => guest_to_client.await,
    }
    // `activity` drops here, after both directions: the idle clock starts.
}

fn empty_body() -> ProxyBody {
    http_body_util::Empty::new().map_err(BoxError::from).boxed()
}

fn response_filter(resp: Response<Incoming>, activity: ActivityGuard) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = TrackedBody {
        inner: body.map_err(BoxError::from).boxed(),
        activity: Some(activity),
    };
    Response::from_parts(parts, body.boxed())
}

/// A response body that keeps its VM busy until the last byte, and ends cleanly
/// (a complete chunked stream) when the VM is put to sleep.
struct TrackedBody {
    inner: ProxyBody,
    activity: Option<ActivityGuard>,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        if let Some(a) = &self.activity {
            if a.closer().poll_closing(cx).is_ready() {
                self.activity = None;
                return Poll::Ready(None);
            }
        }
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.activity = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn upstream_error(target: &RouteTarget, e: UpstreamError) -> Response<ProxyBody> {
    let status = match &e {
        UpstreamError::VmGone => StatusCode::BAD_GATEWAY,
        UpstreamError::NotServing(..) => StatusCode::SERVICE_UNAVAILABLE,
        UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        UpstreamError::WakeFailed(_) => StatusCode::SERVICE_UNAVAILABLE,
        UpstreamError::Internal(_) => StatusCode::BAD_GATEWAY,
        UpstreamError::Overloaded(_) => {
            let mut resp = json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return resp;
        }
    };
    if status != StatusCode::SERVICE_UNAVAILABLE || matches!(e, UpstreamError::WakeFailed(_)) {
        warn!(vm_id = %target.vm_id, error = %e, "proxy could not reach vm");
    }
    json_error(status, &e.to_string())
}

/// A JSON error response: `{"error": "..."}`.
pub fn json_error(status: StatusCode, msg: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": msg }).to_string();
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(BoxError::from).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
