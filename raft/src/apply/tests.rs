//! Unit tests of the state machine: every command, rename corner cases, link counts and
//! block reference counts.

use super::*;
use crate::view::StateView;

struct Sm {
    _dir: tempfile::TempDir,
    tree: sled::Tree,
    now: Nanos,
}

const SESSION: u64 = 7;

impl Sm {
    fn new() -> Sm {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path())
            .temporary(true)
            .open()
            .unwrap();
        let tree = db.open_tree("sm").unwrap();
        let mut txn = Txn::new(&tree);
        ensure_root(&mut txn, 0).unwrap();
        tree.apply_batch(txn.into_batch()).unwrap();
        let mut sm = Sm {
            _dir: dir,
            tree,
            now: 1,
        };
        sm.run(MetaCommand::OpenSession {
            node: 1,
            session: SESSION,
        })
        .unwrap();
        sm
    }

    fn run(&mut self, cmd: MetaCommand) -> CommandResult {
        self.run_as(SESSION, 0, 0, cmd)
    }

    /// Applies `cmd` as request `seq` of `session`, which has every answer below `acked`.
    fn run_as(&mut self, session: u64, seq: u64, acked: u64, cmd: MetaCommand) -> CommandResult {
        self.now += 1;
        let mut txn = Txn::new(&self.tree);
        let req = MetaRequest {
            now: self.now,
            session,
            seq,
            acked,
            cmds: vec![cmd],
        };
        let mut resp = apply_request(&mut txn, &req).unwrap();
        self.tree.apply_batch(txn.into_batch()).unwrap();
        resp.results.pop().unwrap()
    }

    fn view(&self) -> StateView {
        StateView {
            tree: self.tree.clone(),
        }
    }

    fn inode(&self, ino: Ino) -> Inode {
        self.view().inode(ino).unwrap().expect("inode exists")
    }

    fn create(&mut self, parent: Ino, name: &str, kind: FileKind) -> CommandResult {
        self.run(MetaCommand::Create {
            parent,
            name: name.into(),
            kind,
            perm: 0o644,
            uid: 1,
            gid: 2,
            rdev: 0,
            target: Vec::new(),
        })
    }

    fn mk(&mut self, parent: Ino, name: &str, kind: FileKind) -> Ino {
        match self.create(parent, name, kind) {
            Ok(Reply::Inode(i)) => i.ino,
            other => panic!("create {name}: {other:?}"),
        }
    }

    fn lookup(&self, parent: Ino, name: &str) -> Option<Ino> {
        self.view()
            .lookup(parent, name.as_bytes())
            .unwrap()
            .map(|d| d.ino)
    }

    fn rename(
        &mut self,
        parent: Ino,
        name: &str,
        new_parent: Ino,
        new_name: &str,
        flags: RenameFlags,
    ) -> CommandResult {
        self.run(MetaCommand::Rename {
            parent,
            name: name.into(),
            new_parent,
            new_name: new_name.into(),
            flags,
        })
    }

    fn write(&mut self, ino: Ino, off: u64, len: u32, block: u8) -> CommandResult {
        self.run(MetaCommand::Write {
            ino,
            slices: vec![Slice {
                off,
                len,
                block: BlockId([block; 32]),
                block_off: 0,
                block_len: len,
            }],
            size: off + u64::from(len),
        })
    }

    fn refs(&self, block: u8) -> u64 {
        self.view().block_refs(&BlockId([block; 32])).unwrap()
    }

    fn garbage(&self) -> Vec<u8> {
        self.view()
            .garbage(100)
            .unwrap()
            .iter()
            .map(|(b, _)| b.0[0])
            .collect()
    }
}

/// Runs `cmd` on a fresh state machine after `setup` and compares the outcome.
fn check(setup: impl FnOnce(&mut Sm) -> MetaCommand, expected: Result<(), FsError>) {
    let mut sm = Sm::new();
    let cmd = setup(&mut sm);
    let got = sm.run(cmd).map(|_| ());
    assert_eq!(got, expected);
}

#[test]
fn create_sets_owner_times_and_parent_counts() {
    let mut sm = Sm::new();
    let f = sm.mk(ROOT_INO, "f", FileKind::File);
    let d = sm.mk(ROOT_INO, "d", FileKind::Dir);
    let fi = sm.inode(f);
    assert_eq!(
        (fi.uid, fi.gid, fi.nlink, fi.perm, fi.size),
        (1, 2, 1, 0o644, 0)
    );
    assert_eq!(sm.inode(d).nlink, 2);
    let root = sm.inode(ROOT_INO);
    assert_eq!((root.nlink, root.children), (3, 2));
    assert_eq!(root.mtime, sm.now);
    assert_eq!(
        sm.create(ROOT_INO, "f", FileKind::File),
        Err(FsError::Exists)
    );
    assert_eq!(sm.create(f, "x", FileKind::File), Err(FsError::NotDir));
    assert_eq!(
        sm.create(ROOT_INO, &"n".repeat(256), FileKind::File),
        Err(FsError::NameTooLong)
    );
    assert_eq!(sm.view().inode_count().unwrap(), 3);
}

#[test]
fn setgid_directories_pass_their_group_on() {
    let mut sm = Sm::new();
    let d = sm.mk(ROOT_INO, "d", FileKind::Dir);
    sm.run(MetaCommand::SetAttr {
        ino: d,
        attr: SetAttr {
            perm: Some(0o2775),
            gid: Some(50),
            ..Default::default()
        },
    })
    .unwrap();
    let f = sm.mk(d, "f", FileKind::File);
    let sub = sm.mk(d, "sub", FileKind::Dir);
    assert_eq!(sm.inode(f).gid, 50);
    assert_eq!(sm.inode(sub).gid, 50);
    assert_eq!(sm.inode(sub).perm & S_ISGID, S_ISGID);
}

#[test]
fn hard_links_count_and_orphans_wait_for_purge() {
    let mut sm = Sm::new();
    let f = sm.mk(ROOT_INO, "f", FileKind::File);
    sm.write(f, 0, 10, 1).unwrap();
    sm.run(MetaCommand::Link {
        ino: f,
        new_parent: ROOT_INO,
        new_name: "g".into(),
    })
    .unwrap();
    assert_eq!(sm.inode(f).nlink, 2);
    let r = sm.run(MetaCommand::Unlink {
        parent: ROOT_INO,
        name: "f".into(),
    });
    assert_eq!(r, Ok(Reply::Removed { removed: None }));
    let r = sm.run(MetaCommand::Unlink {
        parent: ROOT_INO,
        name: "g".into(),
    });
    assert_eq!(r, Ok(Reply::Removed { removed: Some(f) }));
    // Unlinked but maybe open: the inode and its blocks stay until purged.
    assert_eq!(sm.inode(f).nlink, 0);
    assert_eq!(sm.refs(1), 1);
    assert_eq!(sm.view().orphans().unwrap(), vec![(f, vec![SESSION])]);
    sm.run(MetaCommand::Purge { ino: f }).unwrap();
    assert!(sm.view().inode(f).unwrap().is_none());
    assert_eq!(sm.refs(1), 0);
    assert_eq!(sm.garbage(), vec![1]);
    assert!(sm.view().orphans().unwrap().is_empty());
}

