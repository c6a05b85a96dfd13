//! Crash durability: `kill -9` the daemon at several points and check, after a restart with
//! caches dropped, that every fsynced byte and every committed rename is there, and that no
//! file holds bytes that were never written to it.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::testkit::{Daemon, hash_file};

/// The deterministic content of file `seed`: any prefix of it is a state some commit held.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Files the writer recorded as durable: name → (seed, length, hash).
type Done = Arc<Mutex<BTreeMap<String, (u64, usize, String)>>>;

/// Writes files until stopped or until the mount fails; records each after fsync of the file
/// and its directory. With `rename`, writes `tmp.N` and renames it to `file.N` before recording.
fn writer(
    dir: PathBuf,
    sizes: Vec<usize>,
    rename: bool,
    stop: Arc<AtomicBool>,
    done: Done,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let _ = (|| -> std::io::Result<()> {
            for (n, size) in sizes.iter().cycle().enumerate() {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let seed = n as u64 + 1;
                let data = content(seed, *size);
                let final_name = format!("file.{n}");
                let first = if rename {
                    format!("tmp.{n}")
                } else {
                    final_name.clone()
                };
                let mut f = OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .open(dir.join(&first))?;
                for piece in data.chunks(256 << 10) {
                    f.write_all(piece)?;
                }
                f.sync_all()?;
                drop(f);
                if rename {
                    fs::rename(dir.join(&first), dir.join(&final_name))?;
                }
                fsync_dir(&dir)?;
                let hash = blake3::hash(&data).to_hex().to_string();
                done.lock().unwrap().insert(final_name, (seed, *size, hash));
            }
            Ok(())
        })();
    })
}

/// Every recorded file has its bytes; every other file is a prefix of what was written to it.
fn verify(dir: &Path, done: &Done) -> usize {
    Daemon::drop_caches();
    let done = done.lock().unwrap();
    for (name, (_, _, hash)) in done.iter() {
        let path = dir.join(name);
        assert!(
            path.exists(),
            "{name} was fsynced but is gone after the crash"
        );
        assert_eq!(
            &hash_file(&path),
            hash,
            "{name} was fsynced but its bytes changed"
        );
    }
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if done.contains_key(&name) {
            continue;
        }
        let n: u64 = name.rsplit('.').next().unwrap().parse().unwrap();
        let bytes = fs::read(entry.path()).unwrap();
        assert_eq!(
            bytes,
            content(n + 1, bytes.len()),
            "{name} (not fsynced) holds bytes that were never written to it"
        );
    }
    done.len()
}

fn crash_during(sizes: Vec<usize>, rename: bool, run_for: Duration) {
    let mut d = Daemon::start();
    let dir = d.mnt().join("work");
    fs::create_dir(&dir).unwrap();
    fsync_dir(&d.mnt()).unwrap();
    let done: Done = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(dir.clone(), sizes, rename, stop.clone(), done.clone());
    std::thread::sleep(run_for);
    d.kill9();
    stop.store(true, Ordering::Relaxed);
    w.join().unwrap();
    d.restart();
    let n = verify(&dir, &done);
    assert!(
        n > 0,
        "the writer finished no file before the crash; the test proved nothing"
    );
}

#[test]
fn kill_9_during_small_file_writes_keeps_every_fsynced_file() {
    crash_during(
        vec![1, 4096, 10_000, 100_000],
        false,
        Duration::from_millis(1500),
    );
}

#[test]
fn kill_9_during_a_large_write_keeps_every_fsynced_file() {
    crash_during(
        vec![6 << 20, 3 << 20, 9 << 20],
        false,
        Duration::from_millis(2500),
    );
}

#[test]
fn kill_9_during_a_rename_storm_keeps_every_committed_rename() {
    crash_during(vec![100, 5000, 70_000], true, Duration::from_millis(2000));
}

#[test]
fn kill_9_repeatedly_at_different_points() {
    let mut d = Daemon::start();
    let dir = d.mnt().join("work");
    fs::create_dir(&dir).unwrap();
    let done: Done = Arc::default();
    for (round, ms) in [300u64, 900, 1700].into_iter().enumerate() {
        let stop = Arc::new(AtomicBool::new(false));
        let sizes = vec![2 << 20, 50_000, 1];
        // Each round writes new names, so earlier rounds' files must stay intact.
        let round_dir = dir.join(format!("r{round}"));
        fs::create_dir(&round_dir).unwrap();
        fsync_dir(&dir).unwrap();
        let round_done: Done = Arc::default();
        let w = writer(
            round_dir.clone(),
            sizes,
            round % 2 == 1,
            stop.clone(),
            round_done.clone(),
        );
        std::thread::sleep(Duration::from_millis(ms));
        d.kill9();
        stop.store(true, Ordering::Relaxed);
        w.join().unwrap();
        d.restart();
        verify(&round_dir, &round_done);
        for (k, v) in round_done.lock().unwrap().iter() {
            done.lock()
                .unwrap()
                .insert(format!("r{round}/{k}"), v.clone());
        }
        for (name, (_, _, hash)) in done.lock().unwrap().iter() {
            assert_eq!(
                &hash_file(&dir.join(name)),
                hash,
                "{name} changed after a later crash"
            );
        }
    }
}

