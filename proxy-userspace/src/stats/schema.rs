//! What `GET /stats` returns, as types: the one description of the stats that the endpoint, the
//! demo, the tests and the field reference (`docs/operations.md`, checked by a test) share.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The whole `GET /stats` document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// mqsplice version.
    pub version: String,
    pub uptime_secs: u64,
    pub dataplane: DataplaneStats,
    /// Over all listeners.
    pub connections: ConnectionStats,
    /// By listener name.
    pub listeners: BTreeMap<String, ListenerStats>,
    /// By upstream name.
    pub upstreams: BTreeMap<String, UpstreamStats>,
}

/// The data path in use, and the splice's counters when it is the splice.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataplaneStats {
    /// The data path actually in use: `userspace`, `sockmap` or `packet`.
    pub mode: String,
    /// The configured `dataplane.mode`.
    pub requested: String,
    /// Why this path (a fallback says what was missing).
    pub reason: String,
    /// Present on the splice.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub splice: Option<SpliceStats>,
    /// Present on the packet splice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packet: Option<PacketStats>,
}

/// The packet splice's counters: flows, why flows were not taken, and the program's totals.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PacketStats {
    /// Interfaces the program is attached to (ingress).
    pub interfaces: Vec<String>,
    pub flow_table_size: u64,
    /// Flows the program carries now.
    pub spliced_active: u64,
    /// Flows handed to the program since start.
    pub spliced_total: u64,
    /// Flows not taken, copied in userspace instead, by reason.
    pub fallbacks: BTreeMap<String, u64>,
    /// Segments and payload bytes the program rewrote (retransmissions included).
    pub segments: u64,
    pub bytes: u64,
    /// Data segments dropped while their flow's hand-over was in progress (sent again).
    pub frozen_drops: u64,
    pub malformed_options: u64,
    pub rewrite_failed: u64,
    pub events_lost: u64,
}

/// The in-kernel splice's counters: the program's totals, the watcher's, and the limits in force.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpliceStats {
    pub bpffs_pin: String,
    pub spliced_active: u64,
    pub spliced_total: u64,
    pub splice_refused: u64,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
    pub packets: u64,
    pub empty_skbs_dropped: u64,
    pub redirect_failed: u64,
    pub passed_bytes: u64,
    pub signals_lost: u64,
    pub stream_check: bool,
    pub replayed_skbs_dropped: u64,
    pub replayed_bytes_dropped: u64,
    pub overlapping_skbs_trimmed: u64,
    pub overlap_bytes_trimmed: u64,
    pub untrimmable_skbs: u64,
    pub throttled_active: u64,
    pub throttles_total: u64,
    pub inflight_bytes: u64,
    pub max_inflight_per_flow: u64,
    /// `configured` or `auto`.
    pub max_inflight_per_flow_source: String,
    pub max_inflight_total: u64,
    pub daemon_held_bytes: u64,
    pub copies_resumed: u64,
    pub max_daemon_held_per_flow: u64,
    pub max_daemon_held_total: u64,
    pub closes: SpliceCloses,
}

/// How spliced pairs ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpliceCloses {
    pub fin_drained: u64,
    pub rst: u64,
    pub idle_timeout: u64,
    pub drain_timeout: u64,
}

/// Connection counters, for the process and for each listener.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectionStats {
    pub active: u64,
    pub accepted: u64,
    pub handled: u64,
    /// By refusal reason, every reason listed.
    pub rejected: BTreeMap<String, u64>,
}

/// One listener.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListenerStats {
    #[serde(flatten)]
    pub connections: ConnectionStats,
    /// `tcp`, `tls`, `ws` or `wss`.
    pub kind: String,
    pub listen: String,
    pub upstream: String,
    /// The data path of this listener's flows.
    pub data_path: String,
    /// Why: `mode` (the process's data path), `client_tls`, `broker_tls` or `websocket`.
    pub data_path_reason: String,
    pub bytes_from_clients: u64,
    pub bytes_to_clients: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws: Option<WsStats>,
}

/// A TLS listener's handshakes and certificate reloads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TlsStats {
    pub handshakes_ok: u64,
    pub resumed: u64,
    /// By failure reason, every reason listed.
    pub handshakes_failed: BTreeMap<String, u64>,
    pub handshake_time_avg_us: u64,
    pub handshake_time_max_us: u64,
    pub handshake_time_total_us: u64,
    pub reloads: u64,
    pub reload_failures: u64,
}

/// A WebSocket listener's upgrades and frames.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WsStats {
    pub upgrades_ok: u64,
    /// By failure reason, every reason listed.
    pub upgrades_failed: BTreeMap<String, u64>,
    /// Connections closed for a frame violation, by violation.
    pub closed_for: BTreeMap<String, u64>,
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub handshake_ms_avg: f64,
    pub handshake_ms_max: f64,
}

