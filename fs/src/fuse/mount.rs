//! Mounting and unmounting the FUSE filesystem, with the checks that turn a confusing kernel
//! error into a sentence that says what to do.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuser::{Config, MountOption, Notifier, Session, SessionACL, SessionStopper, SessionUnmounter};
use tracing::{info, warn};

use super::ShoalFs;
use crate::node::Node;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(
        "/dev/fuse is missing: load the fuse module (`modprobe fuse`), or give the container `--device /dev/fuse --cap-add SYS_ADMIN`"
    )]
    NoFuseDevice,
    #[error("cannot open /dev/fuse ({0}): run shoal as root")]
    FuseDevice(io::Error),
    #[error("{0} is already a mount point ({1}): unmount it or choose another --mount")]
    Occupied(PathBuf, String),
    #[error("{0} exists and is not a directory: choose another --mount")]
    NotADirectory(PathBuf),
    #[error("cannot prepare mount point {0}: {1}")]
    Prepare(PathBuf, io::Error),
    #[error("mounting {0} failed: {1}")]
    Mount(PathBuf, io::Error),
}

/// A mounted filesystem. Dropping it without `unmount` leaves the mount to the kernel, which
/// tears it down when the process exits.
pub struct MountHandle {
    pub mountpoint: PathBuf,
    /// fuser's, for a mount this process made; a connection taken over from another process
    /// is unmounted by path (`unmount`).
    unmounter: Option<SessionUnmounter>,
    stopper: SessionStopper,
    thread: Option<JoinHandle<io::Result<()>>>,
    pub notifier: Notifier,
    /// The mount's device number; its minor names the FUSE connection in fusectl.
    dev: Option<u64>,
    /// The connection's /dev/fuse fd (a duplicate of the session's): what a successor gets.
    fd: OwnedFd,
    deferred: super::Deferred,
}

/// A mount that stopped serving for a successor (`MountHandle::hand_off`).
pub struct HandedOff {
    fd: OwnedFd,
    deferred: super::Deferred,
    notifier: Notifier,
}

impl HandedOff {
    /// Once every other request is answered: puts the lock waits this daemon stopped back in
    /// the kernel's queue for the successor (`FUSE_NOTIFY_RESEND`), and returns the fd to
    /// give it. A kernel older than 6.9 cannot: they then end with EINTR (which the kernel
    /// turns into a restart of the call when a signal is pending, and otherwise reports).
    pub fn release_waits(self) -> OwnedFd {
        let waits = std::mem::take(&mut *self.deferred.lock().expect("deferred lock"));
        if waits.is_empty() {
            return self.fd;
        }
        match self.notifier.resend() {
            Ok(()) => {
                info!(waits = waits.len(), "lock waits handed to the successor");
                // Answered by the successor: these replies must never be sent from here.
                for reply in waits {
                    std::mem::forget(reply);
                }
            }
            Err(e) => {
                warn!(waits = waits.len(), error = %e, "the kernel cannot resend requests (Linux 6.9 and later can): the lock waits end with EINTR");
                for reply in waits {
                    reply.error(fuser::Errno::EINTR);
                }
            }
        }
        self.fd
    }
}

/// How long an unmounted filesystem keeps serving those who still hold it (a container's
/// bind mount, a process in it) before the connection is aborted.
const UNMOUNT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Where the kernel's fusectl filesystem lists FUSE connections.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// The mount point's line in /proc/self/mountinfo, if it is one: (fs type, source).
pub fn mount_entry(path: &Path) -> Option<(String, String)> {
    mountinfo(path).map(|m| (m.fs_type, m.source))
}

/// What /proc/self/mountinfo says of one mount.
#[derive(Debug, PartialEq, Eq)]
struct MountLine {
    /// `st_dev` of the mount (its minor names a FUSE connection in fusectl).
    dev: u64,
    fs_type: String,
    source: String,
}