#[test]
fn link_refuses_directories_and_existing_names() {
    check(
        |sm| {
            let d = sm.mk(ROOT_INO, "d", FileKind::Dir);
            MetaCommand::Link {
                ino: d,
                new_parent: ROOT_INO,
                new_name: "e".into(),
            }
        },
        Err(FsError::NotPermitted),
    );
    check(
        |sm| {
            let f = sm.mk(ROOT_INO, "f", FileKind::File);
            sm.mk(ROOT_INO, "g", FileKind::File);
            MetaCommand::Link {
                ino: f,
                new_parent: ROOT_INO,
                new_name: "g".into(),
            }
        },
        Err(FsError::Exists),
    );
}

#[test]
fn unlink_and_rmdir_check_kinds_and_emptiness() {
    check(
        |sm| {
            sm.mk(ROOT_INO, "d", FileKind::Dir);
            MetaCommand::Unlink {
                parent: ROOT_INO,
                name: "d".into(),
            }
        },
        Err(FsError::IsDir),
    );
    check(
        |sm| {
            sm.mk(ROOT_INO, "f", FileKind::File);
            MetaCommand::Rmdir {
                parent: ROOT_INO,
                name: "f".into(),
            }
        },
        Err(FsError::NotDir),
    );
    check(
        |sm| {
            let d = sm.mk(ROOT_INO, "d", FileKind::Dir);
            sm.mk(d, "f", FileKind::File);
            MetaCommand::Rmdir {
                parent: ROOT_INO,
                name: "d".into(),
            }
        },
        Err(FsError::NotEmpty),
    );
    let mut sm = Sm::new();
    let d = sm.mk(ROOT_INO, "d", FileKind::Dir);
    sm.run(MetaCommand::Rmdir {
        parent: ROOT_INO,
        name: "d".into(),
    })
    .unwrap();
    assert!(sm.view().inode(d).unwrap().is_none());
    assert_eq!(sm.inode(ROOT_INO).nlink, 2);
    assert_eq!(sm.inode(ROOT_INO).children, 0);
}

#[test]
fn rename_over_a_file_orphans_the_victim() {
    let mut sm = Sm::new();
    let a = sm.mk(ROOT_INO, "a", FileKind::File);
    let b = sm.mk(ROOT_INO, "b", FileKind::File);
    let r = sm.rename(ROOT_INO, "a", ROOT_INO, "b", RenameFlags::default());
    assert_eq!(r, Ok(Reply::Removed { removed: Some(b) }));
    assert_eq!(sm.lookup(ROOT_INO, "b"), Some(a));
    assert_eq!(sm.lookup(ROOT_INO, "a"), None);
    assert_eq!(sm.inode(ROOT_INO).children, 1);
}

#[test]
fn rename_moves_directories_and_fixes_link_counts() {
    let mut sm = Sm::new();
    let d1 = sm.mk(ROOT_INO, "d1", FileKind::Dir);
    let d2 = sm.mk(ROOT_INO, "d2", FileKind::Dir);
    let sub = sm.mk(d1, "sub", FileKind::Dir);
    sm.rename(d1, "sub", d2, "moved", RenameFlags::default())
        .unwrap();
    assert_eq!(sm.inode(d1).nlink, 2);
    assert_eq!(sm.inode(d2).nlink, 3);
    assert_eq!(sm.inode(sub).parent, d2);
    // A directory over an empty directory replaces it.
    let empty = sm.mk(d1, "empty", FileKind::Dir);
    sm.rename(d2, "moved", d1, "empty", RenameFlags::default())
        .unwrap();
    assert!(sm.view().inode(empty).unwrap().is_none());
    assert_eq!(sm.inode(d1).nlink, 3);
    assert_eq!(sm.inode(d2).nlink, 2);
    assert_eq!(sm.inode(d1).children, 1);
}

#[test]
fn rename_corner_cases() {
    let flags = RenameFlags::default();
    // Into its own subtree.
    check(
        |sm| {
            let d = sm.mk(ROOT_INO, "d", FileKind::Dir);
            sm.mk(d, "sub", FileKind::Dir);
            MetaCommand::Rename {
                parent: ROOT_INO,
                name: "d".into(),
                new_parent: d,
                new_name: "x".into(),
                flags,
            }
        },
        Err(FsError::Invalid),
    );
    // A directory over a non-empty directory.
    check(
        |sm| {
            sm.mk(ROOT_INO, "a", FileKind::Dir);
            let b = sm.mk(ROOT_INO, "b", FileKind::Dir);
            sm.mk(b, "f", FileKind::File);
            MetaCommand::Rename {
                parent: ROOT_INO,
                name: "a".into(),
                new_parent: ROOT_INO,
                new_name: "b".into(),
                flags,
            }
        },
        Err(FsError::NotEmpty),
    );
    // A directory over a file, and a file over a directory.
    check(
        |sm| {
            sm.mk(ROOT_INO, "a", FileKind::Dir);
            sm.mk(ROOT_INO, "b", FileKind::File);
            MetaCommand::Rename {
                parent: ROOT_INO,
                name: "a".into(),
                new_parent: ROOT_INO,
                new_name: "b".into(),
                flags,
            }
        },
        Err(FsError::NotDir),
    );
    check(
        |sm| {
            sm.mk(ROOT_INO, "a", FileKind::File);
            sm.mk(ROOT_INO, "b", FileKind::Dir);
            MetaCommand::Rename {
                parent: ROOT_INO,
                name: "a".into(),
                new_parent: ROOT_INO,
                new_name: "b".into(),
                flags,
            }
        },
        Err(FsError::IsDir),
    );
    // RENAME_NOREPLACE with an existing target.
    check(
        |sm| {
            sm.mk(ROOT_INO, "a", FileKind::File);
            sm.mk(ROOT_INO, "b", FileKind::File);
            MetaCommand::Rename {
                parent: ROOT_INO,
                name: "a".into(),
                new_parent: ROOT_INO,
                new_name: "b".into(),
                flags: RenameFlags {
                    noreplace: true,
                    exchange: false,
                },
            }
        },
        Err(FsError::Exists),
    );
    // A missing source.
    check(
        |_| MetaCommand::Rename {
            parent: ROOT_INO,
            name: "nope".into(),
            new_parent: ROOT_INO,
            new_name: "b".into(),
            flags,
        },
        Err(FsError::NotFound),
    );
}

#[test]
fn rename_between_hard_links_of_one_inode_is_a_no_op() {
    let mut sm = Sm::new();
    let f = sm.mk(ROOT_INO, "a", FileKind::File);
    sm.run(MetaCommand::Link {
        ino: f,
        new_parent: ROOT_INO,
        new_name: "b".into(),
    })
    .unwrap();
    sm.rename(ROOT_INO, "a", ROOT_INO, "b", RenameFlags::default())
        .unwrap();
    assert_eq!(sm.lookup(ROOT_INO, "a"), Some(f));
    assert_eq!(sm.lookup(ROOT_INO, "b"), Some(f));
    assert_eq!(sm.inode(f).nlink, 2);
}

#[test]
fn rename_exchange_swaps_entries_across_directories() {
    let mut sm = Sm::new();
    let d = sm.mk(ROOT_INO, "d", FileKind::Dir);
    let f = sm.mk(ROOT_INO, "f", FileKind::File);
    let sub = sm.mk(d, "sub", FileKind::Dir);
    let exchange = RenameFlags {
        noreplace: false,
        exchange: true,
    };
    sm.rename(ROOT_INO, "f", d, "sub", exchange).unwrap();
    assert_eq!(sm.lookup(ROOT_INO, "f"), Some(sub));
    assert_eq!(sm.lookup(d, "sub"), Some(f));
    assert_eq!(sm.inode(sub).parent, ROOT_INO);
    assert_eq!(sm.inode(d).nlink, 2);
    assert_eq!(sm.inode(ROOT_INO).nlink, 4);
    assert_eq!(
        sm.rename(ROOT_INO, "f", d, "missing", exchange),
        Err(FsError::NotFound)
    );
}

