//! mqsplice under test: in process for behaviour, or the built binary for per-process checks.

use mqsplice::Running;
use mqsplice::config::Config;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Starts mqsplice in process from a TOML document (listen on port 0; read the bound address back).
pub async fn start(toml: &str) -> Running {
    let config = Config::from_toml_str(toml).unwrap_or_else(|e| panic!("test config: {e}\n{toml}"));
    mqsplice::start(config).await.expect("start mqsplice")
}

/// Starts mqsplice in process with custom options (a test resolver).
pub async fn start_with(toml: &str, options: mqsplice::Options) -> Running {
    let config = Config::from_toml_str(toml).unwrap_or_else(|e| panic!("test config: {e}\n{toml}"));
    mqsplice::start_with(config, options)
        .await
        .expect("start mqsplice")
}

/// `servers = [...]` entries for the given broker addresses, each with `extra` keys.
pub fn servers(addrs: &[SocketAddr], extra: &str) -> String {
    let entries: Vec<String> = addrs
        .iter()
        .map(|a| {
            if extra.is_empty() {
                format!("{{ addr = \"{a}\" }}")
            } else {
                format!("{{ addr = \"{a}\", {extra} }}")
            }
        })
        .collect();
    format!("[{}]", entries.join(", "))
}

/// A one-listener, one-upstream configuration on the data path `mode`, with `upstream_extra`
/// and `listener_extra` lines appended to those tables.
pub fn config(
    mode: crate::Mode,
    servers: &str,
    upstream_extra: &str,
    listener_extra: &str,
) -> String {
    format!(
        r#"
[stats]
listen = "127.0.0.1:0"
[dataplane]
{dataplane}
[log]
access = "off"
[[upstream]]
name = "brokers"
servers = {servers}
{upstream_extra}
[[listener]]
name = "mqtt"
kind = "tcp"
listen = "127.0.0.1:0"
upstream = "brokers"
{listener_extra}
"#,
        dataplane = mode.dataplane_keys()
    )
}

/// `upstreams.brokers.servers[i].total` for every server, in order.
pub fn totals(stats: &Value) -> Vec<u64> {
    server_field(stats, "total")
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

/// One field of every server of upstream `brokers`.
pub fn server_field(stats: &Value, field: &str) -> Vec<Value> {
    stats["upstreams"]["brokers"]["servers"]
        .as_array()
        .expect("servers array")
        .iter()
        .map(|s| s[field].clone())
        .collect()
}

/// The built `mqsplice` binary: `cargo xtask test` passes it in `MQSPLICE_BIN`. Per-process tests
/// fail without it rather than pick up a stale build.
pub fn binary() -> PathBuf {
    let path = std::env::var_os("MQSPLICE_BIN")
        .expect("MQSPLICE_BIN is not set: run the per-process tests through `cargo xtask test`");
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "MQSPLICE_BIN={} is not a file",
        path.display()
    );
    path
}

/// Fetches `GET /stats` over HTTP, as an operator would.
pub async fn fetch_stats(addr: SocketAddr) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("stats connect");
    stream
        .write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    assert!(head.starts_with("HTTP/1.1 200"), "stats answered {head}");
    serde_json::from_str(body).expect("stats JSON")
}
