//! Crash tests at the failpoints of `shoal_raft::failpoint`: each arms one durability edge in a
//! running cluster while several nodes write at once, waits until the armed node dies there
//! (SIGKILL), starts it again, and checks what survived: every file whose fsync returned, no
//! file holding bytes it was never given, each operation applied once, the same tree on every
//! node, and `shoal fsck` clean.
//!
//! `cargo test --release -p shoal-fs --features failpoints --test failpoints` (root, /dev/fuse).

#[allow(dead_code)]
#[path = "../it/local_cluster.rs"]
mod local_cluster;
#[allow(dead_code)]
#[path = "../it/testkit.rs"]
mod testkit;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use local_cluster::{LocalCluster, eventually_within};
use testkit::{Daemon, shoal};

/// Arms failpoint `name` in the daemon whose data directory is `data`.
fn arm(data: &Path, name: &str, actions: &str) {
    let out = Command::new(shoal())
        .args(["debug", "failpoint", name, actions, "--data"])
        .arg(data)
        .output()
        .unwrap();
    // A point on a busy path can fire before the daemon answers: it is dead then, and its
    // answer is a closed connection (seen once in CI with `log-before-flush`). The callers
    // wait for that death next.
    let fired = String::from_utf8_lossy(&out.stderr).contains("connection closed");
    assert!(out.status.success() || fired, "arming {name}: {out:?}");
}

/// Waits until node `k` died at its failpoint.
fn wait_dead(c: &LocalCluster, k: u32, what: &str) {
    eventually_within(what, Duration::from_secs(60), || !c.alive(k));
}

/// The bytes a test file named `name` holds: 64 KiB to 1.1 MiB, from its name; 1 to 30 KiB
/// for the files of the spill test (`spill-…`), small enough to go inline.
fn body(name: &str) -> Vec<u8> {
    let h = blake3::hash(name.as_bytes());
    let r = u32::from_le_bytes(h.as_bytes()[..4].try_into().unwrap());
    let len = if name.starts_with("spill-") {
        1024 + r % (29 * 1024)
    } else {
        64 * 1024 + r % (1 << 20)
    };
    let mut out = vec![0u8; len as usize];
    blake3::Hasher::new()
        .update(name.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// Writes `body(name)` into a new file and fsyncs it and its directory.
fn write_synced(dir: &Path, name: &str) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir.join(name))?;
    f.write_all(&body(name))?;
    f.sync_all()?;
    fs::File::open(dir)?.sync_all()
}

