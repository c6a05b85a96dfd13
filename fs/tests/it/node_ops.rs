//! POSIX operations on an in-process node, below FUSE.

use shoal_fs::node::OpError;
use std::time::Duration;

use shoal_fs::node::{gc, spill};
use shoal_fs::ops::{NewEntry, SEEK_DATA, SEEK_HOLE, WriteAck};
use shoal_raft::{FsError, Kv, ROOT_INO, RenameFlags, SetAttr};

use crate::testkit::{BLOCK, DataDir, stop};

fn file() -> NewEntry {
    NewEntry::file(0o644)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn write(node: &shoal_fs::Node, ino: u64, off: u64, data: &[u8]) {
    match node.write(ino, off, data).unwrap() {
        WriteAck::Buffered | WriteAck::Commit(_) | WriteAck::CommitFirst(_) => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_readable_before_and_after_commit_and_survive_restart() {
    let dd = DataDir::new().await;
    let node = dd.start().await;
    let f = node.create(ROOT_INO, b"f", file()).await.unwrap();
    node.open(f.ino).await.unwrap();
    // 2.5 blocks, written in uneven pieces, plus an overwrite in the middle and a sparse tail.
    let data = pattern(BLOCK as usize * 5 / 2, 1);
    for piece in data.chunks(100_000).enumerate() {
        write(&node, f.ino, (piece.0 * 100_000) as u64, piece.1);
    }
    write(&node, f.ino, 1000, b"OVERWRITE");
    write(&node, f.ino, 10 << 20, b"tail");
    let mut expected = data.clone();
    expected[1000..1009].copy_from_slice(b"OVERWRITE");
    expected.resize(10 << 20, 0);
    expected.extend_from_slice(b"tail");

    // Buffered: visible here with the right size.
    assert_eq!(node.getattr(f.ino).unwrap().size, expected.len() as u64);
    assert_eq!(node.read(f.ino, 0, expected.len()).await.unwrap(), expected);

    node.commit(f.ino).await.unwrap();
    assert_eq!(
        node.view.inode(f.ino).unwrap().unwrap().size,
        expected.len() as u64
    );
    assert_eq!(node.read(f.ino, 0, expected.len()).await.unwrap(), expected);
    // Reads past the end are short; reads in the hole are zeros.
    assert_eq!(
        node.read(f.ino, expected.len() as u64 - 2, 100)
            .await
            .unwrap(),
        b"il"
    );
    assert_eq!(node.read(f.ino, 5 << 20, 10).await.unwrap(), vec![0; 10]);
    assert_eq!(node.lseek(f.ino, 4 << 20, SEEK_DATA).unwrap(), 10 << 20);
    assert_eq!(node.lseek(f.ino, 0, SEEK_HOLE).unwrap(), data.len() as u64);
    node.release(f.ino, None).await.unwrap();

    stop(node).await;
    let node = dd.start().await;
    let f2 = node.lookup(ROOT_INO, b"f").unwrap();
    assert_eq!(f2.ino, f.ino);
    assert_eq!(node.read(f.ino, 0, expected.len()).await.unwrap(), expected);
    stop(node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_applies_after_buffered_writes_and_extends_with_zeros() {
    let dd = DataDir::new().await;
    let node = dd.start().await;
    let f = node.create(ROOT_INO, b"f", file()).await.unwrap();
    node.open(f.ino).await.unwrap();
    write(&node, f.ino, 0, &pattern(5000, 3));
    let size = |s| SetAttr {
        size: Some(s),
        ..Default::default()
    };
    node.setattr(f.ino, size(100)).await.unwrap();
    node.setattr(f.ino, size(200)).await.unwrap();
    let got = node.read(f.ino, 0, 1000).await.unwrap();
    assert_eq!(got.len(), 200);
    assert_eq!(&got[..100], &pattern(5000, 3)[..100]);
    assert!(
        got[100..].iter().all(|b| *b == 0),
        "bytes past a truncate read as zeros"
    );
    node.release(f.ino, None).await.unwrap();
    stop(node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlinked_open_file_lives_until_its_last_close() {
    let dd = DataDir::new().await;
    let node = dd.start().await;
    let f = node.create(ROOT_INO, b"f", file()).await.unwrap();
    node.open(f.ino).await.unwrap();
    write(&node, f.ino, 0, b"still here");
    node.commit(f.ino).await.unwrap();
    node.unlink(ROOT_INO, b"f").await.unwrap();
    assert!(matches!(
        node.lookup(ROOT_INO, b"f"),
        Err(OpError::Fs(FsError::NotFound))
    ));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(node.read(f.ino, 0, 100).await.unwrap(), b"still here");
    node.release(f.ino, None).await.unwrap();
    for _ in 0..100 {
        if node.view.inode(f.ino).unwrap().is_none() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        node.view.inode(f.ino).unwrap().is_none(),
        "purged after the last close"
    );
    stop(node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_deletes_only_unreferenced_blocks() {
    let dd = DataDir::new().await;
    let node = dd.start().await;
    let a = node.create(ROOT_INO, b"a", file()).await.unwrap();
    let b = node.create(ROOT_INO, b"b", file()).await.unwrap();
    for (f, seed) in [(&a, 1), (&b, 2)] {
        node.open(f.ino).await.unwrap();
        write(&node, f.ino, 0, &pattern(3000, seed));
        node.release(f.ino, None).await.unwrap();
    }
    let block_of = |ino| node.view.slices(ino, 0, 3000).unwrap()[0].block;
    let (ba, bb) = (block_of(a.ino), block_of(b.ino));
    // Small commits: held in the Raft state until written out.
    assert!(!node.blocks.contains(&ba) && !node.blocks.contains(&bb));
    assert!(node.view.is_inline(&ba).unwrap() && node.view.is_inline(&bb).unwrap());
    assert!(spill::spill(&node, Duration::ZERO).await.unwrap() >= 2);
    assert!(node.blocks.contains(&ba) && node.blocks.contains(&bb));
    assert!(!node.view.is_inline(&ba).unwrap() && !node.view.is_inline(&bb).unwrap());
    assert_eq!(node.view.inline_bytes().unwrap(), 0);
    // Overwrite a: its old block becomes garbage; b's block stays referenced.
    node.open(a.ino).await.unwrap();
    write(&node, a.ino, 0, &pattern(3000, 9));
    node.release(a.ino, None).await.unwrap();
    let deleted = gc::collect(&node, Duration::ZERO).await.unwrap();
    assert_eq!(deleted, 1);
    assert!(!node.blocks.contains(&ba), "garbage block deleted");
    assert!(node.blocks.contains(&bb), "referenced block kept");
    assert!(
        node.view.is_inline(&block_of(a.ino)).unwrap(),
        "new block held"
    );
    assert!(node.view.garbage(10).unwrap().is_empty());
    assert_eq!(node.read(b.ino, 0, 3000).await.unwrap(), pattern(3000, 2));
    stop(node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_block_is_an_error_never_wrong_bytes() {
    let dd = DataDir::new().await;
    let node = dd.start().await;
    let f = node.create(ROOT_INO, b"f", file()).await.unwrap();
    node.open(f.ino).await.unwrap();
    write(&node, f.ino, 0, &pattern(10_000, 5));
    node.release(f.ino, None).await.unwrap();
    spill::spill(&node, Duration::ZERO).await.unwrap();
    let id = node.view.slices(f.ino, 0, 10).unwrap()[0].block;
    let path = node.blocks.path_of(&id);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[42] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    // Restart so the block is not in the memory cache.
    stop(node).await;
    let node = dd.start().await;
    let err = node.read(f.ino, 0, 100).await.unwrap_err();
    assert_eq!(shoal_fs::fuse::errno::of(&err), libc::EIO, "{err}");
    stop(node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_copy_range_and_locks_through_the_node() {
    let dd = DataDir::new().await;
    let node = dd.start().await;
    let a = node.create(ROOT_INO, b"a", file()).await.unwrap();
    node.open(a.ino).await.unwrap();
    write(&node, a.ino, 0, b"0123456789");
    let b = node.create(ROOT_INO, b"b", file()).await.unwrap();
    node.open(b.ino).await.unwrap();
    // copy_file_range sees buffered data (it commits first) and shares blocks.
    assert_eq!(node.copy_range(a.ino, 2, b.ino, 0, 100).await.unwrap(), 8);
    assert_eq!(node.read(b.ino, 0, 100).await.unwrap(), b"23456789");
    node.rename(ROOT_INO, b"b", ROOT_INO, b"a", RenameFlags::default())
        .await
        .unwrap();
    assert_eq!(node.lookup(ROOT_INO, b"a").unwrap().ino, b.ino);
    // POSIX locks: a conflicting owner gets EAGAIN; close of the holder releases.
    let owner1 = node.lock_owner(1);
    let owner2 = node.lock_owner(2);
    let (l1, _) = shoal_fs::ops::range_lock(owner1, 1, libc::F_WRLCK, 0, 99).unwrap();
    let (l2, _) = shoal_fs::ops::range_lock(owner2, 2, libc::F_WRLCK, 50, 60).unwrap();
    node.setlk(b.ino, l1, false, false).await.unwrap();
    let err = node.setlk(b.ino, l2, false, false).await.unwrap_err();
    assert_eq!(shoal_fs::fuse::errno::of(&err), libc::EAGAIN);
    assert_eq!(node.getlk(b.ino, &l2).unwrap().map(|l| l.pid), Some(1));
    let waiter = {
        let node = node.clone();
        tokio::spawn(async move { node.setlk(b.ino, l2, false, true).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(
        !waiter.is_finished(),
        "a blocking lock waits for the holder"
    );
    node.flush(b.ino, 1).await.unwrap();
    waiter.await.unwrap().unwrap();
    node.release(a.ino, None).await.unwrap();
    node.release(b.ino, None).await.unwrap();
    stop(node).await;
}

/// Many proposals of one node in flight at once: each is numbered and applied once, and none
/// is mistaken for a late copy of an answered one (a number taken before it was registered
/// as in flight used to be claimed answered by a later proposal, and the state machine then
/// refused it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_proposals_of_one_node_all_apply_once() {
    let dd = DataDir::new().await;
    let node = dd.start().await;
    let mut tasks = Vec::new();
    for i in 0..400u32 {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            node.create(ROOT_INO, format!("f{i}").as_bytes(), file())
                .await
                .map(|_| ())
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert!(r.is_ok(), "create f{i}: {r:?}");
    }
    assert_eq!(node.view.readdir(ROOT_INO).unwrap().len(), 400);
    stop(node).await;
}
