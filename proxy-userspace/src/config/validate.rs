//! From the raw file to the plain structs: each rule is a small pure function, and the walk over
//! the document only attaches the key path and span to whatever reason a rule gives.

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::raw::{NumOrStr, RawConfig, RawListener, RawServer, RawUpstream};
use super::tls::{parse_cert_field, tls_table, upstream_tls_table};
use super::units::{parse_duration, parse_size};
use super::{
    AccessLog, BalanceMethod, CertField, Config, DataplaneConfig, DataplaneMode, InflightLimit,
    ListenerConfig, ListenerKind, LogConfig, ProxyProtocol, ServerConfig, StatsConfig, TlsConfig,
    UpstreamConfig, UpstreamProtocol, VerifyClient,
};

/// Default of `stats.listen`.
pub const DEFAULT_STATS_LISTEN: &str = "127.0.0.1:8888";
/// Default of `dataplane.close_drain_timeout`.
pub const DEFAULT_CLOSE_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of `dataplane.max_inflight_total`.
pub const DEFAULT_MAX_INFLIGHT_TOTAL: usize = 256 << 20;
/// Default of `dataplane.max_daemon_held_per_flow`: what NGINX buffers per connection, in scale.
pub const DEFAULT_MAX_DAEMON_HELD_PER_FLOW: usize = 256 << 10;
/// Default of `dataplane.max_daemon_held_total`.
pub const DEFAULT_MAX_DAEMON_HELD_TOTAL: usize = 64 << 20;
/// Bounds of the daemon's held bytes: below 128 KiB a throttled socket's receive buffer, clamped
/// to fit, would be too small to keep a flow moving.
const MIN_HELD: u64 = 128 << 10;
const MAX_HELD: u64 = 64 << 30;
/// Bounds of the in-flight limits: below 64 KiB a flow would throttle on ordinary bursts.
const MIN_INFLIGHT: u64 = 64 << 10;
const MAX_INFLIGHT: u64 = 64 << 30;
/// Where the eBPF maps are pinned unless `dataplane.bpffs_pin` says otherwise.
pub const DEFAULT_BPFFS_PIN: &str = "/sys/fs/bpf/mqsplice";
/// Default of `upstream.connect_timeout` (NGINX's `proxy_connect_timeout`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of `upstream.resolve_interval`.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default of `servers[].fail_timeout` (NGINX's).
pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);
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

/// Smallest accepted `buffer_size`.
pub const MIN_BUFFER_SIZE: u64 = 1024;
/// Largest accepted `buffer_size`.
pub const MAX_BUFFER_SIZE: u64 = 16 * 1024 * 1024;
/// Smallest accepted `max_connect_size`: room for a CONNECT with a short client id.
pub const MIN_CONNECT_SIZE: u64 = 64;
/// Largest accepted `max_connect_size`: MQTT's largest packet.
pub const MAX_CONNECT_SIZE: u64 = 256 * 1024 * 1024;

/// Longest accepted duration: far beyond any sensible timeout, and short enough that adding it
/// to `Instant::now()` can never overflow (which would panic in the proxy, not here).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A rule broken at a key: where (path, byte span in the file) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Dotted key path, e.g. `upstream[0].servers[1].weight`.
    pub path: String,
    /// Byte range of the offending value in the file; `None` when something is missing entirely.
    pub span: Option<Range<usize>>,
    /// Why, without the location.
    pub reason: String,
}

impl Invalid {
    pub(super) fn at(
        path: impl Into<String>,
        span: Option<Range<usize>>,
        reason: impl Into<String>,
    ) -> Self {
        Invalid {
            path: path.into(),
            span,
            reason: reason.into(),
        }
    }
}

/// Applies `rule` to an optional spanned value, or returns `default` when the key is absent.
pub(super) fn field<T, U>(
    value: &Option<Spanned<T>>,
    path: &str,
    default: U,
    rule: impl FnOnce(&T) -> Result<U, String>,
) -> Result<U, Invalid> {
    match value {
        None => Ok(default),
        Some(v) => rule(v.get_ref()).map_err(|r| Invalid::at(path, Some(v.span()), r)),
    }
}

