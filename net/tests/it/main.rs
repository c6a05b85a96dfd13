//! QUIC with mutual TLS between endpoints on loopback: who gets in and who is refused; and
//! the in-memory network of the simulation tests.

mod memory;
mod quic;
