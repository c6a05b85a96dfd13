//! The node's side of the cluster: its QUIC endpoint, the RPCs nodes send each other, joining,
//! membership, and block replication.
//!
//! **Architecture invariant:** `shoal-net` moves bytes and knows nothing of Raft or blocks;
//! this module is where the openraft network and the block protocol meet it.

pub mod election;
pub mod fsck;
pub mod join;
pub mod members;
pub mod network;
pub mod repair;
pub mod replicate;
pub mod rpc;
pub mod trust;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::BasicNode;
use shoal_net::memory::MemoryNetwork;
use shoal_net::pki::{Ca, Identity, PendingIdentity};
use shoal_net::rpc::Peers;
use shoal_net::token::JoinToken;
use shoal_raft::{MetaCommand, Reply};
use tracing::{Instrument, debug, info, warn};

use crate::node::{Node, NodeError, OpError};
use rpc::{JoinReply, JoinRequest, RaftFailure, Refusal, Request, Response};
pub use trust::CaError;

/// How long a node certificate is valid unless the daemon is told otherwise
/// (`NodeOptions::cert_validity`, `--cert-validity-secs`; tests use a short one to exercise
/// renewal).
pub const CERT_VALIDITY: Duration = Duration::from_secs(7 * 86400);
fn slow_append(node: u64) -> Option<Duration> {
    crate::faults::for_node(crate::faults::get().slow_append, node)
}

fn slow_snapshot(node: u64) -> Option<Duration> {
    crate::faults::for_node(crate::faults::get().slow_snapshot, node)
}

/// `Faults::drop_propose_reply`: whether to lose the answer to this forwarded proposal.
fn drop_propose_reply(req: &shoal_raft::MetaRequest) -> bool {
    static SEEN: std::sync::Mutex<Option<std::collections::HashSet<(u64, u64)>>> =
        std::sync::Mutex::new(None);
    let on = crate::faults::get().drop_propose_reply;
    let routine = req.cmds.iter().all(|c| {
        matches!(
            c,
            shoal_raft::MetaCommand::RenewSession | shoal_raft::MetaCommand::ReportNode { .. }
        )
    });
    if !on || routine || req.seq == 0 {
        return false;
    }
    let mut seen = SEEN.lock().expect("fault lock");
    seen.get_or_insert_with(Default::default)
        .insert((req.session, req.seq))
}

/// The first nodes of a cluster are voters; later ones are learners.
pub const VOTERS: usize = 3;

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
    signer: std::sync::Mutex<Option<Arc<trust::Signer>>>,
    /// Connections peers made to this node, closed when a CA is retired.
    incoming: std::sync::Mutex<Vec<quinn::Connection>>,
    /// Block traffic's own circuit breaker: peers a commit stopped waiting for, with the time
    /// until which block copies skip them (`replicate::SlowPeers`). Raft traffic ignores it.
    pub slow: replicate::SlowPeers,
}