/// Applies `rule` to a required spanned value.
pub(super) fn required<T, U>(
    value: &Spanned<T>,
    path: &str,
    rule: impl FnOnce(&T) -> Result<U, String>,
) -> Result<U, Invalid> {
    rule(value.get_ref()).map_err(|r| Invalid::at(path, Some(value.span()), r))
}

fn one_of<T: Copy>(what: &str, value: &str, choices: &[(&str, T)]) -> Result<T, String> {
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            format!(
                "unknown {what} {value:?}, expected one of: {}",
                names.join(", ")
            )
        })
}

/// `dataplane.bpffs_pin`: an absolute directory (it is created, locked and cleaned at start).
pub fn parse_bpffs_pin(value: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(value);
    if !path.is_absolute() {
        return Err(format!(
            "bpffs_pin must be an absolute path on a bpf filesystem, got {value:?}"
        ));
    }
    Ok(path)
}

/// `dataplane.mode`. `ebpf` is the name `sockmap` had before a second eBPF data path was
/// planned; configurations written with it keep working.
pub fn parse_dataplane_mode(value: &str) -> Result<DataplaneMode, String> {
    if value == "ebpf" {
        return Ok(DataplaneMode::Sockmap);
    }
    one_of(
        "dataplane mode",
        value,
        &[
            ("auto", DataplaneMode::Auto),
            ("sockmap", DataplaneMode::Sockmap),
            ("userspace", DataplaneMode::Userspace),
        ],
    )
}

/// `upstream.balance`.
pub fn parse_balance(value: &str) -> Result<BalanceMethod, String> {
    one_of(
        "balance method",
        value,
        &[
            ("round_robin", BalanceMethod::RoundRobin),
            ("least_conn", BalanceMethod::LeastConn),
            ("ip_hash", BalanceMethod::IpHash),
            ("client_id", BalanceMethod::ClientId),
        ],
    )
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

/// `log.access`: `off`, `stderr`, or any other string as a file path.
pub fn parse_access_log(value: &str) -> Result<AccessLog, String> {
    match value {
        "off" => Ok(AccessLog::Off),
        "stderr" => Ok(AccessLog::Stderr),
        "" => Err("empty access log; use \"off\", \"stderr\" or a file path".into()),
        path => Ok(AccessLog::File(PathBuf::from(path))),
    }
}

/// A listening address: an IP literal and a port, since a listener binds before any resolver runs.
pub fn parse_listen_addr(value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| {
        format!(
            "{value:?} is not a socket address; write IP:port such as \"0.0.0.0:1883\" or \"[::]:1883\""
        )
    })
}

