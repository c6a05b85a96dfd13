//! Re-replication: every node makes sure it holds the blocks it should.
//!
//! A block should be on the `REPLICAS` best nodes, by rendezvous score, among the live members
//! (members with a live session lease); a block of a volume with its own `replicas=` or
//! `placement=` on the best nodes its policy allows (for a block several volumes share, each
//! volume's choice holds a copy). When a node dies and its lease ends, or is removed,
//! the best-ranked nodes change for some blocks, and the nodes that now rank among the best
//! fetch those blocks from the others. Each node reports how many blocks it lacks.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{Instrument, debug, info, warn};

use std::collections::HashMap;

use shoal_raft::{BlockId, FileKind, Ino, Kv};

use super::replicate::{self, Policy};
use super::{Node, now_nanos};
use crate::cluster::rpc::{PeerError, RepairState, Request, Response};

const PERIOD: Duration = Duration::from_secs(3);

/// The members with a live session, clients left out: the nodes that can hold replicas now.
pub fn live_nodes(node: &Node) -> Vec<u64> {
    let now = now_nanos();
    let clients = node.clients();
    let members: Vec<u64> = node
        .members()
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| !clients.contains(id))
        .collect();
    let sessions = node.view.sessions().unwrap_or_default();
    members
        .into_iter()
        .filter(|id| {
            sessions
                .iter()
                .any(|(_, n, until)| n == id && *until >= now)
        })
        .collect()
}

