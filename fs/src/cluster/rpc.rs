//! The requests nodes send each other, one enum for the whole protocol.

use openraft::error::{
    CheckIsLeaderError, ClientWriteError, InstallSnapshotError, RaftError, SnapshotMismatch,
};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, LogId};
use serde::{Deserialize, Serialize};
use shoal_raft::{BlockId, MetaRequest, MetaResponse, TypeConfig};

/// A voter asks: would you vote for me if I started an election now? (`node::election`)
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PreVote {
    /// The term the candidate's election would have.
    pub term: u64,
    /// The candidate's last log entry.
    pub last_log: Option<LogId<u64>>,
}

#[derive(Serialize, Deserialize, Debug)]
pub enum Request {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A metadata proposal forwarded to the leader.
    Propose(MetaRequest),
    /// The leader's read index: its commit index, once a quorum confirmed it still leads.
    ReadIndex,
    /// A node without a certificate asks to join.
    Join(JoinRequest),
    /// A node the CA signed asks the leader to add it to the membership.
    AddMember {
        id: u64,
        addr: String,
        /// A client node: a learner for good, and never a holder of blocks.
        client: bool,
    },
    /// A member asks the CA for a new certificate for its key (signing request attached).
    RenewCert {
        csr: Vec<u8>,
    },
    /// Removes a node from the membership (forwarded to the leader).
    RemoveMember {
        id: u64,
    },
    /// Store this block durably; the receiver verifies it against its name.
    PutBlock {
        id: BlockId,
        data: Vec<u8>,
    },
    /// A whole block; `len` is its length where the caller knows it.
    GetBlock {
        id: BlockId,
        len: Option<u32>,
    },
    /// Which of these blocks the receiver holds (before another node drops an extra copy).
    HasBlocks {
        ids: Vec<BlockId>,
    },
    /// The caller is a new process of its node: drop connections to its old one, which the
    /// QUIC idle timeout would otherwise keep for seconds (answered `Restarted`).
    Restarted,
    /// How many blocks on the receiver's disk no layout references (`shoal fsck`); with
    /// `delete`, delete them (`shoal fsck --repair`).
    Unreferenced {
        delete: bool,
    },
    /// The caller collected these garbage blocks: delete this node's copies (answered once
    /// done, after which the state machine may forget them).
    DropGarbage {
        blocks: Vec<BlockId>,
    },
    /// Would the receiver vote for the caller in an election now (`node::election`)?
    PreVote(PreVote),
    /// How far the receiver's re-replication is (`shoal node rm` waits on it).
    RepairState,
}

/// How long a new member's `AddMember` may take: the leader answers once the node has caught
/// up, which for a large tree is a snapshot of hundreds of MB (87 MB, 40 s, at a million files).
pub const ADD_MEMBER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

impl Request {
    /// How long a caller waits for the answer.
    pub fn timeout(&self) -> std::time::Duration {
        match self {
            Request::AddMember { .. } => ADD_MEMBER_TIMEOUT,
            _ => shoal_net::rpc::CALL_TIMEOUT,
        }
    }

    /// The request's kind, for spans and logs.
    pub fn method(&self) -> &'static str {
        match self {
            Request::Append(_) => "append",
            Request::Vote(_) => "vote",
            Request::Snapshot(_) => "snapshot",
            Request::Propose(_) => "propose",
            Request::ReadIndex => "read_index",
            Request::Join(_) => "join",
            Request::AddMember { .. } => "add_member",
            Request::RenewCert { .. } => "renew_cert",
            Request::RemoveMember { .. } => "remove_member",
            Request::PutBlock { .. } => "put_block",
            Request::GetBlock { .. } => "get_block",
            Request::HasBlocks { .. } => "has_blocks",
            Request::Restarted => "restarted",
            Request::Unreferenced { .. } => "unreferenced",
            Request::DropGarbage { .. } => "drop_garbage",
            Request::PreVote(_) => "pre_vote",
            Request::RepairState => "repair_state",
        }
    }
}

/// What a request of each kind may weigh on the wire. Bulk kinds carry blocks, log entries
/// and snapshot chunks; the rest are a few ids and a signing request.
const BULK: usize = shoal_net::frame::MAX_FRAME;
const SMALL: usize = 64 << 10;
/// All a peer without a certificate may send: a join request (a secret and a CSR).
const STRANGER: usize = 16 << 10;

