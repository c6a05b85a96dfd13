// PERF-CRITICAL: every kernel request passes through here.
//! The FUSE adapter: translates kernel requests into `Node` operations and their outcomes into
//! replies. Errors become errnos here and nowhere else.
//!
//! Requests that only read local metadata are answered on the FUSE thread; requests that wait
//! on Raft or on block I/O are spawned onto tokio with their reply, so a slow read never holds
//! up other operations.

pub mod errno;
pub mod mount;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLock, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use shoal_raft::{FileKind, FsError, Ino, Inode, Nanos, SetAttr, XattrMode};
use tracing::{Instrument, debug, warn};

use crate::metrics::OpTimer;
use crate::node::{Node, OpError, now_nanos};
use crate::ops::{NewEntry, WriteAck, range_lock};

pub use mount::{MountError, MountHandle, mount};

/// How long the kernel may cache attributes and entries. Every change on a single node goes
/// through this kernel, which updates or drops its cache itself.
const TTL: Duration = Duration::from_secs(1);
/// The largest write the kernel sends in one request.
pub const MAX_WRITE: u32 = 1 << 20;
/// Reported as st_blksize: the I/O size applications should use.
const BLKSIZE: u32 = 1 << 20;

type DirListing = Arc<Vec<(Ino, FileKind, Vec<u8>)>>;

/// Lock waits a daemon handing over its mount stopped without answering, for the kernel to
/// resend to its successor (`MountHandle::release_waits`).
pub(crate) type Deferred = Arc<std::sync::Mutex<Vec<ReplyEmpty>>>;

pub struct ShoalFs {
    node: Arc<Node>,
    deferred: Deferred,
    rt: tokio::runtime::Handle,
    next_fh: AtomicU64,
    /// The first handle this daemon gave out.
    first_fh: u64,
    dirs: std::sync::Mutex<std::collections::HashMap<u64, DirListing>>,
}

fn errno(e: &OpError) -> Errno {
    Errno::from_i32(errno::of(e))
}

fn time(ns: Nanos) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn nanos(t: SystemTime) -> Nanos {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as Nanos,
        Err(e) => -(e.duration().as_nanos() as Nanos),
    }
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

pub fn attr(i: &Inode) -> FileAttr {
    FileAttr {
        ino: INodeNo(i.ino),
        size: i.size,
        blocks: i.size.div_ceil(512),
        atime: time(i.atime),
        mtime: time(i.mtime),
        ctime: time(i.ctime),
        crtime: time(i.crtime),
        kind: file_type(i.kind),
        perm: (i.perm & 0o7777) as u16,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        blksize: BLKSIZE,
        flags: 0,
    }
}

fn kind_of_mode(mode: u32) -> Option<FileKind> {
    Some(match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => FileKind::File,
        libc::S_IFDIR => FileKind::Dir,
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        libc::S_IFCHR => FileKind::CharDev,
        libc::S_IFBLK => FileKind::BlockDev,
        libc::S_IFLNK => FileKind::Symlink,
        _ => return None,
    })
}

fn time_or_now(t: TimeOrNow) -> Nanos {
    match t {
        TimeOrNow::SpecificTime(t) => nanos(t),
        TimeOrNow::Now => now_nanos(),
    }
}

/// A file handle carries the session epoch it was opened in above this bit, and a counter
/// below it.
const EPOCH_SHIFT: u32 = 40;

fn file_handle(epoch: u64, seq: u64) -> FileHandle {
    FileHandle((epoch << EPOCH_SHIFT) | (seq & ((1 << EPOCH_SHIFT) - 1)))
}

