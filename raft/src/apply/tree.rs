//! Reading and writing inodes and their chunk maps, block references, links, and the walk that finds directory loops.

use super::*;

impl Ctx<'_, '_> {
    pub(super) fn must_inode(&self, ino: Ino) -> Result<Result<Inode, FsError>, StoreError> {
        Ok(self.txn.inode(ino)?.ok_or(FsError::NotFound))
    }

    /// A directory that still exists (not removed while open).
    pub(super) fn must_dir(&self, ino: Ino) -> Result<Result<Inode, FsError>, StoreError> {
        Ok(match self.txn.inode(ino)? {
            None => Err(FsError::NotFound),
            Some(i) if i.kind != FileKind::Dir => Err(FsError::NotDir),
            Some(i) if i.nlink == 0 => Err(FsError::NotFound),
            Some(i) => Ok(i),
        })
    }

    pub(super) fn must_file(&self, ino: Ino) -> Result<Result<Inode, FsError>, StoreError> {
        Ok(match self.txn.inode(ino)? {
            None => Err(FsError::NotFound),
            Some(i) if i.kind == FileKind::Dir => Err(FsError::IsDir),
            Some(i) if i.kind != FileKind::File => Err(FsError::Invalid),
            Some(i) => Ok(i),
        })
    }

    pub(super) fn put_inode(&mut self, inode: &Inode) {
        self.txn.put(&keys::inode(inode.ino), inode);
    }

    /// Reads an inode, lets `f` change it and writes it back.
    pub(super) fn update(
        &mut self,
        ino: Ino,
        f: impl FnOnce(&mut Inode),
    ) -> Result<Inode, StoreError> {
        let mut inode = self
            .txn
            .inode(ino)?
            .ok_or_else(|| StoreError::Invariant(format!("inode {ino} vanished during apply")))?;
        let before = inode.size;
        f(&mut inode);
        self.put_inode(&inode);
        if inode.size != before {
            self.add_usage(inode.volume, inode.size as i64 - before as i64, 0)?;
        }
        Ok(inode)
    }

    /// Marks a directory's content as changed.
    pub(super) fn touch_dir(
        &mut self,
        ino: Ino,
        children: i64,
        nlink: i32,
    ) -> Result<(), StoreError> {
        let now = self.now;
        self.update(ino, |d| {
            d.children = d.children.saturating_add_signed(children);
            d.nlink = d.nlink.saturating_add_signed(nlink);
            d.mtime = now;
            d.ctime = now;
        })?;
        Ok(())
    }

    pub(super) fn bump_counter(&mut self, key: &[u8], delta: i64) -> Result<u64, StoreError> {
        let v = self.txn.counter(key)?.saturating_add_signed(delta);
        self.txn.put(key, &v);
        Ok(v)
    }

    pub(super) fn apply_refs(&mut self, refs: RefDelta) -> Result<(), StoreError> {
        for (id, delta) in refs.0 {
            if delta == 0 {
                continue;
            }
            let cur = self.txn.block_refs(&id)? as i64;
            let new = cur + delta;
            if new < 0 {
                return Err(StoreError::Invariant(format!(
                    "block {id} reference count would fall to {new}"
                )));
            }
            if new == 0 {
                self.txn.del(&keys::block_ref(&id));
                self.txn.put(&keys::garbage(&id), &self.now);
                // An inline block goes with its last reference; block files of it written
                // out meanwhile are garbage like any other.
                let inline = keys::inline(&id);
                if let Some(b) = self.txn.get::<InlineBlock>("inline block", &inline)? {
                    self.txn.del(&inline);
                    self.bump_counter(keys::META_INLINE_BYTES, -(b.data.len() as i64))?;
                }
            } else {
                self.txn.put(&keys::block_ref(&id), &(new as u64));
                if cur == 0 {
                    self.txn.del(&keys::garbage(&id));
                }
            }
        }
        Ok(())
    }

