//! The shoal node: the FUSE adapter, block store and caches, and the glue that runs them over
//! the metadata layer (`shoal-raft`) and the transport (`shoal-net`).
//!
//! **Architecture invariant:** this crate depends on `shoal-raft` and `shoal-net`, never the
//! reverse. POSIX semantics live in `ops` (below FUSE, testable without a mount); `fuse` only
//! translates.

pub mod admin;
pub mod blocks;
pub mod cluster;
pub mod faults;
mod file;
pub mod fuse;
pub mod fuzz;
mod invalidate;
pub mod node;
pub mod ops;
pub mod plugin;
pub mod private;
mod raft_net;
pub mod volumes;

pub use node::{Node, NodeOptions};
