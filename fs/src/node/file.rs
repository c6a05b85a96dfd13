// PERF-CRITICAL: every write and read of file data passes through here.
//! Open files: buffered writes and their commit.
//!
//! Writes land in a per-file list of extents, in write order. A commit packs the extents into
//! blocks of up to `block_size` bytes, stores and fsyncs the blocks, and proposes one `Write`
//! command whose slices reference them; only then is the data part of the file for everyone.
//! A small commit (`node::spill::goes_inline`) sends its blocks inside the command instead
//! (`WriteInline`), and the leader writes them out as block files later.
//! Commits run on fsync, on flush (close), when a file has `commit_bytes` buffered, and every
//! `commit_interval`. Reads see committed data overlaid with the extents still buffered.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use shoal_raft::{BlockId, FsError, Ino, MetaCommand, Slice};
use tracing::{Instrument, debug, error, warn};

use crate::blocks::BlockStore;
use crate::node::{Node, OpError, OpResult};

/// Bytes written at `off`, not yet committed.
pub(crate) struct Extent {
    pub off: u64,
    pub data: Vec<u8>,
}

impl Extent {
    fn end(&self) -> u64 {
        self.off + self.data.len() as u64
    }
}

#[derive(Default)]
struct Buffers {
    /// Extents not yet handed to a commit, in write order.
    pending: Vec<Extent>,
    pending_bytes: usize,
    /// Extents a running commit is storing; still visible to reads until it is applied.
    committing: Option<Arc<Vec<Extent>>>,
    /// An error from a background commit, reported by the next flush or fsync.
    error: Option<Arc<OpError>>,
}

pub struct OpenFile {
    pub ino: Ino,
    /// Open handles on this node.
    pub(crate) opens: AtomicUsize,
    bufs: Mutex<Buffers>,
    commit_lock: tokio::sync::Mutex<()>,
    /// A background commit is queued and has not yet taken the buffers.
    commit_queued: AtomicBool,
    /// The node's session epoch its buffered writes belong to: see `Node::epoch`. A file
    /// opened again after the session was renewed starts afresh (`renew_epoch`).
    pub(crate) epoch: AtomicU64,
    /// The root of the volume the file is in (0 if none).
    pub(crate) volume: Ino,
    /// That volume's quota, which writes check (quotas are set once, at creation).
    quota: Option<u64>,
}

impl OpenFile {
    pub(crate) fn new(ino: Ino, epoch: u64, volume: Ino, quota: Option<u64>) -> OpenFile {
        OpenFile {
            ino,
            volume,
            quota,
            opens: AtomicUsize::new(0),
            bufs: Mutex::new(Buffers::default()),
            commit_lock: tokio::sync::Mutex::new(()),
            commit_queued: AtomicBool::new(false),
            epoch: AtomicU64::new(epoch),
        }
    }

