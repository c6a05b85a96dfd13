//! Volumes: create, clone, trash, restore and purge; quotas and usage; mounts; node records.

use super::*;

impl Ctx<'_, '_> {
    pub(super) fn volume(&self, name: &str) -> Result<Option<Volume>, StoreError> {
        self.txn.get("volume", &keys::volume(name))
    }

    pub(super) fn put_volume(&mut self, v: Volume) -> Outcome {
        self.txn.put(&keys::volume(&v.name), &v);
        Ok(Ok(Reply::Volume(v)))
    }

    /// The root-owned directory `name` under the root, made if missing.
    pub(super) fn system_dir(&mut self, name: &[u8]) -> Result<Result<Ino, FsError>, StoreError> {
        if let Some(d) = self.txn.lookup(ROOT_INO, name)? {
            return Ok(if d.kind == FileKind::Dir {
                Ok(d.ino)
            } else {
                Err(FsError::NotDir)
            });
        }
        self.make_dir(ROOT_INO, name)
    }

    pub(super) fn make_dir(
        &mut self,
        parent: Ino,
        name: &[u8],
    ) -> Result<Result<Ino, FsError>, StoreError> {
        Ok(
            match self.create(parent, name, FileKind::Dir, 0o755, (0, 0), 0, b"")? {
                Ok(Reply::Inode(i)) => Ok(i.ino),
                Ok(_) => Err(FsError::Invalid),
                Err(e) => Err(e),
            },
        )
    }

    pub(super) fn create_volume(&mut self, name: &str, options: &VolumeOptions) -> Outcome {
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
    pub(super) fn trashed(&self, name: &str) -> Result<Vec<Volume>, StoreError> {
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
    pub(super) fn pick_trashed(
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

    pub(super) fn trash_volume(&mut self, name: &str) -> Outcome {
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

    pub(super) fn restore_volume(
        &mut self,
        name: &str,
        id: Option<Ino>,
        rename: Option<&str>,
    ) -> Outcome {
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

    pub(super) fn purge_volume(
        &mut self,
        name: &str,
        id: Option<Ino>,
        trashed: Option<Nanos>,
    ) -> Outcome {
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
    pub(super) fn remove_tree(&mut self, parent: Ino, name: &[u8]) -> Result<(), StoreError> {
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

    pub(super) fn mount_volume(&mut self, name: &str, node: u64, id: &str, mount: bool) -> Outcome {
        let Some(mut v) = self.volume(name)? else {
            fail!(FsError::NotFound);
        };
        v.mounts.retain(|(n, i, _)| !(*n == node && i == id));
        if mount {
            v.mounts.push((node, id.to_string(), self.now));
        }
        self.put_volume(v)
    }

    pub(super) fn clear_mounts(&mut self, node: u64) -> Outcome {
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
    pub(super) fn adopt_tree(&mut self, root: Ino) -> Result<(), StoreError> {
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
    pub(super) fn clone_tree(&mut self, from: Ino, to: Ino) -> Result<(), StoreError> {
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
    pub(super) fn children(&self, dir: Ino) -> Result<Vec<(Vec<u8>, Dentry)>, StoreError> {
        self.txn
            .scan_prefix(&keys::dentry_prefix(dir))?
            .into_iter()
            .map(|(k, v)| Ok((k[9..].to_vec(), crate::view::decode("dentry", &v)?)))
            .collect()
    }

    /// Names may not move between volumes, nor into or out of one: each volume's usage is
    /// the sum of what lies below its root, and a quota could otherwise be dodged.
    pub(super) fn check_same_volume(
        &self,
        ino: Ino,
        to_dir: Ino,
    ) -> Result<Result<(), FsError>, StoreError> {
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
    pub(super) fn check_quota(
        &self,
        inode: &Inode,
        new_size: u64,
    ) -> Result<Result<(), FsError>, StoreError> {
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
    pub(super) fn add_usage(
        &mut self,
        root: Ino,
        bytes: i64,
        inodes: i64,
    ) -> Result<(), StoreError> {
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

    pub(super) fn update_node(&mut self, node: u64, f: impl FnOnce(&mut NodeInfo)) -> Outcome {
        let key = keys::node_info(node);
        let mut info: NodeInfo = self.txn.get("node info", &key)?.unwrap_or_default();
        f(&mut info);
        self.txn.put(&key, &info);
        Ok(Ok(Reply::Done))
    }
}
