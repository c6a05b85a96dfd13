//! Block replication: a committed block is on the writer and on the R-1 best other nodes in
//! rendezvous order for the block, and a reader that lacks a block fetches it from them.
//! A volume's `replicas=` sets R for its files and `placement=` limits the nodes to those
//! whose labels match (`Policy`).

use std::net::SocketAddr;

use bytes::Bytes;
use shoal_raft::BlockId;
use tracing::warn;

use super::rpc::{Request, Response};
use crate::blocks::BlockError;
use crate::node::{Node, OpError, OpResult};

/// How many copies of each block the cluster keeps, at most.
pub const REPLICAS: usize = 3;
/// How long a block transfer may take before the peer counts as down.
const BLOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn score(id: &BlockId, node: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&id.0);
    h.update(&node.to_le_bytes());
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// How many copies of a block to keep, and on which nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub replicas: usize,
    /// The nodes allowed to hold copies; `None` for every member.
    pub nodes: Option<Vec<u64>>,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            replicas: REPLICAS,
            nodes: None,
        }
    }
}

impl Policy {
    /// The policy of the volume whose root is `root` (the default outside volumes).
    pub fn of_volume(node: &Node, root: shoal_raft::Ino) -> Policy {
        use shoal_raft::Kv;
        if root == 0 {
            return Policy::default();
        }
        let options = node
            .view
            .volume_usage(root)
            .ok()
            .flatten()
            .and_then(|u| node.view.volume(&u.name).ok().flatten())
            .map(|v| v.options);
        let Some(o) = options else {
            return Policy::default();
        };
        let nodes = (!o.placement.is_empty()).then(|| {
            let labels = node.view.nodes().unwrap_or_default();
            node.members()
                .into_iter()
                .map(|(id, _)| id)
                .filter(|id| labels.get(id).is_some_and(|i| o.admits(&i.labels)))
                .collect()
        });
        Policy {
            replicas: o.replicas.map_or(REPLICAS, |r| r as usize),
            nodes,
        }
    }

    pub fn allows(&self, node: u64) -> bool {
        self.nodes.as_ref().is_none_or(|n| n.contains(&node))
    }

    /// The nodes that should hold block `id`, among `live`.
    pub fn holders(&self, id: &BlockId, live: &[u64]) -> Vec<u64> {
        let allowed: Vec<u64> = live.iter().copied().filter(|n| self.allows(*n)).collect();
        placement(id, &allowed, self.replicas)
    }
}

/// The nodes that should hold block `id`: the `r` best of `nodes` by rendezvous score.
pub fn placement(id: &BlockId, nodes: &[u64], r: usize) -> Vec<u64> {
    let mut ranked = nodes.to_vec();
    ranked.sort_by_key(|n| std::cmp::Reverse(score(id, *n)));
    ranked.truncate(r);
    ranked
}

/// The other members, best first, for block `id` (rendezvous hashing).
pub fn candidates(node: &Node, id: &BlockId) -> Vec<(u64, SocketAddr)> {
    let mut out: Vec<(u64, SocketAddr)> = node
        .members()
        .into_iter()
        .filter(|(n, _)| *n != node.id)
        .filter_map(|(n, addr)| Some((n, addr.parse().ok()?)))
        .collect();
    out.sort_by_key(|(n, _)| std::cmp::Reverse(score(id, *n)));
    out
}

/// Copies blocks this node just stored to the other nodes the policy wants (R-1 of them, or R
/// when this node is not one the policy allows), trying further candidates when one fails.
/// Returns once each block is durable on as many nodes as could take it.
pub async fn push(node: &Node, blocks: &[(BlockId, Bytes)], policy: &Policy) -> OpResult<()> {
    let Some(cluster) = node.cluster() else {
        return Ok(());
    };
    let mut tasks = Vec::new();
    for (id, data) in blocks {
        let order: Vec<(u64, SocketAddr)> = candidates(node, id)
            .into_iter()
            .filter(|(n, _)| policy.allows(*n))
            .collect();
        let here = usize::from(policy.allows(node.id));
        let want = policy.replicas.saturating_sub(here).min(order.len());
        let peers = cluster.peers.clone();
        let (id, data) = (*id, data.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            for (n, addr) in order {
                if done == want {
                    break;
                }
                let req = Request::PutBlock { id, data: data.clone() };
                match peers.call_within::<_, Response>(addr, &req, BLOCK_TIMEOUT).await {
                    Ok(Response::PutBlock(Ok(()))) => done += 1,
                    Ok(other) => warn!(block = %id, node = n, response = ?other, "replica refused"),
                    Err(e) => warn!(block = %id, node = n, error = %e, "replica unreachable"),
                }
            }
            if done < want {
                warn!(block = %id, copies = done + 1, wanted = want + 1, "block is under-replicated");
            }
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| OpError::Raft(format!("replication task failed: {e}")))?;
    }
    Ok(())
}

/// Fetches a block this node does not have from the nodes that should.
pub async fn fetch(node: &Node, id: BlockId, len: Option<u32>) -> Result<Bytes, BlockError> {
    let Some(cluster) = node.cluster() else {
        return Err(BlockError::Missing(id));
    };
    for (n, addr) in candidates(node, &id) {
        let req = Request::GetBlock { id, len };
        match cluster
            .peers
            .call_within::<_, Response>(addr, &req, BLOCK_TIMEOUT)
            .await
        {
            Ok(Response::GetBlock(Ok(data))) => {
                if BlockId::of(&data) == id {
                    return Ok(Bytes::from(data));
                }
                warn!(block = %id, node = n, "a replica sent bytes that do not match the block's hash");
            }
            Ok(Response::GetBlock(Err(e))) => {
                tracing::debug!(block = %id, node = n, error = e, "replica lacks the block")
            }
            Ok(other) => warn!(block = %id, node = n, response = ?other, "unexpected response"),
            Err(e) => warn!(block = %id, node = n, error = %e, "replica unreachable"),
        }
    }
    Err(BlockError::Missing(id))
}

/// Stores a block another node sent, after checking it against its name.
pub async fn accept(node: &Node, id: BlockId, data: Vec<u8>) -> Result<(), String> {
    if BlockId::of(&data) != id {
        return Err(format!(
            "the bytes sent for block {id} do not hash to its name"
        ));
    }
    let store = node.blocks.clone();
    tokio::task::spawn_blocking(move || {
        store.put(&id, &data)?;
        store.sync_dirs([&id])
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

pub async fn serve_get(node: &Node, id: BlockId, len: Option<u32>) -> Result<Vec<u8>, String> {
    let store = node.blocks.clone();
    tokio::task::spawn_blocking(move || {
        let len = match len {
            Some(len) => len,
            None => store.len_of(&id)?,
        };
        store.get(&id, len).map(|b| b.to_vec())
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}