impl Request {
    /// The largest request a peer may send (see `shoal_net::rpc::Limits`), by its kind: the
    /// postcard variant index, which is the order of the variants above.
    pub fn max_frame(authenticated: bool, kind: Option<u32>) -> usize {
        if !authenticated {
            return STRANGER;
        }
        match kind {
            // Append, Snapshot, Propose, PutBlock.
            Some(0 | 2 | 3 | 9) => BULK,
            // HasBlocks, DropGarbage: a batch of 32-byte ids.
            Some(11 | 14) => 1 << 20,
            _ => SMALL,
        }
    }
}

#[derive(Serialize, Deserialize, Debug)]
pub struct JoinRequest {
    pub secret: [u8; 16],
    /// The joining node's certificate signing request; its key never leaves it.
    pub csr: Vec<u8>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct JoinReply {
    pub node_id: u64,
    pub cert: Vec<u8>,
    pub ca: Vec<u8>,
    /// `ca` signed by the CA before it, during a CA rotation.
    pub cross: Option<Vec<u8>>,
    /// The CAs members accept (see `node::trust`).
    pub trust: Vec<Vec<u8>>,
    pub cluster_id: String,
    pub block_size: u32,
}

/// A renewed certificate, with the CA that signed it and, during a rotation, that CA
/// cross-signed by the one before.
#[derive(Serialize, Deserialize, Debug)]
pub struct Renewed {
    pub cert: Vec<u8>,
    pub ca: Vec<u8>,
    pub cross: Option<Vec<u8>>,
}

/// A peer's Raft failed to take a request. openraft's own error types nest without bound
/// (`AnyError`'s chain of sources), and decoding a chain a peer made deep enough overflows the
/// stack (found by fuzzing), so on the wire a fatal error is its text, and the one API error
/// the protocol acts on, a snapshot chunk out of order, is kept as it is.
#[derive(Serialize, Deserialize, Debug)]
pub enum RaftFailure {
    /// The peer's Raft stopped (its log's disk failed, or it is shutting down).
    Fatal(String),
    /// `InstallSnapshotError::SnapshotMismatch`: the leader starts the snapshot over.
    SnapshotMismatch(SnapshotMismatch),
}

impl RaftFailure {
    pub fn of<E: std::fmt::Display>(e: RaftError<u64, E>) -> RaftFailure {
        RaftFailure::Fatal(e.to_string())
    }

    pub fn of_snapshot(e: RaftError<u64, InstallSnapshotError>) -> RaftFailure {
        match e {
            RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m)) => {
                RaftFailure::SnapshotMismatch(m)
            }
            RaftError::Fatal(f) => RaftFailure::Fatal(f.to_string()),
        }
    }
}

/// Why a peer did not do what a request asked, as it crosses the wire. Callers act on the
/// kind (`is_transient` decides a retry); `Failed` is the receiver's own failure in words, for
/// the operator.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The node asked does not lead the cluster, or no longer does.
    #[error("the node asked is not the leader")]
    NotLeader,
    /// The leader heard from no quorum this round.
    #[error("no quorum answered the leader")]
    NoQuorum,
    /// The receiver keeps its free space for its own metadata: put the block elsewhere.
    #[error("node {0}'s data disk is full")]
    DiskFull(u64),
    /// A block's bytes do not hash to its name.
    #[error("the bytes sent for block {0} do not hash to its name")]
    Mismatch(BlockId),
    #[error("{0}")]
    Failed(String),
}

impl Refusal {
    /// Worth asking again once an election settles: the leader changed or lost its quorum.
    pub fn is_transient(&self) -> bool {
        matches!(self, Refusal::NotLeader | Refusal::NoQuorum)
    }

    /// A write (proposal, membership change) the local Raft did not take.
    pub fn of_write(e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> Refusal {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => Refusal::NotLeader,
            // Its Raft stopped (the daemon is stopping or handing over to its successor): it
            // leads no more, and the proposal, numbered, can go to the next leader.
            RaftError::Fatal(_) => Refusal::NotLeader,
            e => Refusal::Failed(e.to_string()),
        }
    }

    /// A read index the local Raft could not give.
    pub fn of_read(e: RaftError<u64, CheckIsLeaderError<u64, BasicNode>>) -> Refusal {
        match e {
            RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)) => Refusal::NotLeader,
            RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)) => Refusal::NoQuorum,
            RaftError::Fatal(_) => Refusal::NotLeader,
        }
    }
}

