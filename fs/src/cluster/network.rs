//! The openraft network over QUIC: each Raft RPC is a `Request` to the target's address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use shoal_net::rpc::Peers;
use shoal_raft::TypeConfig;

use super::rpc::{RaftFailure, Request, Response};

pub struct QuicNetwork {
    pub peers: Arc<Peers>,
    /// Told of every snapshot chunk sent, so the log after the snapshot is kept.
    pub snapshot_sends: Arc<SnapshotSends>,
}

pub struct QuicPeer {
    peers: Arc<Peers>,
    snapshot_sends: Arc<SnapshotSends>,
    target: u64,
    addr: Result<SocketAddr, String>,
}

impl RaftNetworkFactory<TypeConfig> for QuicNetwork {
    type Network = QuicPeer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> QuicPeer {
        QuicPeer {
            peers: self.peers.clone(),
            snapshot_sends: self.snapshot_sends.clone(),
            target,
            addr: node
                .addr
                .parse()
                .map_err(|e| format!("node {target} has a bad address {:?}: {e}", node.addr)),
        }
    }
}

fn io(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

impl QuicPeer {
    /// Sends one Raft RPC, given `option.hard_ttl()` to answer (a snapshot chunk gets the
    /// 10 min `install_snapshot_timeout`), and never less than the usual call timeout: openraft
    /// itself gives up on appends and votes after a heartbeat interval, and a peer marked down
    /// for every slow heartbeat would lose its other traffic too.
    async fn send<E: std::error::Error>(
        &self,
        req: Request,
        option: &RPCOption,
    ) -> Result<Response, RPCError<u64, BasicNode, E>> {
        let addr = self
            .addr
            .clone()
            .map_err(|e| RPCError::Network(NetworkError::new(&io(e))))?;
        let timeout = option.hard_ttl().max(shoal_net::rpc::CALL_TIMEOUT);
        match self
            .peers
            .call_within::<_, Response>(addr, &req, timeout)
            .await
        {
            Ok(Response::Denied(why)) => Err(RPCError::Network(NetworkError::new(&io(why)))),
            Ok(resp) => Ok(resp),
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(&io(e.to_string())))),
        }
    }

    fn unexpected<E: std::error::Error>(&self, resp: Response) -> RPCError<u64, BasicNode, E> {
        RPCError::Network(NetworkError::new(&io(format!(
            "unexpected response {resp:?}"
        ))))
    }
}

impl QuicPeer {
    /// A peer's Raft failure that openraft need not act on: a network error, retried.
    fn failed<E: std::error::Error>(&self, e: RaftFailure) -> RPCError<u64, BasicNode, E> {
        let why = match e {
            RaftFailure::Fatal(why) => why,
            RaftFailure::SnapshotMismatch(m) => m.to_string(),
        };
        RPCError::Network(NetworkError::new(&io(format!(
            "node {}'s Raft failed: {why}",
            self.target
        ))))
    }
}

