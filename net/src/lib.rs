//! Shoal's transport layer.
//!
//! **Architecture invariant:** this crate knows nothing of FUSE or of the metadata model; it
//! moves typed messages between processes.
//!
//! - `durable`: files replaced whole and fsynced (certificates, keys, tokens, config).
//! - `frame`: length-prefixed frames (JSON for the admin socket, postcard bytes for RPC).
//! - `pki`: the cluster CA and node identities (rcgen).
//! - `token`: join tokens.
//! - `quic`: QUIC endpoints with mutual TLS (quinn, rustls).
//! - `rpc`: request/response calls: the `Transport` trait, its QUIC implementation (one
//!   stream per call, a per-peer connection cache) and `Peers` (timeouts, down marks).
//! - `memory`: the in-memory `Transport` of the deterministic tests, with fault rules.

pub mod durable;
pub mod frame;
pub mod memory;
pub mod pki;
pub mod quic;
pub mod rpc;
pub mod token;
