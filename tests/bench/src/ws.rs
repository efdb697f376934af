//! MQTT over WebSocket: round-trip latency and message throughput through mqsplice (ws → tcp:
//! the WebSocket ends in mqsplice, the broker gets plain MQTT) and through NGINX (ws → ws, as
//! in the EMQX guide: `proxy_pass` with the Upgrade headers to the brokers' WebSocket port),
//! next to the direct WebSocket connection, in the same run.
//!
//! The same over TLS (wss): mqsplice `kind = "wss"` (TLS and the WebSocket end in mqsplice, the
//! broker gets plain MQTT) against NGINX `listen ... ssl` in the same http block (wss → ws), both
//! with one ECDSA P-256 certificate, the client offering ALPN `http/1.1` as a browser does.
//!
//! The broker behind each is an echo stand-in written here (the TCP echo broker for mqsplice,
//! [`WsEchoBroker`] for NGINX and the direct path), so that the broker is not the limit. The
//! client sends each PUBLISH in its own binary frame, as MQTT.js does.

use crate::broker::{EchoBroker, answer, parse_header};
use crate::paths::{ChildProxy, NginxTool, temp_dir};
use anyhow::{Context, bail};
use mqsplice_tests::free_port;
use mqsplice_tests::raw::{connect_v311, publish_qos0};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::{self, Bytes, Message, WebSocket};

/// The WebSocket paths compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsPath {
    /// Client straight to the WebSocket echo broker: the limit.
    Direct,
    /// mqsplice `kind = "ws"` → TCP echo broker.
    Mqsplice,
    /// NGINX http proxy with Upgrade → WebSocket echo broker.
    Nginx,
    /// mqsplice `kind = "wss"` → TCP echo broker.
    MqspliceWss,
    /// NGINX http proxy with `listen ... ssl` and Upgrade → WebSocket echo broker.
    NginxWss,
}

impl WsPath {
    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            WsPath::Direct => "ws-direct",
            WsPath::Mqsplice => "mqsplice-ws",
            WsPath::Nginx => "nginx-ws",
            WsPath::MqspliceWss => "mqsplice-wss",
            WsPath::NginxWss => "nginx-wss",
        }
    }

    /// Whether the client speaks TLS to this path.
    pub fn tls(self) -> bool {
        matches!(self, WsPath::MqspliceWss | WsPath::NginxWss)
    }
}

/// Read timeout of every client and broker socket: a path that stops echoing fails.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Round trips before the timed ones.
const WARMUP: usize = 200;
/// Size of the PUBLISH bounced in the latency phase and streamed in the throughput phase.
const PUBLISH_SIZE_PAYLOAD: usize = 64;

/// A client's transport: TCP, or rustls over TCP.
trait Io: Read + Write {}
impl<T: Read + Write> Io for T {}

/// A WebSocket echo broker on a loopback port: one thread per connection, each binary message's
/// complete PUBLISHes echoed in one binary message, other packets answered as the TCP one does.
pub struct WsEchoBroker {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl WsEchoBroker {
    /// Binds a free port and starts accepting.
    pub fn start() -> std::io::Result<WsEchoBroker> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    return;
                }
                if let Ok(stream) = stream {
                    std::thread::spawn(move || {
                        let _ = serve_ws(stream);
                    });
                }
            }
        });
        Ok(WsEchoBroker { addr, stop })
    }
}

