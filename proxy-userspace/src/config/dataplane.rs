//! `[dataplane]`: which data path moves an established flow's bytes, and the limits of the
//! sockmap splice (what the kernel and the daemon may hold for a flow).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::value::{Invalid, NumOrStr, one_of, optional_key, positive_duration, size_in_range};

/// Where the eBPF maps are pinned unless `dataplane.bpffs_pin` says otherwise.
pub const DEFAULT_BPFFS_PIN: &str = "/sys/fs/bpf/mqsplice";
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

/// Default of `dataplane.packet.flow_table_size`: flows the packet splice can carry at once.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 65_536;
/// Bounds of `dataplane.packet.flow_table_size`.
const MIN_FLOW_TABLE_SIZE: i64 = 1;
const MAX_FLOW_TABLE_SIZE: i64 = 4_194_304;

/// `[dataplane]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDataplane {
    mode: Option<Spanned<String>>,
    packet: Option<RawPacket>,
    bpffs_pin: Option<Spanned<String>>,
    close_drain_timeout: Option<Spanned<NumOrStr>>,
    max_inflight_per_flow: Option<Spanned<NumOrStr>>,
    max_inflight_total: Option<Spanned<NumOrStr>>,
    max_daemon_held_per_flow: Option<Spanned<NumOrStr>>,
    max_daemon_held_total: Option<Spanned<NumOrStr>>,
}

/// `[dataplane.packet]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPacket {
    interfaces: Option<Spanned<Vec<String>>>,
    flow_table_size: Option<Spanned<i64>>,
}

/// `[dataplane.packet]`: where the packet splice's program runs and how many flows it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketConfig {
    /// Interfaces whose ingress carries client and broker traffic; empty: every interface that
    /// is up (loopback included).
    pub interfaces: Vec<String>,
    /// Flows spliced at once; a flow beyond it takes the next data path. Default
    /// [`DEFAULT_FLOW_TABLE_SIZE`].
    pub flow_table_size: u32,
}

impl PacketConfig {
    fn from_raw(raw: Option<&RawPacket>) -> Result<PacketConfig, Invalid> {
        let default = RawPacket::default();
        let raw = raw.unwrap_or(&default);
        let path = "dataplane.packet";
        Ok(PacketConfig {
            interfaces: optional_key!(raw, path, interfaces, Vec::new(), |names| {
                names
                    .iter()
                    .map(|n| parse_interface(n))
                    .collect::<Result<Vec<_>, _>>()
            })?,
            flow_table_size: optional_key!(
                raw,
                path,
                flow_table_size,
                DEFAULT_FLOW_TABLE_SIZE,
                |n| {
                    if (MIN_FLOW_TABLE_SIZE..=MAX_FLOW_TABLE_SIZE).contains(n) {
                        Ok(*n as u32)
                    } else {
                        Err(format!(
                            "flow_table_size must be between {MIN_FLOW_TABLE_SIZE} and {MAX_FLOW_TABLE_SIZE}"
                        ))
                    }
                }
            )?,
        })
    }
}

/// An interface name as the kernel takes it: 1 to 15 bytes, no `/`, whitespace or NUL.
fn parse_interface(name: &str) -> Result<String, String> {
    if name.is_empty()
        || name.len() > 15
        || name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
    {
        return Err(format!("{name:?} is not an interface name"));
    }
    Ok(name.to_owned())
}

/// Which data path moves the bytes of established flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataplaneMode {
    /// eBPF when the programs load, userspace otherwise (the reason is logged and in stats).
    Auto,
    /// The in-kernel splice, or fail at start.
    Sockmap,
    /// Always the userspace copy path.
    Userspace,
    /// The packet splice (in development: flows it cannot take are copied in userspace), or
    /// fail at start.
    Packet,
}

impl DataplaneMode {
    /// The configuration spelling, also used in stats.
    pub fn as_str(self) -> &'static str {
        match self {
            DataplaneMode::Auto => "auto",
            DataplaneMode::Sockmap => "sockmap",
            DataplaneMode::Userspace => "userspace",
            DataplaneMode::Packet => "packet",
        }
    }
}

