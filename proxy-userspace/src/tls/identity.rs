//! The client certificate's fields that can stand in for a CONNECT's client id or user name.

use crate::config::CertField;
use sha2::{Digest, Sha256};
use std::fmt::Write;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a certificate field could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The DER did not parse as an X.509 certificate.
    #[error("the client certificate does not parse")]
    Unparsable,
    /// The certificate has no such field (no CN, no DNS name).
    #[error("the client certificate has no {0}")]
    Missing(&'static str),
}

/// Upper-case hex, no separators.
fn hex_upper(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02X}");
            s
        })
}

/// `field` of the DER certificate `der`, as the text that replaces a CONNECT field.
pub fn cert_field(der: &[u8], field: CertField) -> Result<String, IdentityError> {
    if field == CertField::Fingerprint {
        return Ok(hex_upper(&Sha256::digest(der)).to_ascii_lowercase());
    }
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::Unparsable)?;
    match field {
        CertField::Serial => {
            // The integer's magnitude, as OpenSSL prints it for NGINX's $ssl_client_serial: the
            // DER sign byte is dropped, every other byte kept (so 0x0A stays "0A").
            let raw = cert.tbs_certificate.raw_serial();
            let start = raw
                .iter()
                .position(|b| *b != 0)
                .unwrap_or(raw.len().saturating_sub(1));
            Ok(hex_upper(&raw[start..]))
        }
        CertField::CommonName => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned)
            .ok_or(IdentityError::Missing("subject common name")),
        CertField::SanDns => cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|name| match name {
                    GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    _ => None,
                })
            })
            .ok_or(IdentityError::Missing("DNS subject alternative name")),
        CertField::Fingerprint => unreachable!("handled above"),
    }
}
