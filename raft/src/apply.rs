//! Applying commands: the deterministic heart of the metadata layer.
//!
//! A batch of log entries is applied into an in-memory overlay (`Txn`) over the sled tree and
//! written as one atomic sled batch together with the applied log id. Each command validates
//! before it mutates, so a command that fails with an `FsError` changes nothing.
//!
//! This file holds the overlay and the dispatch from a command to its handler. The handlers
//! are methods of `Ctx`, one file per concern: `namespace` (create, link, unlink, rename),
//! `data` (attributes, writes, xattrs), `sessions` (locks and the sessions that hold them),
//! `volumes` (volumes, quotas, mounts, node records), and `tree`, the inode and chunk-map
//! helpers they share.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::error::{FsError, StoreError};
use crate::keys;
use crate::layout::{self, RefDelta};
use crate::types::*;
use crate::view::{KeyValue, Kv, Xattrs, decode, encode};

const S_ISGID: u32 = 0o2000;
const XATTR_NAME_MAX: usize = 255;
const XATTR_VALUE_MAX: usize = 64 * 1024;
/// How deep `is_ancestor` walks before it declares the tree corrupt.
const MAX_DEPTH: usize = 1 << 16;

/// Writes staged over the tree; reads see them first.
pub struct Txn<'a> {
    tree: &'a sled::Tree,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Keys written since the last `take_touched`, to tell readers' caches what changed.
    touched: Vec<Vec<u8>>,
}

impl Kv for Txn<'_> {
    fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.tree.get(key)?.map(|v| v.to_vec())),
        }
    }

    /// The tree's keys in the range with the staged writes laid over them.
    fn range_raw(&self, start: &[u8], end: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for kv in self.tree.range(start..end) {
            let (k, v) = kv?;
            merged.insert(k.to_vec(), Some(v.to_vec()));
        }
        for (k, v) in self.writes.range(start.to_vec()..end.to_vec()) {
            merged.insert(k.clone(), v.clone());
        }
        Ok(merged
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect())
    }
}

/// A point in a `Txn` to roll back to.
pub struct Checkpoint {
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    touched: usize,
}

impl<'a> Txn<'a> {
    /// Marks the current state, for a command that finds out late that it must fail.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            writes: self.writes.clone(),
            touched: self.touched.len(),
        }
    }

    /// Forgets every write since `cp`.
    pub fn rollback(&mut self, cp: Checkpoint) {
        self.writes = cp.writes;
        self.touched.truncate(cp.touched);
    }

    pub fn new(tree: &'a sled::Tree) -> Txn<'a> {
        Txn {
            tree,
            writes: BTreeMap::new(),
            touched: Vec::new(),
        }
    }

    pub fn put<T: Serialize>(&mut self, key: &[u8], value: &T) {
        self.touched.push(key.to_vec());
        self.writes.insert(key.to_vec(), Some(encode(value)));
    }

    pub fn del(&mut self, key: &[u8]) {
        self.touched.push(key.to_vec());
        self.writes.insert(key.to_vec(), None);
    }

    /// What the writes since the last call change for someone caching inodes and entries.
    pub fn take_touched(&mut self) -> Vec<Change> {
        changes_of(std::mem::take(&mut self.touched))
    }

    /// Every key with `prefix` and its value as this transaction sees it: the tree with the
    /// staged writes laid over it. Apply must never read the tree alone: how log entries are
    /// grouped into batches differs between nodes, and the result must not.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for kv in self.tree.scan_prefix(prefix) {
            let (k, v) = kv?;
            merged.insert(k.to_vec(), Some(v.to_vec()));
        }
        for (k, v) in self.writes.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            merged.insert(k.clone(), v.clone());
        }
        Ok(merged
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect())
    }

    pub fn into_batch(self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (k, v) in self.writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        batch
    }
}

/// Something a reader may have cached that an applied command changed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// An inode's attributes or data.
    Inode(Ino),
    /// A directory entry was added, removed or replaced.
    Entry { parent: Ino, name: Vec<u8> },
    /// The byte-range locks of an inode changed.
    Locks(Ino),
    /// The record of an unlinked inode's holders changed: a node that holds it and has no
    /// handle on it should release it.
    Orphan(Ino),
}

