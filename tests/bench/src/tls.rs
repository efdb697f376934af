//! `bench --tls`: the server's CPU per TLS handshake (full and resumed; ECDSA P-256 and RSA-2048
//! certificates) and TLS throughput, mqsplice against NGINX's stream `ssl` with the same
//! certificate.
//!
//! A "handshake" is an MQTT session's start over TLS: TCP connect, TLS handshake, CONNECT,
//! CONNACK (so each server also connects to the broker), close. The server runs pinned to CPU 0 with one worker (mqsplice `--worker-threads 1`, NGINX
//! `worker_processes 1`), the load generator pinned to CPU 1 with a no-op certificate verifier
//! and X25519 only (what both servers then use), so the client spends as little as it can. The
//! server's CPU comes from its own threads' `schedstat` over the measurement. A handshake rate is
//! reported only where the server's core was at least 95% busy: below that, the client was the
//! limit and the rate says nothing about the server.

use crate::broker::EchoBroker;
use crate::load::publish_with_payload;
use crate::paths::{NginxTool, Tools};
use crate::procfs::process_tree;
use anyhow::{Context, bail};
use mqsplice_tests::free_port;
use mqsplice_tests::raw::connect_v311;
use rcgen::{CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, HandshakeKind};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Server core share below which a handshake rate is not reported.
const BUSY_FLOOR: f64 = 0.95;
/// Time before each measurement in which the load runs unmeasured.
const WARMUP: Duration = Duration::from_millis(500);

/// `--tls-rounds`, `--tls-seconds`, `--tls-clients`, `--tls-mib`.
#[derive(Debug, Clone)]
pub struct TlsArgs {
    pub rounds: usize,
    pub seconds: Duration,
    pub clients: usize,
    pub mib: usize,
}

/// The certificate's key type.
#[derive(Debug, Clone, Copy)]
enum KeyKind {
    EcdsaP256,
    Rsa2048,
}

impl KeyKind {
    fn name(self) -> &'static str {
        match self {
            KeyKind::EcdsaP256 => "ECDSA P-256",
            KeyKind::Rsa2048 => "RSA-2048",
        }
    }

    fn key(self) -> anyhow::Result<KeyPair> {
        Ok(match self {
            KeyKind::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
            // RSA key generation comes from aws-lc-rs (rcgen's `aws_lc_rs` feature): 2048 bits.
            KeyKind::Rsa2048 => KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)?,
        })
    }
}

/// A server certificate for `localhost` (self-issued by a throwaway CA) in `dir`.
fn write_certificate(dir: &Path, kind: KeyKind) -> anyhow::Result<(PathBuf, PathBuf)> {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "bench CA");
    let ca = ca.self_signed(&ca_key)?;
    let key = kind.key()?;
    let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse()?));
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    let stem = match kind {
        KeyKind::EcdsaP256 => "ecdsa",
        KeyKind::Rsa2048 => "rsa",
    };
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    std::fs::write(&cert_path, format!("{}{}", cert.pem(), ca.pem()))?;
    std::fs::write(&key_path, key.serialize_pem())?;
    Ok((cert_path, key_path))
}

/// Accepts any server certificate and signature: the generator must not spend its core on
/// checks the server does not make.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The generator's client: TLS 1.3, X25519, ALPN `mqtt`, resumption on or off.
fn client_config(resume: bool) -> Arc<ClientConfig> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let provider = Arc::new(provider);
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"mqtt".to_vec()];
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(config)
}

/// A server certificate for `localhost` and 127.0.0.1 with an ECDSA P-256 key in `dir`
/// (chain file, key file), for the WebSocket comparison's wss paths.
pub fn write_ecdsa_certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    write_certificate(dir, KeyKind::EcdsaP256)
}

/// The generator's client as a browser offers itself on wss: ALPN `http/1.1`, resumption on.
pub fn wss_client_config() -> Arc<ClientConfig> {
    let mut config = Arc::unwrap_or_clone(client_config(true));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

fn server_name() -> ServerName<'static> {
    ServerName::try_from("localhost").expect("valid name")
}

/// One MQTT session over TLS: the handshake, a CONNECT and its CONNACK (so both servers also
/// open their broker connection, as they do for every real client), then close_notify and a
/// read to EOF (which also takes in the TLS 1.3 tickets); true when the handshake resumed.
fn handshake_once(addr: SocketAddr, config: &Arc<ClientConfig>) -> anyhow::Result<bool> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut conn = ClientConnection::new(config.clone(), server_name())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
    let mut stream = rustls::Stream::new(&mut conn, &mut tcp);
    stream.write_all(&connect_v311("tls-handshake"))?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack)?;
    if connack[0] != 0x20 {
        bail!("answered {connack:02x?} instead of a CONNACK");
    }
    stream.conn.send_close_notify();
    stream.flush()?;
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => continue,
        }
    }
    Ok(resumed)
}

