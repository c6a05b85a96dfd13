//! Blocks: the local content-addressed store, the in-memory cache in front of it, and the
//! garbage collector that deletes blocks no file references.

pub mod gc;
pub mod store;

use bytes::Bytes;
use quick_cache::Weighter;
use quick_cache::sync::Cache;
use shoal_raft::BlockId;

pub use store::{BlockError, BlockStore};

#[derive(Clone)]
struct ByLen;

impl Weighter<BlockId, Bytes> for ByLen {
    fn weight(&self, _key: &BlockId, val: &Bytes) -> u64 {
        val.len().max(1) as u64
    }
}

/// A bounded cache of verified blocks, weighed by their size in bytes.
pub struct BlockCache {
    cache: Cache<BlockId, Bytes, ByLen>,
}

impl BlockCache {
    pub fn new(capacity_bytes: u64) -> BlockCache {
        let items = (capacity_bytes / (64 << 10)).max(16) as usize;
        BlockCache {
            cache: Cache::with_weighter(items, capacity_bytes.max(1), ByLen),
        }
    }

    pub fn get(&self, id: &BlockId) -> Option<Bytes> {
        self.cache.get(id)
    }

    pub fn insert(&self, id: BlockId, data: Bytes) {
        self.cache.insert(id, data);
    }

    pub fn remove(&self, id: &BlockId) {
        self.cache.remove(id);
    }

    pub fn weight(&self) -> u64 {
        self.cache.weight()
    }
}