    fn bufs(&self) -> std::sync::MutexGuard<'_, Buffers> {
        self.bufs.lock().expect("file buffers lock")
    }

    /// Buffers a write. Returns the number of bytes buffered for this file afterwards.
    pub(crate) fn buffer(&self, node: &Node, off: u64, mut data: &[u8]) -> usize {
        let block = node.config.block_size as usize;
        let mut b = self.bufs();
        let len = data.len();
        // Extend the last extent when the write continues it, so sequential writes fill blocks.
        if let Some(last) = b.pending.last_mut()
            && last.end() == off
            && last.data.len() < block
        {
            let take = data.len().min(block - last.data.len());
            last.data.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        let mut at = off + (len - data.len()) as u64;
        for piece in data.chunks(block) {
            b.pending.push(Extent {
                off: at,
                data: piece.to_vec(),
            });
            at += piece.len() as u64;
        }
        b.pending_bytes += len;
        node.dirty_bytes.fetch_add(len as u64, Ordering::Relaxed);
        b.pending_bytes
    }

    pub(crate) fn has_buffered(&self) -> bool {
        let b = self.bufs();
        !b.pending.is_empty() || b.committing.is_some() || b.error.is_some()
    }

    /// The end of the furthest buffered byte, if anything is buffered.
    pub(crate) fn buffered_end(&self) -> Option<u64> {
        let b = self.bufs();
        let committing = b.committing.iter().flat_map(|c| c.iter());
        b.pending.iter().chain(committing).map(Extent::end).max()
    }

    /// Copies out the buffered bytes inside `[off, off + len)`, oldest first, so that laying
    /// them over committed data in order gives what a reader must see.
    /// Call before reading the committed layout: see `Node::read`.
    pub(crate) fn snapshot_overlay(&self, off: u64, len: usize) -> Vec<(u64, Bytes)> {
        let end = off + len as u64;
        let b = self.bufs();
        let committing = b.committing.iter().flat_map(|c| c.iter());
        committing
            .chain(b.pending.iter())
            .filter(|e| e.off < end && e.end() > off)
            .map(|e| {
                let from = e.off.max(off);
                let to = e.end().min(end);
                let s = (from - e.off) as usize;
                (
                    from,
                    Bytes::copy_from_slice(&e.data[s..s + (to - from) as usize]),
                )
            })
            .collect()
    }

    /// The buffered extents' byte ranges, for SEEK_DATA/SEEK_HOLE.
    pub(crate) fn buffered_ranges(&self) -> Vec<(u64, u64)> {
        let b = self.bufs();
        let committing = b.committing.iter().flat_map(|c| c.iter());
        committing
            .chain(b.pending.iter())
            .map(|e| (e.off, e.end()))
            .collect()
    }

    /// Commits everything buffered so far. Returns once the data and its layout are durable,
    /// or the error of this commit or of an earlier background one.
    pub async fn commit(&self, node: &Node) -> OpResult<()> {
        let _serial = self.commit_lock.lock().await;
        if let Err(e) = node.check_not_fenced(self) {
            // Written after this node's session expired: the data must not land, and keeping it
            // would keep the file open here and retried forever.
            self.drop_pending(node);
            return Err(e);
        }
        let batch = {
            let mut b = self.bufs();
            if let Some(e) = b.error.take() {
                return Err(OpError::Earlier(e));
            }
            if b.pending.is_empty() {
                return Ok(());
            }
            let batch = Arc::new(std::mem::take(&mut b.pending));
            b.pending_bytes = 0;
            b.committing = Some(batch.clone());
            batch
        };
        let bytes: u64 = batch.iter().map(|e| e.data.len() as u64).sum();
        // A caller that stops waiting (a timeout around the call) drops this future halfway:
        // the batch then goes back in front of what was written since, as after a failure,
        // rather than staying "being committed" forever (read here, retried never).
        let mut unfinished = Unfinished {
            file: self,
            batch: Some(batch.clone()),
        };
        let started = std::time::Instant::now();
        let result = self.store_and_propose(node, &batch).await;
        node.metrics.commit(started.elapsed().as_secs_f64());
        unfinished.batch = None;
        let mut b = self.bufs();
        b.committing = None;
        match result {
            Ok(()) => {
                node.dirty_bytes.fetch_sub(bytes, Ordering::Relaxed);
                Ok(())
            }
            Err(OpError::Fs(FsError::NotFound | FsError::SessionExpired)) => {
                // The file is gone under this node: its session was fenced, and the unlinked
                // file it held was deleted with that session's holds. The bytes can land
                // nowhere; keeping them would retry them forever.
                node.dirty_bytes.fetch_sub(bytes, Ordering::Relaxed);
                tracing::warn!(
                    ino = self.ino,
                    bytes,
                    "dropped buffered writes of a file deleted while this node's session was fenced"
                );
                Err(OpError::Fenced)
            }
            Err(e @ OpError::Fs(FsError::QuotaExceeded)) => {
                // Past the volume's quota: the bytes can never land. Like a local filesystem
                // after EDQUOT, they are gone; the error goes to this fsync or close.
                node.dirty_bytes.fetch_sub(bytes, Ordering::Relaxed);
                Err(e)
            }
            Err(e) => {
                // Keep the data: put it back in front of anything written since, in order.
                put_back(&mut b, batch);
                Err(e)
            }
        }
    }

    async fn store_and_propose(&self, node: &Node, batch: &Arc<Vec<Extent>>) -> OpResult<()> {
        let size = batch.iter().map(Extent::end).max().unwrap_or(0);
        // A client keeps no blocks: its disk is not asked, and its copies go to the others.
        let client = node.config.client;
        if !client {
            node.check_space(batch.iter().map(|e| e.data.len() as u64).sum())?;
        }
        let store = node.blocks.clone();
        let block_size = node.config.block_size as usize;
        let packed = pack(batch, block_size);
        let bytes: u64 = batch.iter().map(|e| e.data.len() as u64).sum();
        if crate::node::spill::goes_inline(node, bytes) {
            // Small: the blocks ride in the Raft entry (see `node::spill`).
            for (id, p) in &packed {
                node.cache.insert_block(*id, &p.data);
            }
            shoal_raft::failpoint::hit("commit-before-propose");
            let blocks = packed.iter().map(|(_, p)| p.data.to_vec()).collect();
            let slices = packed.into_iter().flat_map(|(_, p)| p.slices).collect();
            return node
                .run(MetaCommand::WriteInline {
                    ino: self.ino,
                    slices,
                    size,
                    volume: self.volume,
                    blocks,
                })
                .await
                .map(|_| ());
        }
        let ids: Vec<BlockId> = packed.iter().map(|(id, _)| *id).collect();
        node.guard_blocks(&ids);
        // Unguarded however this ends, a cancelled commit included.
        let _guard = Guarded { node, ids: &ids };
        let stored = {
            let packed: Vec<(BlockId, Bytes)> =
                packed.iter().map(|(id, p)| (*id, p.data.clone())).collect();
            tokio::task::spawn_blocking(move || {
                if client {
                    Ok(())
                } else {
                    store_blocks(&store, &packed)
                }
            })
            .await
            .map_err(|e| OpError::Raft(format!("block writer panicked: {e}")))
        };
        match stored {
            Ok(Ok(())) => {
                for (id, p) in &packed {
                    node.cache.insert_block(*id, &p.data);
                }
                // The layout may name the blocks only once the replicas have them.
                let copies: Vec<(BlockId, Bytes)> =
                    packed.iter().map(|(id, p)| (*id, p.data.clone())).collect();
                let policy = crate::node::replicate::Policy::of_volume(node, self.volume);
                crate::node::replicate::push(node, &copies, &policy).await?;
                shoal_raft::failpoint::hit("commit-before-propose");
                let slices = packed.into_iter().flat_map(|(_, p)| p.slices).collect();
                node.run(MetaCommand::Write {
                    ino: self.ino,
                    slices,
                    size,
                })
                .await
                .map(|_| ())
            }
            Ok(Err(e)) => {
                error!(ino = self.ino, error = %e, "storing blocks failed");
                Err(e.into())
            }
            Err(e) => Err(e),
        }
    }

    /// Drops what a failed commit left buffered, because a lock over the file is about to be
    /// released: landing later, outside the lock, it could overwrite what the next holder
    /// writes. The error stays for the next fsync or close of the file here.
    pub(crate) fn drop_unlanded(&self, node: &Node) {
        self.drop_pending(node);
        self.bufs()
            .error
            .get_or_insert_with(|| Arc::new(OpError::Unlanded));
    }

    /// Drops the writes not yet handed to a commit.
    fn drop_pending(&self, node: &Node) {
        let mut b = self.bufs();
        let dropped: usize = b.pending.iter().map(|e| e.data.len()).sum();
        b.pending.clear();
        b.pending_bytes = 0;
        node.dirty_bytes
            .fetch_sub(dropped as u64, Ordering::Relaxed);
    }

    /// A new open after this node's session was renewed: what the fenced session buffered
    /// here can never land, so it is dropped, and the file serves the new session from now
    /// on. Handles opened before stay fenced by their own epoch (`Node::check_handle`).
    pub(crate) fn renew_epoch(&self, node: &Node) {
        let current = node.epoch.load(Ordering::Acquire);
        if self.epoch.load(Ordering::Acquire) < current {
            self.drop_pending(node);
            self.bufs().error = None;
            self.epoch.store(current, Ordering::Release);
        }
    }

    /// Refuses a write of `[off, end)` that would take the file's volume past its quota, by
    /// what this node knows: the committed usage plus this file's growth not yet committed.
    /// Writes buffered in other files here can still pass it together; their commit fails
    /// then (see `commit`).
    pub(crate) fn check_quota(&self, node: &Node, end: u64) -> OpResult<()> {
        use shoal_raft::Kv;
        let Some(quota) = self.quota else {
            return Ok(());
        };
        let used = node
            .view
            .volume_usage(self.volume)
            .map_err(crate::node::store_err)?
            .map_or(0, |u| u.bytes);
        let committed = node
            .view
            .inode(self.ino)
            .map_err(crate::node::store_err)?
            .map_or(0, |i| i.size);
        let end = end.max(self.buffered_end().unwrap_or(0));
        if used.saturating_add(end.saturating_sub(committed)) > quota {
            return Err(FsError::QuotaExceeded.into());
        }
        Ok(())
    }

    /// Commits in the background. A failure that dropped data (the session was fenced, the
    /// quota was hit, writes were dropped before an unlock) is kept for the next fsync or
    /// close to report. Any other leaves the data buffered: it is only logged, the next tick
    /// tries again, and an fsync meanwhile commits for itself and reports what it meets.
    pub(crate) fn commit_in_background(self: &Arc<Self>, node: &Arc<Node>) {
        if self.commit_queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let file = self.clone();
        let rt = node.rt.clone();
        let node = node.clone();
        let span = node.span().clone();
        rt.spawn(
            async move {
                file.commit_queued.store(false, Ordering::Release);
                let lost = match file.commit(&node).await {
                    Ok(()) => return,
                    // Taken from the file by this commit: put back as it was, unreported.
                    Err(OpError::Earlier(e)) => e,
                    Err(
                        e @ (OpError::Fenced
                        | OpError::Unlanded
                        | OpError::Fs(FsError::QuotaExceeded)),
                    ) => {
                        warn!(ino = file.ino, error = %e, "background commit dropped buffered writes; the next fsync or close reports it");
                        Arc::new(e)
                    }
                    Err(e) if e.is_no_space() => {
                        // `Node::check_space` logs a full disk, at most every 10 s; a line per
                        // file and retry here flooded the log (one a second per open file).
                        debug!(ino = file.ino, "background commit refused: the data disk is full");
                        return;
                    }
                    Err(e) => {
                        warn!(ino = file.ino, error = %e, "background commit failed; the data stays buffered and is tried again");
                        return;
                    }
                };
                file.bufs().error.get_or_insert(lost);
            }
            .instrument(span),
        );
    }
}

