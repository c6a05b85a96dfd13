//! Shoal's metadata layer: inodes, directory entries, file layouts, block references, locks
//! and sessions, ordered through Raft (openraft) and stored in sled.
//!
//! **Architecture invariant:** this crate knows nothing of FUSE or of the network. Applying a
//! command is deterministic: no clock, no randomness, no I/O beyond the local sled tree.

mod apply;
mod error;
pub mod failpoint;
pub mod fuzz;
pub mod headroom;
pub mod keys;
pub mod layout;
mod store;
mod types;
mod view;

pub use apply::{Change, conflicting};
pub use error::{FsError, NameError, StoreError};
pub use store::{ApplyHook, LogSize, LogStore, StateMachine, open};
pub use types::*;
pub use view::{Kv, StateView, Xattrs};

openraft::declare_raft_types!(
    /// The openraft type configuration of shoal's metadata cluster.
    pub TypeConfig:
        D = MetaRequest,
        R = MetaResponse,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;
