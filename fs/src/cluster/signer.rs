//! The CA a node signs with, on the node that holds one: loaded from and saved to
//! `DATA/tls/signer/` (or, before any rotation, `DATA/tls/ca.crt` and `ca.key`).

use std::path::{Path, PathBuf};

use shoal_net::pki::{Ca, CertificateDer};

use super::{TlsError, tls_dir};

/// The CA a node signs with, and its cross-signed certificate after a rotation.
pub struct Signer {
    pub ca: Ca,
    pub cross: Option<CertificateDer<'static>>,
}

pub fn signer_dir(data: &Path) -> PathBuf {
    tls_dir(data).join("signer")
}

impl Signer {
    /// The node's signing CA, if it holds one.
    pub fn load(data: &Path) -> Option<Signer> {
        let dir = signer_dir(data);
        if dir.exists() {
            let ca = Ca::load(&dir.join("ca.crt"), &dir.join("ca.key")).ok()?;
            let cross = std::fs::read_to_string(dir.join("cross.crt"))
                .ok()
                .and_then(|t| pem::parse(t).ok())
                .map(|p| CertificateDer::from(p.into_contents()));
            return Some(Signer { ca, cross });
        }
        let tls = tls_dir(data);
        let ca = Ca::load(&tls.join("ca.crt"), &tls.join("ca.key")).ok()?;
        Some(Signer { ca, cross: None })
    }

    /// Writes the signer into `dir` (made fresh), every file fsynced.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        let _ = std::fs::remove_dir_all(dir);
        crate::private::create_data_dir(dir).map_err(TlsError::io(dir.display()))?;
        self.ca
            .save(&dir.join("ca.crt"), &dir.join("ca.key"))
            .map_err(TlsError::pki("saving the new CA"))?;
        if let Some(cross) = &self.cross {
            let text = pem::encode(&pem::Pem::new("CERTIFICATE", cross.to_vec()));
            shoal_net::durable::write_atomic(&dir.join("cross.crt"), text.as_bytes(), 0o644)
                .map_err(TlsError::io(dir.display()))?;
        }
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(TlsError::io(dir.display()))
    }
}
