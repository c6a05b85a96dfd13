//! The cluster's certificate authority and node identities.
//!
//! `shoal init` makes the CA. A node makes its own key pair and sends only a certificate signing
//! request; the CA signs a short-lived certificate naming the node id (`CN=shoal node <id>`,
//! SAN `shoal.node`). Everything a node needs to talk to its peers is an `Identity`.

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
pub use rustls::pki_types::CertificateDer;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

/// The name every node certificate carries and every client asks for.
pub const SERVER_NAME: &str = "shoal.node";
const CN_PREFIX: &str = "shoal node ";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0} is not a valid PEM file: {1}")]
    Pem(String, String),
    #[error("the certificate does not name a shoal node")]
    NotANodeCertificate,
}

/// A cluster CA: its certificate, and its key where this node holds it.
pub struct Ca {
    pub cert: CertificateDer<'static>,
    key: KeyPair,
}

/// The fingerprint of a CA certificate: blake3 of its DER bytes.
pub fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    *blake3::hash(cert.as_ref()).as_bytes()
}

fn pem_read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|e| PkiError::Io(path.display().to_string(), e))
}

fn pem_write(path: &Path, text: &str, private: bool) -> Result<(), PkiError> {
    let mode = if private { 0o600 } else { 0o644 };
    crate::durable::write_atomic(path, text.as_bytes(), mode)
        .map_err(|e| PkiError::Io(path.display().to_string(), e))
}

fn remove(path: &Path) -> Result<(), PkiError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(PkiError::Io(path.display().to_string(), e))
        }
        _ => Ok(()),
    }
}

fn cert_from_pem(path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    let text = pem_read(path)?;
    let p =
        pem::parse(&text).map_err(|e| PkiError::Pem(path.display().to_string(), e.to_string()))?;
    Ok(CertificateDer::from(p.into_contents()))
}

fn to_pem(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der.to_vec()))
}

/// What a CA certificate says: its name, that it signs node certificates only, and when.
fn ca_params(
    name: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    // One level below: the new CA's cross-signed certificate sits between a node and the
    // old CA during a rotation.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

impl Ca {
    /// A new CA for a cluster, valid for ten years.
    pub fn generate(cluster_id: &str) -> Result<Ca, PkiError> {
        Ca::generate_named(format!("shoal cluster {cluster_id} CA"))
    }

    /// The CA that replaces this one (`shoal ca rotate`): a new key and its own name, so a
    /// certificate's issuer says which CA signed it.
    pub fn successor(&self, cluster_id: &str) -> Result<Ca, PkiError> {
        let stamp = OffsetDateTime::now_utc().unix_timestamp();
        Ca::generate_named(format!("shoal cluster {cluster_id} CA {stamp}"))
    }

    fn generate_named(name: String) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let now = OffsetDateTime::now_utc();
        let params = ca_params(
            name,
            now - Duration::from_secs(3600),
            now + Duration::from_secs(10 * 365 * 86400),
        )?;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert: cert.der().clone(),
            key,
        })
    }

    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        pem_write(cert_path, &to_pem("CERTIFICATE", &self.cert), false)?;
        pem_write(key_path, &self.key.serialize_pem(), true)
    }

    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, PkiError> {
        let cert = cert_from_pem(cert_path)?;
        let key = KeyPair::from_pem(&pem_read(key_path)?)?;
        Ok(Ca { cert, key })
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.cert)
    }

    /// `newer`'s name and key, signed by this CA: a node whose certificate `newer` signed
    /// presents it after its own, so peers that trust only this CA still accept the node while
    /// the news of `newer` reaches them.
    pub fn cross_sign(&self, newer: &Ca) -> Result<CertificateDer<'static>, PkiError> {
        let (_, x) = x509_parser::parse_x509_certificate(&newer.cert)
            .map_err(|_| PkiError::NotANodeCertificate)?;
        let name = x
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or(PkiError::NotANodeCertificate)?
            .to_string();
        let params = ca_params(
            name,
            x.validity().not_before.to_datetime(),
            x.validity().not_after.to_datetime(),
        )?;
        let issuer = Issuer::from_ca_cert_der(&self.cert, &self.key)?;
        Ok(params.signed_by(&newer.key, &issuer)?.der().clone())
    }

    /// Signs a node's certificate signing request for node `node_id`, valid for `valid`.
    pub fn sign(
        &self,
        csr_der: &[u8],
        node_id: u64,
        valid: Duration,
    ) -> Result<CertificateDer<'static>, PkiError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())?;
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{CN_PREFIX}{node_id}"));
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(300);
        params.not_after = now + valid;
        let issuer = Issuer::from_ca_cert_der(&self.cert, &self.key)?;
        Ok(params.signed_by(&csr.public_key, &issuer)?.der().clone())
    }
}