impl Drop for WsEchoBroker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve_ws(stream: TcpStream) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    #[allow(clippy::result_large_err)] // tungstenite's callback signature
    let echo_protocol = |req: &Request, mut resp: Response| {
        if let Some(p) = req.headers().get("sec-websocket-protocol") {
            resp.headers_mut()
                .insert("sec-websocket-protocol", p.clone());
        }
        Ok(resp)
    };
    let mut ws = tungstenite::accept_hdr(stream, echo_protocol)?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let mut reply = Vec::with_capacity(64);
    let mut mqtt5 = false;
    loop {
        let payload = match ws.read()? {
            Message::Binary(b) => b,
            Message::Close(_) => return Ok(()),
            _ => continue,
        };
        buf.extend_from_slice(&payload);
        let mut pos = 0;
        while let Some(h) = parse_header(&buf[pos..])? {
            let total = h.header_len + h.remaining;
            if pos + total > buf.len() {
                break;
            }
            let packet = &buf[pos..pos + total];
            if h.first >> 4 == 3 {
                out.extend_from_slice(packet);
            } else {
                reply.clear();
                let go_on = answer(packet, h, &mut mqtt5, &mut reply);
                out.extend_from_slice(&reply);
                if !go_on {
                    return Ok(());
                }
            }
            pos += total;
        }
        buf.drain(..pos);
        if !out.is_empty() {
            ws.send(Message::Binary(Bytes::copy_from_slice(&out)))?;
            out.clear();
        }
    }
}

/// A connected MQTT-over-WebSocket client session (CONNACK read), over TLS when `tls`.
fn connect(addr: SocketAddr, client_id: &str, tls: bool) -> anyhow::Result<WsSession> {
    let tcp = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connect to {addr}"))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
    let (scheme, stream): (&str, Box<dyn Io>) = if tls {
        let connection = rustls::ClientConnection::new(
            crate::tls::wss_client_config(),
            ServerName::try_from("localhost")?,
        )?;
        ("wss", Box::new(rustls::StreamOwned::new(connection, tcp)))
    } else {
        ("ws", Box::new(tcp))
    };
    let request =
        tungstenite::ClientRequestBuilder::new(format!("{scheme}://{addr}/mqtt").parse()?)
            .with_sub_protocol("mqtt");
    let (ws, _) =
        tungstenite::client(request, stream).map_err(|e| anyhow::anyhow!("upgrade: {e}"))?;
    let mut session = WsSession {
        ws,
        received: Vec::new(),
    };
    session.send(&connect_v311(client_id))?;
    let connack = session.take(4)?;
    if connack != [0x20, 0x02, 0x00, 0x00] {
        bail!("answered {connack:02x?} instead of a CONNACK");
    }
    Ok(session)
}

struct WsSession {
    ws: WebSocket<Box<dyn Io>>,
    received: Vec<u8>,
}

impl WsSession {
    fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.ws
            .send(Message::Binary(Bytes::copy_from_slice(bytes)))?;
        Ok(())
    }

    /// Reads one more message's payload into `received`; its length.
    fn read_some(&mut self) -> anyhow::Result<usize> {
        loop {
            match self.ws.read()? {
                Message::Binary(b) => {
                    self.received.extend_from_slice(&b);
                    return Ok(b.len());
                }
                Message::Close(_) => bail!("closed by the path"),
                _ => {}
            }
        }
    }

    fn take(&mut self, n: usize) -> anyhow::Result<Vec<u8>> {
        while self.received.len() < n {
            self.read_some()?;
        }
        Ok(self.received.drain(..n).collect())
    }
}

/// Round-trip latency of one PUBLISH at a time, in µs: (p50, p99).
fn latency(addr: SocketAddr, tls: bool, round_trips: usize) -> anyhow::Result<(f64, f64)> {
    let mut s = connect(addr, "ws-latency", tls)?;
    let packet = publish_qos0("bench/ws", &[0xa5; PUBLISH_SIZE_PAYLOAD]);
    let mut samples = Vec::with_capacity(round_trips);
    for i in 0..WARMUP + round_trips {
        let start = Instant::now();
        s.send(&packet)?;
        let back = s.take(packet.len())?;
        let took = start.elapsed();
        if back != packet {
            bail!("the echo differs from the PUBLISH sent");
        }
        if i >= WARMUP {
            samples.push(took.as_nanos() as u64);
        }
    }
    samples.sort_unstable();
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
    Ok((pick(0.5), pick(0.99)))
}