/// What writes to `touched` keys change for someone caching inodes and entries.
pub(crate) fn changes_of(touched: impl IntoIterator<Item = Vec<u8>>) -> Vec<Change> {
    let mut out: Vec<Change> = touched
        .into_iter()
        .filter_map(|k| match k.first() {
            Some(&keys::INODE) | Some(&keys::CHUNK) if k.len() >= 9 => {
                Some(Change::Inode(keys::u64_after_tag(&k)))
            }
            Some(&keys::LOCKS) if k.len() >= 9 => Some(Change::Locks(keys::u64_after_tag(&k))),
            Some(&keys::ORPHAN) if k.len() >= 9 => Some(Change::Orphan(keys::u64_after_tag(&k))),
            Some(&keys::DENTRY) if k.len() >= 9 => Some(Change::Entry {
                parent: keys::u64_after_tag(&k),
                name: k[9..].to_vec(),
            }),
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Applies one request's commands in order; returns one result per command. A request
/// applied before (same session and `seq`) is not applied again: it gets the answer it got
/// the first time.
pub fn apply_request(txn: &mut Txn<'_>, req: &MetaRequest) -> Result<MetaResponse, StoreError> {
    if req.seq != 0 {
        if let Some(first) = txn.get::<MetaResponse>("reply", &keys::reply(req.session, req.seq))? {
            return Ok(first);
        }
        let acked: u64 = txn.get("acked", &keys::acked(req.session))?.unwrap_or(0);
        if req.seq < acked {
            // Its proposer had every answer up to `acked`: this is a copy that arrived late.
            return Ok(MetaResponse {
                results: req.cmds.iter().map(|_| Err(FsError::Stale)).collect(),
            });
        }
        if req.acked > acked {
            let answered = txn.range_raw(
                &keys::reply(req.session, 0),
                &keys::reply(req.session, req.acked),
            )?;
            for (k, _) in answered {
                txn.del(&k);
            }
            txn.put(&keys::acked(req.session), &req.acked);
        }
    }
    let resp = apply_commands(txn, req)?;
    // Kept while the session lives; an ended session's keys go with it (`end_session`).
    if req.seq != 0
        && txn
            .get::<(u64, Nanos)>("lease", &keys::lease(req.session))?
            .is_some()
    {
        txn.put(&keys::reply(req.session, req.seq), &resp);
    }
    Ok(resp)
}

fn apply_commands(txn: &mut Txn<'_>, req: &MetaRequest) -> Result<MetaResponse, StoreError> {
    let mut ctx = Ctx {
        txn,
        now: req.now,
        session: req.session,
    };
    let mut results = Vec::with_capacity(req.cmds.len());
    for cmd in &req.cmds {
        // Fencing: once a session's lease has expired (and its locks went to others), nothing
        // it proposes takes effect. Session 0 is the cluster's own bootstrap.
        let exempt = req.session == 0 || matches!(cmd, MetaCommand::OpenSession { .. });
        if !exempt
            && ctx
                .txn
                .get::<(u64, Nanos)>("lease", &keys::lease(req.session))?
                .is_none()
        {
            results.push(Err(FsError::SessionExpired));
            continue;
        }
        results.push(ctx.apply(cmd)?);
    }
    Ok(MetaResponse { results })
}

/// Creates the root directory if the tree has none. Part of applying the first log entry.
pub fn ensure_root(txn: &mut Txn<'_>, now: Nanos) -> Result<(), StoreError> {
    if txn.inode(ROOT_INO)?.is_some() {
        return Ok(());
    }
    let root = Inode {
        ino: ROOT_INO,
        kind: FileKind::Dir,
        perm: 0o755,
        uid: 0,
        gid: 0,
        size: 0,
        nlink: 2,
        rdev: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        generation: 1,
        parent: ROOT_INO,
        children: 0,
        target: Vec::new(),
        volume: 0,
    };
    txn.put(&keys::inode(ROOT_INO), &root);
    txn.put(keys::META_NEXT_INO, &(ROOT_INO + 1));
    txn.put(keys::META_INODES, &1u64);
    Ok(())
}

type Outcome = Result<CommandResult, StoreError>;

/// Returns early from a command with a POSIX error.
macro_rules! fail {
    ($e:expr) => {
        return Ok(Err($e))
    };
}

/// Unwraps a `Result<Result<T, FsError>, StoreError>`, returning either error early.
macro_rules! tri {
    ($e:expr) => {
        match $e? {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        }
    };
}

mod data;
mod namespace;
mod sessions;
mod tree;
mod volumes;

pub use sessions::conflicting;

struct Ctx<'t, 'a> {
    txn: &'t mut Txn<'a>,
    now: Nanos,
    session: u64,
}

fn check_name(name: &[u8]) -> Result<(), FsError> {
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(FsError::Invalid);
    }
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name == b"." || name == b".." {
        return Err(FsError::Exists);
    }
    Ok(())
}

impl Ctx<'_, '_> {
    fn apply(&mut self, cmd: &MetaCommand) -> Outcome {
        match cmd {
            MetaCommand::Create {
                parent,
                name,
                kind,
                perm,
                uid,
                gid,
                rdev,
                target,
            } => self.create(*parent, name, *kind, *perm, (*uid, *gid), *rdev, target),
            MetaCommand::Link {
                ino,
                new_parent,
                new_name,
            } => {
                tri!(self.check_same_volume(*ino, *new_parent));
                self.link(*ino, *new_parent, new_name)
            }
            MetaCommand::Unlink { parent, name } => self.unlink(*parent, name),
            MetaCommand::Rmdir { parent, name } => self.rmdir(*parent, name),
            MetaCommand::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
            } => {
                if let Some(d) = self.txn.lookup(*parent, name)? {
                    tri!(self.check_same_volume(d.ino, *new_parent));
                }
                if flags.exchange
                    && let Some(d) = self.txn.lookup(*new_parent, new_name)?
                {
                    tri!(self.check_same_volume(d.ino, *parent));
                }
                if flags.exchange {
                    self.exchange(*parent, name, *new_parent, new_name)
                } else {
                    self.rename(*parent, name, *new_parent, new_name, flags.noreplace)
                }
            }
            MetaCommand::SetAttr { ino, attr } => self.setattr(*ino, attr),
            MetaCommand::Write { ino, slices, size } => self.write(*ino, slices, *size),
            MetaCommand::WriteInline {
                ino,
                slices,
                size,
                volume,
                blocks,
            } => self.write_inline(*ino, slices, *size, *volume, blocks),
            MetaCommand::Spill { blocks } => self.spill(blocks),
            MetaCommand::Fallocate {
                ino,
                off,
                len,
                mode,
            } => self.fallocate(*ino, *off, *len, *mode),
            MetaCommand::CopyRange {
                src,
                src_off,
                dst,
                dst_off,
                len,
            } => self.copy_range(*src, *src_off, *dst, *dst_off, *len),
            MetaCommand::SetXattr {
                ino,
                name,
                value,
                mode,
            } => self.setxattr(*ino, name, value, *mode),
            MetaCommand::RemoveXattr { ino, name } => self.removexattr(*ino, name),
            MetaCommand::Purge { ino } => self.purge(*ino),
            MetaCommand::SetLock { ino, lock, unlock } => self.set_lock(*ino, *lock, *unlock),
            MetaCommand::ReleaseLocks { ino, owner } => self.release_locks(*ino, *owner),
            MetaCommand::OpenSession { node, session } => self.open_session(*node, *session),
            MetaCommand::RenewSession => self.renew_session(),
            MetaCommand::ExpireSessions => self.expire_sessions(),
            MetaCommand::ForgetGarbage { blocks } => self.forget_garbage(blocks),
            MetaCommand::SetJoinSecret { hash } => {
                self.txn.put(keys::META_JOIN_SECRET, hash);
                Ok(Ok(Reply::Done))
            }
            MetaCommand::AllocNodeId => {
                // Node 1 is the one that ran `shoal init`.
                let id = self.txn.counter(keys::META_NEXT_NODE)?.max(2);
                self.txn.put(keys::META_NEXT_NODE, &(id + 1));
                Ok(Ok(Reply::NodeId(id)))
            }
            MetaCommand::ReportNode {
                node,
                disk_total,
                disk_free,
                hostname,
                issuer,
            } => {
                let now = self.now;
                self.update_node(*node, |info| {
                    info.disk_total = *disk_total;
                    info.disk_free = *disk_free;
                    info.reported_at = now;
                    info.hostname.clone_from(hostname);
                    info.issuer = *issuer;
                })
            }
            MetaCommand::CreateVolume { name, options } => self.create_volume(name, options),
            MetaCommand::TrashVolume { name } => self.trash_volume(name),
            MetaCommand::RestoreVolume { name, id, rename } => {
                self.restore_volume(name, *id, rename.as_deref())
            }
            MetaCommand::PurgeVolume { name, id, trashed } => {
                self.purge_volume(name, *id, *trashed)
            }
            MetaCommand::MountVolume {
                name,
                node,
                id,
                mount,
            } => self.mount_volume(name, *node, id, *mount),
            MetaCommand::ClearMounts { node } => self.clear_mounts(*node),
            MetaCommand::RevokeNode { node } => {
                self.txn.put(&keys::revoked(*node), &true);
                Ok(Ok(Reply::Done))
            }
            MetaCommand::SetTrust { cas } => {
                if cas.is_empty() || cas.iter().any(Vec::is_empty) {
                    fail!(FsError::Invalid);
                }
                self.txn.put(keys::META_TRUST, cas);
                Ok(Ok(Reply::Done))
            }
            MetaCommand::SetTrashRetention { nanos } => {
                if *nanos < 0 {
                    fail!(FsError::Invalid);
                }
                let mut settings = self.txn.settings()?;
                settings.trash_retention = *nanos;
                self.txn.put(keys::META_SETTINGS, &settings);
                Ok(Ok(Reply::Done))
            }
            MetaCommand::SetNodeLabel { node, key, value } => {
                if crate::types::check_label(key, value.as_deref().unwrap_or("")).is_err() {
                    fail!(FsError::Invalid);
                }
                self.update_node(*node, |info| match value {
                    Some(v) => {
                        info.labels.insert(key.clone(), v.clone());
                    }
                    None => {
                        info.labels.remove(key);
                    }
                })
            }
        }
    }
}

#[cfg(test)]
mod tests;