impl Cluster {
    /// Loads the node's identity and opens its endpoint on `listen`, or, given an in-memory
    /// `network`, serves there under `listen` instead.
    pub fn open(
        data: &Path,
        listen: SocketAddr,
        node_id: u64,
        network: Option<Arc<MemoryNetwork>>,
    ) -> Result<Cluster, NodeError> {
        let dir = tls_dir(data);
        let identity = Identity::load(&dir).map_err(|source| NodeError::Tls {
            what: "loading this node's certificate",
            source,
        })?;
        let signer = trust::Signer::load(data).map(Arc::new);
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
    pub fn signer(&self) -> Option<Arc<trust::Signer>> {
        self.signer.lock().expect("signer lock").clone()
    }

    /// Saves `identity` and uses it from now on: for new connections either way, and for the
    /// trust of every handshake.
    fn install(&self, identity: Identity) -> Result<(), CaError> {
        identity
            .save(&tls_dir(&self.data))
            .map_err(CaError::pki("saving this node's certificate"))?;
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
    async fn close_all(&self) {
        let incoming = std::mem::take(&mut *self.incoming.lock().expect("incoming lock"));
        for conn in incoming {
            conn.close(0u32.into(), b"trust changed");
        }
        self.peers.forget_all().await;
    }

    /// Accepts connections and serves requests for as long as the node lives.
    pub fn serve(self: &Arc<Self>, node: Weak<Node>) {
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
                            let revoked_peer = peer.filter(|id| {
                                node.upgrade()
                                    .is_some_and(|n| n.view.is_revoked(*id).unwrap_or(true))
                            });
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
                                        Some(node) => serve_one(node, peer, req).await,
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
fn serve_memory(net: &MemoryNetwork, listen: SocketAddr, node_id: u64, node: Weak<Node>) {
    net.serve(
        listen,
        node_id,
        Arc::new(move |peer, bytes| {
            let node = node.clone();
            Box::pin(async move {
                let resp = match (node.upgrade(), postcard::from_bytes::<Request>(&bytes)) {
                    (None, _) => Response::Denied("the node is shutting down".into()),
                    (Some(_), Err(e)) => Response::Denied(format!("malformed request: {e}")),
                    (Some(n), Ok(_))
                        if peer.is_some_and(|id| n.view.is_revoked(id).unwrap_or(true)) =>
                    {
                        Response::Denied(revoked(peer.unwrap_or_default()))
                    }
                    (Some(n), Ok(req)) => serve_one(n, peer, req).await,
                };
                postcard::to_stdvec(&resp).unwrap_or_default()
            })
        }),
    );
}

impl Node {
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// The members of the cluster with their addresses.
    pub fn members(&self) -> Vec<(u64, String)> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.nodes().map(|(id, n)| (*id, n.addr.clone())).collect()
    }

    /// The other members with their addresses; a member whose address does not parse comes
    /// with that error, for the caller to report.
    pub(crate) fn other_members(&self) -> Vec<(u64, Result<SocketAddr, rpc::PeerError>)> {
        self.members()
            .into_iter()
            .filter(|(n, _)| *n != self.id)
            .map(|(node, addr)| {
                let parsed =
                    addr.parse()
                        .map_err(|error| rpc::PeerError::BadAddress { node, addr, error });
                (node, parsed)
            })
            .collect()
    }

    fn is_member(&self, id: u64) -> bool {
        let m = self.raft.metrics().borrow().membership_config.clone();
        // A node that is still joining has no membership yet and trusts the cluster's CA.
        m.nodes().next().is_none() || m.nodes().any(|(n, _)| *n == id)
    }

    /// A member's address, from the membership.
    fn member_addr(&self, id: u64) -> Option<SocketAddr> {
        self.members()
            .into_iter()
            .find(|(n, _)| *n == id)
            .and_then(|(_, a)| a.parse().ok())
    }

    /// The leader's address, if a leader is known and is another node.
    pub fn leader_addr(&self) -> Option<SocketAddr> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        if leader == self.id {
            return None;
        }
        m.membership_config
            .nodes()
            .find(|(id, _)| **id == leader)
            .and_then(|(_, n)| n.addr.parse().ok())
    }

    /// Sends a request to the leader and returns its response. Gives up as soon as this node
    /// learns of another leader (or of none: an election), rather than waiting out the call's
    /// timeout on a leader that died; the caller asks again, and a proposal asked twice
    /// applies once.
    pub(crate) async fn to_leader(&self, req: &Request) -> Result<Response, OpError> {
        let cluster = self
            .cluster()
            .ok_or_else(|| OpError::Raft("this node is not part of a cluster".into()))?;
        let mut metrics = self.raft.metrics();
        let leader = metrics.borrow_and_update().current_leader;
        let addr = self.leader_addr().ok_or_else(|| {
            OpError::Raft("no leader is known; the cluster may have lost its quorum".into())
        })?;
        let replaced = async {
            loop {
                if metrics.changed().await.is_err() {
                    // Raft stopped: only the call can end this.
                    std::future::pending::<()>().await;
                }
                if metrics.borrow_and_update().current_leader != leader {
                    return;
                }
            }
        };
        tokio::select! {
            answer = cluster.peers.call(addr, req) => answer
                .map_err(|e| OpError::Raft(format!("forwarding to the leader at {addr}: {e}"))),
            () = replaced => Err(OpError::Raft(format!(
                "the leader at {addr} was replaced while a request to it was under way"
            ))),
        }
    }

    async fn handle_join(&self, req: JoinRequest) -> Result<JoinReply, CaError> {
        let cluster = self.cluster().ok_or(CaError::NoCluster)?;
        let signer = cluster.signer().ok_or(CaError::NotJoinPoint)?;
        let expected = self.view.join_secret()?;
        if expected != Some(*blake3::hash(&req.secret).as_bytes()) {
            return Err(CaError::BadToken);
        }
        let node_id = match self
            .run(MetaCommand::AllocNodeId)
            .await
            .map_err(CaError::op("allocating a node id"))?
        {
            Reply::NodeId(id) => id,
            other => return Err(CaError::Unexpected(format!("{other:?}"))),
        };
        let cert = signer
            .ca
            .sign(&req.csr, node_id, self.options.cert_validity)
            .map_err(CaError::pki("signing the joining node's certificate"))?;
        info!(node = node_id, "signed the certificate of a joining node");
        let trust = match self.view.trust()? {
            Some(cas) => cas,
            None => vec![signer.ca.cert.to_vec()],
        };
        Ok(JoinReply {
            node_id,
            cert: cert.to_vec(),
            ca: signer.ca.cert.to_vec(),
            cross: signer.cross.as_ref().map(|c| c.to_vec()),
            trust,
            cluster_id: self.config.cluster_id.clone(),
            block_size: self.config.block_size,
        })
    }

    /// On the leader: adds a node as a learner, and as a voter while there are fewer than three.
    async fn add_member(&self, id: u64, addr: String) -> Result<(), Refusal> {
        if self.leader_addr().is_some() {
            return match self.to_leader(&Request::AddMember { id, addr }).await {
                Ok(Response::AddMember(r)) => r,
                Ok(other) => Err(format!("unexpected response {other:?}").into()),
                Err(e) => Err(e.to_string().into()),
            };
        }
        self.raft
            .add_learner(id, BasicNode::new(addr.clone()), true)
            .await
            .map_err(|e| match Refusal::of_write(e) {
                Refusal::Failed(e) => format!("adding node {id} as a learner: {e}").into(),
                r => r,
            })?;
        let m = self.raft.metrics().borrow().membership_config.clone();
        let mut voters: BTreeSet<u64> = m.membership().voter_ids().collect();
        if voters.len() < VOTERS && voters.insert(id) {
            self.raft.change_membership(voters, false).await.map_err(
                |e| match Refusal::of_write(e) {
                    Refusal::Failed(e) => format!("making node {id} a voter: {e}").into(),
                    r => r,
                },
            )?;
        }
        info!(node = id, addr, "node added to the cluster");
        Ok(())
    }
}

/// Creates the cluster's CA and node 1's certificate in `DATA/tls`, and the first join token.
pub fn init_tls(
    data: &Path,
    config: &crate::node::ClusterConfig,
    validity: Duration,
) -> Result<JoinToken, NodeError> {
    let dir = tls_dir(data);
    let err = |source| NodeError::Tls {
        what: "creating the cluster CA",
        source,
    };
    std::fs::create_dir_all(&dir).map_err(|e| NodeError::Io(dir.clone(), e))?;
    let ca = Ca::generate(&config.cluster_id).map_err(err)?;
    ca.save(&dir.join("ca.crt"), &dir.join("ca.key"))
        .map_err(err)?;
    let pending = PendingIdentity::generate().map_err(err)?;
    let cert = ca
        .sign(&pending.csr_der, config.node_id, validity)
        .map_err(err)?;
    pending
        .complete(cert, ca.cert.clone())
        .map_err(err)?
        .save(&dir)
        .map_err(err)?;
    let token = JoinToken::new(ca.fingerprint());
    save_token(data, &token).map_err(|e| NodeError::Io(token_path(data), e))?;
    Ok(token)
}

/// Keeps the current join token where `shoal token show` finds it (readable by root only).
pub fn save_token(data: &Path, token: &JoinToken) -> std::io::Result<()> {
    shoal_net::durable::write_atomic(&token_path(data), format!("{token}\n").as_bytes(), 0o600)
}

/// Where `save_token` keeps the token.
pub fn token_path(data: &Path) -> PathBuf {
    tls_dir(data).join("join-token")
}

/// Makes sure this node is in the membership (asking the peers it joined through to add it),
/// then waits until it knows a leader.
pub async fn ensure_member(node: &Node) -> Result<(), NodeError> {
    let cluster = node.cluster().expect("cluster node");
    let initialized = node
        .raft
        .is_initialized()
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    if !initialized {
        let addr = cluster.listen.to_string();
        let mut last = String::from("no peers are configured");
        let mut added = false;
        for peer in &node.config.peers {
            let Ok(peer_addr) = peer.parse::<SocketAddr>() else {
                continue;
            };
            let req = Request::AddMember {
                id: node.id,
                addr: addr.clone(),
            };
            match cluster.peers.call::<_, Response>(peer_addr, &req).await {
                Ok(Response::AddMember(Ok(()))) => {
                    added = true;
                    break;
                }
                Ok(Response::AddMember(Err(e))) => last = e.to_string(),
                Ok(Response::Denied(e)) => last = e,
                Ok(other) => last = format!("unexpected response {other:?}"),
                Err(e) => last = format!("{peer}: {e}"),
            }
        }
        if !added {
            return Err(NodeError::Join(format!(
                "no member added this node: {last}"
            )));
        }
    }
    node.raft
        .wait(Some(Duration::from_secs(60)))
        .metrics(
            |m| m.current_leader.is_some() && m.last_applied.is_some(),
            "a known leader",
        )
        .await
        .map_err(|e| {
            NodeError::Raft(format!(
                "no leader within 60 s (is a majority of voters up?): {e}"
            ))
        })?;
    // A node restarted after being leader believes it still leads until a quorum says
    // otherwise; a proposal it took meanwhile would wait on a log entry the real leader
    // overwrites. A read barrier settles who leads, and catches this node up.
    use backon::Retryable;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    (|| node.read_barrier())
        .retry(crate::node::settle(Duration::from_millis(200)))
        .sleep(tokio::time::sleep)
        .when(|_| std::time::Instant::now() < deadline)
        .notify(|e, _| debug!(error = %e, "waiting for a leader a quorum confirms"))
        .await
        .map_err(|e| {
            NodeError::Raft(format!(
                "no leader a quorum confirms within 60 s (is a majority of voters up?): {e}"
            ))
        })
}

impl Node {
    /// Removes a node from the cluster; from then on its requests are refused. Forwarded to the
    /// leader. The leader itself cannot be removed.
    pub async fn remove_member(&self, id: u64) -> Result<(), Refusal> {
        if self.leader_addr().is_some() {
            return match self.to_leader(&Request::RemoveMember { id }).await {
                Ok(Response::RemoveMember(r)) => r,
                Ok(Response::Denied(e)) => Err(e.into()),
                Ok(other) => Err(format!("unexpected response {other:?}").into()),
                Err(e) => Err(e.to_string().into()),
            };
        }
        if id == self.id {
            return Err(format!(
                "node {id} is the leader: stop its daemon first, and remove it once another node leads"
            )
            .into());
        }
        let m = self.raft.metrics().borrow().membership_config.clone();
        if !m.nodes().any(|(n, _)| *n == id) {
            return Err(
                format!("node {id} is not a member of this cluster (see `shoal node ls`)").into(),
            );
        }
        let voters: BTreeSet<u64> = m.membership().voter_ids().collect();
        if voters.contains(&id) && voters.len() <= 1 {
            return Err(format!("node {id} is the last voter").into());
        }
        // Revoked first: from this entry on every member refuses the node, so it cannot ask
        // to be added again with the certificate it still holds.
        self.run(MetaCommand::RevokeNode { node: id })
            .await
            .map_err(|e| format!("revoking node {id}'s certificate: {e}"))?;
        if voters.contains(&id) {
            self.raft
                .change_membership(
                    openraft::ChangeMembers::RemoveVoters(BTreeSet::from([id])),
                    false,
                )
                .await
                .map_err(|e| format!("demoting node {id}: {e}"))?;
        }
        self.raft
            .change_membership(
                openraft::ChangeMembers::RemoveNodes(BTreeSet::from([id])),
                false,
            )
            .await
            .map_err(|e| format!("removing node {id}: {e}"))?;
        info!(node = id, "node removed from the cluster");
        // Its Docker mounts went with it: they must not keep volumes from being removed.
        self.run(shoal_raft::MetaCommand::ClearMounts { node: id })
            .await
            .map_err(|e| {
                format!("node {id} was removed, but forgetting its volume mounts failed: {e}")
            })?;
        Ok(())
    }

    /// The read index a follower asked for. A round in which no quorum answered is tried
    /// again for a while (within the caller's call timeout) rather than failing its read.
    async fn read_index_for_peer(&self) -> Result<Option<u64>, Refusal> {
        use backon::Retryable;
        use openraft::error::{CheckIsLeaderError, RaftError};
        let deadline = std::time::Instant::now() + shoal_net::rpc::CALL_TIMEOUT / 2;
        (|| self.raft.get_read_log_id())
            .retry(crate::node::settle(Duration::from_millis(50)))
            .sleep(tokio::time::sleep)
            .when(|e| {
                matches!(
                    e,
                    RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))
                ) && std::time::Instant::now() < deadline
            })
            .await
            .map(|(read, _)| read.map(|l| l.index))
            .map_err(Refusal::of_read)
    }

