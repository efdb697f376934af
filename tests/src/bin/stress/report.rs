//! The per-minute line of one path, and the figures it reads from the daemon: its stats, its
//! resident memory and its open descriptors.

use super::mix::Tally;
use mqsplice_tests::daemon::Daemon;
use mqsplice_tests::held_bytes;
use mqsplice_tests::stats::fetch_json as stats;
use std::sync::atomic::Ordering::Relaxed;

/// One line: flows done, corrupted, hung, short; throttles, held bytes, trims and copies resumed
/// by a progress check (lost wake-ups) from the stats; the
/// daemon's RSS and open descriptors.
pub fn line(path: &str, minute: u64, daemon: &Daemon, tally: &Tally) -> String {
    let flows = tally.flows.lock().unwrap().clone();
    let json = stats(daemon.stats);
    let dataplane = &json["dataplane"];
    let or_dash = |v: Option<u64>| v.map_or("-".to_string(), |n| n.to_string());
    let held = dataplane[held_bytes::KEY]
        .as_u64()
        .map_or("-".to_string(), |n| format!("{} KiB", n >> 10));
    format!(
        "[{minute:>3} min] {path:<9} flows {:>6}  corrupt {}  hung {}  short {}  | paho {} (lost {})  \
         cycles {} (slow to settle {}, unsettled {})  | throttles {}  held {held}  overlaps trimmed {} (untrimmable {})  resumed {}  | rss {} MiB  fds {}",
        flows.flows,
        flows.corrupt,
        flows.hung,
        flows.short,
        tally.paho.load(Relaxed),
        tally.paho_lost.load(Relaxed),
        tally.cycles.load(Relaxed),
        tally.slow_to_settle.load(Relaxed),
        tally.unsettled.load(Relaxed),
        or_dash(dataplane["throttles_total"].as_u64()),
        or_dash(dataplane["overlapping_skbs_trimmed"].as_u64()),
        or_dash(dataplane["untrimmable_skbs"].as_u64()),
        or_dash(dataplane["copies_resumed"].as_u64()),
        daemon.rss_kib() / 1024,
        daemon.open_fds(),
    )
}
