//! The file as written: every optional key is an `Option`, every value keeps its span so that
//! validation errors can point at a line. Unknown keys are refused here, by serde.
//!
//! Field names are the file's keys one for one; `docs/config-keys.md` documents them.

use serde::Deserialize;
use toml::Spanned;

/// A value that may be written as a string (`"10s"`, `"64KiB"`) or a bare TOML integer
/// (seconds or bytes); validation decides which strings are acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NumOrStr {
    /// A bare TOML integer: seconds or bytes.
    Int(i64),
    /// A string, unit included, parsed during validation.
    Str(String),
}

impl<'de> Deserialize<'de> for NumOrStr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = NumOrStr;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string with a unit (e.g. \"10s\", \"16KiB\") or an integer")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<NumOrStr, E> {
                Ok(NumOrStr::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<NumOrStr, E> {
                i64::try_from(v)
                    .map(NumOrStr::Int)
                    .map_err(|_| E::custom("integer is too large"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<NumOrStr, E> {
                Ok(NumOrStr::Str(v.to_owned()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A key that takes one string or a list of them (`path = "/mqtt"` or `path = ["/a", "/b"]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// A single string.
    One(String),
    /// A list of strings.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The strings, one or many.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// The whole document.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub stats: Option<RawStats>,
    #[serde(default)]
    pub dataplane: Option<RawDataplane>,
    #[serde(default)]
    pub log: Option<RawLog>,
    #[serde(default)]
    pub upstream: Vec<RawUpstream>,
    #[serde(default)]
    pub listener: Vec<RawListener>,
}

/// `[stats]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStats {
    pub listen: Option<Spanned<String>>,
}

/// `[dataplane]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDataplane {
    pub mode: Option<Spanned<String>>,
    pub bpffs_pin: Option<Spanned<String>>,
    pub close_drain_timeout: Option<Spanned<NumOrStr>>,
    pub max_inflight_per_flow: Option<Spanned<NumOrStr>>,
    pub max_inflight_total: Option<Spanned<NumOrStr>>,
    pub max_daemon_held_per_flow: Option<Spanned<NumOrStr>>,
    pub max_daemon_held_total: Option<Spanned<NumOrStr>>,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub access: Option<Spanned<String>>,
}

/// One `[[upstream]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: Spanned<String>,
    pub balance: Option<Spanned<String>>,
    pub proxy_protocol: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<NumOrStr>>,
    pub resolve_interval: Option<Spanned<NumOrStr>>,
    pub servers: Option<Spanned<Vec<RawServer>>>,
    pub upstream_protocol: Option<Spanned<String>>,
    pub upstream_host: Option<Spanned<String>>,
    pub upstream_tls: Option<Spanned<RawUpstreamTls>>,
}

/// An upstream's `upstream_tls = { ca, server_name }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub ca: Spanned<String>,
    pub server_name: Option<Spanned<String>>,
}

/// One `servers[]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub addr: Spanned<String>,
    pub weight: Option<Spanned<i64>>,
    pub max_fails: Option<Spanned<i64>>,
    pub fail_timeout: Option<Spanned<NumOrStr>>,
    pub down: Option<Spanned<bool>>,
    pub backup: Option<Spanned<bool>>,
}

/// One `[[listener]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: Spanned<String>,
    pub kind: Spanned<String>,
    pub listen: Spanned<String>,
    pub upstream: Spanned<String>,
    pub connect_packet_timeout: Option<Spanned<NumOrStr>>,
    pub max_connect_size: Option<Spanned<NumOrStr>>,
    pub idle_timeout: Option<Spanned<NumOrStr>>,
    pub tcp_nodelay: Option<Spanned<bool>>,
    pub buffer_size: Option<Spanned<NumOrStr>>,
    pub max_connections: Option<Spanned<i64>>,
    // ws listeners (config/ws.rs)
    pub path: Option<Spanned<OneOrMany>>,
    pub require_subprotocol: Option<Spanned<bool>>,
    pub max_frame_size: Option<Spanned<NumOrStr>>,
    pub allowed_origins: Option<Spanned<OneOrMany>>,
    pub trust_forwarded_for: Option<Spanned<OneOrMany>>,
    pub handshake_timeout: Option<Spanned<NumOrStr>>,
    pub tls: Option<Spanned<RawTls>>,
    pub rewrite_client_id: Option<Spanned<String>>,
    pub rewrite_username: Option<Spanned<String>>,
}

/// A listener's `tls = { ... }` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    pub client_ca: Option<Spanned<String>>,
    pub verify_client: Option<Spanned<String>>,
    pub verify_depth: Option<Spanned<i64>>,
    pub protocols: Option<Spanned<Vec<String>>>,
    pub ciphers: Option<Spanned<super::tls::CiphersValue>>,
    pub session_cache: Option<Spanned<NumOrStr>>,
    pub session_timeout: Option<Spanned<NumOrStr>>,
    pub alpn: Option<Spanned<Vec<String>>>,
}