    /// Signs a member's renewal request. The certificate names the node the connection was
    /// authenticated as, whatever the request says.
    fn sign_renewal(&self, peer: u64, csr: &[u8]) -> Result<rpc::Renewed, CaError> {
        let signer = self
            .cluster()
            .and_then(|c| c.signer())
            .ok_or(CaError::NotSigner)?;
        let cert = signer
            .ca
            .sign(csr, peer, self.options.cert_validity)
            .map_err(CaError::pki("signing the renewal"))?;
        info!(node = peer, "renewed a node certificate");
        Ok(rpc::Renewed {
            cert: cert.to_vec(),
            ca: signer.ca.cert.to_vec(),
            cross: signer.cross.as_ref().map(|c| c.to_vec()),
        })
    }

    /// Makes a new join token; tokens made before stop working. Only on the CA's node.
    pub async fn rotate_token(&self) -> Result<JoinToken, CaError> {
        let signer = self
            .cluster()
            .and_then(|c| c.signer())
            .ok_or(CaError::NotTokenMaker)?;
        let token = JoinToken::new(signer.ca.fingerprint());
        self.run(MetaCommand::SetJoinSecret {
            hash: token.secret_hash(),
        })
        .await
        .map_err(CaError::op("recording the new token"))?;
        save_token(&self.data_dir, &token)
            .map_err(CaError::io(token_path(&self.data_dir).display()))?;
        Ok(token)
    }
}

