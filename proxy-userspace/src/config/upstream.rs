//! `[[upstream]]`: a named group of brokers, how one is picked, and how mqsplice speaks to them.

use std::net::Ipv6Addr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::tls::{RawUpstreamTls, UpstreamTlsConfig};
use super::value::{
    Invalid, NumOrStr, flag, non_empty_name, one_of, optional_key, positive_duration, required_key,
};
use super::ws::{self, UpstreamProtocol};

/// Default of `upstream.connect_timeout` (NGINX's `proxy_connect_timeout`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of `upstream.resolve_interval`.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default of `servers[].fail_timeout` (NGINX's).
pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `servers[].weight` (NGINX's).
pub const DEFAULT_WEIGHT: u32 = 1;
/// Default of `servers[].max_fails` (NGINX's).
pub const DEFAULT_MAX_FAILS: u32 = 1;

/// One `[[upstream]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) name: Spanned<String>,
    balance: Option<Spanned<String>>,
    proxy_protocol: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<NumOrStr>>,
    resolve_interval: Option<Spanned<NumOrStr>>,
    servers: Option<Spanned<Vec<RawServer>>>,
    upstream_protocol: Option<Spanned<String>>,
    upstream_host: Option<Spanned<String>>,
    upstream_tls: Option<Spanned<RawUpstreamTls>>,
}

/// One `servers[]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    addr: Spanned<String>,
    weight: Option<Spanned<i64>>,
    max_fails: Option<Spanned<i64>>,
    fail_timeout: Option<Spanned<NumOrStr>>,
    down: Option<Spanned<bool>>,
    backup: Option<Spanned<bool>>,
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

impl BalanceMethod {
    const ALL: [BalanceMethod; 4] = [
        BalanceMethod::RoundRobin,
        BalanceMethod::LeastConn,
        BalanceMethod::IpHash,
        BalanceMethod::ClientId,
    ];

    /// The configuration spelling, also used in stats.
    pub fn as_str(self) -> &'static str {
        match self {
            BalanceMethod::RoundRobin => "round_robin",
            BalanceMethod::LeastConn => "least_conn",
            BalanceMethod::IpHash => "ip_hash",
            BalanceMethod::ClientId => "client_id",
        }
    }
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
    /// Must be ≥ 1. Default [`DEFAULT_WEIGHT`].
    pub weight: u32,
    /// Failed connects within `fail_timeout` that make the server unavailable; 0 disables.
    /// Default [`DEFAULT_MAX_FAILS`].
    pub max_fails: u32,
    /// Window for `max_fails` and how long the server then stays unavailable.
    /// Default [`DEFAULT_FAIL_TIMEOUT`].
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
    /// Budget for connecting, including retries on the next server.
    /// Default [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// Default [`DEFAULT_RESOLVE_INTERVAL`].
    pub resolve_interval: Duration,
    /// At least one.
    pub servers: Vec<ServerConfig>,
    /// `upstream_tls`: TLS from mqsplice to the brokers; `None` is plain TCP.
    pub tls: Option<UpstreamTlsConfig>,
    /// What the brokers are spoken to in. Default `tcp`.
    pub upstream_protocol: UpstreamProtocol,
    /// `Host` sent to WebSocket brokers instead of the client's. Default none.
    pub upstream_host: Option<String>,
}

