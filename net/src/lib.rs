//! Shoal's transport layer.
//!
//! **Architecture invariant:** this crate knows nothing of FUSE or of the metadata model; it
//! moves typed messages between processes.
//!
//! Today it holds the RPC framing used by the node's admin socket: each message is a
//! length-prefixed JSON document. The QUIC transport with mutual TLS joins it with the cluster.

pub mod frame;
