//! Log compaction: when to snapshot and how far to purge the Raft log.
//!
//! openraft snapshots the state machine every `--snapshot-every` entries. Entries that carry
//! small commits' blocks (`node::spill`) make the log grow by bytes much faster than by
//! entries (20,000 of them hold up to 640 MiB, on every node), so this worker also asks for a
//! snapshot once the log grew by `shoal_raft::LogSize::keep_bytes` since the last one.
//!
//! It also decides how far to purge behind each snapshot (openraft's own purge is off):
//! - one twentieth of `--snapshot-every` entries are kept, for followers that lag a little;
//! - they hold at most `keep_bytes`, so the log on disk stays within twice that;
//! - on the leader, the log after a snapshot it is sending (`cluster::network::SnapshotSends`)
//!   is kept, and after it what the follower lacks while it catches up, until 60 s after the
//!   send, up to four times `keep_bytes`. Without that, a node whose install took longer than
//!   the next snapshot interval found the log after its snapshot purged, was sent the next
//!   snapshot, and chased snapshots for as long as writers outpaced its installs.
//!
//! Every node compacts its own log.

use std::sync::Weak;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::Node;

const PERIOD: Duration = Duration::from_secs(1);
/// How long to wait for a snapshot asked for before asking again.
const BUILD_WAIT: Duration = Duration::from_secs(120);
/// The log kept for a follower being sent a snapshot holds at most this many times
/// `keep_bytes`.
const SENDING_KEEP_FACTOR: u64 = 4;

/// The entries openraft keeps behind a snapshot by count, for `--snapshot-every` = `every`.
pub(crate) fn keep_entries(every: u64) -> u64 {
    (every / 20).max(1)
}

/// Where to purge the log (inclusive) behind a snapshot at `snapshot`: the count rule, raised
/// by the byte rule, lowered to keep the log after a snapshot being sent (`protected`), but
/// not below what `SENDING_KEEP_FACTOR` allows.
fn purge_upto(
    size: &shoal_raft::LogSize,
    every: u64,
    snapshot: u64,
    protected: Option<u64>,
) -> Result<Option<u64>, shoal_raft::StoreError> {
    let keep = size.keep_bytes();
    let by_count = snapshot.checked_sub(keep_entries(every));
    let by_bytes = size.purge_point(snapshot, keep)?;
    let mut upto = by_count.max(by_bytes);
    if let Some(p) = protected {
        let floor = size.purge_point(snapshot, keep.saturating_mul(SENDING_KEEP_FACTOR))?;
        upto = upto.map(|u| u.min(p)).max(floor);
    }
    Ok(upto.map(|u| u.min(snapshot)))
}

pub(crate) async fn worker(node: Weak<Node>) {
    let Some(mut metrics) = node.upgrade().map(|n| n.raft.metrics()) else {
        return;
    };
    // What the last purge decision was made for (the snapshot and the protected index), and
    // when: a follower catching up moves the protected index with every append, and each
    // decision reads up to `SENDING_KEEP_FACTOR` x `keep_bytes` of log, so a decision for the
    // same snapshot waits `PERIOD`.
    let mut decided: Option<(u64, Option<u64>, Instant)> = None;
    // When a snapshot was asked for, and the last snapshot then.
    let mut asked: Option<(Instant, Option<u64>)> = None;
    loop {
        // At once after a new snapshot (openraft's metrics change), or every `PERIOD`.
        if let Ok(Err(_)) = tokio::time::timeout(PERIOD, metrics.changed()).await {
            return;
        }
        let (snapshot, purged, matched) = {
            let m = metrics.borrow_and_update();
            let matched: std::collections::BTreeMap<u64, u64> = m
                .replication
                .iter()
                .flatten()
                .filter_map(|(id, l)| Some((*id, l.as_ref()?.index)))
                .collect();
            (
                m.snapshot.map(|l| l.index),
                m.purged.map(|l| l.index),
                matched,
            )
        };
        let Some(node) = node.upgrade() else { return };
        let protected = node
            .snapshot_sends
            .protected(|target| matched.get(&target).copied());
        let due = |s: u64| match decided {
            None => true,
            Some((was, _, _)) if was != s => true,
            Some((_, p, at)) => p != protected && at.elapsed() >= PERIOD,
        };
        if let Some(snapshot) = snapshot.filter(|s| due(*s)) {
            decided = Some((snapshot, protected, Instant::now()));
            let (size, every) = (node.log_size.clone(), node.options.snapshot_every);
            let upto =
                tokio::task::spawn_blocking(move || purge_upto(&size, every, snapshot, protected))
                    .await;
            match upto {
                Ok(Ok(Some(upto))) if Some(upto) > purged => {
                    debug!(upto, snapshot, ?protected, "purging the Raft log");
                    if let Err(e) = node.raft.trigger().purge_log(upto).await {
                        warn!(error = %e, "asking Raft to purge its log failed");
                        return;
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!(error = %e, "measuring the Raft log failed"),
                Err(e) => warn!(error = %e, "measuring the Raft log failed"),
            }
        }
        let size = &node.log_size;
        if !size.wants_snapshot() {
            continue;
        }
        // A large tree takes tens of seconds to snapshot: asking again before the one asked
        // for is built would only log again.
        if asked.is_some_and(|(at, before)| at.elapsed() < BUILD_WAIT && snapshot == before) {
            continue;
        }
        info!(
            log_bytes = size.since_snapshot(),
            snapshot_bytes = size.snapshot_bytes(),
            "the Raft log grew past its byte limit since the last snapshot: taking one"
        );
        asked = Some((Instant::now(), snapshot));
        if let Err(e) = node.raft.trigger().snapshot().await {
            warn!(error = %e, "asking Raft for a snapshot failed");
            return;
        }
    }
}