/// The topmost mount at `path`, read without touching the mount itself (a stat would wait on a
/// connection nobody serves).
fn mountinfo(path: &Path) -> Option<MountLine> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    find_mount(&info, path.to_str()?)
}

/// The last line of `info` (mountinfo's format, proc(5)) whose mount point is `want`.
/// procfs 0.18 does not decode the octal escapes of mount points (a space is `\040`), so
/// this does.
fn find_mount(info: &str, want: &str) -> Option<MountLine> {
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        if unescape(fields.get(4)?) != want {
            return None;
        }
        let (major, minor) = fields.get(2)?.split_once(':')?;
        // Optional fields end at a lone "-"; the fs type and source follow.
        let sep = fields.iter().position(|f| *f == "-")?;
        Some(MountLine {
            dev: rustix::fs::makedev(major.parse().ok()?, minor.parse().ok()?),
            fs_type: unescape(fields.get(sep + 1)?),
            source: unescape(fields.get(sep + 2)?),
        })
    })
}

/// Decodes the kernel's `\ooo` escapes (space, tab, newline, backslash, `#`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| {
                let n = d.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0'));
                u8::try_from(n).ok()
            });
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether process `pid` runs: it exists and is not a zombie. A daemon killed while one of its
/// threads waited in the kernel stays a zombie, its threads gone but that one (see
/// `release_stuck_predecessor`).
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold anything.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The process holding the flock on `path`, from /proc/locks.
fn flock_holder(path: &Path) -> Option<i32> {
    let st = rustix::fs::stat(path).ok()?;
    let (major, minor) = (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev));
    let want = format!("{major:02x}:{minor:02x}:{}", st.st_ino);
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        // `1: FLOCK  ADVISORY  WRITE 4242 00:2f:1234 0 EOF`; waiters have a `->` after the number.
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&"FLOCK") || fields.get(5) != Some(&want.as_str()) {
            return None;
        }
        fields.get(4)?.parse().ok()
    })
}

/// The process holding the data directory `data` (its LOCK file's flock), if any.
pub fn lock_holder(data: &Path) -> Option<i32> {
    flock_holder(&data.join("LOCK"))
}

/// The device number mountinfo gives the mount at `path`.
pub fn mount_dev(path: &Path) -> Option<u64> {
    mountinfo(path).map(|m| m.dev)
}

