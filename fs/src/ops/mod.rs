// PERF-CRITICAL: every filesystem operation passes through here.
//! POSIX operations on a node, below FUSE: the FUSE adapter translates to and from these, and
//! the tests drive them directly.
//!
//! Metadata reads come from the local state machine; metadata changes are Raft proposals that
//! return once durable and applied, so every namespace change is as durable as an fsync when
//! the call returns.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use shoal_raft::{
    Fallocate, FileKind, FsError, Ino, Inode, Kv, LockKind, LockOwner, MetaCommand, RangeLock,
    RenameFlags, Reply, SetAttr, XattrMode, conflicting,
};
use tracing::{error, instrument, warn};

use crate::blocks::{BlockError, read_range};
use crate::node::file::OpenFile;
use crate::node::store_err;
use crate::node::{Node, OpError, OpResult};

/// Everything needed to create a directory entry.
#[derive(Clone, Debug)]
pub struct NewEntry {
    pub kind: FileKind,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub target: Vec<u8>,
}

impl NewEntry {
    /// A regular file with mode `perm`, owned by root.
    pub fn file(perm: u32) -> NewEntry {
        NewEntry {
            kind: FileKind::File,
            perm,
            uid: 0,
            gid: 0,
            rdev: 0,
            target: Vec::new(),
        }
    }
}

/// What a write asks of its caller.
pub enum WriteAck {
    /// Buffered; reply at once.
    Buffered,
    /// Buffered, and the file has enough buffered to start a background commit.
    Commit(Arc<OpenFile>),
    /// Buffered, but the file holds too much uncommitted data: commit before replying.
    CommitFirst(Arc<OpenFile>),
}

/// Space and inode figures for statfs, in units of `bsize`.
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
}

pub const SEEK_DATA: i32 = 3;
pub const SEEK_HOLE: i32 = 4;

fn inode_reply(r: Reply) -> OpResult<Inode> {
    match r {
        Reply::Inode(i) => Ok(i),
        other => Err(OpError::Raft(format!("unexpected reply {other:?}"))),
    }
}

impl Node {
    fn open_file(&self, ino: Ino) -> Option<Arc<OpenFile>> {
        self.files.lock().expect("files lock").get(&ino).cloned()
    }

    /// An inode with the size this node sees, counting its buffered writes.
    pub fn getattr(&self, ino: Ino) -> OpResult<Inode> {
        let mut inode = self
            .view
            .inode(ino)
            .map_err(store_err)?
            .ok_or(FsError::NotFound)?;
        if let Some(end) = self.open_file(ino).and_then(|f| f.buffered_end()) {
            inode.size = inode.size.max(end);
        }
        Ok(inode)
    }

    /// Looks a name up in the local state machine. A name missing here may exist already on
    /// the leader: `lookup_linearizable` answers that.
    /// Whether another node changed `ino` in the last few seconds (`Invalidator::changed_lately`):
    /// its attributes in a lookup reply should not be cached by the kernel.
    pub fn changed_lately(&self, ino: Ino) -> bool {
        self.invalidator.changed_lately(ino)
    }

    #[instrument(level = "debug", skip_all, fields(node = self.id, parent = parent))]
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> OpResult<Inode> {
        if name.len() > shoal_raft::NAME_MAX {
            return Err(FsError::NameTooLong.into());
        }
        let d = self
            .view
            .lookup(parent, name)
            .map_err(store_err)?
            .ok_or(FsError::NotFound)?;
        self.getattr(d.ino)
    }

    /// A lookup whose "not found" is linearizable: a name created on another node before this
    /// call started is found. Names found locally need no barrier: the Raft apply invalidates
    /// the kernel's entries when they change.
    #[instrument(level = "debug", skip_all, fields(node = self.id, parent = parent))]
    pub async fn lookup_linearizable(&self, parent: Ino, name: &[u8]) -> OpResult<Inode> {
        match self.lookup(parent, name) {
            Err(OpError::Fs(FsError::NotFound)) if self.cluster().is_some() => {
                self.read_barrier().await?;
                self.lookup(parent, name)
            }
            other => other,
        }
    }

