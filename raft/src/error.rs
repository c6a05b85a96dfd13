//! Errors of the metadata layer.
//!
//! POSIX outcomes (`FsError`) are reply data: a command that fails with `NotFound` was still
//! applied, deterministically, on every replica. `StoreError` is a failure of the store itself.

use serde::{Deserialize, Serialize};

/// A POSIX outcome of a command. Mapped to an errno once, at the FUSE boundary.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument")]
    Invalid,
    #[error("file name too long")]
    NameTooLong,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("too many links")]
    TooManyLinks,
    #[error("no such attribute")]
    NoAttr,
    #[error("attribute list or value too large")]
    TooLarge,
    #[error("lock held by another owner")]
    WouldBlock,
    #[error("file too large")]
    FileTooBig,
    #[error("operation not supported")]
    NotSupported,
    #[error("this node's session expired: its locks were released and its writes are refused")]
    SessionExpired,
    /// The volume is mounted on some node.
    #[error("the volume is in use")]
    Busy,
    /// Several volumes in the trash have the name: say which one.
    #[error("several volumes match")]
    Ambiguous,
    /// A copy of a request whose answer its proposer already has: not applied.
    #[error("a late copy of a request that was already answered")]
    Stale,
    /// The change would take a volume beyond its quota.
    #[error("disk quota exceeded")]
    QuotaExceeded,
    /// A rename or link across a volume's boundary.
    #[error("invalid cross-device link")]
    CrossDevice,
}

/// A failure of the metadata store itself: corrupt or unreadable state, or an I/O error in sled.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt metadata record {what}: {source}")]
    Decode {
        what: &'static str,
        source: postcard::Error,
    },
    #[error("metadata invariant broken: {0}")]
    Invariant(String),
}

/// A volume name or node label shoal refuses, with what it accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "invalid volume name {0:?}: use 1 to 255 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit"
    )]
    Volume(String),
    #[error("invalid label key {0:?}: use 1 to 63 characters of A-Z a-z 0-9 . _ - /")]
    LabelKey(String),
    #[error("invalid label value {0:?}: use up to 128 characters of A-Z a-z 0-9 . _ - /")]
    LabelValue(String),
}