/// Blocks of a commit under way, guarded from GC until it ends.
struct Guarded<'a> {
    node: &'a Node,
    ids: &'a [BlockId],
}

impl Drop for Guarded<'_> {
    fn drop(&mut self) {
        self.node.unguard_blocks(self.ids);
    }
}

/// Puts a batch that did not land back in front of what was written since, in order.
fn put_back(b: &mut Buffers, batch: Arc<Vec<Extent>>) {
    let batch = Arc::try_unwrap(batch).unwrap_or_else(|a| {
        a.iter()
            .map(|e| Extent {
                off: e.off,
                data: e.data.clone(),
            })
            .collect()
    });
    let later = std::mem::take(&mut b.pending);
    b.pending = batch;
    b.pending.extend(later);
    b.pending_bytes = b.pending.iter().map(|e| e.data.len()).sum();
}

/// A commit under way; dropped before it finished (its future was cancelled), it puts its
/// batch back.
struct Unfinished<'a> {
    file: &'a OpenFile,
    batch: Option<Arc<Vec<Extent>>>,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(batch) = self.batch.take() {
            let mut b = self.file.bufs();
            b.committing = None;
            put_back(&mut b, batch);
        }
    }
}

struct Packed {
    data: Bytes,
    slices: Vec<Slice>,
}

