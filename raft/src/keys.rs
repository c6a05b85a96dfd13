//! The key layout of the state machine's sled tree.
//!
//! Everything lives in one tree so that applying a batch of log entries, including the
//! applied log id, is one atomic sled batch. Integers are big-endian so that keys sort.

use crate::types::{BlockId, Ino};

pub const INODE: u8 = b'i';
pub const DENTRY: u8 = b'd';
pub const CHUNK: u8 = b'l';
pub const XATTR: u8 = b'x';
pub const LOCKS: u8 = b'k';
pub const BLOCK_REF: u8 = b'b';
pub const GARBAGE: u8 = b'g';
pub const ORPHAN: u8 = b'o';
pub const SESSION: u8 = b'n';
pub const LEASE: u8 = b'e';
pub const NODE_INFO: u8 = b'N';
pub const REVOKED: u8 = b'R';
pub const VOLUME: u8 = b'v';
pub const VOLUME_USAGE: u8 = b'u';
pub const TRASH: u8 = b't';
pub const REPLY: u8 = b'r';
pub const ACKED: u8 = b'q';
/// Blocks whose bytes are in the state machine itself (small commits), not yet written out.
pub const INLINE: u8 = b'B';

pub const META_APPLIED: &[u8] = b"m/applied";
pub const META_MEMBERSHIP: &[u8] = b"m/membership";
pub const META_NEXT_INO: &[u8] = b"m/next_ino";
pub const META_INODES: &[u8] = b"m/inodes";
pub const META_JOIN_SECRET: &[u8] = b"m/join_secret";
pub const META_NEXT_NODE: &[u8] = b"m/next_node";
pub const META_SETTINGS: &[u8] = b"m/settings";
pub const META_TRUST: &[u8] = b"m/trust";
/// The bytes of every block held inline.
pub const META_INLINE_BYTES: &[u8] = b"m/inline_bytes";

fn with_u64(tag: u8, n: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = tag;
    k[1..].copy_from_slice(&n.to_be_bytes());
    k
}

fn with_block(tag: u8, id: &BlockId) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = tag;
    k[1..].copy_from_slice(&id.0);
    k
}

pub fn inode(ino: Ino) -> [u8; 9] {
    with_u64(INODE, ino)
}

pub fn dentry_prefix(parent: Ino) -> [u8; 9] {
    with_u64(DENTRY, parent)
}

pub fn dentry(parent: Ino, name: &[u8]) -> Vec<u8> {
    let mut k = dentry_prefix(parent).to_vec();
    k.extend_from_slice(name);
    k
}

pub fn chunk(ino: Ino, index: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = CHUNK;
    k[1..9].copy_from_slice(&ino.to_be_bytes());
    k[9..].copy_from_slice(&index.to_be_bytes());
    k
}

pub fn xattrs(ino: Ino) -> [u8; 9] {
    with_u64(XATTR, ino)
}

pub fn locks(ino: Ino) -> [u8; 9] {
    with_u64(LOCKS, ino)
}

pub fn orphan(ino: Ino) -> [u8; 9] {
    with_u64(ORPHAN, ino)
}

pub fn session(node: u64) -> [u8; 9] {
    with_u64(SESSION, node)
}

pub fn volume(name: &str) -> Vec<u8> {
    let mut k = vec![VOLUME];
    k.extend_from_slice(name.as_bytes());
    k
}

/// A removed volume in the trash: `t` + name + 0 + root. Names hold no 0 byte, so the
/// generations of one name sort together.
pub fn trash(name: &str, root: Ino) -> Vec<u8> {
    let mut k = trash_prefix(name);
    k.extend_from_slice(&root.to_be_bytes());
    k
}

pub fn trash_prefix(name: &str) -> Vec<u8> {
    let mut k = vec![TRASH];
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k
}

/// The answer kept for request `seq` of `session`.
pub fn reply(session: u64, seq: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = REPLY;
    k[1..9].copy_from_slice(&session.to_be_bytes());
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Below which sequence number every request of `session` has been answered.
pub fn acked(session: u64) -> [u8; 9] {
    with_u64(ACKED, session)
}

pub fn volume_usage(root: Ino) -> [u8; 9] {
    with_u64(VOLUME_USAGE, root)
}

pub fn node_info(node: u64) -> [u8; 9] {
    with_u64(NODE_INFO, node)
}

pub fn revoked(node: u64) -> [u8; 9] {
    with_u64(REVOKED, node)
}

pub fn lease(session: u64) -> [u8; 9] {
    with_u64(LEASE, session)
}

pub fn block_ref(id: &BlockId) -> [u8; 33] {
    with_block(BLOCK_REF, id)
}

pub fn garbage(id: &BlockId) -> [u8; 33] {
    with_block(GARBAGE, id)
}

pub fn inline(id: &BlockId) -> [u8; 33] {
    with_block(INLINE, id)
}

/// The first key past every key of `tag` + `ino` + anything.
pub fn inode_after(tag: u8, ino: Ino) -> Vec<u8> {
    match ino.checked_add(1) {
        Some(next) => with_u64(tag, next).to_vec(),
        None => vec![tag + 1],
    }
}

/// The big-endian u64 at `at` in a key.
pub fn u64_at(key: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[at..at + 8]);
    u64::from_be_bytes(b)
}

/// The u64 that follows the tag byte of a key.
pub fn u64_after_tag(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[1..9]);
    u64::from_be_bytes(b)
}

pub fn block_after_tag(key: &[u8]) -> BlockId {
    let mut b = [0u8; 32];
    b.copy_from_slice(&key[1..33]);
    BlockId(b)
}
