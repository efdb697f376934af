//! Configuration: TOML parsed by pure functions into plain, validated structs.
//!
//! One module per section (`stats`, `dataplane`, `log`, `upstream`, `listener`, and the `tls` and
//! `ws` keys those two share), each with its form as written, its defaults and its rules; this
//! file holds the document and the checks across sections. Every key but `upstream.name`,
//! `servers[].addr` and `listener.name`/`kind`/`listen`/`upstream` has a default (NGINX's where
//! NGINX has one), so a minimal file stays minimal.

use std::collections::HashMap;

use serde::Deserialize;

mod dataplane;
mod error;
mod listener;
mod locate;
mod log;
mod stats;
mod tls;
pub mod units;
mod upstream;
mod value;
mod ws;

pub use dataplane::{
    DEFAULT_BPFFS_PIN, DEFAULT_CLOSE_DRAIN_TIMEOUT, DEFAULT_FLOW_TABLE_SIZE,
    DEFAULT_MAX_DAEMON_HELD_PER_FLOW, DEFAULT_MAX_DAEMON_HELD_TOTAL, DEFAULT_MAX_INFLIGHT_TOTAL,
    DataplaneConfig, DataplaneMode, InflightLimit, PacketConfig, auto_inflight_per_flow,
};
pub use error::ConfigError;
pub use listener::{
    DEFAULT_BUFFER_SIZE, DEFAULT_CONNECT_PACKET_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECT_SIZE, DEFAULT_MAX_CONNECTIONS, DEFAULT_TCP_NODELAY, ListenerConfig,
    ListenerKind, MAX_BUFFER_SIZE, MAX_CONNECT_SIZE, MIN_BUFFER_SIZE, MIN_CONNECT_SIZE,
};
pub use log::{AccessLog, LogConfig};
pub use stats::{DEFAULT_STATS_LISTEN, StatsConfig};
pub use tls::{
    CertField, DEFAULT_SESSION_CACHE, DEFAULT_SESSION_TIMEOUT, DEFAULT_VERIFY_DEPTH, TlsConfig,
    TlsVersion, UpstreamTlsConfig, VerifyClient,
};
pub use upstream::{
    BalanceMethod, DEFAULT_CONNECT_TIMEOUT, DEFAULT_FAIL_TIMEOUT, DEFAULT_MAX_FAILS,
    DEFAULT_RESOLVE_INTERVAL, DEFAULT_WEIGHT, ProxyProtocol, ServerConfig, UpstreamConfig,
};
pub use value::MAX_DURATION;
pub use ws::{
    DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_FRAME_SIZE, DEFAULT_WS_PATH, UpstreamProtocol,
    WsListenerConfig,
};

use value::Invalid;

/// The whole, validated configuration of one mqsplice process.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub stats: StatsConfig,
    pub dataplane: DataplaneConfig,
    pub log: LogConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub listeners: Vec<ListenerConfig>,
}

/// The document as written: every optional key is an `Option`, every value keeps its span so
/// that validation errors can point at a line. Unknown keys are refused here, by serde.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    stats: stats::RawStats,
    #[serde(default)]
    dataplane: dataplane::RawDataplane,
    #[serde(default)]
    log: log::RawLog,
    #[serde(default)]
    upstream: Vec<upstream::RawUpstream>,
    #[serde(default)]
    listener: Vec<listener::RawListener>,
}

impl Config {
    /// Parses and validates a TOML document; the first mistake found is returned.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::from_toml(text, &e))?;
        Config::from_raw(&raw).map_err(|e| ConfigError::from_invalid(text, e))
    }

    /// Reads, parses and validates a TOML file; errors name the file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(None, None, None, format!("{}: {e}", path.display())))?;
        Config::from_toml_str(&text).map_err(|mut e| {
            e.message = format!("{}: {}", path.display(), e.message);
            e
        })
    }

    /// Validates each section in file order, then what ties them together (names, addresses,
    /// the upstream each listener names); the first error wins.
    fn from_raw(raw: &RawConfig) -> Result<Config, Invalid> {
        let stats = StatsConfig::from_raw(&raw.stats)?;
        let dataplane = DataplaneConfig::from_raw(&raw.dataplane)?;
        let log = LogConfig::from_raw(&raw.log)?;
        let upstreams = upstreams(&raw.upstream)?;
        let listeners = listeners(&raw.listener, &upstreams, &stats)?;
        Ok(Config {
            stats,
            dataplane,
            log,
            upstreams,
            listeners,
        })
    }
}