/// A node's key pair, the CA-signed certificate for it, and the CAs it trusts.
pub struct Identity {
    pub node_id: u64,
    pub cert: CertificateDer<'static>,
    /// The CA that signed `cert`.
    pub ca: CertificateDer<'static>,
    /// `ca` signed by the CA before it, while a rotation is under way (see `Ca::cross_sign`).
    pub cross: Option<CertificateDer<'static>>,
    /// The CAs whose nodes this node accepts: `ca` alone, or during a rotation the new CA and
    /// the old one.
    pub trust: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

impl Identity {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// The certificate chain a node presents: its certificate, the cross-signed CA if any
    /// (first, so a peer that trusts only the old CA finds its way there), then the CA's.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        let mut chain = vec![self.cert.clone()];
        chain.extend(self.cross.clone());
        chain.push(self.ca.clone());
        chain
    }

    /// The fingerprint of the CA that signed this node's certificate.
    pub fn issuer(&self) -> [u8; 32] {
        fingerprint(&self.ca)
    }

    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        match &self.cross {
            Some(c) => pem_write(&dir.join("cross.crt"), &to_pem("CERTIFICATE", c), false)?,
            None => remove(&dir.join("cross.crt"))?,
        }
        let bundle: String = self
            .trust
            .iter()
            .map(|c| to_pem("CERTIFICATE", c))
            .collect();
        pem_write(&dir.join("trust.pem"), &bundle, false)?;
        pem_write(
            &dir.join("node.crt"),
            &to_pem("CERTIFICATE", &self.cert),
            false,
        )?;
        pem_write(
            &dir.join("node.key"),
            &to_pem("PRIVATE KEY", &self.key_der),
            true,
        )?;
        pem_write(&dir.join("ca.crt"), &to_pem("CERTIFICATE", &self.ca), false)
    }

    pub fn load(dir: &Path) -> Result<Identity, PkiError> {
        let cert = cert_from_pem(&dir.join("node.crt"))?;
        let ca = cert_from_pem(&dir.join("ca.crt"))?;
        let cross_path = dir.join("cross.crt");
        let cross = cross_path
            .exists()
            .then(|| cert_from_pem(&cross_path))
            .transpose()?;
        let trust_path = dir.join("trust.pem");
        let trust = if trust_path.exists() {
            let text = pem_read(&trust_path)?;
            pem::parse_many(&text)
                .map_err(|e| PkiError::Pem(trust_path.display().to_string(), e.to_string()))?
                .into_iter()
                .map(|p| CertificateDer::from(p.into_contents()))
                .collect()
        } else {
            vec![ca.clone()]
        };
        let key_path = dir.join("node.key");
        let key = pem::parse(pem_read(&key_path)?)
            .map_err(|e| PkiError::Pem(key_path.display().to_string(), e.to_string()))?;
        let node_id = node_id_of(&cert)?;
        Ok(Identity {
            node_id,
            cert,
            ca,
            cross,
            trust,
            key_der: key.into_contents(),
        })
    }

    /// The same key and certificate, trusting `trust` instead.
    pub fn with_trust(&self, trust: Vec<CertificateDer<'static>>) -> Identity {
        Identity {
            node_id: self.node_id,
            cert: self.cert.clone(),
            ca: self.ca.clone(),
            cross: self.cross.clone(),
            trust,
            key_der: self.key_der.clone(),
        }
    }

    /// When the certificate stops being valid, in seconds since the epoch.
    pub fn not_after(&self) -> Result<i64, PkiError> {
        let (_, x) = x509_parser::parse_x509_certificate(&self.cert)
            .map_err(|_| PkiError::NotANodeCertificate)?;
        Ok(x.validity().not_after.timestamp())
    }
}

