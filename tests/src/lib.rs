//! Test harness: real brokers (embedded rumqttd, or a child process that can be killed), real
//! clients (rumqttc), and mqsplice itself, in process or as the built binary.

pub mod broker;
pub mod client;
pub mod daemon;
pub mod fake;
pub mod flows;
pub mod held_bytes;
pub mod maps;
pub mod netns;
pub mod numbered;
pub mod pki;
pub mod proxy;
pub mod raw;
pub mod settle;
pub mod setup;
pub mod stats;
pub mod ws;

/// The data path a test runs on, named in every test whose outcome depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The userspace copy path.
    Userspace,
    /// The in-kernel sockmap splice (needs root).
    Sockmap,
    /// The packet splice on loopback (needs root; in development, so not in [`Mode::ALL`]).
    Packet,
}

impl Mode {
    /// Every data path this build can test.
    pub const ALL: [Mode; 2] = [Mode::Userspace, Mode::Sockmap];

    /// The `dataplane.mode` value selecting this path.
    pub fn config_value(self) -> &'static str {
        match self {
            Mode::Userspace => "userspace",
            Mode::Sockmap => "sockmap",
            Mode::Packet => "packet",
        }
    }

    /// Whether this path can run here. The eBPF path needs root: without it the test prints
    /// `SKIPPED: …` and returns, except under `CI=true`, where a missing privilege fails.
    pub fn runnable(self) -> bool {
        if self == Mode::Userspace || is_root() {
            return true;
        }
        let reason = "the eBPF data path needs root (CAP_BPF and CAP_NET_ADMIN)";
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and {reason}"
        );
        println!("SKIPPED: {reason}");
        false
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A bpffs directory no other test instance uses.
///
/// The first call also removes the directories of test processes that are gone: an in-process
/// instance whose test ended while some of its tasks were still alive can leave its pins behind,
/// and pinned maps hold kernel memory until someone removes them.
pub fn unique_pin_dir() -> String {
    static CLEANED: std::sync::Once = std::sync::Once::new();
    CLEANED.call_once(remove_pin_dirs_of_dead_test_processes);
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("/sys/fs/bpf/mqsplice-test-{}-{n}", std::process::id())
}

/// A free loopback TCP port, for a broker that cannot bind port 0 and report it.
///
/// Chosen below the kernel's ephemeral range (`ip_local_port_range`, 32768–60999 by default),
/// from a sequence that starts at a point of this process's own: a port taken with `bind(0)`
/// (every proxy listener and client socket in the tests) is never one of these, so the port
/// cannot be handed to another test between this check and the broker's bind. Under load the old
/// way (bind port 0, release) let a listener of a parallel test take the port first, and a
/// test then talked to the wrong server.
pub fn free_port() -> u16 {
    const LOW: u32 = 10_000;
    const SPAN: u32 = 20_000;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (LOW + (start + n.wrapping_mul(37)) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A loopback address on a [`free_port`], for a broker or a daemon that must be told its port.
pub fn free_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes; true when it held.
pub async fn wait_until(timeout: std::time::Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    condition()
}

fn remove_pin_dirs_of_dead_test_processes() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("mqsplice-test-")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether an external tool a test needs (Chromium, node modules, amqtt) is installed: without
/// it the test prints `SKIPPED: …` and returns, except under `CI=true`, where it fails
/// (`cargo xtask setup` installs them all).
pub fn tool_present(present: bool, what: &str) -> bool {
    if present {
        return true;
    }
    let reason = format!("{what} is not installed (run `cargo xtask setup`)");
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true and {reason}"
    );
    println!("SKIPPED: {reason}");
    false
}

/// The workspace's root directory.
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}
