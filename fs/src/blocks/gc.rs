//! The part of garbage collection that knows only this disk: deleting the blocks nothing needs.
//! A block is needed while a layout references it (`StateView::block_refs`) or a commit on
//! this node is about to name it (`Needed::writes`). Deciding when to collect, and telling the
//! other members, is the node's (`node::gc`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use shoal_raft::{BlockId, Kv, StateView, StoreError};
use tracing::warn;

use super::{BlockError, BlockStore};

/// What tells a garbage block from one still needed.
pub struct Needed<'a> {
    /// Blocks a commit on this node is storing or a peer just pushed, with a count of holds.
    pub writes: &'a Mutex<HashMap<BlockId, u32>>,
    pub view: &'a StateView,
}

/// Deletes the blocks of `ids` that no layout references and that no commit here is about to
/// name; returns the ones gone from this disk. The holds stay locked throughout, so no commit
/// takes a hold on a block between its check and its deletion.
pub fn delete_unreferenced(
    store: &BlockStore,
    needed: &Needed<'_>,
    ids: Vec<BlockId>,
) -> Result<Vec<BlockId>, StoreError> {
    let mut deleted = Vec::new();
    let guard = needed.writes.lock().expect("guard lock");
    for id in ids {
        if guard.contains_key(&id) {
            continue;
        }
        if needed.view.block_refs(&id)? > 0 {
            continue;
        }
        shoal_raft::failpoint::hit("gc-before-delete");
        match store.delete(&id) {
            Ok(()) => deleted.push(id),
            Err(e) => warn!(block = %id, error = %e, "could not delete a garbage block"),
        }
    }
    Ok(deleted)
}

/// Deletes blocks on disk that no layout references and no commit is writing, if their files
/// are older than `min_age`. These are left by a crash between storing a block and committing.
pub fn sweep_unreferenced(
    store: &BlockStore,
    needed: &Needed<'_>,
    min_age: Duration,
) -> Result<usize, BlockError> {
    scan_unreferenced(store, needed, min_age, true).map(|u| u.blocks as usize)
}

/// Blocks on a node's disk that no layout references.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unreferenced {
    /// Older than the scan's minimum age (deleted, when asked).
    pub blocks: u64,
    pub bytes: u64,
    /// Younger: left alone, since a commit may be about to name them.
    pub recent: u64,
}

/// Finds (and with `delete`, deletes) the blocks on disk that no layout references and no
/// commit is writing, whose files are older than `min_age`.
pub fn scan_unreferenced(
    store: &BlockStore,
    needed: &Needed<'_>,
    min_age: Duration,
    delete: bool,
) -> Result<Unreferenced, BlockError> {
    let mut found = Unreferenced::default();
    for (id, size, age) in store.list()? {
        let guard = needed.writes.lock().expect("guard lock");
        if guard.contains_key(&id) {
            continue;
        }
        match needed.view.block_refs(&id) {
            Ok(0) => {}
            Ok(_) => continue,
            Err(e) => {
                warn!(error = %e, "cannot read block references; sweep stopped");
                break;
            }
        }
        if age < min_age.as_secs() {
            found.recent += 1;
            continue;
        }
        if delete {
            store.delete(&id)?;
        }
        found.blocks += 1;
        found.bytes += size;
    }
    Ok(found)
}
