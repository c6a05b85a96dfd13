//! `shoal join`: a new node gets its certificate from the cluster.
//!
//! The node makes its key pair, connects to a member trusting only the CA whose fingerprint the
//! token carries, and sends the token's secret with a certificate signing request. The member
//! checks the secret, allocates a node id through Raft and signs the certificate. The node is
//! added to the Raft membership when its daemon first starts (`Request::AddMember`).

use std::net::SocketAddr;
use std::path::Path;

use backon::Retryable;

use shoal_net::pki::PendingIdentity;
use shoal_net::rpc::Peers;
use shoal_net::token::JoinToken;

use super::{ClusterConfig, NodeError};
use crate::cluster::rpc::{JoinRequest, Request, Response};
use crate::cluster::{TlsError, tls_dir};

pub async fn join(
    data: &Path,
    token: JoinToken,
    peer: SocketAddr,
    listen: SocketAddr,
    client: bool,
) -> Result<ClusterConfig, NodeError> {
    let endpoint = shoal_net::quic::join_endpoint(token.ca_fingerprint).map_err(TlsError::from)?;
    join_over(data, token, peer, listen, client, &Peers::new(endpoint)).await
}

/// `join`, calling the member through `peers` (the in-memory network of the tests).
pub async fn join_over(
    data: &Path,
    token: JoinToken,
    peer: SocketAddr,
    listen: SocketAddr,
    client: bool,
    peers: &Peers,
) -> Result<ClusterConfig, NodeError> {
    if let Ok(existing) = ClusterConfig::load(data) {
        return Err(NodeError::AlreadyInitialized(
            data.to_path_buf(),
            existing.cluster_id,
        ));
    }
    crate::private::create_data_dir(&tls_dir(data))
        .map_err(|e| NodeError::Io(data.to_path_buf(), e))?;
    let pending = PendingIdentity::generate().map_err(TlsError::pki("making this node's key"))?;
    let req = Request::Join(JoinRequest {
        secret: token.secret,
        csr: pending.csr_der.clone(),
    });
    // The node turns away more than a few joins a second from one address: try again on a
    // new connection, a second or so later, five times.
    let answer = (|| async {
        let answer = peers.call::<_, Response>(peer, &req).await;
        if answer.as_ref().is_err_and(|e| e.is_busy()) {
            peers.forget(peer).await;
        }
        answer
    })
    .retry(
        backon::ConstantBuilder::new()
            .with_delay(std::time::Duration::from_secs(1))
            .with_jitter()
            .with_max_times(5),
    )
    .sleep(tokio::time::sleep)
    .when(|e| e.is_busy())
    .await;
    let reply = match answer {
        Ok(Response::Join(Ok(reply))) => reply,
        Ok(Response::Join(Err(why))) => return Err(NodeError::Join(why.to_string())),
        Ok(Response::Denied(why)) => return Err(NodeError::Join(why)),
        Ok(other) => return Err(NodeError::Join(format!("unexpected response {other:?}"))),
        Err(e) => {
            return Err(NodeError::Join(format!(
                "cannot reach a cluster node at {peer} whose CA matches the token: {e}"
            )));
        }
    };
    let mut identity = pending
        .complete(reply.cert.into(), reply.ca.into())
        .map_err(TlsError::pki("the certificate the cluster signed"))?
        .with_trust(reply.trust.into_iter().map(Into::into).collect());
    identity.cross = reply.cross.map(Into::into);
    identity
        .save(&tls_dir(data))
        .map_err(TlsError::pki("saving this node's certificate"))?;
    let config = ClusterConfig {
        node_id: reply.node_id,
        cluster_id: reply.cluster_id,
        block_size: reply.block_size,
        listen: Some(listen.to_string()),
        peers: vec![peer.to_string()],
        client,
    };
    config.save(data)?;
    Ok(config)
}
