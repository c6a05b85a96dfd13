// PERF-CRITICAL: every read of file data that misses the kernel's page cache passes through here.
//! Blocks: the on-disk format, the local content-addressed store, the in-memory cache of
//! verified chunks in front of it, and the garbage collector.

pub mod format;
pub mod gc;
pub mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use quick_cache::Weighter;
use quick_cache::sync::Cache;
use shoal_raft::BlockId;

use format::{CHUNK, ChunkIndex};
pub use store::{BlockError, BlockStore};

#[derive(Clone)]
struct ByLen;

impl Weighter<(BlockId, u32), Bytes> for ByLen {
    fn weight(&self, _key: &(BlockId, u32), val: &Bytes) -> u64 {
        val.len().max(1) as u64
    }
}

/// A cache of verified 64 KiB chunks of blocks, bounded by bytes, and of block chunk indexes.
pub struct BlockCache {
    chunks: Cache<(BlockId, u32), Bytes, ByLen>,
    indexes: Cache<BlockId, Arc<ChunkIndex>>,
    /// Reads `copy_cached` answered, and those it could not.
    hits: AtomicU64,
    misses: AtomicU64,
}

impl BlockCache {
    pub fn new(capacity_bytes: u64) -> BlockCache {
        let items = (capacity_bytes / CHUNK as u64).max(16) as usize;
        BlockCache {
            chunks: Cache::with_weighter(items, capacity_bytes.max(1), ByLen),
            indexes: Cache::new(64 << 10),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Caches a block this node just wrote (its bytes are known good).
    pub fn insert_block(&self, id: BlockId, data: &Bytes) {
        for (i, start) in (0..data.len()).step_by(CHUNK).enumerate() {
            let end = (start + CHUNK).min(data.len());
            self.chunks.insert((id, i as u32), data.slice(start..end));
        }
    }

    /// Copies bytes `[from, from + out.len())` of a block into `out` if all of them are cached.
    pub fn copy_cached(&self, id: &BlockId, from: usize, out: &mut [u8]) -> bool {
        let to = from + out.len();
        if out.is_empty() {
            return true;
        }
        let pieces: Option<Vec<Bytes>> = (from / CHUNK..=(to - 1) / CHUNK)
            .map(|i| self.chunks.get(&(*id, i as u32)))
            .collect();
        match pieces {
            Some(pieces) => {
                copy_pieces(&pieces, from / CHUNK, from, out);
                self.hits.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    pub fn weight(&self) -> u64 {
        self.chunks.weight()
    }

    /// Reads served from the cache, and reads that were not, since the node started.
    pub fn hits(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

/// Copies from chunks `first..` (held in `pieces`) the bytes at `[from, from + out.len())`.
fn copy_pieces(pieces: &[Bytes], first: usize, from: usize, out: &mut [u8]) {
    let to = from + out.len();
    for (k, piece) in pieces.iter().enumerate() {
        let start = (first + k) * CHUNK;
        let lo = from.max(start);
        let hi = to.min(start + piece.len());
        if lo < hi {
            out[lo - from..hi - from].copy_from_slice(&piece[lo - start..hi - start]);
        }
    }
}

/// Reads bytes `[from, from + out.len())` of block `id` (of `len` bytes) into `out`, through
/// the cache. Blocking: call it from a blocking thread.
pub fn read_range(
    store: &BlockStore,
    cache: &BlockCache,
    id: &BlockId,
    len: u32,
    from: usize,
    out: &mut [u8],
) -> Result<(), BlockError> {
    if out.is_empty() {
        return Ok(());
    }
    let to = from + out.len();
    if to > len as usize {
        return Err(BlockError::Missing(*id));
    }
    let first = from / CHUNK;
    let last = (to - 1) / CHUNK;
    let mut pieces: Vec<Option<Bytes>> = (first..=last)
        .map(|i| cache.chunks.get(&(*id, i as u32)))
        .collect();
    if let (Some(a), Some(b)) = (
        pieces.iter().position(Option::is_none),
        pieces.iter().rposition(Option::is_none),
    ) {
        let index = match cache.indexes.get(id) {
            Some(index) => index,
            None => {
                let index = Arc::new(store.index(id, len)?);
                cache.indexes.insert(*id, index.clone());
                index
            }
        };
        // One read for the whole run of missing chunks, verified chunk by chunk.
        let data = store.read_chunks(id, &index, first + a, first + b)?;
        for (k, slot) in pieces.iter_mut().enumerate().take(b + 1).skip(a) {
            let start = (k - a) * CHUNK;
            let piece = data.slice(start..(start + CHUNK).min(data.len()));
            cache
                .chunks
                .insert((*id, (first + k) as u32), piece.clone());
            *slot = Some(piece);
        }
    }
    let pieces: Vec<Bytes> = pieces
        .into_iter()
        .map(|p| p.expect("every chunk filled"))
        .collect();
    copy_pieces(&pieces, first, from, out);
    Ok(())
}