#[test]
fn writes_truncate_and_gc_keep_reference_counts_exact() {
    let mut sm = Sm::new();
    let f = sm.mk(ROOT_INO, "f", FileKind::File);
    sm.write(f, 0, 100, 1).unwrap();
    sm.write(f, 40, 20, 2).unwrap();
    assert_eq!(sm.inode(f).size, 100);
    // Block 1 is now referenced by the slices on both sides of the overwrite.
    assert_eq!((sm.refs(1), sm.refs(2)), (2, 1));
    let slices = sm.view().slices(f, 0, 100).unwrap();
    assert_eq!(slices.len(), 3);
    assert_eq!(slices[2].block_off, 60);
    sm.run(MetaCommand::SetAttr {
        ino: f,
        attr: SetAttr {
            size: Some(30),
            ..Default::default()
        },
    })
    .unwrap();
    assert_eq!((sm.refs(1), sm.refs(2)), (1, 0));
    assert_eq!(sm.garbage(), vec![2]);
    // A block that is referenced again leaves the garbage list.
    sm.write(f, 50, 10, 2).unwrap();
    assert!(sm.garbage().is_empty());
    assert_eq!(sm.inode(f).size, 60);
    // Truncating a directory fails.
    let r = sm.run(MetaCommand::SetAttr {
        ino: ROOT_INO,
        attr: SetAttr {
            size: Some(0),
            ..Default::default()
        },
    });
    assert_eq!(r, Err(FsError::IsDir));
}

#[test]
fn forget_garbage_keeps_blocks_that_came_back() {
    let mut sm = Sm::new();
    let f = sm.mk(ROOT_INO, "f", FileKind::File);
    sm.write(f, 0, 10, 1).unwrap();
    sm.write(f, 0, 10, 2).unwrap();
    assert_eq!(sm.garbage(), vec![1]);
    sm.run(MetaCommand::ForgetGarbage {
        blocks: vec![BlockId([1; 32]), BlockId([2; 32])],
    })
    .unwrap();
    assert!(sm.garbage().is_empty());
    assert_eq!(sm.refs(2), 1);
}

#[test]
fn copy_range_shares_blocks_and_fallocate_punches() {
    let mut sm = Sm::new();
    let a = sm.mk(ROOT_INO, "a", FileKind::File);
    let b = sm.mk(ROOT_INO, "b", FileKind::File);
    sm.write(a, 0, 100, 1).unwrap();
    let r = sm.run(MetaCommand::CopyRange {
        src: a,
        src_off: 10,
        dst: b,
        dst_off: 1000,
        len: 500,
    });
    assert_eq!(r, Ok(Reply::Copied(90)));
    assert_eq!(sm.inode(b).size, 1090);
    assert_eq!(sm.refs(1), 2);
    let s = sm.view().slices(b, 0, 2000).unwrap();
    assert_eq!((s[0].off, s[0].len, s[0].block_off), (1000, 90, 10));
    sm.run(MetaCommand::Fallocate {
        ino: a,
        off: 0,
        len: 100,
        mode: Fallocate::PunchHole,
    })
    .unwrap();
    assert!(sm.view().slices(a, 0, 100).unwrap().is_empty());
    assert_eq!(sm.inode(a).size, 100);
    assert_eq!(sm.refs(1), 1);
    sm.run(MetaCommand::Fallocate {
        ino: a,
        off: 0,
        len: 4096,
        mode: Fallocate::Allocate { keep_size: false },
    })
    .unwrap();
    assert_eq!(sm.inode(a).size, 4096);
    let r = sm.run(MetaCommand::CopyRange {
        src: a,
        src_off: 0,
        dst: a,
        dst_off: 10,
        len: 100,
    });
    assert_eq!(r, Err(FsError::Invalid));
}

#[test]
fn xattr_create_and_replace_modes() {
    let mut sm = Sm::new();
    let f = sm.mk(ROOT_INO, "f", FileKind::File);
    let set = |mode| MetaCommand::SetXattr {
        ino: f,
        name: "user.a".into(),
        value: "1".into(),
        mode,
    };
    assert_eq!(sm.run(set(XattrMode::Replace)), Err(FsError::NoAttr));
    sm.run(set(XattrMode::Create)).unwrap();
    assert_eq!(sm.run(set(XattrMode::Create)), Err(FsError::Exists));
    sm.run(set(XattrMode::Replace)).unwrap();
    assert_eq!(
        sm.view().xattrs(f).unwrap().get(b"user.a".as_slice()),
        Some(&b"1".to_vec())
    );
    sm.run(MetaCommand::RemoveXattr {
        ino: f,
        name: "user.a".into(),
    })
    .unwrap();
    let r = sm.run(MetaCommand::RemoveXattr {
        ino: f,
        name: "user.a".into(),
    });
    assert_eq!(r, Err(FsError::NoAttr));
}

fn lock(session: u64, owner: u64, kind: LockKind, start: u64, end: u64) -> RangeLock {
    RangeLock {
        owner: LockOwner { session, owner },
        pid: owner as u32,
        kind,
        start,
        end,
    }
}

#[test]
fn posix_locks_conflict_split_and_release() {
    let mut sm = Sm::new();
    let f = sm.mk(ROOT_INO, "f", FileKind::File);
    let set = |l, unlock| MetaCommand::SetLock {
        ino: f,
        lock: l,
        unlock,
    };
    sm.run(set(lock(1, 1, LockKind::Read, 0, 99), false))
        .unwrap();
    // Shared locks coexist; a write lock over them does not.
    sm.run(set(lock(1, 2, LockKind::Read, 50, 149), false))
        .unwrap();
    assert_eq!(
        sm.run(set(lock(1, 3, LockKind::Write, 90, 95), false)),
        Err(FsError::WouldBlock)
    );
    // Unlocking the middle of a range splits it.
    sm.run(set(lock(1, 1, LockKind::Read, 10, 19), true))
        .unwrap();
    let locks = sm.view().locks(f).unwrap();
    let mine: Vec<(u64, u64)> = locks
        .iter()
        .filter(|l| l.owner.owner == 1)
        .map(|l| (l.start, l.end))
        .collect();
    assert_eq!(mine, vec![(0, 9), (20, 99)]);
    sm.run(MetaCommand::ReleaseLocks {
        ino: f,
        owner: LockOwner {
            session: 1,
            owner: 2,
        },
    })
    .unwrap();
    sm.run(set(lock(1, 3, LockKind::Write, 100, 200), false))
        .unwrap();
    // A new session of the node drops the old session's locks.
    sm.run(MetaCommand::OpenSession {
        node: 1,
        session: 1,
    })
    .unwrap();
    sm.run(MetaCommand::OpenSession {
        node: 1,
        session: 2,
    })
    .unwrap();
    assert!(sm.view().locks(f).unwrap().is_empty());
}