impl UpstreamConfig {
    /// Validates `upstream[i]` found at `path`.
    pub(super) fn from_raw(raw: &RawUpstream, path: &str) -> Result<UpstreamConfig, Invalid> {
        let name = required_key!(raw, path, name, non_empty_name("upstream"))?;
        let balance = optional_key!(raw, path, balance, BalanceMethod::RoundRobin, |s| {
            parse_balance(s)
        })?;
        let proxy_protocol = optional_key!(raw, path, proxy_protocol, ProxyProtocol::Off, |s| {
            parse_proxy_protocol(s)
        })?;
        let connect_timeout = optional_key!(
            raw,
            path,
            connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
            positive_duration
        )?;
        let resolve_interval = optional_key!(
            raw,
            path,
            resolve_interval,
            DEFAULT_RESOLVE_INTERVAL,
            positive_duration
        )?;
        let servers = servers(raw, path, &name)?;
        let tls = raw
            .upstream_tls
            .as_ref()
            .map(|t| UpstreamTlsConfig::from_raw(t.get_ref(), &format!("{path}.upstream_tls")))
            .transpose()?;
        let (upstream_protocol, upstream_host) =
            ws::upstream(&raw.upstream_protocol, &raw.upstream_host, path)?;
        if upstream_protocol == UpstreamProtocol::Ws
            && proxy_protocol != ProxyProtocol::Off
            && let Some(p) = &raw.proxy_protocol
        {
            return Err(Invalid::at(
                format!("{path}.proxy_protocol"),
                Some(p.span()),
                "proxy_protocol cannot be used with upstream_protocol = \"ws\" (X-Forwarded-For and X-Real-IP carry the client's address)",
            ));
        }
        Ok(UpstreamConfig {
            name,
            balance,
            proxy_protocol,
            connect_timeout,
            resolve_interval,
            servers,
            tls,
            upstream_protocol,
            upstream_host,
        })
    }
}

/// The `servers` list: at least one, and not all of them backups.
fn servers(raw: &RawUpstream, path: &str, name: &str) -> Result<Vec<ServerConfig>, Invalid> {
    let servers_path = format!("{path}.servers");
    let servers_span = raw
        .servers
        .as_ref()
        .map_or_else(|| raw.name.span(), Spanned::span);
    let raw_servers = raw.servers.as_ref().map_or(&[][..], |s| &s.get_ref()[..]);
    if raw_servers.is_empty() {
        return Err(Invalid::at(
            servers_path,
            Some(servers_span),
            format!("upstream {name:?} needs at least one server"),
        ));
    }
    let servers = raw_servers
        .iter()
        .enumerate()
        .map(|(j, s)| ServerConfig::from_raw(s, &format!("{servers_path}[{j}]")))
        .collect::<Result<Vec<_>, _>>()?;
    if servers.iter().all(|s| s.backup) {
        return Err(Invalid::at(
            servers_path,
            Some(servers_span),
            format!("every server of upstream {name:?} is a backup; at least one must be primary"),
        ));
    }
    Ok(servers)
}

impl ServerConfig {
    fn from_raw(raw: &RawServer, path: &str) -> Result<ServerConfig, Invalid> {
        let addr = required_key!(raw, path, addr, |a| check_server_addr(a)
            .map(|()| a.clone()))?;
        let weight = optional_key!(raw, path, weight, DEFAULT_WEIGHT, weight_value)?;
        let max_fails = optional_key!(raw, path, max_fails, DEFAULT_MAX_FAILS, max_fails_value)?;
        let fail_timeout = optional_key!(
            raw,
            path,
            fail_timeout,
            DEFAULT_FAIL_TIMEOUT,
            positive_duration
        )?;
        let down = flag(&raw.down, false);
        let backup = flag(&raw.backup, false);
        if down && backup {
            return Err(Invalid::at(
                format!("{path}.backup"),
                raw.backup.as_ref().map(Spanned::span),
                "a server cannot be both backup and down",
            ));
        }
        Ok(ServerConfig {
            addr,
            weight,
            max_fails,
            fail_timeout,
            down,
            backup,
        })
    }
}

/// `upstream.balance`.
pub fn parse_balance(value: &str) -> Result<BalanceMethod, String> {
    let choices = BalanceMethod::ALL.map(|m| (m.as_str(), m));
    one_of("balance method", value, &choices)
}

/// `upstream.proxy_protocol`.
pub fn parse_proxy_protocol(value: &str) -> Result<ProxyProtocol, String> {
    one_of(
        "proxy_protocol",
        value,
        &[
            ("off", ProxyProtocol::Off),
            ("v1", ProxyProtocol::V1),
            ("v2", ProxyProtocol::V2),
        ],
    )
}

