//! TLS termination with rustls: one [`ServerTls`] per listener builds the rustls configuration
//! from a [`TlsConfig`], runs handshakes (counting their outcome) and re-reads its files on
//! SIGHUP. Used by `tls` listeners and meant for `wss` too, which differ only in the default ALPN.

mod identity;
mod load;
mod resume;
mod stats;
mod upstream;
mod verify;

pub use identity::{IdentityError, cert_field};
pub use stats::{HandshakeFailure, TlsStats};
pub use upstream::UpstreamTls;
pub use verify::ChainTooLong;

use crate::config::{TlsConfig, TlsVersion, VerifyClient};
use anyhow::{Context, anyhow};
use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{
    NoServerSessionStorage, ProducesTickets, ServerSessionMemoryCache, StoresServerSessions,
    WebPkiClientVerifier,
};
use rustls::{CertificateError, HandshakeKind, ServerConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;

/// ALPN the `tls` listener kind offers unless `tls.alpn` says otherwise.
pub const DEFAULT_ALPN_MQTT: &[&str] = &["mqtt"];

/// A listener's TLS server side: the current rustls configuration (swapped on reload), the
/// session cache and ticket keys (kept across reloads) and the handshake counters.
#[derive(Debug)]
pub struct ServerTls {
    source: TlsConfig,
    alpn: Vec<Vec<u8>>,
    current: ArcSwap<ServerConfig>,
    cache: Arc<dyn StoresServerSessions>,
    tickets: Option<Arc<dyn ProducesTickets>>,
    /// Handshake outcomes, shown in the listener's stats.
    pub stats: TlsStats,
}

impl ServerTls {
    /// Reads the files `config` names and builds the server side; `default_alpn` applies when
    /// `config.alpn` is absent (`["mqtt"]` for `tls`, `["http/1.1"]` for `wss`).
    pub fn new(config: &TlsConfig, default_alpn: &[&str]) -> anyhow::Result<ServerTls> {
        let alpn: Vec<Vec<u8>> = match &config.alpn {
            Some(list) => list.iter().map(|a| a.as_bytes().to_vec()).collect(),
            None => default_alpn.iter().map(|a| a.as_bytes().to_vec()).collect(),
        };
        let resumes = !config.session_timeout.is_zero();
        let cache: Arc<dyn StoresServerSessions> = if resumes && config.session_cache > 0 {
            Arc::new(resume::TimedCache {
                inner: ServerSessionMemoryCache::new(config.session_cache),
                timeout: config.session_timeout,
            })
        } else {
            Arc::new(NoServerSessionStorage {})
        };
        let tickets: Option<Arc<dyn ProducesTickets>> = if resumes {
            let inner = rustls::crypto::aws_lc_rs::Ticketer::new()
                .map_err(|e| anyhow!("session ticket keys: {e}"))?;
            Some(Arc::new(resume::TimedTickets {
                inner,
                timeout: config.session_timeout,
            }))
        } else {
            None
        };
        let first = build(config, &alpn, &cache, tickets.as_ref())?;
        Ok(ServerTls {
            source: config.clone(),
            alpn,
            current: ArcSwap::from_pointee(first),
            cache,
            tickets,
            stats: TlsStats::default(),
        })
    }

    /// Reads the certificate, key and CA files again; new handshakes use them, established
    /// connections are untouched. On error the previous files stay in use.
    pub fn reload(&self) -> anyhow::Result<()> {
        let result = build(&self.source, &self.alpn, &self.cache, self.tickets.as_ref())
            .map(|config| self.current.store(Arc::new(config)));
        self.stats.reloaded(result.is_ok());
        result
    }

    /// Runs the server side of a handshake on `io` within `timeout`, counting the outcome.
    pub async fn accept<IO>(
        &self,
        io: IO,
        timeout: Duration,
    ) -> Result<TlsStream<IO>, HandshakeFailure>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let started = Instant::now();
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current.load_full());
        let outcome = match tokio::time::timeout(timeout, acceptor.accept(io)).await {
            Err(_elapsed) => Err(HandshakeFailure::Timeout),
            Ok(Err(error)) => Err(classify(&error)),
            Ok(Ok(stream)) => Ok(stream),
        };
        match &outcome {
            Ok(stream) => {
                let resumed = stream.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
                self.stats.ok(resumed, started.elapsed());
            }
            Err(reason) => self.stats.failed(*reason),
        }
        outcome
    }
}