#[test]
fn a_new_session_purges_the_orphans_of_the_old_one() {
    let mut sm = Sm::new();
    sm.run(MetaCommand::OpenSession {
        node: 1,
        session: SESSION,
    })
    .unwrap();
    let f = sm.mk(ROOT_INO, "f", FileKind::File);
    sm.write(f, 0, 10, 1).unwrap();
    sm.run(MetaCommand::Unlink {
        parent: ROOT_INO,
        name: "f".into(),
    })
    .unwrap();
    sm.run(MetaCommand::OpenSession {
        node: 1,
        session: 99,
    })
    .unwrap();
    assert!(sm.view().inode(f).unwrap().is_none());
    assert_eq!(sm.refs(1), 0);
}

#[test]
fn node_ids_and_join_secrets() {
    let mut sm = Sm::new();
    assert_eq!(sm.run(MetaCommand::AllocNodeId), Ok(Reply::NodeId(2)));
    assert_eq!(sm.run(MetaCommand::AllocNodeId), Ok(Reply::NodeId(3)));
    assert_eq!(sm.view().join_secret().unwrap(), None);
    sm.run(MetaCommand::SetJoinSecret { hash: [9; 32] })
        .unwrap();
    assert_eq!(sm.view().join_secret().unwrap(), Some([9; 32]));
    // A removed node's id is revoked for good, and never handed out again.
    assert!(!sm.view().is_revoked(3).unwrap());
    sm.run(MetaCommand::RevokeNode { node: 3 }).unwrap();
    assert!(sm.view().is_revoked(3).unwrap());
    assert!(!sm.view().is_revoked(2).unwrap());
    assert_eq!(sm.run(MetaCommand::AllocNodeId), Ok(Reply::NodeId(4)));
    // The CAs members accept: none recorded until a rotation; never an empty set.
    assert_eq!(sm.view().trust().unwrap(), None);
    let cas = vec![vec![1u8; 10], vec![2u8; 10]];
    sm.run(MetaCommand::SetTrust { cas: cas.clone() }).unwrap();
    assert_eq!(sm.view().trust().unwrap(), Some(cas));
    assert!(sm.run(MetaCommand::SetTrust { cas: vec![] }).is_err());
}

#[test]
fn an_expired_session_loses_its_locks_and_is_fenced() {
    let mut sm = Sm::new();
    let f = sm.mk(ROOT_INO, "f", FileKind::File);
    let mine = lock(SESSION, 1, LockKind::Write, 0, 99);
    sm.run(MetaCommand::SetLock {
        ino: f,
        lock: mine,
        unlock: false,
    })
    .unwrap();
    // Renewals keep the session alive past its first lease.
    sm.now += SESSION_LEASE - 10;
    sm.run(MetaCommand::RenewSession).unwrap();
    sm.now += SESSION_LEASE - 10;
    sm.run(MetaCommand::ExpireSessions).unwrap();
    assert_eq!(
        sm.view().locks(f).unwrap().len(),
        1,
        "a renewed session keeps its locks"
    );
    // Silence past the lease: the next expiry round ends the session.
    sm.now += SESSION_LEASE + 1;
    sm.run(MetaCommand::ExpireSessions).unwrap();
    assert!(
        sm.view().locks(f).unwrap().is_empty(),
        "an expired session's locks are released"
    );
    assert!(sm.view().sessions().unwrap().is_empty());
    // Everything the expired session proposes afterwards is refused.
    assert_eq!(
        sm.create(ROOT_INO, "late", FileKind::File),
        Err(FsError::SessionExpired)
    );
    assert_eq!(
        sm.run(MetaCommand::RenewSession),
        Err(FsError::SessionExpired)
    );
    assert_eq!(sm.write(f, 0, 10, 1), Err(FsError::SessionExpired));
    // A new session of the node works again.
    sm.run(MetaCommand::OpenSession {
        node: 1,
        session: SESSION,
    })
    .unwrap();
    sm.mk(ROOT_INO, "again", FileKind::File);
}

#[test]
fn applying_in_one_batch_or_many_gives_the_same_state() {
    // Nodes group log entries into apply batches differently; the state must not depend on it.
    let cmds = |now: Nanos| {
        vec![
            MetaRequest {
                now,
                session: 0,
                seq: 0,
                acked: 0,
                cmds: vec![MetaCommand::OpenSession {
                    node: 2,
                    session: 20,
                }],
            },
            MetaRequest {
                now: now + SESSION_LEASE - 1,
                session: 20,
                seq: 0,
                acked: 0,
                cmds: vec![MetaCommand::RenewSession],
            },
            MetaRequest {
                now: now + SESSION_LEASE + 10,
                session: 0,
                seq: 0,
                acked: 0,
                cmds: vec![MetaCommand::ExpireSessions],
            },
            MetaRequest {
                now: now + SESSION_LEASE + 20,
                session: 20,
                seq: 0,
                acked: 0,
                cmds: vec![MetaCommand::Create {
                    parent: ROOT_INO,
                    name: b"x".to_vec(),
                    kind: FileKind::File,
                    perm: 0o644,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    target: Vec::new(),
                }],
            },
        ]
    };
    // `one` applies the session's opening alone and the rest in one batch, so the renewal is
    // staged, not yet in the tree, when the expiry runs.
    let one = Sm::new();
    let reqs = cmds(100);
    let mut txn = Txn::new(&one.tree);
    let mut together = vec![apply_request(&mut txn, &reqs[0]).unwrap()];
    one.tree.apply_batch(txn.into_batch()).unwrap();
    let mut txn = Txn::new(&one.tree);
    together.extend(
        reqs[1..]
            .iter()
            .map(|r| apply_request(&mut txn, r).unwrap()),
    );
    one.tree.apply_batch(txn.into_batch()).unwrap();
    let many = Sm::new();
    let apart: Vec<MetaResponse> = cmds(100)
        .iter()
        .map(|r| {
            let mut txn = Txn::new(&many.tree);
            let resp = apply_request(&mut txn, r).unwrap();
            many.tree.apply_batch(txn.into_batch()).unwrap();
            resp
        })
        .collect();
    assert_eq!(together, apart);
    assert!(
        together[3].results[0].is_ok(),
        "the renewed session is still alive"
    );
    let dump = |sm: &Sm| -> Vec<(Vec<u8>, Vec<u8>)> {
        sm.tree
            .iter()
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
            .collect()
    };
    assert_eq!(dump(&one), dump(&many));
}

#[test]
fn node_reports_and_labels() {
    let mut sm = Sm::new();
    sm.run(MetaCommand::ReportNode {
        node: 2,
        disk_total: 100,
        disk_free: 40,
        hostname: "sw2".into(),
        issuer: [3; 32],
    })
    .unwrap();
    let label = |key: &str, value: Option<&str>| MetaCommand::SetNodeLabel {
        node: 2,
        key: key.into(),
        value: value.map(Into::into),
    };
    sm.run(label("storage", Some("ssd"))).unwrap();
    sm.run(label("zone", Some("a"))).unwrap();
    sm.run(label("zone", None)).unwrap();
    assert_eq!(
        sm.run(label("bad key", Some("x"))),
        Err(FsError::Invalid),
        "a key with a space is refused"
    );
    assert_eq!(
        sm.run(label("k", Some("a==b"))),
        Err(FsError::Invalid),
        "a value with '=' is refused"
    );
    let nodes = sm.view().nodes().unwrap();
    let info = &nodes[&2];
    assert_eq!((info.disk_total, info.disk_free), (100, 40));
    assert_eq!(info.hostname, "sw2");
    assert!(info.reported_at > 0);
    assert_eq!(
        info.labels.iter().collect::<Vec<_>>(),
        [(&"storage".to_string(), &"ssd".to_string())]
    );
    // A later report keeps the labels.
    sm.run(MetaCommand::ReportNode {
        node: 2,
        disk_total: 100,
        disk_free: 30,
        hostname: "sw2".into(),
        issuer: [3; 32],
    })
    .unwrap();
    assert_eq!(sm.view().nodes().unwrap()[&2].labels.len(), 1);
}

