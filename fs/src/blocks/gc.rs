//! Garbage collection of blocks no layout references.
//!
//! The state machine lists a block as garbage when its reference count falls to zero, with the
//! time that happened. The collector deletes such blocks once they are older than the grace
//! period, unless a commit on this node is about to reference them again, and then tells the
//! state machine (`ForgetGarbage`), which keeps any block that was referenced again meanwhile.

use std::sync::{Arc, Weak};
use std::time::Duration;

use shoal_raft::{BlockId, Kv, MetaCommand};
use tracing::{debug, warn};

use crate::node::{Node, OpResult, now_nanos};

/// How often the collector runs, and how often it also sweeps the disk for leftovers.
const PERIOD: Duration = Duration::from_secs(30);
const SWEEP_EVERY: u32 = 20;
/// Blocks on disk that nothing references are left alone for this long: a commit may be
/// about to reference them.
const SWEEP_AGE: Duration = Duration::from_secs(3600);
/// The grace when a write was refused for lack of space: long enough for a commit that is
/// pushing a block to propose the layout that names it, short enough that space freed by
/// deleting files comes back before a writer gives up.
const SHORT_GRACE: Duration = Duration::from_secs(2);

/// Deletes garbage blocks older than `grace`. Returns how many were deleted.
pub async fn collect(node: &Node, grace: Duration) -> OpResult<usize> {
    let cutoff = now_nanos() - grace.as_nanos() as i64;
    let candidates = node
        .view
        .garbage(10_000)
        .map_err(|e| crate::node::OpError::Raft(e.to_string()))?;
    let mut deleted: Vec<BlockId> = Vec::new();
    {
        let guard = node.unreferenced_writes.lock().expect("guard lock");
        for (id, since) in candidates {
            if since > cutoff || guard.contains_key(&id) {
                continue;
            }
            if node
                .view
                .block_refs(&id)
                .map_err(|e| crate::node::OpError::Raft(e.to_string()))?
                > 0
            {
                continue;
            }
            match node.blocks.delete(&id) {
                Ok(()) => deleted.push(id),
                Err(e) => warn!(block = %id, error = %e, "could not delete a garbage block"),
            }
        }
    }
    let n = deleted.len();
    if n > 0 {
        node.run(MetaCommand::ForgetGarbage { blocks: deleted })
            .await?;
        debug!(blocks = n, "garbage blocks deleted");
    }
    Ok(n)
}

/// Deletes blocks on disk that no layout references and no commit is writing, if their files
/// are older than `min_age`. These are left by a crash between storing a block and committing.
pub fn sweep_unreferenced(
    node: &Node,
    min_age: Duration,
) -> Result<usize, crate::blocks::BlockError> {
    let mut n = 0;
    for (id, _, age) in node.blocks.list()? {
        if age < min_age.as_secs() {
            continue;
        }
        let guard = node.unreferenced_writes.lock().expect("guard lock");
        if guard.contains_key(&id) {
            continue;
        }
        match node.view.block_refs(&id) {
            Ok(0) => {}
            Ok(_) => continue,
            Err(e) => {
                warn!(error = %e, "cannot read block references; sweep stopped");
                break;
            }
        }
        node.blocks.delete(&id)?;
        n += 1;
    }
    Ok(n)
}

/// Collects every `PERIOD`, and at once (with a short grace) when a write was refused for
/// lack of space, at most once a second.
pub(crate) async fn worker(node: Weak<Node>) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.tick().await;
    let mut rounds = 0u32;
    // The worker holds the node only while it collects: a node that shuts down goes.
    let Some(space_short) = node.upgrade().map(|n| n.space_short.clone()) else {
        return;
    };
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
        if rounds.is_multiple_of(SWEEP_EVERY) {
            let n = Arc::clone(&node);
            let swept =
                tokio::task::spawn_blocking(move || sweep_unreferenced(&n, SWEEP_AGE)).await;
            if let Ok(Err(e)) = swept {
                warn!(error = %e, "sweep of unreferenced blocks failed");
            }
        }
    }
}
