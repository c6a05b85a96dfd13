//! Typed reads of the state machine's tree, shared by the apply path (through its overlay)
//! and by readers on the node (straight from sled).

use std::collections::BTreeMap;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::StoreError;
use crate::keys;
use crate::layout;
use crate::types::{
    BlockId, Dentry, InlineBlock, Ino, Inode, Nanos, NodeInfo, RangeLock, Settings, Slice, Volume,
    VolumeUsage,
};

pub type Xattrs = BTreeMap<Vec<u8>, Vec<u8>>;

pub(crate) fn decode<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|source| StoreError::Decode { what, source })
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("metadata records always serialize")
}

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Point reads by key, and range scans.
pub trait Kv {
    fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Every key in `[start, end)` with its value, in key order.
    fn range_raw(&self, start: &[u8], end: &[u8]) -> Result<Vec<KeyValue>, StoreError>;

    /// The chunks of a file that exist among indexes `[first, last]`, with their slices, in
    /// order. Costs what is stored, not the size of the range: a sparse file of an exabyte
    /// with one written chunk is one key.
    fn chunks(
        &self,
        ino: Ino,
        first: u64,
        last: u64,
    ) -> Result<Vec<(u64, Vec<Slice>)>, StoreError> {
        if first > last {
            return Ok(Vec::new());
        }
        let end = match last.checked_add(1) {
            Some(next) => keys::chunk(ino, next).to_vec(),
            // The last possible index: everything of this inode.
            None => keys::inode_after(keys::CHUNK, ino),
        };
        self.range_raw(&keys::chunk(ino, first), &end)?
            .into_iter()
            .map(|(k, v)| Ok((keys::u64_at(&k, 9), decode("chunk", &v)?)))
            .collect()
    }

    fn get<T: DeserializeOwned>(
        &self,
        what: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match self.get_raw(key)? {
            Some(b) => decode(what, &b).map(Some),
            None => Ok(None),
        }
    }

    fn inode(&self, ino: Ino) -> Result<Option<Inode>, StoreError> {
        self.get("inode", &keys::inode(ino))
    }

    fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Option<Dentry>, StoreError> {
        self.get("dentry", &keys::dentry(parent, name))
    }

    fn chunk(&self, ino: Ino, index: u64) -> Result<Vec<Slice>, StoreError> {
        Ok(self
            .get("chunk", &keys::chunk(ino, index))?
            .unwrap_or_default())
    }

    /// The slices holding bytes of `[start, end)` of a file, trimmed to that range, in order.
    fn slices(&self, ino: Ino, start: u64, end: u64) -> Result<Vec<Slice>, StoreError> {
        let range = layout::chunks_of(start, end);
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (_, list) in self.chunks(ino, range.start, range.end - 1)? {
            out.extend(layout::extract(&list, start, end));
        }
        Ok(out)
    }

    fn xattrs(&self, ino: Ino) -> Result<Xattrs, StoreError> {
        Ok(self.get("xattrs", &keys::xattrs(ino))?.unwrap_or_default())
    }

    fn locks(&self, ino: Ino) -> Result<Vec<RangeLock>, StoreError> {
        Ok(self.get("locks", &keys::locks(ino))?.unwrap_or_default())
    }

    fn block_refs(&self, id: &BlockId) -> Result<u64, StoreError> {
        Ok(self.get("block_ref", &keys::block_ref(id))?.unwrap_or(0))
    }

    /// The usage and quota of the volume whose root is `root`.
    fn volume_usage(&self, root: Ino) -> Result<Option<VolumeUsage>, StoreError> {
        self.get("volume usage", &keys::volume_usage(root))
    }

    fn settings(&self) -> Result<Settings, StoreError> {
        Ok(self
            .get("settings", keys::META_SETTINGS)?
            .unwrap_or_default())
    }

    fn counter(&self, key: &[u8]) -> Result<u64, StoreError> {
        Ok(self.get("counter", key)?.unwrap_or(0))
    }
}

/// Reads of the applied state, straight from sled. Cheap to clone.
#[derive(Clone)]
pub struct StateView {
    pub(crate) tree: sled::Tree,
}

impl Kv for StateView {
    fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    fn range_raw(&self, start: &[u8], end: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.range(start..end) {
            let (k, v) = kv?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}

impl StateView {
    /// The entries of a directory, sorted by name, without `.` and `..`.
    pub fn readdir(&self, parent: Ino) -> Result<Vec<(Vec<u8>, Dentry)>, StoreError> {
        let prefix = keys::dentry_prefix(parent);
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(prefix) {
            let (k, v) = kv?;
            out.push((k[prefix.len()..].to_vec(), decode("dentry", &v)?));
        }
        Ok(out)
    }

    /// Blocks no slice references any more, with the time they became unreferenced.
    pub fn garbage(&self, limit: usize) -> Result<Vec<(BlockId, Nanos)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([keys::GARBAGE]).take(limit) {
            let (k, v) = kv?;
            out.push((keys::block_after_tag(&k), decode("garbage", &v)?));
        }
        Ok(out)
    }

    /// Inodes whose last name is gone, with the sessions that may still hold them open.
    pub fn orphans(&self) -> Result<Vec<(Ino, Vec<u64>)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([keys::ORPHAN]) {
            let (k, v) = kv?;
            out.push((keys::u64_after_tag(&k), decode("orphan", &v)?));
        }
        Ok(out)
    }