/// A rustls server configuration from the files as they are now.
fn build(
    c: &TlsConfig,
    alpn: &[Vec<u8>],
    cache: &Arc<dyn StoresServerSessions>,
    tickets: Option<&Arc<dyn ProducesTickets>>,
) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(provider(c.ciphers.as_deref())?);
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = c
        .protocols
        .iter()
        .map(|v| match v {
            TlsVersion::Tls12 => &rustls::version::TLS12,
            TlsVersion::Tls13 => &rustls::version::TLS13,
        })
        .collect();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .context("tls.protocols and tls.ciphers leave no usable cipher suite")?;
    let builder = match (c.verify_client, &c.client_ca) {
        (VerifyClient::Off, _) | (_, None) => builder.with_no_client_auth(),
        (mode, Some(ca)) => {
            let roots = Arc::new(load::roots(ca)?);
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
            if mode == VerifyClient::Optional {
                verifier = verifier.allow_unauthenticated();
            }
            let inner = verifier
                .build()
                .with_context(|| format!("client CAs in {}", ca.display()))?;
            builder.with_client_cert_verifier(Arc::new(verify::DepthLimited::new(
                inner,
                &roots,
                provider.signature_verification_algorithms,
                c.verify_depth,
            )))
        }
    };
    let certs = load::certificates(&c.cert)?;
    let key = load::private_key(&c.key)?;
    let mut config = builder.with_single_cert(certs, key).with_context(|| {
        format!(
            "certificate {} and key {} do not go together",
            c.cert.display(),
            c.key.display()
        )
    })?;
    config.alpn_protocols = alpn.to_vec();
    config.session_storage = cache.clone();
    if let Some(tickets) = tickets {
        config.ticketer = tickets.clone();
    }
    Ok(config)
}

/// The aws-lc-rs provider, with only the named cipher suites when `ciphers` is set.
fn provider(ciphers: Option<&[String]>) -> anyhow::Result<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(names) = ciphers {
        provider.cipher_suites = names
            .iter()
            .map(|name| {
                rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES
                    .iter()
                    .find(|s| s.suite().as_str() == Some(name.as_str()))
                    .copied()
                    .ok_or_else(|| anyhow!("unknown cipher suite {name:?}"))
            })
            .collect::<anyhow::Result<_>>()?;
    }
    Ok(provider)
}

/// The counted reason behind a failed handshake's I/O error.
fn classify(error: &std::io::Error) -> HandshakeFailure {
    use std::io::ErrorKind;
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match error.kind() {
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe => HandshakeFailure::Closed,
            _ => HandshakeFailure::Other,
        };
    };
    match tls {
        rustls::Error::NoCertificatesPresented => HandshakeFailure::NoCertificate,
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => HandshakeFailure::UnknownCa,
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => HandshakeFailure::Expired,
            CertificateError::Other(other) if other.0.downcast_ref::<ChainTooLong>().is_some() => {
                HandshakeFailure::ChainTooLong
            }
            _ => HandshakeFailure::BadCertificate,
        },
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => HandshakeFailure::Malformed,
        rustls::Error::PeerIncompatible(_) => HandshakeFailure::Incompatible,
        rustls::Error::NoApplicationProtocol => HandshakeFailure::NoAlpn,
        rustls::Error::AlertReceived(_) => HandshakeFailure::AlertReceived,
        _ => HandshakeFailure::Other,
    }
}
