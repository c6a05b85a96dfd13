//! Locks and sessions: byte-range locks, their owners' sessions, and what expiring a session releases.

use super::*;

impl Ctx<'_, '_> {
    pub(super) fn set_lock(&mut self, ino: Ino, lock: RangeLock, unlock: bool) -> Outcome {
        tri!(self.must_inode(ino));
        let mut locks = self.txn.locks(ino)?;
        if !unlock && conflicting(&locks, &lock).is_some() {
            fail!(FsError::WouldBlock);
        }
        let mut out = Vec::with_capacity(locks.len() + 2);
        for l in locks.drain(..) {
            if l.owner != lock.owner || !l.overlaps(lock.start, lock.end) {
                out.push(l);
                continue;
            }
            if l.start < lock.start {
                out.push(RangeLock {
                    end: lock.start - 1,
                    ..l
                });
            }
            if l.end > lock.end {
                out.push(RangeLock {
                    start: lock.end + 1,
                    ..l
                });
            }
        }
        if !unlock {
            out.push(lock);
        }
        self.store_locks(ino, out);
        Ok(Ok(Reply::Done))
    }

    pub(super) fn store_locks(&mut self, ino: Ino, mut locks: Vec<RangeLock>) {
        if locks.is_empty() {
            self.txn.del(&keys::locks(ino));
        } else {
            locks.sort_by_key(|l| (l.start, l.end, l.owner.session, l.owner.owner));
            self.txn.put(&keys::locks(ino), &locks);
        }
    }

    pub(super) fn release_locks(&mut self, ino: Ino, owner: LockOwner) -> Outcome {
        let mut locks = self.txn.locks(ino)?;
        let before = locks.len();
        locks.retain(|l| l.owner != owner);
        if locks.len() != before {
            self.store_locks(ino, locks);
        }
        Ok(Ok(Reply::Done))
    }

    pub(super) fn open_session(&mut self, node: u64, session: u64) -> Outcome {
        let old: Option<u64> = self.txn.get("session", &keys::session(node))?;
        self.txn.put(&keys::session(node), &session);
        self.txn
            .put(&keys::lease(session), &(node, self.now + SESSION_LEASE));
        if let Some(old) = old
            && old != session
        {
            // The old session's process is gone: its locks and open-but-unlinked files go with it.
            self.end_session(old)?;
        }
        Ok(Ok(Reply::Done))
    }

    pub(super) fn renew_session(&mut self) -> Outcome {
        let key = keys::lease(self.session);
        let Some((node, _)) = self.txn.get::<(u64, Nanos)>("lease", &key)? else {
            fail!(FsError::SessionExpired);
        };
        self.txn.put(&key, &(node, self.now + SESSION_LEASE));
        Ok(Ok(Reply::Done))
    }

    pub(super) fn expire_sessions(&mut self) -> Outcome {
        let leases: Vec<(u64, (u64, Nanos))> = self
            .txn
            .scan_prefix(&[keys::LEASE])?
            .into_iter()
            .map(|(k, v)| Ok((keys::u64_after_tag(&k), crate::view::decode("lease", &v)?)))
            .collect::<Result<_, StoreError>>()?;
        for (session, (node, until)) in leases {
            if until < self.now {
                self.end_session(session)?;
                if self.txn.get::<u64>("session", &keys::session(node))? == Some(session) {
                    self.txn.del(&keys::session(node));
                }
            }
        }
        Ok(Ok(Reply::Done))
    }

    /// Ends a session: drops its lease, releases its locks and purges what it kept open.
    pub(super) fn end_session(&mut self, session: u64) -> Result<(), StoreError> {
        self.txn.del(&keys::lease(session));
        let lock_keys: Vec<Vec<u8>> = self
            .txn
            .scan_prefix(&[keys::LOCKS])?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for key in lock_keys {
            let ino = keys::u64_after_tag(&key);
            let mut locks = self.txn.locks(ino)?;
            let before = locks.len();
            locks.retain(|l| l.owner.session != session);
            if locks.len() != before {
                self.store_locks(ino, locks);
            }
        }
        for (k, _) in self.txn.scan_prefix(&[keys::ORPHAN])? {
            self.release_orphan(keys::u64_after_tag(&k), session)?;
        }
        let answers = self
            .txn
            .range_raw(&keys::reply(session, 0), &keys::reply(session, u64::MAX))?;
        for (k, _) in answers {
            self.txn.del(&k);
        }
        self.txn.del(&keys::reply(session, u64::MAX));
        self.txn.del(&keys::acked(session));
        Ok(())
    }

    pub(super) fn forget_garbage(&mut self, blocks: &[BlockId]) -> Outcome {
        for id in blocks {
            if self.txn.block_refs(id)? == 0 {
                self.txn.del(&keys::garbage(id));
            }
        }
        Ok(Ok(Reply::Done))
    }
}

/// The first lock held by another owner that conflicts with `lock`.
pub fn conflicting(locks: &[RangeLock], lock: &RangeLock) -> Option<RangeLock> {
    locks
        .iter()
        .find(|l| {
            l.owner != lock.owner
                && l.overlaps(lock.start, lock.end)
                && (l.kind == LockKind::Write || lock.kind == LockKind::Write)
        })
        .copied()
}
