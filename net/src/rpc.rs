//! Request and response over QUIC: one bidirectional stream per call, each way one frame of
//! postcard bytes. `Peers` keeps one connection per peer address and reconnects when it drops.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{Instrument, debug, warn};

use crate::frame::{self, FrameError};
use crate::quic::{self, QuicError};

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("{0}")]
    Connect(#[from] QuicError),
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream: {0}")]
    Frame(#[from] FrameError),
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("malformed message: {0}")]
    Decode(#[from] postcard::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0} did not answer recently; not trying again for a moment")]
    Down(SocketAddr),
    #[error("the node turned the connection away: {0}")]
    Busy(String),
}

impl RpcError {
    /// Whether the peer turned the connection away for now (too many joins at once): worth
    /// trying again in a second.
    pub fn is_busy(&self) -> bool {
        matches!(self, RpcError::Busy(_))
    }
}

/// The close code of a connection turned away by `Limits` for now.
const BUSY: u32 = 3;

/// How long a call may take unless the caller says otherwise.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// After a peer fails to answer, calls to it fail at once for this long, so a dead node costs
/// its callers one timeout, not one per call.
pub const DOWN_FOR: Duration = Duration::from_secs(2);

/// Sends one request and waits for its response.
pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
    conn: &quinn::Connection,
    req: &Req,
) -> Result<Resp, RpcError> {
    let attempt = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        frame::write_bytes(&mut send, &postcard::to_stdvec(req)?).await?;
        send.finish()?;
        let bytes = frame::read_bytes(&mut recv).await?;
        Ok(postcard::from_bytes(&bytes)?)
    };
    attempt.await.map_err(|e| busy_or(conn, e))
}

/// However the stream noticed, a connection turned away says why.
fn busy_or(conn: &quinn::Connection, e: RpcError) -> RpcError {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == BUSY.into() => {
            RpcError::Busy(String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => e,
    }
}

/// What a server accepts from its connections.
pub struct Limits {
    /// The largest request a peer may send, by whether it is authenticated and by the
    /// request's kind (its postcard variant index; `None` when the frame is too short to say).
    pub max_request: fn(authenticated: bool, kind: Option<u32>) -> usize,
    /// Connections from peers without a certificate: how many a second from one address, and
    /// how many at once in all.
    pub unauthenticated_per_second: u32,
    pub unauthenticated_at_once: usize,
    /// How long a peer without a certificate may stay connected: long enough to join.
    pub unauthenticated_lifetime: Duration,
    gate: std::sync::Mutex<Gate>,
}

#[derive(Default)]
struct Gate {
    /// Per address: the start of its current second and the connections it made in it.
    recent: HashMap<std::net::IpAddr, (Instant, u32)>,
    live: usize,
}

impl Limits {
    pub fn new(max_request: fn(bool, Option<u32>) -> usize) -> Limits {
        Limits {
            max_request,
            unauthenticated_per_second: 4,
            unauthenticated_at_once: 32,
            unauthenticated_lifetime: Duration::from_secs(10),
            gate: Default::default(),
        }
    }

    /// Lets a connection without a certificate in, or says why not; it counts as live until
    /// the pass is dropped.
    fn admit(&self, ip: std::net::IpAddr) -> Result<Pass<'_>, &'static str> {
        let mut g = self.gate.lock().expect("gate lock");
        let now = Instant::now();
        if g.recent.len() > 4096 {
            g.recent
                .retain(|_, (since, _)| now.duration_since(*since) < Duration::from_secs(1));
        }
        if g.live >= self.unauthenticated_at_once {
            return Err("too many nodes are joining at once; try again in a few seconds");
        }
        let (since, n) = g.recent.entry(ip).or_insert((now, 0));
        if now.duration_since(*since) >= Duration::from_secs(1) {
            (*since, *n) = (now, 0);
        }
        if *n >= self.unauthenticated_per_second {
            return Err("too many join attempts from this address; try again in a second");
        }
        *n += 1;
        g.live += 1;
        Ok(Pass(self))
    }
}

struct Pass<'a>(&'a Limits);

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut g = self.0.gate.lock().expect("gate lock");
        g.live = g.live.saturating_sub(1);
    }
}

/// Requests a peer without a certificate may have open at once.
pub const UNAUTHENTICATED_STREAMS: u32 = 2;

/// Answers the requests of one connection until it closes. `handler` gets the peer's node id
/// (`None` for a peer without a certificate) and the request.
///
/// A peer without a certificate gets little: a small receive window, two streams at a time,
/// requests no larger than `limits` allow it, and `limits.unauthenticated_lifetime` in all, so a
/// stranger on the network cannot make a node buffer more than a few KiB or hold a task open.
/// A member's requests are still checked against the limit for their kind before their body
/// is read.
pub async fn serve<Req, Resp, F, Fut>(conn: quinn::Connection, limits: Arc<Limits>, handler: F)
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(Option<u64>, Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    let peer = quic::peer_node_id(&conn);
    if peer.is_some() {
        conn.set_receive_window(quinn::VarInt::from_u32(quic::RECEIVE_WINDOW));
        answer(conn, peer, limits, handler).await;
        return;
    }
    let remote = conn.remote_address();
    let _pass = match limits.admit(remote.ip()) {
        Ok(pass) => pass,
        Err(why) => {
            debug!(%remote, why, "refused a connection without a certificate");
            conn.close(BUSY.into(), why.as_bytes());
            return;
        }
    };
    conn.set_max_concurrent_bi_streams(UNAUTHENTICATED_STREAMS.into());
    let served = answer(conn.clone(), peer, limits.clone(), handler);
    if tokio::time::timeout(limits.unauthenticated_lifetime, served)
        .await
        .is_err()
    {
        debug!(%remote, "closing a connection without a certificate: its time is up");
        conn.close(1u32.into(), b"time is up: join sooner");
    }
}

