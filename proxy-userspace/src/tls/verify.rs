//! Client-certificate verification with OpenSSL's `verify_depth`: rustls's WebPKI verifier does
//! every standard check, then the path is built again to count its intermediate CAs.

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError};
use rustls::{RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use std::sync::Arc;

/// A client chain that only verifies through more intermediates than `verify_depth` allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("client certificate chain needs more than {limit} intermediate CA(s) (verify_depth)")]
pub struct ChainTooLong {
    /// The configured `verify_depth`.
    pub limit: usize,
}

/// Wraps a verifier (WebPKI's) and accepts a client certificate only if some path to a trust
/// anchor has at most `max_intermediates` intermediates, as OpenSSL's `verify_depth` does.
#[derive(Debug)]
pub struct DepthLimited {
    inner: Arc<dyn ClientCertVerifier>,
    anchors: Vec<TrustAnchor<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
    max_intermediates: usize,
}

impl DepthLimited {
    /// `inner` must trust exactly `roots`.
    pub fn new(
        inner: Arc<dyn ClientCertVerifier>,
        roots: &RootCertStore,
        algorithms: WebPkiSupportedAlgorithms,
        max_intermediates: usize,
    ) -> Self {
        DepthLimited {
            inner,
            anchors: roots.roots.clone(),
            algorithms,
            max_intermediates,
        }
    }

    /// Whether a path with at most `max_intermediates` intermediates exists; `inner` has
    /// already said that some path exists, so any error here is the depth.
    fn check_depth(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), Error> {
        let too_long = || {
            Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                ChainTooLong {
                    limit: self.max_intermediates,
                },
            ))))
        };
        // A chain the client sent short enough cannot make a path too long.
        if intermediates.len() <= self.max_intermediates {
            return Ok(());
        }
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| too_long())?;
        let limit = self.max_intermediates;
        let short_enough = |path: &webpki::VerifiedPath<'_>| {
            if path.intermediate_certificates().count() <= limit {
                Ok(())
            } else {
                Err(webpki::Error::MaximumPathDepthExceeded)
            }
        };
        cert.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            Some(&short_enough),
        )
        .map(|_| ())
        .map_err(|_| too_long())
    }
}

impl ClientCertVerifier for DepthLimited {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.check_depth(end_entity, intermediates, now)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