impl RaftNetwork<TypeConfig> for QuicPeer {
    /// How long replication to a node that did not answer waits before trying again: short at
    /// first, so that a daemon that restarted (its successor on the same port within tens of
    /// milliseconds) is caught up at once, instead of after openraft's constant 500 ms; then
    /// 500 ms, for a node that is down.
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(
            [25, 50, 100, 200]
                .into_iter()
                .chain(std::iter::repeat(500))
                .map(Duration::from_millis),
        )
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.send(Request::Append(rpc), &option).await? {
            Response::Append(r) => r.map_err(|e| self.failed(e)),
            other => Err(self.unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        let index = rpc.meta.last_log_id.map_or(0, |l| l.index);
        self.snapshot_sends.start(self.target, index);
        let sent = self.send(Request::Snapshot(rpc), &option).await;
        self.snapshot_sends.end(self.target, sent.is_ok());
        match sent? {
            Response::Snapshot(r) => r.map_err(|e| match e {
                RaftFailure::SnapshotMismatch(m) => RPCError::RemoteError(RemoteError::new(
                    self.target,
                    RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m)),
                )),
                other => self.failed(other),
            }),
            other => Err(self.unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.send(Request::Vote(rpc), &option).await? {
            Response::Vote(r) => r.map_err(|e| self.failed(e)),
            other => Err(self.unexpected(other)),
        }
    }
}

/// How long the log after a snapshot sent is kept once the send ended: the follower's first
/// append after its install comes within a few heartbeats.
const SENT_GRACE: Duration = Duration::from_secs(60);

/// The snapshots this node (as leader) is sending or has just sent, by follower: the node
/// keeps the log after them (`node::compact`).
#[derive(Default)]
pub struct SnapshotSends(Mutex<HashMap<u64, Send>>);

struct Send {
    /// The last log index the snapshot covers.
    index: u64,
    /// A chunk is under way.
    sending: bool,
    /// When the last chunk started or ended.
    at: Instant,
}

impl SnapshotSends {
    /// A chunk of the snapshot up to `index` starts on its way to `target`.
    pub fn start(&self, target: u64, index: u64) {
        let mut m = self.0.lock().expect("snapshot sends lock");
        m.insert(
            target,
            Send {
                index,
                sending: true,
                at: Instant::now(),
            },
        );
    }

    /// The chunk to `target` was answered (`answered`), or failed. A follower that does not
    /// answer (down, cut off) holds no log back.
    pub fn end(&self, target: u64, answered: bool) {
        let mut m = self.0.lock().expect("snapshot sends lock");
        if !answered {
            m.remove(&target);
        } else if let Some(s) = m.get_mut(&target) {
            s.sending = false;
            s.at = Instant::now();
        }
    }

    /// The lowest index the log must be kept after for the followers sent a snapshot: the
    /// snapshot's last index, or the follower's log (`matched`: the last index the leader knows
    /// it holds) once that reaches further, until `SENT_GRACE` after the send. A follower
    /// catching up from the log after its install is so never cut off from it, and one that
    /// is up to date holds nothing back.
    pub fn protected(&self, matched: impl Fn(u64) -> Option<u64>) -> Option<u64> {
        let mut m = self.0.lock().expect("snapshot sends lock");
        m.retain(|_, s| s.sending || s.at.elapsed() < SENT_GRACE);
        m.iter()
            .map(|(target, s)| s.index.max(matched(*target).unwrap_or(0)))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_after_a_snapshot_sent_is_kept_as_the_follower_catches_up_until_the_grace_ends() {
        let sends = SnapshotSends::default();
        let none = |_| None;
        assert_eq!(sends.protected(none), None);
        sends.start(2, 500);
        sends.start(3, 400);
        sends.start(4, 300);
        assert_eq!(sends.protected(none), Some(300));
        sends.end(4, true);
        sends.end(3, true);
        assert_eq!(sends.protected(none), Some(300), "still within the grace");
        let catching_up = |t| (t == 4).then_some(350);
        assert_eq!(
            sends.protected(catching_up),
            Some(350),
            "node 4 catches up from the log: what it lacks is kept"
        );
        let past = |t| (t == 4).then_some(450);
        assert_eq!(sends.protected(past), Some(400), "node 4 is past node 3");
        for t in [3, 4] {
            sends.0.lock().unwrap().get_mut(&t).unwrap().at -= SENT_GRACE;
        }
        assert_eq!(sends.protected(none), Some(500), "3's and 4's graces ended");
        sends.0.lock().unwrap().get_mut(&2).unwrap().at -= SENT_GRACE * 10;
        assert_eq!(
            sends.protected(none),
            Some(500),
            "a chunk under way never expires"
        );
        sends.end(2, false);
        assert_eq!(
            sends.protected(none),
            None,
            "a follower that did not answer holds nothing"
        );
    }
}
