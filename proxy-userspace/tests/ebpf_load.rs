//! The embedded eBPF object loads, attaches, pins its maps, and holds its pin directory's lock.
//!
//! Needs root (or CAP_BPF + CAP_NET_ADMIN); without it the test prints `SKIPPED: <reason>` and
//! passes, unless `CI=true`, where a skip would hide a broken runner and so fails instead.

use mqsplice::dataplane::ebpf::{EbpfPrograms, EbpfUnavailable};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn skip_or_fail(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("eBPF data plane test cannot run under CI=true: {reason}");
    }
    println!("SKIPPED: {reason}");
}

const MAPS: [&str; 4] = ["mqs_socks", "mqs_peers", "mqs_flow_counters", "mqs_totals"];

#[test]
fn programs_load_pin_their_maps_and_lock_the_directory() {
    let euid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    let pin_dir = format!("/sys/fs/bpf/mqsplice-test-load-{}", std::process::id());
    let (programs, _maps) = match EbpfPrograms::load(&pin_dir) {
        Ok(loaded) => loaded,
        Err(e @ (EbpfUnavailable::NotPermitted(_) | EbpfUnavailable::NotBuilt)) => {
            return skip_or_fail(&e.to_string());
        }
        Err(e) if euid != 0 => return skip_or_fail(&format!("not root (euid {euid}): {e}")),
        Err(e) => panic!("loading the eBPF data plane as root failed: {e}"),
    };
    for map in MAPS {
        assert!(
            Path::new(&pin_dir).join(map).exists(),
            "{map} is pinned under {pin_dir}"
        );
    }

    // A second instance on the same directory is refused while the first holds the lock.
    match EbpfPrograms::load(&pin_dir) {
        Err(EbpfUnavailable::Locked(dir)) => assert_eq!(dir, pin_dir),
        Err(other) => panic!("expected Locked, got {other}"),
        Ok(_) => panic!("a second instance loaded into a locked pin directory"),
    }
    for map in MAPS {
        assert!(
            Path::new(&pin_dir).join(map).exists(),
            "the refused instance must not touch {map}"
        );
    }

    // Dropping the instance removes its pins and the directory.
    drop(programs);
    assert!(!Path::new(&pin_dir).exists(), "{pin_dir} is left behind");
}
