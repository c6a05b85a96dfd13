//! The cluster CA and what every node trusts.
//!
//! A CA rotation (`shoal ca rotate`, on the node holding the CA) makes a new CA, signs the new
//! CA's certificate with the old one (a cross-signed certificate), and records in the state
//! machine that members accept both, the new one first (`MetaCommand::SetTrust`). Every node
//! follows the trust set (`follow`): it trusts both, and asks for a certificate from the new
//! CA, which it presents with the cross-signed certificate after it, so that a peer that has
//! not heard of the rotation yet still accepts it. `shoal ca retire` then drops the old CA,
//! once every member reports a certificate from the new one (`NodeInfo::issuer`): nodes close
//! their connections and reconnect under the new CA alone, and a certificate of the old CA,
//! like a join token naming it, no longer gets anyone in.
//!
//! The CA node keeps its signing CA in `DATA/tls/signer/` (`ca.crt`, `ca.key`, and
//! `cross.crt` after a rotation), swapped whole with `renameat2(RENAME_EXCHANGE)`; a cluster
//! that never rotated signs with `DATA/tls/ca.crt` and `ca.key` from `shoal init`.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use shoal_net::pki::{self, CertificateDer, PendingIdentity};
use shoal_net::token::JoinToken;
use shoal_raft::MetaCommand;
use tracing::{info, warn};

use super::{Node, OpError};
use crate::cluster::rpc::{Request, Response};
use crate::cluster::signer::{Signer, signer_dir};
use crate::cluster::{Cluster, TlsError, save_token, tls_dir, token_path};

/// Why a certificate or CA operation failed (`shoal ca`, `shoal token rotate`, renewals and
/// following the trust set).
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("this node is not part of a cluster")]
    NoCluster,
    #[error("only the node that ran `shoal init --listen` holds the CA: run this there")]
    NotCaHolder,
    #[error("only the node that ran `shoal init --listen` holds the CA and makes tokens")]
    NotTokenMaker,
    #[error("this node does not hold the cluster CA")]
    NotSigner,
    #[error("this node does not hold the cluster CA: join through the node that ran `shoal init`")]
    NotJoinPoint,
    #[error(
        "the join token is not valid (wrong or rotated): get the current one with `shoal token show`"
    )]
    BadToken,
    #[error("unexpected reply {0}")]
    Unexpected(String),
    #[error("a CA rotation is already under way: finish it with `shoal ca retire` first")]
    RotationUnderWay,
    #[error("no CA rotation is under way: start one with `shoal ca rotate`")]
    NoRotation,
    #[error(
        "not every member has a certificate from the new CA yet: {0}. Nodes renew within seconds of the rotation; a node that is down renews when it is back (or remove it with `shoal node rm`); then retire again"
    )]
    MembersBehind(String),
    /// No member signed a renewal; the last one's answer.
    #[error("{0}")]
    NotRenewed(String),
    /// Certificates, keys or the endpoint's TLS: made, saved or put to use.
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{what}: {source}")]
    Op { what: &'static str, source: OpError },
    #[error("metadata store: {0}")]
    Store(#[from] shoal_raft::StoreError),
}

impl CaError {
    pub(crate) fn pki(what: &'static str) -> impl FnOnce(pki::PkiError) -> CaError {
        move |source| CaError::Tls(TlsError::pki(what)(source))
    }

    pub(crate) fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> CaError {
        move |source| CaError::Tls(TlsError::io(what)(source))
    }

    pub(crate) fn op(what: &'static str) -> impl FnOnce(OpError) -> CaError {
        move |source| CaError::Op { what, source }
    }
}

/// The CAs members accept, the signing one first: the state machine's, or before any
/// rotation the one this node joined with.
fn trust_of(node: &Node, c: &Cluster) -> Vec<CertificateDer<'static>> {
    match node.view.trust() {
        Ok(Some(cas)) => cas.into_iter().map(CertificateDer::from).collect(),
        _ => vec![c.identity.lock().expect("identity lock").ca.clone()],
    }
}

