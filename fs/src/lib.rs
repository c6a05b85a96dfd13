//! The shoal node: the FUSE adapter, block store and caches, and the glue that runs them over
//! the metadata layer (`shoal-raft`) and the transport (`shoal-net`).
//!
//! **Architecture invariant:** this crate depends on `shoal-raft` and `shoal-net`, never the
//! reverse. POSIX semantics live in `ops` (below FUSE, testable without a mount); `fuse` only
//! translates, and is the only place errnos are made.
//!
//! The layers, from the kernel down:
//! - `fuse`: the FUSE adapter, mounting, errnos.
//! - `ops`: POSIX operations on a node.
//! - `node`: the node itself: open files and their buffered writes, Raft, proposals, sessions,
//!   garbage collection, and what it does with other nodes: answering them, replication,
//!   repair, membership, elections, trust, fsck.
//! - `cluster`: this node's end of the network: the endpoint, its identity, the protocol; it
//!   serves through a `Handler` and knows nothing of the node.
//! - `blocks`: this disk's block store and cache; it knows nothing of the node.
//!
//! Beside them, the surfaces an operator or Docker talks to: `admin` (the admin socket),
//! `plugin` (Docker's volume protocol) and `volumes` (what both do with volumes).
//! Each layer calls only downward.

pub mod fuse;
pub mod handover;
pub mod ops;

pub mod node;

pub mod blocks;
pub mod cluster;

pub mod admin;
pub mod plugin;
pub mod volumes;

pub mod faults;
pub mod fuzz;
mod invalidate;
pub mod metrics;
pub mod private;

pub use node::{Node, NodeOptions};