/// `stats.listen`: an address, or `off`.
pub fn parse_stats_listen(value: &str) -> Result<Option<SocketAddr>, String> {
    if value == "off" {
        Ok(None)
    } else {
        parse_listen_addr(value).map(Some)
    }
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

/// A duration key, written `"10s"`-style or as an integer number of seconds.
pub fn duration_value(value: &NumOrStr) -> Result<Duration, String> {
    match value {
        NumOrStr::Int(n) if *n < 0 => Err(format!("negative duration {n}")),
        NumOrStr::Int(n) => Ok(Duration::from_secs(n.unsigned_abs())),
        NumOrStr::Str(s) => parse_duration(s),
    }
}

/// A duration for which zero would mean "never wait" or "spin", which is never what was meant;
/// also capped at [`MAX_DURATION`].
pub fn positive_duration(value: &NumOrStr) -> Result<Duration, String> {
    let d = duration_value(value)?;
    if d.is_zero() {
        Err("must be greater than 0".into())
    } else if d > MAX_DURATION {
        Err("must be at most 365d".into())
    } else {
        Ok(d)
    }
}

/// `"auto"` or a size between the in-flight bounds.
fn parse_inflight_limit(value: &NumOrStr) -> Result<InflightLimit, String> {
    match value {
        NumOrStr::Str(s) if s.eq_ignore_ascii_case("auto") => Ok(InflightLimit::Auto),
        v => size_in_range(v, MIN_INFLIGHT, MAX_INFLIGHT)
            .map(InflightLimit::Bytes)
            .map_err(|e| format!("\"auto\" or a size: {e}")),
    }
}

/// What `"auto"` means on this host: the most the kernel buffers for one flow through a userspace
/// proxy without the proxy holding a byte — a full receive queue on the socket it reads
/// (`net.ipv4.tcp_rmem`'s third field) plus a full send queue on the socket it writes
/// (`net.ipv4.tcp_wmem`'s third field) — within the in-flight bounds. The texts of the two files;
/// an unreadable one counts as Linux's default maximum (6 MiB and 4 MiB).
pub fn auto_inflight_per_flow(tcp_rmem: Option<&str>, tcp_wmem: Option<&str>) -> u64 {
    let max = |text: Option<&str>, default: u64| {
        text.and_then(|t| t.split_whitespace().nth(2)?.parse::<u64>().ok())
            .unwrap_or(default)
    };
    (max(tcp_rmem, 6 << 20) + max(tcp_wmem, 4 << 20)).clamp(MIN_INFLIGHT, MAX_INFLIGHT)
}

/// A size key, written `"16KiB"`-style or as an integer number of bytes, within `[min, max]`.
pub fn size_in_range(value: &NumOrStr, min: u64, max: u64) -> Result<usize, String> {
    let bytes = match value {
        NumOrStr::Int(n) if *n < 0 => return Err(format!("negative size {n}")),
        NumOrStr::Int(n) => n.unsigned_abs(),
        NumOrStr::Str(s) => parse_size(s)?,
    };
    if bytes < min || bytes > max {
        return Err(format!(
            "must be between {} and {} (got {bytes} bytes)",
            human_size(min),
            human_size(max)
        ));
    }
    usize::try_from(bytes).map_err(|_| format!("{bytes} bytes does not fit in memory"))
}

fn human_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => format!("{b} bytes"),
    }
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