/// Brings this node in line with the trust set: trusts what it says (and, when a CA left it,
/// closes every connection so that each is made again under the new trust), and asks for a
/// certificate from the signing CA if its own is from another. Run every few seconds and
/// after each rotation step.
pub async fn follow(node: &Node) -> Result<(), CaError> {
    let Some(c) = node.cluster() else {
        return Ok(());
    };
    let trust = trust_of(node, c);
    let (current, issuer) = {
        let id = c.identity.lock().expect("identity lock");
        (id.trust.clone(), id.issuer())
    };
    if trust != current {
        let shrunk = current.iter().any(|ca| !trust.contains(ca));
        let updated = c
            .identity
            .lock()
            .expect("identity lock")
            .with_trust(trust.clone());
        c.install(updated)?;
        info!(
            cas = trust.len(),
            "now trusting the cluster's CA set from the state machine"
        );
        if shrunk {
            info!(
                "a CA was retired: closing every connection so each is made again under the new trust"
            );
            c.close_all().await;
        }
    }
    if pki::fingerprint(&trust[0]) != issuer {
        info!("this node's certificate is from a CA that no longer signs: asking for a new one");
        renew(node, c).await?;
    }
    Ok(())
}

impl Node {
    /// `shoal ca rotate`: a new CA, trusted beside the old one, and a new join token for it.
    pub async fn rotate_ca(&self) -> Result<JoinToken, CaError> {
        let c = self.cluster().ok_or(CaError::NoCluster)?;
        let old = c.signer().ok_or(CaError::NotCaHolder)?;
        let trust = trust_of(self, c);
        if trust.len() > 1 {
            return Err(CaError::RotationUnderWay);
        }
        let new = old
            .ca
            .successor(&self.config.cluster_id)
            .map_err(CaError::pki("making the new CA"))?;
        let cross = old
            .ca
            .cross_sign(&new)
            .map_err(CaError::pki("cross-signing the new CA"))?;
        let next = Signer {
            ca: new,
            cross: Some(cross),
        };
        // On disk before the cluster hears of it, so a crash cannot leave the cluster trusting
        // a CA whose key is lost; swapped into place once the cluster trusts it.
        let dir = signer_dir(&self.data_dir);
        let staged = dir.with_extension("next");
        next.save(&staged)?;
        self.run(MetaCommand::SetTrust {
            cas: vec![next.ca.cert.to_vec(), old.ca.cert.to_vec()],
        })
        .await
        .map_err(CaError::op("recording the new CA"))?;
        if dir.exists() {
            rustix::fs::renameat_with(
                rustix::fs::CWD,
                &staged,
                rustix::fs::CWD,
                &dir,
                rustix::fs::RenameFlags::EXCHANGE,
            )
            .map_err(|e| CaError::io("swapping in the new CA")(e.into()))?;
            let retired = dir.with_extension(format!("retired-{}", crate::node::now_nanos()));
            std::fs::rename(&staged, retired).map_err(CaError::io("keeping the old CA"))?;
        } else {
            std::fs::rename(&staged, &dir).map_err(CaError::io("putting the new CA in place"))?;
        }
        std::fs::File::open(tls_dir(&self.data_dir))
            .and_then(|d| d.sync_all())
            .map_err(CaError::io(tls_dir(&self.data_dir).display()))?;
        let fingerprint = next.ca.fingerprint();
        c.set_signer(Arc::new(next));
        info!(
            ca = hex::encode(&fingerprint[..6]),
            "rotated the cluster CA: members now accept the old and the new"
        );
        // This node first: a node joining with the new token checks the new CA in its chain.
        follow(self).await?;
        // The token names the signing CA, now the new one.
        self.rotate_token().await
    }

