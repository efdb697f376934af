//! `[[listener]]`: an address mqsplice accepts clients on, what it speaks there, and which
//! upstream its clients go to.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::tls::{CertField, RawTls, TlsConfig, VerifyClient, parse_cert_field};
use super::value::{
    Invalid, NumOrStr, OneOrMany, field, flag, non_empty_name, optional_key, parse_listen_addr,
    positive_duration, required_key, size_in_range,
};
use super::ws::{RawWsKeys, WsListenerConfig};

/// Default of `listener.connect_packet_timeout`.
pub const DEFAULT_CONNECT_PACKET_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of `listener.max_connect_size`.
pub const DEFAULT_MAX_CONNECT_SIZE: usize = 64 * 1024;
/// Default of `listener.idle_timeout` (NGINX's `proxy_timeout` is 10m).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default of `listener.buffer_size`.
pub const DEFAULT_BUFFER_SIZE: usize = 16 * 1024;
/// Default of `listener.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Default of `listener.tcp_nodelay`: MQTT packets are small and latency matters.
pub const DEFAULT_TCP_NODELAY: bool = true;

/// Smallest accepted `buffer_size`.
pub const MIN_BUFFER_SIZE: u64 = 1024;
/// Largest accepted `buffer_size`.
pub const MAX_BUFFER_SIZE: u64 = 16 * 1024 * 1024;
/// Smallest accepted `max_connect_size`: room for a CONNECT with a short client id.
pub const MIN_CONNECT_SIZE: u64 = 64;
/// Largest accepted `max_connect_size`: MQTT's largest packet.
pub const MAX_CONNECT_SIZE: u64 = 256 * 1024 * 1024;

/// One `[[listener]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) name: Spanned<String>,
    kind: Spanned<String>,
    pub(super) listen: Spanned<String>,
    pub(super) upstream: Spanned<String>,
    connect_packet_timeout: Option<Spanned<NumOrStr>>,
    max_connect_size: Option<Spanned<NumOrStr>>,
    idle_timeout: Option<Spanned<NumOrStr>>,
    tcp_nodelay: Option<Spanned<bool>>,
    buffer_size: Option<Spanned<NumOrStr>>,
    max_connections: Option<Spanned<i64>>,
    // The ws and wss keys (config/ws.rs).
    path: Option<Spanned<OneOrMany>>,
    require_subprotocol: Option<Spanned<bool>>,
    max_frame_size: Option<Spanned<NumOrStr>>,
    allowed_origins: Option<Spanned<OneOrMany>>,
    trust_forwarded_for: Option<Spanned<OneOrMany>>,
    handshake_timeout: Option<Spanned<NumOrStr>>,
    // The tls and wss keys (config/tls.rs).
    tls: Option<Spanned<RawTls>>,
    rewrite_client_id: Option<Spanned<String>>,
    rewrite_username: Option<Spanned<String>>,
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    Tcp,
    /// TLS terminated by mqsplice (rustls); the `tls` table says how.
    Tls,
    /// MQTT over WebSocket (RFC 6455) on plain TCP.
    Ws,
    /// MQTT over WebSocket over TLS: the `tls` table and the ws keys together.
    Wss,
}

impl ListenerKind {
    /// The configuration spelling, also used in stats.
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Tls => "tls",
            ListenerKind::Ws => "ws",
            ListenerKind::Wss => "wss",
        }
    }

    fn terminates_tls(self) -> bool {
        matches!(self, ListenerKind::Tls | ListenerKind::Wss)
    }

    fn speaks_websocket(self) -> bool {
        matches!(self, ListenerKind::Ws | ListenerKind::Wss)
    }
}

