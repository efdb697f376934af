//! Three network namespaces joined by two veth pairs, for the data paths that forward segments
//! from one interface to another:
//!
//! ```text
//! client 10.77.1.2 ── veth ── 10.77.1.1 proxy 10.77.2.1 ── veth ── 10.77.2.2 broker
//! ```
//!
//! Created by a test (root) and removed when the [`Topology`] is dropped, failed test or not.
//! Code runs inside a namespace on a thread of its own ([`run_in`]); a socket made there stays
//! in that namespace whichever thread uses it later.

use std::fs::File;
use std::os::fd::AsFd;
use std::process::Command;

/// The proxy's address towards the client.
pub const PROXY_CLIENT_SIDE: &str = "10.77.1.1";
/// The broker's address.
pub const BROKER: &str = "10.77.2.2";

/// The three namespaces; dropping it removes them (and every process and interface in them).
pub struct Topology {
    pub client: String,
    pub proxy: String,
    pub broker: String,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(status.success(), "ip {args:?} failed: {status}");
}

impl Topology {
    /// Creates the namespaces, named after this process and a count, so that neither parallel
    /// test binaries nor parallel tests meet.
    pub fn three() -> Topology {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = format!(
            "mqs{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let topology = Topology {
            client: format!("{id}c"),
            proxy: format!("{id}p"),
            broker: format!("{id}b"),
        };
        topology.remove();
        let (c, p, b) = (&topology.client, &topology.proxy, &topology.broker);
        for ns in [c, p, b] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let (c0, p0, p1, b0) = (
            format!("{c}0"),
            format!("{p}0"),
            format!("{p}1"),
            format!("{b}0"),
        );
        ip(&[
            "link", "add", &c0, "netns", c, "type", "veth", "peer", "name", &p0, "netns", p,
        ]);
        ip(&[
            "link", "add", &p1, "netns", p, "type", "veth", "peer", "name", &b0, "netns", b,
        ]);
        for (ns, dev, addr) in [
            (c, &c0, "10.77.1.2/24"),
            (p, &p0, "10.77.1.1/24"),
            (p, &p1, "10.77.2.1/24"),
            (b, &b0, "10.77.2.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        topology
    }

    fn remove(&self) {
        for ns in [&self.client, &self.proxy, &self.broker] {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }

    /// A command run inside namespace `ns`.
    pub fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).arg(program);
        command
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Runs `f` on a thread that has entered namespace `ns`; threads it starts are there too.
pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let handle = File::open(format!("/run/netns/{ns}"))
                    .unwrap_or_else(|e| panic!("namespace {ns}: {e}"));
                rustix::thread::move_into_link_name_space(
                    handle.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .unwrap_or_else(|e| panic!("entering namespace {ns}: {e}"));
                f()
            })
            .join()
            .expect("the thread in the namespace")
    })
}
