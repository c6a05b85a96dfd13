//! Attributes and data: setattr, write, fallocate, copy_file_range, extended attributes, purging unlinked files.

use super::*;

impl Ctx<'_, '_> {
    pub(super) fn setattr(&mut self, ino: Ino, attr: &SetAttr) -> Outcome {
        let inode = tri!(self.must_inode(ino));
        if let Some(size) = attr.size {
            match inode.kind {
                FileKind::File => {}
                FileKind::Dir => fail!(FsError::IsDir),
                _ => fail!(FsError::Invalid),
            }
            tri!(self.check_quota(&inode, size));
            if size < inode.size {
                self.punch(ino, size, inode.size)?;
            }
        }
        let now = self.now;
        let inode = self.update(ino, |i| {
            if let Some(size) = attr.size {
                i.size = size;
                i.mtime = now;
            }
            if let Some(perm) = attr.perm {
                i.perm = perm & 0o7777;
            }
            if let Some(uid) = attr.uid {
                i.uid = uid;
            }
            if let Some(gid) = attr.gid {
                i.gid = gid;
            }
            if let Some(t) = attr.atime {
                i.atime = t;
            }
            if let Some(t) = attr.mtime {
                i.mtime = t;
            }
            i.ctime = attr.ctime.unwrap_or(now);
        })?;
        Ok(Ok(Reply::Inode(inode)))
    }

    pub(super) fn write(&mut self, ino: Ino, slices: &[Slice], size: u64) -> Outcome {
        let inode = tri!(self.must_file(ino));
        tri!(self.check_quota(&inode, size));
        self.overlay(ino, slices)?;
        let now = self.now;
        let inode = self.update(ino, |i| {
            i.size = i.size.max(size);
            i.mtime = now;
            i.ctime = now;
        })?;
        Ok(Ok(Reply::Inode(inode)))
    }

    /// A write whose blocks come with it: each is kept in the state machine (once per block,
    /// however many slices or files name it) and the slices are laid as by `write`.
    pub(super) fn write_inline(
        &mut self,
        ino: Ino,
        slices: &[Slice],
        size: u64,
        volume: Ino,
        blocks: &[Vec<u8>],
    ) -> Outcome {
        let ids: Vec<BlockId> = blocks.iter().map(|b| BlockId::of(b)).collect();
        // Every slice must name a block of the entry, inside it: a reader trusts the layout.
        let fits = |s: &Slice| {
            ids.iter().zip(blocks).any(|(id, b)| {
                *id == s.block
                    && s.block_len as usize == b.len()
                    && u64::from(s.block_off) + u64::from(s.len) <= b.len() as u64
            })
        };
        if !slices.iter().all(fits) {
            fail!(FsError::Invalid);
        }
        // Blocks already named elsewhere and not inline are block files on their holders.
        let mut on_disk = Vec::with_capacity(ids.len());
        for id in &ids {
            on_disk.push(
                self.txn.block_refs(id)? > 0 && self.txn.get_raw(&keys::inline(id))?.is_none(),
            );
        }
        let cp = self.txn.checkpoint();
        let outcome = self.write(ino, slices, size)?;
        if outcome.is_err() {
            self.txn.rollback(cp);
            return Ok(outcome);
        }
        let mut added = 0i64;
        for ((id, data), on_disk) in ids.iter().zip(blocks).zip(on_disk) {
            // A block no slice names any more (overwritten within this very write) is not kept.
            if on_disk || self.txn.block_refs(id)? == 0 {
                continue;
            }
            let key = keys::inline(id);
            if self.txn.get_raw(&key)?.is_none() {
                self.txn.put(
                    &key,
                    &InlineBlock {
                        since: self.now,
                        volume,
                        data: data.clone(),
                    },
                );
                added += data.len() as i64;
            }
        }
        if added != 0 {
            self.bump_counter(keys::META_INLINE_BYTES, added)?;
        }
        Ok(outcome)
    }

    /// Lets go of the bytes of inline blocks that were written out (see `MetaCommand::Spill`).
    pub(super) fn spill(&mut self, blocks: &[(BlockId, Nanos)]) -> Outcome {
        let mut freed = 0i64;
        for (id, since) in blocks {
            let key = keys::inline(id);
            if let Some(b) = self.txn.get::<InlineBlock>("inline block", &key)?
                && b.since == *since
            {
                self.txn.del(&key);
                freed += b.data.len() as i64;
            }
        }
        if freed != 0 {
            self.bump_counter(keys::META_INLINE_BYTES, -freed)?;
        }
        Ok(Ok(Reply::Done))
    }