/// One `[[listener]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub kind: ListenerKind,
    pub listen: SocketAddr,
    /// Name of an `[[upstream]]`; validated to exist.
    pub upstream: String,
    /// Default [`DEFAULT_CONNECT_PACKET_TIMEOUT`].
    pub connect_packet_timeout: Duration,
    /// Default [`DEFAULT_MAX_CONNECT_SIZE`].
    pub max_connect_size: usize,
    /// Default [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// Default [`DEFAULT_TCP_NODELAY`].
    pub tcp_nodelay: bool,
    /// Per direction, userspace copy path. Default [`DEFAULT_BUFFER_SIZE`].
    pub buffer_size: usize,
    /// Default [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// The `tls` table; present exactly when the kind terminates TLS.
    pub tls: Option<TlsConfig>,
    /// Replace the CONNECT's client identifier with this field of the client certificate.
    pub rewrite_client_id: Option<CertField>,
    /// Replace (or add) the CONNECT's user name with this field of the client certificate.
    pub rewrite_username: Option<CertField>,
    /// The WebSocket settings; `Some` exactly for `ws` and `wss` listeners.
    pub ws: Option<WsListenerConfig>,
}

impl ListenerConfig {
    /// Validates `listener[i]` found at `path`, on its own; the checks against other listeners
    /// and the upstreams are the document's (config.rs).
    pub(super) fn from_raw(raw: &RawListener, path: &str) -> Result<ListenerConfig, Invalid> {
        let name = required_key!(raw, path, name, non_empty_name("listener"))?;
        let kind = required_key!(raw, path, kind, |k| parse_listener_kind(k))?;
        let listen = required_key!(raw, path, listen, |l| parse_listen_addr(l))?;
        let connect_packet_timeout = optional_key!(
            raw,
            path,
            connect_packet_timeout,
            DEFAULT_CONNECT_PACKET_TIMEOUT,
            positive_duration
        )?;
        let max_connect_size =
            optional_key!(raw, path, max_connect_size, DEFAULT_MAX_CONNECT_SIZE, |v| {
                size_in_range(v, MIN_CONNECT_SIZE, MAX_CONNECT_SIZE)
            })?;
        let idle_timeout = optional_key!(
            raw,
            path,
            idle_timeout,
            DEFAULT_IDLE_TIMEOUT,
            positive_duration
        )?;
        let buffer_size = optional_key!(raw, path, buffer_size, DEFAULT_BUFFER_SIZE, |v| {
            size_in_range(v, MIN_BUFFER_SIZE, MAX_BUFFER_SIZE)
        })?;
        let max_connections = optional_key!(
            raw,
            path,
            max_connections,
            DEFAULT_MAX_CONNECTIONS,
            max_connections_value
        )?;
        let tls = tls_table(raw, path, kind)?;
        let rewrite_client_id =
            cert_rewrite(&raw.rewrite_client_id, path, "rewrite_client_id", &tls)?;
        let rewrite_username = cert_rewrite(&raw.rewrite_username, path, "rewrite_username", &tls)?;
        let ws_keys = RawWsKeys {
            path: &raw.path,
            require_subprotocol: &raw.require_subprotocol,
            max_frame_size: &raw.max_frame_size,
            allowed_origins: &raw.allowed_origins,
            trust_forwarded_for: &raw.trust_forwarded_for,
            handshake_timeout: &raw.handshake_timeout,
        };
        let ws = WsListenerConfig::from_keys(ws_keys, path, kind.speaks_websocket())?;
        Ok(ListenerConfig {
            name,
            kind,
            listen,
            upstream: raw.upstream.get_ref().clone(),
            connect_packet_timeout,
            max_connect_size,
            idle_timeout,
            tcp_nodelay: flag(&raw.tcp_nodelay, DEFAULT_TCP_NODELAY),
            buffer_size,
            max_connections,
            tls,
            rewrite_client_id,
            rewrite_username,
            ws,
        })
    }
}

/// The `tls` table, which a listener has exactly when its kind terminates TLS.
fn tls_table(
    raw: &RawListener,
    path: &str,
    kind: ListenerKind,
) -> Result<Option<TlsConfig>, Invalid> {
    match (&raw.tls, kind.terminates_tls()) {
        (Some(table), true) => {
            TlsConfig::from_raw(table.get_ref(), &format!("{path}.tls")).map(Some)
        }
        (None, true) => Err(Invalid::at(
            format!("{path}.tls"),
            Some(raw.kind.span()),
            format!(
                "a {} listener needs a tls = {{ cert = \"...\", key = \"...\" }} table",
                kind.as_str()
            ),
        )),
        (Some(table), false) => Err(Invalid::at(
            format!("{path}.tls"),
            Some(table.span()),
            format!("a {:?} listener takes no tls table", kind.as_str()),
        )),
        (None, false) => Ok(None),
    }
}