/// A node's new key pair and the signing request for it. The key never leaves the node.
pub struct PendingIdentity {
    key: KeyPair,
    pub csr_der: Vec<u8>,
}

impl PendingIdentity {
    pub fn generate() -> Result<PendingIdentity, PkiError> {
        let key = KeyPair::generate()?;
        let params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        let csr = params.serialize_request(&key)?;
        Ok(PendingIdentity {
            csr_der: csr.der().to_vec(),
            key,
        })
    }

    /// A signing request for an existing key, to renew its certificate.
    pub fn renew(identity: &Identity) -> Result<PendingIdentity, PkiError> {
        let key = KeyPair::try_from(identity.key_der.as_slice())?;
        let params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        let csr = params.serialize_request(&key)?;
        Ok(PendingIdentity {
            csr_der: csr.der().to_vec(),
            key,
        })
    }

    /// Completes the identity with the certificate the CA signed; it trusts that CA alone.
    pub fn complete(
        self,
        cert: CertificateDer<'static>,
        ca: CertificateDer<'static>,
    ) -> Result<Identity, PkiError> {
        let node_id = node_id_of(&cert)?;
        Ok(Identity {
            node_id,
            cert,
            trust: vec![ca.clone()],
            ca,
            cross: None,
            key_der: self.key.serialize_der(),
        })
    }
}

/// The node id a node certificate names.
pub fn node_id_of(cert: &CertificateDer<'_>) -> Result<u64, PkiError> {
    let (_, x) =
        x509_parser::parse_x509_certificate(cert).map_err(|_| PkiError::NotANodeCertificate)?;
    let cn = x
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(PkiError::NotANodeCertificate)?;
    cn.strip_prefix(CN_PREFIX)
        .and_then(|id| id.parse().ok())
        .ok_or(PkiError::NotANodeCertificate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_names_its_node_and_round_trips_through_files() {
        let ca = Ca::generate("c1").unwrap();
        let pending = PendingIdentity::generate().unwrap();
        let cert = ca
            .sign(&pending.csr_der, 7, Duration::from_secs(3600))
            .unwrap();
        let id = pending.complete(cert, ca.cert.clone()).unwrap();
        assert_eq!(id.node_id, 7);
        let dir = tempfile::tempdir().unwrap();
        id.save(dir.path()).unwrap();
        let back = Identity::load(dir.path()).unwrap();
        assert_eq!(back.node_id, 7);
        assert_eq!(back.cert, id.cert);
        assert!(back.not_after().unwrap() > OffsetDateTime::now_utc().unix_timestamp());
        ca.save(
            &dir.path().join("cluster-ca.crt"),
            &dir.path().join("cluster-ca.key"),
        )
        .unwrap();
        let ca2 = Ca::load(
            &dir.path().join("cluster-ca.crt"),
            &dir.path().join("cluster-ca.key"),
        )
        .unwrap();
        assert_eq!(ca2.fingerprint(), ca.fingerprint());
        // Renewal keeps the key.
        let renew = PendingIdentity::renew(&back).unwrap();
        let cert2 = ca2
            .sign(&renew.csr_der, 7, Duration::from_secs(60))
            .unwrap();
        let renewed = renew.complete(cert2, ca2.cert.clone()).unwrap();
        assert_eq!(renewed.key_der, back.key_der);
    }

    #[test]
    fn a_ca_certificate_is_not_a_node_certificate() {
        let ca = Ca::generate("c1").unwrap();
        assert!(matches!(
            node_id_of(&ca.cert),
            Err(PkiError::NotANodeCertificate)
        ));
    }
}
