//! Integration tests of the node: POSIX operations below FUSE on an in-process node, and the
//! `shoal` binary on a real FUSE mount (these need root and /dev/fuse).

mod at_once;
mod cluster;
mod daemon;
mod durability;
mod inline;
mod local_cluster;
mod metrics;
mod mount;
mod node_ops;
mod restart;
mod security;
mod testkit;
