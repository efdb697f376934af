//! The `tls = { ... }` table of a listener and the certificate-identity rewrite keys: what rustls
//! can do, spelled so that an operator coming from NGINX learns what to write instead.

use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use serde::Deserialize;

use super::value::{
    Invalid, NumOrStr, non_empty_path, optional_key, positive_duration, required_key,
};

/// Default of `tls.verify_depth` (NGINX's `ssl_verify_depth`).
pub const DEFAULT_VERIFY_DEPTH: usize = 1;
/// Default of `tls.session_cache`: entries kept for session-id resumption.
pub const DEFAULT_SESSION_CACHE: usize = 20_000;
/// Default of `tls.session_timeout` (NGINX's `ssl_session_timeout`).
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(300);
/// Largest `verify_depth` accepted: longer chains than this are not seen in practice.
const MAX_VERIFY_DEPTH: i64 = 100;
/// Largest `session_cache` accepted (each entry is a few hundred bytes).
const MAX_SESSION_CACHE: i64 = 10_000_000;

/// A listener's `tls = { ... }` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    cert: Spanned<String>,
    key: Spanned<String>,
    client_ca: Option<Spanned<String>>,
    verify_client: Option<Spanned<String>>,
    verify_depth: Option<Spanned<i64>>,
    protocols: Option<Spanned<Vec<String>>>,
    ciphers: Option<Spanned<CiphersValue>>,
    session_cache: Option<Spanned<NumOrStr>>,
    session_timeout: Option<Spanned<NumOrStr>>,
    alpn: Option<Spanned<Vec<String>>>,
}

/// An upstream's `upstream_tls = { ca, server_name }` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstreamTls {
    ca: Spanned<String>,
    server_name: Option<Spanned<String>>,
}

/// Whether and how client certificates are asked for (NGINX's `ssl_verify_client`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyClient {
    /// No client certificate is requested.
    Off,
    /// Requested; a client without one is let through, one with a bad one is refused.
    Optional,
    /// A valid certificate is needed to get past the handshake.
    Required,
}

/// A TLS protocol version rustls speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// A field of the client certificate that can replace a CONNECT field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertField {
    /// Serial number, upper-case hex without colons (NGINX's `$ssl_client_serial`).
    Serial,
    /// The subject's first common name.
    CommonName,
    /// The first DNS name of the subject alternative names.
    SanDns,
    /// SHA-256 of the certificate's DER, lower-case hex.
    Fingerprint,
}

impl CertField {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CertField::Serial => "cert_serial",
            CertField::CommonName => "cert_cn",
            CertField::SanDns => "cert_san_dns",
            CertField::Fingerprint => "cert_fingerprint",
        }
    }
}

/// A listener's validated `tls` table; files are read when the listener starts (and on SIGHUP).
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key: PKCS#8, PKCS#1 or SEC1.
    pub key: PathBuf,
    /// PEM trust anchors for client certificates; required unless `verify_client` is off.
    pub client_ca: Option<PathBuf>,
    /// Default `off`.
    pub verify_client: VerifyClient,
    /// At most this many intermediate CAs between a client certificate and a trust anchor.
    pub verify_depth: usize,
    /// Default both, TLS 1.2 and 1.3.
    pub protocols: Vec<TlsVersion>,
    /// IANA/rustls suite names in preference order; `None` keeps rustls's defaults.
    pub ciphers: Option<Vec<String>>,
    /// Session-id cache entries; 0 turns the cache off (tickets still resume).
    pub session_cache: usize,
    /// How long a session can be resumed, by ticket or cache; 0 turns resumption off.
    pub session_timeout: Duration,
    /// ALPN protocol names; `None` takes the listener kind's default, an empty list turns it off.
    pub alpn: Option<Vec<String>>,
}

