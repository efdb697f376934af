//! Real WebSocket clients and brokers that are not ours: MQTT.js in headless Chromium through a
//! `ws` listener and through a `wss` listener (its test certificate trusted by pinning the
//! server key with `--ignore-certificate-errors-spki-list`), and amqtt's WebSocket listener
//! behind an `upstream_protocol = "ws"` upstream.
//!
//! The tools come from `cargo xtask setup` (Debian `chromium`, npm `mqtt` and `playwright-core`
//! in tests/browser/, PyPI `amqtt` in a venv under target/); without them these tests skip,
//! except under `CI=true`.

use mqsplice_tests::broker::{EmbeddedBroker, wait_for_port};
use mqsplice_tests::pki::Pki;
use mqsplice_tests::raw::{self, connect_v311};
use mqsplice_tests::setup::{Kind, Setup, Tls};
use mqsplice_tests::ws::{self, publish_qos1, subscribe};
use mqsplice_tests::{free_addr, tool_present, workspace_root};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(10);
const CHROMIUM: &str = "/usr/bin/chromium";

fn browser_dir() -> PathBuf {
    workspace_root().join("tests/browser")
}

/// Serves the test page and MQTT.js on 127.0.0.1 (HTTP/1.0 style: one request per connection).
async fn serve_page() -> SocketAddr {
    let dir = browser_dir();
    let page = std::fs::read(dir.join("page.html")).expect("tests/browser/page.html");
    let script =
        std::fs::read(dir.join("node_modules/mqtt/dist/mqtt.min.js")).expect("mqtt.min.js");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (page, script) = (page.clone(), script.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&head);
                let path = line.split(' ').nth(1).unwrap_or("/");
                let (status, kind, body) = if path.starts_with("/mqtt.min.js") {
                    ("200 OK", "application/javascript", script)
                } else if path == "/" || path.starts_with("/?") {
                    ("200 OK", "text/html", page)
                } else {
                    ("404 Not Found", "text/plain", b"not found".to_vec())
                };
                let header = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tcp.write_all(header.as_bytes()).await;
                let _ = tcp.write_all(&body).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    addr
}