impl From<String> for Refusal {
    fn from(why: String) -> Refusal {
        Refusal::Failed(why)
    }
}

/// Another member did not do what this node asked of it.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("node {node}'s address {addr:?} does not parse: {error}")]
    BadAddress {
        node: u64,
        addr: String,
        error: std::net::AddrParseError,
    },
    #[error("node {node} did not answer: {error}")]
    Unreachable {
        node: u64,
        error: shoal_net::rpc::RpcError,
    },
    #[error("node {node} refused: {refusal}")]
    Refused { node: u64, refusal: Refusal },
    #[error("node {node} answered {answer}")]
    Unexpected { node: u64, answer: String },
    /// The task asking a member ended without its answer (it panicked).
    #[error("a request to another member ended without an answer: {0}")]
    Lost(#[from] tokio::task::JoinError),
}

impl PeerError {
    /// The answer `node` gave, when it is not the kind asked for.
    pub fn unexpected(node: u64, answer: &Response) -> PeerError {
        PeerError::Unexpected {
            node,
            answer: format!("{answer:?}"),
        }
    }
}

#[derive(Serialize, Deserialize, Debug)]
pub enum Response {
    Append(Result<AppendEntriesResponse<u64>, RaftFailure>),
    Vote(Result<VoteResponse<u64>, RaftFailure>),
    Snapshot(Result<InstallSnapshotResponse<u64>, RaftFailure>),
    /// The log index the proposal was applied at, and its results.
    Propose(Result<(u64, MetaResponse), Refusal>),
    ReadIndex(Result<Option<u64>, Refusal>),
    Join(Result<JoinReply, Refusal>),
    AddMember(Result<(), Refusal>),
    RemoveMember(Result<(), Refusal>),
    RenewCert(Result<Renewed, Refusal>),
    PutBlock(Result<(), Refusal>),
    GetBlock(Result<Vec<u8>, Refusal>),
    HasBlocks(Vec<bool>),
    Restarted,
    Unreferenced(Result<crate::blocks::gc::Unreferenced, Refusal>),
    DropGarbage(Result<(), Refusal>),
    /// The request was refused: the caller is not allowed to make it.
    Denied(String),
    PreVote(bool),
    RepairState(RepairState),
}

/// A node's re-replication: the repair rounds it finished since it started, and the copies it
/// should hold and lacks (counting down during a round; after it, those it could not fetch).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairState {
    pub rounds: u64,
    pub missing: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit_of(req: &Request) -> usize {
        let bytes = postcard::to_stdvec(req).unwrap();
        let kind = postcard::take_from_bytes::<u32>(&bytes)
            .ok()
            .map(|(k, _)| k);
        Request::max_frame(true, kind)
    }

    #[test]
    fn each_kind_of_request_has_the_limit_meant_for_it() {
        let id = BlockId([7; 32]);
        assert_eq!(
            limit_of(&Request::PutBlock {
                id,
                data: vec![0; 10]
            }),
            BULK
        );
        assert_eq!(limit_of(&Request::GetBlock { id, len: None }), SMALL);
        assert_eq!(limit_of(&Request::HasBlocks { ids: vec![id] }), 1 << 20);
        assert_eq!(limit_of(&Request::ReadIndex), SMALL);
        assert_eq!(limit_of(&Request::Restarted), SMALL);
        assert_eq!(limit_of(&Request::Unreferenced { delete: true }), SMALL);
        assert_eq!(
            limit_of(&Request::DropGarbage { blocks: vec![id] }),
            1 << 20
        );
        assert_eq!(limit_of(&Request::RemoveMember { id: 3 }), SMALL);
        assert_eq!(limit_of(&Request::RenewCert { csr: vec![1] }), SMALL);
        let propose = MetaRequest {
            now: 0,
            session: 1,
            seq: 1,
            acked: 0,
            cmds: vec![],
        };
        assert_eq!(limit_of(&Request::Propose(propose)), BULK);
        assert_eq!(
            limit_of(&Request::Join(JoinRequest {
                secret: [0; 16],
                csr: vec![]
            })),
            SMALL
        );
        assert_eq!(Request::max_frame(false, Some(9)), STRANGER);
    }
}
