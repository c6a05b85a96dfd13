//! Kernel cache invalidation driven by the Raft apply.
//!
//! The kernel caches attributes, entries and pages of this node's mount. When the state machine
//! applies a command proposed by another node, the inodes and entries it changed are dropped
//! from this kernel's caches (fuser's `Notifier`), so `stat`, `ls` and `cat` here show the
//! change at once instead of after the cache's TTL. Changes this node proposed itself went
//! through this kernel, which already knows them.
//!
//! The notifier writes to /dev/fuse and may wait for the kernel to lock the inode, so it runs
//! on its own thread, never on a FUSE request thread (that could deadlock). Each handed-over
//! batch is numbered; `Invalidator::caught_up` waits until the thread has delivered every batch
//! handed over so far. An open (after its read barrier) and a lock grant wait for that: the
//! opener or new holder must find in its kernel what the last writer or holder left, pages and
//! size alike (a read stops at the kernel's cached size; an append starts there).
//!
//! An invalidation of an inode the kernel does not hold finds nothing to drop (the kernel says
//! ENOENT; fuser reports that as success). But a lookup answered from the view just before the
//! apply may reach the kernel just after, and then the kernel caches the old size of an inode
//! it did not know before, for the TTL: its attribute versions only protect inodes it already
//! holds. So the thread remembers for a few seconds which inodes other nodes changed
//! (`Invalidator::changed_lately`), and lookups give those attributes no time to live: the
//! kernel asks again before it trusts a size (seen in the soak: a file fsynced on one node read
//! as empty on another). Sending invalidations again later would be worse: one that reaches the
//! kernel while a lookup of the same inode is under way makes the kernel drop that lookup's
//! fresh attributes, and an O_APPEND write under a lock then starts at the old size, over
//! another node's line (the Swarm appenders lost one or two lines in 5 of 6 runs that way).

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use fuser::{INodeNo, Notifier};
use shoal_raft::{ApplyHook, Change, Ino};
use tracing::debug;

/// A batch of changes and its number.
type Batch = (u64, Vec<Change>);

/// How long an inode another node changed is remembered: past the TTL of a lookup reply that
/// may have raced its invalidation, with room for a slow kernel.
const CHANGED_FOR: Duration = Duration::from_secs(3);
/// Inodes other nodes changed lately, and when their invalidation was delivered.
type Changed = Mutex<HashMap<Ino, Instant>>;

/// The invalidation thread's queue: numbered batches in, the last delivered number out.
pub(crate) struct Invalidator {
    /// The number of the last batch handed over, and the queue; one lock keeps them in order.
    queue: Mutex<(u64, mpsc::Sender<Batch>)>,
    delivered: watch::Receiver<u64>,
    changed: Arc<Changed>,
}

impl Invalidator {
    /// Starts the invalidation thread.
    pub(crate) fn start(notifier: Arc<OnceLock<Notifier>>) -> Arc<Invalidator> {
        let (tx, rx) = mpsc::channel();
        let (done_tx, delivered) = watch::channel(0);
        let changed = Arc::new(Changed::default());
        let c = changed.clone();
        std::thread::Builder::new()
            .name("invalidate".into())
            .spawn(move || run(&notifier, &rx, &done_tx, &c))
            .expect("spawning the invalidation thread");
        Arc::new(Invalidator {
            queue: Mutex::new((0, tx)),
            delivered,
            changed,
        })
    }

    /// Hands changes to the thread, to be dropped from the kernel's caches.
    fn send(&self, changes: Vec<Change>) {
        let mut q = self.queue.lock().expect("invalidation queue lock");
        q.0 += 1;
        let n = q.0;
        let _ = q.1.send((n, changes));
    }

    /// Whether another node changed `ino` in the last few seconds: a lookup reply may then
    /// race that change's invalidation, and should not let the kernel keep its attributes.
    pub(crate) fn changed_lately(&self, ino: Ino) -> bool {
        let changed = self.changed.lock().expect("changed lock");
        changed
            .get(&ino)
            .is_some_and(|at| at.elapsed() < CHANGED_FOR)
    }

    /// Returns once everything handed over before this call reached the kernel.
    pub(crate) async fn caught_up(&self) {
        let target = self.queue.lock().expect("invalidation queue lock").0;
        let mut delivered = self.delivered.clone();
        // The thread lives as long as the process: an error here means it is gone.
        let _ = delivered.wait_for(|d| *d >= target).await;
    }

    /// The hook the state machine calls after applying. Changes proposed by this node's session
    /// are skipped; lock changes wake `locks_changed`, so a blocked lock request retries as soon
    /// as another node releases; unlinked inodes go to the purge worker (`purge`), which lets go
    /// of those this node holds and has no handle on.
    pub(crate) fn hook(
        self: &Arc<Self>,
        own_session: Arc<AtomicU64>,
        locks_changed: Arc<Notify>,
        purge: tokio::sync::mpsc::UnboundedSender<Ino>,
    ) -> ApplyHook {
        let this = self.clone();
        Arc::new(move |session, changes| {
            if changes.iter().any(|c| matches!(c, Change::Locks(_))) {
                locks_changed.notify_waiters();
            }
            for c in &changes {
                if let Change::Orphan(ino) = c {
                    let _ = purge.send(*ino);
                }
            }
            if session != own_session.load(Ordering::Acquire) {
                this.send(changes);
            }
        })
    }
}

fn run(
    notifier: &OnceLock<Notifier>,
    rx: &mpsc::Receiver<Batch>,
    delivered: &watch::Sender<u64>,
    changed: &Changed,
) {
    let delay = slow_invalidation();
    while let Ok(first) = rx.recv() {
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let last = batch.iter().map(|(n, _)| *n).max().unwrap_or(0);
        let changes: BTreeSet<Change> = batch.into_iter().flat_map(|(_, c)| c).collect();
        // Remembered before the kernel hears of them: a lookup that reads the view after this
        // point and replies after the invalidation is told to keep nothing.
        let now = Instant::now();
        {
            let mut recent = changed.lock().expect("changed lock");
            if recent.len() >= 4096 {
                recent.retain(|_, at| now.duration_since(*at) < CHANGED_FOR);
            }
            for c in &changes {
                if let Change::Inode(ino) = c {
                    recent.insert(*ino, now);
                }
            }
        }
        if let Some(n) = notifier.get() {
            for c in &changes {
                deliver(n, c);
            }
        }
        delivered.send_replace(last);
    }
}

/// `Faults::slow_invalidation`: widens the window in which the kernel still holds what another
/// node changed.
fn slow_invalidation() -> Option<std::time::Duration> {
    crate::faults::get().slow_invalidation
}

/// Drops what `c` changed from the kernel's caches (nothing, when the kernel holds none of it).
fn deliver(n: &Notifier, c: &Change) {
    let r = match c {
        Change::Inode(ino) => n.inval_inode(INodeNo(*ino), 0, 0),
        Change::Entry { parent, name } => n.inval_entry(INodeNo(*parent), OsStr::from_bytes(name)),
        Change::Locks(_) | Change::Orphan(_) => return,
    };
    if let Err(e) = r {
        debug!(change = ?c, error = %e, "cache invalidation failed");
    }
}
