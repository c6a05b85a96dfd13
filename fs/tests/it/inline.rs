//! Small commits ride in the Raft log and are written out as block files later
//! (`node::spill`): what an fsync acknowledged survives the leader's death before that, from
//! every writer of a three-node cluster at once, and is then written out with its copies.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cluster::{block_files, status};
use crate::local_cluster::{LocalCluster, eventually, eventually_within, read};

fn small(node: u32, i: u32) -> Vec<u8> {
    (0..8192u32)
        .map(|b| (b.wrapping_mul(31) ^ (i * 7 + node * 101)) as u8)
        .collect()
}

fn write_fsync(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// What the shared file holds once every writer is done: node k wrote 1 KiB pieces at
/// `(i * 3 + k - 1) KiB`.
fn shared_expected(files: u32) -> Vec<u8> {
    let mut out = vec![0u8; (files * 3 * 1024) as usize];
    for k in 1..=3 {
        for i in 0..files {
            let at = ((i * 3 + k - 1) * 1024) as usize;
            out[at..at + 1024].copy_from_slice(&small(k, 100 + i)[..1024]);
        }
    }
    out
}

fn inline_bytes(c: &LocalCluster, k: u32) -> Option<u64> {
    status(c, k).and_then(|s| s["inline_bytes"].as_u64())
}

#[test]
fn small_fsyncs_from_three_nodes_survive_the_leader_dying_before_they_are_written_out() {
    let pause = tempfile::NamedTempFile::new().unwrap();
    let pause_path = pause.path().to_str().unwrap().to_string();
    let c = LocalCluster::up_with_env(3, &[("SHOAL_FAULT_SPILL_PAUSED", &pause_path)]);
    eventually("a leader", || c.leader(1).is_some());
    const FILES: u32 = 20;
    File::create(c.mnt(1).join("shared"))
        .unwrap()
        .sync_all()
        .unwrap();
    eventually("every node sees the shared file", || {
        (1..=3).all(|k| c.mnt(k).join("shared").exists())
    });
    // All three nodes at once: small files, each fsynced, and pieces of one shared file, each
    // fsynced, while they read what the others finished.
    let writers: Vec<_> = (1..=3u32)
        .map(|k| {
            let mnts: Vec<PathBuf> = (1..=3).map(|n| c.mnt(n)).collect();
            std::thread::spawn(move || {
                let mnt = &mnts[k as usize - 1];
                let shared = OpenOptions::new()
                    .write(true)
                    .open(mnt.join("shared"))
                    .unwrap();
                for i in 0..FILES {
                    write_fsync(&mnt.join(format!("n{k}-{i}")), &small(k, i));
                    let piece = &small(k, 100 + i)[..1024];
                    shared
                        .write_all_at(piece, u64::from((i * 3 + k - 1) * 1024))
                        .unwrap();
                    shared.sync_all().unwrap();
                    // Another node reads a file this one fsynced earlier.
                    if i > 0 {
                        let other = &mnts[(k as usize) % 3];
                        let name = other.join(format!("n{k}-{}", i - 1));
                        if let Some(got) = read(&name) {
                            assert!(
                                got.is_empty() || got == small(k, i - 1),
                                "node {} read a torn n{k}-{}",
                                k % 3 + 1,
                                i - 1
                            );
                        }
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("a writer failed");
    }
    let check = |nodes: &[u32]| {
        for &n in nodes {
            for k in 1..=3 {
                for i in 0..FILES {
                    let name = c.mnt(n).join(format!("n{k}-{i}"));
                    assert_eq!(
                        read(&name),
                        Some(small(k, i)),
                        "{} on node {n}",
                        name.display()
                    );
                }
            }
            assert_eq!(
                read(&c.mnt(n).join("shared")),
                Some(shared_expected(FILES)),
                "the shared file on node {n}"
            );
        }
    };
    check(&[1, 2, 3]);
    // Held in the Raft state, not in block files, on every node.
    for k in 1..=3 {
        assert!(
            block_files(&c.data(k)).is_empty(),
            "node {k} wrote block files"
        );
        assert!(inline_bytes(&c, k).unwrap_or(0) >= u64::from(3 * FILES * 8192));
    }

    // The leader dies before writing anything out: the others have every byte.
    let leader = c.leader(1).expect("a leader") as u32;
    c.kill9(leader);
    let live: Vec<u32> = (1..=3).filter(|k| *k != leader).collect();
    eventually("a new leader among the others", || {
        c.leader(live[0]).is_some_and(|l| l != u64::from(leader))
    });
    check(&live);

    // Written out once allowed: block files on both live nodes (three copies asked, two live),
    // the Raft state lets go of the bytes, and the files read the same.
    drop(pause);
    eventually_within(
        "the inline bytes are written out",
        Duration::from_secs(30),
        || inline_bytes(&c, live[0]) == Some(0),
    );
    let on = |k: u32| block_files(&c.data(k));
    assert!(!on(live[0]).is_empty() && on(live[0]) == on(live[1]));
    check(&live);
    // The dead node comes back and reads the same, from its log and the block files.
    c.local_up(3);
    eventually("the old leader catches up", || {
        read(&c.mnt(leader).join("shared")) == Some(shared_expected(FILES))
    });
    check(&[leader]);
    // It was down while they were written out: repair brings it its copies.
    eventually_within(
        "fsck finds every copy in place",
        Duration::from_secs(60),
        || c.shoal_at(live[0], &["fsck"]).status.success(),
    );
}

/// 16 KiB, different for every (node, file).
fn sixteen(node: u32, i: u32) -> Vec<u8> {
    let mut v = small(node, i);
    v.extend(small(node + 10, i));
    v
}

/// Small commits make the log grow by bytes long before it grows by `--snapshot-every`
/// entries: every node snapshots and purges its log by bytes (`node::compact`), while three
/// nodes write at once and a follower is killed in the middle and comes back.
#[test]
fn a_log_of_small_commits_is_compacted_by_bytes_on_every_node_while_a_follower_dies() {
    let c = LocalCluster::up(3);
    eventually("a leader", || c.leader(1).is_some());
    let leader = c.leader(1).unwrap() as u32;
    let victim = (1..=3u32).find(|k| *k != leader).unwrap();
    // 3 x 700 files of 16 KiB: 33 MiB of log, twice the 16 MiB after which a node snapshots,
    // in 2,100 files: a tenth of the 20,000 entries of the count rule.
    const FILES: u32 = 700;
    let writers: Vec<_> = (1..=3u32)
        .map(|k| {
            let dir = c.mnt(k).join(format!("w{k}"));
            std::fs::create_dir(&dir).unwrap();
            std::thread::spawn(move || {
                let mut done = 0;
                for i in 0..FILES {
                    let p = dir.join(format!("f{i}"));
                    let wrote = File::create(&p)
                        .and_then(|mut f| f.write_all(&sixteen(k, i)).and_then(|_| f.sync_all()));
                    // The victim's own writes fail once it is killed.
                    if wrote.is_err() {
                        break;
                    }
                    done += 1;
                }
                done
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    c.kill9(victim);
    let done: Vec<u32> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    for k in (1..=3u32).filter(|k| *k != victim) {
        assert_eq!(done[k as usize - 1], FILES, "node {k}'s writer finished");
    }
    c.local_up(3);
    for k in 1..=3u32 {
        eventually_within(
            "every node has purged its log by bytes",
            Duration::from_secs(60),
            || status(&c, k).is_some_and(|s| s["purged"].as_u64().is_some_and(|p| p > 0)),
        );
        let log = std::fs::read_to_string(c.node(k).join("daemon.log")).unwrap_or_default();
        assert!(
            k == victim || log.contains("grew past its byte limit"),
            "node {k} snapshotted by bytes"
        );
    }
    // Every acknowledged file reads back on every node, the victim included.
    for k in 1..=3u32 {
        for (w, n) in done.iter().enumerate() {
            let w = w as u32 + 1;
            for i in 0..*n {
                let p = c.mnt(k).join(format!("w{w}/f{i}"));
                eventually_within("the file reads back", Duration::from_secs(30), || {
                    read(&p).is_some_and(|b| b == sixteen(w, i))
                });
            }
        }
    }
}