/// `dataplane.max_inflight_per_flow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightLimit {
    /// What the kernel buffers for one flow through a userspace proxy that holds nothing itself:
    /// a full receive queue plus a full send queue (the maxima of `net.ipv4.tcp_rmem` and
    /// `tcp_wmem`). A bulk flow its peer keeps up with stays spliced, and a peer that falls
    /// behind is throttled no later than a userspace proxy's reads would stop.
    Auto,
    /// A fixed number of bytes.
    Bytes(usize),
}

/// `[dataplane]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DataplaneConfig {
    /// Default `auto`.
    pub mode: DataplaneMode,
    /// Directory on bpffs where the eBPF maps are pinned and the instance lock is held.
    /// Default [`DEFAULT_BPFFS_PIN`].
    pub bpffs_pin: PathBuf,
    /// How long the bytes before a close may take to drain into the peer.
    /// Default [`DEFAULT_CLOSE_DRAIN_TIMEOUT`].
    pub close_drain_timeout: Duration,
    /// A spliced direction with more bytes in the kernel than this is throttled. Default `auto`.
    pub max_inflight_per_flow: InflightLimit,
    /// All spliced directions together; the biggest are throttled first.
    /// Default [`DEFAULT_MAX_INFLIGHT_TOTAL`].
    pub max_inflight_total: usize,
    /// Bytes the daemon may hold for one throttled direction (read, not yet taken by the peer).
    /// Default [`DEFAULT_MAX_DAEMON_HELD_PER_FLOW`].
    pub max_daemon_held_per_flow: usize,
    /// The same over all throttled directions. Default [`DEFAULT_MAX_DAEMON_HELD_TOTAL`].
    pub max_daemon_held_total: usize,
    /// `[dataplane.packet]`.
    pub packet: PacketConfig,
}

impl DataplaneConfig {
    pub(super) fn from_raw(raw: &RawDataplane) -> Result<DataplaneConfig, Invalid> {
        let path = "dataplane";
        let held = |v: &NumOrStr| size_in_range(v, MIN_HELD, MAX_HELD);
        let config = DataplaneConfig {
            mode: optional_key!(raw, path, mode, DataplaneMode::Auto, |s| {
                parse_dataplane_mode(s)
            })?,
            bpffs_pin: optional_key!(raw, path, bpffs_pin, DEFAULT_BPFFS_PIN.into(), |s| {
                parse_bpffs_pin(s)
            })?,
            close_drain_timeout: optional_key!(
                raw,
                path,
                close_drain_timeout,
                DEFAULT_CLOSE_DRAIN_TIMEOUT,
                positive_duration
            )?,
            max_inflight_per_flow: optional_key!(
                raw,
                path,
                max_inflight_per_flow,
                InflightLimit::Auto,
                parse_inflight_limit
            )?,
            max_inflight_total: optional_key!(
                raw,
                path,
                max_inflight_total,
                DEFAULT_MAX_INFLIGHT_TOTAL,
                |v| size_in_range(v, MIN_INFLIGHT, MAX_INFLIGHT)
            )?,
            max_daemon_held_per_flow: optional_key!(
                raw,
                path,
                max_daemon_held_per_flow,
                DEFAULT_MAX_DAEMON_HELD_PER_FLOW,
                held
            )?,
            max_daemon_held_total: optional_key!(
                raw,
                path,
                max_daemon_held_total,
                DEFAULT_MAX_DAEMON_HELD_TOTAL,
                held
            )?,
            packet: PacketConfig::from_raw(raw.packet.as_ref())?,
        };
        if config.max_daemon_held_per_flow > config.max_daemon_held_total {
            return Err(Invalid::at(
                "dataplane.max_daemon_held_per_flow",
                raw.max_daemon_held_per_flow.as_ref().map(Spanned::span),
                "must not be more than dataplane.max_daemon_held_total",
            ));
        }
        Ok(config)
    }
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
            ("packet", DataplaneMode::Packet),
        ],
    )
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
    fn modes() {
        assert_eq!(parse_dataplane_mode("sockmap"), Ok(DataplaneMode::Sockmap));
        assert_eq!(parse_dataplane_mode("ebpf"), Ok(DataplaneMode::Sockmap));
        assert_eq!(
            parse_dataplane_mode("userspace"),
            Ok(DataplaneMode::Userspace)
        );
        let e = parse_dataplane_mode("kernel").unwrap_err();
        assert!(e.contains("auto, sockmap, userspace, packet"), "{e}");
    }
}
