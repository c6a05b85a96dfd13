//! The requests other nodes send this one, answered: the node's `cluster::Handler`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use shoal_raft::{MetaCommand, Reply};
use tracing::{Instrument, debug, info, warn};

use super::trust::CaError;
use super::{Node, election, fsck, replicate};
use crate::cluster::rpc::{self, JoinReply, JoinRequest, RaftFailure, Refusal, Request, Response};
use crate::cluster::{Handler, revoked};

/// The first nodes of a cluster are voters; later ones are learners.
pub const VOTERS: usize = 3;

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

impl Handler for Node {
    fn is_revoked(&self, peer: u64) -> bool {
        self.view.is_revoked(peer).unwrap_or(true)
    }

    /// Serves one request in the serving node's span, whoever's task runs it (on the in-memory
    /// network the caller's task does).
    async fn serve(self: Arc<Self>, peer: Option<u64>, req: Request) -> Response {
        let span = self.span().clone();
        span.in_scope(|| handle(self, peer, req))
            .instrument(span)
            .await
    }
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
        Request::AddMember { id, addr, client } => {
            Response::AddMember(node.add_member(id, addr, client).await)
        }
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
        Request::RepairState => Response::RepairState(node.repair_state()),
        Request::DropGarbage { blocks } => Response::DropGarbage(
            crate::node::gc::drop_here(&node, blocks)
                .await
                .map_err(|e| Refusal::Failed(e.to_string())),
        ),
    }
}

impl Node {
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

    /// On the leader: adds a node as a learner, and as a voter while there are fewer than
    /// three, unless it is a client: that one is marked first (`members::CLIENT_LABEL`), so no
    /// node ever places a block on it, and stays a learner.
    async fn add_member(&self, id: u64, addr: String, client: bool) -> Result<(), Refusal> {
        if self.leader_addr().is_some() {
            return match self
                .to_leader(&Request::AddMember { id, addr, client })
                .await
            {
                Ok(Response::AddMember(r)) => r,
                Ok(other) => Err(format!("unexpected response {other:?}").into()),
                Err(e) => Err(e.to_string().into()),
            };
        }
        if client {
            self.run(MetaCommand::SetNodeLabel {
                node: id,
                key: super::members::CLIENT_LABEL.into(),
                value: Some("true".into()),
            })
            .await
            .map_err(|e| format!("marking node {id} a client: {e}"))?;
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
        if !client && voters.len() < VOTERS && voters.insert(id) {
            self.raft.change_membership(voters, false).await.map_err(
                |e| match Refusal::of_write(e) {
                    Refusal::Failed(e) => format!("making node {id} a voter: {e}").into(),
                    r => r,
                },
            )?;
        }
        info!(node = id, addr, client, "node added to the cluster");
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
    pub(super) fn sign_renewal(&self, peer: u64, csr: &[u8]) -> Result<rpc::Renewed, CaError> {
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
}
