//! The data model: inodes, directory entries, file layouts, locks, and the commands that change them.

use serde::{Deserialize, Serialize};

use crate::error::NameError;

/// An inode number. Numbers are allocated by the state machine from a counter and never reused.
pub type Ino = u64;

/// The root directory of the filesystem.
pub const ROOT_INO: Ino = 1;

/// Files are laid out in chunks of this many bytes; each chunk has its own list of slices.
pub const CHUNK_SIZE: u64 = 64 << 20;

/// The longest name a directory entry may have, as on ext4.
pub const NAME_MAX: usize = 255;

/// The most hard links an inode may have, as on ext4.
pub const LINK_MAX: u32 = 65_000;

/// Time in nanoseconds since the Unix epoch. Negative values are before 1970.
pub type Nanos = i64;

/// How long a session lives without a renewal. A node that stops renewing (dead, frozen,
/// partitioned) loses its locks this long after its last renewal, and is fenced from then on.
pub const SESSION_LEASE: Nanos = 5_000_000_000;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// The content hash of a block: blake3 of its bytes.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub [u8; 32]);

impl BlockId {
    pub fn of(data: &[u8]) -> BlockId {
        BlockId(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<BlockId> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(BlockId(out))
    }
}

impl std::fmt::Debug for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl std::fmt::Display for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A run of file bytes stored in a block: bytes `[off, off + len)` of the file are bytes
/// `[block_off, block_off + len)` of `block`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    pub off: u64,
    pub len: u32,
    pub block: BlockId,
    pub block_off: u32,
    /// The length of the whole block, so a reader can fetch and verify it without another lookup.
    pub block_len: u32,
}

impl Slice {
    pub fn end(&self) -> u64 {
        self.off + u64::from(self.len)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u32,
    pub rdev: u32,
    pub atime: Nanos,
    pub mtime: Nanos,
    pub ctime: Nanos,
    pub crtime: Nanos,
    pub generation: u64,
    /// For directories: the parent directory (the root is its own parent).
    pub parent: Ino,
    /// For directories: the number of entries.
    pub children: u64,
    /// For symlinks: the target.
    pub target: Vec<u8>,
    /// The root directory of the volume this inode belongs to (a volume's root names itself),
    /// or 0 outside every volume. Set at creation from the parent; names never move across
    /// a volume's boundary (`CrossDevice`), so it never changes.
    pub volume: Ino,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dentry {
    pub ino: Ino,
    pub kind: FileKind,
}

/// Who holds a byte-range lock: a daemon session and the kernel's lock owner within it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LockOwner {
    pub session: u64,
    pub owner: u64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    Read,
    Write,
}

/// A POSIX (fcntl) byte-range lock on `[start, end]`, both inclusive, as FUSE sends them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeLock {
    pub owner: LockOwner,
    pub pid: u32,
    pub kind: LockKind,
    pub start: u64,
    pub end: u64,
}

impl RangeLock {
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }
}

/// Attribute changes of a setattr; `None` leaves a field alone.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Nanos>,
    pub mtime: Option<Nanos>,
    pub ctime: Option<Nanos>,
}

/// What `fallocate` does to a range.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallocate {
    /// Make the range part of the file, growing the size unless `keep_size`.
    Allocate { keep_size: bool },
    /// Make the range read as zeros without changing the size.
    PunchHole,
    /// Make the range read as zeros, growing the size unless `keep_size`.
    ZeroRange { keep_size: bool },
}