    /// The hash of the secret join tokens must carry, once a token was made.
    pub fn join_secret(&self) -> Result<Option<[u8; 32]>, StoreError> {
        self.get("join secret", keys::META_JOIN_SECRET)
    }

    /// The CA certificates members accept, the signing one first; `None` until a rotation
    /// (every node then trusts the CA it joined with).
    pub fn trust(&self) -> Result<Option<Vec<Vec<u8>>>, StoreError> {
        self.get("trust", keys::META_TRUST)
    }

    /// Whether `node` was removed and its certificate revoked.
    pub fn is_revoked(&self, node: u64) -> Result<bool, StoreError> {
        Ok(self
            .get::<bool>("revocation", &keys::revoked(node))?
            .unwrap_or(false))
    }

    pub fn volume(&self, name: &str) -> Result<Option<Volume>, StoreError> {
        self.get("volume", &keys::volume(name))
    }

    /// The sessions that may still hold the unlinked inode open, if it is an orphan.
    pub fn orphan(&self, ino: Ino) -> Result<Option<Vec<u64>>, StoreError> {
        self.get("orphan", &keys::orphan(ino))
    }

    /// Every live volume, by name.
    pub fn volumes(&self) -> Result<Vec<Volume>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([keys::VOLUME]) {
            out.push(decode("volume", &kv?.1)?);
        }
        Ok(out)
    }

    /// Every removed volume in the trash, by name and then age (oldest first).
    pub fn trash(&self) -> Result<Vec<Volume>, StoreError> {
        let mut out: Vec<Volume> = Vec::new();
        for kv in self.tree.scan_prefix([keys::TRASH]) {
            out.push(decode("trashed volume", &kv?.1)?);
        }
        out.sort_by(|a, b| (&a.name, a.trashed, a.root).cmp(&(&b.name, b.trashed, b.root)));
        Ok(out)
    }

    /// What the cluster knows of every node that reported or was labelled.
    pub fn nodes(&self) -> Result<BTreeMap<u64, NodeInfo>, StoreError> {
        let mut out = BTreeMap::new();
        for kv in self.tree.scan_prefix([keys::NODE_INFO]) {
            let (k, v) = kv?;
            out.insert(keys::u64_after_tag(&k), decode("node info", &v)?);
        }
        Ok(out)
    }

    /// Every live session: (session, node, lease end).
    pub fn sessions(&self) -> Result<Vec<(u64, u64, Nanos)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([keys::LEASE]) {
            let (k, v) = kv?;
            let (node, until): (u64, Nanos) = decode("lease", &v)?;
            out.push((keys::u64_after_tag(&k), node, until));
        }
        Ok(out)
    }

    pub fn inode_count(&self) -> Result<u64, StoreError> {
        self.counter(keys::META_INODES)
    }

    /// Every block some layout references.
    pub fn block_ids(&self) -> Result<Vec<BlockId>, StoreError> {
        let mut out = Vec::new();
        for k in self.tree.scan_prefix([keys::BLOCK_REF]).keys() {
            out.push(keys::block_after_tag(&k?));
        }
        Ok(out)
    }

    /// The block if the state machine holds its bytes (a small commit not yet written out).
    pub fn inline_block(&self, id: &BlockId) -> Result<Option<InlineBlock>, StoreError> {
        self.get("inline block", &keys::inline(id))
    }

    pub fn is_inline(&self, id: &BlockId) -> Result<bool, StoreError> {
        Ok(self.tree.contains_key(keys::inline(id))?)
    }

    /// The ids of every inline block: one scan, no block decoded (at most `INLINE_BUDGET`
    /// bytes of them exist, a few thousand).
    pub fn inline_ids(&self) -> Result<std::collections::HashSet<BlockId>, StoreError> {
        self.tree
            .scan_prefix([keys::INLINE])
            .keys()
            .map(|k| Ok(keys::block_after_tag(&k?)))
            .collect()
    }

    /// Inline blocks held since `cutoff` or before, up to `max_bytes` of them (at least one,
    /// if any), in block id order. Younger blocks are passed over without copying their bytes:
    /// the leader looks every second, and most of what it finds is younger than the spill age.
    pub fn inline_blocks(
        &self,
        cutoff: crate::Nanos,
        max_bytes: usize,
    ) -> Result<Vec<(BlockId, InlineBlock)>, StoreError> {
        /// The first field of `InlineBlock`: postcard decodes fields in order, so the head of
        /// a record is its `since`.
        #[derive(serde::Deserialize)]
        struct Head {
            since: crate::Nanos,
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for kv in self.tree.scan_prefix([keys::INLINE]) {
            if bytes >= max_bytes {
                break;
            }
            let (k, v) = kv?;
            let (head, _): (Head, _) =
                postcard::take_from_bytes(&v).map_err(|source| StoreError::Decode {
                    what: "inline block",
                    source,
                })?;
            if head.since > cutoff {
                continue;
            }
            let b: InlineBlock = decode("inline block", &v)?;
            bytes += b.data.len();
            out.push((keys::block_after_tag(&k), b));
        }
        Ok(out)
    }

    /// The bytes of every inline block.
    pub fn inline_bytes(&self) -> Result<u64, StoreError> {
        self.counter(keys::META_INLINE_BYTES)
    }

    pub fn block_count(&self) -> Result<u64, StoreError> {
        Ok(self.tree.scan_prefix([keys::BLOCK_REF]).count() as u64)
    }
}

impl StateView {
    /// Flushes the applied state to disk (it is also recoverable from the Raft log).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.tree.flush()?;
        Ok(())
    }
}
