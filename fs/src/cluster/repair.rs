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

use tracing::{info, warn};

use std::collections::HashMap;

use shoal_raft::{BlockId, FileKind, Ino, Kv};

use super::replicate::{self, Policy};
use crate::node::{Node, now_nanos};

const PERIOD: Duration = Duration::from_secs(3);

/// The members with a live session: the nodes that can hold replicas now.
pub fn live_nodes(node: &Node) -> Vec<u64> {
    let now = now_nanos();
    let members: Vec<u64> = node.members().into_iter().map(|(id, _)| id).collect();
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
/// (blocks still missing here, blocks fetched).
pub async fn round(node: &Node) -> (u64, u64) {
    let live = live_nodes(node);
    if !live.contains(&node.id) {
        return (0, 0);
    }
    let special = volume_policies(node);
    let default = [Policy::default()];
    let referenced = node.view.block_ids().unwrap_or_default();
    let mut missing = 0;
    let mut fetched = 0;
    for id in referenced {
        let policies = special.get(&id).map_or(&default[..], Vec::as_slice);
        let mine = policies
            .iter()
            .any(|p| p.holders(&id, &live).contains(&node.id));
        if !mine || node.blocks.contains(&id) {
            continue;
        }
        match replicate::fetch(node, id, None).await {
            Ok(data) => {
                let store = node.blocks.clone();
                let stored = tokio::task::spawn_blocking(move || {
                    store.put(&id, &data).and_then(|_| store.sync_dirs([&id]))
                })
                .await;
                match stored {
                    Ok(Ok(())) => fetched += 1,
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
    (missing, fetched)
}

/// The policies of the blocks of volumes that set `replicas=` or `placement=`, found by
/// walking those volumes' files.
fn volume_policies(node: &Node) -> HashMap<BlockId, Vec<Policy>> {
    let mut out: HashMap<BlockId, Vec<Policy>> = HashMap::new();
    for v in node.view.volumes().unwrap_or_default() {
        if v.options.replicas.is_none() && v.options.placement.is_empty() {
            continue;
        }
        let policy = Policy::of_volume(node, v.root);
        let mut dirs: Vec<Ino> = vec![v.root];
        while let Some(dir) = dirs.pop() {
            for (_, d) in node.view.readdir(dir).unwrap_or_default() {
                match d.kind {
                    FileKind::Dir => dirs.push(d.ino),
                    FileKind::File => {
                        let size = node.view.inode(d.ino).ok().flatten().map_or(0, |i| i.size);
                        for s in node.view.slices(d.ino, 0, size).unwrap_or_default() {
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
    }
}