/// One metadata mutation. Every field it needs, including times and ids, travels inside it,
/// so applying it is deterministic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum MetaCommand {
    /// Creates a file, directory, symlink or special file named `name` in `parent`.
    Create {
        parent: Ino,
        name: Vec<u8>,
        kind: FileKind,
        perm: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        target: Vec<u8>,
    },
    Link {
        ino: Ino,
        new_parent: Ino,
        new_name: Vec<u8>,
    },
    Unlink {
        parent: Ino,
        name: Vec<u8>,
    },
    Rmdir {
        parent: Ino,
        name: Vec<u8>,
    },
    Rename {
        parent: Ino,
        name: Vec<u8>,
        new_parent: Ino,
        new_name: Vec<u8>,
        flags: RenameFlags,
    },
    SetAttr {
        ino: Ino,
        attr: SetAttr,
    },
    /// Commits written data: the slices, in write order, replace what they cover.
    Write {
        ino: Ino,
        slices: Vec<Slice>,
        /// The file size after the write, at least the end of every slice.
        size: u64,
    },
    Fallocate {
        ino: Ino,
        off: u64,
        len: u64,
        mode: Fallocate,
    },
    /// Makes `[dst_off, dst_off + len)` of `dst` share the blocks of `[src_off, src_off + len)` of `src`.
    CopyRange {
        src: Ino,
        src_off: u64,
        dst: Ino,
        dst_off: u64,
        len: u64,
    },
    SetXattr {
        ino: Ino,
        name: Vec<u8>,
        value: Vec<u8>,
        mode: XattrMode,
    },
    RemoveXattr {
        ino: Ino,
        name: Vec<u8>,
    },
    /// Deletes an inode whose last link is gone once no session has it open.
    Purge {
        ino: Ino,
    },
    /// Sets or clears a POSIX byte-range lock.
    SetLock {
        ino: Ino,
        lock: RangeLock,
        unlock: bool,
    },
    /// Releases every lock `owner` holds on `ino` (close of a file releases the process's locks).
    ReleaseLocks {
        ino: Ino,
        owner: LockOwner,
    },
    /// A daemon started a new session: locks and orphans of its older sessions are released.
    OpenSession {
        node: u64,
        session: u64,
    },
    /// Extends the proposing session's lease by `SESSION_LEASE` from the command's time.
    RenewSession,
    /// Ends every session whose lease ran out before the command's time: their locks are
    /// released and their later commands refused.
    ExpireSessions,
    /// Forgets blocks that were garbage and have been deleted from disk.
    ForgetGarbage {
        blocks: Vec<BlockId>,
    },
    /// Sets the hash of the secret that join tokens must carry; older tokens stop working.
    SetJoinSecret {
        hash: [u8; 32],
    },
    /// Allocates the id of a node that is joining.
    AllocNodeId,
    /// A node reports the state of its data disk (sent every few seconds by each node).
    ReportNode {
        node: u64,
        disk_total: u64,
        disk_free: u64,
        /// The host's name, so that messages can name hosts rather than node ids.
        hostname: String,
        /// The fingerprint of the CA that signed the node's certificate (zeros without one).
        issuer: [u8; 32],
    },
    /// Sets (`Some`) or removes (`None`) a label of a node; keys and values as
    /// [`check_label`] allows.
    SetNodeLabel {
        node: u64,
        key: String,
        value: Option<String>,
    },
    /// Creates volume `name`: the directory `/volumes/NAME` and its record. If a live volume
    /// has the name already, succeeds without a change when every option asked is one it has
    /// (Docker creates a volume from every host that needs it), and fails with `Exists`
    /// otherwise. Removed volumes in the trash do not hold their name.
    CreateVolume {
        name: String,
        options: VolumeOptions,
    },
    /// Moves a volume that no node mounts to the trash (`/.trash/ID`, `ID` its root inode)
    /// and frees its name.
    TrashVolume {
        name: String,
    },
    /// Brings a volume back from the trash: the generation `id` of `name`, or its newest,
    /// under `rename` or its own name. Fails with `Exists` while a live volume has that name.
    RestoreVolume {
        name: String,
        id: Option<Ino>,
        rename: Option<String>,
    },
    /// Deletes a volume in the trash with everything in it: the generation `id` of `name`, or
    /// its only one (`Ambiguous` when there are several). With `trashed`, only if it is still
    /// the same stay in the trash (the retention sweep's guard against a volume that was
    /// restored and removed again meanwhile).
    PurgeVolume {
        name: String,
        id: Option<Ino>,
        trashed: Option<Nanos>,
    },
    /// Sets how long removed volumes stay in the trash.
    SetTrashRetention {
        nanos: Nanos,
    },
    /// Forgets every mount `node` recorded: the node was removed from the cluster, or its
    /// Docker lost track of its containers (`shoal volume forget-mounts`).
    ClearMounts {
        node: u64,
    },
    /// Records that `node` mounted the volume for Docker's mount `id` (`mount: true`), or
    /// unmounted it.
    MountVolume {
        name: String,
        node: u64,
        id: String,
        mount: bool,
    },
    /// Revokes `node`'s certificate: the node was removed, and every member refuses it from
    /// now on, even when it asks to be added again. Node ids are never reused.
    RevokeNode {
        node: u64,
    },
    /// The CA certificates (DER) members accept, the one that signs first: two during a CA
    /// rotation (new, old), one otherwise. Every node follows it (`shoal ca rotate|retire`).
    SetTrust {
        cas: Vec<Vec<u8>>,
    },
    /// Commits a small write whose blocks ride in the entry itself: the one log flush that
    /// makes the layout durable makes the bytes durable too. The state machine keeps the
    /// blocks (`InlineBlock`) until a node writes them out as block files (`Spill`).
    WriteInline {
        ino: Ino,
        slices: Vec<Slice>,
        size: u64,
        /// The volume whose policy the blocks follow once written out.
        volume: Ino,
        /// The blocks the slices name, each whole.
        blocks: Vec<Vec<u8>>,
    },
    /// These inline blocks are now block files on the nodes their policy names: the state
    /// machine lets go of their bytes. A block is let go only if it is still the copy the
    /// spiller read (same `since`): one freed and written again meanwhile stays.
    Spill {
        blocks: Vec<(BlockId, Nanos)>,
    },
}