#[test]
fn volumes_are_created_mounted_trashed_restored_and_purged() {
    let mut sm = Sm::new();
    let vol = |cmd: MetaCommand, sm: &mut Sm| match sm.run(cmd) {
        Ok(Reply::Volume(v)) => v,
        other => panic!("{other:?}"),
    };
    let create = |name: &str| MetaCommand::CreateVolume {
        name: name.into(),
        options: VolumeOptions {
            replicas: Some(2),
            ..VolumeOptions::default()
        },
    };
    let inodes_before = sm.view().inode_count().unwrap();
    let v = vol(create("data"), &mut sm);
    let volumes = sm.lookup(ROOT_INO, "volumes").unwrap();
    assert_eq!(sm.lookup(volumes, "data"), Some(v.root));
    assert_eq!(
        vol(create("data"), &mut sm).root,
        v.root,
        "created again: the same volume"
    );
    assert_eq!(sm.run(create("-bad")), Err(FsError::Invalid));
    assert_eq!(sm.run(create("a/b")), Err(FsError::Invalid));
    let sub = sm.mk(v.root, "sub", FileKind::Dir);
    let f = sm.mk(sub, "f", FileKind::File);

    // Mounted on a node: it cannot go to the trash.
    let mount = |mount: bool| MetaCommand::MountVolume {
        name: "data".into(),
        node: 2,
        id: "m1".into(),
        mount,
    };
    assert_eq!(vol(mount(true), &mut sm).mounts.len(), 1);
    assert_eq!(
        vol(mount(true), &mut sm).mounts.len(),
        1,
        "a mount id counts once"
    );
    let trash = || MetaCommand::TrashVolume {
        name: "data".into(),
    };
    assert_eq!(sm.run(trash()), Err(FsError::Busy));
    assert!(vol(mount(false), &mut sm).mounts.is_empty());

    // In the trash under its identity: its files are kept, its name is free at once.
    let trashed = vol(trash(), &mut sm);
    assert!(trashed.trashed.is_some());
    assert_eq!(sm.lookup(volumes, "data"), None);
    let bin = sm.lookup(ROOT_INO, ".trash").unwrap();
    assert_eq!(sm.lookup(bin, &v.root.to_string()), Some(v.root));
    assert_eq!(sm.run(mount(true)), Err(FsError::NotFound));
    let second = vol(create("data"), &mut sm);
    assert_ne!(second.root, v.root, "a new, empty volume");
    assert_eq!(sm.view().inode(second.root).unwrap().unwrap().children, 0);
    let restore = |id: Option<Ino>, rename: Option<&str>| MetaCommand::RestoreVolume {
        name: "data".into(),
        id,
        rename: rename.map(Into::into),
    };
    // The name is held by the new volume: restoring under it is refused; under another works.
    assert_eq!(sm.run(restore(None, None)), Err(FsError::Exists));
    vol(trash(), &mut sm);
    assert_eq!(
        sm.view().trash().unwrap().len(),
        2,
        "two generations of one name"
    );
    let purge = |id: Option<Ino>| MetaCommand::PurgeVolume {
        name: "data".into(),
        id,
        trashed: None,
    };
    assert_eq!(
        sm.run(purge(None)),
        Err(FsError::Ambiguous),
        "which of the two is not said"
    );
    // The newest comes back by default; `id` picks another, `rename` another name.
    let restored = vol(restore(None, None), &mut sm);
    assert_eq!(restored.root, second.root);
    let old = vol(restore(Some(v.root), Some("old-data")), &mut sm);
    assert_eq!((old.root, old.trashed), (v.root, None));
    assert_eq!(sm.lookup(volumes, "old-data"), Some(v.root));
    assert_eq!(sm.lookup(sub, "f"), Some(f));
    assert_eq!(
        sm.view().volume_usage(v.root).unwrap().unwrap().name,
        "old-data"
    );
    assert!(sm.view().trash().unwrap().is_empty());

    // Purge only from the trash, and then everything in it is gone.
    let purge_old = |trashed: Option<Nanos>| MetaCommand::PurgeVolume {
        name: "old-data".into(),
        id: None,
        trashed,
    };
    assert_eq!(sm.run(purge_old(None)), Err(FsError::NotPermitted));
    let when = vol(
        MetaCommand::TrashVolume {
            name: "old-data".into(),
        },
        &mut sm,
    )
    .trashed;
    assert_eq!(
        sm.run(purge_old(when.map(|t| t - 1))),
        Err(FsError::NotPermitted),
        "trashed again since"
    );
    assert_eq!(sm.run(purge_old(None)), Ok(Reply::Done));
    assert_eq!(sm.view().volume("old-data").unwrap(), None);
    assert!(sm.view().trash().unwrap().is_empty());
    assert_eq!(sm.lookup(bin, &v.root.to_string()), None);
    assert!(sm.view().inode(f).unwrap().is_none());
    assert_eq!(
        sm.run(purge(None)),
        Err(FsError::NotPermitted),
        "data is live"
    );
    vol(trash(), &mut sm);
    assert_eq!(sm.run(purge(Some(second.root))), Ok(Reply::Done));
    // What is left: the /volumes and /.trash directories.
    assert_eq!(sm.view().inode_count().unwrap(), inodes_before + 2);
    vol(create("data"), &mut sm);
    assert_eq!(sm.view().volumes().unwrap().len(), 1);
}

#[test]
fn create_of_an_existing_volume_succeeds_when_it_asks_nothing_it_lacks() {
    let mut sm = Sm::new();
    let opts = |replicas: Option<u32>, size: Option<u64>| VolumeOptions {
        replicas,
        size,
        ..VolumeOptions::default()
    };
    let first = root_of(&mut sm, "shared", opts(Some(3), None));
    let f = sm.mk(first, "kept", FileKind::File);
    // The same name with no options, or with the options it has, changes nothing.
    assert_eq!(root_of(&mut sm, "shared", opts(None, None)), first);
    assert_eq!(root_of(&mut sm, "shared", opts(Some(3), None)), first);
    assert_eq!(sm.lookup(first, "kept"), Some(f));
    // Anything it does not have is refused, and named.
    assert_eq!(
        volume_with(&mut sm, "shared", opts(Some(2), None)),
        Err(FsError::Exists)
    );
    assert_eq!(
        volume_with(&mut sm, "shared", opts(Some(3), Some(1 << 30))),
        Err(FsError::Exists)
    );
    let has = opts(Some(3), None);
    assert_eq!(
        has.conflicts(&opts(Some(2), Some(10))),
        vec![
            ("replicas", "3".to_string(), "2".to_string()),
            ("size", "(not set)".to_string(), "10".to_string())
        ]
    );
    assert!(has.conflicts(&VolumeOptions::default()).is_empty());
    assert_eq!(sm.view().volumes().unwrap().len(), 1);
}