/// A daemon killed (kill -9, a crash) while one of its threads waited in the kernel on its
/// own mount — an invalidation waiting for a directory lock that a request in flight holds —
/// never finishes dying: it stays a zombie with that thread, its /dev/fuse descriptor still
/// open, so the mount hangs instead of answering ENOTCONN and the data directory's lock is
/// never released. Finds such a predecessor by the lock on `data`'s LOCK file and aborts the
/// FUSE connection of its mount at `mountpoint` (fusectl), which lets it die; then waits for
/// its lock to go. Nothing to do (Ok) when the lock is free or held by a live daemon.
pub fn release_stuck_predecessor(data: &Path, mountpoint: &Path) -> io::Result<()> {
    let lock = data.join("LOCK");
    let Some(pid) = flock_holder(&lock) else {
        return Ok(());
    };
    if process_alive(pid) || !Path::new(&format!("/proc/{pid}")).exists() {
        return Ok(());
    }
    let mountpoint = std::path::absolute(mountpoint)?;
    let Some(dev) = mount_dev(&mountpoint) else {
        return Err(io::Error::other(format!(
            "the previous daemon (pid {pid}) died but holds {} while a thread of it waits in the kernel, and {} is not its mount: abort its FUSE connection (echo 1 > {FUSECTL}/N/abort)",
            lock.display(),
            mountpoint.display()
        )));
    };
    warn!(
        pid,
        mount = %mountpoint.display(),
        "the previous daemon died but a thread of it is stuck on its FUSE connection; aborting that connection so that it can end"
    );
    abort_connection(dev)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while flock_holder(&lock) == Some(pid) {
        if std::time::Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "the previous daemon (pid {pid}) still holds {} after its FUSE connection was aborted",
                lock.display()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

/// Lazily detaches whatever is mounted at `path`.
pub fn detach(path: &Path) -> io::Result<()> {
    rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).map_err(io::Error::from)
}

/// Checks the FUSE device and the mount point, creating it or clearing a stale shoal mount.
pub fn prepare(mountpoint: &Path) -> Result<PathBuf, MountError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(MountError::NoFuseDevice),
        Err(e) => return Err(MountError::FuseDevice(e)),
    }
    let abs = std::path::absolute(mountpoint)
        .map_err(|e| MountError::Prepare(mountpoint.to_path_buf(), e))?;
    if let Some((fstype, source)) = mount_entry(&abs) {
        // statfs always goes to the filesystem; a FUSE mount whose daemon died answers ENOTCONN.
        let dead = matches!(rustix::fs::statfs(&abs), Err(rustix::io::Errno::NOTCONN));
        if !(dead && source.starts_with("shoal:")) {
            let what = if dead { "a dead mount" } else { "mounted" };
            return Err(MountError::Occupied(
                abs,
                format!("{what}: {fstype} from {source}"),
            ));
        }
        warn!(mount = %abs.display(), "clearing the stale mount of a crashed shoal daemon");
        detach(&abs).map_err(|e| MountError::Prepare(abs.clone(), e))?;
    }
    std::fs::create_dir_all(&abs).map_err(|e| MountError::Prepare(abs.clone(), e))?;
    match std::fs::metadata(&abs) {
        Err(e) => return Err(MountError::Prepare(abs, e)),
        Ok(m) if !m.is_dir() => return Err(MountError::NotADirectory(abs)),
        Ok(_) => {}
    }
    let abs = std::fs::canonicalize(&abs).map_err(|e| MountError::Prepare(abs.clone(), e))?;
    Ok(abs)
}

/// The session configuration every mount of shoal has, whether mounted here or taken over.
fn session_config(node: &Node, threads: usize, allow_suid_dev: bool) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("shoal:{}", node.config.cluster_id)),
        MountOption::Subtype("shoal".into()),
        MountOption::DefaultPermissions,
    ];
    if allow_suid_dev {
        config
            .mount_options
            .extend([MountOption::Dev, MountOption::Suid]);
    } else {
        config
            .mount_options
            .extend([MountOption::NoDev, MountOption::NoSuid]);
    }
    config.acl = SessionACL::All;
    config.n_threads = Some(threads.max(1));
    // Every thread reads from a clone: the session's own fd, the one a successor or the
    // service manager keeps, then never holds a request this process took and did not answer.
    config.clone_every_fd = true;
    config
}

/// Starts the session's request loops on a thread of their own; the handle to it.
fn serve(
    session: Session<ShoalFs>,
    notifier_slot: &std::sync::OnceLock<Notifier>,
    mountpoint: PathBuf,
    unmounter: Option<SessionUnmounter>,
    deferred: super::Deferred,
) -> Result<MountHandle, MountError> {
    let fd = session
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| MountError::Mount(mountpoint.clone(), e))?;
    let notifier = session.notifier();
    let _ = notifier_slot.set(session.notifier());
    let stopper = session.stopper();
    let thread = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || session.run())
        .map_err(|e| MountError::Mount(mountpoint.clone(), e))?;
    let dev = rustix::fs::stat(&mountpoint).ok().map(|st| st.st_dev);
    Ok(MountHandle {
        mountpoint,
        unmounter,
        stopper,
        thread: Some(thread),
        notifier,
        dev,
        fd,
        deferred,
    })
}

