//! Membership: who the members are and where, asking the leader, adding and removing nodes,
//! and a node making sure it is a member when it starts.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use shoal_net::pki::{Ca, PendingIdentity};
use shoal_net::token::JoinToken;
use shoal_raft::MetaCommand;
use tracing::{debug, info};

use std::sync::Arc;

use super::{Node, NodeError, OpError};
use crate::cluster::rpc::{self, Refusal, Request, Response};
use crate::cluster::{Cluster, TlsError, save_token, tls_dir, token_path};

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

    pub(super) fn is_member(&self, id: u64) -> bool {
        let m = self.raft.metrics().borrow().membership_config.clone();
        // A node that is still joining has no membership yet and trusts the cluster's CA.
        m.nodes().next().is_none() || m.nodes().any(|(n, _)| *n == id)
    }

    /// A member's address, from the membership.
    pub(super) fn member_addr(&self, id: u64) -> Option<SocketAddr> {
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
            answer = cluster.peers.call_within(addr, req, req.timeout()) => answer
                .map_err(|e| OpError::Raft(format!("forwarding to the leader at {addr}: {e}"))),
            () = replaced => Err(OpError::Raft(format!(
                "the leader at {addr} was replaced while a request to it was under way"
            ))),
        }
    }
}

/// Creates the cluster's CA and node 1's certificate in `DATA/tls`, and the first join token.
pub fn init_tls(
    data: &Path,
    config: &crate::node::ClusterConfig,
    validity: Duration,
) -> Result<JoinToken, NodeError> {
    let dir = tls_dir(data);
    let err = |source| NodeError::from(TlsError::pki("creating the cluster CA")(source));
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
                client: node.config.client,
            };
            // The member answers once this node has caught up: a snapshot of a large tree
            // takes a while to send and install.
            match cluster
                .peers
                .call_within::<_, Response>(peer_addr, &req, req.timeout())
                .await
            {
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
                // A peer that misses it keeps sending to the old process until QUIC gives up
                // on it (10 s), longer than a session lease: worth a few tries.
                for attempt in 1..=3 {
                    let r = peers
                        .call_within::<_, Response>(
                            addr,
                            &Request::Restarted,
                            Duration::from_secs(1),
                        )
                        .await;
                    match r {
                        Ok(_) => return,
                        Err(e) if attempt == 3 => {
                            info!(peer = id, error = %e, "could not announce this restart");
                        }
                        Err(e) => {
                            debug!(peer = id, attempt, error = %e, "announcing this restart failed; trying again");
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                    }
                }
            }
        });
    let mut set = tokio::task::JoinSet::new();
    for call in calls {
        set.spawn(call);
    }
    while set.join_next().await.is_some() {}
}