/// Packs extents into blocks of at most `block_size` bytes, keeping their order in the slices.
fn pack(extents: &[Extent], block_size: usize) -> Vec<(BlockId, Packed)> {
    let mut out = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut members: Vec<(u64, u32, u32)> = Vec::new();
    let mut seal = |buf: &mut Vec<u8>, members: &mut Vec<(u64, u32, u32)>| {
        if buf.is_empty() {
            return;
        }
        let data = Bytes::from(std::mem::take(buf));
        let id = BlockId::of(&data);
        let block_len = data.len() as u32;
        let slices = members
            .drain(..)
            .map(|(off, len, block_off)| Slice {
                off,
                len,
                block: id,
                block_off,
                block_len,
            })
            .collect();
        out.push((id, Packed { data, slices }));
    };
    for e in extents {
        if !buf.is_empty() && buf.len() + e.data.len() > block_size {
            seal(&mut buf, &mut members);
        }
        members.push((e.off, e.data.len() as u32, buf.len() as u32));
        buf.extend_from_slice(&e.data);
    }
    seal(&mut buf, &mut members);
    out
}

pub(crate) fn store_blocks(
    store: &BlockStore,
    blocks: &[(BlockId, Bytes)],
) -> Result<(), crate::blocks::BlockError> {
    std::thread::scope(|s| {
        let workers = blocks.len().clamp(1, 4);
        let per = blocks.len().div_ceil(workers).max(1);
        let handles: Vec<_> = blocks
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .try_for_each(|(id, data)| store.put(id, data).map(|_| ()))
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("block writer thread panicked"))
    })?;
    store.sync_dirs(blocks.iter().map(|(id, _)| id))
}

