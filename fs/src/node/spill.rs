//! Writing inline blocks out as block files.
//!
//! A small commit carries its blocks inside its Raft entry (`MetaCommand::WriteInline`): one
//! log flush on a quorum makes the bytes and the layout durable, where a commit through block
//! files pays a data sync, a directory sync and a copy to another node first. The state
//! machine keeps those bytes until the leader writes them out the way a commit writes blocks
//! (a copy here, pushed to the policy's other nodes) and proposes `MetaCommand::Spill`, which
//! lets go of them. The same idea as ZFS's intent log: the log answers the fsync, the blocks
//! are written later, in bulk, off the application's path.
//!
//! Blocks wait `SPILL_AGE` first, so bytes overwritten or deleted within seconds (temporary
//! files, a database rewriting a page) never become block files; when the held bytes pass
//! half of `INLINE_BUDGET` every block is written out at once.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::Duration;

use bytes::Bytes;
use shoal_raft::{BlockId, Ino, MetaCommand};
use tracing::{debug, warn};

use super::{Node, OpError, OpResult, now_nanos};
use crate::node::replicate::{self, Policy};

/// A commit of at most this many bytes goes inline.
pub const INLINE_MAX: u64 = 32 << 10;
/// Commits stop going inline while the state machine holds this many bytes of inline blocks.
pub const INLINE_BUDGET: u64 = 64 << 20;
/// How long an inline block waits before it is written out, unless the budget is half spent.
const SPILL_AGE: Duration = Duration::from_secs(5);
const PERIOD: Duration = Duration::from_secs(1);
/// Bytes written out per round at most.
const ROUND_BYTES: usize = 8 << 20;

/// Whether a commit of `bytes` should go inline now.
pub(crate) fn goes_inline(node: &Node, bytes: u64) -> bool {
    bytes <= INLINE_MAX
        && node
            .view
            .inline_bytes()
            .is_ok_and(|held| held < INLINE_BUDGET)
}

/// Writes out inline blocks older than `min_age` (all of them with `Duration::ZERO`), at most
/// `ROUND_BYTES`, and has the state machine let go of them. Returns how many were written out.
pub async fn spill(node: &Node, min_age: Duration) -> OpResult<usize> {
    if node.view.inline_bytes().map_err(OpError::Store)? == 0 {
        return Ok(0);
    }
    let cutoff = now_nanos() - min_age.as_nanos() as i64;
    let ready = node
        .view
        .inline_blocks(cutoff, ROUND_BYTES)
        .map_err(OpError::Store)?;
    if ready.is_empty() {
        return Ok(0);
    }
    let bytes: usize = ready.iter().map(|(_, b)| b.data.len()).sum();
    let spilled: Vec<(BlockId, shoal_raft::Nanos)> =
        ready.iter().map(|(id, b)| (*id, b.since)).collect();
    let ids: Vec<BlockId> = spilled.iter().map(|(id, _)| *id).collect();
    node.guard_blocks(&ids);
    let written = write_out(node, ready).await;
    node.unguard_blocks(&ids);
    written?;
    shoal_raft::failpoint::hit("spill-before-propose");
    let n = spilled.len();
    node.run(MetaCommand::Spill { blocks: spilled }).await?;
    node.metrics.spilled(n as u64, bytes as u64);
    Ok(n)
}

/// Stores the blocks here and copies them to the nodes their volume's policy wants, as a
/// commit does.
async fn write_out(node: &Node, ready: Vec<(BlockId, shoal_raft::InlineBlock)>) -> OpResult<()> {
    let mut by_volume: BTreeMap<Ino, Vec<(BlockId, Bytes)>> = BTreeMap::new();
    for (id, b) in ready {
        by_volume
            .entry(b.volume)
            .or_default()
            .push((id, Bytes::from(b.data)));
    }
    if !node.config.client {
        let all: Vec<(BlockId, Bytes)> = by_volume.values().flatten().cloned().collect();
        node.check_space(all.iter().map(|(_, d)| d.len() as u64).sum())?;
        let store = node.blocks.clone();
        tokio::task::spawn_blocking(move || super::file::store_blocks(&store, &all))
            .await
            .map_err(|e| OpError::Raft(format!("block writer panicked: {e}")))??;
    }
    for (volume, blocks) in by_volume {
        replicate::push(node, &blocks, &Policy::of_volume(node, volume)).await?;
    }
    Ok(())
}

/// On the leader, writes out inline blocks every `PERIOD`.
pub(crate) async fn worker(node: Weak<Node>) {
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        if node.raft.metrics().borrow().current_leader != Some(node.id) {
            continue;
        }
        if crate::faults::get()
            .spill_paused
            .as_ref()
            .is_some_and(|p| p.exists())
        {
            continue;
        }
        let held = node.view.inline_bytes().unwrap_or(0);
        let age = if held >= INLINE_BUDGET / 2 {
            Duration::ZERO
        } else {
            SPILL_AGE
        };
        match spill(&node, age).await {
            Ok(0) => {}
            Ok(n) => debug!(blocks = n, "wrote inline blocks out as block files"),
            Err(e) => warn!(error = %e, "writing inline blocks out failed; retrying next round"),
        }
    }
}
