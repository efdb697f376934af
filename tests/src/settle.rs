//! What a daemon still holds once its flows have ended: open connections, spliced pairs,
//! connections per broker, and entries in the pinned per-flow maps. Every path must come back
//! to nothing, or each finished flow leaks a descriptor, a map slot or a counter.

use crate::flows::wait_for;
use crate::maps;
use crate::stats::{Stats, fetch as stats};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What the stats (and, on the sockmap path, the pinned maps) show as still held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Held {
    /// `connections.active`.
    pub connections: u64,
    /// `dataplane.spliced_active` (0 on the userspace path, which has no such key).
    pub spliced: u64,
    /// The sum of `upstreams.*.servers[].active`.
    pub to_servers: u64,
    /// Entries in `mqs_socks`, `mqs_peers`, `mqs_flow_counters` (sockmap path only).
    pub map_entries: [usize; 3],
}

impl Held {
    /// Read from one stats document (and the maps it names).
    pub fn of(stats: &Stats) -> Held {
        let to_servers = stats
            .upstreams
            .values()
            .flat_map(|u| &u.servers)
            .map(|s| s.active)
            .sum();
        let splice = stats.dataplane.splice.as_ref();
        let map_entries = match splice {
            Some(splice) if stats.dataplane.mode == "sockmap" => {
                maps::flow_entries(&splice.bpffs_pin)
            }
            _ => [0; 3],
        };
        Held {
            connections: stats.connections.active,
            spliced: splice.map_or(0, |s| s.spliced_active),
            to_servers,
            map_entries,
        }
    }

    /// Whether nothing at all is held.
    pub fn is_empty(&self) -> bool {
        *self == Held::default()
    }
}

/// Waits up to `timeout` until the daemon at `stats_addr` holds nothing; `Ok(how long it took)`,
/// or what was still held and the stats at the end.
pub fn settled(stats_addr: SocketAddr, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut json = stats(stats_addr);
    let mut held = Held::of(&json);
    wait_for(timeout, || {
        json = stats(stats_addr);
        held = Held::of(&json);
        held.is_empty()
    });
    if held.is_empty() {
        Ok(started.elapsed())
    } else {
        Err(format!(
            "still held after {timeout:?}: {held:?}\nstats: {json:?}"
        ))
    }
}