/// An upstream's `upstream_tls`: mqsplice connects to its brokers with TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTlsConfig {
    /// PEM trust anchors the brokers' certificates must chain to.
    pub ca: PathBuf,
    /// The name the brokers' certificates must carry; the host of each server's `addr` when absent.
    pub server_name: Option<String>,
}

/// A name a broker certificate is checked against: a DNS name or an IP address.
pub fn server_name_value(value: &str) -> Result<String, String> {
    rustls_pki_types::ServerName::try_from(value)
        .map(|_| value.to_owned())
        .map_err(|_| format!("{value:?} is not a valid DNS name or IP address"))
}

impl UpstreamTlsConfig {
    /// Validates an upstream's `upstream_tls` table found at `path`.
    pub(super) fn from_raw(raw: &RawUpstreamTls, path: &str) -> Result<UpstreamTlsConfig, Invalid> {
        Ok(UpstreamTlsConfig {
            ca: required_key!(raw, path, ca, non_empty_path)?,
            server_name: optional_key!(raw, path, server_name, None, |n| server_name_value(n)
                .map(Some),)?,
        })
    }
}

/// `tls.verify_client`.
pub fn parse_verify_client(value: &str) -> Result<VerifyClient, String> {
    match value {
        "off" => Ok(VerifyClient::Off),
        "optional" => Ok(VerifyClient::Optional),
        // NGINX's `ssl_verify_client on`.
        "required" | "on" => Ok(VerifyClient::Required),
        "optional_no_ca" => Err(
            "\"optional_no_ca\" is not supported: a certificate is only accepted when it verifies; \
             use \"optional\" or \"required\""
                .into(),
        ),
        _ => Err(format!(
            "unknown verify_client {value:?}, expected one of: off, optional, required"
        )),
    }
}

/// One entry of `tls.protocols`: NGINX's spellings, of which rustls speaks the last two.
pub fn parse_tls_version(value: &str) -> Result<TlsVersion, String> {
    match value {
        "TLSv1.2" => Ok(TlsVersion::Tls12),
        "TLSv1.3" => Ok(TlsVersion::Tls13),
        "SSLv2" | "SSLv3" | "TLSv1" | "TLSv1.0" | "TLSv1.1" => Err(format!(
            "{value} is not supported (rustls speaks TLS 1.2 and 1.3 only); \
             accepted: \"TLSv1.2\", \"TLSv1.3\""
        )),
        _ => Err(format!(
            "unknown protocol {value:?}, accepted: \"TLSv1.2\", \"TLSv1.3\""
        )),
    }
}

/// The cipher suite names rustls (with the aws-lc-rs provider) knows.
pub fn known_cipher_suites() -> Vec<&'static str> {
    rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES
        .iter()
        .filter_map(|s| s.suite().as_str())
        .collect()
}

/// One entry of `tls.ciphers`: an IANA/rustls suite name; OpenSSL names are refused with the hint.
pub fn parse_cipher(value: &str, known: &[&str]) -> Result<String, String> {
    if known.contains(&value) {
        return Ok(value.to_owned());
    }
    let openssl = value.contains([':', '!', '+', '-']) || value.chars().any(|c| c.is_lowercase());
    let what = if openssl {
        "looks like an OpenSSL cipher string, which rustls does not read"
    } else {
        "is not a cipher suite rustls offers"
    };
    Err(format!(
        "{value:?} {what}; ciphers takes a list of IANA/rustls suite names, e.g. \
         [\"TLS13_AES_128_GCM_SHA256\", \"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\"] (known: {})",
        known.join(", ")
    ))
}

/// `tls.ciphers`: a list of names. A single string is what an NGINX config has (`HIGH:!aNULL:!MD5`).
pub fn parse_ciphers(value: &CiphersValue) -> Result<Vec<String>, String> {
    let known = known_cipher_suites();
    match value {
        CiphersValue::One(s) => Err(format!(
            "{s:?} is an OpenSSL cipher string, which rustls does not read; ciphers takes a list of \
             IANA/rustls suite names, e.g. [\"TLS13_AES_128_GCM_SHA256\", \
             \"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\"] (known: {})",
            known.join(", ")
        )),
        CiphersValue::List(list) if list.is_empty() => {
            Err("ciphers must name at least one suite (leave the key out for the defaults)".into())
        }
        CiphersValue::List(list) => list.iter().map(|c| parse_cipher(c, &known)).collect(),
    }
}