#[test]
fn a_repeated_request_applies_once_and_gets_the_first_answer() {
    let mut sm = Sm::new();
    let a = sm.mk(ROOT_INO, "a", FileKind::File);
    let b = sm.mk(ROOT_INO, "b", FileKind::File);
    let apply = |sm: &mut Sm, seq, acked, cmd| sm.run_as(SESSION, seq, acked, cmd);
    let exchange = MetaCommand::Rename {
        parent: ROOT_INO,
        name: "a".into(),
        new_parent: ROOT_INO,
        new_name: "b".into(),
        flags: RenameFlags {
            exchange: true,
            noreplace: false,
        },
    };
    let first = apply(&mut sm, 1, 1, exchange.clone());
    assert!(first.is_ok(), "{first:?}");
    // The retry of a request whose answer was lost: the same answer, not a second exchange.
    assert_eq!(apply(&mut sm, 1, 1, exchange.clone()), first);
    assert_eq!(
        (sm.lookup(ROOT_INO, "a"), sm.lookup(ROOT_INO, "b")),
        (Some(b), Some(a))
    );
    let create = MetaCommand::Create {
        parent: ROOT_INO,
        name: "c".into(),
        kind: FileKind::File,
        perm: 0o644,
        uid: 0,
        gid: 0,
        rdev: 0,
        target: Vec::new(),
    };
    let made = apply(&mut sm, 2, 1, create.clone());
    assert!(matches!(made, Ok(Reply::Inode(_))), "{made:?}");
    assert_eq!(apply(&mut sm, 2, 1, create.clone()), made, "not EEXIST");
    // Once the proposer says it has every answer below 3, they are forgotten, and a late copy
    // of one of those requests is refused instead of applied.
    let unlink = MetaCommand::Unlink {
        parent: ROOT_INO,
        name: "c".into(),
    };
    assert!(apply(&mut sm, 3, 3, unlink.clone()).is_ok());
    assert!(
        sm.view()
            .get_raw(&keys::reply(SESSION, 1))
            .unwrap()
            .is_none(),
        "answers below acked are dropped"
    );
    assert_eq!(apply(&mut sm, 2, 3, create), Err(FsError::Stale));
    assert_eq!(sm.lookup(ROOT_INO, "c"), None);
    assert_eq!(apply(&mut sm, 3, 3, unlink).map(drop), Ok(()), "not ENOENT");
    // A session that ends takes its answers with it.
    sm.run(MetaCommand::OpenSession {
        node: 1,
        session: SESSION + 1,
    })
    .unwrap();
    let left: Vec<_> = sm.tree.scan_prefix([keys::REPLY]).collect();
    assert!(left.is_empty(), "{} answers left", left.len());
    assert!(sm.view().get_raw(&keys::acked(SESSION)).unwrap().is_none());
}

#[test]
fn an_unlinked_file_lives_until_every_session_that_may_hold_it_lets_go() {
    let mut sm = Sm::new();
    // Two more nodes' sessions are alive.
    for (node, session) in [(2, 20), (3, 30)] {
        sm.run(MetaCommand::OpenSession { node, session }).unwrap();
    }
    let f = sm.mk(ROOT_INO, "f", FileKind::File);
    sm.write(f, 0, 10, 1).unwrap();
    let unlinked = sm.run(MetaCommand::Unlink {
        parent: ROOT_INO,
        name: "f".into(),
    });
    assert_eq!(unlinked, Ok(Reply::Removed { removed: Some(f) }));
    let mut holders = sm.view().orphan(f).unwrap().unwrap();
    holders.sort_unstable();
    assert_eq!(holders, vec![SESSION, 20, 30]);
    // This node lets go at once (as an unlink of a file not open here does): still there.
    sm.run(MetaCommand::Purge { ino: f }).unwrap();
    assert_eq!(sm.inode(f).nlink, 0);
    assert_eq!(sm.refs(1), 1);
    // Node 2 lets go; node 3's session ends (it died): the last holder gone, it is deleted.
    sm.run_as(20, 0, 0, MetaCommand::Purge { ino: f }).unwrap();
    assert_eq!(sm.view().orphan(f).unwrap(), Some(vec![30]));
    assert!(sm.view().inode(f).unwrap().is_some());
    sm.now += SESSION_LEASE;
    sm.run(MetaCommand::RenewSession).unwrap();
    sm.run(MetaCommand::ExpireSessions).unwrap();
    assert!(
        sm.view().inode(f).unwrap().is_none(),
        "deleted with the last holder"
    );
    assert_eq!(sm.refs(1), 0);
    assert!(sm.view().orphans().unwrap().is_empty());
}

#[test]
fn an_exabyte_sparse_file_costs_what_it_stores() {
    let mut sm = Sm::new();
    let f = sm.mk(ROOT_INO, "huge", FileKind::File);
    const EIB: u64 = 1 << 60;
    let size = |size| MetaCommand::SetAttr {
        ino: f,
        attr: SetAttr {
            size: Some(size),
            ..SetAttr::default()
        },
    };
    // 2^34 chunk indexes: a walk over every index would not finish in this test's lifetime.
    sm.run(size(EIB)).unwrap();
    sm.write(f, EIB - 4096, 4096, 1).unwrap();
    sm.write(f, 0, 4096, 2).unwrap();
    let slices = sm.view().slices(f, 0, EIB).unwrap();
    assert_eq!(slices.len(), 2);
    assert_eq!(slices[1].off, EIB - 4096);
    let copy = sm.mk(ROOT_INO, "copy", FileKind::File);
    let copied = sm.run(MetaCommand::CopyRange {
        src: f,
        src_off: 0,
        dst: copy,
        dst_off: 0,
        len: EIB,
    });
    assert_eq!(copied, Ok(Reply::Copied(EIB)));
    assert_eq!(sm.refs(1), 2);
    sm.run(MetaCommand::Fallocate {
        ino: f,
        off: 0,
        len: EIB,
        mode: Fallocate::PunchHole,
    })
    .unwrap();
    assert_eq!(sm.refs(2), 1, "the copy keeps its reference");
    sm.write(f, EIB / 2, 4096, 3).unwrap();
    sm.run(size(4096)).unwrap();
    assert_eq!(sm.refs(3), 0, "truncated away");
    sm.run(size(EIB)).unwrap();
    for name in ["huge", "copy"] {
        let r = sm.run(MetaCommand::Unlink {
            parent: ROOT_INO,
            name: name.into(),
        });
        let Ok(Reply::Removed { removed: Some(ino) }) = r else {
            panic!("{r:?}")
        };
        sm.run(MetaCommand::Purge { ino }).unwrap();
    }
    assert_eq!((sm.refs(1), sm.refs(2)), (0, 0));
    assert_eq!(sm.tree.scan_prefix([keys::CHUNK]).count(), 0);
}

#[test]
fn a_tree_ten_thousand_levels_deep_is_cloned_and_purged_with_its_volume() {
    // Run on a small stack, as the Raft apply does: recursion would overflow it.
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(|| {
            let mut sm = Sm::new();
            let root = root_of(&mut sm, "deep", VolumeOptions::default());
            let mut dir = root;
            for _ in 0..10_000 {
                dir = sm.mk(dir, "d", FileKind::Dir);
            }
            let leaf = sm.mk(dir, "f", FileKind::File);
            sm.write(leaf, 0, 10, 1).unwrap();
            let cloned = VolumeOptions {
                from: Some("deep".into()),
                ..VolumeOptions::default()
            };
            let copy = root_of(&mut sm, "copy", cloned);
            assert_eq!(
                sm.view().volume_usage(copy).unwrap().unwrap().inodes,
                10_002
            );
            assert_eq!(sm.refs(1), 2);
            for name in ["deep", "copy"] {
                sm.run(MetaCommand::TrashVolume { name: name.into() })
                    .unwrap();
                sm.run(MetaCommand::PurgeVolume {
                    name: name.into(),
                    id: None,
                    trashed: None,
                })
                .unwrap();
            }
            assert!(sm.view().inode(leaf).unwrap().is_none());
            assert_eq!(sm.refs(1), 0);
            assert_eq!(
                sm.tree.scan_prefix([keys::DENTRY]).count(),
                2,
                "/volumes and /.trash"
            );
        })
        .unwrap()
        .join()
        .unwrap();
}

