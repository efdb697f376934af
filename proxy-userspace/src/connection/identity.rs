//! `rewrite_client_id` / `rewrite_username`: the CONNECT re-encoded with fields of the client
//! certificate, so a device cannot claim another device's identity.

use crate::config::{CertField, ListenerConfig};
use crate::mqtt::{self, Connect, RewriteError};
use crate::tls::{IdentityError, cert_field};

/// Why the certificate's identity could not be put into the CONNECT.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A rewrite is configured but the client sent no certificate (`verify_client = "optional"`).
    #[error("no client certificate to take {0} from")]
    NoCertificate(&'static str),
    /// The certificate lacks the field or does not parse.
    #[error("{0}")]
    Identity(#[from] IdentityError),
    /// The new value does not fit in a CONNECT.
    #[error("{0}")]
    Rewrite(#[from] RewriteError),
}

/// Applies the listener's rewrites to a consumed CONNECT (`packet`, `connect`), returning the
/// bytes to send to the broker and the fields to balance on; unchanged when none is configured.
pub fn apply(
    config: &ListenerConfig,
    certificate: Option<&[u8]>,
    packet: Option<Vec<u8>>,
    connect: Connect,
) -> Result<(Option<Vec<u8>>, Connect), ApplyError> {
    if config.rewrite_client_id.is_none() && config.rewrite_username.is_none() {
        return Ok((packet, connect));
    }
    // Rewrites only exist on TLS listeners, whose CONNECT is always consumed.
    let Some(packet) = packet else {
        return Ok((None, connect));
    };
    let value = |field: Option<CertField>| -> Result<Option<String>, ApplyError> {
        let Some(field) = field else { return Ok(None) };
        let der = certificate.ok_or(ApplyError::NoCertificate(field.as_str()))?;
        Ok(Some(cert_field(der, field)?))
    };
    let client_id = value(config.rewrite_client_id)?;
    let username = value(config.rewrite_username)?;
    let bytes =
        mqtt::rewrite_connect(&packet, &connect, client_id.as_deref(), username.as_deref())?;
    let connect =
        mqtt::parse_connect(&bytes).map_err(|_| ApplyError::Rewrite(RewriteError::Mismatch))?;
    Ok((Some(bytes), connect))
}
