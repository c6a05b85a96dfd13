//! The `shoal` daemon on a real FUSE mount: POSIX behaviour through the kernel.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use rustix::fs::{FallocateFlags, RenameFlags, XattrFlags};

use crate::testkit::{Daemon, hash_file, is_mounted, shoal};

#[test]
fn posix_basics_through_the_kernel() {
    let d = Daemon::start();
    let m = d.mnt();

    // Create, append, O_EXCL, O_TRUNC.
    fs::write(m.join("f"), b"hello").unwrap();
    let mut f = OpenOptions::new().append(true).open(m.join("f")).unwrap();
    f.write_all(b" world").unwrap();
    drop(f);
    assert_eq!(fs::read(m.join("f")).unwrap(), b"hello world");
    let excl = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.join("f"));
    assert_eq!(excl.unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.join("f"))
        .unwrap();
    assert_eq!(fs::metadata(m.join("f")).unwrap().len(), 0);

    // Directories, symlinks, hard links, modes.
    fs::create_dir_all(m.join("a/b/c")).unwrap();
    std::os::unix::fs::symlink("../f", m.join("a/link")).unwrap();
    assert_eq!(
        fs::read_link(m.join("a/link")).unwrap().to_str(),
        Some("../f")
    );
    fs::hard_link(m.join("f"), m.join("a/hard")).unwrap();
    assert_eq!(fs::metadata(m.join("f")).unwrap().nlink(), 2);
    fs::set_permissions(m.join("f"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        fs::metadata(m.join("a/hard")).unwrap().mode() & 0o7777,
        0o600
    );
    assert_eq!(fs::metadata(m.join("a")).unwrap().nlink(), 3);
    assert_eq!(
        fs::remove_dir(m.join("a")).unwrap_err().raw_os_error(),
        Some(libc::ENOTEMPTY)
    );
    let mut names: Vec<String> = fs::read_dir(m.join("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["b", "hard", "link"]);

    // renameat2: NOREPLACE refuses, EXCHANGE swaps.
    fs::write(m.join("x"), b"x").unwrap();
    fs::write(m.join("y"), b"y").unwrap();
    let dir = fs::File::open(&m).unwrap();
    let err = rustix::fs::renameat_with(&dir, "x", &dir, "y", RenameFlags::NOREPLACE).unwrap_err();
    assert_eq!(err, rustix::io::Errno::EXIST);
    rustix::fs::renameat_with(&dir, "x", &dir, "y", RenameFlags::EXCHANGE).unwrap();
    assert_eq!(fs::read(m.join("x")).unwrap(), b"y");
    assert_eq!(fs::read(m.join("y")).unwrap(), b"x");
    fs::rename(m.join("x"), m.join("a/b/c/moved")).unwrap();
    assert!(!m.join("x").exists());

    // Extended attributes.
    rustix::fs::setxattr(
        m.join("y").as_path(),
        "user.color",
        b"blue",
        XattrFlags::CREATE,
    )
    .unwrap();
    let mut buf = [0u8; 16];
    let n = rustix::fs::getxattr(m.join("y").as_path(), "user.color", &mut buf).unwrap();
    assert_eq!(&buf[..n], b"blue");
    let err = rustix::fs::getxattr(m.join("y").as_path(), "user.none", &mut buf).unwrap_err();
    assert_eq!(err, rustix::io::Errno::NODATA);

    // Sparse files, punch hole, SEEK_DATA/SEEK_HOLE, copy_file_range.
    let mut s = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(m.join("sparse"))
        .unwrap();
    s.seek(SeekFrom::Start(8 << 20)).unwrap();
    s.write_all(b"end").unwrap();
    s.sync_all().unwrap();
    let mut head = vec![1u8; 4096];
    s.seek(SeekFrom::Start(0)).unwrap();
    s.read_exact(&mut head).unwrap();
    assert!(head.iter().all(|b| *b == 0));
    assert_eq!(
        rustix::fs::seek(&s, rustix::fs::SeekFrom::Data(0)).unwrap(),
        8 << 20
    );
    assert_eq!(
        rustix::fs::seek(&s, rustix::fs::SeekFrom::Hole(0)).unwrap(),
        0
    );
    fs::write(m.join("src"), vec![7u8; 100_000]).unwrap();
    rustix::fs::fallocate(
        fs::OpenOptions::new()
            .write(true)
            .open(m.join("src"))
            .unwrap(),
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        1000,
        2000,
    )
    .unwrap();
    let src_bytes = fs::read(m.join("src")).unwrap();
    assert_eq!(src_bytes.len(), 100_000);
    assert!(src_bytes[1000..3000].iter().all(|b| *b == 0));
    assert_eq!(src_bytes[999], 7);
    let src = fs::File::open(m.join("src")).unwrap();
    let dst = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(m.join("dst"))
        .unwrap();
    let copied = rustix::fs::copy_file_range(&src, None, &dst, None, 100_000).unwrap();
    assert_eq!(copied, 100_000);
    drop(dst);
    assert_eq!(fs::read(m.join("dst")).unwrap(), src_bytes);

    // Special files.
    rustix::fs::mknodat(
        &dir,
        "fifo",
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from(0o644),
        0,
    )
    .unwrap();
    assert!(
        fs::symlink_metadata(m.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo_like()
    );
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}

impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_fifo()
    }
}

#[test]
fn fcntl_locks_conflict_between_processes() {
    let d = Daemon::start();
    let path = d.mnt().join("locked");
    fs::write(&path, b"x").unwrap();
    // The holder takes a write lock and keeps it while the test probes from another process.
    let mut holder = Command::new("python3")
        .args([
            "-c",
            "import fcntl,sys,time; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)",
        ])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 7];
    holder
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .unwrap();
    assert_eq!(&line, b"locked\n");
    let probe = |cmd: &str| {
        Command::new("python3")
            .args(["-c", cmd])
            .arg(&path)
            .output()
            .unwrap()
    };
    let busy = probe(
        "import fcntl,sys; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB)",
    );
    assert!(
        !busy.status.success(),
        "a second process must not get the lock"
    );
    assert!(String::from_utf8_lossy(&busy.stderr).contains("Resource temporarily unavailable"));
    holder.kill().unwrap();
    holder.wait().unwrap();
    let free = probe(
        "import fcntl,sys; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB)",
    );
    assert!(
        free.status.success(),
        "the lock is released when its holder exits: {}",
        String::from_utf8_lossy(&free.stderr)
    );
}