    /// `shoal ca retire`: members stop accepting the old CA, once each of them holds a
    /// certificate from the new one.
    pub async fn retire_ca(&self) -> Result<(), CaError> {
        let c = self.cluster().ok_or(CaError::NoCluster)?;
        let trust = trust_of(self, c);
        if trust.len() < 2 {
            return Err(CaError::NoRotation);
        }
        let signing = pki::fingerprint(&trust[0]);
        let infos = self.view.nodes()?;
        let behind: Vec<String> = self
            .members()
            .into_iter()
            .filter(|(id, _)| infos.get(id).is_none_or(|i| i.issuer != signing))
            .map(|(id, _)| super::members::node_name(self, id))
            .collect();
        if !behind.is_empty() {
            return Err(CaError::MembersBehind(behind.join(", ")));
        }
        self.run(MetaCommand::SetTrust {
            cas: vec![trust[0].to_vec()],
        })
        .await
        .map_err(CaError::op("retiring the old CA"))?;
        info!("retired the old cluster CA");
        follow(self).await
    }

    /// Makes a new join token; tokens made before stop working. Only on the CA's node.
    pub async fn rotate_token(&self) -> Result<JoinToken, CaError> {
        let signer = self
            .cluster()
            .and_then(|c| c.signer())
            .ok_or(CaError::NotTokenMaker)?;
        let token = JoinToken::new(signer.ca.fingerprint());
        self.run(MetaCommand::SetJoinSecret {
            hash: token.secret_hash(),
        })
        .await
        .map_err(CaError::op("recording the new token"))?;
        save_token(&self.data_dir, &token)
            .map_err(CaError::io(token_path(&self.data_dir).display()))?;
        Ok(token)
    }
}

/// Renews this node's certificate when half its validity has passed: asks each member in turn
/// (only the CA's node can sign), saves the new certificate and uses it for new connections.
pub async fn renew_worker(node: Weak<Node>) {
    loop {
        let wait = {
            let Some(node) = node.upgrade() else { return };
            let Some(c) = node.cluster() else { return };
            // A CA rotation or retirement in the state machine is followed within seconds.
            if let Err(e) = follow(&node).await {
                warn!(error = %e, "following the cluster's CA set failed; trying again");
            }
            let not_after = c
                .identity
                .lock()
                .expect("identity lock")
                .not_after()
                .unwrap_or(0);
            let now = crate::node::now_nanos() / 1_000_000_000;
            let half = (node.options.cert_validity.as_secs() / 2) as i64;
            if not_after - now > half {
                Duration::from_secs((not_after - now - half).clamp(1, FOLLOW_EVERY) as u64)
            } else {
                match renew(&node, c).await {
                    Ok(()) => Duration::from_secs(1),
                    Err(e) => {
                        warn!(error = %e, "renewing this node's certificate failed; retrying");
                        Duration::from_secs(5)
                    }
                }
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// How often, in seconds, a node looks at the CA set in the state machine.
const FOLLOW_EVERY: i64 = 2;

async fn renew(node: &Node, c: &Cluster) -> Result<(), CaError> {
    let pending = {
        let id = c.identity.lock().expect("identity lock");
        PendingIdentity::renew(&id).map_err(CaError::pki("making a renewal request"))?
    };
    let req = Request::RenewCert {
        csr: pending.csr_der.clone(),
    };
    let mut last = String::from("no member holds the CA");
    for (id, addr) in node.members() {
        let Ok(addr) = addr.parse::<SocketAddr>() else {
            continue;
        };
        let reply = if id == node.id {
            node.sign_renewal(node.id, &pending.csr_der)
                .map_err(|e| e.to_string())
        } else {
            match c.peers.call::<_, Response>(addr, &req).await {
                Ok(Response::RenewCert(r)) => r.map_err(|e| e.to_string()),
                Ok(other) => Err(format!("unexpected response {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        };
        let got = match reply {
            Ok(got) => got,
            Err(e) => {
                last = e;
                continue;
            }
        };
        let trust = c.identity.lock().expect("identity lock").trust.clone();
        let mut renewed = pending
            .complete(got.cert.into(), got.ca.into())
            .map_err(CaError::pki("the renewed certificate"))?
            .with_trust(trust);
        renewed.cross = got.cross.map(Into::into);
        c.install(renewed)?;
        info!("renewed this node's certificate");
        return Ok(());
    }
    Err(CaError::NotRenewed(last))
}
