//! Reading PEM files: certificate chains, private keys and trust anchors.

use anyhow::{Context, bail};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;

/// A PEM certificate chain, leaf first; at least one certificate.
pub fn certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no PEM CERTIFICATE block", path.display());
    }
    Ok(certs)
}

/// The first private key in a PEM file: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
pub fn private_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).with_context(|| {
        format!(
            "reading a private key (PKCS#8, PKCS#1 or SEC1 PEM) from {}",
            path.display()
        )
    })
}

/// Trust anchors for client certificates: every certificate in a PEM file.
pub fn roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    for (i, cert) in certificates(path)?.into_iter().enumerate() {
        store.add(cert).with_context(|| {
            format!(
                "{}: certificate {} is not a usable CA",
                path.display(),
                i + 1
            )
        })?;
    }
    Ok(store)
}
