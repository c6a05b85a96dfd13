//! When and where garbage blocks are collected.
//!
//! The state machine lists a block as garbage when its reference count falls to zero, with the
//! time that happened. The collector of any node deletes such blocks once they are older than
//! the grace period, unless a commit on this node is about to reference them again
//! (`blocks::gc` does the deleting), has every other member delete its copies the same way
//! (`Request::DropGarbage`), and then tells the state machine (`ForgetGarbage`), which keeps
//! any block that was referenced again meanwhile.

use std::sync::{Arc, Weak};
use std::time::Duration;

use shoal_raft::{BlockId, MetaCommand};
use tracing::{debug, warn};

use super::{Node, OpError, OpResult, now_nanos};
use crate::blocks::gc;

/// How often the collector runs (at most), and how often it also sweeps the disk for leftovers.
const PERIOD: Duration = Duration::from_secs(30);
const SWEEP_PERIOD: Duration = Duration::from_secs(600);
/// Blocks on disk that nothing references are left alone for this long: a commit may be
/// about to reference them.
const SWEEP_AGE: Duration = Duration::from_secs(3600);
/// The grace when a write was refused for lack of space: long enough for a commit that is
/// pushing a block to propose the layout that names it, short enough that space freed by
/// deleting files comes back before a writer gives up.
const SHORT_GRACE: Duration = Duration::from_secs(2);

/// Deletes garbage blocks older than `grace`, here and on every other member, then has the
/// state machine forget them. Returns how many were deleted here.
pub async fn collect(node: &Node, grace: Duration) -> OpResult<usize> {
    // Decide from a view at least as new as what the cluster has committed: a node whose
    // apply lags would still see a block as garbage that a later write named again (a file
    // with the same bytes), and delete a copy the writer counted. Writes committed after the
    // barrier pushed their blocks here first, and a pushed block is guarded (`accept`).
    node.read_barrier().await?;
    let cutoff = now_nanos() - grace.as_nanos() as i64;
    let old: Vec<BlockId> = node
        .view
        .garbage(10_000)
        .map_err(OpError::Store)?
        .into_iter()
        .filter(|(_, since)| *since <= cutoff)
        .map(|(id, _)| id)
        .collect();
    let deleted =
        gc::delete_unreferenced(&node.blocks, &node.needed(), old).map_err(OpError::Store)?;
    let n = deleted.len();
    if n == 0 {
        return Ok(0);
    }
    // The garbage list is what tells the other members to delete their copies: it forgets a
    // block only once every member has (a member down keeps it listed until it is back).
    if let Err(e) = crate::node::repair::drop_garbage_elsewhere(node, &deleted).await {
        debug!(blocks = n, error = %e, "garbage deleted here, not yet on every member; kept on the list");
        return Ok(n);
    }
    shoal_raft::failpoint::hit("gc-before-forget");
    node.run(MetaCommand::ForgetGarbage { blocks: deleted })
        .await?;
    debug!(blocks = n, "garbage blocks deleted on every member");
    Ok(n)
}

/// Another member collected `ids` (`Request::DropGarbage`): deletes this node's copies, by
/// this node's own view once it has caught up.
pub async fn drop_here(node: &Node, ids: Vec<BlockId>) -> OpResult<()> {
    node.read_barrier().await?;
    gc::delete_unreferenced(&node.blocks, &node.needed(), ids)
        .map(drop)
        .map_err(OpError::Store)
}

/// Collects every `PERIOD`, and at once (with a short grace) when a write was refused for
/// lack of space, at most once a second.
pub(crate) async fn worker(node: Weak<Node>) {
    // The worker holds the node only while it collects: a node that shuts down goes.
    let Some((space_short, grace)) = node
        .upgrade()
        .map(|n| (n.space_short.clone(), n.options.gc_grace))
    else {
        return;
    };
    // A grace shorter than the period would be a promise not kept.
    let period = PERIOD.min(grace).max(Duration::from_secs(1));
    let sweep_every = (SWEEP_PERIOD.as_secs() / period.as_secs()).max(1) as u32;
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    let mut rounds = 0u32;
    loop {
        let short = tokio::select! {
            _ = tick.tick() => false,
            () = space_short.notified() => true,
        };
        let Some(node) = node.upgrade() else { return };
        let grace = if short {
            SHORT_GRACE.min(node.options.gc_grace)
        } else {
            node.options.gc_grace
        };
        match collect(&node, grace).await {
            Ok(n) if short => debug!(blocks = n, "collected garbage at once: the disk is short"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "garbage collection failed; retrying next round"),
        }
        if short {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        rounds += 1;
        if rounds.is_multiple_of(sweep_every) {
            let n = Arc::clone(&node);
            let swept = tokio::task::spawn_blocking(move || {
                gc::sweep_unreferenced(&n.blocks, &n.needed(), SWEEP_AGE)
            })
            .await;
            if let Ok(Err(e)) = swept {
                warn!(error = %e, "sweep of unreferenced blocks failed");
            }
        }
    }
}