/// A block held in the state machine: a small commit's bytes, until written out.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InlineBlock {
    /// When it was committed (apply time).
    pub since: Nanos,
    pub volume: Ino,
    pub data: Vec<u8>,
}

impl MetaCommand {
    /// Whether the proposing node's kernel made this change itself (a FUSE request), so its
    /// caches already hold the outcome. Commands that act on the tree by themselves (volume
    /// commands move and make whole directories; purges, sessions and reports have no FUSE
    /// request behind them) must drop the proposer's caches too.
    pub fn goes_through_kernel(&self) -> bool {
        use MetaCommand::*;
        matches!(
            self,
            Create { .. }
                | Link { .. }
                | Unlink { .. }
                | Rmdir { .. }
                | Rename { .. }
                | SetAttr { .. }
                | Write { .. }
                | WriteInline { .. }
                | Fallocate { .. }
                | CopyRange { .. }
                | SetXattr { .. }
                | RemoveXattr { .. }
                | SetLock { .. }
                | ReleaseLocks { .. }
                | Purge { .. }
        )
    }
}

/// A Docker volume: a directory tree with its own policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    pub name: String,
    /// The volume's directory, `/volumes/NAME` or, in the trash, `/.trash/ROOT`. Never
    /// reused, so it is also the volume's identity: several removed volumes of one name
    /// wait in the trash side by side, told apart by it.
    pub root: Ino,
    pub options: VolumeOptions,
    pub created: Nanos,
    /// When it was moved to the trash.
    pub trashed: Option<Nanos>,
    /// Who has it mounted: (node, Docker's mount id, since).
    pub mounts: Vec<(u64, String, Nanos)>,
}

impl Volume {
    /// Where it is mounted: (node, number of Docker mounts there), by node.
    pub fn mounts_per_node(&self) -> Vec<(u64, usize)> {
        let mut out: Vec<(u64, usize)> = Vec::new();
        for (n, _, _) in &self.mounts {
            match out.iter_mut().find(|(m, _)| m == n) {
                Some((_, count)) => *count += 1,
                None => out.push((*n, 1)),
            }
        }
        out.sort_unstable();
        out
    }
}

/// A volume's policy, from `docker volume create -o`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeOptions {
    /// Copies of each block; the cluster default when `None`.
    pub replicas: Option<u32>,
    /// Quota in bytes.
    pub size: Option<u64>,
    /// Label constraints on the nodes that hold replicas: (key, equal, value).
    pub placement: Vec<(String, bool, String)>,
    /// The volume this one was cloned from, if any (its tree and blocks at creation).
    pub from: Option<String>,
}

impl VolumeOptions {
    /// Where the options `asked` of a Create differ from these, which a volume has: for each
    /// option asked that it does not have, (option, what it has, what is asked). Options not
    /// asked are no difference, so a Create with no options matches every volume.
    pub fn conflicts(&self, asked: &VolumeOptions) -> Vec<(&'static str, String, String)> {
        let text = |o: Option<String>| o.unwrap_or_else(|| "(not set)".into());
        let mut out = Vec::new();
        if asked.replicas.is_some() && asked.replicas != self.replicas {
            out.push((
                "replicas",
                text(self.replicas.map(|r| r.to_string())),
                text(asked.replicas.map(|r| r.to_string())),
            ));
        }
        if asked.size.is_some() && asked.size != self.size {
            out.push((
                "size",
                text(self.size.map(|s| s.to_string())),
                text(asked.size.map(|s| s.to_string())),
            ));
        }
        if !asked.placement.is_empty() && asked.placement != self.placement {
            let has = self.placement_text();
            out.push((
                "placement",
                if has.is_empty() {
                    "(not set)".into()
                } else {
                    has
                },
                asked.placement_text(),
            ));
        }
        if asked.from.is_some() && asked.from != self.from {
            out.push(("from", text(self.from.clone()), text(asked.from.clone())));
        }
        out
    }

