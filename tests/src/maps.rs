//! What an operator sees of the pinned maps, through `bpftool`.

use std::process::Command;

/// The number of entries in the map pinned at `pin_dir/name`, as `bpftool map dump` lists them.
pub fn entries(pin_dir: &str, name: &str) -> usize {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(format!("{pin_dir}/{name}"))
        .output()
        .expect("bpftool (installed by cargo xtask setup)");
    assert!(
        out.status.success(),
        "bpftool map dump {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    json.as_array().map_or(0, Vec::len)
}

/// Entries left in the per-flow maps (sockets, peers, counters) of the instance at `pin_dir`.
pub fn flow_entries(pin_dir: &str) -> [usize; 3] {
    ["mqs_socks", "mqs_peers", "mqs_flow_counters"].map(|m| entries(pin_dir, m))
}