/// What a removed node hears from every member.
fn revoked(id: u64) -> String {
    format!(
        "node {id} was removed from this cluster and its certificate revoked: stop its daemon, delete its data directory, and join again with a new token"
    )
}

/// Serves one request in the serving node's span, whoever's task runs it (on the in-memory
/// network the caller's task does).
async fn serve_one(node: Arc<Node>, peer: Option<u64>, req: Request) -> Response {
    let span = node.span().clone();
    span.in_scope(|| handle(node, peer, req))
        .instrument(span)
        .await
}

#[tracing::instrument(
    level = "debug",
    skip_all,
    fields(node = node.id, peer = ?peer, method = req.method())
)]
async fn handle(node: Arc<Node>, peer: Option<u64>, req: Request) -> Response {
    let Some(peer) = peer else {
        return match req {
            Request::Join(j) => Response::Join(
                node.handle_join(j)
                    .await
                    .map_err(|e| Refusal::Failed(e.to_string())),
            ),
            _ => Response::Denied(
                "only members of this cluster may call it; join with `shoal join` first".into(),
            ),
        };
    };
    if node.view.is_revoked(peer).unwrap_or(true) {
        warn!(peer, "refused a removed node");
        return Response::Denied(revoked(peer));
    }
    // A node the CA signed asks to be added: it is not a member yet, so it may ask only for itself.
    let joining_itself = matches!(&req, Request::AddMember { id, .. } if *id == peer);
    if !joining_itself && !node.is_member(peer) {
        warn!(peer, "refused a node that is not a member of the cluster");
        return Response::Denied(format!("node {peer} is not a member of this cluster"));
    }
    match req {
        Request::Append(r) => {
            if let Some(delay) = slow_append(node.id) {
                tokio::time::sleep(delay).await;
            }
            Response::Append(node.raft.append_entries(r).await.map_err(RaftFailure::of))
        }
        Request::Vote(r) => Response::Vote(node.raft.vote(r).await.map_err(RaftFailure::of)),
        Request::PreVote(r) => Response::PreVote(election::answer(&node, peer, r).await),
        Request::Snapshot(r) => {
            if let Some(delay) = slow_snapshot(node.id) {
                tokio::time::sleep(delay).await;
            }
            Response::Snapshot(
                node.raft
                    .install_snapshot(r)
                    .await
                    .map_err(RaftFailure::of_snapshot),
            )
        }
        Request::Propose(mut r) => {
            // One clock for every time in the log: leases are renewed and expired against the
            // leader's, whatever the proposer's clock says.
            r.now = crate::node::now_nanos();
            let drop_reply = drop_propose_reply(&r);
            let answer = node.propose_request(r).await;
            if drop_reply {
                // Applied, but the answer never reaches the proposer, which times out and
                // sends the proposal again.
                warn!(peer, "fault: dropping the answer to a forwarded proposal");
                tokio::time::sleep(shoal_net::rpc::CALL_TIMEOUT * 2).await;
            }
            Response::Propose(answer)
        }
        Request::ReadIndex => Response::ReadIndex(node.read_index_for_peer().await),
        Request::Join(j) => Response::Join(
            node.handle_join(j)
                .await
                .map_err(|e| Refusal::Failed(e.to_string())),
        ),
        Request::AddMember { id, addr } => Response::AddMember(node.add_member(id, addr).await),
        Request::RemoveMember { id } => Response::RemoveMember(node.remove_member(id).await),
        Request::RenewCert { csr } => Response::RenewCert(
            node.sign_renewal(peer, &csr)
                .map_err(|e| Refusal::Failed(e.to_string())),
        ),
        Request::PutBlock { id, data } => {
            Response::PutBlock(replicate::accept(&node, id, data).await)
        }
        Request::GetBlock { id, len } => Response::GetBlock(
            replicate::serve_get(&node, id, len)
                .await
                .map_err(Refusal::from),
        ),
        Request::HasBlocks { ids } => Response::HasBlocks(replicate::verify_held(&node, ids).await),
        Request::Restarted => {
            if let (Some(c), Some(addr)) = (node.cluster(), node.member_addr(peer)) {
                debug!(peer, %addr, "a peer restarted: dropping connections to its old process");
                c.peers.forget(addr).await;
            }
            Response::Restarted
        }
        Request::Unreferenced { delete } => Response::Unreferenced(
            fsck::unreferenced_here(&node, delete)
                .await
                .map_err(|e| Refusal::Failed(e.to_string())),
        ),
        Request::DropGarbage { blocks } => Response::DropGarbage(
            crate::node::gc::drop_here(&node, blocks)
                .await
                .map_err(|e| Refusal::Failed(e.to_string())),
        ),
    }
}

