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
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
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
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e| PkiError::Io(path.display().to_string(), e);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
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

impl Ca {
    /// A new CA for a cluster, valid for ten years.
    pub fn generate(cluster_id: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("shoal cluster {cluster_id} CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + Duration::from_secs(10 * 365 * 86400);
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

/// A node's key pair and the CA-signed certificate for it.
pub struct Identity {
    pub node_id: u64,
    pub cert: CertificateDer<'static>,
    pub ca: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Identity {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// The certificate chain a node presents: its certificate, then the CA's.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.clone(), self.ca.clone()]
    }

    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
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
        let key_path = dir.join("node.key");
        let key = pem::parse(pem_read(&key_path)?)
            .map_err(|e| PkiError::Pem(key_path.display().to_string(), e.to_string()))?;
        let node_id = node_id_of(&cert)?;
        Ok(Identity {
            node_id,
            cert,
            ca,
            key_der: key.into_contents(),
        })
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

    /// Completes the identity with the certificate the CA signed.
    pub fn complete(
        self,
        cert: CertificateDer<'static>,
        ca: CertificateDer<'static>,
    ) -> Result<Identity, PkiError> {
        let node_id = node_id_of(&cert)?;
        Ok(Identity {
            node_id,
            cert,
            ca,
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