    #[instrument(level = "debug", skip_all, fields(node = self.id, parent = parent))]
    pub async fn create(&self, parent: Ino, name: &[u8], e: NewEntry) -> OpResult<Inode> {
        self.check_space(0)?;
        inode_reply(
            self.run(MetaCommand::Create {
                parent,
                name: name.to_vec(),
                kind: e.kind,
                perm: e.perm,
                uid: e.uid,
                gid: e.gid,
                rdev: e.rdev,
                target: e.target,
            })
            .await?,
        )
    }

    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub async fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> OpResult<Inode> {
        let mut inode = inode_reply(
            self.run(MetaCommand::Link {
                ino,
                new_parent,
                new_name: new_name.to_vec(),
            })
            .await?,
        )?;
        if let Some(end) = self.open_file(ino).and_then(|f| f.buffered_end()) {
            inode.size = inode.size.max(end);
        }
        Ok(inode)
    }

    fn purge_removed(&self, reply: Reply) {
        if let Reply::Removed { removed: Some(ino) } = reply {
            self.maybe_purge(ino);
        }
    }

    /// Removes a name. When the file is not open here, its purge (for the case this was its
    /// last link) goes in the same Raft entry, so an unlink costs one log flush, not two; a
    /// purge of an inode that still has links does nothing.
    #[instrument(level = "debug", skip_all, fields(node = self.id, parent = parent))]
    pub async fn unlink(&self, parent: Ino, name: &[u8]) -> OpResult<()> {
        let mut cmds = vec![MetaCommand::Unlink {
            parent,
            name: name.to_vec(),
        }];
        let purging = self
            .view
            .lookup(parent, name)
            .map_err(store_err)?
            .map(|d| d.ino)
            .filter(|ino| self.open_file(*ino).is_none());
        if let Some(ino) = purging {
            cmds.push(MetaCommand::Purge { ino });
        }
        let mut results = self.propose(cmds).await?.into_iter();
        let unlinked = results
            .next()
            .ok_or_else(|| OpError::Raft("empty response".into()))??;
        let purged = matches!(results.next(), Some(Ok(_)))
            && matches!(unlinked, Reply::Removed { removed: Some(ino) } if Some(ino) == purging);
        if !purged {
            // No purge proposed, it failed, or the name led to another inode by the time the
            // entry applied: the purge worker takes over.
            self.purge_removed(unlinked);
        }
        Ok(())
    }

    #[instrument(level = "debug", skip_all, fields(node = self.id, parent = parent))]
    pub async fn rmdir(&self, parent: Ino, name: &[u8]) -> OpResult<()> {
        self.run(MetaCommand::Rmdir {
            parent,
            name: name.to_vec(),
        })
        .await?;
        Ok(())
    }

