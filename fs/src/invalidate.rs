//! Kernel cache invalidation driven by the Raft apply.
//!
//! The kernel caches attributes, entries and pages of this node's mount. When the state machine
//! applies a command proposed by another node, the inodes and entries it changed are dropped
//! from this kernel's caches (fuser's `Notifier`), so `stat`, `ls` and `cat` here show the
//! change at once instead of after the cache's TTL. Changes this node proposed itself went
//! through this kernel, which already knows them.
//!
//! The notifier writes to /dev/fuse and may wait for the kernel to lock the inode, so it runs
//! on its own thread, never on a FUSE request thread (that could deadlock).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, mpsc};

use tokio::sync::Notify;

use fuser::{INodeNo, Notifier};
use shoal_raft::{ApplyHook, Change};
use tracing::debug;

/// Starts the invalidation thread and returns the hook the state machine calls after applying.
/// Changes proposed by this node's session are skipped; lock changes wake `locks_changed`, so
/// a blocked lock request retries as soon as another node releases; unlinked inodes go to the
/// purge worker (`purge`), which lets go of those this node holds and has no handle on.
pub fn start(
    notifier: Arc<OnceLock<Notifier>>,
    own_session: Arc<AtomicU64>,
    locks_changed: Arc<Notify>,
    purge: tokio::sync::mpsc::UnboundedSender<shoal_raft::Ino>,
) -> ApplyHook {
    let (tx, rx) = mpsc::channel::<(u64, Vec<Change>)>();
    std::thread::Builder::new()
        .name("invalidate".into())
        .spawn(move || run(&notifier, &rx))
        .expect("spawning the invalidation thread");
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
            let _ = tx.send((session, changes));
        }
    })
}

fn run(notifier: &OnceLock<Notifier>, rx: &mpsc::Receiver<(u64, Vec<Change>)>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let Some(n) = notifier.get() else { continue };
        let changes: BTreeSet<Change> = batch.into_iter().flat_map(|(_, c)| c).collect();
        for c in changes {
            // ENOENT means the kernel has nothing cached for it: nothing to drop.
            let r = match &c {
                Change::Inode(ino) => n.inval_inode(INodeNo(*ino), 0, 0),
                Change::Entry { parent, name } => {
                    n.inval_entry(INodeNo(*parent), OsStr::from_bytes(name))
                }
                Change::Locks(_) | Change::Orphan(_) => continue,
            };
            if let Err(e) = r
                && e.raw_os_error() != Some(libc::ENOENT)
            {
                debug!(change = ?c, error = %e, "cache invalidation failed");
            }
        }
    }
}
