//! The WebSocket keys of a `ws` listener and of an upstream that speaks WebSocket to its brokers:
//! each rule a small pure function, as in `validate`.

use std::ops::Range;
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use super::value::{Invalid, NumOrStr, OneOrMany, field, positive_duration, size_in_range};

/// Default of `listener.path`.
pub const DEFAULT_WS_PATH: &str = "/mqtt";
/// Default of `listener.max_frame_size`: room for any ordinary MQTT packet in one frame.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 1 << 20;
/// Bounds of `listener.max_frame_size`: at least a CONNECT, at most MQTT's largest packet.
const MIN_FRAME_SIZE: u64 = 128;
const MAX_FRAME_SIZE: u64 = 256 << 20;
/// Default of `listener.handshake_timeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The WebSocket settings of a `ws` listener.
#[derive(Debug, Clone, PartialEq)]
pub struct WsListenerConfig {
    /// Request paths accepted for the upgrade (exact match, query ignored). Default `["/mqtt"]`.
    pub paths: Vec<String>,
    /// Refuse requests that offer no `Sec-WebSocket-Protocol`. Default false.
    pub require_subprotocol: bool,
    /// Largest frame (and reassembled message) a client may send. Default 1 MiB.
    pub max_frame_size: usize,
    /// `Origin` values accepted; empty accepts any (and requests without one). Default empty.
    pub allowed_origins: Vec<String>,
    /// Peers whose `X-Forwarded-For` / `X-Real-IP` are believed. Default none.
    pub trust_forwarded_for: Vec<IpNet>,
    /// Budget for the whole HTTP upgrade. Default 5s.
    pub handshake_timeout: Duration,
}

/// What an upstream speaks to its brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// Plain MQTT over TCP (default).
    Tcp,
    /// MQTT over WebSocket: the client's upgrade is forwarded to the brokers' WebSocket listener.
    Ws,
}

/// `listener.path`: absolute request paths without a query.
pub fn parse_paths(value: &OneOrMany) -> Result<Vec<String>, String> {
    let paths = value.to_vec();
    if paths.is_empty() {
        return Err("at least one path is required, e.g. \"/mqtt\"".into());
    }
    for p in &paths {
        if !p.starts_with('/') || p.contains(['?', '#', ' ']) {
            return Err(format!(
                "path {p:?} must start with '/' and contain no query, fragment or space"
            ));
        }
    }
    Ok(paths)
}

/// `listener.allowed_origins`: origins as browsers send them (`https://app.example`).
pub fn parse_origins(value: &OneOrMany) -> Result<Vec<String>, String> {
    let origins = value.to_vec();
    for o in &origins {
        if o.is_empty() || o.ends_with('/') {
            return Err(format!(
                "origin {o:?} must be scheme://host[:port] without a trailing '/'"
            ));
        }
    }
    Ok(origins)
}

/// `listener.trust_forwarded_for`: CIDRs (a bare address is a /32 or /128).
pub fn parse_trusted(value: &OneOrMany) -> Result<Vec<IpNet>, String> {
    value
        .to_vec()
        .iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{s:?} is not a CIDR such as \"10.0.0.0/8\" or an IP address"))
        })
        .collect()
}

/// `upstream.upstream_protocol`: `tcp` or `ws`.
pub fn parse_upstream_protocol(value: &str) -> Result<UpstreamProtocol, String> {
    match value {
        "tcp" => Ok(UpstreamProtocol::Tcp),
        "ws" => Ok(UpstreamProtocol::Ws),
        _ => Err(format!(
            "unknown upstream protocol {value:?}, expected one of: tcp, ws"
        )),
    }
}

/// `upstream.upstream_host`: a `Host` header value (host or host:port).
pub fn parse_upstream_host(value: &str) -> Result<String, String> {
    if value.is_empty()
        || value
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!("{value:?} is not a host name for the Host header"));
    }
    Ok(value.to_string())
}

fn max_frame_size(value: &NumOrStr) -> Result<usize, String> {
    size_in_range(value, MIN_FRAME_SIZE, MAX_FRAME_SIZE)
}

/// The ws keys of a `[[listener]]` as written: they sit in the listener's own table, which
/// lends them here so that this module needs nothing of the listener's.
pub(super) struct RawWsKeys<'a> {
    pub path: &'a Option<Spanned<OneOrMany>>,
    pub require_subprotocol: &'a Option<Spanned<bool>>,
    pub max_frame_size: &'a Option<Spanned<NumOrStr>>,
    pub allowed_origins: &'a Option<Spanned<OneOrMany>>,
    pub trust_forwarded_for: &'a Option<Spanned<OneOrMany>>,
    pub handshake_timeout: &'a Option<Spanned<NumOrStr>>,
}