/// One pass: fetches every referenced block this node should hold and lacks. Returns
/// (blocks still missing here, blocks fetched). `Node::repair_missing` counts down as the
/// pass fetches, so `shoal node rm` can show how many copies are left.
pub async fn round(node: &Node) -> (u64, u64) {
    let live = live_nodes(node);
    if !live.contains(&node.id) {
        node.repair_missing.store(0, Ordering::Relaxed);
        return (0, 0);
    }
    let special = volume_policies(node);
    let default = [Policy::default()];
    let referenced = node.view.block_ids().unwrap_or_default();
    // Held in the state machine until the leader writes them out (`node::spill`).
    let inline = node.view.inline_ids().unwrap_or_default();
    let mut wanted = Vec::new();
    // Copies here that no policy asks for, with the nodes that should hold them instead.
    let mut extra: Vec<(BlockId, Vec<u64>)> = Vec::new();
    for id in referenced {
        if inline.contains(&id) {
            continue;
        }
        let policies = special.get(&id).map_or(&default[..], Vec::as_slice);
        let holders: Vec<u64> = policies
            .iter()
            .flat_map(|p| p.holders(&id, &live))
            .collect();
        let mine = holders.contains(&node.id);
        if !mine {
            if extra.len() < TRIM_BATCH && !holders.is_empty() && node.blocks.contains(&id) {
                extra.push((id, holders));
            }
            continue;
        }
        if !node.blocks.contains(&id) {
            wanted.push(id);
        }
    }
    let left = &node.repair_missing;
    left.store(wanted.len() as u64, Ordering::Relaxed);
    let mut missing = 0;
    let mut fetched = 0;
    for id in wanted {
        // A copy fetched here must not eat the space kept for the Raft log either.
        if node.check_space(u64::from(node.config.block_size)).is_err() {
            missing += 1;
            continue;
        }
        match replicate::fetch(node, id, None).await {
            Ok(data) => {
                shoal_raft::failpoint::hit("repair-before-store");
                let store = node.blocks.clone();
                let stored = tokio::task::spawn_blocking(move || {
                    store.put(&id, &data).and_then(|_| store.sync_dirs([&id]))
                })
                .await;
                match stored {
                    Ok(Ok(())) => {
                        fetched += 1;
                        left.fetch_sub(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        warn!(block = %id, error = %e, "storing a re-replicated block failed");
                        missing += 1;
                    }
                    Err(e) => {
                        warn!(block = %id, error = %e, "re-replication task failed");
                        missing += 1;
                    }
                }
            }
            Err(e) => {
                warn!(block = %id, error = %e, "no live node has a copy of this block");
                missing += 1;
            }
        }
    }
    if fetched > 0 {
        info!(blocks = fetched, "re-replicated blocks onto this node");
    }
    let trimmed = trim(node, extra).await;
    if trimmed > 0 {
        info!(
            blocks = trimmed,
            "deleted copies here that the other holders have (more copies than the policy asks for, or a placement that excludes this node)"
        );
    }
    (missing, fetched)
}

/// At most this many extra copies are checked per round.
const TRIM_BATCH: usize = 100;
/// How long a holder may take to read and verify a batch of blocks it is asked about.
const VERIFY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Deletes the copies in `extra` that every node that should hold them confirms it has, so a
/// block ends with the copies its policy asks for and only where its placement allows.
async fn trim(node: &Node, extra: Vec<(BlockId, Vec<u64>)>) -> usize {
    let Some(cluster) = node.cluster() else {
        return 0;
    };
    if extra.is_empty() {
        return 0;
    }
    let addrs: HashMap<u64, std::net::SocketAddr> = node
        .members()
        .into_iter()
        .filter_map(|(n, a)| Some((n, a.parse().ok()?)))
        .collect();
    let mut asks: HashMap<u64, Vec<BlockId>> = HashMap::new();
    for (id, holders) in &extra {
        for h in holders {
            asks.entry(*h).or_default().push(*id);
        }
    }
    let mut confirmed: HashMap<BlockId, usize> = HashMap::new();
    for (holder, ids) in asks {
        let Some(addr) = addrs.get(&holder) else {
            continue;
        };
        let req = Request::HasBlocks { ids: ids.clone() };
        match cluster
            .peers
            .call_within::<_, Response>(*addr, &req, VERIFY_TIMEOUT)
            .await
        {
            Ok(Response::HasBlocks(has)) if has.len() == ids.len() => {
                for (id, yes) in ids.iter().zip(has) {
                    if yes {
                        *confirmed.entry(*id).or_default() += 1;
                    }
                }
            }
            Ok(other) => warn!(node = holder, response = ?other, "unexpected answer to HasBlocks"),
            Err(e) => debug!(node = holder, error = %e, "cannot ask which blocks a node has"),
        }
    }
    let mut n = 0;
    for (id, holders) in extra {
        if confirmed.get(&id).copied().unwrap_or(0) < holders.len() {
            continue;
        }
        // A commit on this node may be about to name the block again: keep it then.
        let guard = node.unreferenced_writes.lock().expect("guard lock");
        if guard.contains_key(&id) {
            continue;
        }
        match node.blocks.delete(&id) {
            // Cached chunks stay: they are verified bytes of the block, wherever it lives.
            Ok(()) => n += 1,
            Err(e) => warn!(block = %id, error = %e, "could not delete an extra copy"),
        }
    }
    n
}

/// The policies of the blocks of volumes that set `replicas=` or `placement=`, found by
/// walking those volumes' files. Every other block follows the default policy.
pub(crate) fn volume_policies(node: &Node) -> HashMap<BlockId, Vec<Policy>> {
    let mut out: HashMap<BlockId, Vec<Policy>> = HashMap::new();
    // References found by the walk, to tell blocks also named by other files.
    let mut seen: HashMap<BlockId, u64> = HashMap::new();
    let volumes = node.view.volumes().unwrap_or_default();
    let special = volumes
        .into_iter()
        .filter(|v| v.options.replicas.is_some() || !v.options.placement.is_empty());
    for v in special {
        let policy = Policy::of_volume(node, v.root);
        let mut dirs: Vec<Ino> = vec![v.root];
        while let Some(dir) = dirs.pop() {
            for (_, d) in node.view.readdir(dir).unwrap_or_default() {
                match d.kind {
                    FileKind::Dir => dirs.push(d.ino),
                    FileKind::File => {
                        let size = node.view.inode(d.ino).ok().flatten().map_or(0, |i| i.size);
                        for s in node.view.slices(d.ino, 0, size).unwrap_or_default() {
                            *seen.entry(s.block).or_default() += 1;
                            let list = out.entry(s.block).or_default();
                            if !list.contains(&policy) {
                                list.push(policy.clone());
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    // A block also named by another file (outside these volumes) keeps the default copies.
    for (id, policies) in out.iter_mut() {
        let refs = node.view.block_refs(id).unwrap_or(u64::MAX);
        if seen.get(id).copied().unwrap_or(0) < refs && !policies.contains(&Policy::default()) {
            policies.push(Policy::default());
        }
    }
    out
}

impl Node {
    /// How far this node's re-replication is.
    pub fn repair_state(&self) -> RepairState {
        RepairState {
            rounds: self.repair_rounds.load(Ordering::Acquire),
            missing: self.repair_missing.load(Ordering::Relaxed),
        }
    }
}

/// Every member's re-replication, asked at once: this node's own, and each other's or why it
/// did not answer.
pub async fn cluster_state(node: &Node) -> Vec<(u64, Result<RepairState, PeerError>)> {
    let mut out = vec![(node.id, Ok(node.repair_state()))];
    let Some(cluster) = node.cluster() else {
        return out;
    };
    let mut asks = tokio::task::JoinSet::new();
    for (id, addr) in node.other_members() {
        let peers = cluster.peers.clone();
        asks.spawn(
            async move {
                let addr = match addr {
                    Ok(a) => a,
                    Err(e) => return (id, Err(e)),
                };
                let answer = peers
                    .call_within::<_, Response>(addr, &Request::RepairState, Duration::from_secs(5))
                    .await;
                let state = match answer {
                    Ok(Response::RepairState(s)) => Ok(s),
                    Ok(other) => Err(PeerError::unexpected(id, &other)),
                    Err(error) => Err(PeerError::Unreachable { node: id, error }),
                };
                (id, state)
            }
            .in_current_span(),
        );
    }
    while let Some(joined) = asks.join_next().await {
        match joined {
            Ok(answer) => out.push(answer),
            Err(e) => {
                warn!(error = %PeerError::Lost(e), "asking a member for its repair state failed")
            }
        }
    }
    out.sort_by_key(|(id, _)| *id);
    out
}

pub async fn worker(node: Weak<Node>) {
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        if node.cluster().is_none() {
            return;
        }
        let (missing, fetched) = round(&node).await;
        node.repair_missing.store(missing, Ordering::Relaxed);
        node.repair_fetched.fetch_add(fetched, Ordering::Relaxed);
        node.repair_rounds.fetch_add(1, Ordering::Release);
    }
}

/// How long a member may take to delete a batch of garbage blocks.
const DROP_TIMEOUT: Duration = Duration::from_secs(30);

/// Has every other member delete its copies of the garbage blocks `ids` (`gc::collect`);
/// fails unless every member confirmed.
pub(crate) async fn drop_garbage_elsewhere(node: &Node, ids: &[BlockId]) -> Result<(), PeerError> {
    let Some(cluster) = node.cluster() else {
        return Ok(());
    };
    let mut set = tokio::task::JoinSet::new();
    // Clients hold no blocks: a client that is down must not hold up collection.
    let clients = node.clients();
    for (n, addr) in node.other_members() {
        if clients.contains(&n) {
            continue;
        }
        let addr = addr?;
        let (peers, req) = (
            cluster.peers.clone(),
            Request::DropGarbage {
                blocks: ids.to_vec(),
            },
        );
        set.spawn(
            async move {
                match peers
                    .call_within::<_, Response>(addr, &req, DROP_TIMEOUT)
                    .await
                {
                    Ok(Response::DropGarbage(Ok(()))) => Ok(()),
                    Ok(Response::DropGarbage(Err(refusal))) => {
                        Err(PeerError::Refused { node: n, refusal })
                    }
                    Ok(other) => Err(PeerError::unexpected(n, &other)),
                    Err(error) => Err(PeerError::Unreachable { node: n, error }),
                }
            }
            .in_current_span(),
        );
    }
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        // A task that panicked confirmed nothing: the block stays listed either way, since
        // only a full set of confirmations lets the caller forget it.
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(e.into());
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}
