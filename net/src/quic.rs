//! QUIC between nodes, with mutual TLS.
//!
//! Every node listens on one UDP port. A peer that presents a certificate signed by the cluster
//! CA is authenticated as the node its certificate names; a peer without a certificate is let
//! in only so it can ask to join, and the RPC layer refuses it everything else. A node joining
//! trusts the server only if the CA in the server's chain has the fingerprint from its token.

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::pki::{self, Identity, SERVER_NAME};

pub const ALPN: &[u8] = b"shoal/1";

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("tls configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("tls configuration: {0}")]
    Verifier(String),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("cannot connect to {0}: {1}")]
    Connect(SocketAddr, String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots<'a>(
    cas: impl IntoIterator<Item = &'a CertificateDer<'static>>,
) -> Result<Arc<RootCertStore>, QuicError> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone())?;
    }
    Ok(Arc::new(roots))
}

/// How many bytes a member may have in flight to a node on one connection.
pub const RECEIVE_WINDOW: u32 = 64 << 20;
/// What anyone may have in flight before the node knows who it is: a join request is a few
/// hundred bytes. `rpc::serve` raises it to `RECEIVE_WINDOW` for a member.
pub const UNAUTHENTICATED_WINDOW: u32 = 64 << 10;

fn transport(receive_window: u32) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        std::time::Duration::from_secs(10)
            .try_into()
            .expect("valid idle timeout"),
    ));
    t.keep_alive_interval(Some(std::time::Duration::from_secs(2)));
    // Per stream a member may send a whole block; the connection's window bounds the total.
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window(receive_window.into());
    t.send_window(64 << 20);
    Arc::new(t)
}

/// The server side of a node: mutual TLS, with unauthenticated clients allowed in to join.
pub fn server_config(id: &Identity) -> Result<quinn::ServerConfig, QuicError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&id.trust)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| QuicError::Verifier(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain(), id.key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Verifier(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport(UNAUTHENTICATED_WINDOW));
    Ok(config)
}

/// The client side of a cluster member: it proves who it is and accepts only cluster nodes.
pub fn client_config(id: &Identity) -> Result<quinn::ClientConfig, QuicError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&id.trust)?)
        .with_client_auth_cert(id.chain(), id.key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Verifier(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport(RECEIVE_WINDOW));
    Ok(config)
}

/// The client side of a node that is joining: no certificate yet, and it trusts a server only
/// if the server's chain ends in the CA whose fingerprint the join token carries.
pub fn join_client_config(ca_fingerprint: [u8; 32]) -> Result<quinn::ClientConfig, QuicError> {
    let verifier = Arc::new(PinnedCa {
        fingerprint: ca_fingerprint,
        provider: provider(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Verifier(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport(RECEIVE_WINDOW));
    Ok(config)
}

/// Verifies a server against a CA known only by fingerprint.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| pki::fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the server's CA does not match the join token's fingerprint".into(),
                )
            })?;
        let roots =
            roots([&ca.clone().into_owned()]).map_err(|e| rustls::Error::General(e.to_string()))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots,
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A node's QUIC endpoint: it accepts peers and connects to them.
pub fn endpoint(id: &Identity, listen: SocketAddr) -> Result<quinn::Endpoint, QuicError> {
    let mut ep = quinn::Endpoint::server(server_config(id)?, listen)
        .map_err(|e| QuicError::Bind(listen, e))?;
    ep.set_default_client_config(client_config(id)?);
    Ok(ep)
}

/// A client-only endpoint for a node that is joining.
pub fn join_endpoint(ca_fingerprint: [u8; 32]) -> Result<quinn::Endpoint, QuicError> {
    let any: SocketAddr = "0.0.0.0:0".parse().expect("valid address");
    let mut ep = quinn::Endpoint::client(any).map_err(|e| QuicError::Bind(any, e))?;
    ep.set_default_client_config(join_client_config(ca_fingerprint)?);
    Ok(ep)
}

/// Connects to a node.
pub async fn connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
) -> Result<quinn::Connection, QuicError> {
    ep.connect(addr, SERVER_NAME)
        .map_err(|e| QuicError::Connect(addr, e.to_string()))?
        .await
        .map_err(|e| QuicError::Connect(addr, e.to_string()))
}

/// Connects to a node with a given client configuration (a renewed certificate).
pub async fn connect_with(
    ep: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
) -> Result<quinn::Connection, QuicError> {
    ep.connect_with(config, addr, SERVER_NAME)
        .map_err(|e| QuicError::Connect(addr, e.to_string()))?
        .await
        .map_err(|e| QuicError::Connect(addr, e.to_string()))
}

/// The node id of an authenticated peer; `None` for a peer without a certificate.
pub fn peer_node_id(conn: &quinn::Connection) -> Option<u64> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    pki::node_id_of(certs.first()?).ok()
}