/// Runs the page in Chromium and returns what it reported.
async fn run_page(page: SocketAddr, mqtt_url: &str, n: usize, extra_flags: &[String]) -> Value {
    let url = format!("http://{page}/?url={mqtt_url}&n={n}");
    let mut cmd = tokio::process::Command::new("node");
    cmd.current_dir(browser_dir())
        .arg("run.mjs")
        .arg(&url)
        .arg("30000")
        .args(extra_flags)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the browser run took over 60 s")
        .expect("start node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "browser driver printed no result ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn browser_tools_present() -> bool {
    let dir = browser_dir();
    tool_present(
        Path::new(CHROMIUM).exists(),
        "Debian chromium (/usr/bin/chromium)",
    ) && tool_present(
        dir.join("node_modules/mqtt/dist/mqtt.min.js").exists()
            && dir.join("node_modules/playwright-core").exists(),
        "npm mqtt and playwright-core in tests/browser/node_modules",
    ) && tool_present(
        std::process::Command::new("node")
            .arg("--version")
            .output()
            .is_ok(),
        "node",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_js_in_chromium_publishes_and_receives_qos0_and_qos1_over_ws() {
    if !browser_tools_present() {
        return;
    }
    let broker = EmbeddedBroker::start();
    let running = Setup::one(Kind::Ws, "ws", &[broker.addr]).start().await;
    let ws_addr = running.listener_addr("ws").unwrap();
    let page = serve_page().await;
    let n = 20;
    let result = run_page(page, &format!("ws://{ws_addr}/mqtt"), n, &[]).await;
    assert_eq!(result["error"], Value::Null, "{result}");
    assert_eq!(result["qos0"], n, "{result}");
    assert_eq!(result["qos1"], n, "{result}");
    let stats = running.typed_stats();
    let ws_stats = stats.listeners["ws"].ws.as_ref().expect("ws stats");
    assert_eq!(ws_stats.upgrades_ok, 1, "{stats:?}");
    assert!(ws_stats.frames_in >= 2 * n as u64, "{stats:?}");
}

/// Chromium's `--ignore-certificate-errors-spki-list` value for `key`: the base64 of the
/// SHA-256 of its SubjectPublicKeyInfo DER.
fn spki_pin(key: &rcgen::KeyPair) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(key.public_key_der()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_js_in_chromium_publishes_and_receives_qos0_and_qos1_over_wss() {
    if !browser_tools_present() {
        return;
    }
    let pki = Pki::new();
    let broker = EmbeddedBroker::start();
    // Served with `pki`'s server certificate (issued for 127.0.0.1 by a root Chromium does not
    // know) and the default ALPN.
    let running = Setup::one(Kind::Wss, "wss", &[broker.addr])
        .listener_with("wss", |l| l.tls(Tls::server(&pki)))
        .start()
        .await;
    let wss_addr = running.listener_addr("wss").unwrap();
    let page = serve_page().await;
    let n = 20;
    // The certificate chains to a root Chromium does not trust; pinning the server key's SPKI
    // is what lets it through.
    let trust = format!(
        "--ignore-certificate-errors-spki-list={}",
        spki_pin(&pki.server.key)
    );
    let result = run_page(page, &format!("wss://{wss_addr}/mqtt"), n, &[trust]).await;
    assert_eq!(result["error"], Value::Null, "{result}");
    assert_eq!(result["qos0"], n, "{result}");
    assert_eq!(result["qos1"], n, "{result}");
    let stats = running.typed_stats();
    let listener = &stats.listeners["wss"];
    let (tls, ws) = (
        listener.tls.as_ref().unwrap(),
        listener.ws.as_ref().unwrap(),
    );
    assert!(tls.handshakes_ok >= 1, "{stats:?}");
    assert_eq!(ws.upgrades_ok, 1, "{stats:?}");
    assert_eq!(listener.data_path, "userspace", "{stats:?}");
    assert!(ws.frames_in >= 2 * n as u64, "{stats:?}");
}

fn amqtt_bin() -> PathBuf {
    std::env::var_os("MQSPLICE_AMQTT")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/amqtt-venv/bin/amqtt"))
}

/// amqtt with a WebSocket listener on a free port, killed on drop.
struct Amqtt {
    child: std::process::Child,
    ws: SocketAddr,
    _dir: PathBuf,
}

impl Amqtt {
    fn start() -> Amqtt {
        let tcp = free_addr();
        let ws = free_addr();
        let dir = std::env::temp_dir().join(format!("mqsplice-amqtt-{}", ws.port()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("broker.yaml");
        std::fs::write(
            &config,
            format!(
                "listeners:\n  default:\n    type: tcp\n    bind: {tcp}\n  ws-mqtt:\n    type: ws\n    bind: {ws}\nplugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
            ),
        )
        .unwrap();
        let child = std::process::Command::new(amqtt_bin())
            .arg("-c")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start amqtt");
        wait_for_port(ws, Duration::from_secs(20));
        Amqtt {
            child,
            ws,
            _dir: dir,
        }
    }
}

impl Drop for Amqtt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

#[tokio::test]
async fn ws_upstream_speaks_to_amqtt_websocket_listener() {
    if !tool_present(amqtt_bin().exists(), "PyPI amqtt (target/amqtt-venv)") {
        return;
    }
    let amqtt = Amqtt::start();
    let running = Setup::one(Kind::Ws, "ws", &[amqtt.ws])
        .upstream_with(|u| u.upstream_protocol("ws"))
        .start()
        .await;
    let addr = running.listener_addr("ws").unwrap();
    let mut client = ws::connect(addr, "/mqtt", Some("mqtt"), &[]).await.unwrap();
    client.send(&connect_v311("to-amqtt")).await.unwrap();
    assert_eq!(client.packet(WAIT).await.unwrap(), [0x20, 0x02, 0x00, 0x00]);
    client.send(&subscribe(1, "amqtt/t", 1)).await.unwrap();
    assert_eq!(
        client.packet(WAIT).await.unwrap(),
        [0x90, 0x03, 0x00, 0x01, 0x01]
    );
    // Both packets in one frame; amqtt sees them re-framed by mqsplice.
    let mut both = raw::publish_qos0("amqtt/t", b"zero");
    both.extend(publish_qos1(9, "amqtt/t", b"one"));
    client.send(&both).await.unwrap();
    let mut payloads = Vec::new();
    let mut puback = false;
    for _ in 0..3 {
        let p = client.packet(WAIT).await.unwrap();
        if p == [0x40, 0x02, 0x00, 0x09] {
            puback = true;
        } else {
            assert_eq!(p[0] & 0xf0, 0x30, "{p:02x?}");
            if p[0] & 0x06 != 0 {
                // Acknowledge a QoS 1 delivery (packet id right after the topic).
                let id = [p[2 + 2 + 7], p[2 + 2 + 7 + 1]];
                client.send(&[0x40, 0x02, id[0], id[1]]).await.unwrap();
            }
            payloads.push(p[p.len().saturating_sub(4)..].to_vec());
        }
    }
    assert!(puback);
    assert!(
        payloads.iter().any(|p| p.ends_with(b"zero")),
        "{payloads:?}"
    );
    assert!(payloads.iter().any(|p| p.ends_with(b"one")), "{payloads:?}");
}