/// CPU time of a process tree, every thread, in nanoseconds (from `schedstat`).
fn tree_cpu_ns(root: u32) -> u64 {
    process_tree(root)
        .iter()
        .flat_map(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
        })
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A server under test, pinned to CPU 0.
struct Server {
    name: &'static str,
    child: Child,
    listen: SocketAddr,
    dir: PathBuf,
    _broker: EchoBroker,
}

impl Drop for Server {
    fn drop(&mut self) {
        crate::procfs::signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_listening(child: &mut Child, addr: SocketAddr, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_mqsplice(tools: &Tools, cert: &Path, key: &Path) -> anyhow::Result<Server> {
    let broker = EchoBroker::start()?;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let dir = std::env::temp_dir().join(format!("mqsplice-bench-tls-{}", free_port()));
    std::fs::create_dir_all(&dir)?;
    let config = format!(
        r#"[stats]
listen = "off"
[log]
access = "off"
[[upstream]]
name = "echo"
servers = [{{ addr = "{echo}" }}]
[[listener]]
name = "mqtts"
kind = "tls"
listen = "{listen}"
upstream = "echo"
tls = {{ cert = "{cert}", key = "{key}", session_timeout = "10m" }}
"#,
        echo = broker.addr,
        cert = cert.display(),
        key = key.display(),
    );
    let file = dir.join("mqsplice.toml");
    std::fs::write(&file, config)?;
    let log = dir.join("output.log");
    let mut child = Command::new("taskset")
        .args(["-c", "0"])
        .arg(&tools.mqsplice)
        .args([
            "--log-level",
            "warn",
            "run",
            "--worker-threads",
            "1",
            "--config",
        ])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("taskset mqsplice")?;
    wait_listening(&mut child, listen, &log)?;
    Ok(Server {
        name: "mqsplice",
        child,
        listen,
        dir,
        _broker: broker,
    })
}

fn start_nginx(nginx: &NginxTool, cert: &Path, key: &Path) -> anyhow::Result<Server> {
    let broker = EchoBroker::start()?;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let dir = std::env::temp_dir().join(format!("mqsplice-bench-tls-nginx-{}", free_port()));
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    let config = format!(
        "{load}
daemon off;
master_process on;
worker_processes 1;
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 8192; }}
stream {{
    upstream b {{ server {echo}; }}
    server {{
        listen {listen} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_timeout 10m;
        proxy_pass b;
    }}
}}
",
        load = nginx.load_module,
        echo = broker.addr,
        cert = cert.display(),
        key = key.display(),
    );
    let file = dir.join("nginx.conf");
    std::fs::write(&file, config)?;
    let log = dir.join("error.log");
    let mut child = Command::new("taskset")
        .args(["-c", "0"])
        .arg(&nginx.binary)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&file)
        .arg("-e")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("taskset nginx")?;
    wait_listening(&mut child, listen, &log)?;
    Ok(Server {
        name: "nginx",
        child,
        listen,
        dir,
        _broker: broker,
    })
}

