//! Three `shoal` daemons on loopback, started with `shoal local up`: the same files everywhere,
//! refused strangers, and nodes that die.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::testkit::shoal;

pub(crate) use crate::local_cluster::{LocalCluster, eventually, eventually_within, read};

/// Runs `shoal join` into a fresh data dir; returns whether it worked and what it said.
fn try_join(token: &str, peer: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(shoal())
        .args([
            "join",
            "--token",
            token,
            "--peer",
            peer,
            "--listen",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn three_nodes_show_the_same_files() {
    let c = LocalCluster::up(3);
    let data: Vec<u8> = (0..9_000_000u32).map(|i| (i % 241) as u8).collect();
    fs::write(c.mnt(1).join("big"), &data).unwrap();
    fs::write(c.mnt(1).join("small"), b"hello").unwrap();
    for k in [2, 3] {
        eventually("the big file on another node", || {
            read(&c.mnt(k).join("big")).as_deref() == Some(&data[..])
        });
        assert_eq!(read(&c.mnt(k).join("small")).unwrap(), b"hello");
    }
    // Directory operations from node 2, seen on 1 and 3.
    fs::create_dir(c.mnt(2).join("d")).unwrap();
    fs::write(c.mnt(2).join("d/f"), b"from two").unwrap();
    fs::rename(c.mnt(2).join("small"), c.mnt(2).join("d/renamed")).unwrap();
    fs::remove_file(c.mnt(2).join("big")).unwrap();
    for k in [1, 3] {
        eventually("a file created on node 2", || {
            read(&c.mnt(k).join("d/f")).as_deref() == Some(b"from two")
        });
        eventually("a rename on node 2", || {
            read(&c.mnt(k).join("d/renamed")).as_deref() == Some(b"hello")
        });
        eventually("an unlink on node 2", || !c.mnt(k).join("big").exists());
    }
    // An overwrite on node 3 replaces what node 1 read before.
    fs::write(c.mnt(3).join("d/f"), b"from three").unwrap();
    eventually("an overwrite on node 3", || {
        read(&c.mnt(1).join("d/f")).as_deref() == Some(b"from three")
    });

    // Labels set through one node are listed by every other, with each node's liveness and
    // data disk.
    let out = c.shoal_at(1, &["node", "label", "add", "2", "storage=ssd", "zone=a"]);
    assert!(out.status.success(), "{out:?}");
    let out = c.shoal_at(3, &["node", "label", "rm", "2", "zone"]);
    assert!(out.status.success(), "{out:?}");
    let out = c.shoal_at(3, &["node", "label", "add", "7", "storage=ssd"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no node 7"),
        "{out:?}"
    );
    eventually("every node reported its disk", || {
        let ls = node_ls(&c, 3);
        ls.iter()
            .all(|m| m["up"] == true && m["disk"]["total"].as_u64() > Some(0))
    });
    let ls = node_ls(&c, 3);
    let roles: Vec<&str> = ls.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "leader").count(),
        1,
        "{roles:?}"
    );
    assert_eq!(
        roles.iter().filter(|r| **r == "voter").count(),
        2,
        "{roles:?}"
    );
    assert_eq!(ls[1]["labels"], serde_json::json!({"storage": "ssd"}));
}

/// `shoal node ls --json` through node `k`.
fn node_ls(c: &LocalCluster, k: u32) -> Vec<serde_json::Value> {
    let out = c.shoal_at(k, &["node", "ls", "--json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Close-to-open without waiting: once close(2) returned on one node, an open on any other
/// node shows the new bytes (new names and overwrites alike) — the open's read barrier, not a
/// retry, guarantees it, even on a node that lags the leader by 300 ms.
#[test]
fn a_file_closed_on_one_node_opens_with_its_bytes_on_every_other() {
    let c = LocalCluster::up_with_env(3, &[("SHOAL_FAULT_SLOW_APPEND", "3:300")]);
    for round in 0..12u32 {
        // Every ordered pair of nodes, node 3 (the slow one) included on both sides.
        let writer = round % 3 + 1;
        let reader = (round + round / 3 + 1) % 3 + 1;
        if reader == writer {
            continue;
        }
        let body = format!("round {round} from node {writer}");
        fs::write(c.mnt(writer).join(format!("new-{round}")), &body).unwrap();
        fs::write(c.mnt(writer).join("same"), &body).unwrap();
        for name in [format!("new-{round}"), "same".to_string()] {
            assert_eq!(
                read(&c.mnt(reader).join(&name)).as_deref(),
                Some(body.as_bytes()),
                "{name} on node {reader} right after node {writer} closed it"
            );
        }
    }
}

#[test]
fn a_wrong_token_and_a_wrong_cluster_are_refused() {
    let c = LocalCluster::up(1);
    let token = fs::read_to_string(c.data(1).join("tls/join-token")).unwrap();
    let token = token.trim();
    let peer = format!("127.0.0.1:{}", c.base_port + 1);
    let join = |token: &str| {
        let (ok, err) = try_join(token, &peer);
        assert!(!ok);
        err
    };
    // Right cluster, wrong secret.
    let wrong_secret = format!("{}{}", &token[..token.len() - 4], "0000");
    let err = join(&wrong_secret);
    assert!(err.contains("the join token is not valid"), "{err}");
    // A token of another cluster: its CA fingerprint does not match the server's.
    let other = format!("SHOAL1-{}-{}", "ab".repeat(32), &token[token.len() - 32..]);
    let err = join(&other);
    assert!(err.contains("whose CA matches the token"), "{err}");
    let err = join("not-a-token");
    assert!(err.contains("a join token looks like"), "{err}");
}

#[test]
fn files_stay_readable_when_a_node_dies_and_the_leader_is_replaced() {
    let c = LocalCluster::up(3);
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 239) as u8).collect();
    fs::write(c.mnt(2).join("f"), &data).unwrap();
    eventually("the leader is node 1", || c.leader(1) == Some(1));

    // Kill the leader: the others elect a new one and keep taking writes.
    c.kill9(1);
    eventually("a new leader among nodes 2 and 3", || {
        matches!(c.leader(2), Some(2 | 3))
    });
    fs::write(c.mnt(3).join("after"), b"written without node 1").unwrap();
    assert_eq!(read(&c.mnt(2).join("f")).unwrap(), data);
    eventually("a write after the leader died", || {
        read(&c.mnt(2).join("after")).as_deref() == Some(b"written without node 1")
    });

    // Restart node 1 (its new daemon clears the dead mount the killed one left): it catches up.
    c.local_up(3);
    eventually("node 1 catches up", || {
        read(&c.mnt(1).join("after")).as_deref() == Some(b"written without node 1")
    });
    assert_eq!(read(&c.mnt(1).join("f")).unwrap(), data);
}

pub(crate) fn status(c: &LocalCluster, k: u32) -> Option<serde_json::Value> {
    let out = c.shoal_at(k, &["status", "--json"]);
    serde_json::from_slice(&out.stdout).ok()
}

fn body(i: u64) -> Vec<u8> {
    (0..16_384u64).map(|j| ((i * 31 + j) % 251) as u8).collect()
}

/// Kill -9 the leader while another node writes and fsyncs files without pause: writes go on
/// once a new leader is elected, no fsynced file is lost, and the killed node, restarted after
/// the log it missed was compacted away, catches up by installing a snapshot.
#[test]
fn the_leader_dies_under_fsync_load_and_comes_back_by_snapshot() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let c = LocalCluster::up_with_env(3, &[("SHOAL_SNAPSHOT_EVERY", "100")]);
    eventually("the leader is node 1", || c.leader(1) == Some(1));
    fs::create_dir(c.mnt(2).join("w")).unwrap();
    let acked: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (dir, acked, stop, errors) = (
            c.mnt(2).join("w"),
            acked.clone(),
            stop.clone(),
            errors.clone(),
        );
        std::thread::spawn(move || {
            for i in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let write = || -> std::io::Result<()> {
                    let mut f = fs::File::create(dir.join(i.to_string()))?;
                    f.write_all(&body(i))?;
                    f.sync_all()
                };
                match write() {
                    Ok(()) => acked.lock().unwrap().push((i, Instant::now())),
                    Err(e) => {
                        errors.lock().unwrap().push(format!("file {i}: {e}"));
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })
    };
    eventually("the writer is under way", || {
        acked.lock().unwrap().len() >= 30
    });
    c.kill9(1);
    let killed = Instant::now();
    // Node 1 held at most a few entries node 2 lacks.
    let behind = status(&c, 2).unwrap()["last_log_index"].as_u64().unwrap() + 50;
    eventually_within(
        "a write acknowledged after the leader died",
        Duration::from_secs(15),
        || {
            acked
                .lock()
                .unwrap()
                .last()
                .is_some_and(|(_, t)| *t > killed)
        },
    );
    eventually_within(
        "the new leader compacted its log past what node 1 has",
        Duration::from_secs(60),
        || {
            [2, 3].iter().any(|k| {
                status(&c, *k).is_some_and(|s| {
                    s["leader"] == s["node_id"] && s["purged"].as_u64() > Some(behind)
                })
            })
        },
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let acked: Vec<u64> = acked.lock().unwrap().iter().map(|(i, _)| *i).collect();
    let errors = errors.lock().unwrap().clone();
    eprintln!(
        "{} files fsynced, {} writes failed around the election: {errors:?}",
        acked.len(),
        errors.len(),
    );

    c.local_up(3);
    let last = *acked.last().unwrap();
    eventually("node 1 catches up", || {
        read(&c.mnt(1).join(format!("w/{last}"))).as_deref() == Some(&body(last)[..])
    });
    let log = fs::read_to_string(c.node(1).join("daemon.log")).unwrap();
    assert!(
        log.contains("installed a snapshot from the leader"),
        "node 1 caught up without a snapshot:\n{log}"
    );
    for k in [1, 3] {
        for i in &acked {
            assert_eq!(
                read(&c.mnt(k).join(format!("w/{i}"))).as_deref(),
                Some(&body(*i)[..]),
                "fsynced file {i} on node {k}"
            );
        }
    }
}

/// Which lock call the python helpers use.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Lock {
    /// fcntl(2) F_SETLK(W) through lockf(3).
    Fcntl,
    /// flock(2).
    Flock,
}

/// Runs python3 with a file path: `hold` takes a write lock and holds it; otherwise it tries
/// without waiting and exits non-zero if the lock is held elsewhere.
fn python_lock(kind: Lock, hold: bool, path: &Path) -> std::process::Child {
    let call = match kind {
        Lock::Fcntl => "fcntl.lockf",
        Lock::Flock => "fcntl.flock",
    };
    let script = if hold {
        format!(
            "import fcntl,sys,time; f=open(sys.argv[1],'r+'); {call}(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"
        )
    } else {
        format!(
            "import fcntl,sys; f=open(sys.argv[1],'r+'); {call}(f, fcntl.LOCK_EX|fcntl.LOCK_NB)"
        )
    };
    Command::new("python3")
        .args(["-c", &script])
        .arg(path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn hold(kind: Lock, path: &Path) -> std::process::Child {
    use std::io::Read;
    let mut child = python_lock(kind, true, path);
    let mut line = [0u8; 7];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    assert_eq!(&line, b"locked\n");
    child
}

fn try_lock(kind: Lock, path: &Path) -> bool {
    python_lock(kind, false, path).wait().unwrap().success()
}

#[test]
fn fcntl_and_flock_locks_hold_across_nodes_and_die_with_their_holder_or_its_node() {
    let c = LocalCluster::up(3);
    fs::write(c.mnt(1).join("lockfile"), b"x").unwrap();
    eventually("the file on every node", || {
        (1..=3).all(|k| c.mnt(k).join("lockfile").exists())
    });

    // A lock held on node 1 is seen from node 2, and released when its holder exits: for
    // fcntl's byte-range locks and for flock's whole-file locks.
    for kind in [Lock::Fcntl, Lock::Flock] {
        let mut holder = hold(kind, &c.mnt(1).join("lockfile"));
        assert!(
            !try_lock(kind, &c.mnt(2).join("lockfile")),
            "node 2 must not get a lock node 1 holds"
        );
        assert!(
            !try_lock(kind, &c.mnt(1).join("lockfile")),
            "another process on node 1 must not get it either"
        );
        holder.kill().unwrap();
        holder.wait().unwrap();
        eventually("the lock is free after its holder exits", || {
            try_lock(kind, &c.mnt(2).join("lockfile"))
        });
    }

    // A lock held on node 2 outlives a kill -9 of node 2's daemon until its session lease runs
    // out, and not longer.
    let mut holder = hold(Lock::Flock, &c.mnt(2).join("lockfile"));
    c.kill9(2);
    assert!(
        !try_lock(Lock::Flock, &c.mnt(3).join("lockfile")),
        "the lock must not be released before the lease ends"
    );
    eventually("the lock is free once the dead node's lease ended", || {
        try_lock(Lock::Flock, &c.mnt(3).join("lockfile"))
    });
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn a_corrupt_replica_is_read_around_and_repaired() {
    let c = LocalCluster::up(3);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 233) as u8).collect();
    fs::write(c.mnt(1).join("f"), &data).unwrap();
    eventually("the file on node 2", || read(&c.mnt(2).join("f")).is_some());
    // Damage every block file node 2 holds, then read through node 2 with its caches cold.
    let blocks = c.data(2).join("blocks");
    let mut damaged = Vec::new();
    for fan in fs::read_dir(&blocks).unwrap().flatten() {
        if fan.file_name().len() != 2 {
            continue;
        }
        for f in fs::read_dir(fan.path()).unwrap().flatten() {
            let mut bytes = fs::read(f.path()).unwrap();
            bytes[10] ^= 0xff;
            fs::write(f.path(), &bytes).unwrap();
            damaged.push((f.path(), bytes));
        }
    }
    assert!(!damaged.is_empty());
    // Restart node 2 so nothing is cached in memory.
    let pid = rustix::process::Pid::from_raw(c.pid(2)).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    eventually("node 2 stops", || {
        rustix::process::test_kill_process(pid).is_err()
    });
    c.local_up(3);
    assert_eq!(
        read(&c.mnt(2).join("f")).unwrap(),
        data,
        "reads return the right bytes"
    );
    let repaired = damaged.len() as u64;
    for (path, bad) in damaged {
        let now = fs::read(&path).unwrap();
        assert_ne!(now, bad, "{} was repaired", path.display());
    }
    let s = status(&c, 2).unwrap();
    assert!(
        s["repaired"].as_u64().unwrap() >= repaired,
        "status counts the copies repaired on read: {s}"
    );
    assert_eq!(s["lost"], 0, "{s}");

    // Damaged on every node: the read fails with EIO, never wrong bytes, and status says so.
    let before: std::collections::BTreeSet<String> = block_files(&c.data(1));
    fs::write(c.mnt(1).join("g"), vec![7u8; 100_000]).unwrap();
    let new_block = block_files(&c.data(1))
        .into_iter()
        .find(|b| !before.contains(b))
        .expect("g has a block");
    eventually("g's block on every node", || {
        (1..=3).all(|k| block_files(&c.data(k)).contains(&new_block))
    });
    for k in 1..=3 {
        let path = c
            .data(k)
            .join("blocks")
            .join(&new_block[..2])
            .join(&new_block);
        if let Ok(mut bytes) = fs::read(&path) {
            bytes[10] ^= 0xff;
            fs::write(&path, &bytes).unwrap();
        }
    }
    // Cold caches: restart the node that reads.
    let pid = rustix::process::Pid::from_raw(c.pid(2)).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    eventually("node 2 stops", || {
        rustix::process::test_kill_process(pid).is_err()
    });
    c.local_up(3);
    let err = fs::read(c.mnt(2).join("g")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let s = status(&c, 2).unwrap();
    assert!(s["lost"].as_u64().unwrap() >= 1, "{s}");
    let text = String::from_utf8_lossy(&c.shoal_at(2, &["status"]).stdout).into_owned();
    assert!(text.contains("LOST"), "{text}");
}

#[test]
fn a_rotated_token_and_a_removed_node_are_refused() {
    let c = LocalCluster::up(3);
    let peer = format!("127.0.0.1:{}", c.base_port + 1);
    let join = |token: &str| try_join(token, &peer);
    let old = fs::read_to_string(c.data(1).join("tls/join-token"))
        .unwrap()
        .trim()
        .to_string();
    let out = c.shoal_at(1, &["token", "rotate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_ne!(new, old);
    let (ok, err) = join(&old);
    assert!(!ok && err.contains("the join token is not valid"), "{err}");
    let (ok, err) = join(&new);
    assert!(ok, "the new token works: {err}");

    // Remove node 3 (asked through node 2): the others stop talking to it.
    fs::write(c.mnt(3).join("before"), b"ok").unwrap();
    let out = c.shoal_at(2, &["node", "rm", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.shoal_at(1, &["node", "ls"]);
    let ls = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!ls.lines().any(|l| l.starts_with("3 ")), "{ls}");
    let err = fs::write(c.mnt(3).join("after"), b"no").unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EIO),
        "a removed node's writes are refused"
    );
    assert!(c.mnt(1).join("before").exists());
    assert!(!c.mnt(1).join("after").exists());
    // Its certificate is revoked: asking every member at once to add it again, with the
    // certificate it still holds, gets it nowhere.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answers: Vec<String> = rt.block_on(async {
        let id = shoal_net::pki::Identity::load(&shoal_fs::cluster::tls_dir(&c.data(3))).unwrap();
        let mut set = tokio::task::JoinSet::new();
        for k in [1, 2, 1, 2] {
            let ep = shoal_net::quic::endpoint(&id, "127.0.0.1:0".parse().unwrap()).unwrap();
            let (to, me) = (c.addr(k), c.addr(3).to_string());
            set.spawn(async move {
                let req = shoal_fs::cluster::rpc::Request::AddMember {
                    id: 3,
                    addr: me,
                    client: false,
                };
                let r = shoal_net::rpc::Peers::new(ep)
                    .call::<_, shoal_fs::cluster::rpc::Response>(to, &req)
                    .await;
                format!("{r:?}")
            });
        }
        set.join_all().await
    });
    for a in &answers {
        assert!(a.contains("revoked"), "{a}");
    }
    let out = c.shoal_at(1, &["node", "ls"]);
    let ls = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!ls.lines().any(|l| l.starts_with("3 ")), "{ls}");
    // The leader cannot be removed from under itself.
    let out = c.shoal_at(1, &["node", "rm", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the leader"));
}

pub(crate) fn block_files(data: &Path) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for fan in fs::read_dir(data.join("blocks")).unwrap().flatten() {
        if fan.file_name().len() == 2 {
            for f in fs::read_dir(fan.path()).unwrap().flatten() {
                out.insert(f.file_name().into_string().unwrap());
            }
        }
    }
    out
}

/// Four nodes, and a 12 MB file written on node 1: its bytes and the names of its blocks (with
/// four nodes, each block is on three).
fn four_nodes_with_a_file() -> (LocalCluster, Vec<u8>, std::collections::BTreeSet<String>) {
    let c = LocalCluster::up(4);
    let data: Vec<u8> = (0..12_000_000u32).map(|i| (i % 229) as u8).collect();
    fs::write(c.mnt(1).join("f"), &data).unwrap();
    let all: std::collections::BTreeSet<String> =
        (1..=4).flat_map(|k| block_files(&c.data(k))).collect();
    assert!(all.len() >= 3, "a 12 MB file is several blocks");
    (c, data, all)
}

/// A node, not one of `spare`, whose loss leaves some block of `all` on two nodes.
fn needed_node(c: &LocalCluster, all: &std::collections::BTreeSet<String>, spare: &[u32]) -> u32 {
    (1..=4)
        .filter(|v| !spare.contains(v))
        .find(|v| {
            (1..=4)
                .filter(|k| k != v)
                .any(|k| !all.is_subset(&block_files(&c.data(k))))
        })
        .expect("some node is the only other holder of a block")
}

#[test]
fn blocks_of_a_dead_node_are_re_replicated_onto_the_others() {
    let (c, data, all) = four_nodes_with_a_file();
    // Kill a node whose loss leaves some block on two: once its lease ends, the three live
    // nodes must each hold every block.
    let victim = needed_node(&c, &all, &[1]);
    let live: Vec<u32> = (1..=4).filter(|k| *k != victim).collect();
    c.kill9(victim);
    eventually("node ls shows the dead node down", || {
        node_ls(&c, live[0])
            .iter()
            .any(|m| m["id"] == victim && m["up"] == false)
    });
    eventually_within(
        "every live node holds every block",
        Duration::from_secs(40),
        || {
            live.iter()
                .all(|k| all.is_subset(&block_files(&c.data(*k))))
        },
    );
    let reader = *live.last().unwrap();
    assert_eq!(read(&c.mnt(reader).join("f")).unwrap(), data);
}

/// `shoal node rm` of a node that died returns only once the blocks it held have their copies
/// on the others again: right after it returns, every live node holds every block, with no
/// waiting, while another node kept writing and fsyncing through the removal.
#[test]
fn node_rm_of_a_dead_node_returns_once_its_blocks_have_their_copies_again() {
    let (c, data, all) = four_nodes_with_a_file();
    // The leader cannot be removed: another node whose loss leaves some block on two.
    let leader = c.leader(1).expect("a leader") as u32;
    let victim = needed_node(&c, &all, &[leader]);
    let live: Vec<u32> = (1..=4).filter(|k| *k != victim).collect();
    let (asker, writer) = (live[1], live[2]);
    c.kill9(victim);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let written = std::thread::scope(|s| {
        let writes = s.spawn(|| {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut f = fs::File::create(c.mnt(writer).join(format!("during-{n}"))).unwrap();
                std::io::Write::write_all(&mut f, &n.to_le_bytes().repeat(50_000)).unwrap();
                f.sync_all().unwrap();
                n += 1;
            }
            n
        });
        let out = c.shoal_at(asker, &["node", "rm", &victim.to_string()]);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("every block has its copies"), "{said}");
        writes.join().unwrap()
    });
    assert!(
        written > 0,
        "the writer got writes through during the removal"
    );
    for k in &live {
        let held = block_files(&c.data(*k));
        assert!(
            all.is_subset(&held),
            "node {k} holds every block of f once node rm returned: lacks {:?}",
            all.difference(&held).collect::<Vec<_>>()
        );
    }
    assert_eq!(read(&c.mnt(writer).join("f")).unwrap(), data);
    // The last writes may still be one repair round from their third copy.
    eventually_within(
        "fsck finds every copy in place",
        Duration::from_secs(30),
        || c.shoal_at(asker, &["fsck"]).status.success(),
    );
    for n in 0..written {
        assert_eq!(
            read(&c.mnt(asker).join(format!("during-{n}"))).unwrap(),
            n.to_le_bytes().repeat(50_000),
            "during-{n}"
        );
    }
}

/// A follower frozen in the middle (SIGSTOP: its connections stay open, nothing answers, as
/// in a partition or a stalled host) while another node writes and fsyncs files one after
/// the other, some read at once on the third node: every write lands and reads back, and
/// once the frozen node resumes it reads every file and comes to hold every block again.
#[test]
fn writes_go_on_while_a_follower_is_frozen_and_it_catches_up_after() {
    let c = LocalCluster::up(3);
    let leader = c.leader(1).expect("a leader") as u32;
    let victim = (2..=3).find(|k| *k != leader).unwrap();
    let (writer, reader) = if victim == 2 { (1, 3) } else { (1, 2) };
    let pid = rustix::process::Pid::from_raw(c.pid(victim)).unwrap();
    let body = |i: u32| -> Vec<u8> { (0..300_000u32).map(|j| ((i * 7 + j) % 251) as u8).collect() };
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    let wrote = std::panic::catch_unwind(|| {
        for i in 0..20u32 {
            let path = c.mnt(writer).join(format!("w{i}"));
            let mut f = fs::File::create(&path).unwrap();
            std::io::Write::write_all(&mut f, &body(i)).unwrap();
            f.sync_all().unwrap();
            if i % 5 == 0 {
                assert_eq!(
                    read(&c.mnt(reader).join(format!("w{i}"))).unwrap(),
                    body(i),
                    "w{i} read on node {reader} while node {victim} is frozen"
                );
            }
        }
    });
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();
    wrote.unwrap();
    let all = block_files(&c.data(writer));
    for i in 0..20u32 {
        assert_eq!(
            read(&c.mnt(victim).join(format!("w{i}"))).unwrap(),
            body(i),
            "w{i} read on node {victim} after it resumed"
        );
    }
    eventually_within(
        "the resumed node holds every block",
        Duration::from_secs(40),
        || all.is_subset(&block_files(&c.data(victim))),
    );
}

/// A node frozen past its session lease is fenced: what its old handles write fails with EIO
/// and never lands. Once it runs again, the same file opens and writes normally there, even
/// while an old handle of it is still open, and a lock on it can be taken again.
#[test]
fn a_file_fenced_by_an_expired_session_serves_new_opens_afterwards() {
    use std::os::unix::fs::FileExt;
    let c = LocalCluster::up(3);
    let leader = c.leader(1).expect("a leader") as u32;
    let victim = (1..=3).find(|k| *k != leader).unwrap();
    let other = (1..=3).find(|k| *k != leader && *k != victim).unwrap();
    fs::write(c.mnt(victim).join("f"), b"before").unwrap();
    let old = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(c.mnt(victim).join("f"))
        .unwrap();
    let pid = rustix::process::Pid::from_raw(c.pid(victim)).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    std::thread::sleep(Duration::from_secs(8));
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();
    eventually_within(
        "the resumed node finds its session expired and opens a new one",
        Duration::from_secs(20),
        || {
            fs::read_to_string(c.node(victim).join("daemon.log"))
                .is_ok_and(|l| l.contains("this node's session expired"))
        },
    );
    // The old handle is fenced: its write never lands.
    let fenced = old.write_all_at(b"FENCED", 0).and_then(|_| old.sync_all());
    assert!(fenced.is_err(), "a write through a fenced handle succeeded");
    // A new open of the same file on the same node works, with the old handle still open.
    let new = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(c.mnt(victim).join("f"))
        .unwrap();
    new.write_all_at(b"after!", 0).unwrap();
    new.sync_all().unwrap();
    let mut got = [0u8; 6];
    new.read_exact_at(&mut got, 0).unwrap();
    assert_eq!(&got, b"after!");
    assert_eq!(read(&c.mnt(other).join("f")).unwrap(), b"after!");
    assert!(
        try_lock(Lock::Flock, &c.mnt(victim).join("f")),
        "a lock on the file can be taken on the resumed node"
    );
    drop((old, new));
    // And again after the old handle is gone.
    fs::write(c.mnt(victim).join("f"), b"again").unwrap();
    assert_eq!(read(&c.mnt(other).join("f")).unwrap(), b"again");
}

/// A leader cut off from both followers (frozen with SIGSTOP) still calls itself leader,
/// since nothing tells it of a newer term, but `shoal status` says it has lost its quorum;
/// once they resume, a leader is acknowledged by a quorum again.
#[test]
fn a_leader_cut_off_from_its_quorum_says_so() {
    let c = LocalCluster::up(3);
    let leader = c.leader(1).expect("a leader") as u32;
    let followers: Vec<u32> = (1..=3).filter(|k| *k != leader).collect();
    let quorum_ack = |k: u32| status(&c, k).and_then(|s| s["quorum_ack_ms"].as_u64());
    assert!(quorum_ack(leader).is_some_and(|ms| ms < 2_000));
    let pids: Vec<_> = followers
        .iter()
        .map(|k| rustix::process::Pid::from_raw(c.pid(*k)).unwrap())
        .collect();
    for p in &pids {
        rustix::process::kill_process(*p, rustix::process::Signal::STOP).unwrap();
    }
    let seen = std::panic::catch_unwind(|| {
        eventually("the leader reports its quorum lost", || {
            quorum_ack(leader).is_some_and(|ms| ms >= 2_000)
        });
        let text = c.shoal_at(leader, &["status"]);
        String::from_utf8_lossy(&text.stdout).into_owned()
    });
    for p in &pids {
        rustix::process::kill_process(*p, rustix::process::Signal::CONT).unwrap();
    }
    let text = seen.unwrap();
    assert!(text.contains("quorum        LOST"), "{text}");
    eventually_within(
        "a leader acknowledged by a quorum again",
        Duration::from_secs(20),
        || {
            (1..=3).any(|k| {
                status(&c, k).is_some_and(|s| {
                    s["leader"].as_u64() == Some(u64::from(k))
                        && s["quorum_ack_ms"].as_u64().is_some_and(|ms| ms < 2_000)
                })
            })
        },
    );
}

/// Close-to-open holds while this node's kernel still caches what came before: node 2 has
/// looked a file up (its kernel caches the size), node 1 then writes and closes it, and node
/// 2's next open reads the new bytes, although the invalidation thread is slowed to 300 ms a
/// batch, as under a flood of changes.
#[test]
fn an_open_sees_the_last_close_while_invalidations_lag() {
    let c = LocalCluster::up_with_env(3, &[("SHOAL_FAULT_SLOW_INVALIDATION", "300")]);
    for i in 0..5 {
        let name = format!("c2o-{i}");
        fs::write(c.mnt(1).join(&name), b"").unwrap();
        eventually("node 2 sees the empty file", || {
            fs::metadata(c.mnt(2).join(&name)).is_ok_and(|m| m.len() == 0)
        });
        let body = format!("written on node 1, round {i}");
        fs::write(c.mnt(1).join(&name), &body).unwrap();
        assert_eq!(
            fs::read_to_string(c.mnt(2).join(&name)).unwrap(),
            body,
            "round {i}: node 2's open missed node 1's close"
        );
    }
}

/// A lookup that read the view just before another node's fsync was applied here, and reached
/// the kernel just after that change's invalidation (which found no inode there to drop), left
/// the old size in the kernel for the TTL, and the next open read an empty file (seen once in
/// the soak, in `writes_go_on_while_a_follower_is_frozen...`). With every lookup held 700 ms
/// between reading the view and replying, to open that window wide, the open after the fsync
/// still reads the fsynced bytes.
#[test]
fn an_open_sees_an_fsync_whose_invalidation_raced_the_lookup() {
    use std::io::Write;
    let c = LocalCluster::up_with_env(3, &[("SHOAL_FAULT_SLOW_LOOKUP", "700")]);
    for i in 0..3u8 {
        let name = format!("raced-{i}");
        let body = vec![i + 1; 300_000];
        let mut f = fs::File::create(c.mnt(1).join(&name)).unwrap();
        // Written, not yet committed: node 2 will find the file empty.
        f.write_all(&body).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let there = c.mnt(2).join(&name);
        let stat = std::thread::spawn(move || fs::metadata(there).map(|m| m.len()));
        // Node 2's lookup has read the view (size 0) and is being held; the fsync's change
        // reaches node 2 before its reply does.
        std::thread::sleep(Duration::from_millis(200));
        f.sync_all().unwrap();
        stat.join().unwrap().unwrap();
        let got = read(&c.mnt(2).join(&name)).unwrap();
        assert!(
            got == body,
            "round {i}: node 2's open after node 1's fsync read {} bytes, not the {} written",
            got.len(),
            body.len()
        );
    }
}

/// A node far behind catches up by snapshot even over a link that takes 3 s per snapshot
/// chunk (the fault knob): each chunk gets openraft's 30 s install timeout, not the 2 s of an
/// ordinary call, after which it was sent again forever.
#[test]
fn a_lagging_node_catches_up_by_a_slow_snapshot() {
    let c = LocalCluster::up_with_env(
        3,
        &[
            ("SHOAL_SNAPSHOT_EVERY", "50"),
            ("SHOAL_FAULT_SLOW_SNAPSHOT", "3:3000"),
        ],
    );
    let leader = c.leader(1).expect("a leader") as u32;
    let writer = (1..=2).find(|k| *k != 3).unwrap_or(leader);
    c.kill9(3);
    for i in 0..150u32 {
        fs::write(c.mnt(writer).join(format!("s{i}")), i.to_le_bytes()).unwrap();
    }
    c.local_up(3);
    eventually_within(
        "node 3 reads every file written while it was down",
        Duration::from_secs(90),
        || {
            (0..150u32).all(|i| {
                read(&c.mnt(3).join(format!("s{i}"))).is_some_and(|b| b == i.to_le_bytes())
            })
        },
    );
    let log = fs::read_to_string(c.node(3).join("daemon.log")).unwrap_or_default();
    assert!(
        log.contains("installed a snapshot from the leader"),
        "node 3 caught up without a snapshot: the test did not test what it says"
    );
}

/// A node joining a cluster far ahead of it (more than openraft's lag threshold of 5,000
/// entries, the log compacted) gets a snapshot before the leader answers its `AddMember`. A
/// snapshot slower than an ordinary call (2 s), or than the 30 s a snapshot chunk had, made
/// every join of a large cluster fail (seen at a million files: 87 MB, 30 to 40 s to install).
/// Writers on the two members go on meanwhile.
#[test]
fn a_node_joins_while_a_slow_snapshot_catches_it_up_and_writers_go_on() {
    let c = LocalCluster::up_with_env(
        2,
        &[
            ("SHOAL_SNAPSHOT_EVERY", "500"),
            // Past the 30 s a snapshot chunk's send was given, as installing a million
            // files' snapshot takes.
            ("SHOAL_FAULT_SLOW_SNAPSHOT", "3:31000"),
        ],
    );
    const EMPTY: u32 = 6_000;
    let creators: Vec<_> = (0..4u32)
        .map(|t| {
            let mnt = c.mnt(1 + t % 2);
            std::thread::spawn(move || {
                for i in (t..EMPTY).step_by(4) {
                    fs::File::create(mnt.join(format!("e{i}"))).unwrap();
                }
            })
        })
        .collect();
    for t in creators {
        t.join().unwrap();
    }
    for i in 0..150u32 {
        fs::write(c.mnt(1 + i % 2).join(format!("s{i}")), i.to_le_bytes()).unwrap();
    }
    // Several snapshot intervals (500 entries) of writes while node 3 installs: the leader
    // snapshots again meanwhile, but keeps the log after the snapshot it is sending, so node 3
    // goes on from the log once installed. (It used to find that log purged, be sent the next
    // snapshot, and chase snapshots for as long as the writers outpaced its 31 s installs.)
    const DURING: u32 = 400;
    let writers: Vec<_> = (1..=2u32)
        .map(|k| {
            let mnt = c.mnt(k);
            std::thread::spawn(move || {
                for n in 0..DURING {
                    fs::write(mnt.join(format!("during-{k}-{n}")), n.to_le_bytes()).unwrap();
                    std::thread::sleep(Duration::from_millis(50));
                }
                DURING
            })
        })
        .collect();
    c.local_up(3);
    let written: Vec<u32> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let log = fs::read_to_string(c.node(3).join("daemon.log")).unwrap_or_default();
    let installs = log.matches("installed a snapshot from the leader").count();
    assert!(
        installs >= 1,
        "node 3 caught up without a snapshot: the test did not test what it says"
    );
    assert_eq!(
        installs, 1,
        "node 3 was sent a second snapshot: the log after the first was purged under it"
    );
    // The snapshot node 3 installed, and the leader's latest: two intervals or more apart,
    // so the leader's count rule alone (25 entries kept) would have purged past the first.
    let installed: u64 = log
        .lines()
        .find(|l| l.contains("installed a snapshot from the leader"))
        .and_then(|l| l.split("index: ").nth(1))
        .and_then(|rest| rest.split(|ch: char| !ch.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .expect("the install names its last index");
    let leader = c.leader(1).expect("a leader") as u32;
    let latest = status(&c, leader)
        .and_then(|s| s["snapshot"].as_u64())
        .expect("the leader has a snapshot");
    assert!(
        latest >= installed + 1000,
        "the leader snapshotted again while node 3 installed: {installed} then {latest}"
    );
    assert!(
        node_ls(&c, 1).iter().any(|m| m["id"] == 3),
        "node 3 is a member"
    );
    eventually_within("node 3 reads every file", Duration::from_secs(60), || {
        fs::read_dir(c.mnt(3)).map_or(0, |d| d.count()) as u32 >= EMPTY + 150
            && (0..150u32).all(|i| {
                read(&c.mnt(3).join(format!("s{i}"))).is_some_and(|b| b == i.to_le_bytes())
            })
            && (1..=2u32).all(|k| {
                (0..written[k as usize - 1]).all(|n| {
                    read(&c.mnt(3).join(format!("during-{k}-{n}")))
                        .is_some_and(|b| b == n.to_le_bytes())
                })
            })
    });
}

#[test]
fn node_certificates_are_renewed_before_they_expire() {
    // Certificates valid 20 s, renewed after 10 s: by 25 s every first certificate has expired,
    // and the newest ones have 15 s left, time enough for a restart on a loaded machine.
    let c = LocalCluster::up_with_env(3, &[("SHOAL_CERT_VALIDITY_SECS", "20")]);
    fs::write(c.mnt(1).join("early"), b"1").unwrap();
    std::thread::sleep(Duration::from_secs(25));
    // A restarted node makes new TLS handshakes with its saved certificate, against the others'
    // current ones: all must be renewed for it to rejoin.
    let pid = rustix::process::Pid::from_raw(c.pid(2)).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    eventually("node 2 stops", || {
        rustix::process::test_kill_process(pid).is_err()
    });
    c.local_up(3);
    fs::write(c.mnt(2).join("late"), b"2").unwrap();
    eventually("a write through the restarted node", || {
        read(&c.mnt(3).join("late")).as_deref() == Some(b"2")
    });
    assert_eq!(read(&c.mnt(2).join("early")).unwrap(), b"1");
}

/// One call of Docker's volume plugin protocol on node `k`'s plugin socket.
pub(crate) fn plugin(
    c: &LocalCluster,
    k: u32,
    call: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(c.node(k).join("plugin.sock")).unwrap();
    let body = body.to_string();
    // One write: the server answers calls that take no body (Activate, List) as soon as it has
    // the headers and closes, and a body sent in a second write would then meet EPIPE.
    let request = format!(
        "POST /{call} HTTP/1.1\r\nHost: plugin\r\nContent-Type: application/vnd.docker.plugins.v1.2+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{out}");
    serde_json::from_str(body).unwrap()
}

pub(crate) fn plugin_err(v: &serde_json::Value) -> &str {
    v["Err"].as_str().unwrap_or("")
}

/// The Docker volume plugin protocol, spoken to the daemons' sockets as Docker would: one
/// volume for the whole cluster, mounts recorded per node, no removal while mounted, and a
/// trash that keeps the bytes and refuses to hand out an empty volume under the same name.
#[test]
fn the_volume_plugin_serves_one_volume_cluster_wide_and_never_loses_it() {
    use serde_json::json;
    let c = LocalCluster::up(3);
    assert_eq!(
        plugin(&c, 1, "Plugin.Activate", json!({}))["Implements"],
        json!(["VolumeDriver"])
    );
    assert_eq!(
        plugin(&c, 2, "VolumeDriver.Capabilities", json!({}))["Capabilities"]["Scope"],
        "global"
    );
    // Docker asks Get first and creates only after an error.
    let got = plugin(&c, 1, "VolumeDriver.Get", json!({"Name": "data"}));
    assert!(plugin_err(&got).contains("no such volume"), "{got}");
    let made = plugin(
        &c,
        1,
        "VolumeDriver.Create",
        json!({"Name": "data", "Opts": {"replicas": "2", "size": "1GiB"}}),
    );
    assert_eq!(plugin_err(&made), "", "{made}");
    for (opts, says) in [
        (json!({"frob": "1"}), "unknown option"),
        (json!({"replicas": "0"}), "replicas"),
        (json!({"size": "lots"}), "size"),
        (
            json!({"size": "99999999999999999999TiB"}),
            "larger than a volume can be",
        ),
        (json!({"placement": "ssd"}), "placement rule"),
    ] {
        let r = plugin(
            &c,
            1,
            "VolumeDriver.Create",
            json!({"Name": "x", "Opts": opts}),
        );
        assert!(plugin_err(&r).contains(says), "{r}");
    }
    let r = plugin(&c, 1, "VolumeDriver.Create", json!({"Name": "../x"}));
    assert!(plugin_err(&r).contains("invalid volume name"), "{r}");

    // Node 2 sees it at once, mounts it, and writes; node 3 reads the bytes.
    let got = plugin(&c, 2, "VolumeDriver.Get", json!({"Name": "data"}));
    assert_eq!(got["Volume"]["Status"]["replicas"], 2, "{got}");
    let mounted = plugin(
        &c,
        2,
        "VolumeDriver.Mount",
        json!({"Name": "data", "ID": "c1"}),
    );
    let path = PathBuf::from(mounted["Mountpoint"].as_str().unwrap());
    assert_eq!(path, c.mnt(2).join("volumes/data"));
    fs::write(path.join("f"), b"kept").unwrap();
    assert_eq!(read(&c.mnt(3).join("volumes/data/f")).unwrap(), b"kept");
    let listed = plugin(&c, 3, "VolumeDriver.List", json!({}));
    assert_eq!(listed["Volumes"][0]["Name"], "data", "{listed}");

    // Not removable while node 2 has it mounted; the refusal names the host and the node.
    let r = plugin(&c, 3, "VolumeDriver.Remove", json!({"Name": "data"}));
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    assert!(
        plugin_err(&r).contains(&format!("in use on {host} (node 2, 127.0.0.1:")),
        "{r}"
    );
    let r = plugin(
        &c,
        2,
        "VolumeDriver.Unmount",
        json!({"Name": "data", "ID": "c1"}),
    );
    assert_eq!(plugin_err(&r), "", "{r}");
    let r = plugin(&c, 3, "VolumeDriver.Remove", json!({"Name": "data"}));
    assert_eq!(plugin_err(&r), "", "{r}");

    // Removed: gone for Docker, and its name is free at once (`docker compose down -v && up`):
    // Create makes a new, empty volume, while the old one's bytes wait in the trash.
    let got = plugin(&c, 1, "VolumeDriver.Get", json!({"Name": "data"}));
    assert!(plugin_err(&got).contains("no such volume"), "{got}");
    let r = plugin(&c, 1, "VolumeDriver.Create", json!({"Name": "data"}));
    assert_eq!(plugin_err(&r), "", "{r}");
    assert!(
        fs::read_dir(c.mnt(2).join("volumes/data"))
            .unwrap()
            .next()
            .is_none()
    );
    fs::write(c.mnt(1).join("volumes/data/g"), b"second").unwrap();
    let ls = |k| -> serde_json::Value {
        let out = c.shoal_at(k, &["volume", "ls", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let trashed: Vec<serde_json::Value> = ls(3)
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["state"] == "trash")
        .cloned()
        .collect();
    assert_eq!(trashed.len(), 1, "{trashed:?}");
    let first_id = trashed[0]["id"].as_u64().unwrap();
    // While the new one holds the name, a restore under it is refused, naming --as.
    let out = c.shoal_at(2, &["volume", "restore", "data"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--as NEW"),
        "{out:?}"
    );
    // A second generation in the trash: purge must be told which.
    assert!(c.shoal_at(2, &["volume", "rm", "data"]).status.success());
    let out = c.shoal_at(1, &["volume", "purge", "data"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("several removed volumes") && said.contains("--id"),
        "{out:?}"
    );
    // The newest comes back by default; --id and --as bring back the first under another name.
    assert!(
        c.shoal_at(1, &["volume", "restore", "data"])
            .status
            .success()
    );
    assert_eq!(read(&c.mnt(3).join("volumes/data/g")).unwrap(), b"second");
    let id = first_id.to_string();
    let out = c.shoal_at(
        1,
        &["volume", "restore", "data", "--id", &id, "--as", "data-old"],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(read(&c.mnt(2).join("volumes/data-old/f")).unwrap(), b"kept");
    let got = plugin(&c, 3, "VolumeDriver.Get", json!({"Name": "data-old"}));
    assert_eq!(plugin_err(&got), "", "{got}");

    // Purge only from the trash; a purged volume's files are gone.
    let out = c.shoal_at(1, &["volume", "purge", "data-old"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not in the trash"),
        "{out:?}"
    );
    assert!(
        c.shoal_at(2, &["volume", "rm", "data-old"])
            .status
            .success()
    );
    assert!(
        c.shoal_at(2, &["volume", "purge", "data-old"])
            .status
            .success()
    );
    assert!(
        ls(3)
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["name"] != "data-old")
    );
    assert_eq!(
        ls(1).as_array().unwrap().len(),
        1,
        "only the live data is left"
    );
}

/// Volume policies: placement and replicas decide where blocks go, a quota is enforced at
/// write() and shown by statfs, names do not cross volumes, a clone shares blocks, inspect
/// counts mounts per node, and the trash empties itself after the retention.
#[test]
fn volume_policies_quotas_clones_and_the_trash_retention() {
    use serde_json::json;
    let c = LocalCluster::up(4);
    let ok = |k: u32, args: &[&str]| {
        let out = c.shoal_at(k, args);
        assert!(out.status.success(), "shoal {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(1, &["node", "label", "add", "2", "storage=ssd"]);
    ok(1, &["node", "label", "add", "3", "storage=ssd"]);
    let fast = |replicas: &str| {
        c.shoal_at(
            1,
            &[
                "volume",
                "create",
                "fast",
                "-o",
                "placement=storage==ssd",
                "-o",
                replicas,
            ],
        )
    };
    let out = fast("replicas=3");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("replicas=3 but the cluster has 2 node(s) matching placement=storage==ssd"),
        "{out:?}"
    );
    let out = fast("replicas=2");
    assert!(out.status.success(), "{out:?}");

    // Written through node 1, which has no ssd label: the blocks go to nodes 2 and 3, and
    // none to node 4 (with the default policy node 4 would hold three blocks in four).
    let data: Vec<u8> = (0..12_000_000u32).map(|i| (i % 233) as u8).collect();
    fs::write(c.mnt(1).join("volumes/fast/f"), &data).unwrap();
    let written = block_files(&c.data(1));
    assert!(written.len() >= 3, "a 12 MB file is several blocks");
    for k in [2, 3] {
        assert!(
            written.is_subset(&block_files(&c.data(k))),
            "node {k} lacks blocks"
        );
    }
    assert!(
        written.is_disjoint(&block_files(&c.data(4))),
        "node 4 got blocks of an ssd-only volume"
    );
    // Repair keeps to the policy too: node 1's own copies are dropped once nodes 2 and 3
    // confirm they hold them, and node 4 still holds none.
    eventually_within(
        "the writer drops the copies its placement excludes",
        Duration::from_secs(30),
        || written.is_disjoint(&block_files(&c.data(1))),
    );
    assert!(
        written.is_disjoint(&block_files(&c.data(4))),
        "repair copied blocks to node 4"
    );
    for k in [2, 3] {
        assert!(
            written.is_subset(&block_files(&c.data(k))),
            "node {k} lost blocks"
        );
    }
    assert_eq!(read(&c.mnt(1).join("volumes/fast/f")).unwrap(), data);

    // A clone is instant and shares the blocks: no new block anywhere.
    let before: usize = (1..=4).map(|k| block_files(&c.data(k)).len()).sum();
    ok(2, &["volume", "create", "copy", "-o", "from=fast"]);
    assert_eq!(read(&c.mnt(4).join("volumes/copy/f")).unwrap(), data);
    let after: usize = (1..=4).map(|k| block_files(&c.data(k)).len()).sum();
    assert_eq!(before, after);
    fs::write(c.mnt(3).join("volumes/copy/f"), b"changed").unwrap();
    assert_eq!(
        read(&c.mnt(1).join("volumes/fast/f")).unwrap(),
        data,
        "the source is untouched"
    );

    // Quota: write() past it fails with EDQUOT; statfs shows the quota; nothing else is hit.
    ok(1, &["volume", "create", "small", "-o", "size=1MiB"]);
    let q = c.mnt(2).join("volumes/small");
    use std::io::Write;
    let mut f = fs::File::create(q.join("big")).unwrap();
    let chunk = vec![7u8; 64 << 10];
    let mut written = 0usize;
    let err = loop {
        match f.write(&chunk) {
            Ok(n) => written += n,
            Err(e) => break e,
        }
        assert!(
            written <= 2 << 20,
            "wrote {written} bytes into a 1 MiB volume"
        );
    };
    assert_eq!(err.raw_os_error(), Some(libc::EDQUOT), "{err}");
    assert_eq!(written, 1 << 20);
    drop(f);
    let st = rustix::fs::statvfs(&q).unwrap();
    assert_eq!(st.f_blocks * st.f_frsize, 1 << 20);
    assert_eq!(st.f_bavail, 0);
    let free_elsewhere = rustix::fs::statvfs(c.mnt(2).join("volumes/fast")).unwrap();
    assert!(free_elsewhere.f_blocks * free_elsewhere.f_frsize > 1 << 30);
    let cross = fs::rename(c.mnt(2).join("volumes/fast/f"), q.join("f")).unwrap_err();
    assert_eq!(cross.raw_os_error(), Some(libc::EXDEV), "{cross}");
    let info: serde_json::Value =
        serde_json::from_str(&ok(3, &["volume", "inspect", "small"])).unwrap();
    assert_eq!(
        (info["used"].clone(), info["quota"].clone()),
        (json!(1 << 20), json!(1 << 20))
    );

    // Mount counts per node.
    for id in ["m1", "m2"] {
        let r = plugin(
            &c,
            2,
            "VolumeDriver.Mount",
            json!({"Name": "small", "ID": id}),
        );
        assert_eq!(plugin_err(&r), "", "{r}");
    }
    let info: serde_json::Value =
        serde_json::from_str(&ok(1, &["volume", "inspect", "small"])).unwrap();
    assert_eq!(info["mounts"][0]["node"], 2, "{info}");
    assert_eq!(info["mounts"][0]["count"], 2, "{info}");
    assert_eq!(info["mounts"].as_array().map(Vec::len), Some(1), "{info}");
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    assert!(
        info["mounts"][0]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with(&format!("{host} (node 2, 127.0.0.1:"))),
        "{info}"
    );
    // Mounts Docker never took back (the node's containers are gone) can be forgotten.
    let out = c.shoal_at(1, &["volume", "forget-mounts", "--node", "9"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a member"),
        "{out:?}"
    );
    ok(1, &["volume", "forget-mounts", "--node", "2"]);
    let info: serde_json::Value =
        serde_json::from_str(&ok(1, &["volume", "inspect", "small"])).unwrap();
    assert_eq!(info["mounts"], json!([]), "{info}");

    // Retention: removed volumes are purged by the leader once their time is up.
    assert!(ok(1, &["volume", "retention"]).contains("1day"));
    assert!(ok(1, &["volume", "retention", "0s"]).contains("0s"));
    ok(4, &["volume", "rm", "copy"]);
    eventually_within(
        "the expired volume is purged",
        Duration::from_secs(30),
        || !ok(1, &["volume", "ls"]).contains("copy"),
    );
    assert!(fs::metadata(c.mnt(1).join("volumes/fast/f")).is_ok());
}

/// An fsync promises each block on two nodes (when the policy asks for two or more): if no
/// other node can take a copy, it fails and keeps the data, and succeeds once one can. Here
/// the only node a volume's placement allows is down while the writer, which the placement
/// excludes, fsyncs two files at once; Raft still has its quorum.
#[test]
fn an_fsync_fails_rather_than_promise_a_copy_no_other_node_took_and_keeps_the_data() {
    use std::io::Write;
    let c = LocalCluster::up(3);
    let ok = |k: u32, args: &[&str]| {
        let out = c.shoal_at(k, args);
        assert!(out.status.success(), "shoal {args:?}: {out:?}");
    };
    ok(1, &["node", "label", "add", "2", "zone=a"]);
    ok(
        1,
        &[
            "volume",
            "create",
            "pinned",
            "-o",
            "placement=zone==a",
            "-o",
            "replicas=1",
        ],
    );
    let leader = c.leader(1).expect("a leader");
    assert_ne!(
        leader, 2,
        "node 2 leads; the test wants it to be a follower"
    );
    c.kill9(2);
    let body = |k: u32| -> Vec<u8> {
        (0..3_000_000u32)
            .map(|j| ((j * 13 + k) % 241) as u8)
            .collect()
    };
    let mut files: Vec<fs::File> = (0..2)
        .map(|k| fs::File::create(c.mnt(1).join(format!("volumes/pinned/f{k}"))).unwrap())
        .collect();
    let results: Vec<std::io::Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter_mut()
            .enumerate()
            .map(|(k, f)| {
                s.spawn(move || {
                    f.write_all(&body(k as u32))?;
                    f.sync_all()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        let e = r
            .as_ref()
            .expect_err("an fsync returned with its blocks on one node only");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    }
    let log = fs::read_to_string(c.node(1).join("daemon.log")).unwrap();
    assert!(
        log.contains("no other node took a copy"),
        "the log says why"
    );

    // Node 2 comes back. As on Linux, an fsync first reports a failure of the background
    // commits since the last one (those went on while node 2 was down); the one after that
    // succeeds with everything written.
    c.local_up(3);
    for f in &files {
        if let Err(e) = f.sync_all() {
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
            f.sync_all().unwrap();
        }
    }
    drop(files);
    for k in 0..2u32 {
        assert_eq!(
            read(&c.mnt(3).join(format!("volumes/pinned/f{k}"))).unwrap(),
            body(k),
            "f{k} read on node 3"
        );
    }
    let on_2 = block_files(&c.data(2));
    let of_files = block_files(&c.data(1));
    assert!(
        of_files.iter().filter(|b| on_2.contains(*b)).count() >= 2,
        "node 2, the one the placement allows, holds the files' blocks"
    );
}

/// `shoal fsck` reads every referenced block on every node: it finds copies damaged on disk
/// (which the background repair, looking only at which files exist, does not see) and lost
/// blocks, while another node keeps writing; `--repair` puts good copies back.
#[test]
fn fsck_finds_damaged_copies_and_lost_blocks_and_repairs_what_it_can() {
    use std::io::Write;
    let c = LocalCluster::up(3);
    let body = |k: u32| -> Vec<u8> {
        (0..2_500_000u32)
            .map(|j| ((j * 7 + k * 3) % 239) as u8)
            .collect()
    };
    for k in 0..4u32 {
        let mut f = fs::File::create(c.mnt(1).join(format!("f{k}"))).unwrap();
        f.write_all(&body(k)).unwrap();
        f.sync_all().unwrap();
    }
    let fsck = |args: &[&str]| {
        let out = c.shoal_at(1, args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, said) = fsck(&["fsck"]);
    assert!(
        ok && said.contains("with every copy in place, 0 short of copies, 0 lost"),
        "{said}"
    );

    // Flip a byte in two of node 2's block files, while node 3 keeps writing.
    let victims: Vec<String> = block_files(&c.data(2)).into_iter().take(2).collect();
    for name in &victims {
        let path = c.data(2).join("blocks").join(&name[..2]).join(name);
        let mut bytes = fs::read(&path).unwrap();
        bytes[100] ^= 1;
        fs::write(&path, bytes).unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, m3) = (stop.clone(), c.mnt(3));
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut f = fs::File::create(m3.join(format!("w{n}"))).unwrap();
                f.write_all(&vec![n as u8; 300_000]).unwrap();
                f.sync_all().unwrap();
                n += 1;
            }
            n
        })
    };
    let (ok, said) = fsck(&["fsck"]);
    eprintln!("fsck with two copies damaged on node 2:\n{said}");
    assert!(!ok, "{said}");
    for name in &victims {
        assert!(
            said.contains(&format!("block {name}: missing or damaged on node 2")),
            "{said}"
        );
    }
    assert!(said.contains("fsck --repair"), "{said}");
    let (ok, said) = fsck(&["fsck", "--repair"]);
    assert!(ok, "{said}");
    let (ok, said) = fsck(&["fsck"]);
    assert!(ok && said.contains("0 short of copies, 0 lost"), "{said}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(writer.join().unwrap() > 0);

    // A block damaged on every node is lost: fsck says so, and repair cannot help.
    let lost = victims[0].clone();
    for k in 1..=3 {
        let path = c.data(k).join("blocks").join(&lost[..2]).join(&lost);
        let mut bytes = fs::read(&path).unwrap();
        bytes[200] ^= 1;
        fs::write(&path, bytes).unwrap();
    }
    let (ok, said) = fsck(&["fsck", "--repair"]);
    assert!(!ok, "{said}");
    assert!(said.contains(&format!("block {lost}: LOST")), "{said}");
    assert!(said.contains("restore its files from a backup"), "{said}");
}

/// A node whose data disk is short of space takes no more copies from the others (they go to
/// the next node) and keeps the room its Raft log needs: it stays a working member while two
/// other nodes write more than its disk holds.
#[test]
fn a_node_short_of_space_refuses_copies_and_keeps_room_for_its_log() {
    use std::io::Write;
    let c = LocalCluster::up_with_small_disk(3, 3, 300 << 20);
    let body = |w: u32, i: u32| -> Vec<u8> {
        (0..8_000_000u32)
            .map(|j| ((j ^ (w << 8 | i)) % 251) as u8)
            .collect()
    };
    std::thread::scope(|s| {
        for w in 1..=2u32 {
            let c = &c;
            s.spawn(move || {
                for i in 0..20u32 {
                    let path = c.mnt(w).join(format!("w{w}-{i}"));
                    let mut f = fs::File::create(&path).unwrap();
                    f.write_all(&body(w, i)).unwrap();
                    f.sync_all()
                        .unwrap_or_else(|e| panic!("fsync of w{w}-{i} on node {w}: {e}"));
                }
            });
        }
    });
    let st = rustix::fs::statvfs(c.data(3)).unwrap();
    let free = st.f_bavail * st.f_frsize;
    eprintln!(
        "node 3's 300 MiB disk after 320 MiB written elsewhere: {} MiB free",
        free >> 20
    );
    assert!(free >= 100 << 20, "node 3 kept only {} MiB", free >> 20);
    // Node 3 is still a member that works: it takes metadata and reads what the others wrote.
    fs::create_dir(c.mnt(3).join("still-here")).unwrap();
    assert!(c.mnt(1).join("still-here").is_dir());
    assert_eq!(read(&c.mnt(3).join("w2-19")).unwrap(), body(2, 19));
    let log = fs::read_to_string(c.node(3).join("daemon.log")).unwrap();
    assert!(
        log.contains("data disk is full"),
        "node 3 said why it refused"
    );
}

/// Space freed by deleting files comes back on every node that held a copy, not only on the
/// one whose collector ran first, and on a node that was down meanwhile once it returns.
#[test]
fn deleted_files_free_their_blocks_on_every_node_and_on_one_that_was_down() {
    let c = LocalCluster::up_with_env(3, &[("SHOAL_GC_GRACE", "1s")]);
    let data: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
    // Two writers at once, on nodes 1 and 2.
    std::thread::scope(|s| {
        for k in [1u32, 2] {
            let (c, data) = (&c, &data);
            s.spawn(move || {
                for i in 0..4 {
                    let mut body = data.clone();
                    body.extend_from_slice(format!("{k}-{i}").as_bytes());
                    let path = c.mnt(k).join(format!("f{k}-{i}"));
                    fs::write(&path, &body).unwrap();
                    fs::File::open(&path).unwrap().sync_all().unwrap();
                }
            });
        }
    });
    eventually("every node holding copies", || {
        (1..=3).all(|k| block_files(&c.data(k)).len() >= 8)
    });
    let held3 = block_files(&c.data(3));
    c.kill9(3);
    std::thread::scope(|s| {
        for k in [1u32, 2] {
            let c = &c;
            s.spawn(move || {
                for i in 0..4 {
                    fs::remove_file(c.mnt(k).join(format!("f{k}-{i}"))).unwrap();
                }
            });
        }
    });
    for k in [1, 2] {
        eventually_within(
            &format!("node {k}'s copies deleted"),
            Duration::from_secs(20),
            || block_files(&c.data(k)).is_empty(),
        );
    }
    // Node 3 was down: its copies wait on the garbage list, which is kept for it.
    assert_eq!(block_files(&c.data(3)), held3);
    c.local_up(3);
    eventually_within(
        "node 3's copies deleted once it is back",
        Duration::from_secs(30),
        || block_files(&c.data(3)).is_empty(),
    );
    // And the list is empty: a write of the same bytes is stored again, not skipped.
    fs::write(c.mnt(3).join("again"), &data).unwrap();
    assert_eq!(read(&c.mnt(1).join("again")).unwrap(), data);
}

/// A client node (`shoal join --client`), mounted with the mount helper, writes and fsyncs
/// while a storing node writes too: every block of its files is on two storing nodes when its
/// fsync returns, it holds no block itself (not even of the files it reads), it never votes,
/// and killing it loses nothing.
#[test]
fn a_client_node_writes_and_reads_but_stores_no_blocks_and_killing_it_loses_nothing() {
    let c = LocalCluster::up_with_env(3, &[("SHOAL_GC_GRACE", "1s")]);
    let client = c.dir.path().join("client");
    let (data, mnt) = (client.join("data"), client.join("mnt"));
    let token = fs::read_to_string(c.data(1).join("tls/join-token")).unwrap();
    let listen = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let succeeds = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let joined = succeeds(
        Command::new(shoal())
            .args(["join", "--client", "--data"])
            .arg(&data)
            .args(["--token", token.trim(), "--peer", &c.addr(1).to_string()])
            .args(["--listen", &listen]),
    );
    assert!(joined.contains("as client node"), "{joined}");
    fs::create_dir_all(&mnt).unwrap();
    succeeds(
        Command::new(shoal())
            .arg("mount")
            .arg(&data)
            .arg(&mnt)
            .args(["-o", "no_plugin"]),
    );
    // Unmounted, which stops its daemon, however the test ends.
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());

    let body = |i: u32| -> Vec<u8> {
        (0..2_500_000u32)
            .map(|j| ((i * 13 + j) % 241) as u8)
            .collect()
    };
    // The client and node 1 write at once.
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..3u32 {
                let mut f = fs::File::create(mnt.join(format!("c{i}"))).unwrap();
                std::io::Write::write_all(&mut f, &body(i)).unwrap();
                f.sync_all().unwrap();
            }
        });
        s.spawn(|| {
            for i in 0..3u32 {
                let mut f = fs::File::create(c.mnt(1).join(format!("s{i}"))).unwrap();
                std::io::Write::write_all(&mut f, &body(100 + i)).unwrap();
                f.sync_all().unwrap();
            }
        });
    });
    // Every block is on at least two storing nodes already.
    let held: Vec<std::collections::BTreeSet<String>> =
        (1..=3).map(|k| block_files(&c.data(k))).collect();
    let all: std::collections::BTreeSet<String> = held.iter().flatten().cloned().collect();
    assert!(
        all.len() >= 6,
        "both writers' files are several blocks: {}",
        all.len()
    );
    for b in &all {
        let copies = held.iter().filter(|h| h.contains(b)).count();
        assert!(copies >= 2, "block {b} is on {copies} storing node(s)");
    }
    // The client reads the storing node's files and its own.
    for i in 0..3u32 {
        assert_eq!(read(&mnt.join(format!("s{i}"))).unwrap(), body(100 + i));
        assert_eq!(read(&mnt.join(format!("c{i}"))).unwrap(), body(i));
    }
    assert!(
        block_files(&data).is_empty(),
        "the client holds no blocks: {:?}",
        block_files(&data)
    );
    let members = node_ls(&c, 1);
    let me = members
        .iter()
        .find(|m| m["role"] == "client")
        .unwrap_or_else(|| panic!("node ls shows a client: {members:?}"));
    assert_eq!(
        members
            .iter()
            .filter(|m| m["role"] == "voter" || m["role"] == "leader")
            .count(),
        3,
        "the three storing nodes vote, the client does not: {members:?}"
    );
    // Its labels are shoal's to set.
    let out = c.shoal_at(
        1,
        &["node", "label", "rm", &me["id"].to_string(), "shoal.client"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shoal's own"));

    // Killed: nothing it fsynced is lost.
    // The helper started the daemon in the background: find it by its command line.
    let pid: i32 = {
        let found = fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|pid| {
                fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
                    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                    cmd.contains(" daemon ") && cmd.contains(&format!("--data={}", data.display()))
                })
            });
        found.expect("the client's daemon is running")
    };
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    for i in 0..3u32 {
        assert_eq!(
            read(&c.mnt(2).join(format!("c{i}"))).unwrap(),
            body(i),
            "c{i}, fsynced on the client, read on node 2 after the client was killed"
        );
    }
    eventually_within(
        "fsck finds every copy in place",
        Duration::from_secs(30),
        || c.shoal_at(1, &["fsck"]).status.success(),
    );
    // With the client dead, garbage is still collected: it holds no copy to wait for.
    let before: std::collections::BTreeSet<String> =
        (1..=3).flat_map(|k| block_files(&c.data(k))).collect();
    for i in 0..3u32 {
        fs::remove_file(c.mnt(1).join(format!("s{i}"))).unwrap();
    }
    let garbage = || {
        let out = c.shoal_at(1, &["status", "--json"]);
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        s["garbage_blocks"].as_u64().unwrap()
    };
    eventually_within(
        "the deleted files' blocks are collected on every storing node and forgotten",
        Duration::from_secs(60),
        || {
            let after: std::collections::BTreeSet<String> =
                (1..=3).flat_map(|k| block_files(&c.data(k))).collect();
            after.len() < before.len() && after.is_subset(&before) && garbage() == 0
        },
    );
}