/// A log whose disk fails a write stops the Raft core for good. The daemon must not stay
/// mounted answering EIO: it exits non-zero (so systemd restarts it), and a restart on a
/// disk that works again serves every file fsynced before the failure.
#[test]
fn a_log_disk_that_fails_a_write_stops_the_daemon_and_a_restart_keeps_every_fsynced_file() {
    let root = tempfile::tempdir().unwrap();
    let trigger = root.path().join("fail-log-writes");
    let mut d =
        Daemon::start_with_env(&[("SHOAL_FAULT_LOG_WRITE_FAILS", trigger.to_str().unwrap())]);
    let stop = Arc::new(AtomicBool::new(false));
    let mut dirs = Vec::new();
    let mut writers = Vec::new();
    // Three writers at once, each in its own directory.
    for k in 0..3 {
        let dir = d.mnt().join(format!("w{k}"));
        fs::create_dir(&dir).unwrap();
        let done: Done = Arc::default();
        let sizes = vec![1, 70_000, 1 << 20];
        writers.push((
            writer(dir.clone(), sizes, k == 1, stop.clone(), done.clone()),
            done,
        ));
        dirs.push(dir);
    }
    fsync_dir(&d.mnt()).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    fs::write(&trigger, b"").unwrap();
    let status = d
        .wait_exit(Duration::from_secs(20))
        .expect("the daemon kept running with a dead Raft core");
    assert!(!status.success(), "it exited with {status}");
    let log = d.log();
    assert!(
        log.contains("the Raft core stopped") && log.contains("check the data disk"),
        "{log}"
    );
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut recorded = Vec::new();
    for (w, done) in writers {
        w.join().unwrap();
        recorded.push(done);
    }
    fs::remove_file(&trigger).unwrap();
    d.restart();
    for (dir, done) in dirs.iter().zip(&recorded) {
        total += verify(dir, done);
    }
    assert!(
        total > 0,
        "no file was fsynced before the failure; the test proved nothing"
    );
    // And it takes writes again.
    fs::write(d.mnt().join("after"), b"ok").unwrap();
    assert_eq!(fs::read(d.mnt().join("after")).unwrap(), b"ok");
}

/// Creates `path` with `data` and fsyncs it.
fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Writes `path` as `write_synced` does, again every 200 ms while the disk is full; panics with
/// `why` after 20 s of ENOSPC. Returns how long it took.
fn write_once_there_is_room(path: &Path, data: &[u8], why: &str) -> Duration {
    let t = std::time::Instant::now();
    loop {
        match write_synced(path, data) {
            Ok(()) => return t.elapsed(),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                assert!(t.elapsed() < Duration::from_secs(20), "{why} within 20 s");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
}

/// Writes `len`-byte files named `prefix.N` and fsyncs each, until the disk is full; returns the
/// names and hashes of those whose fsync succeeded. Any error but ENOSPC fails the test.
/// The seeds start at `seed`, so that two writers' files share no block.
fn fill(
    dir: PathBuf,
    prefix: &'static str,
    seed: u64,
    len: usize,
) -> std::thread::JoinHandle<Vec<(String, String)>> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        for n in 0.. {
            let name = format!("{prefix}.{n}");
            let data = content(seed + n, len);
            match write_synced(&dir.join(&name), &data) {
                Ok(()) => kept.push((name, blake3::hash(&data).to_hex().to_string())),
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return kept,
                Err(e) => panic!("{name}: {e}"),
            }
        }
        unreachable!()
    })
}

#[test]
fn space_freed_on_a_full_disk_comes_back_at_once_and_the_log_is_not_flooded() {
    let mut d = Daemon::start_on_small_disk(400 << 20);
    let m = d.mnt();
    // Two writers fill the disk at the same time.
    let a = fill(m.clone(), "a", 1, 8 << 20);
    let b = fill(m.clone(), "b", 1 << 32, 8 << 20);
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert!(
        !a.is_empty() && !b.is_empty(),
        "a {} b {}",
        a.len(),
        b.len()
    );
    // Writers that retry into a full disk.
    for n in 0..200 {
        let _ = fs::write(m.join(format!("retry.{n}")), [7u8; 4096]);
    }
    // Delete a's files; the space comes back within seconds, not after the minute of grace.
    for (name, _) in &a {
        fs::remove_file(m.join(name)).unwrap();
    }
    let data = content(1 << 40, 8 << 20);
    let took = write_once_there_is_room(&m.join("again"), &data, "deleting files freed nothing");
    eprintln!(
        "full disk: {} + {} files of 8 MiB, space back {} ms after deleting {}",
        a.len(),
        b.len(),
        took.as_millis(),
        a.len()
    );
    let log = d.log();
    let warnings = log.matches("data disk is full").count();
    assert!(
        (1..=6).contains(&warnings),
        "{warnings} full-disk warnings for hundreds of refusals"
    );
    // Every file fsynced before the disk filled is intact, across a restart.
    d.stop();
    d.restart();
    Daemon::drop_caches();
    for (name, hash) in &b {
        assert_eq!(&hash_file(&m.join(name)), hash, "{name}");
    }
    assert_eq!(fs::read(m.join("again")).unwrap(), data);
}

