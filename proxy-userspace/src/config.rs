//! Configuration: TOML parsed by pure functions into plain, validated structs.
//!
//! Every key but `upstream.name`, `servers[].addr` and `listener.name`/`kind`/`listen`/`upstream`
//! has a default (NGINX's where NGINX has one), so a minimal file stays minimal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

mod locate;
mod raw;
pub mod units;
mod validate;

pub use validate::{
    DEFAULT_BUFFER_SIZE, DEFAULT_CONNECT_PACKET_TIMEOUT, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_FAIL_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECT_SIZE, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_RESOLVE_INTERVAL, DEFAULT_STATS_LISTEN,
};

/// The whole, validated configuration of one mqsplice process.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub stats: StatsConfig,
    pub dataplane: DataplaneConfig,
    pub log: LogConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub listeners: Vec<ListenerConfig>,
}

/// Where the JSON stats endpoint listens; `None` turns it off.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsConfig {
    /// Default `127.0.0.1:8888`.
    pub listen: Option<SocketAddr>,
}

/// Which data path moves the bytes of established flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataplaneMode {
    /// eBPF when the programs load, userspace otherwise (today: userspace, see README).
    Auto,
    /// The in-kernel splice, or fail at start.
    Ebpf,
    /// Always the userspace copy path.
    Userspace,
}

/// `[dataplane]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DataplaneConfig {
    /// Default `auto`.
    pub mode: DataplaneMode,
}

/// Where the access log goes.
#[derive(Debug, Clone, PartialEq)]
pub enum AccessLog {
    Off,
    Stderr,
    File(PathBuf),
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// Default `stderr`.
    pub access: AccessLog,
}

/// How an upstream picks a server for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceMethod {
    /// Smooth weighted round robin (NGINX's default).
    RoundRobin,
    /// Fewest active connections divided by weight.
    LeastConn,
    /// Consistent hash of the client's source address.
    IpHash,
    /// Consistent hash of the MQTT client identifier (source address when it is empty).
    ClientId,
}

/// PROXY protocol header written to the broker before the CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    Off,
    V1,
    V2,
}

/// One `servers[]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// `host:port` exactly as written; a host name is re-resolved every `resolve_interval`.
    pub addr: String,
    /// Default 1, must be ≥ 1.
    pub weight: u32,
    /// Failed connects within `fail_timeout` that make the server unavailable; 0 disables. Default 1.
    pub max_fails: u32,
    /// Window for `max_fails` and how long the server then stays unavailable. Default 10s.
    pub fail_timeout: Duration,
    /// Marked down: never chosen. Default false.
    pub down: bool,
    /// Chosen only when every primary server is unavailable. Default false.
    pub backup: bool,
}

/// One `[[upstream]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    /// Default `round_robin`.
    pub balance: BalanceMethod,
    /// Default `off`.
    pub proxy_protocol: ProxyProtocol,
    /// Budget for connecting, including retries on the next server. Default 60s (NGINX).
    pub connect_timeout: Duration,
    /// Default 30s.
    pub resolve_interval: Duration,
    /// At least one.
    pub servers: Vec<ServerConfig>,
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    Tcp,
}

/// One `[[listener]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub kind: ListenerKind,
    pub listen: SocketAddr,
    /// Name of an `[[upstream]]`; validated to exist.
    pub upstream: String,
    /// Default 5s.
    pub connect_packet_timeout: Duration,
    /// Default 64 KiB.
    pub max_connect_size: usize,
    /// Default 600s (NGINX's `proxy_timeout` default is 10m).
    pub idle_timeout: Duration,
    /// Default true.
    pub tcp_nodelay: bool,
    /// Per direction, userspace copy path. Default 16 KiB.
    pub buffer_size: usize,
    /// Default 100000.
    pub max_connections: usize,
}

/// A configuration that could not be read or is not valid; the message names the key path and line.
///
/// The parts are kept apart too, so callers (and tests) need not parse the message to point at
/// the mistake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    /// The whole, operator-facing text: `key.path (line N): reason`.
    pub message: String,
    key_path: Option<String>,
    line: Option<usize>,
    column: Option<usize>,
    reason: String,
}

impl ConfigError {
    fn new(
        key_path: Option<String>,
        line: Option<usize>,
        column: Option<usize>,
        reason: String,
    ) -> Self {
        let place = match (line, column) {
            (Some(l), Some(c)) => Some(format!("line {l}, column {c}")),
            (Some(l), None) => Some(format!("line {l}")),
            _ => None,
        };
        let message = match (&key_path, place) {
            (Some(path), Some(place)) => format!("{path} ({place}): {reason}"),
            (Some(path), None) => format!("{path}: {reason}"),
            (None, Some(place)) => format!("{place}: {reason}"),
            (None, None) => reason.clone(),
        };
        ConfigError {
            message,
            key_path,
            line,
            column,
            reason,
        }
    }

    /// A syntax or type error from the toml crate: its span gives line and column, and the
    /// spanned document tree (when the syntax is fine) gives the key path.
    fn from_toml(text: &str, error: &toml::de::Error) -> Self {
        let reason = error
            .message()
            .trim_end()
            .replace("expected i64", "expected an integer");
        let Some(span) = error.span() else {
            return ConfigError::new(None, None, None, reason);
        };
        let (line, column) = locate::line_column(text, span.start);
        let mut key_path = locate::key_path_at(text, span.start);
        // serde reports a missing key at the table that lacks it; name the key itself.
        if let Some(missing) = reason
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            key_path = Some(match key_path {
                Some(table) => format!("{table}.{missing}"),
                None => missing.to_owned(),
            });
        }
        ConfigError::new(key_path, Some(line), Some(column), reason)
    }

    fn from_invalid(text: &str, invalid: validate::Invalid) -> Self {
        let line = invalid
            .span
            .map(|span| locate::line_column(text, span.start).0);
        ConfigError::new(Some(invalid.path), line, None, invalid.reason)
    }

    /// 1-based line of the offending key or value, so an editor can jump there; `None` when the
    /// mistake is something missing from the whole file (or the file could not be read).
    pub fn line(&self) -> Option<usize> {
        self.line
    }

    /// 1-based column, known for syntax and type errors reported by the TOML parser.
    pub fn column(&self) -> Option<usize> {
        self.column
    }

    /// Dotted key path such as `upstream[0].servers[1].weight`, stable across edits that move lines.
    pub fn key_path(&self) -> Option<&str> {
        self.key_path.as_deref()
    }

    /// The reason alone, without the location prefix.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl Config {
    /// Parses and validates a TOML document; the first mistake found is returned.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::from_toml(text, &e))?;
        validate::validate(&raw).map_err(|e| ConfigError::from_invalid(text, e))
    }

    /// Reads, parses and validates a TOML file; errors name the file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(None, None, None, format!("{}: {e}", path.display()))
        })?;
        Config::from_toml_str(&text).map_err(|mut e| {
            e.message = format!("{}: {}", path.display(), e.message);
            e
        })
    }
}