fn server(raw: &RawServer, path: &str) -> Result<ServerConfig, Invalid> {
    let addr = required(&raw.addr, &format!("{path}.addr"), |a| {
        check_server_addr(a).map(|()| a.clone())
    })?;
    let weight = field(&raw.weight, &format!("{path}.weight"), 1, weight_value)?;
    let max_fails = field(
        &raw.max_fails,
        &format!("{path}.max_fails"),
        1,
        max_fails_value,
    )?;
    let fail_timeout = field(
        &raw.fail_timeout,
        &format!("{path}.fail_timeout"),
        DEFAULT_FAIL_TIMEOUT,
        positive_duration,
    )?;
    let down = raw.down.as_ref().is_some_and(|d| *d.get_ref());
    let backup = raw.backup.as_ref().is_some_and(|b| *b.get_ref());
    if down && backup {
        let span = raw.backup.as_ref().map(Spanned::span);
        return Err(Invalid::at(
            format!("{path}.backup"),
            span,
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

fn upstream(raw: &RawUpstream, path: &str) -> Result<UpstreamConfig, Invalid> {
    let name = required(&raw.name, &format!("{path}.name"), |n| {
        if n.is_empty() {
            Err("upstream name must not be empty".to_string())
        } else {
            Ok(n.clone())
        }
    })?;
    let balance = field(
        &raw.balance,
        &format!("{path}.balance"),
        BalanceMethod::RoundRobin,
        |s| parse_balance(s),
    )?;
    let proxy_protocol = field(
        &raw.proxy_protocol,
        &format!("{path}.proxy_protocol"),
        ProxyProtocol::Off,
        |s| parse_proxy_protocol(s),
    )?;
    let connect_timeout = field(
        &raw.connect_timeout,
        &format!("{path}.connect_timeout"),
        DEFAULT_CONNECT_TIMEOUT,
        positive_duration,
    )?;
    let resolve_interval = field(
        &raw.resolve_interval,
        &format!("{path}.resolve_interval"),
        DEFAULT_RESOLVE_INTERVAL,
        positive_duration,
    )?;
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
        .map(|(j, s)| server(s, &format!("{servers_path}[{j}]")))
        .collect::<Result<Vec<_>, _>>()?;
    if servers.iter().all(|s| s.backup) {
        return Err(Invalid::at(
            servers_path,
            Some(servers_span),
            format!("every server of upstream {name:?} is a backup; at least one must be primary"),
        ));
    }
    let tls = raw
        .upstream_tls
        .as_ref()
        .map(|t| upstream_tls_table(t.get_ref(), &format!("{path}.upstream_tls")))
        .transpose()?;
    let (upstream_protocol, upstream_host) = super::ws::upstream(raw, path)?;
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

fn listener(raw: &RawListener, path: &str) -> Result<ListenerConfig, Invalid> {
    let name = required(&raw.name, &format!("{path}.name"), |n| {
        if n.is_empty() {
            Err("listener name must not be empty".to_string())
        } else {
            Ok(n.clone())
        }
    })?;
    let kind = required(&raw.kind, &format!("{path}.kind"), |k| {
        parse_listener_kind(k)
    })?;
    let listen = required(&raw.listen, &format!("{path}.listen"), |l| {
        parse_listen_addr(l)
    })?;
    let upstream = raw.upstream.get_ref().clone();
    let connect_packet_timeout = field(
        &raw.connect_packet_timeout,
        &format!("{path}.connect_packet_timeout"),
        DEFAULT_CONNECT_PACKET_TIMEOUT,
        positive_duration,
    )?;
    let max_connect_size = field(
        &raw.max_connect_size,
        &format!("{path}.max_connect_size"),
        DEFAULT_MAX_CONNECT_SIZE,
        |v| size_in_range(v, MIN_CONNECT_SIZE, MAX_CONNECT_SIZE),
    )?;
    let idle_timeout = field(
        &raw.idle_timeout,
        &format!("{path}.idle_timeout"),
        DEFAULT_IDLE_TIMEOUT,
        positive_duration,
    )?;
    let tcp_nodelay = raw.tcp_nodelay.as_ref().is_none_or(|b| *b.get_ref());
    let buffer_size = field(
        &raw.buffer_size,
        &format!("{path}.buffer_size"),
        DEFAULT_BUFFER_SIZE,
        |v| size_in_range(v, MIN_BUFFER_SIZE, MAX_BUFFER_SIZE),
    )?;
    let max_connections = field(
        &raw.max_connections,
        &format!("{path}.max_connections"),
        DEFAULT_MAX_CONNECTIONS,
        max_connections_value,
    )?;
    let (tls, rewrite_client_id, rewrite_username) = listener_tls(raw, path, kind)?;
    let ws = super::ws::listener(
        raw,
        path,
        matches!(kind, ListenerKind::Ws | ListenerKind::Wss),
    )?;
    Ok(ListenerConfig {
        name,
        kind,
        listen,
        upstream,
        connect_packet_timeout,
        max_connect_size,
        idle_timeout,
        tcp_nodelay,
        buffer_size,
        max_connections,
        tls,
        rewrite_client_id,
        rewrite_username,
        ws,
    })
}

/// A listener's `tls` table, `rewrite_client_id` and `rewrite_username`.
type ListenerTls = (Option<TlsConfig>, Option<CertField>, Option<CertField>);

/// A listener's `tls` table and rewrite keys, which only a TLS listener with client
/// certificates can have.
fn listener_tls(raw: &RawListener, path: &str, kind: ListenerKind) -> Result<ListenerTls, Invalid> {
    let tls = match (&raw.tls, kind) {
        (Some(table), ListenerKind::Tls | ListenerKind::Wss) => {
            Some(tls_table(table.get_ref(), &format!("{path}.tls"))?)
        }
        (None, ListenerKind::Tls | ListenerKind::Wss) => {
            return Err(Invalid::at(
                format!("{path}.tls"),
                Some(raw.kind.span()),
                format!(
                    "a {} listener needs a tls = {{ cert = \"...\", key = \"...\" }} table",
                    kind.as_str()
                ),
            ));
        }
        (Some(table), _) => {
            return Err(Invalid::at(
                format!("{path}.tls"),
                Some(table.span()),
                format!("a {:?} listener takes no tls table", kind.as_str()),
            ));
        }
        (None, _) => None,
    };
    let rewrite = |value: &Option<Spanned<String>>, key: &str| {
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
    };
    let client_id = rewrite(&raw.rewrite_client_id, "rewrite_client_id")?;
    let username = rewrite(&raw.rewrite_username, "rewrite_username")?;
    Ok((tls, client_id, username))
}

/// Validates a whole raw document, first error wins (in file order within each section).
pub fn validate(raw: &RawConfig) -> Result<Config, Invalid> {
    let stats_listen = raw.stats.as_ref().and_then(|s| s.listen.as_ref());
    let stats = StatsConfig {
        listen: field(
            &stats_listen.cloned(),
            "stats.listen",
            Some(DEFAULT_STATS_LISTEN.parse().expect("valid default")),
            |s| parse_stats_listen(s),
        )?,
    };
    let dataplane = DataplaneConfig {
        mode: field(
            &raw.dataplane.as_ref().and_then(|d| d.mode.clone()),
            "dataplane.mode",
            DataplaneMode::Auto,
            |s| parse_dataplane_mode(s),
        )?,
        bpffs_pin: field(
            &raw.dataplane.as_ref().and_then(|d| d.bpffs_pin.clone()),
            "dataplane.bpffs_pin",
            PathBuf::from(DEFAULT_BPFFS_PIN),
            |s| parse_bpffs_pin(s),
        )?,
        close_drain_timeout: field(
            &raw.dataplane
                .as_ref()
                .and_then(|d| d.close_drain_timeout.clone()),
            "dataplane.close_drain_timeout",
            DEFAULT_CLOSE_DRAIN_TIMEOUT,
            positive_duration,
        )?,
        max_inflight_per_flow: field(
            &raw.dataplane
                .as_ref()
                .and_then(|d| d.max_inflight_per_flow.clone()),
            "dataplane.max_inflight_per_flow",
            InflightLimit::Auto,
            parse_inflight_limit,
        )?,
        max_inflight_total: field(
            &raw.dataplane
                .as_ref()
                .and_then(|d| d.max_inflight_total.clone()),
            "dataplane.max_inflight_total",
            DEFAULT_MAX_INFLIGHT_TOTAL,
            |v| size_in_range(v, MIN_INFLIGHT, MAX_INFLIGHT),
        )?,
        max_daemon_held_per_flow: field(
            &raw.dataplane
                .as_ref()
                .and_then(|d| d.max_daemon_held_per_flow.clone()),
            "dataplane.max_daemon_held_per_flow",
            DEFAULT_MAX_DAEMON_HELD_PER_FLOW,
            |v| size_in_range(v, MIN_HELD, MAX_HELD),
        )?,
        max_daemon_held_total: field(
            &raw.dataplane
                .as_ref()
                .and_then(|d| d.max_daemon_held_total.clone()),
            "dataplane.max_daemon_held_total",
            DEFAULT_MAX_DAEMON_HELD_TOTAL,
            |v| size_in_range(v, MIN_HELD, MAX_HELD),
        )?,
    };
    if dataplane.max_daemon_held_per_flow > dataplane.max_daemon_held_total {
        let span = raw
            .dataplane
            .as_ref()
            .and_then(|d| d.max_daemon_held_per_flow.as_ref())
            .map(|v| v.span());
        return Err(Invalid::at(
            "dataplane.max_daemon_held_per_flow",
            span,
            "must not be more than dataplane.max_daemon_held_total",
        ));
    }
    let log = LogConfig {
        access: field(
            &raw.log.as_ref().and_then(|l| l.access.clone()),
            "log.access",
            AccessLog::Stderr,
            |s| parse_access_log(s),
        )?,
    };

    if raw.upstream.is_empty() {
        return Err(Invalid::at(
            "upstream",
            None,
            "at least one [[upstream]] is required",
        ));
    }
    let mut upstreams = Vec::with_capacity(raw.upstream.len());
    let mut upstream_index: HashMap<String, usize> = HashMap::new();
    for (i, raw_upstream) in raw.upstream.iter().enumerate() {
        let path = format!("upstream[{i}]");
        let up = upstream(raw_upstream, &path)?;
        if let Some(first) = upstream_index.insert(up.name.clone(), i) {
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

    if raw.listener.is_empty() {
        return Err(Invalid::at(
            "listener",
            None,
            "at least one [[listener]] is required",
        ));
    }
    let mut listeners: Vec<ListenerConfig> = Vec::with_capacity(raw.listener.len());
    for (i, raw_listener) in raw.listener.iter().enumerate() {
        let path = format!("listener[{i}]");
        let l = listener(raw_listener, &path)?;
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
            .position(|o| listen_conflict(o.listen, l.listen))
            .map(|first| format!("listener[{first}].listen ({})", listeners[first].listen))
            .or_else(|| {
                stats
                    .listen
                    .filter(|s| listen_conflict(*s, l.listen))
                    .map(|s| format!("stats.listen ({s})"))
            });
        if let Some(other) = clash {
            return Err(Invalid::at(
                format!("{path}.listen"),
                Some(raw_listener.listen.span()),
                format!("listen address {} clashes with {other}", l.listen),
            ));
        }
        if !upstream_index.contains_key(&l.upstream) {
            let mut known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
            known.sort_unstable();
            return Err(Invalid::at(
                format!("{path}.upstream"),
                Some(raw_listener.upstream.span()),
                format!(
                    "no upstream named {:?} (defined: {})",
                    l.upstream,
                    known.join(", ")
                ),
            ));
        }
        let upstream_index = upstream_index[&l.upstream];
        if upstreams[upstream_index].upstream_protocol == UpstreamProtocol::Ws && l.ws.is_none() {
            return Err(Invalid::at(
                format!("{path}.upstream"),
                Some(raw_listener.upstream.span()),
                format!(
                    "upstream {:?} speaks WebSocket (upstream_protocol = \"ws\"); only ws and wss listeners can use it",
                    l.upstream
                ),
            ));
        }
        listeners.push(l);
    }

    Ok(Config {
        stats,
        dataplane,
        log,
        upstreams,
        listeners,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> NumOrStr {
        NumOrStr::Str(v.into())
    }

    #[test]
    fn inflight_limit_is_auto_or_a_size() {
        assert_eq!(parse_inflight_limit(&s("auto")), Ok(InflightLimit::Auto));
        assert_eq!(
            parse_inflight_limit(&s("2MiB")),
            Ok(InflightLimit::Bytes(2 << 20))
        );
        let e = parse_inflight_limit(&s("1KiB")).unwrap_err();
        assert!(e.contains("\"auto\" or a size"), "{e}");
        assert!(parse_inflight_limit(&s("lots")).is_err());
    }

    #[test]
    fn auto_inflight_is_a_full_receive_plus_a_full_send_queue_within_bounds() {
        let (rmem, wmem) = ("4096\t131072\t33554432\n", "4096\t16384\t4194304\n");
        assert_eq!(auto_inflight_per_flow(Some(rmem), Some(wmem)), 36 << 20);
        // Out of bounds either way, or unreadable (Linux's defaults: 6 MiB and 4 MiB).
        let tiny = Some("1 2 4096");
        assert_eq!(auto_inflight_per_flow(tiny, tiny), MIN_INFLIGHT);
        let huge = Some("1 2 999999999999");
        assert_eq!(auto_inflight_per_flow(huge, Some(wmem)), MAX_INFLIGHT);
        assert_eq!(auto_inflight_per_flow(Some("garbage"), None), 10 << 20);
        assert_eq!(auto_inflight_per_flow(None, Some(wmem)), 10 << 20);
    }

    #[test]
    fn enums() {
        assert_eq!(parse_dataplane_mode("sockmap"), Ok(DataplaneMode::Sockmap));
        assert_eq!(parse_dataplane_mode("ebpf"), Ok(DataplaneMode::Sockmap));
        assert_eq!(
            parse_dataplane_mode("userspace"),
            Ok(DataplaneMode::Userspace)
        );
        let e = parse_dataplane_mode("kernel").unwrap_err();
        assert!(e.contains("auto, sockmap, userspace"), "{e}");
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
    fn access_log() {
        assert_eq!(parse_access_log("off"), Ok(AccessLog::Off));
        assert_eq!(parse_access_log("stderr"), Ok(AccessLog::Stderr));
        assert_eq!(
            parse_access_log("/var/log/mqsplice.log"),
            Ok(AccessLog::File("/var/log/mqsplice.log".into()))
        );
        assert_eq!(
            parse_access_log("stdout"),
            Ok(AccessLog::File("stdout".into()))
        );
        assert!(parse_access_log("").is_err());
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen_addr("0.0.0.0:1883"),
            Ok("0.0.0.0:1883".parse().unwrap())
        );
        assert_eq!(
            parse_listen_addr("[::1]:1883"),
            Ok("[::1]:1883".parse().unwrap())
        );
        assert!(parse_listen_addr("localhost:1883").is_err());
        assert!(parse_listen_addr("0.0.0.0").is_err());
        assert!(parse_listen_addr("0.0.0.0:70000").is_err());
        assert_eq!(parse_stats_listen("off"), Ok(None));
        assert_eq!(
            parse_stats_listen("127.0.0.1:9"),
            Ok(Some("127.0.0.1:9".parse().unwrap()))
        );
        assert!(parse_stats_listen("on").is_err());
    }

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
    fn durations_and_sizes() {
        assert_eq!(
            duration_value(&NumOrStr::Int(30)),
            Ok(Duration::from_secs(30))
        );
        assert_eq!(duration_value(&s("1m30s")), Ok(Duration::from_secs(90)));
        assert!(
            duration_value(&NumOrStr::Int(-1))
                .unwrap_err()
                .contains("negative")
        );
        assert_eq!(
            positive_duration(&s("500ms")),
            Ok(Duration::from_millis(500))
        );
        assert!(
            positive_duration(&NumOrStr::Int(0))
                .unwrap_err()
                .contains("greater than 0")
        );
        assert!(positive_duration(&s("0s")).is_err());
        assert!(positive_duration(&s("0")).is_err());
        assert_eq!(positive_duration(&s("365d")), Ok(MAX_DURATION));
        assert!(
            positive_duration(&s("365d1ms"))
                .unwrap_err()
                .contains("at most 365d")
        );
        assert!(
            positive_duration(&NumOrStr::Int(i64::MAX))
                .unwrap_err()
                .contains("at most")
        );

        assert_eq!(size_in_range(&s("16KiB"), 1024, 1 << 24), Ok(16 * 1024));
        assert_eq!(size_in_range(&NumOrStr::Int(1024), 1024, 1 << 24), Ok(1024));
        assert_eq!(size_in_range(&s("16m"), 1024, 1 << 24), Ok(1 << 24));
        let e = size_in_range(&s("1023"), 1024, 1 << 24).unwrap_err();
        assert!(e.contains("between 1KiB and 16MiB"), "{e}");
        assert!(size_in_range(&s("17M"), 1024, 1 << 24).is_err());
        assert!(
            size_in_range(&NumOrStr::Int(-5), 0, 10)
                .unwrap_err()
                .contains("negative")
        );
        let e = size_in_range(&NumOrStr::Int(63), MIN_CONNECT_SIZE, MAX_CONNECT_SIZE).unwrap_err();
        assert!(e.contains("between 64 bytes and 256MiB"), "{e}");
        assert_eq!(
            size_in_range(&s("256MiB"), MIN_CONNECT_SIZE, MAX_CONNECT_SIZE),
            Ok(256 << 20)
        );
    }

    #[test]
    fn integers() {
        assert_eq!(weight_value(&1), Ok(1));
        assert_eq!(weight_value(&0).unwrap_err(), "weight must be at least 1");
        assert!(weight_value(&-3).is_err());
        assert!(weight_value(&(1 << 40)).unwrap_err().contains("at most"));
        assert_eq!(max_fails_value(&0), Ok(0));
        assert!(max_fails_value(&-1).is_err());
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
