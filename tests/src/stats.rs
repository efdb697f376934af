//! The daemon's `/stats` as tests read it: fetched over HTTP, as an operator would, and
//! deserialized into the daemon's own typed [`Stats`], so a renamed field breaks the build
//! instead of silently comparing `null`.

pub use mqsplice::stats::Stats;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// `GET /stats` over a plain blocking socket, as JSON text; panics unless it answers 200.
fn fetch_text(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).expect("stats connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream
        .write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("stats request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("stats response");
    let text = String::from_utf8(response).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    assert!(head.starts_with("HTTP/1.1 200"), "stats answered {head}");
    body.to_string()
}

/// The typed stats, for tests on plain threads.
pub fn fetch(addr: SocketAddr) -> Stats {
    let body = fetch_text(addr);
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("stats JSON ({e}): {body}"))
}

/// The stats as an untyped document, for tests that print or scan the whole of it.
pub fn fetch_json(addr: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&fetch_text(addr)).expect("stats JSON")
}

/// [`fetch`] from async code: the blocking request runs off the runtime's worker threads, so it
/// also works against an in-process proxy on a single-threaded runtime.
pub async fn fetch_async(addr: SocketAddr) -> Stats {
    tokio::task::spawn_blocking(move || fetch(addr))
        .await
        .expect("stats fetch")
}

/// `total` of every server of upstream `brokers`, in order.
pub fn totals(stats: &Stats) -> Vec<u64> {
    upstream_servers(stats).iter().map(|s| s.total).collect()
}

/// The servers of upstream `brokers` (the one upstream of most test setups).
pub fn upstream_servers(stats: &Stats) -> &[mqsplice::stats::ServerStats] {
    &stats.upstreams["brokers"].servers
}

/// The splice's own figures: `None` unless the daemon runs the sockmap path.
pub fn splice(stats: &Stats) -> Option<&mqsplice::stats::SpliceStats> {
    stats.dataplane.splice.as_ref()
}

/// Every reason a connection can be refused for, as the stats name them.
pub const REJECT_REASONS: [&str; 7] = [
    "malformed",
    "bad_protocol",
    "too_large",
    "connect_timeout",
    "no_upstream",
    "over_limit",
    "closed",
];
