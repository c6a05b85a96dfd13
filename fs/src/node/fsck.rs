//! `shoal fsck`: the metadata against the blocks, across the cluster.
//!
//! Every block a layout references is read and verified on every member (`HasBlocks`, which
//! quarantines a damaged copy), and compared with the nodes its policy places it on among the
//! live members. The command walks the referenced blocks in batches (`check`, driven by the CLI
//! so that it can show progress), then, with `--repair`, copies a good copy to each node that
//! should hold one and lacks it (`repair`). Blocks on a node's disk that nothing references are
//! counted by each node (`unreferenced`), and deleted with `--repair`; otherwise each node's
//! sweep deletes them after an hour.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_raft::{BlockId, Kv};
use tracing::Instrument;

use super::repair::{live_nodes, volume_policies};
use super::replicate::{self, Policy};
use super::{Node, OpError};
use crate::blocks::BlockError;
use crate::blocks::gc::{Unreferenced, scan_unreferenced};
use crate::cluster::rpc::{PeerError, Request, Response};

/// Why a check, a repair or a count of unreferenced blocks stopped.
#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    #[error("waiting for the cluster's latest metadata: {0}")]
    Barrier(OpError),
    #[error("metadata store: {0}")]
    Store(#[from] shoal_raft::StoreError),
    #[error("block {id}: {source}")]
    Block { id: BlockId, source: BlockError },
    #[error("this node's block store: {0}")]
    Disk(BlockError),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("a block store task ended without finishing: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// How long a member may take to read and verify a batch.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(60);

/// What fsck found for one referenced block.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct BlockCheck {
    pub id: BlockId,
    /// The nodes its policy places it on, among the live members.
    pub holders: Vec<u64>,
    /// The members whose copy was read and verified.
    pub good: Vec<u64>,
}

impl BlockCheck {
    /// No member has a good copy: the bytes are gone.
    pub fn lost(&self) -> bool {
        self.good.is_empty()
    }

    /// Nodes that should hold a copy and do not have a good one.
    pub fn lacking(&self) -> Vec<u64> {
        self.holders
            .iter()
            .copied()
            .filter(|n| !self.good.contains(n))
            .collect()
    }

    pub fn healthy(&self) -> bool {
        !self.lost() && self.lacking().is_empty()
    }
}

/// One batch of `check`.
#[derive(Serialize, Deserialize, Debug)]
pub struct FsckBatch {
    /// Referenced blocks in all.
    pub total: u64,
    pub checked: Vec<BlockCheck>,
    /// Where the next batch starts; `None` after the last.
    pub next: Option<BlockId>,
    /// Members that did not answer (their copies count as absent).
    pub unreachable: Vec<u64>,
}

/// Checks the referenced blocks after `after` (at most `limit`), or exactly `only`.
pub async fn check(
    node: &Node,
    after: Option<BlockId>,
    limit: usize,
    only: Vec<BlockId>,
) -> Result<FsckBatch, FsckError> {
    node.read_barrier().await.map_err(FsckError::Barrier)?;
    let all = node.view.block_ids()?;
    let total = all.len() as u64;
    let (ids, next) = if only.is_empty() {
        let rest: Vec<BlockId> = all.into_iter().filter(|id| Some(*id) > after).collect();
        let more = rest.len() > limit;
        let ids: Vec<BlockId> = rest.into_iter().take(limit).collect();
        let next = if more { ids.last().copied() } else { None };
        (ids, next)
    } else {
        (only, None)
    };
    let live = live_nodes(node);
    let special = volume_policies(node);
    let default = [Policy::default()];
    let (good, unreachable) = ask_everyone(node, &ids).await;
    let mut checked = Vec::with_capacity(ids.len());
    for (k, id) in ids.into_iter().enumerate() {
        // A block freed while fsck ran is no problem of anyone's.
        if node.view.block_refs(&id).unwrap_or(1) == 0 {
            continue;
        }
        // Held in the state machine on every member until written out (`node::spill`).
        if node.view.is_inline(&id).unwrap_or(false) {
            continue;
        }
        let policies = special.get(&id).map_or(&default[..], Vec::as_slice);
        let holders: BTreeSet<u64> = policies
            .iter()
            .flat_map(|p| p.holders(&id, &live))
            .collect();
        checked.push(BlockCheck {
            id,
            holders: holders.into_iter().collect(),
            good: good
                .iter()
                .filter(|(_, has)| has.get(k).copied().unwrap_or(false))
                .map(|(n, _)| *n)
                .collect(),
        });
    }
    Ok(FsckBatch {
        total,
        checked,
        next,
        unreachable,
    })
}

/// Every member's verified answer for `ids`: (member, per block), and the members that did
/// not answer.
async fn ask_everyone(node: &Node, ids: &[BlockId]) -> (Vec<(u64, Vec<bool>)>, Vec<u64>) {
    let mut answers = vec![(node.id, replicate::verify_held(node, ids.to_vec()).await)];
    let mut unreachable = Vec::new();
    let Some(cluster) = node.cluster() else {
        return (answers, unreachable);
    };
    let mut set = tokio::task::JoinSet::new();
    // Clients hold no blocks: nothing to ask them.
    let clients = node.clients();
    for (n, addr) in node.other_members() {
        if clients.contains(&n) {
            continue;
        }
        let Ok(addr) = addr else {
            unreachable.push(n);
            continue;
        };
        let (peers, req) = (
            cluster.peers.clone(),
            Request::HasBlocks { ids: ids.to_vec() },
        );
        set.spawn(
            async move {
                let r = peers
                    .call_within::<_, Response>(addr, &req, VERIFY_TIMEOUT)
                    .await;
                (n, r)
            }
            .in_current_span(),
        );
    }
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((n, Ok(Response::HasBlocks(has)))) if has.len() == ids.len() => {
                answers.push((n, has));
            }
            Ok((n, _)) => unreachable.push(n),
            Err(_) => {}
        }
    }
    unreachable.sort_unstable();
    (answers, unreachable)
}

