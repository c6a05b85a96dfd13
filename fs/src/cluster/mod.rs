//! This node's end of the cluster network: its QUIC endpoint (or its port on the in-memory
//! network of the tests), its identity and the CA it may hold, the protocol nodes speak
//! (`rpc`), and the openraft network over it (`network`).
//!
//! **Architecture invariant:** this module knows nothing of `Node`. It serves requests through
//! a `Handler` the node implements (`node::serve`); what a node does with another node
//! (replication, repair, membership, trust) lives in `node`. `shoal-net` below it moves bytes
//! and knows nothing of Raft or blocks.

pub mod network;
pub mod rpc;
pub mod signer;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use shoal_net::memory::MemoryNetwork;
use shoal_net::pki::{self, Identity};
use shoal_net::rpc::Peers;
use shoal_net::token::JoinToken;
use tracing::{Instrument, debug};

use rpc::{Request, Response};
use signer::Signer;

/// How long a node certificate is valid unless the daemon is told otherwise
/// (`NodeOptions::cert_validity`, `--cert-validity-secs`; tests use a short one to exercise
/// renewal).
pub const CERT_VALIDITY: Duration = Duration::from_secs(7 * 86400);

/// Why this node's TLS material could not be made, loaded, saved or put to use.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {source}")]
    Pki {
        what: &'static str,
        source: pki::PkiError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// The QUIC endpoint or its TLS configuration could not be set up.
    #[error("the cluster endpoint: {0}")]
    Quic(#[from] shoal_net::quic::QuicError),
}

impl TlsError {
    pub fn pki(what: &'static str) -> impl FnOnce(pki::PkiError) -> TlsError {
        move |source| TlsError::Pki { what, source }
    }

    pub fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> TlsError {
        move |source| TlsError::Io {
            what: what.to_string(),
            source,
        }
    }
}

/// What serves the requests that reach this node's endpoint: the node (`node::serve`).
pub trait Handler: Send + Sync + 'static {
    /// Whether `peer` was removed from the cluster; its connections are refused.
    fn is_revoked(&self, peer: u64) -> bool;

    /// Answers one request. `peer` is the node id the caller's certificate names, or `None`
    /// for a caller without one (a node joining).
    fn serve(
        self: Arc<Self>,
        peer: Option<u64>,
        req: Request,
    ) -> impl Future<Output = Response> + Send;
}

/// Where a node keeps its TLS material: `DATA/tls/`.
pub fn tls_dir(data: &Path) -> PathBuf {
    data.join("tls")
}

/// This node's membership in the cluster network.
pub struct Cluster {
    /// This node's certificate and key; replaced when the certificate is renewed.
    pub identity: std::sync::Mutex<Identity>,
    pub data: PathBuf,
    pub peers: Arc<Peers>,
    pub listen: SocketAddr,
    node_id: u64,
    /// The in-memory network this node serves on, in the deterministic tests.
    network: Option<Arc<MemoryNetwork>>,
    /// The CA, on the node that holds its key (the one that ran `shoal init`); replaced by a
    /// CA rotation (`trust`).
    signer: std::sync::Mutex<Option<Arc<Signer>>>,
    /// Connections peers made to this node, closed when a CA is retired.
    incoming: std::sync::Mutex<Vec<quinn::Connection>>,
    /// Block traffic's own circuit breaker: peers a commit stopped waiting for, with the time
    /// until which block copies skip them (`SlowPeers`). Raft traffic ignores it.
    pub slow: SlowPeers,
}

impl Cluster {
    /// Loads the node's identity and opens its endpoint on `listen`, or, given an in-memory
    /// `network`, serves there under `listen` instead.
    pub fn open(
        data: &Path,
        listen: SocketAddr,
        node_id: u64,
        network: Option<Arc<MemoryNetwork>>,
    ) -> Result<Cluster, TlsError> {
        let dir = tls_dir(data);
        let identity =
            Identity::load(&dir).map_err(TlsError::pki("loading this node's certificate"))?;
        let signer = Signer::load(data).map(Arc::new);
        let peers = match &network {
            Some(net) => Peers::over(net.port(Some(node_id))),
            None => Peers::new(shoal_net::quic::endpoint(&identity, listen)?),
        };
        Ok(Cluster {
            identity: std::sync::Mutex::new(identity),
            data: data.to_path_buf(),
            peers: Arc::new(peers),
            listen,
            node_id,
            network,
            signer: std::sync::Mutex::new(signer),
            incoming: Default::default(),
            slow: Default::default(),
        })
    }

    /// The CA this node signs with, if it holds one.
    pub fn signer(&self) -> Option<Arc<Signer>> {
        self.signer.lock().expect("signer lock").clone()
    }

    /// Signs with `signer` from now on (a CA rotation).
    pub fn set_signer(&self, signer: Arc<Signer>) {
        *self.signer.lock().expect("signer lock") = Some(signer);
    }

    /// Saves `identity` and uses it from now on: for new connections either way, and for the
    /// trust of every handshake.
    pub fn install(&self, identity: Identity) -> Result<(), TlsError> {
        identity
            .save(&tls_dir(&self.data))
            .map_err(TlsError::pki("saving this node's certificate"))?;
        let server = shoal_net::quic::server_config(&identity)?;
        let client = shoal_net::quic::client_config(&identity)?;
        if let Some(endpoint) = self.peers.endpoint() {
            endpoint.set_server_config(Some(server));
        }
        self.peers.set_client_config(client);
        *self.identity.lock().expect("identity lock") = identity;
        Ok(())
    }

