//! One API connection: TLS, HTTP/1.1 or HTTP/2, and the rules that close it.
//!
//! Idleness is measured in requests, not bytes: control frames (HTTP/2 PING, SETTINGS,
//! WINDOW_UPDATE) and keep-alive chatter never keep a connection open. A connection closes when
//! - no request or response body has been active for `limits.idle_timeout_secs`, or
//! - it has not completed an authenticated request within `limits.idle_timeout_secs` of being
//!   accepted (so anonymous sockets cannot hold `limits.max_connections` slots), or
//! - the server shuts down (after `server.shutdown_grace_secs`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::api::{self, AppState, body::ApiBody, error::ApiError};
use crate::config::{Limits, MAX_HEADERS_CEILING};

/// Time allowed for a TLS handshake before the connection is dropped (slow-handshake DoS).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack hyper allows above `limits.max_header_bytes` so that requests just over the limit get
/// our named JSON answer; beyond it hyper closes with a bare 431.
const HEADER_BYTES_SLACK: usize = 8 << 10;
/// HTTP/2 streams per connection; the in-flight limit applies across connections anyway.
const H2_MAX_CONCURRENT_STREAMS: u32 = 32;
/// How long an over-limit connection is kept to deliver its 503.
const OVERLIMIT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection may take to finish what it is writing.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(limits.header_read_timeout_secs))
        .max_headers(MAX_HEADERS_CEILING)
        .max_buf_size((limits.max_header_bytes + HEADER_BYTES_SLACK).max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size((limits.max_header_bytes + HEADER_BYTES_SLACK) as u32)
        .max_pending_accept_reset_streams(16)
        .max_local_error_reset_streams(64);
    b
}

/// Serve one connection until it closes, idles out, never authenticates, or the server shuts
/// down.
pub async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    state: Arc<AppState>,
    limits: &Limits,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let accepted = Instant::now();
    let io: Box<dyn Io> = match acceptor {
        Some(a) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, a.accept(tcp)).await {
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => return,
        },
        None => Box::new(tcp),
    };
    let activity = Arc::new(Activity::new());
    let act = activity.clone();
    let svc = service_fn(move |req| {
        let state = state.clone();
        let act = act.clone();
        async move {
            let _handling = act.begin();
            let r = api::handle(state, req).await;
            if r.status() != hyper::StatusCode::UNAUTHORIZED {
                act.authenticated.store(true, Ordering::Relaxed);
            }
            // The response body (a stream, maybe) keeps the connection active until it ends.
            let active = act.begin();
            Ok::<_, std::convert::Infallible>(r.map(|inner| ActiveBody {
                inner,
                _active: active,
            }))
        }
    });
    let builder = http_builder(limits);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let idle = Duration::from_secs(limits.idle_timeout_secs);
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = shutdown.changed() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(grace, conn.as_mut()).await;
                return;
            }
            _ = tokio::time::sleep(idle / 4) => {
                let idle_now = activity.active.load(Ordering::Relaxed) == 0
                    && activity.idle_for() >= idle;
                let never_authenticated = !activity.authenticated.load(Ordering::Relaxed)
                    && accepted.elapsed() >= idle;
                if idle_now || never_authenticated {
                    if never_authenticated {
                        tracing::debug!(%peer, "closing a connection with no authenticated request");
                    }
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await;
                    return;
                }
            }
        }
    }
}

