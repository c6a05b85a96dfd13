//! Shoal's transport layer.
//!
//! **Architecture invariant:** this crate knows nothing of FUSE or of the metadata model; it
//! moves typed messages between processes.
//!
//! - `frame`: length-prefixed frames (JSON for the admin socket, raw bytes for RPC).
//! - `pki`: the cluster CA and node identities (rcgen).
//! - `token`: join tokens.
//! - `quic`: QUIC endpoints with mutual TLS (quinn, rustls).
//! - `rpc`: request/response calls over QUIC streams, and a per-peer connection cache.

pub mod frame;
pub mod pki;
pub mod quic;
pub mod rpc;
pub mod token;