impl ShoalFs {
    pub fn new(node: Arc<Node>, rt: tokio::runtime::Handle, deferred: Deferred) -> ShoalFs {
        let first_fh = crate::node::now_nanos().max(1_000) as u64 / 1_000;
        ShoalFs {
            deferred,
            first_fh,
            node,
            rt,
            // Above every handle a previous daemon on this connection gave out (it started
            // earlier and gave fewer than one a microsecond), so a directory handle the
            // kernel still holds from it never names one of ours.
            next_fh: AtomicU64::new(first_fh),
            dirs: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// EIO for a file handle opened before this node's session expired and was replaced: its
    /// locks are gone, so what it writes must not land (fencing). New opens of the same file
    /// get handles of the new epoch.
    fn fenced(&self, fh: FileHandle) -> Option<Errno> {
        let epoch = fh.0 >> EPOCH_SHIFT;
        self.node.check_handle(epoch).err().map(|e| errno(&e))
    }

    /// Runs `f` on tokio with a clone of the node.
    /// Runs `f` on tokio with a clone of the node; the operation's timer `t` stops when it
    /// is done (it has replied).
    fn spawn<F, Fut>(&self, t: OpTimer, f: F)
    where
        F: FnOnce(Arc<Node>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let fut = f(self.node.clone());
        self.rt.spawn(
            async move {
                fut.await;
                drop(t);
            }
            .instrument(self.node.span().clone()),
        );
    }

    fn new_entry(
        &self,
        t: OpTimer,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        e: NewEntry,
        reply: ReplyEntry,
    ) {
        let name = name.as_bytes().to_vec();
        let e = NewEntry {
            uid: req.uid(),
            gid: req.gid(),
            ..e
        };
        self.spawn(t, move |node| async move {
            match node.create(parent.0, &name, e).await {
                Ok(i) => reply.entry(&TTL, &attr(&i), Generation(i.generation)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn reply_empty<Fut>(&self, t: OpTimer, reply: ReplyEmpty, fut: impl FnOnce(Arc<Node>) -> Fut)
    where
        Fut: std::future::Future<Output = Result<(), OpError>> + Send + 'static,
    {
        let fut = fut(self.node.clone());
        let span = self.node.span().clone();
        self.rt.spawn(
            async move {
                match fut.await {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(errno(&e)),
                }
                drop(t);
            }
            .instrument(span),
        );
    }

    /// The listing a directory handle reads. One this daemon did not give out was opened by
    /// the daemon it took the mount over from: the directory is listed again for it.
    fn listing(&self, ino: INodeNo, fh: FileHandle) -> Result<DirListing, Errno> {
        let mut dirs = self.dirs.lock().expect("dirs lock");
        if let Some(list) = dirs.get(&fh.0) {
            return Ok(list.clone());
        }
        if fh.0 >= self.first_fh {
            return Err(Errno::EBADF);
        }
        let list = Arc::new(self.node.readdir(ino.0).map_err(|e| errno(&e))?);
        dirs.insert(fh.0, list.clone());
        Ok(list)
    }
}

impl Filesystem for ShoalFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = [
            InitFlags::FUSE_ASYNC_READ,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_MAX_PAGES,
            InitFlags::FUSE_POSIX_LOCKS,
            // flock(2) reaches us as a whole-file lock owned by the open file description (the
            // kernel does the same for NFS), so it holds across nodes too.
            InitFlags::FUSE_FLOCK_LOCKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_CACHE_SYMLINKS,
        ];
        for flag in wanted {
            if let Err(missing) = config.add_capabilities(flag) {
                warn!(capability = ?missing, "the kernel does not offer this FUSE capability");
            }
        }
        if let Err(max) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(max);
        }
        if let Err(max) = config.set_max_readahead(4 << 20) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        debug!(capabilities = ?config.capabilities(), "fuse session initialised");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let t = self.node.metrics.fuse_op("lookup");
        let _in_node = self.node.span().enter();
        let name = name.as_bytes().to_vec();
        match self.node.lookup(parent.0, &name) {
            Ok(i) => {
                if let Some(d) = slow_lookup() {
                    std::thread::sleep(d);
                }
                entry(&self.node, reply, &i);
            }
            Err(OpError::Fs(FsError::NotFound)) if self.node.cluster().is_some() => {
                // Maybe created on another node and not applied here yet: ask the leader.
                self.spawn(t, move |node| async move {
                    match node.lookup_linearizable(parent.0, &name).await {
                        Ok(i) => entry(&node, reply, &i),
                        Err(e) => reply.error(errno(&e)),
                    }
                });
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _t = self.node.metrics.fuse_op("getattr");
        let _in_node = self.node.span().enter();
        match self.node.getattr(ino.0) {
            Ok(i) => reply.attr(&TTL, &attr(&i)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let t = self.node.metrics.fuse_op("setattr");
        let _in_node = self.node.span().enter();
        let change = SetAttr {
            perm: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: atime.map(time_or_now),
            mtime: mtime.map(time_or_now),
            ctime: None,
        };
        self.spawn(t, move |node| async move {
            match node.setattr(ino.0, change).await {
                Ok(i) => reply.attr(&TTL, &attr(&i)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _t = self.node.metrics.fuse_op("readlink");
        let _in_node = self.node.span().enter();
        match self.node.getattr(ino.0) {
            Ok(i) if i.kind == FileKind::Symlink => reply.data(&i.target),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let t = self.node.metrics.fuse_op("mknod");
        let _in_node = self.node.span().enter();
        let Some(kind) =
            kind_of_mode(mode).filter(|k| !matches!(k, FileKind::Dir | FileKind::Symlink))
        else {
            reply.error(Errno::EINVAL);
            return;
        };
        let e = NewEntry {
            kind,
            perm: mode & 0o7777,
            uid: 0,
            gid: 0,
            rdev,
            target: Vec::new(),
        };
        self.new_entry(t, req, parent, name, e, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let t = self.node.metrics.fuse_op("mkdir");
        let _in_node = self.node.span().enter();
        shoal_raft::failpoint::hit("fuse-mkdir");
        let e = NewEntry {
            kind: FileKind::Dir,
            perm: mode & 0o7777,
            uid: 0,
            gid: 0,
            rdev: 0,
            target: Vec::new(),
        };
        self.new_entry(t, req, parent, name, e, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let t = self.node.metrics.fuse_op("unlink");
        let _in_node = self.node.span().enter();
        let name = name.as_bytes().to_vec();
        self.reply_empty(t, reply, move |node| async move {
            node.unlink(parent.0, &name).await
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let t = self.node.metrics.fuse_op("rmdir");
        let _in_node = self.node.span().enter();
        let name = name.as_bytes().to_vec();
        self.reply_empty(t, reply, move |node| async move {
            node.rmdir(parent.0, &name).await
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let t = self.node.metrics.fuse_op("symlink");
        let _in_node = self.node.span().enter();
        let e = NewEntry {
            kind: FileKind::Symlink,
            perm: 0o777,
            uid: 0,
            gid: 0,
            rdev: 0,
            target: target.as_os_str().as_bytes().to_vec(),
        };
        self.new_entry(t, req, parent, link_name, e, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let t = self.node.metrics.fuse_op("rename");
        let _in_node = self.node.span().enter();
        if flags.contains(RenameFlags::RENAME_WHITEOUT)
            || flags.contains(RenameFlags::RENAME_NOREPLACE | RenameFlags::RENAME_EXCHANGE)
        {
            reply.error(Errno::EINVAL);
            return;
        }
        let flags = shoal_raft::RenameFlags {
            noreplace: flags.contains(RenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(RenameFlags::RENAME_EXCHANGE),
        };
        let (name, newname) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        self.reply_empty(t, reply, move |node| async move {
            node.rename(parent.0, &name, newparent.0, &newname, flags)
                .await
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let t = self.node.metrics.fuse_op("link");
        let _in_node = self.node.span().enter();
        let newname = newname.as_bytes().to_vec();
        self.spawn(t, move |node| async move {
            match node.link(ino.0, newparent.0, &newname).await {
                Ok(i) => reply.entry(&TTL, &attr(&i), Generation(i.generation)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let t = self.node.metrics.fuse_op("open");
        let _in_node = self.node.span().enter();
        let seq = self.fh();
        self.spawn(t, move |node| async move {
            let epoch = node.epoch();
            match node.open(ino.0).await {
                Ok((i, _)) if i.kind == FileKind::Dir => reply.error(Errno::EISDIR),
                Ok((_, keep)) => reply.opened(file_handle(epoch, seq), keep_cache(keep)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let t = self.node.metrics.fuse_op("read");
        let _in_node = self.node.span().enter();
        self.spawn(t, move |node| async move {
            match node.read(ino.0, offset, size as usize).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let t = self.node.metrics.fuse_op("write");
        let _in_node = self.node.span().enter();
        if let Some(e) = self.fenced(fh) {
            reply.error(e);
            return;
        }
        let len = data.len() as u32;
        match self.node.write(ino.0, offset, data) {
            Ok(WriteAck::Buffered) => reply.written(len),
            Ok(WriteAck::Commit(file)) => {
                reply.written(len);
                file.commit_in_background(&self.node);
            }
            Ok(WriteAck::CommitFirst(file)) => self.spawn(t, move |node| async move {
                match file.commit(&node).await {
                    Ok(()) => reply.written(len),
                    Err(e) => reply.error(errno(&e)),
                }
            }),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let t = self.node.metrics.fuse_op("flush");
        let _in_node = self.node.span().enter();
        // A fenced handle's close still drops its process's locks (and commits what newer
        // handles wrote), then reports the fencing.
        let fenced = self.fenced(fh);
        self.reply_empty(t, reply, move |node| async move {
            node.flush(ino.0, lock_owner.0).await?;
            match fenced {
                Some(_) => Err(OpError::Fenced),
                None => Ok(()),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let t = self.node.metrics.fuse_op("release");
        let _in_node = self.node.span().enter();
        let flock_owner = lock_owner.map(|o| o.0);
        self.reply_empty(t, reply, move |node| async move {
            node.release(ino.0, flock_owner).await
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let t = self.node.metrics.fuse_op("fsync");
        let _in_node = self.node.span().enter();
        if let Some(e) = self.fenced(fh) {
            reply.error(e);
            return;
        }
        self.reply_empty(
            t,
            reply,
            move |node| async move { node.commit(ino.0).await },
        );
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _t = self.node.metrics.fuse_op("opendir");
        let _in_node = self.node.span().enter();
        match self.node.readdir(ino.0) {
            Ok(list) => {
                let fh = self.fh();
                self.dirs
                    .lock()
                    .expect("dirs lock")
                    .insert(fh, Arc::new(list));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _t = self.node.metrics.fuse_op("readdir");
        let _in_node = self.node.span().enter();
        let list = match self.listing(ino, fh) {
            Ok(list) => list,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        for (i, (ino, kind, name)) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(*ino),
                i as u64 + 1,
                file_type(*kind),
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _t = self.node.metrics.fuse_op("readdirplus");
        let _in_node = self.node.span().enter();
        let list = match self.listing(ino, fh) {
            Ok(list) => list,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        for (i, (ino, _, name)) in list.iter().enumerate().skip(offset as usize) {
            // An entry removed since opendir is skipped rather than reported stale.
            let Ok(inode) = self.node.getattr(*ino) else {
                continue;
            };
            if reply.add(
                INodeNo(*ino),
                i as u64 + 1,
                OsStr::from_bytes(name),
                &attr_ttl(&self.node, *ino),
                &attr(&inode),
                Generation(inode.generation),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _t = self.node.metrics.fuse_op("releasedir");
        let _in_node = self.node.span().enter();
        self.dirs.lock().expect("dirs lock").remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _t = self.node.metrics.fuse_op("fsyncdir");
        let _in_node = self.node.span().enter();
        // Namespace changes are durable in the Raft log before they return.
        match self.node.getattr(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let _t = self.node.metrics.fuse_op("statfs");
        let _in_node = self.node.span().enter();
        match self.node.statfs(ino.0) {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, 255, s.bsize,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let t = self.node.metrics.fuse_op("setxattr");
        let _in_node = self.node.span().enter();
        let mode = match flags {
            0 => XattrMode::Set,
            libc::XATTR_CREATE => XattrMode::Create,
            libc::XATTR_REPLACE => XattrMode::Replace,
            _ => {
                reply.error(Errno::EINVAL);
                return;
            }
        };
        let name = name.as_bytes().to_vec();
        if name.starts_with(b"system.posix_acl_") {
            reply.error(Errno::from_i32(libc::EOPNOTSUPP));
            return;
        }
        let value = value.to_vec();
        self.reply_empty(t, reply, move |node| async move {
            node.setxattr(ino.0, &name, &value, mode).await
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _t = self.node.metrics.fuse_op("getxattr");
        let _in_node = self.node.span().enter();
        reply_xattr(self.node.getxattr(ino.0, name.as_bytes()), size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _t = self.node.metrics.fuse_op("listxattr");
        let _in_node = self.node.span().enter();
        reply_xattr(self.node.listxattr(ino.0), size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let t = self.node.metrics.fuse_op("removexattr");
        let _in_node = self.node.span().enter();
        let name = name.as_bytes().to_vec();
        self.reply_empty(t, reply, move |node| async move {
            node.removexattr(ino.0, &name).await
        });
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let _t = self.node.metrics.fuse_op("access");
        let _in_node = self.node.span().enter();
        // With default_permissions the kernel checks permissions; this only checks existence.
        match self.node.getattr(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let t = self.node.metrics.fuse_op("create");
        let _in_node = self.node.span().enter();
        let name = name.as_bytes().to_vec();
        let e = NewEntry {
            kind: FileKind::File,
            perm: mode & 0o7777,
            uid: req.uid(),
            gid: req.gid(),
            rdev: 0,
            target: Vec::new(),
        };
        let seq = self.fh();
        self.spawn(t, move |node| async move {
            let epoch = node.epoch();
            let created = node
                .create(parent.0, &name, e)
                .await
                .and_then(|i| node.open_applied(i.ino));
            match created {
                Ok((i, keep)) => reply.created(
                    &TTL,
                    &attr(&i),
                    Generation(i.generation),
                    file_handle(epoch, seq),
                    keep_cache(keep),
                ),
                // open(O_CREAT) without O_EXCL opens the file if it exists: another node made
                // the name after this node's lookup missed it. ESTALE makes the kernel redo the
                // whole open with a fresh lookup (LOOKUP_REVAL), which finds that file and
                // opens it with the kernel's own permission, O_TRUNC and symlink handling.
                Err(OpError::Fs(FsError::Exists)) if flags & libc::O_EXCL == 0 => {
                    debug!(
                        parent = parent.0,
                        "O_CREAT raced another node's create; reopening"
                    );
                    reply.error(Errno::ESTALE)
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let _t = self.node.metrics.fuse_op("getlk");
        let _in_node = self.node.span().enter();
        let Some((probe, _)) = range_lock(self.node.lock_owner(lock_owner.0), pid, typ, start, end)
        else {
            reply.error(Errno::EINVAL);
            return;
        };
        match self.node.getlk(ino.0, &probe) {
            Ok(Some(l)) => {
                let typ = match l.kind {
                    shoal_raft::LockKind::Read => libc::F_RDLCK,
                    shoal_raft::LockKind::Write => libc::F_WRLCK,
                };
                reply.locked(l.start, l.end, typ, l.pid);
            }
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let t = self.node.metrics.fuse_op("setlk");
        let _in_node = self.node.span().enter();
        let Some((lock, unlock)) =
            range_lock(self.node.lock_owner(lock_owner.0), pid, typ, start, end)
        else {
            reply.error(Errno::EINVAL);
            return;
        };
        if !unlock && let Some(e) = self.fenced(fh) {
            reply.error(e);
            return;
        }
        let deferred = self.deferred.clone();
        let span = self.node.span().clone();
        let node = self.node.clone();
        self.rt.spawn(
            async move {
                match node.setlk(ino.0, lock, unlock, sleep).await {
                    Ok(()) => reply.ok(),
                    // The daemon is handing its mount over: the successor answers this wait.
                    Err(OpError::Interrupted) => {
                        deferred.lock().expect("deferred lock").push(reply)
                    }
                    Err(e) => reply.error(errno(&e)),
                }
                drop(t);
            }
            .instrument(span),
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let t = self.node.metrics.fuse_op("fallocate");
        let _in_node = self.node.span().enter();
        if let Some(e) = self.fenced(fh) {
            reply.error(e);
            return;
        }
        self.reply_empty(t, reply, move |node| async move {
            node.fallocate(ino.0, offset, length, mode).await
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _t = self.node.metrics.fuse_op("lseek");
        let _in_node = self.node.span().enter();
        if offset < 0 {
            reply.error(Errno::EINVAL);
            return;
        }
        match self.node.lseek(ino.0, offset as u64, whence) {
            Ok(pos) => reply.offset(pos as i64),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        let _t = self.node.metrics.fuse_op("ioctl");
        let _in_node = self.node.span().enter();
        // Not a terminal, nor anything else an ioctl could ask of: what a local filesystem
        // answers to the probes programs make on every open (Python's isatty, for one). Quiet:
        // fuser's default logs a warning for each.
        reply.error(Errno::ENOTTY);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let t = self.node.metrics.fuse_op("copy_file_range");
        let _in_node = self.node.span().enter();
        if let Some(e) = self.fenced(fh_out) {
            reply.error(e);
            return;
        }
        let len = len.min(1 << 30);
        self.spawn(t, move |node| async move {
            match node
                .copy_range(ino_in.0, offset_in, ino_out.0, offset_out, len)
                .await
            {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }
}

fn keep_cache(keep: bool) -> FopenFlags {
    if keep {
        FopenFlags::FOPEN_KEEP_CACHE
    } else {
        FopenFlags::empty()
    }
}

fn reply_xattr(value: Result<Vec<u8>, OpError>, size: u32, reply: ReplyXattr) {
    match value {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(OpError::Fs(FsError::NoAttr)) => reply.error(Errno::from_i32(libc::ENODATA)),
        Err(e) => reply.error(errno(&e)),
    }
}

/// How long the kernel may keep the attributes of `ino` that a lookup reply gives it: not at
/// all when another node changed it lately, since the reply may carry what was there before a
/// change whose invalidation reached the kernel first (`invalidate`).
fn attr_ttl(node: &Node, ino: u64) -> Duration {
    if node.changed_lately(ino) {
        Duration::ZERO
    } else {
        TTL
    }
}

/// Answers a lookup with `i`: the entry for the TTL, its attributes per `attr_ttl`.
fn entry(node: &Node, reply: ReplyEntry, i: &Inode) {
    reply.entry_with_ttls(
        &attr_ttl(node, i.ino),
        &TTL,
        &attr(i),
        Generation(i.generation),
    );
}

/// `Faults::slow_lookup`: the window in which an invalidation of what a lookup read can reach
/// the kernel before its answer.
fn slow_lookup() -> Option<Duration> {
    crate::faults::get().slow_lookup
}