    pub(super) fn fallocate(&mut self, ino: Ino, off: u64, len: u64, mode: Fallocate) -> Outcome {
        let inode = tri!(self.must_file(ino));
        let Some(end) = off.checked_add(len).filter(|e| *e <= i64::MAX as u64) else {
            fail!(FsError::FileTooBig);
        };
        let grow = match mode {
            Fallocate::Allocate { keep_size } | Fallocate::ZeroRange { keep_size } => !keep_size,
            Fallocate::PunchHole => false,
        };
        if grow {
            tri!(self.check_quota(&inode, end));
        }
        // Punching and zeroing make the range read as zeros; allocating leaves the data.
        let changes_data = !matches!(mode, Fallocate::Allocate { .. });
        if changes_data {
            self.punch(ino, off, end.min(inode.size))?;
        }
        let now = self.now;
        let inode = self.update(ino, |i| {
            if grow && end > i.size {
                i.size = end;
                i.mtime = now;
            }
            if changes_data {
                i.mtime = now;
            }
            i.ctime = now;
        })?;
        Ok(Ok(Reply::Inode(inode)))
    }

    pub(super) fn copy_range(
        &mut self,
        src: Ino,
        src_off: u64,
        dst: Ino,
        dst_off: u64,
        len: u64,
    ) -> Outcome {
        let s = tri!(self.must_file(src));
        let d = tri!(self.must_file(dst));
        if src_off >= s.size || len == 0 {
            return Ok(Ok(Reply::Copied(0)));
        }
        let n = len.min(s.size - src_off);
        if dst_off.checked_add(n).is_none_or(|e| e > i64::MAX as u64) {
            fail!(FsError::FileTooBig);
        }
        if src == dst && src_off < dst_off + n && dst_off < src_off + n {
            fail!(FsError::Invalid);
        }
        tri!(self.check_quota(&d, dst_off + n));
        let moved: Vec<Slice> = self
            .txn
            .slices(src, src_off, src_off + n)?
            .into_iter()
            .map(|sl| Slice {
                off: sl.off - src_off + dst_off,
                ..sl
            })
            .collect();
        self.punch(dst, dst_off, dst_off + n)?;
        self.overlay(dst, &moved)?;
        let now = self.now;
        self.update(dst, |i| {
            i.size = i.size.max(dst_off + n);
            i.mtime = now;
            i.ctime = now;
        })?;
        Ok(Ok(Reply::Copied(n)))
    }

    pub(super) fn setxattr(
        &mut self,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
    ) -> Outcome {
        tri!(self.must_inode(ino));
        if name.is_empty() || name.len() > XATTR_NAME_MAX {
            fail!(FsError::TooLarge);
        }
        if value.len() > XATTR_VALUE_MAX {
            fail!(FsError::TooLarge);
        }
        let mut xattrs: Xattrs = self.txn.xattrs(ino)?;
        match (mode, xattrs.contains_key(name)) {
            (XattrMode::Create, true) => fail!(FsError::Exists),
            (XattrMode::Replace, false) => fail!(FsError::NoAttr),
            _ => {}
        }
        xattrs.insert(name.to_vec(), value.to_vec());
        self.txn.put(&keys::xattrs(ino), &xattrs);
        let now = self.now;
        self.update(ino, |i| i.ctime = now)?;
        Ok(Ok(Reply::Done))
    }

    pub(super) fn removexattr(&mut self, ino: Ino, name: &[u8]) -> Outcome {
        tri!(self.must_inode(ino));
        let mut xattrs: Xattrs = self.txn.xattrs(ino)?;
        if xattrs.remove(name).is_none() {
            fail!(FsError::NoAttr);
        }
        if xattrs.is_empty() {
            self.txn.del(&keys::xattrs(ino));
        } else {
            self.txn.put(&keys::xattrs(ino), &xattrs);
        }
        let now = self.now;
        self.update(ino, |i| i.ctime = now)?;
        Ok(Ok(Reply::Done))
    }

    /// The proposing session lets go of an unlinked inode; the last holder's release
    /// deletes it.
    pub(super) fn purge(&mut self, ino: Ino) -> Outcome {
        self.release_orphan(ino, self.session)?;
        Ok(Ok(Reply::Done))
    }

    pub(super) fn release_orphan(&mut self, ino: Ino, session: u64) -> Result<(), StoreError> {
        let Some(mut holders) = self.txn.get::<Vec<u64>>("orphan", &keys::orphan(ino))? else {
            // Not an orphan: still linked, or gone already.
            return Ok(());
        };
        let before = holders.len();
        holders.retain(|s| *s != session);
        if holders.is_empty() {
            self.destroy_orphan(ino)
        } else {
            if holders.len() != before {
                self.txn.put(&keys::orphan(ino), &holders);
            }
            Ok(())
        }
    }

    /// Deletes an inode whose last link is gone, whoever may hold it.
    pub(super) fn destroy_orphan(&mut self, ino: Ino) -> Result<(), StoreError> {
        if let Some(inode) = self.txn.inode(ino)?
            && inode.nlink == 0
        {
            self.destroy(&inode)?;
        }
        Ok(())
    }
}