impl RawWsKeys<'_> {
    /// The first ws key written, with its span: what a listener of another kind must not have.
    fn first_present(&self) -> Option<(&'static str, Range<usize>)> {
        [
            ("path", self.path.as_ref().map(Spanned::span)),
            (
                "require_subprotocol",
                self.require_subprotocol.as_ref().map(Spanned::span),
            ),
            (
                "max_frame_size",
                self.max_frame_size.as_ref().map(Spanned::span),
            ),
            (
                "allowed_origins",
                self.allowed_origins.as_ref().map(Spanned::span),
            ),
            (
                "trust_forwarded_for",
                self.trust_forwarded_for.as_ref().map(Spanned::span),
            ),
            (
                "handshake_timeout",
                self.handshake_timeout.as_ref().map(Spanned::span),
            ),
        ]
        .into_iter()
        .find_map(|(key, span)| Some((key, span?)))
    }
}

impl WsListenerConfig {
    /// The ws keys of the listener at `path`: `Some` for a `ws` or `wss` listener, an error when
    /// they appear on another kind.
    pub(super) fn from_keys(
        raw: RawWsKeys<'_>,
        path: &str,
        is_ws: bool,
    ) -> Result<Option<WsListenerConfig>, Invalid> {
        if !is_ws {
            return match raw.first_present() {
                Some((key, span)) => Err(Invalid::at(
                    format!("{path}.{key}"),
                    Some(span),
                    format!("{key} applies only to ws and wss listeners"),
                )),
                None => Ok(None),
            };
        }
        let key = |name: &str| format!("{path}.{name}");
        Ok(Some(WsListenerConfig {
            paths: field(
                raw.path,
                &key("path"),
                vec![DEFAULT_WS_PATH.into()],
                parse_paths,
            )?,
            require_subprotocol: raw
                .require_subprotocol
                .as_ref()
                .is_some_and(|b| *b.get_ref()),
            max_frame_size: field(
                raw.max_frame_size,
                &key("max_frame_size"),
                DEFAULT_MAX_FRAME_SIZE,
                max_frame_size,
            )?,
            allowed_origins: field(
                raw.allowed_origins,
                &key("allowed_origins"),
                Vec::new(),
                parse_origins,
            )?,
            trust_forwarded_for: field(
                raw.trust_forwarded_for,
                &key("trust_forwarded_for"),
                Vec::new(),
                parse_trusted,
            )?,
            handshake_timeout: field(
                raw.handshake_timeout,
                &key("handshake_timeout"),
                DEFAULT_HANDSHAKE_TIMEOUT,
                positive_duration,
            )?,
        }))
    }
}

/// An upstream's `upstream_protocol` and `upstream_host` (at `path`): the protocol, and the Host
/// override that only a WebSocket upstream can have.
pub(super) fn upstream(
    protocol: &Option<Spanned<String>>,
    host: &Option<Spanned<String>>,
    path: &str,
) -> Result<(UpstreamProtocol, Option<String>), Invalid> {
    let parsed_protocol = field(
        protocol,
        &format!("{path}.upstream_protocol"),
        UpstreamProtocol::Tcp,
        |s| parse_upstream_protocol(s),
    )?;
    let parsed_host = field(host, &format!("{path}.upstream_host"), None, |s| {
        parse_upstream_host(s).map(Some)
    })?;
    if parsed_protocol == UpstreamProtocol::Tcp
        && let Some(h) = host
    {
        return Err(Invalid::at(
            format!("{path}.upstream_host"),
            Some(h.span()),
            "upstream_host applies only with upstream_protocol = \"ws\"",
        ));
    }
    Ok((parsed_protocol, parsed_host))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn many(v: &[&str]) -> OneOrMany {
        OneOrMany::Many(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn paths() {
        assert_eq!(
            parse_paths(&OneOrMany::One("/mqtt".into())),
            Ok(vec!["/mqtt".to_string()])
        );
        assert_eq!(parse_paths(&many(&["/a", "/b"])).unwrap().len(), 2);
        assert!(
            parse_paths(&many(&[]))
                .unwrap_err()
                .contains("at least one")
        );
        assert!(
            parse_paths(&OneOrMany::One("mqtt".into()))
                .unwrap_err()
                .contains("start with '/'")
        );
        assert!(parse_paths(&OneOrMany::One("/mqtt?x=1".into())).is_err());
    }

    #[test]
    fn trusted_and_origins() {
        let nets = parse_trusted(&many(&["10.0.0.0/8", "::1", "192.168.1.1"])).unwrap();
        assert!(nets[0].contains(&"10.2.3.4".parse::<std::net::IpAddr>().unwrap()));
        assert_eq!(nets[1].prefix_len(), 128);
        assert!(
            parse_trusted(&many(&["10.0.0.0/33"]))
                .unwrap_err()
                .contains("not a CIDR")
        );
        assert!(parse_origins(&many(&["https://a.example/"])).is_err());
        assert!(parse_origins(&many(&["https://a.example"])).is_ok());
    }

    #[test]
    fn upstream_protocols() {
        assert_eq!(parse_upstream_protocol("ws"), Ok(UpstreamProtocol::Ws));
        assert!(
            parse_upstream_protocol("wss")
                .unwrap_err()
                .contains("expected one of: tcp, ws")
        );
        assert!(parse_upstream_host("a b").is_err());
        assert_eq!(
            parse_upstream_host("broker:8083").as_deref(),
            Ok("broker:8083")
        );
    }
}