async fn answer<Req, Resp, F, Fut>(
    conn: quinn::Connection,
    peer: Option<u64>,
    limits: Arc<Limits>,
    handler: F,
) where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(Option<u64>, Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(peer = ?peer, error = %e, "connection closed");
                return;
            }
        };
        // Finished requests are reaped as new ones come; the set ends with the connection
        // (an unauthenticated peer's pending requests go when its time is up).
        while tasks.try_join_next().is_some() {}
        let handler = handler.clone();
        let conn = conn.clone();
        let max_request = limits.max_request;
        tasks.spawn(async move {
            let limit = |head: &[u8]| {
                let kind = postcard::take_from_bytes::<u32>(head).ok().map(|(k, _)| k);
                max_request(peer.is_some(), kind)
            };
            let req: Req = match frame::read_bytes_within(&mut recv, limit)
                .await
                .map(|b| postcard::from_bytes(&b))
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    debug!(peer = ?peer, error = %e, "malformed request");
                    return;
                }
                Err(e @ FrameError::TooLarge(..)) => {
                    warn!(peer = ?peer, remote = %conn.remote_address(), error = %e, "closing a connection that sent an oversized request");
                    conn.close(2u32.into(), b"request too large");
                    return;
                }
                Err(e) => {
                    debug!(peer = ?peer, error = %e, "request stream failed");
                    return;
                }
            };
            let resp = handler(peer, req).await;
            let Ok(bytes) = postcard::to_stdvec(&resp) else {
                return;
            };
            if frame::write_bytes(&mut send, &bytes).await.is_ok() {
                let _ = send.finish();
            }
        }.in_current_span());
    }
}

/// A future a transport returns.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What carries one call's bytes to a peer and its answer back: QUIC between processes
/// (`QuicTransport`), or the in-memory network of the deterministic tests
/// (`memory::MemoryNetwork`). The frames are the same postcard bytes either way.
pub trait Transport: Send + Sync + 'static {
    /// Sends one request frame to `addr` and waits for its response frame, without a timeout
    /// of its own (`Peers` puts one around it).
    fn call(&self, addr: SocketAddr, req: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, RpcError>>;
    /// Stops using the connection to `addr`, which failed; calls under way on it go on.
    fn reset(&self, addr: SocketAddr) -> BoxFuture<'_, ()>;
    /// Closes the connection to `addr`: the peer there is a new process.
    fn forget(&self, addr: SocketAddr) -> BoxFuture<'_, ()>;
    /// Forgets every connection (the trust changed).
    fn forget_all(&self) -> BoxFuture<'_, ()>;
}

/// How old a connection to a peer that announced a restart must be to be its old process's:
/// one made in the last second may be to the new process already (nodes announce their
/// restart as they start, while the others connect to them).
const RESTARTED_PEER_GRACE: Duration = Duration::from_secs(1);

/// One QUIC connection per peer address, made on first use and remade when it drops.
pub struct QuicTransport {
    endpoint: quinn::Endpoint,
    /// Each peer's connection, with when it was made.
    conns: Arc<tokio::sync::Mutex<HashMap<SocketAddr, (Instant, quinn::Connection)>>>,
    /// Replaces the endpoint's client configuration once set (a renewed certificate).
    client: std::sync::Mutex<Option<quinn::ClientConfig>>,
}

impl QuicTransport {
    pub fn new(endpoint: quinn::Endpoint) -> QuicTransport {
        QuicTransport {
            endpoint,
            conns: Arc::new(tokio::sync::Mutex::new(HashMap::new())),
            client: std::sync::Mutex::new(None),
        }
    }

    async fn conn(&self, addr: SocketAddr) -> Result<quinn::Connection, RpcError> {
        if let Some((_, c)) = self.conns.lock().await.get(&addr)
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        // The handshake runs in a task of its own and caches its connection there: callers
        // give up on slow calls (openraft times RPCs out after 100 ms), and a handshake they
        // abandon would otherwise start over with every call and never finish.
        let endpoint = self.endpoint.clone();
        let config = self.client.lock().expect("client config lock").clone();
        let conns = self.conns.clone();
        let handshake = tokio::spawn(
            async move {
                let c = match config {
                    Some(config) => quic::connect_with(&endpoint, config, addr).await?,
                    None => quic::connect(&endpoint, addr).await?,
                };
                conns.lock().await.insert(addr, (Instant::now(), c.clone()));
                Ok::<_, QuicError>(c)
            }
            .in_current_span(),
        );
        match handshake.await {
            Ok(r) => Ok(r?),
            Err(e) => Err(RpcError::Connect(QuicError::Connect(addr, e.to_string()))),
        }
    }