/// A server address: `host:port` or `[ipv6]:port`. Host names stay unresolved (resolved later),
/// so only their shape is checked here.
pub fn check_server_addr(value: &str) -> Result<(), String> {
    let hint = "write host:port, e.g. \"emqx1.example:1883\" or \"[::1]:1883\"";
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(format!("server address {value:?} has no port; {hint}"));
    };
    match port.parse::<u16>() {
        Ok(0) | Err(_) => {
            return Err(format!(
                "server address {value:?} has an invalid port {port:?} (1-65535)"
            ));
        }
        Ok(_) => {}
    }
    if let Some(inner) = host.strip_prefix('[') {
        let Some(ip) = inner.strip_suffix(']') else {
            return Err(format!(
                "server address {value:?}: malformed brackets; {hint}"
            ));
        };
        return ip
            .parse::<Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| format!("server address {value:?}: {ip:?} is not an IPv6 address"));
    }
    if host.contains(':') {
        return Err(format!(
            "server address {value:?}: IPv6 addresses need brackets, e.g. \"[::1]:1883\""
        ));
    }
    if host.is_empty() {
        return Err(format!("server address {value:?} has no host; {hint}"));
    }
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    if host.len() > 253 || !name.split('.').all(valid_label) {
        return Err(format!(
            "server address {value:?}: {host:?} is not a valid host name or IP address"
        ));
    }
    Ok(())
}

/// `servers[].weight`.
pub fn weight_value(value: &i64) -> Result<u32, String> {
    match u32::try_from(*value) {
        Ok(w) if w >= 1 => Ok(w),
        _ if *value < 1 => Err("weight must be at least 1".into()),
        _ => Err(format!("weight must be at most {}", u32::MAX)),
    }
}

/// `servers[].max_fails`; 0 turns failure accounting off, as in NGINX.
pub fn max_fails_value(value: &i64) -> Result<u32, String> {
    u32::try_from(*value).map_err(|_| format!("max_fails must be between 0 and {}", u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses() {
        for ok in [
            "emqx1.example:1883",
            "127.0.0.1:18832",
            "[::1]:1883",
            "[2001:db8::5]:8883",
            "emqx_1:1",
            "emqx.example.:65535",
        ] {
            assert_eq!(check_server_addr(ok), Ok(()), "{ok}");
        }
        for (bad, needle) in [
            ("emqx1", "no port"),
            ("emqx1:", "invalid port"),
            ("emqx1:0", "invalid port"),
            ("emqx1:65536", "invalid port"),
            ("emqx1:http", "invalid port"),
            (":1883", "no host"),
            ("::1:1883", "need brackets"),
            ("[::1:1883", "brackets"),
            ("[::1]x:1883", "brackets"),
            ("[zz]:1883", "not an IPv6 address"),
            ("bad host:1883", "not a valid host name"),
            ("a..b:1883", "not a valid host name"),
            ("-a:1883", "not a valid host name"),
        ] {
            let e = check_server_addr(bad).expect_err(bad);
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn weights_and_fails() {
        assert_eq!(weight_value(&1), Ok(1));
        assert_eq!(weight_value(&0).unwrap_err(), "weight must be at least 1");
        assert!(weight_value(&-3).is_err());
        assert!(weight_value(&(1 << 40)).unwrap_err().contains("at most"));
        assert_eq!(max_fails_value(&0), Ok(0));
        assert!(max_fails_value(&-1).is_err());
    }

    #[test]
    fn enums() {
        assert_eq!(parse_balance("least_conn"), Ok(BalanceMethod::LeastConn));
        assert_eq!(parse_balance("ip_hash"), Ok(BalanceMethod::IpHash));
        let e = parse_balance("hash").unwrap_err();
        assert!(
            e.contains("round_robin, least_conn, ip_hash, client_id"),
            "{e}"
        );
        assert_eq!(parse_proxy_protocol("v2"), Ok(ProxyProtocol::V2));
        assert!(
            parse_proxy_protocol("on")
                .unwrap_err()
                .contains("off, v1, v2")
        );
    }
}
