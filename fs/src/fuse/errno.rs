//! The errno an application sees for each failure: made here, and nowhere else.

use libc::*;
use shoal_raft::FsError;

use crate::blocks::BlockError;
use crate::node::OpError;

/// The errno for a failed operation.
pub fn of(e: &OpError) -> i32 {
    match e {
        OpError::Fs(e) => of_fs(*e),
        OpError::Block(BlockError::Io { source, .. }) | OpError::Disk(source) => {
            source.raw_os_error().unwrap_or(EIO)
        }
        OpError::Block(_) => EIO,
        OpError::NoSpace => ENOSPC,
        OpError::NotOpen => EBADF,
        OpError::Interrupted => EINTR,
        OpError::PastEnd => ENXIO,
        OpError::Raft(_)
        | OpError::Replication(_)
        | OpError::Fenced
        | OpError::Unlanded
        | OpError::Store(_) => EIO,
        OpError::Earlier(e) => of(e),
    }
}

/// The errno for a POSIX outcome of the state machine.
pub fn of_fs(e: FsError) -> i32 {
    match e {
        FsError::NotFound => ENOENT,
        FsError::Exists => EEXIST,
        FsError::NotDir => ENOTDIR,
        FsError::IsDir => EISDIR,
        FsError::NotEmpty => ENOTEMPTY,
        FsError::Invalid => EINVAL,
        FsError::NameTooLong => ENAMETOOLONG,
        FsError::NotPermitted => EPERM,
        FsError::TooManyLinks => EMLINK,
        FsError::NoAttr => ENODATA,
        FsError::TooLarge => E2BIG,
        FsError::WouldBlock => EAGAIN,
        FsError::FileTooBig => EFBIG,
        FsError::NotSupported => EOPNOTSUPP,
        FsError::SessionExpired => EIO,
        FsError::Busy => EBUSY,
        FsError::Ambiguous => EINVAL,
        FsError::Stale => EIO,
        FsError::QuotaExceeded => EDQUOT,
        FsError::CrossDevice => EXDEV,
    }
}