    async fn call_once(&self, conn: &quinn::Connection, req: &[u8]) -> Result<Vec<u8>, RpcError> {
        let attempt = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            frame::write_bytes(&mut send, req).await?;
            send.finish()?;
            Ok(frame::read_bytes(&mut recv).await?)
        };
        attempt.await.map_err(|e| busy_or(conn, e))
    }
}

impl Transport for QuicTransport {
    fn call(&self, addr: SocketAddr, req: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, RpcError>> {
        Box::pin(async move {
            let conn = self.conn(addr).await?;
            match self.call_once(&conn, &req).await {
                // A cached connection that turned out dead: once more on a new one.
                Err(RpcError::Connection(_)) => {
                    self.conns.lock().await.remove(&addr);
                    let conn = self.conn(addr).await?;
                    self.call_once(&conn, &req).await
                }
                other => other,
            }
        })
    }

    fn reset(&self, addr: SocketAddr) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.conns.lock().await.remove(&addr);
        })
    }

    fn forget(&self, addr: SocketAddr) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut conns = self.conns.lock().await;
            // One made since the peer's new process started is to that process already.
            if let Some((made, _)) = conns.get(&addr)
                && made.elapsed() > RESTARTED_PEER_GRACE
                && let Some((_, c)) = conns.remove(&addr)
            {
                c.close(0u32.into(), b"peer restarted");
            }
        })
    }

    fn forget_all(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for (_, (_, c)) in self.conns.lock().await.drain() {
                c.close(0u32.into(), b"trust changed");
            }
        })
    }
}

/// Calls to peers over a `Transport`, with a timeout per call and a short memory of peers that
/// did not answer.
pub struct Peers {
    transport: Arc<dyn Transport>,
    /// The same transport when it is QUIC: its endpoint and client configuration.
    quic: Option<Arc<QuicTransport>>,
    down: std::sync::Mutex<HashMap<SocketAddr, Instant>>,
}

impl Peers {
    /// Peers over QUIC from `endpoint`.
    pub fn new(endpoint: quinn::Endpoint) -> Peers {
        let quic = Arc::new(QuicTransport::new(endpoint));
        Peers {
            transport: quic.clone(),
            quic: Some(quic),
            down: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Peers over another transport (the in-memory network of the deterministic tests).
    pub fn over(transport: Arc<dyn Transport>) -> Peers {
        Peers {
            transport,
            quic: None,
            down: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The QUIC endpoint, if calls go over QUIC.
    pub fn endpoint(&self) -> Option<&quinn::Endpoint> {
        self.quic.as_ref().map(|q| &q.endpoint)
    }

    /// Uses `config` for QUIC connections made from now on (a renewed certificate).
    pub fn set_client_config(&self, config: quinn::ClientConfig) {
        if let Some(q) = &self.quic {
            *q.client.lock().expect("client config lock") = Some(config);
        }
    }

    /// Calls `addr` with the default timeout.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: SocketAddr,
        req: &Req,
    ) -> Result<Resp, RpcError> {
        self.call_within(addr, req, CALL_TIMEOUT).await
    }

    /// Drops the connection to `addr` and its down mark: the peer there is a new process,
    /// which knows nothing of the old connection. The next call connects again.
    pub async fn forget(&self, addr: SocketAddr) {
        self.transport.forget(addr).await;
        self.down.lock().expect("down lock").remove(&addr);
    }

    /// Drops every connection (the trust changed: each is made again under the new one).
    pub async fn forget_all(&self) {
        self.transport.forget_all().await;
        self.down.lock().expect("down lock").clear();
    }

    /// Whether `addr` failed to answer within the last `DOWN_FOR`.
    pub fn is_down(&self, addr: SocketAddr) -> bool {
        let down = self.down.lock().expect("down lock");
        down.get(&addr).is_some_and(|until| Instant::now() < *until)
    }

    /// Calls `addr`, reconnecting once if the cached connection turns out to be dead, and
    /// giving up after `timeout`. A peer that does not answer is marked down for `DOWN_FOR`.
    #[tracing::instrument(level = "debug", skip_all, fields(peer = %addr))]
    pub async fn call_within<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: SocketAddr,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RpcError> {
        if self.is_down(addr) {
            return Err(RpcError::Down(addr));
        }
        let bytes = postcard::to_stdvec(req)?;
        let result = match tokio::time::timeout(timeout, self.transport.call(addr, bytes)).await {
            Ok(Ok(answer)) => postcard::from_bytes(&answer).map_err(RpcError::from),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(RpcError::Timeout(timeout)),
        };
        if matches!(
            result,
            Err(RpcError::Timeout(_) | RpcError::Connect(_) | RpcError::Connection(_))
        ) {
            self.transport.reset(addr).await;
            self.down
                .lock()
                .expect("down lock")
                .insert(addr, Instant::now() + DOWN_FOR);
        }
        result
    }
}