/// Puts a good copy of each block on every node that should hold one and lacks it. Returns
/// the copies made.
pub async fn repair(node: &Node, ids: Vec<BlockId>) -> Result<u64, FsckError> {
    let batch = check(node, None, 0, ids).await?;
    let mut made = 0;
    let addrs: std::collections::HashMap<u64, SocketAddr> = node
        .members()
        .into_iter()
        .filter_map(|(n, a)| Some((n, a.parse().ok()?)))
        .collect();
    for b in batch.checked {
        let lacking = b.lacking();
        if lacking.is_empty() || b.lost() {
            continue;
        }
        let data = replicate::fetch(node, b.id, None)
            .await
            .map_err(|source| FsckError::Block { id: b.id, source })?;
        for n in lacking {
            if n == node.id {
                let (store, id, bytes) = (node.blocks.clone(), b.id, data.clone());
                tokio::task::spawn_blocking(move || {
                    store.put(&id, &bytes).and_then(|_| store.sync_dirs([&id]))
                })
                .await?
                .map_err(|source| FsckError::Block { id: b.id, source })?;
                made += 1;
                continue;
            }
            let (Some(addr), Some(cluster)) = (addrs.get(&n), node.cluster()) else {
                continue;
            };
            let req = Request::PutBlock {
                id: b.id,
                data: data.to_vec(),
            };
            match cluster
                .peers
                .call_within::<_, Response>(*addr, &req, VERIFY_TIMEOUT)
                .await
            {
                Ok(Response::PutBlock(Ok(()))) => made += 1,
                Ok(Response::PutBlock(Err(refusal))) => {
                    return Err(PeerError::Refused { node: n, refusal }.into());
                }
                Ok(other) => return Err(PeerError::unexpected(n, &other).into()),
                Err(error) => return Err(PeerError::Unreachable { node: n, error }.into()),
            }
        }
    }
    Ok(made)
}

/// This node's blocks on disk that no layout references, older than the guard a pushed block
/// gets (a younger one may belong to a commit under way); with `delete`, deleted. Decided
/// after a read barrier, so every layout committed before the question counts.
pub async fn unreferenced_here(
    node: &std::sync::Arc<Node>,
    delete: bool,
) -> Result<Unreferenced, FsckError> {
    node.read_barrier().await.map_err(FsckError::Barrier)?;
    let n = node.clone();
    let found = tokio::task::spawn_blocking(move || {
        scan_unreferenced(&n.blocks, &n.needed(), replicate::RECEIVED_GUARD, delete)
    })
    .await?
    .map_err(FsckError::Disk)?;
    if delete && found.blocks > 0 {
        tracing::info!(
            blocks = found.blocks,
            bytes = found.bytes,
            "fsck --repair: deleted blocks no layout references"
        );
    }
    Ok(found)
}

/// Every member's answer to `unreferenced_here`, or why it gave none.
pub async fn unreferenced(
    node: &std::sync::Arc<Node>,
    delete: bool,
) -> Vec<(u64, Result<Unreferenced, FsckError>)> {
    let mut answers = vec![(node.id, unreferenced_here(node, delete).await)];
    let Some(cluster) = node.cluster() else {
        return answers;
    };
    let mut set = tokio::task::JoinSet::new();
    for (n, addr) in node.other_members() {
        let addr = match addr {
            Ok(addr) => addr,
            Err(e) => {
                answers.push((n, Err(e.into())));
                continue;
            }
        };
        let peers = cluster.peers.clone();
        set.spawn(
            async move {
                let r = peers
                    .call_within::<_, Response>(
                        addr,
                        &Request::Unreferenced { delete },
                        VERIFY_TIMEOUT,
                    )
                    .await;
                let answer = match r {
                    Ok(Response::Unreferenced(a)) => {
                        a.map_err(|refusal| PeerError::Refused { node: n, refusal }.into())
                    }
                    Ok(other) => Err(PeerError::unexpected(n, &other).into()),
                    Err(error) => Err(PeerError::Unreachable { node: n, error }.into()),
                };
                (n, answer)
            }
            .in_current_span(),
        );
    }
    while let Some(joined) = set.join_next().await {
        if let Ok(a) = joined {
            answers.push(a);
        }
    }
    answers.sort_by_key(|(n, _)| *n);
    answers
}
