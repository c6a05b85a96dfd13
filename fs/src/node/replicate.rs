//! Block replication: a committed block is on the writer and on the R-1 best other nodes in
//! rendezvous order for the block, and a reader that lacks a block fetches it from them.
//! A volume's `replicas=` sets R for its files and `placement=` limits the nodes to those
//! whose labels match (`Policy`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_raft::{BlockId, Kv};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, warn};

use super::{Node, OpError, OpResult};
use crate::blocks::BlockError;
use crate::cluster::rpc::{Refusal, Request, Response};

/// How many copies of each block the cluster keeps, at most.
pub const REPLICAS: usize = 3;
/// How long a block transfer may take before the peer counts as down.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(10);

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
                .filter(|id| {
                    labels.get(id).is_some_and(|i| {
                        o.admits(&i.labels) && !i.labels.contains_key(super::members::CLIENT_LABEL)
                    })
                })
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

/// The other members that hold blocks (clients do not), best first, for block `id`
/// (rendezvous hashing).
pub fn candidates(node: &Node, id: &BlockId) -> Vec<(u64, SocketAddr)> {
    let clients = node.clients();
    let mut out: Vec<(u64, SocketAddr)> = node
        .members()
        .into_iter()
        .filter(|(n, _)| *n != node.id && !clients.contains(n))
        .filter_map(|(n, addr)| Some((n, addr.parse().ok()?)))
        .collect();
    out.sort_by_key(|(n, _)| std::cmp::Reverse(score(id, *n)));
    out
}

/// How long a commit waits for a copy that has not landed, at least, once the block is on
/// two nodes: past it (or past four times the fastest copy, if longer), a slow or dead
/// member's copy finishes in the background and repair places the block when it answers.
const SLOW_COPY: Duration = Duration::from_millis(300);

/// The other members `allows` admits, in the order to ask them about block `id`: the live
/// ones (a session lease) that answered lately first, each group in rendezvous order. The
/// second value says how many lead: asking the others means waiting on a node that is
/// probably dead.
fn by_health(
    node: &Node,
    id: &BlockId,
    allows: impl Fn(u64) -> bool,
) -> (Vec<(u64, SocketAddr)>, usize) {
    let live = super::repair::live_nodes(node);
    let cluster = node.cluster();
    let healthy = |n: u64, addr: SocketAddr| {
        live.contains(&n) && !cluster.is_some_and(|c| c.peers.is_down(addr) || c.slow.is_slow(n))
    };
    let (good, rest): (Vec<_>, Vec<_>) = candidates(node, id)
        .into_iter()
        .filter(|(n, _)| allows(*n))
        .partition(|(n, addr)| healthy(*n, *addr));
    let lead = good.len();
    (good.into_iter().chain(rest).collect(), lead)
}