    /// Loads, edits and stores the chunks of a file that `f` touches.
    pub(super) fn edit_chunks(
        &mut self,
        ino: Ino,
        chunks: impl IntoIterator<Item = u64>,
        f: impl Fn(u64, &mut Vec<Slice>, &mut RefDelta),
    ) -> Result<(), StoreError> {
        let mut refs = RefDelta::default();
        for index in chunks {
            let mut slices = self.txn.chunk(ino, index)?;
            let before = slices.clone();
            f(index, &mut slices, &mut refs);
            if slices == before {
                continue;
            }
            if slices.is_empty() {
                self.txn.del(&keys::chunk(ino, index));
            } else {
                self.txn.put(&keys::chunk(ino, index), &slices);
            }
        }
        self.apply_refs(refs)
    }

    /// Lays slices over a file's layout, in order.
    pub(super) fn overlay(&mut self, ino: Ino, slices: &[Slice]) -> Result<(), StoreError> {
        let mut by_chunk: BTreeMap<u64, Vec<Slice>> = BTreeMap::new();
        for s in slices {
            for (index, piece) in layout::split_by_chunk(*s) {
                by_chunk.entry(index).or_default().push(piece);
            }
        }
        self.edit_chunks(
            ino,
            by_chunk.keys().copied().collect::<Vec<_>>(),
            |index, list, refs| {
                for s in &by_chunk[&index] {
                    layout::overlay(list, *s, refs);
                }
            },
        )
    }

    /// The indexes of the chunks of a file that exist among those holding `[start, end)`:
    /// what an edit of the range must visit, however sparse and large the file.
    pub(super) fn stored_chunks(
        &self,
        ino: Ino,
        start: u64,
        end: u64,
    ) -> Result<Vec<u64>, StoreError> {
        let range = layout::chunks_of(start, end);
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let first = keys::chunk(ino, range.start);
        let last = keys::chunk(ino, range.end);
        Ok(self
            .txn
            .range_raw(&first, &last)?
            .into_iter()
            .map(|(k, _)| keys::u64_at(&k, 9))
            .collect())
    }

    /// Makes `[start, end)` of a file read as zeros.
    pub(super) fn punch(&mut self, ino: Ino, start: u64, end: u64) -> Result<(), StoreError> {
        let chunks = self.stored_chunks(ino, start, end)?;
        self.edit_chunks(ino, chunks, |_, list, refs| {
            layout::punch(list, start, end, refs)
        })
    }

    /// Deletes an inode and everything hanging off it.
    pub(super) fn destroy(&mut self, inode: &Inode) -> Result<(), StoreError> {
        if inode.kind == FileKind::File {
            let chunks = self.stored_chunks(inode.ino, 0, inode.size)?;
            self.edit_chunks(inode.ino, chunks, |_, list, refs| {
                layout::punch(list, 0, u64::MAX, refs)
            })?;
        }
        self.txn.del(&keys::xattrs(inode.ino));
        self.txn.del(&keys::locks(inode.ino));
        self.txn.del(&keys::orphan(inode.ino));
        self.txn.del(&keys::inode(inode.ino));
        self.bump_counter(keys::META_INODES, -1)?;
        self.add_usage(inode.volume, -(inode.size as i64), -1)?;
        Ok(())
    }

    /// Drops one link of a non-directory. An inode that loses its last link becomes an
    /// orphan held by every live session, since any node may have it open: each releases it
    /// (`Purge`) once it has no handle on it, a session that ends releases what it held, and
    /// the last release deletes it.
    pub(super) fn drop_link(&mut self, ino: Ino) -> Result<Option<Ino>, StoreError> {
        let now = self.now;
        let inode = self.update(ino, |i| {
            i.nlink = i.nlink.saturating_sub(1);
            i.ctime = now;
        })?;
        if inode.nlink > 0 {
            return Ok(None);
        }
        let holders: Vec<u64> = self
            .txn
            .scan_prefix(&[keys::LEASE])?
            .into_iter()
            .map(|(k, _)| keys::u64_after_tag(&k))
            .collect();
        self.txn.put(&keys::orphan(ino), &holders);
        Ok(Some(ino))
    }

    /// Whether `ancestor` is `ino` or one of its parent directories.
    pub(super) fn is_ancestor(&self, ancestor: Ino, mut ino: Ino) -> Result<bool, StoreError> {
        for _ in 0..MAX_DEPTH {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == ROOT_INO {
                return Ok(false);
            }
            ino = match self.txn.inode(ino)? {
                Some(i) => i.parent,
                None => return Ok(false),
            };
        }
        Err(StoreError::Invariant(format!(
            "directory loop above inode {ino}"
        )))
    }
}