    /// Whether a node with these labels may hold the volume's replicas.
    pub fn admits(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.placement
            .iter()
            .all(|(k, equal, v)| (labels.get(k) == Some(v)) == *equal)
    }

    /// The placement rules as written: `storage==ssd,zone!=b`.
    pub fn placement_text(&self) -> String {
        self.placement
            .iter()
            .map(|(k, eq, v)| format!("{k}{}{v}", if *eq { "==" } else { "!=" }))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What a volume holds, kept up to date by every command that changes a size, and its quota.
/// Keyed by the volume's root inode, so the write path finds it from an inode.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeUsage {
    pub name: String,
    /// Quota in bytes (`size=`), if any.
    pub quota: Option<u64>,
    /// The sum of the sizes of the volume's files and symlinks (including unlinked files
    /// still open somewhere, until they are purged).
    pub bytes: u64,
    /// Inodes in the volume, its root included.
    pub inodes: u64,
}

/// Cluster-wide settings, changed with `SetTrashRetention` and the like.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// How long a removed volume stays in the trash before it is purged automatically.
    pub trash_retention: Nanos,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            trash_retention: 24 * 3600 * 1_000_000_000,
        }
    }
}

/// The directory under the root that holds every volume.
pub const VOLUMES_DIR: &[u8] = b"volumes";
/// The directory under the root that holds removed volumes until they are purged.
pub const TRASH_DIR: &[u8] = b".trash";

/// Volume names as Docker allows them: a letter or digit, then letters, digits, `_`, `.`, `-`;
/// at most 255 bytes.
pub fn check_volume_name(name: &str) -> Result<(), NameError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 255
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(NameError::Volume(name.to_string()))
    }
}

/// What the cluster knows of a node beyond its Raft membership.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Operator-set labels, used by volume placement (`placement=storage==ssd`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Size and free space of the file system holding the node's data directory, as last
    /// reported; `reported_at` is 0 until the node reported once.
    pub disk_total: u64,
    pub disk_free: u64,
    pub reported_at: Nanos,
    /// The host's name as the node last reported it (empty before its first report).
    pub hostname: String,
    /// The fingerprint of the CA that signed the certificate the node last reported using.
    pub issuer: [u8; 32],
}

/// Label keys are 1 to 63 and values 0 to 128 characters of `A-Z a-z 0-9 . _ - /`, so that a
/// placement rule such as `storage==ssd,zone!=b` can be parsed without quoting.
pub fn check_label(key: &str, value: &str) -> Result<(), NameError> {
    let ok = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
    };
    if key.is_empty() || key.len() > 63 || !ok(key) {
        return Err(NameError::LabelKey(key.to_string()));
    }
    if value.len() > 128 || !ok(value) {
        return Err(NameError::LabelValue(value.to_string()));
    }
    Ok(())
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrMode {
    /// Create or replace.
    Set,
    /// Fail with `Exists` if the attribute exists.
    Create,
    /// Fail with `NoAttr` if the attribute does not exist.
    Replace,
}

/// A batch of commands proposed together: one Raft entry, applied in order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MetaRequest {
    /// The time every timestamp of the batch gets: the leader's clock, which overwrites the
    /// proposer's when a forwarded proposal arrives (`cluster::handle`), so leases are renewed
    /// and expired against one clock.
    pub now: Nanos,
    /// The proposer's session, which owns the locks the batch takes.
    pub session: u64,
    /// The proposer's number for this request within its session (0: none). A request is
    /// applied once: a repeat (a retry after a lost answer) gets the first one's answer.
    pub seq: u64,
    /// Every request of the session numbered below this has been answered, so the answers
    /// kept for them can go, and a late copy of one of them is refused.
    pub acked: u64,
    pub cmds: Vec<MetaCommand>,
}

impl std::fmt::Display for MetaRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MetaRequest({} commands)", self.cmds.len())
    }
}

/// The outcome of one command.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The inode that was created, changed or linked.
    Inode(Inode),
    /// An unlink, rmdir or rename; `removed` is the inode that lost its last name, if any,
    /// which the proposer should purge once nobody has it open.
    Removed {
        removed: Option<Ino>,
    },
    /// A copy_file_range: how many bytes were copied.
    Copied(u64),
    /// A node id allocated for a joining node.
    NodeId(u64),
    /// The volume as the command left it.
    Volume(Volume),
    Done,
}

pub type CommandResult = Result<Reply, crate::FsError>;

/// The results of a batch, one per command in order.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct MetaResponse {
    pub results: Vec<CommandResult>,
}