/// How long a commit keeps trying to get a block onto a second node before it fails, and the
/// pause between rounds over the candidates.
const NEED_PATIENCE: Duration = Duration::from_secs(10);
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Copies blocks this node just stored to the other nodes the policy wants (R-1 of them, or R
/// when this node is not one the policy allows), trying further candidates when one fails.
/// Returns once each block is durable on as many nodes as could take it, except that a member
/// that is down, has no live session or is slow (`SLOW_COPY`) is not waited for once the
/// block is on two nodes: one dead node must not stall every fsync of the cluster.
///
/// **The promise of an fsync:** each block is on min(R, 2) nodes, this one and at least one
/// other, when the policy asks for more than one copy; written on a client, which keeps no
/// copy, on min(R, 2) others. If no other node took a copy (every
/// candidate refused or did not answer), the commit fails with `OpError::Replication` (EIO):
/// its data stays buffered and the next fsync or close tries again.
pub async fn push(node: &Node, blocks: &[(BlockId, Bytes)], policy: &Policy) -> OpResult<()> {
    let Some(cluster) = node.cluster() else {
        return Ok(());
    };
    let mut tasks = Vec::new();
    for (id, data) in blocks {
        let (order, healthy) = by_health(node, id, |n| policy.allows(n));
        let client = node.config.client;
        let here = usize::from(policy.allows(node.id) && !client);
        let want = policy.replicas.saturating_sub(here).min(order.len());
        // The writer keeps a copy whatever the policy, so one more makes two; a client keeps
        // none, so two others must take one.
        let need = want.min(if client { 2 } else { 1 });
        let copy = CopyJob {
            cluster: cluster.clone(),
            metrics: node.metrics.clone(),
            id: *id,
            data: data.clone(),
        };
        tasks.push(tokio::spawn(
            copy.run(order, healthy, want, need).in_current_span(),
        ));
    }
    let mut short = Vec::new();
    for t in tasks {
        let (id, copies, need) = t
            .await
            .map_err(|e| OpError::Raft(format!("replication task failed: {e}")))?;
        if copies < need {
            short.push(id);
        }
    }
    match short.first() {
        None => Ok(()),
        Some(id) => Err(OpError::Replication(format!(
            "no other node took a copy of {} block(s) (first {id}): the data stays buffered here and the next fsync tries again; see `shoal node ls` for nodes down or full",
            short.len()
        ))),
    }
}

struct CopyJob {
    cluster: std::sync::Arc<crate::cluster::Cluster>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    id: BlockId,
    data: Bytes,
}

impl CopyJob {
    /// Starts a copy to one node; it reports the node and whether the copy landed. A copy
    /// that lands clears the node's slow mark, even after the commit stopped waiting for it.
    fn start(&self, copies: &mut JoinSet<(u64, bool)>, (n, addr): (u64, SocketAddr)) {
        let (cluster, metrics, id) = (self.cluster.clone(), self.metrics.clone(), self.id);
        let bytes = self.data.len() as u64;
        let req = Request::PutBlock {
            id,
            data: self.data.to_vec(),
        };
        copies.spawn(
            async move {
                let answer = cluster
                    .peers
                    .call_within::<_, Response>(addr, &req, BLOCK_TIMEOUT)
                    .await;
                let landed = match answer {
                    Ok(Response::PutBlock(Ok(()))) => true,
                    Ok(other) => {
                        warn!(block = %id, node = n, response = ?other, "replica refused");
                        false
                    }
                    Err(e) => {
                        warn!(block = %id, node = n, error = %e, "replica unreachable");
                        false
                    }
                };
                if landed {
                    cluster.slow.clear(n);
                    metrics.replicated("out", bytes);
                }
                (n, landed)
            }
            .in_current_span(),
        );
    }

    /// Copies to the first `want` of `order` (of its `healthy` leaders, and of the others only
    /// as far as needed to reach `need`), replacing each failure with the next candidate.
    /// Waits for every copy while fewer than `need` landed, then only for `SLOW_COPY`; the
    /// nodes it stops waiting for are marked slow. Returns the block, the copies that landed
    /// and `need`.
    async fn run(
        self,
        order: Vec<(u64, SocketAddr)>,
        healthy: usize,
        want: usize,
        need: usize,
    ) -> (BlockId, usize, usize) {
        let started = Instant::now();
        let mut next = order.clone().into_iter();
        let mut copies = JoinSet::new();
        let mut running = Vec::new();
        let mut landed: Vec<u64> = Vec::new();
        for c in next.by_ref().take(want.min(healthy.max(need))) {
            running.push(c.0);
            self.start(&mut copies, c);
        }
        let mut done = 0;
        let mut patience = SLOW_COPY;
        while done < want {
            let joined = if done < need {
                copies.join_next().await
            } else {
                let deadline = tokio::time::Instant::from_std(started + patience);
                match tokio::time::timeout_at(deadline, copies.join_next()).await {
                    Ok(joined) => joined,
                    Err(_) => {
                        // Enough copies: the slow ones finish (or fail) on their own.
                        for n in &running {
                            self.cluster.slow.mark(*n);
                        }
                        break;
                    }
                }
            };
            match joined {
                None => break,
                Some(Ok((n, ok))) => {
                    running.retain(|r| *r != n);
                    if ok {
                        done += 1;
                        landed.push(n);
                        patience = patience.max(started.elapsed() * 4);
                    } else if let Some(c) = next.by_ref().find(|(n, _)| !landed.contains(n)) {
                        running.push(c.0);
                        self.start(&mut copies, c);
                    } else if done < need && running.is_empty() && started.elapsed() < NEED_PATIENCE
                    {
                        // Every candidate failed, and the commit has no second copy yet. A
                        // peer whose Raft heartbeat timed out under load is skipped at once
                        // for a moment (`rpc::DOWN_FOR`): try them all again for a while
                        // before failing the commit.
                        tokio::time::sleep(RETRY_PAUSE).await;
                        next = order.clone().into_iter();
                        if let Some(c) = next.by_ref().find(|(n, _)| !landed.contains(n)) {
                            running.push(c.0);
                            self.start(&mut copies, c);
                        }
                    }
                }
                Some(Err(e)) => warn!(block = %self.id, error = %e, "a block copy task failed"),
            }
        }
        if done < need {
            warn!(block = %self.id, copies = done + 1, wanted = want + 1, "no other node took a copy of the block; the commit fails");
        } else if done < want {
            debug!(block = %self.id, copies = done + 1, wanted = want + 1, "slow copies left to finish in the background; repair places the rest");
        }
        copies.detach_all();
        (self.id, done, need)
    }
}

/// Fetches a block this node does not have from the nodes that should.
pub async fn fetch(node: &Node, id: BlockId, len: Option<u32>) -> Result<Bytes, BlockError> {
    // A small commit's block held in the state machine needs nobody.
    if let Ok(Some(b)) = node.view.inline_block(&id) {
        return Ok(Bytes::from(b.data));
    }
    let Some(cluster) = node.cluster() else {
        return Err(BlockError::Missing(id));
    };
    let (order, _) = by_health(node, &id, |_| true);
    for (n, addr) in order {
        let req = Request::GetBlock { id, len };
        match cluster
            .peers
            .call_within::<_, Response>(addr, &req, BLOCK_TIMEOUT)
            .await
        {
            Ok(Response::GetBlock(Ok(data))) => {
                if BlockId::of(&data) == id {
                    node.metrics.replicated("in", data.len() as u64);
                    return Ok(Bytes::from(data));
                }
                warn!(block = %id, node = n, "a replica sent bytes that do not match the block's hash");
            }
            Ok(Response::GetBlock(Err(e))) => {
                tracing::debug!(block = %id, node = n, error = %e, "replica lacks the block")
            }
            Ok(other) => warn!(block = %id, node = n, response = ?other, "unexpected response"),
            Err(e) => warn!(block = %id, node = n, error = %e, "replica unreachable"),
        }
    }
    Err(BlockError::Missing(id))
}

/// How long a block another node pushed is kept from the collector: its writer proposes the
/// layout that names it right after the push, but the block may be garbage here (a file
/// deleted earlier had the same bytes), and deleting it would take the copy the writer counts.
pub(crate) const RECEIVED_GUARD: Duration = Duration::from_secs(60);
/// How often a received block's guard checks whether a layout names it yet.
const GUARD_POLL: Duration = Duration::from_millis(200);

/// Stores a block another node sent, after checking it against its name.
pub async fn accept(
    node: &std::sync::Arc<Node>,
    id: BlockId,
    data: Vec<u8>,
) -> Result<(), Refusal> {
    if BlockId::of(&data) != id {
        return Err(Refusal::Mismatch(id));
    }
    // Another node's copy must not eat the space kept for this node's Raft log: the writer
    // puts it on the next node instead.
    if !node.blocks.contains(&id) {
        node.check_space(data.len() as u64)
            .map_err(|_| Refusal::DiskFull(node.id))?;
    }
    node.guard_blocks(&[id]);
    // Until the layout naming it is applied here, or the guard's time is up (the writer's
    // commit failed): a block kept longer would escape collection once its file is deleted.
    let weak = std::sync::Arc::downgrade(node);
    tokio::spawn(
        async move {
            let until = tokio::time::Instant::now() + RECEIVED_GUARD;
            loop {
                tokio::time::sleep(GUARD_POLL).await;
                let Some(node) = weak.upgrade() else { return };
                if tokio::time::Instant::now() >= until
                    || node.view.block_refs(&id).unwrap_or(0) > 0
                {
                    node.unguard_blocks(&[id]);
                    return;
                }
            }
        }
        .in_current_span(),
    );
    let store = node.blocks.clone();
    let bytes = data.len() as u64;
    tokio::task::spawn_blocking(move || {
        store.put(&id, &data)?;
        store.sync_dirs([&id])
    })
    .await
    .map_err(|e| Refusal::Failed(e.to_string()))?
    .map_err(|e| Refusal::Failed(e.to_string()))?;
    node.metrics.replicated("in", bytes);
    Ok(())
}

pub async fn serve_get(node: &Node, id: BlockId, len: Option<u32>) -> Result<Vec<u8>, String> {
    let store = node.blocks.clone();
    tokio::task::spawn_blocking(move || {
        // The length is the block file's own (its size, checked against its footer): a length
        // from the network that disagrees is the caller's mistake, answered as one, and never
        // reason to quarantine a good copy.
        let held = store.len_of(&id).map_err(|e| e.to_string())?;
        if let Some(asked) = len.filter(|l| *l != held) {
            return Err(format!(
                "block {id} is {held} bytes here, not the {asked} the request says"
            ));
        }
        store
            .get(&id, held)
            .map(|b| b.to_vec())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Which of `ids` this node holds a good copy of: each is read and verified (a damaged one is
/// quarantined), because another node deletes its own copy on the strength of the answer.
pub async fn verify_held(node: &Node, ids: Vec<BlockId>) -> Vec<bool> {
    let store = node.blocks.clone();
    tokio::task::spawn_blocking(move || {
        ids.iter()
            .map(|id| store.len_of(id).and_then(|len| store.get(id, len)).is_ok())
            .collect()
    })
    .await
    .unwrap_or_default()
}