/// `rewrite_client_id` or `rewrite_username`: only a listener that verifies client certificates
/// has a field to take.
fn cert_rewrite(
    value: &Option<Spanned<String>>,
    path: &str,
    key: &str,
    tls: &Option<TlsConfig>,
) -> Result<Option<CertField>, Invalid> {
    let key_path = format!("{path}.{key}");
    let parsed = field(value, &key_path, None, |s| parse_cert_field(s).map(Some))?;
    let verifies = tls
        .as_ref()
        .is_some_and(|t| t.verify_client != VerifyClient::Off);
    match (parsed, value) {
        (Some(_), Some(v)) if !verifies => Err(Invalid::at(
            key_path,
            Some(v.span()),
            format!(
                "{key} needs a client certificate: a tls listener with verify_client = \"required\" or \"optional\""
            ),
        )),
        _ => Ok(parsed),
    }
}

/// `listener.kind`: the later kinds get their own message so nobody hunts for a typo.
pub fn parse_listener_kind(value: &str) -> Result<ListenerKind, String> {
    match value {
        "tcp" => Ok(ListenerKind::Tcp),
        "tls" => Ok(ListenerKind::Tls),
        "ws" => Ok(ListenerKind::Ws),
        "wss" => Ok(ListenerKind::Wss),
        _ => Err(format!(
            "unknown listener kind {value:?}, expected one of: tcp, tls, ws, wss"
        )),
    }
}

/// `listener.max_connections`.
pub fn max_connections_value(value: &i64) -> Result<usize, String> {
    if *value < 1 {
        return Err("max_connections must be at least 1".into());
    }
    usize::try_from(*value).map_err(|_| "max_connections is too large".into())
}

/// Whether two listening addresses would fight over the same port when bound.
///
/// Port 0 asks the kernel for a fresh port, so it never conflicts; a wildcard address of the same
/// family conflicts with every address on that port.
pub fn listen_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() || a.is_ipv4() != b.is_ipv4() {
        return false;
    }
    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(parse_listener_kind("tcp"), Ok(ListenerKind::Tcp));
        assert_eq!(parse_listener_kind("tls"), Ok(ListenerKind::Tls));
        assert_eq!(parse_listener_kind("ws"), Ok(ListenerKind::Ws));
        assert_eq!(parse_listener_kind("wss"), Ok(ListenerKind::Wss));
        assert!(
            parse_listener_kind("udp")
                .unwrap_err()
                .contains("expected one of: tcp")
        );
        assert!(parse_listener_kind("TCP").is_err());
    }

    #[test]
    fn max_connections() {
        assert_eq!(max_connections_value(&1), Ok(1));
        assert!(
            max_connections_value(&0)
                .unwrap_err()
                .contains("at least 1")
        );
    }

    #[test]
    fn listen_conflicts() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        assert!(listen_conflict(a("0.0.0.0:1883"), a("0.0.0.0:1883")));
        assert!(listen_conflict(a("0.0.0.0:1883"), a("127.0.0.1:1883")));
        assert!(listen_conflict(a("127.0.0.1:1883"), a("0.0.0.0:1883")));
        assert!(!listen_conflict(a("127.0.0.1:1883"), a("127.0.0.2:1883")));
        assert!(!listen_conflict(a("0.0.0.0:1883"), a("0.0.0.0:1884")));
        assert!(!listen_conflict(a("127.0.0.1:0"), a("127.0.0.1:0")));
        assert!(!listen_conflict(a("0.0.0.0:1883"), a("[::1]:1883")));
        assert!(listen_conflict(a("[::]:1883"), a("[::1]:1883")));
    }
}