/// Mounts the node's filesystem at `mountpoint` and serves it on `threads` FUSE threads.
///
/// The mount is `nosuid,nodev` unless `allow_suid_dev`: root in any container on any host can
/// write to a volume, and a setuid-root binary or a device node it leaves there must not give
/// unprivileged users on another host root or raw devices. The bits are still stored (a
/// backup restores them); the kernel just does not honour them on this mount or its binds.
pub fn mount(
    node: Arc<Node>,
    mountpoint: &Path,
    rt: tokio::runtime::Handle,
    threads: usize,
    allow_suid_dev: bool,
) -> Result<MountHandle, MountError> {
    let mountpoint = prepare(mountpoint)?;
    if allow_suid_dev {
        warn!(
            "mounting with suid and dev (--allow-suid-dev): a container's root can leave setuid binaries and device nodes for every host"
        );
    }
    let config = session_config(&node, threads, allow_suid_dev);
    let notifier_slot = node.notifier.clone();
    let deferred = super::Deferred::default();
    let fs = ShoalFs::new(node, rt, deferred.clone());
    let mut session = Session::new(fs, &mountpoint, &config)
        .map_err(|e| MountError::Mount(mountpoint.clone(), e))?;
    let unmounter = session.unmount_callable();
    let handle = serve(
        session,
        &notifier_slot,
        mountpoint,
        Some(unmounter),
        deferred,
    )?;
    raise_readahead(&handle.mountpoint);
    info!(mount = %handle.mountpoint.display(), threads, "mounted");
    Ok(handle)
}

/// Serves the FUSE connection `fd` of the mount at `mountpoint`, which another shoal daemon
/// mounted and served until now (it handed the fd over, or the service manager kept it when
/// that daemon died). Nothing is mounted: the kernel has queued what processes asked
/// meanwhile, and they get their answers from here.
pub fn resume(
    node: Arc<Node>,
    fd: OwnedFd,
    mountpoint: &Path,
    rt: tokio::runtime::Handle,
    threads: usize,
    allow_suid_dev: bool,
) -> Result<MountHandle, MountError> {
    let mountpoint = mountpoint.to_path_buf();
    let config = session_config(&node, threads, allow_suid_dev);
    let notifier_slot = node.notifier.clone();
    let deferred = super::Deferred::default();
    let fs = ShoalFs::new(node, rt, deferred.clone());
    let session = Session::resume(fs, fd, SessionACL::All, config)
        .map_err(|e| MountError::Mount(mountpoint.clone(), e))?;
    let handle = serve(session, &notifier_slot, mountpoint, None, deferred)?;
    info!(mount = %handle.mountpoint.display(), threads, "serving the mount taken over from the previous daemon");
    Ok(handle)
}

/// Aborts the FUSE connection of the filesystem with device number `dev` through fusectl,
/// mounting fusectl first if the system has not.
fn abort_connection(dev: u64) -> io::Result<()> {
    let conn = Path::new(FUSECTL).join(rustix::fs::minor(dev).to_string());
    if !conn.exists() {
        rustix::mount::mount(
            "fusectl",
            FUSECTL,
            "fusectl",
            rustix::mount::MountFlags::empty(),
            None,
        )
        .map_err(io::Error::from)?;
    }
    std::fs::write(conn.join("abort"), "1")
}

/// The kernel's readahead for the mount, in KiB. The kernel starts FUSE mounts at 128 KiB,
/// which keeps sequential reads at a fraction of what the disk gives.
const READAHEAD_KB: u32 = 4096;

/// Raises the readahead of the mount's backing device info (`/sys/class/bdi/MAJ:MIN`).
fn raise_readahead(mountpoint: &Path) {
    let dev = match rustix::fs::stat(mountpoint) {
        Ok(st) => st.st_dev,
        Err(e) => {
            warn!(error = %e, "cannot stat the new mount; leaving readahead alone");
            return;
        }
    };
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    if let Err(e) = std::fs::write(&path, READAHEAD_KB.to_string()) {
        warn!(path, error = %e, "cannot raise readahead; sequential reads will be slower");
    }
}