impl Node {
    /// Refuses I/O through a file opened before this node's session expired: the locks its
    /// users held are gone, so their writes must not land (fencing).
    pub(crate) fn check_not_fenced(&self, file: &OpenFile) -> OpResult<()> {
        self.check_handle(file.epoch.load(Ordering::Acquire))
    }

    /// Refuses I/O through a handle opened in session epoch `epoch` once the session was
    /// renewed since (fencing).
    pub fn check_handle(&self, epoch: u64) -> OpResult<()> {
        if epoch < self.epoch() {
            return Err(OpError::Fenced);
        }
        Ok(())
    }

    /// This node's session epoch: bumped each time its session expired and was replaced.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub(crate) fn guard_blocks(&self, ids: &[BlockId]) {
        let mut g = self.unreferenced_writes.lock().expect("guard lock");
        for id in ids {
            *g.entry(*id).or_default() += 1;
        }
    }

    pub(crate) fn unguard_blocks(&self, ids: &[BlockId]) {
        let mut g = self.unreferenced_writes.lock().expect("guard lock");
        for id in ids {
            if let Some(n) = g.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    g.remove(id);
                }
            }
        }
    }
}

/// Commits buffered writes of every open file each `commit_interval`.
pub(crate) async fn commit_worker(node: Weak<Node>) {
    let interval = match node.upgrade() {
        Some(n) => n.options.commit_interval,
        None => return,
    };
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        let files: Vec<Arc<OpenFile>> = node
            .files
            .lock()
            .expect("files lock")
            .values()
            .filter(|f| f.bufs().pending_bytes > 0)
            .cloned()
            .collect();
        for f in files {
            f.commit_in_background(&node);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_fills_blocks_in_order_and_keeps_offsets() {
        let extents = vec![
            Extent {
                off: 100,
                data: vec![1; 6],
            },
            Extent {
                off: 0,
                data: vec![2; 4],
            },
            Extent {
                off: 50,
                data: vec![3; 8],
            },
        ];
        let packed = pack(&extents, 10);
        assert_eq!(packed.len(), 2);
        let (id0, p0) = &packed[0];
        assert_eq!(p0.data.len(), 10);
        assert_eq!(*id0, BlockId::of(&p0.data));
        let offs: Vec<(u64, u32, u32)> = p0
            .slices
            .iter()
            .map(|s| (s.off, s.len, s.block_off))
            .collect();
        assert_eq!(offs, vec![(100, 6, 0), (0, 4, 6)]);
        assert_eq!(packed[1].1.slices[0].off, 50);
        assert_eq!(packed[1].1.slices[0].block_len, 8);
    }
}