/// PUBLISHes (one per frame) with at most `window` unanswered, for `duration`: msg/s.
fn throughput(addr: SocketAddr, tls: bool, duration: Duration, window: u64) -> anyhow::Result<f64> {
    let mut s = connect(addr, "ws-stream", tls)?;
    let packet = publish_qos0("bench/ws", &[0x5a; PUBLISH_SIZE_PAYLOAD]);
    let size = packet.len() as u64;
    let frame = Message::Binary(Bytes::from(packet));
    let (mut sent, mut echoed_bytes) = (0u64, 0u64);
    let start = Instant::now();
    let end = start + duration;
    // Bounded by the duration: each turn either sends or reads one message (IO_TIMEOUT).
    while Instant::now() < end {
        while sent - echoed_bytes / size < window {
            s.ws.write(frame.clone())?;
            sent += 1;
        }
        s.ws.flush()?;
        echoed_bytes += s.read_some()? as u64;
        s.received.clear();
    }
    while echoed_bytes < sent * size {
        echoed_bytes += s.read_some()? as u64;
        s.received.clear();
    }
    Ok(sent as f64 / start.elapsed().as_secs_f64())
}

/// A started path: where the client connects, and what keeps it alive.
struct Started {
    listen: SocketAddr,
    _proxy: Option<ChildProxy>,
    _tcp_broker: Option<EchoBroker>,
    _ws_broker: Option<WsEchoBroker>,
}

fn start(path: WsPath, mqsplice: &Path, nginx: Option<&NginxTool>) -> anyhow::Result<Started> {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    match path {
        WsPath::Direct => {
            let broker = WsEchoBroker::start()?;
            Ok(Started {
                listen: broker.addr,
                _proxy: None,
                _tcp_broker: None,
                _ws_broker: Some(broker),
            })
        }
        WsPath::Mqsplice | WsPath::MqspliceWss => {
            let broker = EchoBroker::start()?;
            let stats: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
            let dir = temp_dir("mqsplice-ws")?;
            let (kind, tls) = if path.tls() {
                let (cert, key) = crate::tls::write_ecdsa_certificate(&dir)?;
                (
                    "wss",
                    format!(
                        "tls = {{ cert = \"{}\", key = \"{}\" }}\n",
                        cert.display(),
                        key.display()
                    ),
                )
            } else {
                ("ws", String::new())
            };
            let file = dir.join("mqsplice.toml");
            std::fs::write(
                &file,
                format!(
                    "[stats]\nlisten = \"{stats}\"\n[log]\naccess = \"off\"\n[[upstream]]\nname = \"echo\"\nservers = [{{ addr = \"{}\" }}]\n[[listener]]\nname = \"ws\"\nkind = \"{kind}\"\nlisten = \"{listen}\"\nupstream = \"echo\"\n{tls}",
                    broker.addr
                ),
            )?;
            let mut command = Command::new(mqsplice);
            command
                .args(["--log-level", "warn", "run", "--config"])
                .arg(&file);
            let proxy = ChildProxy::spawn(command, dir, stats, false)?;
            Ok(Started {
                listen,
                _proxy: Some(proxy),
                _tcp_broker: Some(broker),
                _ws_broker: None,
            })
        }
        WsPath::Nginx | WsPath::NginxWss => {
            let nginx = nginx.context("nginx not available")?;
            let broker = WsEchoBroker::start()?;
            let dir = temp_dir("nginx-ws")?;
            let d = dir.display();
            // TLS as in the TLS bench (same protocols, a session cache), in the http block.
            let listen_line = if path.tls() {
                let (cert, key) = crate::tls::write_ecdsa_certificate(&dir)?;
                format!(
                    "listen {listen} ssl;
        ssl_certificate {};
        ssl_certificate_key {};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_timeout 10m;",
                    cert.display(),
                    key.display()
                )
            } else {
                format!("listen {listen};")
            };
            // The guide's WebSocket location, with one worker per CPU as in the stream bench.
            let config = format!(
                "daemon off;
master_process on;
worker_processes auto;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};
    upstream ws_brokers {{ server {broker}; }}
    server {{
        {listen_line}
        location /mqtt {{
            proxy_pass http://ws_brokers;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection \"upgrade\";
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 600s;
        }}
    }}
}}
",
                broker = broker.addr
            );
            let file = dir.join("nginx.conf");
            std::fs::write(&file, config)?;
            let mut command = Command::new(&nginx.binary);
            command
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&file)
                .arg("-e")
                .arg(dir.join("error.log"));
            let proxy = ChildProxy::spawn(command, dir, listen, true)?;
            Ok(Started {
                listen,
                _proxy: Some(proxy),
                _tcp_broker: None,
                _ws_broker: Some(broker),
            })
        }
    }
}

