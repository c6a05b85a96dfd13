//! Applying commands: the deterministic heart of the metadata layer.
//!
//! A batch of log entries is applied into an in-memory overlay (`Txn`) over the sled tree and
//! written as one atomic sled batch together with the applied log id. Each command validates
//! before it mutates, so a command that fails with an `FsError` changes nothing.

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

    // ---- volumes ----

    fn volume(&self, name: &str) -> Result<Option<Volume>, StoreError> {
        self.txn.get("volume", &keys::volume(name))
    }

    fn put_volume(&mut self, v: Volume) -> Outcome {
        self.txn.put(&keys::volume(&v.name), &v);
        Ok(Ok(Reply::Volume(v)))
    }

    /// The root-owned directory `name` under the root, made if missing.
    fn system_dir(&mut self, name: &[u8]) -> Result<Result<Ino, FsError>, StoreError> {
        if let Some(d) = self.txn.lookup(ROOT_INO, name)? {
            return Ok(if d.kind == FileKind::Dir {
                Ok(d.ino)
            } else {
                Err(FsError::NotDir)
            });
        }
        self.make_dir(ROOT_INO, name)
    }

    fn make_dir(&mut self, parent: Ino, name: &[u8]) -> Result<Result<Ino, FsError>, StoreError> {
        Ok(
            match self.create(parent, name, FileKind::Dir, 0o755, (0, 0), 0, b"")? {
                Ok(Reply::Inode(i)) => Ok(i.ino),
                Ok(_) => Err(FsError::Invalid),
                Err(e) => Err(e),
            },
        )
    }

    fn create_volume(&mut self, name: &str, options: &VolumeOptions) -> Outcome {
        if check_volume_name(name).is_err() {
            fail!(FsError::Invalid);
        }
        if let Some(v) = self.volume(name)? {
            // Every host that runs a task on the volume creates it, often at the same moment.
            if v.options.conflicts(options).is_empty() {
                return Ok(Ok(Reply::Volume(v)));
            }
            fail!(FsError::Exists);
        }
        let source = match &options.from {
            Some(from) => match self.volume(from)? {
                Some(v) if v.trashed.is_none() => Some(v),
                // A volume in the trash is not there to be cloned.
                _ => fail!(FsError::NotFound),
            },
            None => None,
        };
        let start = self.txn.checkpoint();
        let volumes = tri!(self.system_dir(VOLUMES_DIR));
        // A directory made there by hand becomes the volume; anything else is in the way.
        let (root, adopted) = match self.txn.lookup(volumes, name.as_bytes())? {
            Some(d) if d.kind == FileKind::Dir && source.is_none() => (d.ino, true),
            Some(_) => fail!(FsError::Exists),
            None => (tri!(self.make_dir(volumes, name.as_bytes())), false),
        };
        self.update(root, |i| i.volume = root)?;
        self.txn.put(
            &keys::volume_usage(root),
            &VolumeUsage {
                name: name.to_string(),
                quota: options.size,
                bytes: 0,
                inodes: 1,
            },
        );
        if adopted {
            self.adopt_tree(root)?;
        }
        if let Some(src) = &source {
            self.clone_tree(src.root, root)?;
        }
        if let Some(quota) = options.size
            && self
                .txn
                .volume_usage(root)?
                .is_some_and(|u| u.bytes > quota)
        {
            // What the volume starts with does not fit: leave no trace of the attempt.
            self.txn.rollback(start);
            fail!(FsError::QuotaExceeded);
        }
        self.put_volume(Volume {
            name: name.to_string(),
            root,
            options: options.clone(),
            created: self.now,
            trashed: None,
            mounts: Vec::new(),
        })
    }

    /// The generations of `name` in the trash, oldest first.
    fn trashed(&self, name: &str) -> Result<Vec<Volume>, StoreError> {
        let mut out: Vec<Volume> = self
            .txn
            .scan_prefix(&keys::trash_prefix(name))?
            .into_iter()
            .map(|(_, v)| decode("trashed volume", &v))
            .collect::<Result<_, _>>()?;
        out.sort_by_key(|v| (v.trashed, v.root));
        Ok(out)
    }

    /// The generation of `name` in the trash that `id` names, or, without `id`, the newest
    /// (`newest`) or the only one.
    fn pick_trashed(
        &self,
        name: &str,
        id: Option<Ino>,
        newest: bool,
    ) -> Result<Result<Volume, FsError>, StoreError> {
        let mut all = self.trashed(name)?;
        Ok(match id {
            Some(id) => all
                .into_iter()
                .find(|v| v.root == id)
                .ok_or(FsError::NotFound),
            None if all.len() > 1 && !newest => Err(FsError::Ambiguous),
            None => all.pop().ok_or(FsError::NotFound),
        })
    }

    fn trash_volume(&mut self, name: &str) -> Outcome {
        let Some(mut v) = self.volume(name)? else {
            fail!(FsError::NotFound);
        };
        if !v.mounts.is_empty() {
            fail!(FsError::Busy);
        }
        let volumes = tri!(self.system_dir(VOLUMES_DIR));
        let trash = tri!(self.system_dir(TRASH_DIR));
        if self.txn.lookup(volumes, name.as_bytes())?.map(|d| d.ino) != Some(v.root) {
            // Renamed by hand through a mount: put it back under its name first.
            fail!(FsError::NotFound);
        }
        // In the trash under its identity, so the name is free for a new volume at once.
        let id = v.root.to_string();
        tri!(self.rename(volumes, name.as_bytes(), trash, id.as_bytes(), true));
        v.trashed = Some(self.now);
        self.txn.del(&keys::volume(name));
        self.txn.put(&keys::trash(name, v.root), &v);
        Ok(Ok(Reply::Volume(v)))
    }

    fn restore_volume(&mut self, name: &str, id: Option<Ino>, rename: Option<&str>) -> Outcome {
        let mut v = tri!(self.pick_trashed(name, id, true));
        let to = rename.unwrap_or(name);
        if check_volume_name(to).is_err() {
            fail!(FsError::Invalid);
        }
        if self.volume(to)?.is_some() {
            fail!(FsError::Exists);
        }
        let volumes = tri!(self.system_dir(VOLUMES_DIR));
        let trash = tri!(self.system_dir(TRASH_DIR));
        let id = v.root.to_string();
        if self.txn.lookup(trash, id.as_bytes())?.map(|d| d.ino) != Some(v.root) {
            fail!(FsError::NotFound);
        }
        // A directory made by hand under the name is in the way: the restore refuses.
        tri!(self.rename(trash, id.as_bytes(), volumes, to.as_bytes(), true));
        self.txn.del(&keys::trash(name, v.root));
        if let Some(mut usage) = self.txn.volume_usage(v.root)? {
            usage.name = to.to_string();
            self.txn.put(&keys::volume_usage(v.root), &usage);
        }
        v.name = to.to_string();
        v.trashed = None;
        v.mounts.clear();
        self.put_volume(v)
    }

    fn purge_volume(&mut self, name: &str, id: Option<Ino>, trashed: Option<Nanos>) -> Outcome {
        let v = match self.pick_trashed(name, id, false)? {
            Ok(v) => v,
            // Only what is in the trash can be purged: `TrashVolume` first.
            Err(FsError::NotFound) if id.is_none() && self.volume(name)?.is_some() => {
                fail!(FsError::NotPermitted)
            }
            Err(e) => fail!(e),
        };
        if trashed.is_some() && trashed != v.trashed {
            fail!(FsError::NotPermitted);
        }
        let trash = tri!(self.system_dir(TRASH_DIR));
        let dir = v.root.to_string();
        if self.txn.lookup(trash, dir.as_bytes())?.map(|d| d.ino) == Some(v.root) {
            self.remove_tree(trash, dir.as_bytes())?;
        }
        self.txn.del(&keys::volume_usage(v.root));
        self.txn.del(&keys::trash(name, v.root));
        Ok(Ok(Reply::Done))
    }

    /// Removes `name` in `parent` and, for a directory, everything below it, depth first
    /// with a stack of its own (a tree may be deeper than any thread's stack). Files that
    /// lose their last link are deleted at once.
    fn remove_tree(&mut self, parent: Ino, name: &[u8]) -> Result<(), StoreError> {
        // (directory, name in it, whether its children were pushed already)
        let mut stack: Vec<(Ino, Vec<u8>, bool)> = vec![(parent, name.to_vec(), false)];
        while let Some((dir, name, expanded)) = stack.pop() {
            let Some(d) = self.txn.lookup(dir, &name)? else {
                continue;
            };
            if d.kind != FileKind::Dir {
                if let Ok(Reply::Removed { removed: Some(ino) }) = self.unlink(dir, &name)? {
                    self.destroy_orphan(ino)?;
                }
            } else if expanded {
                let _ = self.rmdir(dir, &name)?;
            } else {
                stack.push((dir, name, true));
                for (k, _) in self.txn.scan_prefix(&keys::dentry_prefix(d.ino))? {
                    stack.push((d.ino, k[9..].to_vec(), false));
                }
            }
        }
        Ok(())
    }

    fn mount_volume(&mut self, name: &str, node: u64, id: &str, mount: bool) -> Outcome {
        let Some(mut v) = self.volume(name)? else {
            fail!(FsError::NotFound);
        };
        v.mounts.retain(|(n, i, _)| !(*n == node && i == id));
        if mount {
            v.mounts.push((node, id.to_string(), self.now));
        }
        self.put_volume(v)
    }

    fn clear_mounts(&mut self, node: u64) -> Outcome {
        for (k, _) in self.txn.scan_prefix(&[keys::VOLUME])? {
            let Some(mut v) = self.txn.get::<Volume>("volume", &k)? else {
                continue;
            };
            let before = v.mounts.len();
            v.mounts.retain(|(n, _, _)| *n != node);
            if v.mounts.len() != before {
                self.txn.put(&k, &v);
            }
        }
        Ok(Ok(Reply::Done))
    }

    /// Makes everything below `root` part of the volume `root` and counts it.
    fn adopt_tree(&mut self, root: Ino) -> Result<(), StoreError> {
        let mut seen = BTreeSet::new();
        let mut dirs = vec![root];
        while let Some(dir) = dirs.pop() {
            for (_, d) in self.children(dir)? {
                let inode = self.update(d.ino, |i| i.volume = root)?;
                // Hard links are counted once, at the first name found.
                if seen.insert(d.ino) {
                    self.add_usage(root, inode.size as i64, 1)?;
                }
                if d.kind == FileKind::Dir {
                    dirs.push(d.ino);
                }
            }
        }
        Ok(())
    }

    /// Copies the tree below `from` into the empty directory `to` of the volume `to` belongs
    /// to. File data is shared, not copied: the copies name the same blocks, whose reference
    /// counts go up. Hard links stay links. A loop, not recursion: trees may be deep.
    fn clone_tree(&mut self, from: Ino, to: Ino) -> Result<(), StoreError> {
        let volume = self.txn.inode(to)?.map_or(0, |i| i.volume);
        // Source inodes and their copies, so hard links stay links.
        let mut copied: BTreeMap<Ino, Ino> = BTreeMap::new();
        let mut dirs = vec![(from, to)];
        while let Some((from, to)) = dirs.pop() {
            for (name, d) in self.children(from)? {
                if let Some(&ino) = copied.get(&d.ino) {
                    self.update(ino, |i| i.nlink += 1)?;
                    self.txn
                        .put(&keys::dentry(to, &name), &Dentry { ino, kind: d.kind });
                    self.touch_dir(to, 1, 0)?;
                    continue;
                }
                let Some(src) = self.txn.inode(d.ino)? else {
                    continue;
                };
                let ino = self.txn.counter(keys::META_NEXT_INO)?;
                self.txn.put(keys::META_NEXT_INO, &(ino + 1));
                let copy = Inode {
                    ino,
                    parent: to,
                    volume,
                    nlink: if src.kind == FileKind::Dir { 2 } else { 1 },
                    children: 0,
                    ..src.clone()
                };
                self.put_inode(&copy);
                self.txn
                    .put(&keys::dentry(to, &name), &Dentry { ino, kind: d.kind });
                self.touch_dir(to, 1, i32::from(d.kind == FileKind::Dir))?;
                self.bump_counter(keys::META_INODES, 1)?;
                self.add_usage(volume, src.size as i64, 1)?;
                let xattrs = self.txn.xattrs(src.ino)?;
                if !xattrs.is_empty() {
                    self.txn.put(&keys::xattrs(ino), &xattrs);
                }
                match src.kind {
                    FileKind::Dir => dirs.push((src.ino, ino)),
                    FileKind::File => {
                        copied.insert(src.ino, ino);
                        let slices = self.txn.slices(src.ino, 0, src.size)?;
                        self.overlay(ino, &slices)?;
                    }
                    _ => {
                        copied.insert(src.ino, ino);
                    }
                }
            }
        }
        Ok(())
    }

    /// The entries of a directory: (name, entry).
    fn children(&self, dir: Ino) -> Result<Vec<(Vec<u8>, Dentry)>, StoreError> {
        self.txn
            .scan_prefix(&keys::dentry_prefix(dir))?
            .into_iter()
            .map(|(k, v)| Ok((k[9..].to_vec(), crate::view::decode("dentry", &v)?)))
            .collect()
    }

    /// Names may not move between volumes, nor into or out of one: each volume's usage is
    /// the sum of what lies below its root, and a quota could otherwise be dodged.
    fn check_same_volume(&self, ino: Ino, to_dir: Ino) -> Result<Result<(), FsError>, StoreError> {
        let (Some(i), Some(dir)) = (self.txn.inode(ino)?, self.txn.inode(to_dir)?) else {
            // The command itself reports what is missing.
            return Ok(Ok(()));
        };
        // A volume's root lies outside itself, in `/volumes` or the trash.
        let from = if i.volume == i.ino { 0 } else { i.volume };
        Ok(if from == dir.volume {
            Ok(())
        } else {
            Err(FsError::CrossDevice)
        })
    }

    /// Refuses growing a file of a volume to `new_size` if that would pass the quota.
    fn check_quota(&self, inode: &Inode, new_size: u64) -> Result<Result<(), FsError>, StoreError> {
        if inode.volume == 0 || new_size <= inode.size {
            return Ok(Ok(()));
        }
        let Some(u) = self.txn.volume_usage(inode.volume)? else {
            return Ok(Ok(()));
        };
        Ok(match u.quota {
            Some(q) if u.bytes.saturating_add(new_size - inode.size) > q => {
                Err(FsError::QuotaExceeded)
            }
            _ => Ok(()),
        })
    }

    /// Adds to the usage of the volume `root` (nothing for 0, outside every volume).
    fn add_usage(&mut self, root: Ino, bytes: i64, inodes: i64) -> Result<(), StoreError> {
        if root == 0 || (bytes == 0 && inodes == 0) {
            return Ok(());
        }
        let key = keys::volume_usage(root);
        if let Some(mut u) = self.txn.volume_usage(root)? {
            u.bytes = u.bytes.saturating_add_signed(bytes);
            u.inodes = u.inodes.saturating_add_signed(inodes);
            self.txn.put(&key, &u);
        }
        Ok(())
    }

    fn update_node(&mut self, node: u64, f: impl FnOnce(&mut NodeInfo)) -> Outcome {
        let key = keys::node_info(node);
        let mut info: NodeInfo = self.txn.get("node info", &key)?.unwrap_or_default();
        f(&mut info);
        self.txn.put(&key, &info);
        Ok(Ok(Reply::Done))
    }

    // ---- helpers ----

    fn must_inode(&self, ino: Ino) -> Result<Result<Inode, FsError>, StoreError> {
        Ok(self.txn.inode(ino)?.ok_or(FsError::NotFound))
    }

    /// A directory that still exists (not removed while open).
    fn must_dir(&self, ino: Ino) -> Result<Result<Inode, FsError>, StoreError> {
        Ok(match self.txn.inode(ino)? {
            None => Err(FsError::NotFound),
            Some(i) if i.kind != FileKind::Dir => Err(FsError::NotDir),
            Some(i) if i.nlink == 0 => Err(FsError::NotFound),
            Some(i) => Ok(i),
        })
    }

    fn must_file(&self, ino: Ino) -> Result<Result<Inode, FsError>, StoreError> {
        Ok(match self.txn.inode(ino)? {
            None => Err(FsError::NotFound),
            Some(i) if i.kind == FileKind::Dir => Err(FsError::IsDir),
            Some(i) if i.kind != FileKind::File => Err(FsError::Invalid),
            Some(i) => Ok(i),
        })
    }

    fn put_inode(&mut self, inode: &Inode) {
        self.txn.put(&keys::inode(inode.ino), inode);
    }

    /// Reads an inode, lets `f` change it and writes it back.
    fn update(&mut self, ino: Ino, f: impl FnOnce(&mut Inode)) -> Result<Inode, StoreError> {
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
    fn touch_dir(&mut self, ino: Ino, children: i64, nlink: i32) -> Result<(), StoreError> {
        let now = self.now;
        self.update(ino, |d| {
            d.children = d.children.saturating_add_signed(children);
            d.nlink = d.nlink.saturating_add_signed(nlink);
            d.mtime = now;
            d.ctime = now;
        })?;
        Ok(())
    }

    fn bump_counter(&mut self, key: &[u8], delta: i64) -> Result<u64, StoreError> {
        let v = self.txn.counter(key)?.saturating_add_signed(delta);
        self.txn.put(key, &v);
        Ok(v)
    }

    fn apply_refs(&mut self, refs: RefDelta) -> Result<(), StoreError> {
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
    fn edit_chunks(
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
    fn overlay(&mut self, ino: Ino, slices: &[Slice]) -> Result<(), StoreError> {
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
    fn stored_chunks(&self, ino: Ino, start: u64, end: u64) -> Result<Vec<u64>, StoreError> {
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
    fn punch(&mut self, ino: Ino, start: u64, end: u64) -> Result<(), StoreError> {
        let chunks = self.stored_chunks(ino, start, end)?;
        self.edit_chunks(ino, chunks, |_, list, refs| {
            layout::punch(list, start, end, refs)
        })
    }

    /// Deletes an inode and everything hanging off it.
    fn destroy(&mut self, inode: &Inode) -> Result<(), StoreError> {
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
    fn drop_link(&mut self, ino: Ino) -> Result<Option<Ino>, StoreError> {
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
    fn is_ancestor(&self, ancestor: Ino, mut ino: Ino) -> Result<bool, StoreError> {
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

    // ---- namespace ----

    #[allow(clippy::too_many_arguments)]
    fn create(
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

    fn link(&mut self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> Outcome {
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

    fn unlink(&mut self, parent: Ino, name: &[u8]) -> Outcome {
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

    fn rmdir(&mut self, parent: Ino, name: &[u8]) -> Outcome {
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

    fn rename(
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

    fn exchange(&mut self, parent: Ino, name: &[u8], new_parent: Ino, new_name: &[u8]) -> Outcome {
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

    // ---- attributes and data ----

    fn setattr(&mut self, ino: Ino, attr: &SetAttr) -> Outcome {
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

    fn write(&mut self, ino: Ino, slices: &[Slice], size: u64) -> Outcome {
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

    fn fallocate(&mut self, ino: Ino, off: u64, len: u64, mode: Fallocate) -> Outcome {
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

    fn copy_range(&mut self, src: Ino, src_off: u64, dst: Ino, dst_off: u64, len: u64) -> Outcome {
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

    fn setxattr(&mut self, ino: Ino, name: &[u8], value: &[u8], mode: XattrMode) -> Outcome {
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

    fn removexattr(&mut self, ino: Ino, name: &[u8]) -> Outcome {
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
    fn purge(&mut self, ino: Ino) -> Outcome {
        self.release_orphan(ino, self.session)?;
        Ok(Ok(Reply::Done))
    }

    fn release_orphan(&mut self, ino: Ino, session: u64) -> Result<(), StoreError> {
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
    fn destroy_orphan(&mut self, ino: Ino) -> Result<(), StoreError> {
        if let Some(inode) = self.txn.inode(ino)?
            && inode.nlink == 0
        {
            self.destroy(&inode)?;
        }
        Ok(())
    }

    // ---- locks and sessions ----

    fn set_lock(&mut self, ino: Ino, lock: RangeLock, unlock: bool) -> Outcome {
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

    fn store_locks(&mut self, ino: Ino, mut locks: Vec<RangeLock>) {
        if locks.is_empty() {
            self.txn.del(&keys::locks(ino));
        } else {
            locks.sort_by_key(|l| (l.start, l.end, l.owner.session, l.owner.owner));
            self.txn.put(&keys::locks(ino), &locks);
        }
    }

    fn release_locks(&mut self, ino: Ino, owner: LockOwner) -> Outcome {
        let mut locks = self.txn.locks(ino)?;
        let before = locks.len();
        locks.retain(|l| l.owner != owner);
        if locks.len() != before {
            self.store_locks(ino, locks);
        }
        Ok(Ok(Reply::Done))
    }

    fn open_session(&mut self, node: u64, session: u64) -> Outcome {
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

    fn renew_session(&mut self) -> Outcome {
        let key = keys::lease(self.session);
        let Some((node, _)) = self.txn.get::<(u64, Nanos)>("lease", &key)? else {
            fail!(FsError::SessionExpired);
        };
        self.txn.put(&key, &(node, self.now + SESSION_LEASE));
        Ok(Ok(Reply::Done))
    }

    fn expire_sessions(&mut self) -> Outcome {
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
    fn end_session(&mut self, session: u64) -> Result<(), StoreError> {
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

    fn forget_garbage(&mut self, blocks: &[BlockId]) -> Outcome {
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

#[cfg(test)]
mod tests;
