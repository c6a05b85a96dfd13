//! Request and response over QUIC: one bidirectional stream per call, each way one frame of
//! postcard bytes. `Peers` keeps one connection per peer address and reconnects when it drops.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::debug;

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
}

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
    let (mut send, mut recv) = conn.open_bi().await?;
    frame::write_bytes(&mut send, &postcard::to_stdvec(req)?).await?;
    send.finish()?;
    let bytes = frame::read_bytes(&mut recv).await?;
    Ok(postcard::from_bytes(&bytes)?)
}

/// Answers the requests of one connection until it closes. `handler` gets the peer's node id
/// (`None` for a peer without a certificate) and the request.
pub async fn serve<Req, Resp, F, Fut>(conn: quinn::Connection, handler: F)
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(Option<u64>, Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    let peer = quic::peer_node_id(&conn);
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(peer = ?peer, error = %e, "connection closed");
                return;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let req: Req = match frame::read_bytes(&mut recv)
                .await
                .map(|b| postcard::from_bytes(&b))
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    debug!(peer = ?peer, error = %e, "malformed request");
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
        });
    }
}

/// One connection per peer address, made on first use and remade when it drops.
pub struct Peers {
    endpoint: quinn::Endpoint,
    conns: Arc<tokio::sync::Mutex<HashMap<SocketAddr, quinn::Connection>>>,
    down: std::sync::Mutex<HashMap<SocketAddr, Instant>>,
    /// Replaces the endpoint's client configuration once set (a renewed certificate).
    client: std::sync::Mutex<Option<quinn::ClientConfig>>,
}

impl Peers {
    pub fn new(endpoint: quinn::Endpoint) -> Peers {
        Peers {
            endpoint,
            conns: Arc::new(tokio::sync::Mutex::new(HashMap::new())),
            down: std::sync::Mutex::new(HashMap::new()),
            client: std::sync::Mutex::new(None),
        }
    }

    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Uses `config` for connections made from now on (a renewed certificate).
    pub fn set_client_config(&self, config: quinn::ClientConfig) {
        *self.client.lock().expect("client config lock") = Some(config);
    }

    async fn conn(&self, addr: SocketAddr) -> Result<quinn::Connection, RpcError> {
        if let Some(c) = self.conns.lock().await.get(&addr)
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
        let handshake = tokio::spawn(async move {
            let c = match config {
                Some(config) => quic::connect_with(&endpoint, config, addr).await?,
                None => quic::connect(&endpoint, addr).await?,
            };
            conns.lock().await.insert(addr, c.clone());
            Ok::<_, QuicError>(c)
        });
        match handshake.await {
            Ok(r) => Ok(r?),
            Err(e) => Err(RpcError::Connect(QuicError::Connect(addr, e.to_string()))),
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
        if let Some(c) = self.conns.lock().await.remove(&addr) {
            c.close(0u32.into(), b"peer restarted");
        }
        self.down.lock().expect("down lock").remove(&addr);
    }

    /// Whether `addr` failed to answer within the last `DOWN_FOR`.
    pub fn is_down(&self, addr: SocketAddr) -> bool {
        let down = self.down.lock().expect("down lock");
        down.get(&addr).is_some_and(|until| Instant::now() < *until)
    }

    /// Calls `addr`, reconnecting once if the cached connection turns out to be dead, and
    /// giving up after `timeout`. A peer that does not answer is marked down for `DOWN_FOR`.
    pub async fn call_within<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: SocketAddr,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RpcError> {
        if self.is_down(addr) {
            return Err(RpcError::Down(addr));
        }
        let attempt = async {
            let conn = self.conn(addr).await?;
            match call(&conn, req).await {
                Err(RpcError::Connection(_)) => {
                    self.conns.lock().await.remove(&addr);
                    let conn = self.conn(addr).await?;
                    call(&conn, req).await
                }
                other => other,
            }
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(RpcError::Timeout(timeout)),
        };
        if matches!(
            result,
            Err(RpcError::Timeout(_) | RpcError::Connect(_) | RpcError::Connection(_))
        ) {
            self.conns.lock().await.remove(&addr);
            self.down
                .lock()
                .expect("down lock")
                .insert(addr, Instant::now() + DOWN_FOR);
        }
        result
    }
}