#[test]
fn clean_stop_unmounts_and_restart_keeps_everything() {
    let mut d = Daemon::start();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(d.mnt().join("big"), &data).unwrap();
    fs::create_dir(d.mnt().join("dir")).unwrap();
    let status = Command::new(shoal())
        .arg("status")
        .arg("--data")
        .arg(d.data())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && out.contains("Leader") && out.contains("inodes        3"),
        "{out}"
    );
    assert!(d.stop().success());
    assert!(!is_mounted(&d.mnt()), "SIGTERM unmounts");
    let status = Command::new(shoal())
        .arg("status")
        .arg("--data")
        .arg(d.data())
        .output()
        .unwrap();
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stderr).contains("no shoal daemon is running"));
    d.restart();
    Daemon::drop_caches();
    assert_eq!(fs::read(d.mnt().join("big")).unwrap(), data);
    assert!(d.mnt().join("dir").is_dir());
}

#[test]
fn a_second_daemon_and_an_occupied_mount_point_are_refused() {
    let d = Daemon::start();
    let other = tempfile::tempdir().unwrap();
    let out = Command::new(shoal())
        .arg("daemon")
        .arg("--no-plugin")
        .arg("--data")
        .arg(d.data())
        .arg("--mount")
        .arg(other.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // The running daemon would hand its mount over, but only to one for the same mount point.
    assert!(
        err.contains("already serves this data directory") && err.contains("--mount"),
        "{err}"
    );

    let second = tempfile::tempdir().unwrap();
    let init = Command::new(shoal())
        .arg("init")
        .arg("--data")
        .arg(second.path())
        .output()
        .unwrap();
    assert!(init.status.success());
    let out = Command::new(shoal())
        .arg("daemon")
        .arg("--no-plugin")
        .arg("--data")
        .arg(second.path())
        .arg("--mount")
        .arg(d.mnt())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is already a mount point"), "{err}");
    assert!(err.lines().count() == 1, "one-line error: {err}");
}

#[test]
fn a_stale_mount_of_a_killed_daemon_is_cleared_on_restart() {
    let mut d = Daemon::start();
    fs::write(d.mnt().join("f"), b"data").unwrap();
    let h = hash_file(&d.mnt().join("f"));
    d.kill9();
    assert!(
        is_mounted(&d.mnt()),
        "a killed daemon leaves its mount behind"
    );
    let err = fs::read_dir(d.mnt()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN));
    d.restart();
    assert_eq!(hash_file(&d.mnt().join("f")), h);
}

