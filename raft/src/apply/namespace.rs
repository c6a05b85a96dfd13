//! The namespace: create, link, unlink, rmdir, rename and exchange.

use super::*;

impl Ctx<'_, '_> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn create(
        &mut self,
        parent: Ino,
        name: &[u8],
        kind: FileKind,
        perm: u32,
        (uid, gid): (u32, u32),
        rdev: u32,
        target: &[u8],
    ) -> Outcome {
        if let Err(e) = check_name(name) {
            fail!(e);
        }
        let p = tri!(self.must_dir(parent));
        if self.txn.lookup(parent, name)?.is_some() {
            fail!(FsError::Exists);
        }
        let ino = self.txn.counter(keys::META_NEXT_INO)?;
        self.txn.put(keys::META_NEXT_INO, &(ino + 1));
        let inherit_gid = p.perm & S_ISGID != 0;
        let mut perm = perm & 0o7777;
        if inherit_gid && kind == FileKind::Dir {
            perm |= S_ISGID;
        }
        let inode = Inode {
            ino,
            kind,
            perm,
            uid,
            gid: if inherit_gid { p.gid } else { gid },
            size: if kind == FileKind::Symlink {
                target.len() as u64
            } else {
                0
            },
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            rdev,
            atime: self.now,
            mtime: self.now,
            ctime: self.now,
            crtime: self.now,
            generation: 1,
            parent,
            children: 0,
            target: target.to_vec(),
            volume: p.volume,
        };
        self.put_inode(&inode);
        self.add_usage(inode.volume, inode.size as i64, 1)?;
        self.txn
            .put(&keys::dentry(parent, name), &Dentry { ino, kind });
        self.touch_dir(parent, 1, i32::from(kind == FileKind::Dir))?;
        self.bump_counter(keys::META_INODES, 1)?;
        Ok(Ok(Reply::Inode(inode)))
    }

    pub(super) fn link(&mut self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> Outcome {
        if let Err(e) = check_name(new_name) {
            fail!(e);
        }
        let inode = tri!(self.must_inode(ino));
        if inode.kind == FileKind::Dir {
            fail!(FsError::NotPermitted);
        }
        if inode.nlink == 0 {
            fail!(FsError::NotFound);
        }
        tri!(self.must_dir(new_parent));
        if self.txn.lookup(new_parent, new_name)?.is_some() {
            fail!(FsError::Exists);
        }
        if inode.nlink >= LINK_MAX {
            fail!(FsError::TooManyLinks);
        }
        let now = self.now;
        let inode = self.update(ino, |i| {
            i.nlink += 1;
            i.ctime = now;
        })?;
        self.txn.del(&keys::orphan(ino));
        self.txn.put(
            &keys::dentry(new_parent, new_name),
            &Dentry {
                ino,
                kind: inode.kind,
            },
        );
        self.touch_dir(new_parent, 1, 0)?;
        Ok(Ok(Reply::Inode(inode)))
    }

    pub(super) fn unlink(&mut self, parent: Ino, name: &[u8]) -> Outcome {
        tri!(self.must_dir(parent));
        let Some(d) = self.txn.lookup(parent, name)? else {
            fail!(FsError::NotFound);
        };
        if d.kind == FileKind::Dir {
            fail!(FsError::IsDir);
        }
        self.txn.del(&keys::dentry(parent, name));
        self.touch_dir(parent, -1, 0)?;
        let removed = self.drop_link(d.ino)?;
        Ok(Ok(Reply::Removed { removed }))
    }

    pub(super) fn rmdir(&mut self, parent: Ino, name: &[u8]) -> Outcome {
        match name {
            b"." => fail!(FsError::Invalid),
            b".." => fail!(FsError::NotEmpty),
            _ => {}
        }
        tri!(self.must_dir(parent));
        let Some(d) = self.txn.lookup(parent, name)? else {
            fail!(FsError::NotFound);
        };
        if d.kind != FileKind::Dir {
            fail!(FsError::NotDir);
        }
        let dir = tri!(self.must_inode(d.ino));
        if dir.children > 0 {
            fail!(FsError::NotEmpty);
        }
        self.txn.del(&keys::dentry(parent, name));
        self.touch_dir(parent, -1, -1)?;
        self.destroy(&dir)?;
        Ok(Ok(Reply::Removed { removed: None }))
    }

    pub(super) fn rename(
        &mut self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        noreplace: bool,
    ) -> Outcome {
        if let Err(e) = check_name(new_name) {
            fail!(e);
        }
        tri!(self.must_dir(parent));
        tri!(self.must_dir(new_parent));
        let Some(src) = self.txn.lookup(parent, name)? else {
            fail!(FsError::NotFound);
        };
        let dst = self.txn.lookup(new_parent, new_name)?;
        let src_is_dir = src.kind == FileKind::Dir;
        if let Some(dst) = dst {
            if noreplace {
                fail!(FsError::Exists);
            }
            if dst.ino == src.ino {
                return Ok(Ok(Reply::Removed { removed: None }));
            }
            match (src_is_dir, dst.kind == FileKind::Dir) {
                (true, false) => fail!(FsError::NotDir),
                (false, true) => fail!(FsError::IsDir),
                (true, true) => {
                    if tri!(self.must_inode(dst.ino)).children > 0 {
                        fail!(FsError::NotEmpty);
                    }
                }
                (false, false) => {}
            }
        }
        if src_is_dir && self.is_ancestor(src.ino, new_parent)? {
            fail!(FsError::Invalid);
        }
        // Validation is done; from here on the command changes state.
        let mut removed = None;
        self.txn.del(&keys::dentry(parent, name));
        self.txn.put(&keys::dentry(new_parent, new_name), &src);
        match dst {
            Some(dst) if dst.kind == FileKind::Dir => {
                let victim = tri!(self.must_inode(dst.ino));
                self.destroy(&victim)?;
                self.touch_dir(new_parent, -1, -1)?;
            }
            Some(dst) => {
                removed = self.drop_link(dst.ino)?;
                self.touch_dir(new_parent, -1, 0)?;
            }
            None => {}
        }
        let moved_dir = i32::from(src_is_dir && parent != new_parent);
        self.touch_dir(parent, -1, -moved_dir)?;
        self.touch_dir(new_parent, 1, moved_dir)?;
        let now = self.now;
        self.update(src.ino, |i| {
            i.ctime = now;
            if src_is_dir {
                i.parent = new_parent;
            }
        })?;
        Ok(Ok(Reply::Removed { removed }))
    }

    pub(super) fn exchange(
        &mut self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
    ) -> Outcome {
        tri!(self.must_dir(parent));
        tri!(self.must_dir(new_parent));
        let Some(a) = self.txn.lookup(parent, name)? else {
            fail!(FsError::NotFound);
        };
        let Some(b) = self.txn.lookup(new_parent, new_name)? else {
            fail!(FsError::NotFound);
        };
        if a.ino == b.ino {
            return Ok(Ok(Reply::Removed { removed: None }));
        }
        if a.kind == FileKind::Dir && self.is_ancestor(a.ino, new_parent)? {
            fail!(FsError::Invalid);
        }
        if b.kind == FileKind::Dir && self.is_ancestor(b.ino, parent)? {
            fail!(FsError::Invalid);
        }
        self.txn.put(&keys::dentry(parent, name), &b);
        self.txn.put(&keys::dentry(new_parent, new_name), &a);
        let now = self.now;
        for (d, to) in [(a, new_parent), (b, parent)] {
            self.update(d.ino, |i| {
                i.ctime = now;
                if d.kind == FileKind::Dir {
                    i.parent = to;
                }
            })?;
        }
        if parent != new_parent {
            let a_dir = i32::from(a.kind == FileKind::Dir);
            let b_dir = i32::from(b.kind == FileKind::Dir);
            self.touch_dir(parent, 0, b_dir - a_dir)?;
            self.touch_dir(new_parent, 0, a_dir - b_dir)?;
        } else {
            self.touch_dir(parent, 0, 0)?;
        }
        Ok(Ok(Reply::Removed { removed: None }))
    }
}
