//! The requests nodes send each other, one enum for the whole protocol.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use shoal_raft::{BlockId, MetaRequest, MetaResponse, TypeConfig};

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
    pub cluster_id: String,
    pub block_size: u32,
}

#[derive(Serialize, Deserialize, Debug)]
pub enum Response {
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    Snapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    /// The log index the proposal was applied at, and its results.
    Propose(Result<(u64, MetaResponse), String>),
    ReadIndex(Result<Option<u64>, String>),
    Join(Result<JoinReply, String>),
    AddMember(Result<(), String>),
    RemoveMember(Result<(), String>),
    /// The renewed certificate.
    RenewCert(Result<Vec<u8>, String>),
    PutBlock(Result<(), String>),
    GetBlock(Result<Vec<u8>, String>),
    HasBlocks(Vec<bool>),
    Restarted,
    /// The request was refused: the caller is not allowed to make it.
    Denied(String),
}