fn volume_with(sm: &mut Sm, name: &str, options: VolumeOptions) -> CommandResult {
    sm.run(MetaCommand::CreateVolume {
        name: name.into(),
        options,
    })
}

fn root_of(sm: &mut Sm, name: &str, options: VolumeOptions) -> Ino {
    match volume_with(sm, name, options) {
        Ok(Reply::Volume(v)) => v.root,
        other => panic!("create volume {name}: {other:?}"),
    }
}

#[test]
fn a_volume_counts_its_bytes_and_refuses_growth_past_its_quota() {
    let mut sm = Sm::new();
    let quota = VolumeOptions {
        size: Some(1000),
        ..VolumeOptions::default()
    };
    let root = root_of(&mut sm, "small", quota);
    let other = root_of(&mut sm, "big", VolumeOptions::default());
    let usage = |sm: &Sm, root| sm.view().volume_usage(root).unwrap().unwrap();
    assert_eq!((usage(&sm, root).bytes, usage(&sm, root).inodes), (0, 1));

    let dir = sm.mk(root, "d", FileKind::Dir);
    let f = sm.mk(dir, "f", FileKind::File);
    assert_eq!(sm.inode(f).volume, root, "inherited through a subdirectory");
    sm.write(f, 0, 600, 1).unwrap();
    assert_eq!((usage(&sm, root).bytes, usage(&sm, root).inodes), (600, 3));
    // Overwriting in place does not grow; growing past 1000 bytes is refused, unchanged.
    sm.write(f, 0, 600, 2).unwrap();
    assert_eq!(sm.write(f, 600, 401, 3), Err(FsError::QuotaExceeded));
    assert_eq!(sm.inode(f).size, 600);
    sm.write(f, 600, 400, 3).unwrap();
    assert_eq!(usage(&sm, root).bytes, 1000);
    let grow = |size| MetaCommand::SetAttr {
        ino: f,
        attr: SetAttr {
            size: Some(size),
            ..SetAttr::default()
        },
    };
    assert_eq!(sm.run(grow(1001)), Err(FsError::QuotaExceeded));
    let fall = MetaCommand::Fallocate {
        ino: f,
        off: 0,
        len: 2000,
        mode: Fallocate::Allocate { keep_size: false },
    };
    assert_eq!(sm.run(fall), Err(FsError::QuotaExceeded));
    // Shrinking gives space back; so does deleting.
    sm.run(grow(100)).unwrap();
    assert_eq!(usage(&sm, root).bytes, 100);
    let g = sm.mk(root, "g", FileKind::File);
    sm.write(g, 0, 900, 4).unwrap();
    match sm.run(MetaCommand::Unlink {
        parent: root,
        name: b"g".to_vec(),
    }) {
        Ok(Reply::Removed { removed: Some(ino) }) => {
            // Until purged (it may still be open), it still counts.
            assert_eq!(usage(&sm, root).bytes, 1000);
            sm.run(MetaCommand::Purge { ino }).unwrap();
        }
        other => panic!("{other:?}"),
    }
    assert_eq!((usage(&sm, root).bytes, usage(&sm, root).inodes), (100, 3));

    // Another volume is not affected by this one's quota.
    let h = sm.mk(other, "h", FileKind::File);
    sm.write(h, 0, 5000, 5).unwrap();
    assert_eq!(usage(&sm, other).bytes, 5000);
    assert_eq!(usage(&sm, root).bytes, 100);
}

#[test]
fn names_do_not_cross_a_volume_boundary() {
    let mut sm = Sm::new();
    let a = root_of(&mut sm, "a", VolumeOptions::default());
    let b = root_of(&mut sm, "b", VolumeOptions::default());
    let f = sm.mk(a, "f", FileKind::File);
    sm.mk(a, "d", FileKind::Dir);
    sm.mk(ROOT_INO, "outside", FileKind::File);
    let plain = RenameFlags::default();
    assert_eq!(sm.rename(a, "f", b, "f", plain), Err(FsError::CrossDevice));
    assert_eq!(sm.rename(a, "d", b, "d", plain), Err(FsError::CrossDevice));
    assert_eq!(
        sm.rename(ROOT_INO, "outside", a, "x", plain),
        Err(FsError::CrossDevice)
    );
    let link = |ino, parent| MetaCommand::Link {
        ino,
        new_parent: parent,
        new_name: b"l".to_vec(),
    };
    assert_eq!(sm.run(link(f, b)), Err(FsError::CrossDevice));
    assert_eq!(sm.run(link(f, ROOT_INO)), Err(FsError::CrossDevice));
    // Inside one volume all is as usual.
    sm.run(link(f, a)).unwrap();
    sm.rename(a, "f", a, "g", plain).unwrap();
    let exchange = RenameFlags {
        exchange: true,
        ..plain
    };
    sm.mk(b, "y", FileKind::File);
    assert_eq!(
        sm.rename(a, "g", b, "y", exchange),
        Err(FsError::CrossDevice)
    );
}

#[test]
fn a_clone_shares_blocks_and_keeps_links_and_a_failed_clone_leaves_nothing() {
    let mut sm = Sm::new();
    let src = root_of(&mut sm, "src", VolumeOptions::default());
    let d = sm.mk(src, "d", FileKind::Dir);
    let f = sm.mk(d, "f", FileKind::File);
    sm.write(f, 0, 700, 9).unwrap();
    sm.run(MetaCommand::Link {
        ino: f,
        new_parent: src,
        new_name: b"hard".to_vec(),
    })
    .unwrap();
    sm.run(MetaCommand::Create {
        parent: src,
        name: b"sym".to_vec(),
        kind: FileKind::Symlink,
        perm: 0o777,
        uid: 0,
        gid: 0,
        rdev: 0,
        target: b"d/f".to_vec(),
    })
    .unwrap();
    assert_eq!(sm.refs(9), 1);
    let inodes = sm.view().inode_count().unwrap();

    // Too small a quota for what it would start with: refused, and no trace of it.
    let tight = VolumeOptions {
        size: Some(100),
        from: Some("src".into()),
        ..VolumeOptions::default()
    };
    assert_eq!(
        volume_with(&mut sm, "tight", tight),
        Err(FsError::QuotaExceeded)
    );
    assert_eq!(sm.view().volume("tight").unwrap(), None);
    let volumes = sm.lookup(ROOT_INO, "volumes").unwrap();
    assert_eq!(sm.lookup(volumes, "tight"), None);
    assert_eq!(sm.view().inode_count().unwrap(), inodes);
    assert_eq!(sm.refs(9), 1);

    let from = |name: &str| VolumeOptions {
        from: Some(name.into()),
        ..VolumeOptions::default()
    };
    assert_eq!(
        volume_with(&mut sm, "c", from("nope")),
        Err(FsError::NotFound)
    );
    let copy = root_of(&mut sm, "copy", from("src"));
    let cd = sm.lookup(copy, "d").unwrap();
    let cf = sm.lookup(cd, "f").unwrap();
    assert_ne!(cf, f);
    assert_eq!(
        sm.lookup(copy, "hard"),
        Some(cf),
        "a hard link stays one inode"
    );
    assert_eq!(sm.inode(cf).nlink, 2);
    assert_eq!(sm.inode(cf).size, 700);
    assert_eq!(sm.inode(cf).volume, copy);
    let sym = sm.lookup(copy, "sym").unwrap();
    assert_eq!(sm.inode(sym).target, b"d/f");
    assert_eq!(sm.refs(9), 2, "the copy names the same block");
    let usage = sm.view().volume_usage(copy).unwrap().unwrap();
    assert_eq!((usage.bytes, usage.inodes), (703, 4));
    assert_eq!(sm.inode(copy).children, 3);
    assert_eq!(sm.inode(cd).children, 1);

    // Writing to the copy leaves the source as it was.
    sm.write(cf, 0, 10, 8).unwrap();
    assert_eq!(
        sm.view().slices(f, 0, 10).unwrap()[0].block,
        BlockId([9; 32])
    );
}