#[test]
fn a_large_write_commits_in_the_background_and_reads_back() {
    let d = Daemon::start();
    let path = d.mnt().join("large");
    // Well past the 32 MiB background-commit threshold, written without fsync.
    let piece: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    let mut f = fs::File::create(&path).unwrap();
    for i in 0..150u8 {
        let mut p = piece.clone();
        p[0] = i;
        f.write_all(&p).unwrap();
    }
    drop(f);
    Daemon::drop_caches();
    let got = fs::read(&path).unwrap();
    assert_eq!(got.len(), 150 << 20);
    for (i, chunk) in got.chunks(1 << 20).enumerate() {
        assert_eq!(chunk[0], i as u8);
        assert_eq!(&chunk[1..], &piece[1..], "MiB {i}");
    }
}

/// The mount(8) helper: run as `/sbin/mount.fuse.shoal DATA MOUNTPOINT -o OPTIONS` (here from
/// a link of that name), it turns fstab options into daemon flags, refuses bad ones before
/// starting anything, and returns once the node serves; here a cluster node stopped and
/// mounted again that way, while another node writes, sees every file. `umount` stops it.
#[test]
fn the_mount_helper_mounts_a_node_from_fstab_options_and_umount_stops_it() {
    let c = crate::cluster::LocalCluster::up(3);
    c.stop(3);
    assert!(!is_mounted(&c.mnt(3)));
    let links = tempfile::tempdir().unwrap();
    let helper = links.path().join("mount.fuse.shoal");
    std::os::unix::fs::symlink(shoal(), &helper).unwrap();
    let mount = |options: &str| {
        Command::new(&helper)
            .arg(c.data(3))
            .arg(c.mnt(3))
            .args(["-o", options])
            .output()
            .unwrap()
    };
    let err = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();

    // Bad options are refused before any daemon starts.
    let out = mount("rw,_netdev,frobnicate");
    assert!(!out.status.success());
    assert!(
        err(&out).contains("unknown option 'frobnicate'"),
        "{}",
        err(&out)
    );
    let out = mount("cache_size=lots,no_plugin");
    assert!(!out.status.success());
    assert!(err(&out).contains("invalid value 'lots'"), "{}", err(&out));
    let out = mount("ro,no_plugin");
    assert!(!out.status.success());
    assert!(err(&out).contains("read-write only"), "{}", err(&out));
    assert!(!is_mounted(&c.mnt(3)), "nothing was mounted");
    // A value only the daemon can judge: it fails, and the helper shows why from its log.
    let out = mount("fuse_threads=0,no_plugin");
    assert!(!out.status.success());
    assert!(err(&out).contains("out of range"), "{}", err(&out));

    fs::write(c.mnt(1).join("before"), b"written while node 3 was down").unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let written = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut f = fs::File::create(c.mnt(1).join(format!("during-{n}"))).unwrap();
                f.write_all(&n.to_le_bytes()).unwrap();
                f.sync_all().unwrap();
                n += 1;
            }
            n
        });
        let out = mount(
            "defaults,_netdev,nofail,x-systemd.requires=network-online.target,cache_size=64MiB,no_plugin",
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(out.status.success(), "{}", err(&out));
        writer.join().unwrap()
    });
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.contains(&format!(" {} ", c.mnt(3).display())))
        .expect("the helper's mount is in mountinfo");
    // fuser 0.18 mounts as root with type "fuse" whatever the subtype, so the kernel lists
    // it as fuse with source shoal:CLUSTER (not fuse.shoal, as libfuse would).
    assert!(line.contains(" - fuse shoal:"), "{line}");
    assert_eq!(
        fs::read(c.mnt(3).join("before")).unwrap(),
        b"written while node 3 was down"
    );
    for n in 0..written {
        assert_eq!(
            fs::read(c.mnt(3).join(format!("during-{n}"))).unwrap(),
            n.to_le_bytes(),
            "during-{n}, written on node 1 while node 3 mounted"
        );
    }
    fs::write(c.mnt(3).join("from-3"), b"back").unwrap();
    assert_eq!(fs::read(c.mnt(2).join("from-3")).unwrap(), b"back");

    // umount stops the daemon: its admin socket goes quiet.
    let out = Command::new("umount").arg(c.mnt(3)).output().unwrap();
    assert!(out.status.success(), "{}", err(&out));
    crate::cluster::eventually("the daemon left with its mount", || {
        !c.shoal_at(3, &["status"]).status.success()
    });
    assert!(!is_mounted(&c.mnt(3)));
}