/// One path's figures over the rounds.
#[derive(Debug, Default)]
struct Figures {
    p50: Vec<f64>,
    p99: Vec<f64>,
    msgs: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the comparison: `rounds` rounds, the paths interleaved; prints a markdown table and
/// returns the JSON figures.
pub fn compare(
    mqsplice: &Path,
    nginx: Option<&NginxTool>,
    rounds: usize,
    round_trips: usize,
    stream: Duration,
    window: u64,
) -> Value {
    let mut paths = vec![WsPath::Direct, WsPath::Mqsplice];
    if nginx.is_some() {
        paths.push(WsPath::Nginx);
    } else {
        println!("skipping nginx-ws and nginx-wss: nginx is not installed");
    }
    paths.push(WsPath::MqspliceWss);
    if nginx.is_some() {
        paths.push(WsPath::NginxWss);
    }
    let mut figures: Vec<Figures> = paths.iter().map(|_| Figures::default()).collect();
    let mut failures = Vec::new();
    for round in 1..=rounds {
        for i in 0..paths.len() {
            let k = (i + round - 1) % paths.len();
            let path = paths[k];
            let outcome = start(path, mqsplice, nginx).and_then(|started| {
                let tls = path.tls();
                let (p50, p99) = latency(started.listen, tls, round_trips).context("latency")?;
                let msgs = throughput(started.listen, tls, stream, window).context("stream")?;
                Ok((p50, p99, msgs))
            });
            match outcome {
                Ok((p50, p99, msgs)) => {
                    figures[k].p50.push(p50);
                    figures[k].p99.push(p99);
                    figures[k].msgs.push(msgs);
                }
                Err(e) => {
                    eprintln!("{} round {round}: {e:#}", path.name());
                    failures.push(format!("{} round {round}: {e:#}", path.name()));
                }
            }
        }
    }
    let bytes = publish_qos0("bench/ws", &[0; PUBLISH_SIZE_PAYLOAD]).len() as f64;
    println!(
        "\n### MQTT over WebSocket ({rounds} rounds, medians; {}-byte PUBLISH, one per frame; stream window {window})\n",
        bytes
    );
    println!("| path | RTT p50 µs | RTT p99 µs | msg/s | MB/s |");
    println!("| --- | --- | --- | --- | --- |");
    let mut out = serde_json::Map::new();
    for (path, f) in paths.iter().zip(&figures) {
        let (p50, p99, msgs) = (median(&f.p50), median(&f.p99), median(&f.msgs));
        println!(
            "| {} | {p50:.1} | {p99:.1} | {msgs:.0} | {:.1} |",
            path.name(),
            msgs * bytes / 1e6
        );
        out.insert(
            path.name().into(),
            json!({"p50_us": p50, "p99_us": p99, "msgs_per_s": msgs, "samples": f.msgs.len()}),
        );
    }
    json!({"paths": out, "failures": failures, "rounds": rounds})
}