/// Tells every other member that this node is a new process, so that they drop their
/// connections to the old one at once instead of sending Raft traffic into them until QUIC's
/// idle timeout (a restarted node then hears from the leader within a heartbeat, instead of
/// seconds later and after an election of its own making). Best effort, at start.
pub(crate) async fn announce_restart(node: &Node) {
    let Some(c) = node.cluster() else { return };
    let calls = node
        .members()
        .into_iter()
        .filter(|(id, _)| *id != node.id)
        .filter_map(|(id, addr)| Some((id, addr.parse::<SocketAddr>().ok()?)))
        .map(|(id, addr)| {
            let peers = c.peers.clone();
            async move {
                let r = peers
                    .call_within::<_, Response>(addr, &Request::Restarted, Duration::from_secs(1))
                    .await;
                if let Err(e) = r {
                    debug!(peer = id, error = %e, "could not announce this restart");
                }
            }
        });
    let mut set = tokio::task::JoinSet::new();
    for call in calls {
        set.spawn(call);
    }
    while set.join_next().await.is_some() {}
}

/// Renews this node's certificate when half its validity has passed: asks each member in turn
/// (only the CA's node can sign), saves the new certificate and uses it for new connections.
pub async fn renew_worker(node: Weak<Node>) {
    loop {
        let wait = {
            let Some(node) = node.upgrade() else { return };
            let Some(c) = node.cluster() else { return };
            // A CA rotation or retirement in the state machine is followed within seconds.
            if let Err(e) = trust::follow(&node).await {
                warn!(error = %e, "following the cluster's CA set failed; trying again");
            }
            let not_after = c
                .identity
                .lock()
                .expect("identity lock")
                .not_after()
                .unwrap_or(0);
            let now = crate::node::now_nanos() / 1_000_000_000;
            let half = (node.options.cert_validity.as_secs() / 2) as i64;
            if not_after - now > half {
                Duration::from_secs((not_after - now - half).clamp(1, FOLLOW_EVERY) as u64)
            } else {
                match renew(&node, c).await {
                    Ok(()) => Duration::from_secs(1),
                    Err(e) => {
                        warn!(error = %e, "renewing this node's certificate failed; retrying");
                        Duration::from_secs(5)
                    }
                }
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// How often, in seconds, a node looks at the CA set in the state machine.
const FOLLOW_EVERY: i64 = 2;

async fn renew(node: &Node, c: &Cluster) -> Result<(), CaError> {
    let pending = {
        let id = c.identity.lock().expect("identity lock");
        PendingIdentity::renew(&id).map_err(CaError::pki("making a renewal request"))?
    };
    let req = Request::RenewCert {
        csr: pending.csr_der.clone(),
    };
    let mut last = String::from("no member holds the CA");
    for (id, addr) in node.members() {
        let Ok(addr) = addr.parse::<SocketAddr>() else {
            continue;
        };
        let reply = if id == node.id {
            node.sign_renewal(node.id, &pending.csr_der)
                .map_err(|e| e.to_string())
        } else {
            match c.peers.call::<_, Response>(addr, &req).await {
                Ok(Response::RenewCert(r)) => r.map_err(|e| e.to_string()),
                Ok(other) => Err(format!("unexpected response {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        };
        let got = match reply {
            Ok(got) => got,
            Err(e) => {
                last = e;
                continue;
            }
        };
        let trust = c.identity.lock().expect("identity lock").trust.clone();
        let mut renewed = pending
            .complete(got.cert.into(), got.ca.into())
            .map_err(CaError::pki("the renewed certificate"))?
            .with_trust(trust);
        renewed.cross = got.cross.map(Into::into);
        c.install(renewed)?;
        info!("renewed this node's certificate");
        return Ok(());
    }
    Err(CaError::NotRenewed(last))
}