/// `tls.ciphers` as written: a list (what rustls needs) or one string (what NGINX takes).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum CiphersValue {
    List(Vec<String>),
    One(String),
}

/// `tls.session_cache`: a number of entries. NGINX's `shared:SSL:10m` is sized in bytes of shared
/// memory, which has no meaning here.
pub fn session_cache_value(value: &NumOrStr) -> Result<usize, String> {
    match value {
        NumOrStr::Int(n) if (0..=MAX_SESSION_CACHE).contains(n) => Ok(*n as usize),
        NumOrStr::Int(_) => Err(format!(
            "session_cache must be between 0 (off) and {MAX_SESSION_CACHE} entries"
        )),
        NumOrStr::Str(s) if s == "off" => Ok(0),
        NumOrStr::Str(s) => Err(format!(
            "session_cache takes a number of sessions (e.g. 20000; 0 or \"off\" for none), not {s:?} \
             (NGINX's 1m of shared cache holds about 4000)"
        )),
    }
}

/// `tls.verify_depth`.
pub fn verify_depth_value(value: &i64) -> Result<usize, String> {
    if (0..=MAX_VERIFY_DEPTH).contains(value) {
        Ok(*value as usize)
    } else {
        Err(format!(
            "verify_depth must be between 0 and {MAX_VERIFY_DEPTH} (intermediate CAs allowed)"
        ))
    }
}

/// One `tls.alpn` entry: 1 to 255 bytes, as the protocol allows.
pub fn alpn_value(value: &str) -> Result<String, String> {
    if value.is_empty() || value.len() > 255 {
        Err(format!("ALPN name {value:?} must be 1 to 255 bytes long"))
    } else {
        Ok(value.to_owned())
    }
}

/// `rewrite_client_id` and `rewrite_username`.
pub fn parse_cert_field(value: &str) -> Result<CertField, String> {
    [
        CertField::Serial,
        CertField::CommonName,
        CertField::SanDns,
        CertField::Fingerprint,
    ]
    .into_iter()
    .find(|f| f.as_str() == value)
    .ok_or_else(|| {
        format!(
            "unknown certificate field {value:?}, expected one of: cert_serial, cert_cn, \
             cert_san_dns, cert_fingerprint"
        )
    })
}