    /// Closes every connection, both ways; each is made again under the current trust.
    pub async fn close_all(&self) {
        let incoming = std::mem::take(&mut *self.incoming.lock().expect("incoming lock"));
        for conn in incoming {
            conn.close(0u32.into(), b"trust changed");
        }
        self.peers.forget_all().await;
    }

    /// Closes the endpoint, telling every peer at once (a peer would otherwise keep calling
    /// this process until its connection timed out, and miss its successor on the same port).
    pub async fn close(&self) {
        if let Some(endpoint) = self.peers.endpoint() {
            endpoint.close(0u32.into(), b"node stopping");
            let _ = tokio::time::timeout(Duration::from_millis(50), endpoint.wait_idle()).await;
        }
    }

    /// Accepts connections and serves requests for as long as the node lives.
    pub fn serve<H: Handler>(self: &Arc<Self>, node: Weak<H>) {
        if let Some(net) = &self.network {
            serve_memory(net, self.listen, self.node_id, node);
            return;
        }
        let endpoint = self
            .peers
            .endpoint()
            .expect("a cluster without an in-memory network has a QUIC endpoint")
            .clone();
        let cluster = Arc::downgrade(self);
        let limits = Arc::new(shoal_net::rpc::Limits::new(Request::max_frame));
        tokio::spawn(
            async move {
                while let Some(incoming) = endpoint.accept().await {
                    let node = node.clone();
                    let limits = limits.clone();
                    let cluster = cluster.clone();
                    tokio::spawn(
                        async move {
                            let conn = match incoming.await {
                                Ok(c) => c,
                                Err(e) => {
                                    debug!(error = %e, "refused a connection");
                                    return;
                                }
                            };
                            let peer = shoal_net::quic::peer_node_id(&conn);
                            let revoked_peer =
                                peer.filter(|id| node.upgrade().is_some_and(|n| n.is_revoked(*id)));
                            if let Some(id) = revoked_peer {
                                debug!(peer = id, "closing the connection of a removed node");
                                conn.close(4u32.into(), revoked(id).as_bytes());
                                return;
                            }
                            if let Some(c) = cluster.upgrade() {
                                let mut incoming = c.incoming.lock().expect("incoming lock");
                                incoming.retain(|c| c.close_reason().is_none());
                                incoming.push(conn.clone());
                            }
                            shoal_net::rpc::serve(conn, limits, move |peer, req| {
                                let node = node.clone();
                                async move {
                                    match node.upgrade() {
                                        Some(node) => node.serve(peer, req).await,
                                        None => {
                                            Response::Denied("the node is shutting down".into())
                                        }
                                    }
                                }
                            })
                            .await;
                        }
                        .in_current_span(),
                    );
                }
            }
            .in_current_span(),
        );
    }
}

/// Serves `node`'s requests on the in-memory network: what `Cluster::serve` does over QUIC,
/// without the handshake (the network names the caller) and without the size limits.
fn serve_memory<H: Handler>(net: &MemoryNetwork, listen: SocketAddr, node_id: u64, node: Weak<H>) {
    net.serve(
        listen,
        node_id,
        Arc::new(move |peer, bytes| {
            let node = node.clone();
            Box::pin(async move {
                let resp = match (node.upgrade(), postcard::from_bytes::<Request>(&bytes)) {
                    (None, _) => Response::Denied("the node is shutting down".into()),
                    (Some(_), Err(e)) => Response::Denied(format!("malformed request: {e}")),
                    (Some(n), Ok(_)) if peer.is_some_and(|id| n.is_revoked(id)) => {
                        Response::Denied(revoked(peer.unwrap_or_default()))
                    }
                    (Some(n), Ok(req)) => n.serve(peer, req).await,
                };
                postcard::to_stdvec(&resp).unwrap_or_default()
            })
        }),
    );
}

/// Keeps the current join token where `shoal token show` finds it (readable by root only).
pub fn save_token(data: &Path, token: &JoinToken) -> std::io::Result<()> {
    shoal_net::durable::write_atomic(&token_path(data), format!("{token}\n").as_bytes(), 0o600)
}

/// Where `save_token` keeps the token.
pub fn token_path(data: &Path) -> PathBuf {
    tls_dir(data).join("join-token")
}

/// What a removed node hears from every member.
pub fn revoked(id: u64) -> String {
    format!(
        "node {id} was removed from this cluster and its certificate revoked: stop its daemon, delete its data directory, and join again with a new token"
    )
}

/// How long block copies skip a peer that a commit stopped waiting for, unless a copy to it
/// lands meanwhile.
const SLOW_FOR: Duration = Duration::from_secs(5);

/// Peers that left a commit waiting past `SLOW_COPY`: for `SLOW_FOR`, or until a copy to them
/// lands, block copies go to them only when no healthy node can take one, so a frozen or
/// partitioned member costs one commit `SLOW_COPY`, not every commit until its lease ends.
#[derive(Default)]
pub struct SlowPeers(std::sync::Mutex<std::collections::HashMap<u64, Instant>>);

impl SlowPeers {
    pub(crate) fn is_slow(&self, n: u64) -> bool {
        let m = self.0.lock().expect("slow peers lock");
        m.get(&n).is_some_and(|until| Instant::now() < *until)
    }

    pub(crate) fn mark(&self, n: u64) {
        let mut m = self.0.lock().expect("slow peers lock");
        m.insert(n, Instant::now() + SLOW_FOR);
    }

    pub(crate) fn clear(&self, n: u64) {
        self.0.lock().expect("slow peers lock").remove(&n);
    }
}