    #[instrument(level = "debug", skip_all, fields(node = self.id, parent = parent))]
    pub async fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: RenameFlags,
    ) -> OpResult<()> {
        let r = self
            .run(MetaCommand::Rename {
                parent,
                name: name.to_vec(),
                new_parent,
                new_name: new_name.to_vec(),
                flags,
            })
            .await?;
        self.purge_removed(r);
        Ok(())
    }

    /// Commits the buffered writes of `ino`, if it is open here.
    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub async fn commit(&self, ino: Ino) -> OpResult<()> {
        match self.open_file(ino) {
            Some(f) => f.commit(self).await,
            None => Ok(()),
        }
    }

    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub async fn setattr(&self, ino: Ino, attr: SetAttr) -> OpResult<Inode> {
        if attr.size.is_some() {
            // A truncate applies after everything written before it.
            self.commit(ino).await?;
        }
        let inode = inode_reply(self.run(MetaCommand::SetAttr { ino, attr }).await?)?;
        self.getattr(inode.ino)
    }

    /// Opens a file: after a read barrier, so a file closed on another node before this open
    /// started shows that node's bytes (close-to-open, linearizable in a cluster). Returns the
    /// inode and whether the kernel may keep its cached pages.
    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub async fn open(&self, ino: Ino) -> OpResult<(Inode, bool)> {
        self.read_barrier().await?;
        // The barrier applied what other nodes changed; their changes must also have left this
        // kernel's caches before the open answers, or a read would stop at a size the kernel
        // cached before the last writer's close (the invalidation thread may lag under load).
        self.invalidator.caught_up().await;
        self.open_applied(ino)
    }

    /// Opens a file as this node's state machine has it: for a file this node just created.
    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub fn open_applied(&self, ino: Ino) -> OpResult<(Inode, bool)> {
        let inode = self.open_handles(ino, 1)?;
        let keep = match self.cluster() {
            None => true,
            Some(_) => {
                let mut seen = self.seen.lock().expect("seen lock");
                seen.insert(ino, (inode.mtime, inode.size)) == Some((inode.mtime, inode.size))
            }
        };
        Ok((inode, keep))
    }

    /// Counts `opens` new kernel handles on `ino` (a regular file; other kinds are not
    /// tracked) and returns its inode.
    fn open_handles(&self, ino: Ino, opens: usize) -> OpResult<Inode> {
        let inode = self.getattr(ino)?;
        if inode.kind == FileKind::File {
            let mut files = self.files.lock().expect("files lock");
            if inode.nlink == 0 && !files.contains_key(&ino) && !self.may_open_orphan(ino) {
                // Unlinked everywhere and let go of here: its deletion may be applying now.
                return Err(FsError::NotFound.into());
            }
            let f = files.entry(ino).or_insert_with(|| {
                let quota = match inode.volume {
                    0 => None,
                    root => self
                        .view
                        .volume_usage(root)
                        .ok()
                        .flatten()
                        .and_then(|u| u.quota),
                };
                Arc::new(OpenFile::new(
                    ino,
                    self.epoch.load(Ordering::Acquire),
                    inode.volume,
                    quota,
                ))
            });
            f.renew_epoch(self);
            f.opens.fetch_add(opens, Ordering::SeqCst);
        }
        Ok(inode)
    }

    /// Counts kernel handles a previous daemon opened on `ino`: handed over (`opens` of
    /// them), or found in use after a crash (one per use of a file not open here).
    pub(crate) fn adopt_open(&self, ino: Ino, opens: usize) -> OpResult<Arc<OpenFile>> {
        self.open_handles(ino, opens)?;
        self.open_file(ino).ok_or(OpError::NotOpen)
    }

    /// The open file a handle refers to; one the previous daemon opened is adopted.
    fn handle_file(&self, ino: Ino) -> OpResult<Arc<OpenFile>> {
        match self.open_file(ino) {
            Some(f) => Ok(f),
            None if self.adopt_unknown => self.adopt_open(ino, 1),
            None => Err(OpError::NotOpen),
        }
    }

    /// Whether a new handle may open `ino`, unlinked: only while this node's session still
    /// holds it and is not letting go of it. Called with the files lock held, which the purge
    /// worker takes too before it lets go.
    fn may_open_orphan(&self, ino: Ino) -> bool {
        let session = self.session();
        let held = matches!(self.view.orphan(ino), Ok(Some(h)) if h.contains(&session));
        held && !self
            .releasing
            .lock()
            .expect("releasing lock")
            .contains(&ino)
    }

    /// Closes one handle: commits, and purges the file if it was the last handle of an
    /// unlinked file.
    /// What the last close of an open file description does: commit it and, when the kernel
    /// says the description held a flock(2) lock (`flock_owner`), release that lock.
    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub async fn release(&self, ino: Ino, flock_owner: Option<u64>) -> OpResult<()> {
        let unlocked = match flock_owner {
            Some(owner) => self.release_locks(ino, owner).await,
            None => Ok(()),
        };
        let Some(f) = self.open_file(ino) else {
            return unlocked;
        };
        let committed = f.commit(self).await.and(unlocked);
        let last = {
            let mut files = self.files.lock().expect("files lock");
            let last = f.opens.fetch_sub(1, Ordering::SeqCst) == 1;
            if last && !f.has_buffered() {
                files.remove(&ino);
            }
            last
        };
        if last
            && let Ok(Some(inode)) = self.view.inode(ino)
            && inode.nlink == 0
        {
            self.maybe_purge(ino);
        }
        committed
    }

    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub fn write(&self, ino: Ino, off: u64, data: &[u8]) -> OpResult<WriteAck> {
        if off
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > i64::MAX as u64)
        {
            return Err(FsError::FileTooBig.into());
        }
        let f = self.handle_file(ino)?;
        self.check_not_fenced(&f)?;
        f.check_quota(self, off + data.len() as u64)?;
        let buffered = f.buffer(self, off, data);
        Ok(if buffered >= self.options.commit_bytes * 4 {
            WriteAck::CommitFirst(f)
        } else if buffered >= self.options.commit_bytes {
            WriteAck::Commit(f)
        } else {
            WriteAck::Buffered
        })
    }

    /// Space of the disk under the data directory, and the inode count; inside a volume
    /// with a quota, the quota and what is left of it (what `df` in a container shows).
    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub fn statfs(&self, ino: Ino) -> OpResult<StatFs> {
        let mut st = self.disk_statfs()?;
        let volume = self
            .view
            .inode(ino)
            .map_err(store_err)?
            .map_or(0, |i| i.volume);
        if volume != 0
            && let Some(u) = self.view.volume_usage(volume).map_err(store_err)?
            && let Some(quota) = u.quota
        {
            let bsize = u64::from(st.bsize);
            let left = quota.saturating_sub(u.bytes) / bsize;
            st.blocks = quota / bsize;
            st.bfree = st.bfree.min(left);
            st.bavail = st.bavail.min(left);
        }
        Ok(st)
    }

    fn disk_statfs(&self) -> OpResult<StatFs> {
        let st = rustix::fs::statvfs(&self.data_dir).map_err(|e| OpError::Disk(e.into()))?;
        let bsize: u64 = 4096;
        let scale = |n: u64| n.saturating_mul(st.f_frsize) / bsize;
        let used = self.view.inode_count().map_err(store_err)?;
        let free_inodes = u64::from(u32::MAX).saturating_sub(used);
        Ok(StatFs {
            blocks: scale(st.f_blocks),
            bfree: scale(st.f_bfree),
            bavail: scale(st.f_bavail),
            files: used + free_inodes,
            ffree: free_inodes,
            bsize: bsize as u32,
        })
    }

    /// Reads up to `size` bytes at `off`: committed data overlaid with this node's buffered writes.
    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub async fn read(&self, ino: Ino, off: u64, size: usize) -> OpResult<Vec<u8>> {
        // Take the buffered bytes first: a commit that finishes after this point is in the
        // layout read below, and overlaying its bytes again changes nothing.
        let file = self.open_file(ino);
        let overlay = file
            .as_ref()
            .map(|f| f.snapshot_overlay(off, size))
            .unwrap_or_default();
        let inode = match self.getattr(ino) {
            // Open here, yet deleted: only a fenced session's hold can have been lost so.
            Err(OpError::Fs(FsError::NotFound)) if file.is_some() => {
                return Err(OpError::Fenced);
            }
            other => other?,
        };
        if inode.kind == FileKind::Dir {
            return Err(FsError::IsDir.into());
        }
        if off >= inode.size || size == 0 {
            return Ok(Vec::new());
        }
        let end = (off + size as u64).min(inode.size);
        let mut buf = vec![0u8; (end - off) as usize];
        let mut misses = Vec::new();
        for s in self.view.slices(ino, off, end).map_err(store_err)? {
            let at = (s.off - off) as usize;
            let dst = &mut buf[at..at + s.len as usize];
            if !self.cache.copy_cached(&s.block, s.block_off as usize, dst) {
                misses.push(s);
            }
        }
        // Small commits' blocks may be in the state machine, not yet in block files.
        misses.retain(|s| match self.view.inline_block(&s.block) {
            Ok(Some(b)) => {
                let at = (s.off - off) as usize;
                let from = s.block_off as usize;
                buf[at..at + s.len as usize].copy_from_slice(&b.data[from..from + s.len as usize]);
                self.cache
                    .insert_block(s.block, &bytes::Bytes::from(b.data));
                false
            }
            _ => true,
        });
        if !misses.is_empty() {
            let (store, cache) = (self.blocks.clone(), self.cache.clone());
            let local = tokio::task::spawn_blocking(move || {
                misses
                    .into_iter()
                    .map(|s| {
                        let mut data = vec![0u8; s.len as usize];
                        let r = read_range(
                            &store,
                            &cache,
                            &s.block,
                            s.block_len,
                            s.block_off as usize,
                            &mut data,
                        );
                        (s, r.map(|()| data))
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| OpError::Raft(format!("block reader panicked: {e}")))?;
            for (s, r) in local {
                let data = match r {
                    Ok(data) => data,
                    // Not here (or damaged here): another node has a copy.
                    Err(e @ (BlockError::Missing(_) | BlockError::Corrupt { .. }))
                        if self.cluster().is_some() =>
                    {
                        let damaged = matches!(e, BlockError::Corrupt { .. });
                        if damaged {
                            error!(block = %s.block, error = %e, "local replica is damaged; reading another and repairing");
                        }
                        let block = crate::node::replicate::fetch(self, s.block, Some(s.block_len))
                            .await
                            .inspect_err(|e| {
                                self.blocks_lost.fetch_add(1, Ordering::Relaxed);
                                error!(block = %s.block, error = %e, "no node has a good copy of the block");
                            })?;
                        self.cache.insert_block(s.block, &block);
                        if damaged {
                            // The damaged copy was quarantined; put a good one in its place.
                            let (store, id, data) = (self.blocks.clone(), s.block, block.clone());
                            tokio::task::spawn_blocking(move || store.put(&id, &data).and_then(|_| store.sync_dirs([&id])))
                                .await
                                .map_err(|e| OpError::Raft(format!("repair task failed: {e}")))?
                                .inspect_err(|e| error!(block = %s.block, error = %e, "repairing the local replica failed"))?;
                            self.repair_fetched.fetch_add(1, Ordering::Relaxed);
                        }
                        block[s.block_off as usize..(s.block_off + s.len) as usize].to_vec()
                    }
                    Err(e) => {
                        error!(block = %s.block, error = %e, "block read failed");
                        return Err(e.into());
                    }
                };
                let at = (s.off - off) as usize;
                buf[at..at + data.len()].copy_from_slice(&data);
            }
        }
        for (at, data) in overlay {
            if at >= end {
                continue;
            }
            let n = data.len().min((end - at) as usize);
            let i = (at - off) as usize;
            buf[i..i + n].copy_from_slice(&data[..n]);
        }
        Ok(buf)
    }

    /// The entries of a directory, starting with `.` and `..`.
    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub fn readdir(&self, ino: Ino) -> OpResult<Vec<(Ino, FileKind, Vec<u8>)>> {
        let dir = self.getattr(ino)?;
        if dir.kind != FileKind::Dir {
            return Err(FsError::NotDir.into());
        }
        let mut out = vec![
            (ino, FileKind::Dir, b".".to_vec()),
            (dir.parent, FileKind::Dir, b"..".to_vec()),
        ];
        for (name, d) in self.view.readdir(ino).map_err(store_err)? {
            out.push((d.ino, d.kind, name));
        }
        Ok(out)
    }

    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> OpResult<Vec<u8>> {
        self.getattr(ino)?;
        let xattrs = self.view.xattrs(ino).map_err(store_err)?;
        xattrs
            .get(name)
            .cloned()
            .ok_or_else(|| FsError::NoAttr.into())
    }

    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub fn listxattr(&self, ino: Ino) -> OpResult<Vec<u8>> {
        self.getattr(ino)?;
        let mut out = Vec::new();
        for name in self.view.xattrs(ino).map_err(store_err)?.keys() {
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub async fn setxattr(
        &self,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
    ) -> OpResult<()> {
        self.run(MetaCommand::SetXattr {
            ino,
            name: name.to_vec(),
            value: value.to_vec(),
            mode,
        })
        .await?;
        Ok(())
    }

    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub async fn removexattr(&self, ino: Ino, name: &[u8]) -> OpResult<()> {
        self.run(MetaCommand::RemoveXattr {
            ino,
            name: name.to_vec(),
        })
        .await?;
        Ok(())
    }

    pub fn lock_owner(&self, owner: u64) -> LockOwner {
        LockOwner {
            session: self.session(),
            owner,
        }
    }

    /// The first lock that would conflict with `probe`, as F_GETLK reports it.
    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub fn getlk(&self, ino: Ino, probe: &RangeLock) -> OpResult<Option<RangeLock>> {
        Ok(conflicting(
            &self.view.locks(ino).map_err(store_err)?,
            probe,
        ))
    }

    /// Sets or clears a POSIX lock. With `wait`, retries until the lock is free.
    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub async fn setlk(&self, ino: Ino, lock: RangeLock, unlock: bool, wait: bool) -> OpResult<()> {
        if let Some(f) = self.open_file(ino) {
            self.check_not_fenced(&f)?;
        }
        if unlock {
            self.land_before_unlock(ino).await;
        }
        loop {
            let changed = self.locks_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.run(MetaCommand::SetLock { ino, lock, unlock }).await {
                Ok(_) if unlock => {
                    self.locks_changed.notify_waiters();
                    return Ok(());
                }
                Ok(_) => {
                    // The previous holder's changes were applied here before this grant; the
                    // new holder must also find them in this kernel's caches (the size an
                    // O_APPEND write starts from, the pages a read-modify-write reads).
                    self.invalidator.caught_up().await;
                    return Ok(());
                }
                Err(OpError::Fs(FsError::WouldBlock)) if wait => {
                    if self.handing_over.load(Ordering::SeqCst) {
                        return Err(OpError::Interrupted);
                    }
                    // Retry when a lock is released here, or after a while for other holders.
                    let _ =
                        tokio::time::timeout(std::time::Duration::from_millis(250), changed).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// What close(2) does to a file: commit it, and drop the closing process's POSIX locks.
    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub async fn flush(&self, ino: Ino, owner: u64) -> OpResult<()> {
        let committed = self.commit(ino).await;
        self.release_locks(ino, owner).await?;
        committed
    }

    /// Drops every lock `owner` holds on `ino`, waking local waiters.
    /// Before this node lets go of a lock on `ino`: what it buffered for the file lands now,
    /// while the lock still covers it, or never. A commit that failed under the lock and
    /// landed later (the background commit retries) could overwrite what the next holder
    /// wrote, and until then this node's reads would show the old bytes over the new: found
    /// by the simulation's lock-protected counter, which lost increments so.
    async fn land_before_unlock(&self, ino: Ino) {
        if let Some(f) = self.open_file(ino)
            && let Err(e) = f.commit(self).await
        {
            f.drop_unlanded(self);
            warn!(
                ino,
                error = %e,
                "dropped buffered writes that could not be committed before their lock was released; the next fsync or close of the file here reports EIO"
            );
        }
    }

    async fn release_locks(&self, ino: Ino, owner: u64) -> OpResult<()> {
        let owner = self.lock_owner(owner);
        let holds = self
            .view
            .locks(ino)
            .map_err(store_err)?
            .iter()
            .any(|l| l.owner == owner);
        if holds {
            self.land_before_unlock(ino).await;
            self.run(MetaCommand::ReleaseLocks { ino, owner }).await?;
            self.locks_changed.notify_waiters();
        }
        Ok(())
    }

    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub async fn fallocate(&self, ino: Ino, off: u64, len: u64, mode: i32) -> OpResult<()> {
        const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
        const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;
        if len == 0 {
            return Err(FsError::Invalid.into());
        }
        let keep_size = mode & KEEP_SIZE != 0;
        let mode = match mode & !KEEP_SIZE {
            0 => Fallocate::Allocate { keep_size },
            PUNCH_HOLE if keep_size => Fallocate::PunchHole,
            ZERO_RANGE => Fallocate::ZeroRange { keep_size },
            _ => return Err(FsError::NotSupported.into()),
        };
        self.commit(ino).await?;
        self.run(MetaCommand::Fallocate {
            ino,
            off,
            len,
            mode,
        })
        .await?;
        Ok(())
    }

    #[instrument(level = "debug", skip_all, fields(node = self.id, src = src))]
    pub async fn copy_range(
        &self,
        src: Ino,
        src_off: u64,
        dst: Ino,
        dst_off: u64,
        len: u64,
    ) -> OpResult<u64> {
        self.commit(src).await?;
        self.commit(dst).await?;
        match self
            .run(MetaCommand::CopyRange {
                src,
                src_off,
                dst,
                dst_off,
                len,
            })
            .await?
        {
            Reply::Copied(n) => Ok(n),
            other => Err(OpError::Raft(format!("unexpected reply {other:?}"))),
        }
    }

    /// SEEK_DATA and SEEK_HOLE over committed slices and buffered writes.
    #[instrument(level = "debug", skip_all, fields(node = self.id, ino = ino))]
    pub fn lseek(&self, ino: Ino, off: u64, whence: i32) -> OpResult<u64> {
        let inode = self.getattr(ino)?;
        if off >= inode.size {
            return Err(OpError::PastEnd);
        }
        let mut ranges: Vec<(u64, u64)> = self
            .view
            .slices(ino, off, inode.size)
            .map_err(store_err)?
            .iter()
            .map(|s| (s.off, s.end()))
            .collect();
        if let Some(f) = self.open_file(ino) {
            ranges.extend(f.buffered_ranges());
        }
        ranges.sort_unstable();
        match whence {
            SEEK_DATA => ranges
                .iter()
                .find(|(_, end)| *end > off)
                .map(|(start, _)| (*start).max(off))
                .filter(|pos| *pos < inode.size)
                .ok_or(OpError::PastEnd),
            SEEK_HOLE => {
                let mut pos = off;
                for (start, end) in ranges {
                    if start > pos {
                        break;
                    }
                    pos = pos.max(end);
                }
                Ok(pos.min(inode.size))
            }
            _ => Err(FsError::Invalid.into()),
        }
    }
}

/// Builds the lock record of a FUSE lock request.
pub fn range_lock(
    owner: LockOwner,
    pid: u32,
    typ: i32,
    start: u64,
    end: u64,
) -> Option<(RangeLock, bool)> {
    let (kind, unlock) = match typ {
        libc::F_RDLCK => (LockKind::Read, false),
        libc::F_WRLCK => (LockKind::Write, false),
        libc::F_UNLCK => (LockKind::Write, true),
        _ => return None,
    };
    Some((
        RangeLock {
            owner,
            pid,
            kind,
            start,
            end,
        },
        unlock,
    ))
}