/// Which accepted connections are served: at most `limits.max_connections` at once, and at most
/// `limits.max_connections_per_source` from one address. Others get one 503 naming the limit
/// (from a second pool of the same size), or are dropped.
pub struct Admission {
    conns: Arc<Semaphore>,
    overlimit: Arc<Semaphore>,
    per_source: Arc<PerSource>,
    max_connections: usize,
    max_per_source: usize,
    acceptor: Option<TlsAcceptor>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// An admitted connection and the slots it holds until it is dropped.
pub struct Admitted {
    tcp: TcpStream,
    slots: Slots,
}

/// The slots an admitted connection holds: released when dropped.
pub type Slots = (OwnedSemaphorePermit, SourceGuard);

impl Admitted {
    pub fn into_parts(self) -> (TcpStream, Slots) {
        (self.tcp, self.slots)
    }
}

impl Admission {
    pub fn new(
        limits: &Limits,
        acceptor: Option<TlsAcceptor>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            conns: Arc::new(Semaphore::new(limits.max_connections)),
            overlimit: Arc::new(Semaphore::new(limits.max_connections)),
            per_source: Arc::new(PerSource::default()),
            max_connections: limits.max_connections,
            max_per_source: limits.max_connections_per_source,
            acceptor,
            metrics,
        }
    }

    pub fn admit(&self, tcp: TcpStream, peer: SocketAddr) -> Option<Admitted> {
        let Some(source) = self.per_source.try_open(peer.ip(), self.max_per_source) else {
            self.refuse(tcp, "limits.max_connections_per_source");
            return None;
        };
        let Ok(permit) = self.conns.clone().try_acquire_owned() else {
            self.refuse(tcp, "limits.max_connections");
            return None;
        };
        Some(Admitted {
            tcp,
            slots: (permit, source),
        })
    }

    /// Over a limit: one 503 naming it, bounded in number and time, or a plain drop; counted
    /// either way.
    fn refuse(&self, tcp: TcpStream, what: &'static str) {
        self.metrics.count_response(503, what);
        if let Ok(p) = self.overlimit.clone().try_acquire_owned() {
            let acceptor = self.acceptor.clone();
            tokio::spawn(async move {
                let _p = p;
                let _ = tokio::time::timeout(
                    OVERLIMIT_CONNECTION_TIMEOUT,
                    serve_overlimit(tcp, acceptor, what),
                )
                .await;
            });
        }
    }

    /// Resolves once every admitted connection has closed (for shutdown).
    pub async fn all_closed(&self) {
        let _ = self.conns.acquire_many(self.max_connections as u32).await;
    }
}

/// One 503 naming `limits.max_connections` (or the per-source cap), then close.
async fn serve_overlimit(tcp: TcpStream, acceptor: Option<TlsAcceptor>, what: &'static str) {
    let io: Box<dyn Io> = match acceptor {
        Some(a) => match a.accept(tcp).await {
            Ok(s) => Box::new(s),
            Err(_) => return,
        },
        None => Box::new(tcp),
    };
    let svc = service_fn(
        move |_req: hyper::Request<hyper::body::Incoming>| async move {
            let e = ApiError::Overloaded { what };
            let mut r = api::error_response(&e);
            r.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
            Ok::<_, std::convert::Infallible>(r)
        },
    );
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().keep_alive(false);
    let _ = b.serve_connection(TokioIo::new(io), svc).await;
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What a connection is doing: requests and response bodies in progress, when the last one
/// began or ended, and whether any request on it was authenticated.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    active: AtomicUsize,
    authenticated: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            authenticated: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn idle_for(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_ms.load(Ordering::Relaxed)),
        )
    }

    /// Count something in progress until the guard drops.
    fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
        ActiveGuard(self.clone())
    }
}

struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.last_ms.store(self.0.now_ms(), Ordering::Relaxed);
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that counts as activity on its connection until it is finished or dropped.
pub struct ActiveBody {
    inner: ApiBody,
    _active: ActiveGuard,
}

impl Body for ActiveBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Connections open per source address, for `limits.max_connections_per_source`.
#[derive(Default)]
pub struct PerSource {
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerSource {
    /// Count a new connection from `ip`, unless it already has `max` open (0: no limit).
    pub fn try_open(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<SourceGuard> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceGuard(self.clone(), ip))
    }
}

pub struct SourceGuard(Arc<PerSource>, IpAddr);

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}