#[test]
fn mounts_of_a_node_are_cleared_and_the_trash_retention_is_a_setting() {
    let mut sm = Sm::new();
    root_of(&mut sm, "v", VolumeOptions::default());
    for (node, id) in [(2, "a"), (2, "b"), (3, "c")] {
        sm.run(MetaCommand::MountVolume {
            name: "v".into(),
            node,
            id: id.into(),
            mount: true,
        })
        .unwrap();
    }
    sm.run(MetaCommand::ClearMounts { node: 2 }).unwrap();
    let ids: Vec<String> = sm
        .view()
        .volume("v")
        .unwrap()
        .unwrap()
        .mounts
        .into_iter()
        .map(|(_, id, _)| id)
        .collect();
    assert_eq!(ids, ["c"]);

    assert_eq!(
        sm.view().settings().unwrap().trash_retention,
        24 * 3600 * 1_000_000_000
    );
    sm.run(MetaCommand::SetTrashRetention { nanos: 60 })
        .unwrap();
    assert_eq!(sm.view().settings().unwrap().trash_retention, 60);
    assert_eq!(
        sm.run(MetaCommand::SetTrashRetention { nanos: -1 }),
        Err(FsError::Invalid)
    );
}

fn write_inline(sm: &mut Sm, ino: Ino, off: u64, data: &[u8]) -> (BlockId, CommandResult) {
    let id = BlockId::of(data);
    let len = data.len() as u32;
    let r = sm.run(MetaCommand::WriteInline {
        ino,
        slices: vec![Slice {
            off,
            len,
            block: id,
            block_off: 0,
            block_len: len,
        }],
        size: off + u64::from(len),
        volume: ROOT_INO,
        blocks: vec![data.to_vec()],
    });
    (id, r)
}

#[test]
fn inline_blocks_are_kept_once_until_spilled_or_freed() {
    let mut sm = Sm::new();
    let f = sm.mk(ROOT_INO, "f", FileKind::File);
    let g = sm.mk(ROOT_INO, "g", FileKind::File);
    let (a, r) = write_inline(&mut sm, f, 0, b"hello");
    assert!(r.is_ok(), "{r:?}");
    let held = sm.view().inline_block(&a).unwrap().expect("held inline");
    assert_eq!(held.data, b"hello");
    assert_eq!(sm.view().inline_bytes().unwrap(), 5);
    assert_eq!(sm.inode(f).size, 5);
    // The same bytes in another file: one copy, two references.
    let (a2, _) = write_inline(&mut sm, g, 0, b"hello");
    assert_eq!(a, a2);
    assert_eq!(sm.view().block_refs(&a).unwrap(), 2);
    assert_eq!(sm.view().inline_bytes().unwrap(), 5);
    assert_eq!(
        sm.view().inline_block(&a).unwrap().unwrap().since,
        held.since
    );

    // A spill of an older copy lets nothing go; the right one lets go of the bytes only.
    sm.run(MetaCommand::Spill {
        blocks: vec![(a, held.since - 1)],
    })
    .unwrap();
    assert!(sm.view().is_inline(&a).unwrap());
    sm.run(MetaCommand::Spill {
        blocks: vec![(a, held.since)],
    })
    .unwrap();
    assert!(!sm.view().is_inline(&a).unwrap());
    assert_eq!(sm.view().inline_bytes().unwrap(), 0);
    assert_eq!(
        sm.view().block_refs(&a).unwrap(),
        2,
        "the layout still names it"
    );

    // Written out already: the same bytes again are not held inline a second time.
    let h = sm.mk(ROOT_INO, "h", FileKind::File);
    write_inline(&mut sm, h, 0, b"hello").1.unwrap();
    assert!(!sm.view().is_inline(&a).unwrap());

    // Freed while inline: the bytes go with the last reference, and it is garbage.
    let (b, _) = write_inline(&mut sm, f, 100, b"world");
    assert_eq!(sm.view().inline_bytes().unwrap(), 5);
    let since = sm.view().inline_block(&b).unwrap().unwrap().since;
    sm.run(MetaCommand::SetAttr {
        ino: f,
        attr: SetAttr {
            size: Some(0),
            ..Default::default()
        },
    })
    .unwrap();
    assert!(!sm.view().is_inline(&b).unwrap());
    assert_eq!(sm.view().inline_bytes().unwrap(), 0);
    assert!(
        sm.view()
            .garbage(10)
            .unwrap()
            .iter()
            .any(|(id, _)| *id == b)
    );
    // Written again before a late spill of the freed copy: the new copy stays.
    write_inline(&mut sm, f, 0, b"world").1.unwrap();
    sm.run(MetaCommand::Spill {
        blocks: vec![(b, since)],
    })
    .unwrap();
    assert!(sm.view().is_inline(&b).unwrap());
    assert_eq!(sm.view().inline_bytes().unwrap(), 5);
}

#[test]
fn an_inline_write_must_carry_the_blocks_its_slices_name() {
    let mut sm = Sm::new();
    let f = sm.mk(ROOT_INO, "f", FileKind::File);
    let data = b"abcdef".to_vec();
    let bad = |slice: Slice| MetaCommand::WriteInline {
        ino: f,
        slices: vec![slice],
        size: 6,
        volume: ROOT_INO,
        blocks: vec![data.clone()],
    };
    let good = Slice {
        off: 0,
        len: 6,
        block: BlockId::of(&data),
        block_off: 0,
        block_len: 6,
    };
    for slice in [
        Slice {
            block: BlockId([9; 32]),
            ..good
        },
        Slice {
            block_off: 1,
            ..good
        },
        Slice {
            block_len: 7,
            ..good
        },
    ] {
        assert_eq!(sm.run(bad(slice)), Err(FsError::Invalid));
    }
    assert_eq!(sm.inode(f).size, 0);
    assert_eq!(sm.view().inline_bytes().unwrap(), 0);
    assert!(sm.run(bad(good)).is_ok());
    // Overwritten within one entry: the first block is not kept.
    let other = b"zzzzzz".to_vec();
    let r = sm.run(MetaCommand::WriteInline {
        ino: f,
        slices: vec![
            Slice {
                block: BlockId::of(&other),
                ..good
            },
            good,
        ],
        size: 6,
        volume: ROOT_INO,
        blocks: vec![other.clone(), data.clone()],
    });
    assert!(r.is_ok());
    assert!(!sm.view().is_inline(&BlockId::of(&other)).unwrap());
    assert_eq!(sm.view().inline_bytes().unwrap(), 6);
}