/// Every `[[upstream]]`: at least one, names unique.
fn upstreams(raw: &[upstream::RawUpstream]) -> Result<Vec<UpstreamConfig>, Invalid> {
    if raw.is_empty() {
        return Err(Invalid::at(
            "upstream",
            None,
            "at least one [[upstream]] is required",
        ));
    }
    let mut upstreams: Vec<UpstreamConfig> = Vec::with_capacity(raw.len());
    for (i, raw_upstream) in raw.iter().enumerate() {
        let path = format!("upstream[{i}]");
        let up = UpstreamConfig::from_raw(raw_upstream, &path)?;
        if let Some(first) = upstreams.iter().position(|o| o.name == up.name) {
            return Err(Invalid::at(
                format!("{path}.name"),
                Some(raw_upstream.name.span()),
                format!(
                    "duplicate upstream name {:?} (already used by upstream[{first}])",
                    up.name
                ),
            ));
        }
        upstreams.push(up);
    }
    Ok(upstreams)
}

/// Every `[[listener]]`: at least one, names unique, addresses that can all be bound next to
/// each other and the stats endpoint, and an upstream that exists and that the listener can speak to.
fn listeners(
    raw: &[listener::RawListener],
    upstreams: &[UpstreamConfig],
    stats: &StatsConfig,
) -> Result<Vec<ListenerConfig>, Invalid> {
    if raw.is_empty() {
        return Err(Invalid::at(
            "listener",
            None,
            "at least one [[listener]] is required",
        ));
    }
    let by_name: HashMap<&str, &UpstreamConfig> =
        upstreams.iter().map(|u| (u.name.as_str(), u)).collect();
    let mut listeners: Vec<ListenerConfig> = Vec::with_capacity(raw.len());
    for (i, raw_listener) in raw.iter().enumerate() {
        let path = format!("listener[{i}]");
        let l = ListenerConfig::from_raw(raw_listener, &path)?;
        if let Some(first) = listeners.iter().position(|o| o.name == l.name) {
            return Err(Invalid::at(
                format!("{path}.name"),
                Some(raw_listener.name.span()),
                format!(
                    "duplicate listener name {:?} (already used by listener[{first}])",
                    l.name
                ),
            ));
        }
        let clash = listeners
            .iter()
            .position(|o| listener::listen_conflict(o.listen, l.listen))
            .map(|first| format!("listener[{first}].listen ({})", listeners[first].listen))
            .or_else(|| {
                stats
                    .listen
                    .filter(|s| listener::listen_conflict(*s, l.listen))
                    .map(|s| format!("stats.listen ({s})"))
            });
        if let Some(other) = clash {
            return Err(Invalid::at(
                format!("{path}.listen"),
                Some(raw_listener.listen.span()),
                format!("listen address {} clashes with {other}", l.listen),
            ));
        }
        let upstream_at = Some(raw_listener.upstream.span());
        let Some(upstream) = by_name.get(l.upstream.as_str()) else {
            let mut known: Vec<&str> = by_name.keys().copied().collect();
            known.sort_unstable();
            return Err(Invalid::at(
                format!("{path}.upstream"),
                upstream_at,
                format!(
                    "no upstream named {:?} (defined: {})",
                    l.upstream,
                    known.join(", ")
                ),
            ));
        };
        if upstream.upstream_protocol == UpstreamProtocol::Ws && l.ws.is_none() {
            return Err(Invalid::at(
                format!("{path}.upstream"),
                upstream_at,
                format!(
                    "upstream {:?} speaks WebSocket (upstream_protocol = \"ws\"); only ws and wss listeners can use it",
                    l.upstream
                ),
            ));
        }
        listeners.push(l);
    }
    Ok(listeners)
}

#[cfg(test)]
mod tests;