impl MountHandle {
    /// Unmounts and ends the FUSE session. If the mount is busy it is detached lazily; if
    /// someone still holds the filesystem after `UNMOUNT_GRACE` (a container's bind mount of
    /// a volume keeps it alive after the host's mount point is gone), the connection is
    /// aborted: from then on they get ENOTCONN, never an empty directory, and no request is
    /// taken that the daemon would not finish. Returns once the session has stopped.
    pub fn unmount(mut self) {
        let unmounted = match &mut self.unmounter {
            Some(u) => u.unmount(),
            // Taken over: unmount by path, unless something else is mounted there now.
            None if mount_dev(&self.mountpoint).is_some()
                && mount_dev(&self.mountpoint) == self.dev =>
            {
                rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::empty())
                    .map_err(io::Error::from)
            }
            None => Ok(()),
        };
        if let Err(e) = unmounted {
            warn!(mount = %self.mountpoint.display(), error = %e, "unmount failed (busy?); detaching lazily");
            if let Err(e) = detach(&self.mountpoint) {
                warn!(mount = %self.mountpoint.display(), error = %e, "lazy detach failed");
            }
        }
        let deadline = std::time::Instant::now() + UNMOUNT_GRACE;
        while !self.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if !self.is_finished() {
            warn!(
                mount = %self.mountpoint.display(),
                "the filesystem is still in use (a container or process holds it); aborting its FUSE connection: they get ENOTCONN until restarted"
            );
            match self.dev.map(abort_connection) {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    warn!(error = %e, "cannot abort the FUSE connection; it ends when this process exits");
                    return;
                }
                None => return,
            }
        }
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "fuse session ended with an error"),
                Err(_) => warn!("fuse session thread panicked"),
            }
        }
        info!(mount = %self.mountpoint.display(), "unmounted");
    }

    /// Stops serving without ending the connection, for a successor: no request is read from
    /// here on. Once every request already read is answered (the caller waits for those
    /// dispatched to tokio), `HandedOff::release_waits` gives the fd that is then all that
    /// holds the connection. Nothing is unmounted.
    pub fn hand_off(mut self) -> HandedOff {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(error = %e, "fuse session ended with an error while handing off")
                }
                Err(_) => warn!("fuse session thread panicked while handing off"),
            }
        }
        HandedOff {
            fd: self.fd,
            deferred: self.deferred,
            notifier: self.notifier,
        }
    }

    /// The connection's /dev/fuse fd, for the service manager's fd store.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The mount's device number.
    pub fn dev(&self) -> Option<u64> {
        self.dev
    }

    /// Whether the kernel ended the session by itself (someone ran `umount`).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:45 / /mnt/a\\040b rw,nosuid,nodev,relatime shared:20 - fuse.shoal shoal rw,user_id=0
41 22 0:46 / /mnt/x rw,relatime - fuse.shoal shoal rw
42 22 0:47 / /mnt/x rw,relatime master:3 - tmpfs tmp\\011fs rw
";

    fn check(path: &str, expected: Option<(u64, &str, &str)>) {
        let found = find_mount(INFO, path);
        let expected = expected.map(|(dev, fs_type, source)| MountLine {
            dev,
            fs_type: fs_type.into(),
            source: source.into(),
        });
        assert_eq!(found, expected);
    }

    #[test]
    fn a_mount_point_with_a_space_is_found_by_its_real_name() {
        check(
            "/mnt/a b",
            Some((rustix::fs::makedev(0, 45), "fuse.shoal", "shoal")),
        );
        check("/mnt/a\\040b", None);
    }

    #[test]
    fn the_topmost_of_two_mounts_on_one_path_wins_and_its_source_is_decoded() {
        check(
            "/mnt/x",
            Some((rustix::fs::makedev(0, 47), "tmpfs", "tmp\tfs")),
        );
    }

    #[test]
    fn a_path_that_is_no_mount_point_is_none() {
        check("/mnt", None);
    }

    #[test]
    fn escapes_decode_and_anything_else_stays() {
        assert_eq!(unescape("a\\134b\\012c\\043d"), "a\\b\nc#d");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
        assert_eq!(unescape("\\777"), "\\777");
    }
}
