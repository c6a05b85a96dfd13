//! QUIC with mutual TLS between endpoints on loopback: who gets in and who is refused.

mod quic;