/// Handshakes from `clients` threads for `duration` after a warm-up: (handshakes, resumed,
/// server CPU ns, wall ns).
fn handshake_load(
    server: &Server,
    resume: bool,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<(u64, u64, u64, u64)> {
    let config = client_config(resume);
    let done = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (config, done, resumed, errors, stop) = (
                config.clone(),
                done.clone(),
                resumed.clone(),
                errors.clone(),
                stop.clone(),
            );
            let addr = server.listen;
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    match handshake_once(addr, &config) {
                        Ok(r) => {
                            done.fetch_add(1, Relaxed);
                            if r {
                                resumed.fetch_add(1, Relaxed);
                            }
                        }
                        Err(_) => {
                            errors.fetch_add(1, Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(WARMUP);
    let (d0, r0, c0, t0) = (
        done.load(Relaxed),
        resumed.load(Relaxed),
        tree_cpu_ns(server.child.id()),
        Instant::now(),
    );
    std::thread::sleep(duration);
    let (d1, r1, c1, wall) = (
        done.load(Relaxed),
        resumed.load(Relaxed),
        tree_cpu_ns(server.child.id()),
        t0.elapsed(),
    );
    stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let errors = errors.load(Relaxed);
    if errors > (d1 - d0) / 100 {
        bail!("{errors} failed handshakes against {}", server.name);
    }
    Ok((d1 - d0, r1 - r0, c1 - c0, wall.as_nanos() as u64))
}

/// One TLS connection streaming `mib` MiB of 1 KiB PUBLISHes through to the echo broker and
/// reading every echo back: (MB/s, server CPU ns, wall ns, bytes each way).
fn throughput(server: &Server, mib: usize) -> anyhow::Result<(f64, u64, u64, u64)> {
    let publish = publish_with_payload(1024);
    let count = (mib << 20) / publish.len();
    let total = (count * publish.len()) as u64;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(server.listen).await?;
        tcp.set_nodelay(true)?;
        let mut tls = tokio_rustls::TlsConnector::from(client_config(false))
            .connect(server_name(), tcp)
            .await?;
        tls.write_all(&connect_v311("tls-bench")).await?;
        let mut connack = [0u8; 4];
        tls.read_exact(&mut connack).await?;
        let (mut reader, mut writer) = tokio::io::split(tls);
        let cpu0 = tree_cpu_ns(server.child.id());
        let t0 = Instant::now();
        let batch: Vec<u8> = publish.repeat(16);
        let write = async {
            let mut left = count;
            while left >= 16 {
                writer.write_all(&batch).await?;
                left -= 16;
            }
            for _ in 0..left {
                writer.write_all(&publish).await?;
            }
            writer.flush().await?;
            anyhow::Ok(writer)
        };
        let read = async {
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            while got < total {
                let n = reader.read(&mut buf).await?;
                if n == 0 {
                    bail!("closed after {got} of {total} bytes");
                }
                got += n as u64;
            }
            anyhow::Ok(())
        };
        let (writer, ()) = tokio::time::timeout(Duration::from_secs(120), async {
            tokio::try_join!(write, read)
        })
        .await
        .context("throughput stalled")??;
        let wall = t0.elapsed();
        let cpu = tree_cpu_ns(server.child.id()) - cpu0;
        drop(writer);
        Ok((
            total as f64 / wall.as_secs_f64() / 1e6,
            cpu,
            wall.as_nanos() as u64,
            total,
        ))
    })
}

/// Pins the calling thread (and every thread it starts later) to `cpu`.
fn pin_to(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: `cpu_set_t` is plain data for which all-zero is the empty set; CPU_SET writes
    // within it, and sched_setaffinity only reads the set we pass with its exact size.
    #[allow(unsafe_code)]
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!(
            "sched_setaffinity to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The median of `values` (the upper one of an even count).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One measurement of a server with a certificate: handshakes and throughput.
#[derive(Debug, Clone, Default)]
struct Round {
    /// Per mode (full, resumed): handshakes, resumed, server CPU ns, wall ns.
    handshakes: Vec<(u64, u64, u64, u64)>,
    /// MB/s, server CPU ns, wall ns, bytes.
    throughput: (f64, u64, u64, u64),
}

fn measure(
    tools: &Tools,
    args: &TlsArgs,
    name: &str,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<Round> {
    let server = match name {
        "mqsplice" => start_mqsplice(tools, cert, key)?,
        _ => start_nginx(
            tools.nginx.as_ref().context("nginx not available")?,
            cert,
            key,
        )?,
    };
    let mut round = Round::default();
    for resume in [false, true] {
        round
            .handshakes
            .push(handshake_load(&server, resume, args.clients, args.seconds)?);
    }
    round.throughput = throughput(&server, args.mib)?;
    Ok(round)
}

/// Runs the whole TLS benchmark (`rounds` interleaved rounds, a fresh server each time, medians)
/// and prints its tables; the JSON goes to `out`.
pub fn run(tools: &Tools, args: &TlsArgs, out: &Path) -> anyhow::Result<()> {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        bail!("the TLS bench needs two CPUs (server on CPU 0, load on CPU 1)");
    }
    pin_to(1)?;
    let dir = std::env::temp_dir().join(format!("mqsplice-bench-tls-pki-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut servers: Vec<&'static str> = vec!["mqsplice"];
    if tools.nginx.is_some() {
        servers.push("nginx");
    }
    let mut rows: Vec<Value> = Vec::new();
    let mut table = String::from(
        "| server | certificate | handshake | server CPU µs/session start | server core busy | sessions/s | resumed |\n|---|---|---|---:|---:|---:|---:|\n",
    );
    let mut throughput_table = String::from(
        "| server | certificate | MB/s each way | server CPU s/GB | server core busy |\n|---|---|---:|---:|---:|\n",
    );
    for kind in [KeyKind::EcdsaP256, KeyKind::Rsa2048] {
        let (cert, key) = write_certificate(&dir, kind)?;
        let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); servers.len()];
        for r in 0..args.rounds {
            // Alternate which server goes first, so neither always runs on a warmer machine.
            for i in 0..servers.len() {
                let at = (i + r) % servers.len();
                let name = servers[at];
                let round = measure(tools, args, name, &cert, &key)
                    .with_context(|| format!("{name} {} round {}", kind.name(), r + 1))?;
                let (n, _, cpu, _) = round.handshakes[0];
                eprintln!(
                    "round {}/{} {name} {}: full {:.1} µs/session, resumed {:.1} µs/session, {:.0} MB/s",
                    r + 1,
                    args.rounds,
                    kind.name(),
                    cpu as f64 / n.max(1) as f64 / 1e3,
                    {
                        let (n, _, cpu, _) = round.handshakes[1];
                        cpu as f64 / n.max(1) as f64 / 1e3
                    },
                    round.throughput.0
                );
                rounds[at].push(round);
            }
        }
        for (name, rounds) in servers.iter().zip(&rounds) {
            for (m, mode) in ["full", "resumed"].into_iter().enumerate() {
                let samples: Vec<(u64, u64, u64, u64)> =
                    rounds.iter().map(|r| r.handshakes[m]).collect();
                let per = median(
                    &mut samples
                        .iter()
                        .map(|(n, _, cpu, _)| *cpu as f64 / (*n).max(1) as f64 / 1e3)
                        .collect::<Vec<_>>(),
                );
                let busy = median(
                    &mut samples
                        .iter()
                        .map(|(_, _, cpu, wall)| *cpu as f64 / *wall as f64)
                        .collect::<Vec<_>>(),
                );
                // A rate only from rounds whose server core was busy enough.
                let mut rates: Vec<f64> = samples
                    .iter()
                    .filter(|(_, _, cpu, wall)| *cpu as f64 / *wall as f64 >= BUSY_FLOOR)
                    .map(|(n, _, _, wall)| *n as f64 / (*wall as f64 / 1e9))
                    .collect();
                let rate = (!rates.is_empty()).then(|| median(&mut rates));
                let shown_rate = rate.map_or_else(
                    || format!("– (core {:.0}% busy)", busy * 100.0),
                    |r| format!("{r:.0}"),
                );
                let (n, resumed) = samples.iter().fold((0, 0), |(n, r), s| (n + s.0, r + s.1));
                table.push_str(&format!(
                    "| {name} | {} | {mode} | {per:.1} | {:.0}% | {shown_rate} | {resumed}/{n} |\n",
                    kind.name(),
                    busy * 100.0
                ));
                rows.push(json!({
                    "server": name, "certificate": kind.name(), "handshake": mode,
                    "cpu_us_per_session_start": per, "busy": busy, "rate_per_s": rate,
                    "sessions": n, "resumed": resumed,
                    "samples": samples.iter().map(|s| json!({
                        "sessions": s.0, "resumed": s.1, "server_cpu_ns": s.2, "wall_ns": s.3
                    })).collect::<Vec<_>>(),
                }));
            }
            let mb_s = median(&mut rounds.iter().map(|r| r.throughput.0).collect::<Vec<_>>());
            let s_per_gb = median(
                &mut rounds
                    .iter()
                    .map(|r| r.throughput.1 as f64 / r.throughput.3 as f64)
                    .collect::<Vec<_>>(),
            );
            let busy = median(
                &mut rounds
                    .iter()
                    .map(|r| r.throughput.1 as f64 / r.throughput.2 as f64)
                    .collect::<Vec<_>>(),
            );
            throughput_table.push_str(&format!(
                "| {name} | {} | {mb_s:.0} | {s_per_gb:.2} | {:.0}% |\n",
                kind.name(),
                busy * 100.0
            ));
            rows.push(json!({
                "server": name, "certificate": kind.name(), "throughput_mb_s": mb_s,
                "server_cpu_s_per_gb": s_per_gb, "busy": busy,
            }));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "## TLS (medians of {} rounds; {} s per handshake measurement, {} client threads on CPU 1, server on CPU 0 with one worker; TLS 1.3, X25519)\n\n{table}\n{throughput_table}",
        args.rounds,
        args.seconds.as_secs_f64(),
        args.clients
    );
    std::fs::create_dir_all(out)?;
    let file = out.join("tls.json");
    std::fs::write(
        &file,
        serde_json::to_string_pretty(&json!({ "rows": rows }))?,
    )?;
    eprintln!("wrote {}", file.display());
    Ok(())
}
