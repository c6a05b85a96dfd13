//! Several hosts acting on one volume at the same moment: the same Create from every node,
//! an unlink on one node while another reads, an atomic replace under a reader, a holder that
//! dies, proposals whose answers are lost and retried, and a sparse exabyte file.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::{Duration, Instant};

use crate::cluster::{
    LocalCluster, Lock, eventually, eventually_within, plugin, plugin_err, read, status,
};

fn inodes(c: &LocalCluster, k: u32) -> u64 {
    status(c, k).and_then(|s| s["inodes"].as_u64()).unwrap_or(0)
}

fn referenced_blocks(c: &LocalCluster, k: u32) -> u64 {
    let out = c.shoal_at(k, &["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    s["referenced_blocks"].as_u64().unwrap_or(0)
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Thirty Creates of one volume at once, spread over the three nodes' plugin sockets, as when
/// the tasks of one service start on every host together: every one succeeds, one volume
/// exists, with the options of the first; a Create asking other options is refused, naming
/// each difference.
#[test]
fn the_same_create_from_every_host_at_once_makes_one_volume() {
    use serde_json::json;
    let c = LocalCluster::up(3);
    let answers: Vec<serde_json::Value> = std::thread::scope(|s| {
        let c = &c;
        let calls: Vec<_> = (0..30u32)
            .map(|i| {
                s.spawn(move || {
                    let body = json!({"Name": "shared", "Opts": {"replicas": "3"}});
                    plugin(c, 1 + i % 3, "VolumeDriver.Create", body)
                })
            })
            .collect();
        calls.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for a in &answers {
        assert_eq!(plugin_err(a), "", "{a}");
    }
    let ls = c.shoal_at(2, &["volume", "ls", "--json"]);
    let ls: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");
    assert_eq!(ls[0]["replicas"], 3, "{ls}");
    // Docker's Create with no options (a host that only mounts it) succeeds too.
    let r = plugin(&c, 3, "VolumeDriver.Create", json!({"Name": "shared"}));
    assert_eq!(plugin_err(&r), "", "{r}");
    let r = plugin(
        &c,
        2,
        "VolumeDriver.Create",
        json!({"Name": "shared", "Opts": {"replicas": "2", "size": "1GiB"}}),
    );
    let e = plugin_err(&r);
    assert!(
        e.contains("volume shared exists with replicas=3, size=(not set); this Create asks replicas=2, size=1.0 GiB"),
        "{r}"
    );
}

/// POSIX keeps an unlinked file alive while a descriptor holds it, and shoal is one
/// filesystem across hosts: a file open on node 2 survives `rm` and an atomic replace on
/// node 1, its reader gets every byte, and it is deleted once the last holder lets go, or
/// when the holder's node dies and its lease runs out.
#[test]
fn a_file_open_on_one_node_outlives_its_unlink_on_another() {
    let c = LocalCluster::up(3);
    let body = noise(1, 3 << 20);
    fs::write(c.mnt(1).join("f"), &body).unwrap();
    let before = inodes(&c, 1);

    // rm on node 1 while node 2 reads and writes through its descriptor.
    let mut held = OpenOptions::new()
        .read(true)
        .write(true)
        .open(c.mnt(2).join("f"))
        .unwrap();
    let mut first = vec![0u8; 1 << 20];
    held.read_exact(&mut first).unwrap();
    fs::remove_file(c.mnt(1).join("f")).unwrap();
    eventually("node 3 sees the unlink", || {
        fs::metadata(c.mnt(3).join("f")).is_err()
    });
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    first.extend(rest);
    assert!(
        first == body,
        "the reader on node 2 got other bytes after the unlink"
    );
    held.write_all_at(b"after the unlink", 0).unwrap();
    held.sync_all().unwrap();
    let mut again = vec![0u8; 16];
    held.read_exact_at(&mut again, 0).unwrap();
    assert_eq!(&again, b"after the unlink");
    assert_eq!(held.metadata().unwrap().nlink(), 0);
    // Still there for node 2's sake, on every node.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(inodes(&c, 3), before, "deleted while node 2 holds it open");
    drop(held);
    eventually("the last close deletes it", || inodes(&c, 1) == before - 1);

    // The atomic replace every config deployer does, under a reader on node 2.
    let v1 = noise(2, 2 << 20);
    let v2 = noise(3, 1 << 20);
    fs::write(c.mnt(1).join("cfg"), &v1).unwrap();
    let mut reader = File::open(c.mnt(2).join("cfg")).unwrap();
    let mut got = vec![0u8; 4096];
    reader.read_exact(&mut got).unwrap();
    fs::write(c.mnt(1).join("cfg.tmp"), &v2).unwrap();
    fs::rename(c.mnt(1).join("cfg.tmp"), c.mnt(1).join("cfg")).unwrap();
    eventually("node 2 sees the new cfg", || {
        fs::metadata(c.mnt(2).join("cfg")).is_ok_and(|m| m.len() == v2.len() as u64)
    });
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    got.extend(rest);
    assert!(got == v1, "the reader of the replaced cfg got other bytes");
    assert!(
        read(&c.mnt(2).join("cfg")).unwrap() == v2,
        "a new open sees v2"
    );
    drop(reader);

    // A holder whose node dies: the file goes when the dead node's lease runs out.
    fs::write(c.mnt(1).join("g"), noise(4, 1 << 20)).unwrap();
    let with_g = inodes(&c, 1);
    let blocks_with_g = referenced_blocks(&c, 1);
    let held = File::open(c.mnt(3).join("g")).unwrap();
    fs::remove_file(c.mnt(1).join("g")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(inodes(&c, 1), with_g, "node 3 holds it");
    c.kill9(3);
    std::mem::forget(held);
    eventually_within(
        "the dead holder's lease ends and the file with it",
        Duration::from_secs(30),
        || inodes(&c, 1) == with_g - 1,
    );
    assert!(
        referenced_blocks(&c, 1) < blocks_with_g,
        "its blocks are no longer referenced (garbage, collected after the grace period)"
    );

    // Nothing holds it: deleted at once.
    fs::write(c.mnt(2).join("h"), b"short-lived").unwrap();
    let with_h = inodes(&c, 1);
    fs::remove_file(c.mnt(2).join("h")).unwrap();
    eventually("an unlinked file nobody holds is deleted", || {
        inodes(&c, 1) == with_h - 1
    });
}

/// A proposal whose answer the leader loses (the fault knob drops it after applying) is sent
/// again by its node; it applies once and reports success: a create that is not EEXIST, an
/// exchange that is not undone, a truncate, an unlink that is not ENOENT.
#[test]
fn a_proposal_retried_after_a_lost_answer_applies_once() {
    let c = LocalCluster::up_with_env(3, &[("SHOAL_FAULT_DROP_PROPOSE_REPLY", "1")]);
    let leader = c.leader(1).expect("a leader");
    let k = (1..=3).find(|k| u64::from(*k) != leader).unwrap();
    let m = c.mnt(k);
    let started = Instant::now();
    File::create_new(m.join("a"))
        .unwrap()
        .write_all(b"A")
        .unwrap();
    fs::write(m.join("b"), b"B").unwrap();
    let exchanged = rustix::fs::renameat_with(
        rustix::fs::CWD,
        m.join("a"),
        rustix::fs::CWD,
        m.join("b"),
        rustix::fs::RenameFlags::EXCHANGE,
    );
    assert!(exchanged.is_ok(), "{exchanged:?}");
    assert_eq!(
        read(&m.join("a")).unwrap(),
        b"B",
        "exchanged once, not twice"
    );
    assert_eq!(read(&m.join("b")).unwrap(), b"A");
    let f = OpenOptions::new().write(true).open(m.join("a")).unwrap();
    f.set_len(10_000).unwrap();
    drop(f);
    assert_eq!(fs::metadata(m.join("a")).unwrap().len(), 10_000);
    let other = (1..=3).find(|j| *j != k).unwrap();
    assert_eq!(fs::metadata(c.mnt(other).join("a")).unwrap().len(), 10_000);
    fs::remove_file(m.join("b")).unwrap();
    assert!(fs::metadata(m.join("b")).is_err());
    eprintln!(
        "create, write, exchange, truncate and unlink with every answer lost once: {:?}",
        started.elapsed()
    );
    // The fault did fire: the leader lost its answers, so every one of these was a retry.
    let log = fs::read_to_string(c.node(leader as u32).join("daemon.log")).unwrap_or_default();
    let dropped = log.matches("fault: dropping the answer").count();
    assert!(dropped >= 5, "the leader dropped {dropped} answers");
}

/// A sparse file of an exabyte costs what it stores: created, written at its end, read on
/// another node, truncated and removed on a three-node cluster without stalling anyone.
#[test]
fn an_exabyte_sparse_file_does_not_stall_the_cluster() {
    const EIB: u64 = 1 << 60;
    let c = LocalCluster::up(3);
    let path = c.mnt(1).join("huge");
    let f = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut steps = Vec::new();
    let mut step = |what: &str, t: Instant| steps.push(format!("{what} {:?}", t.elapsed()));
    let t = Instant::now();
    f.set_len(EIB).unwrap();
    step("truncate -s 1E", t);
    let t = Instant::now();
    f.write_all_at(b"the end", EIB - 7).unwrap();
    f.sync_all().unwrap();
    step("write at the end + fsync", t);
    let t = Instant::now();
    let mut on2 = File::open(c.mnt(2).join("huge")).unwrap();
    on2.seek(SeekFrom::Start(EIB - 7)).unwrap();
    let mut end = Vec::new();
    on2.read_to_end(&mut end).unwrap();
    assert_eq!(end, b"the end");
    step("read on node 2", t);
    let t = Instant::now();
    f.set_len(4096).unwrap();
    f.set_len(EIB).unwrap();
    step("truncate to 4 KiB and back", t);
    // Node 2 learns of node 1's truncates through the apply's invalidation, within
    // milliseconds; its descriptor is open, so no open barrier orders it.
    eventually("node 2 sees the size come back", || {
        on2.metadata().is_ok_and(|m| m.len() == EIB)
    });
    let mut zero = [1u8; 7];
    on2.read_exact_at(&mut zero, EIB - 7).unwrap();
    assert_eq!(zero, [0; 7], "the truncated end reads as zeros");
    drop((f, on2));
    let t = Instant::now();
    fs::remove_file(&path).unwrap();
    step("rm", t);
    // Meanwhile the cluster serves everyone.
    fs::write(c.mnt(3).join("after"), b"fine").unwrap();
    assert_eq!(read(&c.mnt(1).join("after")).unwrap(), b"fine");
    eprintln!("1 EiB sparse file: {}", steps.join(", "));
}

/// A volume holding a directory tree 10,000 levels deep (made through the mount, one level
/// at a time relative to the last) is removed and purged on a three-node cluster: every
/// node applies the purge, whose walk is a loop, not a recursion that would overflow the
/// apply task's stack.
#[test]
fn a_volume_ten_thousand_directories_deep_is_purged_on_every_node() {
    use rustix::fs::{Mode, OFlags};
    let c = LocalCluster::up(3);
    let ok = |k: u32, args: &[&str]| {
        let out = c.shoal_at(k, args);
        assert!(out.status.success(), "shoal {args:?}: {out:?}");
    };
    ok(1, &["volume", "create", "deep"]);
    let mut dir = rustix::fs::open(
        c.mnt(2).join("volumes/deep"),
        OFlags::DIRECTORY | OFlags::RDONLY,
        Mode::empty(),
    )
    .unwrap();
    for _ in 0..10_000 {
        rustix::fs::mkdirat(&dir, "d", Mode::from_raw_mode(0o755)).unwrap();
        dir = rustix::fs::openat(&dir, "d", OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())
            .unwrap();
    }
    let f = rustix::fs::openat(
        &dir,
        "leaf",
        OFlags::CREATE | OFlags::WRONLY,
        Mode::from_raw_mode(0o644),
    )
    .unwrap();
    rustix::io::write(&f, b"at the bottom").unwrap();
    drop((f, dir));
    let before = inodes(&c, 3);
    ok(3, &["volume", "rm", "deep"]);
    ok(3, &["volume", "purge", "deep"]);
    for k in 1..=3 {
        eventually_within(
            "every node applied the purge",
            Duration::from_secs(30),
            || inodes(&c, k) <= before - 10_001,
        );
    }
    // Every node is alive and serving after applying it.
    fs::write(c.mnt(1).join("after"), b"fine").unwrap();
    for k in 2..=3 {
        assert_eq!(read(&c.mnt(k).join("after")).unwrap(), b"fine");
    }
}

/// What a lock protects is what the last holder left, on every node: three nodes (one of
/// them lagging the leader) each append lines to one log with O_APPEND and increment one
/// counter, both under a lock on a third file, at the same time, as the tasks of one service
/// do. Every append is kept once and the counter counts every increment, for flock and
/// fcntl locks. A holder must see the bytes and the size the previous holder left, even
/// where this node's kernel cached the file a moment before and the invalidation is slow.
#[test]
fn appends_and_increments_under_a_lock_from_three_nodes_at_once_are_all_kept() {
    use rustix::fs::{FlockOperation, Mode, OFlags};
    const ROUNDS: usize = 40;
    let c = LocalCluster::up_with_env(
        3,
        &[
            ("SHOAL_FAULT_SLOW_APPEND", "3:20"),
            ("SHOAL_FAULT_SLOW_INVALIDATION", "30"),
        ],
    );
    fs::write(c.mnt(1).join("lock"), b"").unwrap();
    fs::write(c.mnt(1).join("counter"), b"0").unwrap();
    eventually("the files on every node", || {
        (1..=3).all(|k| c.mnt(k).join("counter").exists())
    });
    for kind in [Lock::Flock, Lock::Fcntl] {
        let log = format!("log-{kind:?}");
        std::thread::scope(|s| {
            for k in 1..=3u32 {
                let (c, log) = (&c, &log);
                s.spawn(move || {
                    let m = c.mnt(k);
                    let lock =
                        rustix::fs::open(m.join("lock"), OFlags::RDWR, Mode::empty()).unwrap();
                    for i in 0..ROUNDS {
                        match kind {
                            Lock::Flock => {
                                rustix::fs::flock(&lock, FlockOperation::LockExclusive).unwrap()
                            }
                            Lock::Fcntl => {
                                rustix::fs::fcntl_lock(&lock, FlockOperation::LockExclusive)
                                    .unwrap()
                            }
                        }
                        let mut f = OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(m.join(log))
                            .unwrap();
                        f.write_all(format!("node{k}-{i}\n").as_bytes()).unwrap();
                        drop(f);
                        let n: u64 = fs::read_to_string(m.join("counter"))
                            .unwrap()
                            .parse()
                            .unwrap();
                        fs::write(m.join("counter"), (n + 1).to_string()).unwrap();
                        match kind {
                            Lock::Flock => {
                                rustix::fs::flock(&lock, FlockOperation::Unlock).unwrap()
                            }
                            Lock::Fcntl => {
                                rustix::fs::fcntl_lock(&lock, FlockOperation::Unlock).unwrap()
                            }
                        }
                    }
                });
            }
        });
        for k in 1..=3 {
            let text = fs::read_to_string(c.mnt(k).join(&log)).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            let unique: std::collections::BTreeSet<&str> = lines.iter().copied().collect();
            assert_eq!(
                (lines.len(), unique.len()),
                (3 * ROUNDS, 3 * ROUNDS),
                "{kind:?}: node {k} reads {} lines, {} distinct, of {}",
                lines.len(),
                unique.len(),
                3 * ROUNDS
            );
        }
    }
    for k in 1..=3 {
        assert_eq!(
            fs::read_to_string(c.mnt(k).join("counter")).unwrap(),
            (2 * 3 * ROUNDS).to_string(),
            "the counter on node {k} missed increments"
        );
    }
}

/// `open(O_CREAT)` without O_EXCL opens the file whoever made it: three nodes opening the
/// same new names at the same moment (the first `flock /data/lock` or `echo >> /data/log` of
/// tasks starting on several hosts) all succeed, on one file. O_EXCL still refuses, the
/// loser of an O_TRUNC race still truncates, and a caller the file's mode does not allow is
/// refused as by any open of an existing file.
#[test]
fn the_same_new_file_opened_with_o_creat_from_three_nodes_at_once_is_one_file() {
    use std::os::unix::fs::OpenOptionsExt;
    const NAMES: usize = 40;
    let c = LocalCluster::up(3);
    // Each racer opens every name and reports the inode it got, or the error.
    let opened: Vec<Vec<Result<u64, String>>> = std::thread::scope(|s| {
        let c = &c;
        let racers: Vec<_> = (1..=3u32)
            .flat_map(|k| (0..2).map(move |t| (k, t)))
            .map(|(k, _)| {
                s.spawn(move || {
                    (0..NAMES)
                        .map(|i| {
                            OpenOptions::new()
                                .create(true)
                                .append(true)
                                .open(c.mnt(k).join(format!("new-{i}")))
                                .and_then(|f| f.metadata())
                                .map(|m| m.ino())
                                .map_err(|e| format!("node {k} new-{i}: {e}"))
                        })
                        .collect()
                })
            })
            .collect();
        racers.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let errors: Vec<&String> = opened
        .iter()
        .flatten()
        .filter_map(|r| r.as_ref().err())
        .collect();
    assert!(errors.is_empty(), "O_CREAT opens failed: {errors:?}");
    for i in 0..NAMES {
        let ino = fs::metadata(c.mnt(2).join(format!("new-{i}")))
            .unwrap()
            .ino();
        for racer in &opened {
            assert_eq!(racer[i], Ok(ino), "new-{i}: a racer opened another file");
        }
    }

    // O_EXCL keeps its meaning.
    let excl = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(c.mnt(3).join("new-0"));
    assert_eq!(excl.unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);

    // O_CREAT|O_TRUNC from three nodes at once: every opener truncates, so the file ends up
    // holding exactly one writer's line.
    fs::write(c.mnt(1).join("trunc"), vec![b'x'; 100_000]).unwrap();
    std::thread::scope(|s| {
        for k in 1..=3u32 {
            let c = &c;
            s.spawn(move || {
                let mut f = OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .open(c.mnt(k).join("trunc"))
                    .unwrap();
                f.write_all(b"short\n").unwrap();
            });
        }
    });
    assert_eq!(read(&c.mnt(2).join("trunc")).unwrap(), b"short\n");

    // The winner made the file 0600 as root: nobody else may open it for writing.
    let made = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(c.mnt(1).join("private"))
        .unwrap();
    drop(made);
    let as_nobody = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["sh", "-c", "echo no >> \"$1\"", "sh"])
        .arg(c.mnt(2).join("private"))
        .output()
        .unwrap();
    assert!(
        !as_nobody.status.success()
            && String::from_utf8_lossy(&as_nobody.stderr).contains("Permission denied"),
        "nobody opened a 0600 root file for writing: {as_nobody:?}"
    );
    assert_eq!(read(&c.mnt(3).join("private")).unwrap(), b"");
}