/// One upstream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpstreamStats {
    /// The balancing method.
    pub balance: String,
    pub servers: Vec<ServerStats>,
}

/// One server of an upstream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerStats {
    /// As configured (a host name stays one).
    pub addr: String,
    /// The addresses it resolved to.
    pub resolved: Vec<String>,
    /// `down`, `unavailable`, `backup` or `up`.
    pub state: String,
    pub weight: u32,
    pub backup: bool,
    pub active: u64,
    pub total: u64,
    pub failures: u64,
    pub bytes_to_server: u64,
    pub bytes_from_server: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::BTreeSet;

    /// A document with every optional part present; map keys stand for their kind.
    fn full() -> Stats {
        let reasons = BTreeMap::from([("REASON".to_string(), 1)]);
        let connections = ConnectionStats {
            rejected: reasons.clone(),
            ..ConnectionStats::default()
        };
        let listener = ListenerStats {
            connections: connections.clone(),
            tls: Some(TlsStats {
                handshakes_failed: reasons.clone(),
                ..TlsStats::default()
            }),
            ws: Some(WsStats {
                upgrades_failed: reasons.clone(),
                closed_for: reasons,
                ..WsStats::default()
            }),
            ..ListenerStats::default()
        };
        let upstream = UpstreamStats {
            servers: vec![ServerStats::default()],
            ..UpstreamStats::default()
        };
        Stats {
            dataplane: DataplaneStats {
                splice: Some(SpliceStats::default()),
                packet: Some(PacketStats {
                    fallbacks: BTreeMap::from([("REASON".to_string(), 1)]),
                    ..PacketStats::default()
                }),
                ..DataplaneStats::default()
            },
            connections,
            listeners: BTreeMap::from([("NAME".to_string(), listener)]),
            upstreams: BTreeMap::from([("NAME".to_string(), upstream)]),
            ..Stats::default()
        }
    }

    /// Every leaf of `value` as a dotted path: objects in arrays as `[]`, map keys as written.
    fn leaves(value: &Value, path: String, out: &mut BTreeSet<String>) {
        let join = |key: &str| {
            if path.is_empty() {
                key.to_string()
            } else {
                format!("{path}.{key}")
            }
        };
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    let key = match key.as_str() {
                        "NAME" => "<name>",
                        "REASON" => "<reason>",
                        other => other,
                    };
                    leaves(value, join(key), out);
                }
            }
            Value::Array(items) if items.first().is_some_and(Value::is_object) => {
                leaves(&items[0], format!("{path}[]"), out);
            }
            _ => {
                out.insert(path);
            }
        }
    }

    /// The paths the field table of `docs/operations.md` documents: a row's first cell lists
    /// backticked paths, a path after the first may start with `.` (the first one's last part
    /// replaced by it).
    fn documented() -> BTreeSet<String> {
        let doc = include_str!("../../../docs/operations.md");
        let table = doc
            .split("## Stats")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("docs/operations.md has a Stats section");
        let mut paths = BTreeSet::new();
        for row in table.lines().filter(|l| l.starts_with("| `")) {
            let cell = row.split('|').nth(1).expect("a first cell");
            let mut first: Option<String> = None;
            for item in cell.split('`').skip(1).step_by(2) {
                let path = match (&first, item.strip_prefix('.')) {
                    (Some(base), Some(relative)) => {
                        let parent = base.rsplit_once('.').map_or("", |(p, _)| p);
                        format!("{parent}.{relative}")
                    }
                    _ => item.to_string(),
                };
                first.get_or_insert_with(|| path.clone());
                paths.insert(path);
            }
        }
        paths
    }

    #[test]
    fn every_stats_field_is_documented_and_every_documented_field_exists() {
        let mut fields = BTreeSet::new();
        leaves(
            &serde_json::to_value(full()).unwrap(),
            String::new(),
            &mut fields,
        );
        let documented = documented();
        let undocumented: Vec<_> = fields.difference(&documented).collect();
        assert!(
            undocumented.is_empty(),
            "GET /stats fields missing from docs/operations.md: {undocumented:?}"
        );
        // A documented path is a field, or the object or array that holds some.
        let unknown: Vec<_> = documented
            .iter()
            .filter(|d| {
                !fields.contains(*d)
                    && !fields.iter().any(|f| {
                        f.starts_with(&format!("{d}.")) || f.starts_with(&format!("{d}[]"))
                    })
            })
            .collect();
        assert!(
            unknown.is_empty(),
            "docs/operations.md documents fields GET /stats does not have: {unknown:?}"
        );
    }

    #[test]
    fn the_document_reads_back_as_it_was_written() {
        let stats = full();
        let json = serde_json::to_string(&stats).unwrap();
        assert_eq!(serde_json::from_str::<Stats>(&json).unwrap(), stats);
    }
}