impl TlsConfig {
    /// Validates a listener's `tls` table found at `path`.
    pub(super) fn from_raw(raw: &RawTls, path: &str) -> Result<TlsConfig, Invalid> {
        let cert = required_key!(raw, path, cert, non_empty_path)?;
        let key = required_key!(raw, path, key, non_empty_path)?;
        let client_ca = optional_key!(raw, path, client_ca, None, |p| {
            non_empty_path(p).map(Some)
        })?;
        let verify_client = optional_key!(raw, path, verify_client, VerifyClient::Off, |s| {
            parse_verify_client(s)
        },)?;
        if verify_client != VerifyClient::Off && client_ca.is_none() {
            return Err(Invalid::at(
                format!("{path}.client_ca"),
                raw.verify_client.as_ref().map(Spanned::span),
                "verify_client needs client_ca (the PEM file of CAs client certificates must chain to)",
            ));
        }
        let verify_depth = optional_key!(
            raw,
            path,
            verify_depth,
            DEFAULT_VERIFY_DEPTH,
            verify_depth_value,
        )?;
        let protocols = optional_key!(
            raw,
            path,
            protocols,
            vec![TlsVersion::Tls12, TlsVersion::Tls13],
            |list| {
                if list.is_empty() {
                    return Err(
                        "protocols must name at least one of \"TLSv1.2\", \"TLSv1.3\"".into(),
                    );
                }
                list.iter().map(|v| parse_tls_version(v)).collect()
            },
        )?;
        let ciphers = optional_key!(raw, path, ciphers, None, |c| { parse_ciphers(c).map(Some) })?;
        let session_cache = optional_key!(
            raw,
            path,
            session_cache,
            DEFAULT_SESSION_CACHE,
            session_cache_value,
        )?;
        let session_timeout = optional_key!(
            raw,
            path,
            session_timeout,
            DEFAULT_SESSION_TIMEOUT,
            |v| match v {
                NumOrStr::Int(0) => Ok(Duration::ZERO),
                NumOrStr::Str(s) if s == "0" || s == "off" => Ok(Duration::ZERO),
                v => positive_duration(v),
            },
        )?;
        let alpn = optional_key!(raw, path, alpn, None, |list| {
            list.iter()
                .map(|a| alpn_value(a))
                .collect::<Result<_, _>>()
                .map(Some)
        })?;
        Ok(TlsConfig {
            cert,
            key,
            client_ca,
            verify_client,
            verify_depth,
            protocols,
            ciphers,
            session_cache,
            session_timeout,
            alpn,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_protocols_are_refused_with_the_accepted_ones() {
        for old in ["TLSv1", "TLSv1.1", "SSLv3"] {
            let e = parse_tls_version(old).unwrap_err();
            assert!(e.contains("TLS 1.2 and 1.3 only"), "{e}");
            assert!(e.contains("\"TLSv1.2\", \"TLSv1.3\""), "{e}");
        }
        assert_eq!(parse_tls_version("TLSv1.3"), Ok(TlsVersion::Tls13));
        assert!(parse_tls_version("tls1.3").unwrap_err().contains("unknown"));
    }

    #[test]
    fn openssl_cipher_strings_are_refused_with_the_accepted_form() {
        let e = parse_ciphers(&CiphersValue::One("HIGH:!aNULL:!MD5".into())).unwrap_err();
        assert!(e.contains("OpenSSL cipher string"), "{e}");
        assert!(e.contains("TLS13_AES_128_GCM_SHA256"), "{e}");
        let e = parse_ciphers(&CiphersValue::List(vec![
            "ECDHE-RSA-AES128-GCM-SHA256".into(),
        ]))
        .unwrap_err();
        assert!(e.contains("OpenSSL"), "{e}");
        assert_eq!(
            parse_ciphers(&CiphersValue::List(vec![
                "TLS13_AES_256_GCM_SHA384".into(),
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into()
            ])),
            Ok(vec![
                "TLS13_AES_256_GCM_SHA384".to_string(),
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".to_string()
            ])
        );
    }

    #[test]
    fn verify_client_and_fields() {
        assert_eq!(parse_verify_client("optional"), Ok(VerifyClient::Optional));
        assert_eq!(parse_verify_client("on"), Ok(VerifyClient::Required));
        assert!(parse_verify_client("optional_no_ca").is_err());
        assert!(
            parse_verify_client("yes")
                .unwrap_err()
                .contains("off, optional, required")
        );
        assert_eq!(parse_cert_field("cert_serial"), Ok(CertField::Serial));
        assert!(parse_cert_field("serial").unwrap_err().contains("cert_cn"));
    }

    #[test]
    fn session_cache_takes_entries() {
        assert_eq!(session_cache_value(&NumOrStr::Int(0)), Ok(0));
        assert_eq!(session_cache_value(&NumOrStr::Str("off".into())), Ok(0));
        assert!(
            session_cache_value(&NumOrStr::Str("shared:SSL:10m".into()))
                .unwrap_err()
                .contains("number of sessions")
        );
        assert!(session_cache_value(&NumOrStr::Int(-1)).is_err());
    }
}