/// Takes all but the last MiB of free space of the filesystem holding `dir` into
/// `dir/filler` in one allocation, as another program writing a large file would. (One that
/// goes on writing after the disk is full takes the space shoal gives back for its metadata
/// too: see docs/RELIABILITY.md.)
fn fill_from_outside(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let f = File::create(&path).unwrap();
    let st = rustix::fs::statvfs(dir).unwrap();
    let mut len = st.f_bavail * st.f_frsize;
    while rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, len).is_err() {
        len = len.checked_sub(1 << 20).expect("no space to fill");
    }
    f.sync_all().unwrap();
    path
}

/// Something other than the node fills its data disk (the node's own writes stop at its
/// reserve). sled takes its first failed write as the end of the database, which would stop
/// the Raft core; instead the node gives back the space it kept for metadata, so writers get
/// ENOSPC while unlinks, creates and session renewals go on, and once the disk has room again
/// writes work without a restart. Three writers are fsyncing files when the disk fills.
#[test]
fn a_disk_another_program_fills_keeps_metadata_writable_and_recovers_without_a_restart() {
    let mut d = Daemon::start_on_small_disk(400 << 20);
    let m = d.mnt();
    let headroom = d.data().join("meta.headroom");
    assert!(headroom.exists(), "no space kept for metadata at start");
    let writers: Vec<_> = (0..3u64)
        .map(|k| fill(m.clone(), ["a", "b", "c"][k as usize], k << 32, 1 << 20))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let filler = fill_from_outside(&d.data());
    let kept: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    assert!(
        kept.iter().all(|k| !k.is_empty()),
        "a writer fsynced nothing before the disk filled: {:?}",
        kept.iter().map(Vec::len).collect::<Vec<_>>()
    );
    // Three programs rename files back and forth at once on the full disk: thousands of log
    // entries, more than sled's free segments hold (without the space kept for metadata, the
    // Raft core stopped with ENOSPC within 183 renames).
    let renamers: Vec<_> = kept
        .iter()
        .enumerate()
        .map(|(k, files)| {
            let (m, name) = (m.clone(), files.last().unwrap().0.clone());
            std::thread::spawn(move || {
                let (a, b) = (m.join(&name), m.join(format!("moved-{k}")));
                for i in 0..1000 {
                    let (from, to) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
                    fs::rename(from, to).unwrap_or_else(|e| panic!("rename {i} of {name}: {e}"));
                }
            })
        })
        .collect();
    for r in renamers {
        r.join().unwrap();
    }
    assert!(
        d.wait_exit(Duration::from_secs(1)).is_none(),
        "the daemon stopped on a full disk: {}",
        d.log()
    );
    assert!(
        d.log().contains("gave back the space kept for metadata"),
        "{}",
        d.log()
    );
    assert!(!headroom.exists());
    // Metadata stays writable for what frees space or moves it: unlink a's files, rename one
    // of b's. New files and file data are refused.
    for (name, _) in &kept[0] {
        fs::remove_file(m.join(name)).unwrap();
    }
    let (moved, moved_hash) = kept[1][0].clone();
    fs::rename(m.join(&moved), m.join("renamed")).unwrap();
    assert_eq!(
        fs::create_dir(m.join("refused-dir")).map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENOSPC))
    );
    let refused = write_synced(&m.join("refused"), &[1; 1 << 20]);
    assert_eq!(
        refused.map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENOSPC)),
        "file data written while the metadata lives on its last space"
    );
    // The other program's file goes: writes work again, in the same process.
    fs::remove_file(&filler).unwrap();
    let data = content(1 << 40, 4 << 20);
    let took = write_once_there_is_room(
        &m.join("again"),
        &data,
        "writes still refused after the disk had room",
    );
    assert!(
        headroom.exists(),
        "the space kept for metadata was not taken back"
    );
    // Every file fsynced before the disk filled is intact, across a restart.
    d.stop();
    d.restart();
    Daemon::drop_caches();
    for (name, hash) in kept[1][1..].iter().chain(&kept[2]) {
        assert_eq!(&hash_file(&m.join(name)), hash, "{name}");
    }
    assert_eq!(hash_file(&m.join("renamed")), moved_hash);
    assert!(!m.join(&moved).exists());
    for (name, _) in &kept[0] {
        assert!(!m.join(name).exists(), "{name} came back after its unlink");
    }
    assert_eq!(fs::read(m.join("again")).unwrap(), data);
    eprintln!(
        "disk filled from outside: {} files fsynced before, writes back {} ms after the disk had room",
        kept.iter().map(Vec::len).sum::<usize>(),
        took.as_millis()
    );
}