/// A process on one node creating files with fsync, one after another, until stopped; it
/// records the files whose fsync returned, and every error it met.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    errors: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(mnt: PathBuf, prefix: &str) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (s, a, e, prefix) = (
            stop.clone(),
            acked.clone(),
            errors.clone(),
            prefix.to_string(),
        );
        let thread = std::thread::spawn(move || {
            let mut i = 0;
            while !s.load(Ordering::Relaxed) {
                let name = format!("{prefix}-{i:05}");
                i += 1;
                match write_synced(&mnt, &name) {
                    Ok(()) => a.lock().unwrap().push(name),
                    Err(err) => {
                        e.lock().unwrap().push(format!("{name}: {err}"));
                        // The node's mount died with it: nothing more to do on it. (Going
                        // on would write into the bare directory under the mount point while
                        // the node restarts, which the new mount then hides.)
                        if matches!(
                            err.raw_os_error(),
                            Some(libc::ENOTCONN | libc::ECONNABORTED)
                        ) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        });
        Writer {
            stop,
            acked,
            errors,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Stops the writer; the files it acknowledged and the errors it met.
    fn finish(mut self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        let acked = std::mem::take(&mut *self.acked.lock().unwrap());
        let errors = std::mem::take(&mut *self.errors.lock().unwrap());
        (acked, errors)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Every entry's name and size under node `k`'s mount (contents are checked file by file).
fn tree(c: &LocalCluster, k: u32) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(rd) = fs::read_dir(c.mnt(k)) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let what = match fs::metadata(e.path()) {
            Ok(m) if m.is_dir() => "dir".to_string(),
            Ok(m) => m.len().to_string(),
            Err(err) => format!("unreadable: {err}"),
        };
        out.insert(name, what);
    }
    out
}

/// After the crash and the restart: every acknowledged file whole on every node, every other
/// file a prefix of what was written to it (a commit cut by the crash lands whole or not at
/// all, and a file's earlier commits stay), the same tree on all three nodes, fsck clean.
fn check_recovered(c: &LocalCluster, acked: &[String]) {
    // Each file is read until it is right or the time is up (a restarted node may still be
    // catching up), then never again: reading them all on every try took longer than the
    // limit on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(60);
    for k in 1..=3 {
        for name in acked {
            let path = c.mnt(k).join(name);
            let want = body(name);
            loop {
                let got = fs::read(&path);
                if got.as_deref().ok() == Some(&want[..]) {
                    break;
                }
                if Instant::now() > deadline {
                    let what = match got {
                        Ok(b) => format!("{} bytes, not the {} written", b.len(), want.len()),
                        Err(e) => e.to_string(),
                    };
                    panic!("{name}, acknowledged, on node {k}: {what}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    for e in fs::read_dir(c.mnt(1)).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().is_dir() {
            continue;
        }
        let bytes = fs::read(e.path()).unwrap();
        assert!(
            body(&name).starts_with(&bytes),
            "{name} holds {} bytes that were never written to it",
            bytes.len()
        );
    }
    eventually_within(
        "the same tree on every node",
        Duration::from_secs(30),
        || {
            let one = tree(c, 1);
            tree(c, 2) == one && tree(c, 3) == one
        },
    );
    fsck_clean(c);
}

/// `shoal fsck` through node 1 passes (repair may need a few rounds after a restart).
fn fsck_clean(c: &LocalCluster) -> String {
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let out = c.shoal_at(1, &["fsck"]);
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            assert!(last.contains("0 short of copies, 0 lost"), "{last}");
            return last;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("fsck never came out clean:\n{last}");
}

/// The files in node `k`'s block store's temp directory.
fn tmp_files(c: &LocalCluster, k: u32) -> Vec<PathBuf> {
    fs::read_dir(c.data(k).join("blocks/tmp"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The node that leads, as node `k` sees it.
fn leader(c: &LocalCluster, k: u32) -> u32 {
    let mut id = None;
    eventually_within("a leader", Duration::from_secs(20), || {
        id = c.leader(k);
        id.is_some()
    });
    id.unwrap() as u32
}

/// Starts the writers on `nodes`, arms `point` on `victim`, waits for it to die there, lets
/// the others go on for a moment, restarts it, and stops the writers: what they acknowledged.
fn crash_under_writers(c: &LocalCluster, nodes: &[u32], victim: u32, point: &str) -> Vec<String> {
    // Names of their own for each call: a test may crash the same node at the same point twice.
    let run = rand::random::<u16>();
    let writers: Vec<Writer> = nodes
        .iter()
        .map(|k| Writer::start(c.mnt(*k), &format!("{point}-v{victim}-{run}-w{k}")))
        .collect();
    eventually_within("the writers under way", Duration::from_secs(20), || {
        writers.iter().all(|w| w.acked() >= 2)
    });
    arm(&c.data(victim), point, "return");
    wait_dead(c, victim, &format!("node {victim} dying at {point}"));
    // What the crash left half-written, which the restart must remove (new temp files come
    // and go there as soon as it takes copies again).
    let leftovers = tmp_files(c, victim);
    if point.starts_with("block-") {
        assert!(
            !leftovers.is_empty(),
            "{point}: no temp block file at the crash"
        );
    }
    // The survivors keep writing without it.
    let survivors: Vec<&Writer> = nodes
        .iter()
        .zip(&writers)
        .filter(|(k, _)| **k != victim)
        .map(|(_, w)| w)
        .collect();
    let before: Vec<usize> = survivors.iter().map(|w| w.acked()).collect();
    eventually_within(
        "writes going on without the dead node",
        Duration::from_secs(30),
        || {
            survivors
                .iter()
                .zip(&before)
                .all(|(w, b)| w.acked() >= b + 2)
        },
    );
    c.local_up(3);
    let kept: Vec<&PathBuf> = leftovers.iter().filter(|p| p.exists()).collect();
    assert!(
        kept.is_empty(),
        "node {victim} kept temp files of its crash: {kept:?}"
    );
    let mut acked = Vec::new();
    for (k, w) in nodes.iter().zip(writers) {
        let (a, errors) = w.finish();
        if *k != victim {
            // A survivor may see an election go by, never lose its mount.
            assert!(
                errors.iter().all(|e| !e.contains("not connected")),
                "node {k}: {errors:?}"
            );
        }
        eprintln!(
            "node {k}: {} files acknowledged, errors {errors:?}",
            a.len()
        );
        acked.extend(a);
    }
    acked
}

#[test]
fn a_node_killed_while_storing_a_block_keeps_every_fsynced_file() {
    let c = LocalCluster::up(3);
    // Node 1 dies writing its own block; then node 2 dies storing a copy node 3 pushed.
    let mut acked = crash_under_writers(&c, &[1, 3], 1, "block-before-sync");
    acked.extend(crash_under_writers(&c, &[3, 1], 2, "block-after-sync"));
    check_recovered(&c, &acked);
}

#[test]
fn a_crash_between_pushing_blocks_and_proposing_the_layout_leaves_only_unreferenced_blocks() {
    let c = LocalCluster::up(3);
    let acked = crash_under_writers(&c, &[1, 2], 1, "commit-before-propose");
    check_recovered(&c, &acked);
    // The cut commit's blocks are on disk, named by no file; fsck counts them, and a commit
    // of the same bytes names them again.
    let out = fsck_clean(&c);
    assert!(
        out.contains("younger than a minute") || !out.contains("0 unreferenced blocks found"),
        "fsck does not count the cut commit's blocks:\n{out}"
    );
    let names: Vec<String> = fs::read_dir(c.mnt(1))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.starts_with("commit-before-propose-v1-") && n.contains("-w1-") && !acked.contains(n)
        })
        .collect();
    assert!(!names.is_empty(), "node 1 left no file cut by its crash");
    for name in &names {
        fs::write(c.mnt(1).join(name), body(name)).unwrap();
        let f = fs::File::open(c.mnt(1).join(name)).unwrap();
        f.sync_all().unwrap();
        assert_eq!(fs::read(c.mnt(3).join(name)).unwrap(), body(name));
    }
    let mut all = acked.clone();
    all.extend(names);
    check_recovered(&c, &all);
}

#[test]
fn a_leader_killed_while_writing_out_small_commits_loses_none_and_the_next_one_writes_them_out() {
    let c = LocalCluster::up(3);
    let l = leader(&c, 1);
    let followers: Vec<u32> = (1..=3).filter(|k| *k != l).collect();
    // Small files go inline; the leader dies with their blocks written out and copied, the
    // `Spill` not yet proposed.
    let acked = crash_under_writers(&c, &followers, l, "spill-before-propose");
    check_recovered(&c, &acked);
    let inline = |k: u32| {
        let out = c.shoal_at(k, &["status", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|s| s["inline_bytes"].as_u64())
    };
    eventually_within(
        "every inline block written out",
        Duration::from_secs(60),
        || (1..=3).all(|k| inline(k) == Some(0)),
    );
    check_recovered(&c, &acked);
}

#[test]
fn a_leader_and_then_a_follower_killed_before_their_log_flush_lose_no_acknowledged_write() {
    let c = LocalCluster::up(3);
    let l = leader(&c, 1);
    let followers: Vec<u32> = (1..=3).filter(|k| *k != l).collect();
    let mut acked = crash_under_writers(&c, &followers, l, "log-before-flush");
    let l = leader(&c, 1);
    let f = (1..=3).find(|k| *k != l).unwrap();
    acked.extend(crash_under_writers(&c, &[1, 2, 3], f, "log-before-flush"));
    check_recovered(&c, &acked);
}

#[test]
fn a_leader_killed_between_apply_and_reply_applies_each_operation_once() {
    let c = LocalCluster::up(3);
    let l = leader(&c, 1);
    let followers: Vec<u32> = (1..=3).filter(|k| *k != l).collect();
    // Exclusive creates from both followers: a proposal applied by the dead leader and sent
    // again to the next one must answer as applied once, never EEXIST for a fresh name.
    let acked = crash_under_writers(&c, &followers, l, "apply-before-reply");
    check_recovered(&c, &acked);
    // And directories: made once each, through the new leader.
    for k in &followers {
        for i in 0..20 {
            fs::create_dir(c.mnt(*k).join(format!("d{k}-{i}"))).unwrap();
        }
    }
}

#[test]
fn crashes_while_building_and_installing_a_snapshot_recover() {
    let c = LocalCluster::up_with_env(3, &[("SHOAL_SNAPSHOT_EVERY", "50")]);
    // Node 1 dies building a snapshot of its state machine.
    let mut acked = crash_under_writers(&c, &[2, 3], 1, "snapshot-build");
    // Node 3 is down while the others move 50 entries on, and compact their logs: it can
    // catch up only by snapshot, and dies installing it.
    c.kill9(3);
    for i in 0..120 {
        let name = format!("while-3-down-{i:03}");
        write_synced(&c.mnt(2), &name).unwrap();
        acked.push(name);
    }
    let out = c.try_local_up(3, &[("SHOAL_FAILPOINTS", "snapshot-install=return")]);
    eprintln!(
        "local up with the install failpoint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_dead(&c, 3, "node 3 dying while it installs a snapshot");
    c.local_up(3);
    check_recovered(&c, &acked);
    write_synced(&c.mnt(3), "after-install").unwrap();
    assert_eq!(
        fs::read(c.mnt(1).join("after-install")).unwrap(),
        body("after-install")
    );
}

#[test]
fn repair_killed_before_storing_a_fetched_copy_fetches_it_again() {
    let c = LocalCluster::up(3);
    let mut acked = Vec::new();
    for i in 0..4 {
        let name = format!("repaired-{i}");
        write_synced(&c.mnt(1), &name).unwrap();
        acked.push(name);
    }
    fsck_clean(&c);
    // Node 2 loses a copy; its repair fetches it and dies before storing it.
    arm(&c.data(2), "repair-before-store", "return");
    let victim = block_files(&c.data(2))
        .into_iter()
        .next()
        .expect("node 2 holds blocks");
    fs::remove_file(&victim).unwrap();
    wait_dead(&c, 2, "node 2 dying in repair");
    assert!(!victim.exists());
    c.local_up(3);
    eventually_within(
        "the copy repaired on node 2",
        Duration::from_secs(30),
        || victim.exists(),
    );
    check_recovered(&c, &acked);
}

/// Block files in a data directory.
fn block_files(data: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for fan in fs::read_dir(data.join("blocks")).unwrap().flatten() {
        let name = fan.file_name().to_string_lossy().into_owned();
        if name.len() != 2 {
            continue;
        }
        for f in fs::read_dir(fan.path()).unwrap().flatten() {
            out.push(f.path());
        }
    }
    out.sort();
    out
}

#[test]
fn the_collector_killed_before_deleting_or_forgetting_finishes_after_a_restart() {
    let mut d = Daemon::start_with_env(&[("SHOAL_GC_GRACE", "1s")]);
    write_synced(&d.mnt(), "kept").unwrap();
    let kept = block_files(&d.data());
    for point in ["gc-before-delete", "gc-before-forget"] {
        let name = format!("freed-by-{point}");
        write_synced(&d.mnt(), &name).unwrap();
        assert!(block_files(&d.data()).len() > kept.len());
        arm(&d.data(), point, "return");
        fs::remove_file(d.mnt().join(&name)).unwrap();
        let status = d.wait_exit(Duration::from_secs(60));
        assert!(status.is_some(), "the daemon did not die at {point}");
        d.restart();
        let deadline = Instant::now() + Duration::from_secs(30);
        while block_files(&d.data()) != kept {
            assert!(
                Instant::now() < deadline,
                "the freed blocks were never collected after the crash at {point}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(fs::read(d.mnt().join("kept")).unwrap(), body("kept"));
    }
}

/// The threads of process `pid` waiting in the kernel on a FUSE invalidation.
fn threads_in_invalidation(pid: i32) -> usize {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            fs::read_to_string(t.path().join("wchan"))
                .is_ok_and(|w| w.contains("fuse_reverse_inval"))
        })
        .count()
}

/// A daemon killed while its invalidation thread waits for a directory lock that a request in
/// flight holds cannot finish dying: that thread stays in the kernel, the process a zombie
/// holding /dev/fuse and the data directory's lock, and the mount hangs. Starting the node
/// again must clear it (abort the dead connection), not hang or refuse the locked directory.
#[test]
fn a_daemon_killed_with_a_thread_stuck_on_its_own_mount_is_started_again() {
    let c = LocalCluster::up(3);
    fs::create_dir(c.mnt(1).join("d")).unwrap();
    write_synced(&c.mnt(1).join("d"), "before").unwrap();
    eventually_within("d on node 2", Duration::from_secs(10), || {
        c.mnt(2).join("d/before").exists()
    });
    // A mkdir in d on node 1 stays in the daemon: the kernel holds d's lock meanwhile.
    arm(&c.data(1), "fuse-mkdir", "pause");
    let mnt1 = c.mnt(1);
    let stuck = std::thread::spawn(move || fs::create_dir(mnt1.join("d/x")));
    std::thread::sleep(Duration::from_millis(300));
    // A name made in d by node 2 makes node 1 invalidate it, which waits for d's lock.
    write_synced(&c.mnt(2).join("d"), "from-2").unwrap();
    let pid = c.pid(1);
    eventually_within(
        "node 1's invalidation waiting for d's lock",
        Duration::from_secs(20),
        || threads_in_invalidation(pid) > 0,
    );
    c.kill9(1);
    assert!(!c.alive(1), "node 1 survived kill -9");
    assert!(
        threads_in_invalidation(pid) > 0,
        "node 1 died whole: the test did not make the stuck thread"
    );
    // Should the restart not clear it, the test must fail, not hang: a watchdog aborts the
    // dead connection after a minute, and says so.
    let conn = fuse_connection(&c.mnt(1)).expect("node 1's mount in mountinfo");
    let fired = Arc::new(AtomicBool::new(false));
    let (f, done) = (fired.clone(), Arc::new(AtomicBool::new(false)));
    let d = done.clone();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d.load(Ordering::Relaxed) {
            if Instant::now() > deadline {
                f.store(true, Ordering::Relaxed);
                let _ = Command::new("mount")
                    .args(["-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"])
                    .status();
                let _ = fs::write(format!("/sys/fs/fuse/connections/{conn}/abort"), "1");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let out = c.try_local_up(3, &[]);
    done.store(true, Ordering::Relaxed);
    watchdog.join().unwrap();
    assert!(
        !fired.load(Ordering::Relaxed),
        "the restart hung on the dead daemon's mount"
    );
    assert!(out.status.success(), "{out:?}");
    // The stuck mkdir ended with an error when the dead connection was aborted.
    assert!(stuck.join().unwrap().is_err());
    assert!(!Path::new(&format!("/proc/{pid}/task")).exists() || threads_in_invalidation(pid) == 0);
    assert_eq!(fs::read(c.mnt(1).join("d/from-2")).unwrap(), body("from-2"));
    fs::create_dir(c.mnt(1).join("d/x")).unwrap();
    eventually_within("d/x on node 3", Duration::from_secs(10), || {
        c.mnt(3).join("d/x").is_dir()
    });
    check_recovered(&c, &[]);
}

/// The FUSE connection number (fusectl) of the mount at `path`, from mountinfo.
fn fuse_connection(path: &Path) -> Option<u32> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_str()?;
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        if *fields.get(4)? != want {
            return None;
        }
        fields.get(2)?.split_once(':')?.1.parse().ok()
    })
}
