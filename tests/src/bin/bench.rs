//! `cargo xtask bench`: mqsplice against the proxies it replaces, side by side in one run.
//!
//! Four paths from a client to an echo "broker" on loopback: `direct`, `mqsplice` (the built
//! binary from `MQSPLICE_BIN`, userspace data path), `nginx` (stream proxy) and `haproxy`
//! (`mode tcp`). For each: round-trip latency of a 64-byte QoS 0 PUBLISH, bulk throughput,
//! CPU per GB (whole machine and the proxy's own processes), and the proxy's memory with one
//! connection and per idle connection. Rounds interleave the paths so that drift in the machine
//! (other load, frequency, caches) spreads over all of them; medians are reported as a markdown
//! table on stdout and as JSON in `target/bench/bench.json`.
//!
//! Flags: `--rounds N`, `--round-trips N`, `--bulk-mib N`, `--idle-conns N`, `--quick`.

use anyhow::{Context, bail};
use mqsplice_tests::daemon::Daemon;
use mqsplice_tests::free_port;
use mqsplice_tests::raw::{connect_v311, publish_qos0};
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The CONNACK the echo broker answers every CONNECT with (session not present, accepted).
const CONNACK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];
/// Size of the PUBLISH packet bounced in the latency phase, header included.
const PUBLISH_SIZE: usize = 64;
/// Read/write timeout on every socket: no blocking call of the benchmark can hang for longer.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Wall-clock budget of one measurement phase; a phase past it stops and reports an error.
const PHASE_LIMIT: Duration = Duration::from_secs(180);
/// Time a proxy gets to start listening.
const START_LIMIT: Duration = Duration::from_secs(10);
/// Chunk written and read per call in the bulk phase.
const BULK_CHUNK: usize = 64 * 1024;
/// Round trips made before the timed ones, so connection setup and cold caches stay out of
/// the percentiles.
const WARMUP_ROUND_TRIPS: usize = 200;

/// Benchmark sizes, from the command line.
#[derive(Debug, Clone)]
struct Args {
    rounds: usize,
    round_trips: usize,
    bulk_mib: u64,
    idle_conns: usize,
}

impl Args {
    /// Parses `std::env::args`; `--quick` sets small sizes, later flags still override them.
    fn parse() -> anyhow::Result<Args> {
        let mut args = Args {
            rounds: 5,
            round_trips: 20_000,
            bulk_mib: 512,
            idle_conns: 1000,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = |name: &str| -> anyhow::Result<u64> {
                let v = it.next().with_context(|| format!("{name} needs a value"))?;
                let n: u64 = v
                    .parse()
                    .with_context(|| format!("{name} {v}: not a whole number"))?;
                if n == 0 {
                    bail!("{name} must be at least 1");
                }
                Ok(n)
            };
            match flag.as_str() {
                "--rounds" => args.rounds = value("--rounds")? as usize,
                "--round-trips" => args.round_trips = value("--round-trips")? as usize,
                "--bulk-mib" => args.bulk_mib = value("--bulk-mib")?,
                "--idle-conns" => args.idle_conns = value("--idle-conns")? as usize,
                "--quick" => {
                    args.rounds = 1;
                    args.round_trips = 2000;
                    args.bulk_mib = 64;
                    args.idle_conns = 200;
                }
                "-h" | "--help" => {
                    println!(
                        "usage: bench [--rounds N] [--round-trips N] [--bulk-mib N] \
                         [--idle-conns N] [--quick]\n(MQSPLICE_BIN must name the built mqsplice)"
                    );
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?} (try --help)"),
            }
        }
        Ok(args)
    }

    /// Bytes moved in the bulk phase.
    fn bulk_bytes(&self) -> u64 {
        self.bulk_mib * 1024 * 1024
    }
}

// ---------------------------------------------------------------------------------------------
// The echo broker
// ---------------------------------------------------------------------------------------------

/// A loopback "broker" that answers the CONNECT with a CONNACK and then echoes every byte, one
/// thread per connection: blocking reads wake the fastest, so the broker adds as little as
/// possible to what is measured. Shared by every path of the run.
struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    /// Binds a free loopback port and accepts on a background thread.
    fn start() -> io::Result<EchoServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("echo-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    // Small stacks: the idle phase holds a thousand of these threads.
                    let _ = std::thread::Builder::new()
                        .stack_size(128 * 1024)
                        .spawn(move || {
                            let _ = echo_connection(stream);
                        });
                }
            })?;
        Ok(EchoServer { addr, stop })
    }
}

impl Drop for EchoServer {
    /// Stops accepting: sets the flag, then wakes the blocked `accept` with one connection.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// Serves one connection: reads a complete CONNECT, answers CONNACK, echoes until EOF.
fn echo_connection(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    // Idle connections are held for the memory phase, far shorter than this.
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut first = [0u8; 1];
    stream.read_exact(&mut first)?;
    if first[0] != 0x10 {
        return Err(io::Error::other("not a CONNECT"));
    }
    let mut remaining = 0usize;
    for shift in 0..4 {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte)?;
        remaining |= ((byte[0] & 0x7f) as usize) << (7 * shift);
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    if remaining > 64 * 1024 {
        return Err(io::Error::other("CONNECT too large"));
    }
    let mut body = vec![0u8; remaining];
    stream.read_exact(&mut body)?;
    stream.write_all(&CONNACK)?;
    let mut buf = vec![0u8; BULK_CHUNK];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// Connects to `addr` as an MQTT client: TCP_NODELAY, bounded timeouts, CONNECT, and the
/// CONNACK checked byte for byte (so a proxy that mangles the handshake fails loudly).
fn mqtt_connect(addr: SocketAddr, client_id: &str) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(&connect_v311(client_id))?;
    let mut connack = [0u8; 4];
    stream
        .read_exact(&mut connack)
        .with_context(|| format!("CONNACK from {addr}"))?;
    if connack != CONNACK {
        bail!("{addr} answered {connack:02x?} instead of a CONNACK");
    }
    Ok(stream)
}

/// A QoS 0 PUBLISH of exactly [`PUBLISH_SIZE`] bytes.
fn publish_packet() -> Vec<u8> {
    let topic = "bench/latency";
    // Fixed header (2 bytes: type, one-byte length) and topic (2-byte length + name).
    let payload = vec![0xa5u8; PUBLISH_SIZE - 2 - 2 - topic.len()];
    let packet = publish_qos0(topic, &payload);
    assert_eq!(packet.len(), PUBLISH_SIZE);
    packet
}

/// Latency phase: round trips of one PUBLISH; returns (p50, p99) in microseconds.
fn measure_latency(addr: SocketAddr, round_trips: usize) -> anyhow::Result<(f64, f64)> {
    let mut stream = mqtt_connect(addr, "bench-latency")?;
    let packet = publish_packet();
    let mut back = vec![0u8; packet.len()];
    let deadline = Instant::now() + PHASE_LIMIT;
    let mut samples = Vec::with_capacity(round_trips);
    for i in 0..WARMUP_ROUND_TRIPS + round_trips {
        if Instant::now() > deadline {
            bail!("latency phase passed {PHASE_LIMIT:?} after {i} round trips");
        }
        let start = Instant::now();
        stream.write_all(&packet)?;
        stream.read_exact(&mut back)?;
        let took = start.elapsed();
        if back != packet {
            bail!("echo returned different bytes");
        }
        if i >= WARMUP_ROUND_TRIPS {
            samples.push(took.as_nanos() as u64);
        }
    }
    samples.sort_unstable();
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
    Ok((pick(0.50), pick(0.99)))
}

/// What the bulk phase measured.
struct Bulk {
    mb_per_s: f64,
    machine_cpu_s: f64,
    proxy_cpu_s: Option<f64>,
}

/// Bulk phase: `bytes` written on one thread while the echo is read back on this one. CPU is
/// sampled around the transfer. Returns the still open connection, so the next phase measures
/// the proxy's memory with exactly this one connection.
fn measure_bulk(
    addr: SocketAddr,
    bytes: u64,
    proxy: &[u32],
    user_hz: f64,
) -> anyhow::Result<(Bulk, TcpStream)> {
    let mut reader = mqtt_connect(addr, "bench-bulk")?;
    let mut writer = reader.try_clone()?;
    let deadline = Instant::now() + PHASE_LIMIT;
    let machine_before = machine_cpu_ticks()?;
    let proxy_before = process_cpu_ticks(proxy);
    let start = Instant::now();
    let sender = std::thread::spawn(move || -> io::Result<()> {
        let chunk = vec![0x5au8; BULK_CHUNK];
        let mut left = bytes;
        while left > 0 {
            if Instant::now() > deadline {
                return Err(io::Error::other("bulk writer passed its time limit"));
            }
            let n = left.min(BULK_CHUNK as u64) as usize;
            writer.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    let mut buf = vec![0u8; BULK_CHUNK];
    let mut got = 0u64;
    let read_result = (|| -> anyhow::Result<()> {
        while got < bytes {
            if Instant::now() > deadline {
                bail!("bulk phase passed {PHASE_LIMIT:?} after {got} bytes");
            }
            let want = (bytes - got).min(BULK_CHUNK as u64) as usize;
            let n = reader.read(&mut buf[..want])?;
            if n == 0 {
                bail!("echo closed after {got} of {bytes} bytes");
            }
            got += n as u64;
        }
        Ok(())
    })();
    let elapsed = start.elapsed().as_secs_f64();
    let machine_after = machine_cpu_ticks()?;
    let proxy_after = process_cpu_ticks(proxy);
    if read_result.is_err() {
        // Unblock the writer before joining it.
        let _ = reader.shutdown(std::net::Shutdown::Both);
    }
    let sent = sender.join().expect("bulk writer panicked");
    read_result?;
    sent.context("bulk writer")?;
    let bulk = Bulk {
        mb_per_s: bytes as f64 / 1e6 / elapsed,
        machine_cpu_s: (machine_after - machine_before) as f64 / user_hz,
        proxy_cpu_s: match (proxy_before, proxy_after) {
            (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 / user_hz),
            _ => None,
        },
    };
    Ok((bulk, reader))
}

// ---------------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------------

/// Busy ticks of the whole machine: user + nice + system + irq + softirq from `/proc/stat`.
fn machine_cpu_ticks() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq ...
    if fields.len() < 7 {
        bail!("unexpected /proc/stat line {line:?}");
    }
    Ok(fields[0] + fields[1] + fields[2] + fields[5] + fields[6])
}

/// The fields of `/proc/PID/stat` after the command name (which may hold spaces), so index 0
/// is the state, 1 the ppid, 11 utime and 12 stime.
fn proc_stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Start time of a process in ticks since boot (field 22 of `/proc/PID/stat`), which tells a
/// process from a later one that got the same pid; `None` once it is gone or a zombie.
fn start_time(pid: u32) -> Option<u64> {
    let f = proc_stat_fields(pid)?;
    if f.first()? == "Z" {
        return None;
    }
    f.get(19)?.parse().ok()
}

/// `pid` and all its descendants (an NGINX master and its workers), found through the ppid
/// of every process in `/proc`.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(p) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if let Some(ppid) = proc_stat_fields(p).and_then(|f| f.get(1)?.parse().ok()) {
                children.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut tree = vec![pid];
    let mut queue = VecDeque::from([pid]);
    while let Some(p) = queue.pop_front() {
        for &c in children.get(&p).into_iter().flatten() {
            tree.push(c);
            queue.push_back(c);
        }
    }
    tree
}

/// utime + stime of the given processes, in ticks; `None` without processes or when one is
/// gone (a measurement across a crash is no measurement).
fn process_cpu_ticks(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().try_fold(0u64, |sum, &pid| {
        let f = proc_stat_fields(pid)?;
        Some(sum + f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    })
}

/// Sum of VmRSS of the given processes, in KiB.
fn rss_kib(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().try_fold(0u64, |sum, &pid| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()?;
        Some(sum + kib)
    })
}

/// USER_HZ, the unit of `/proc` CPU times (from `getconf CLK_TCK`; 100 on every Linux port
/// that matters, used when getconf is missing).
fn user_hz() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The soft limit on open files of this process, from `/proc/self/limits`.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The paths
// ---------------------------------------------------------------------------------------------

/// One path under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathKind {
    Direct,
    Mqsplice,
    Nginx,
    Haproxy,
}

impl PathKind {
    /// Every path, in table order.
    const ALL: [PathKind; 4] = [
        PathKind::Direct,
        PathKind::Mqsplice,
        PathKind::Nginx,
        PathKind::Haproxy,
    ];

    /// Name in the table and the JSON.
    fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Mqsplice => "mqsplice",
            PathKind::Nginx => "nginx",
            PathKind::Haproxy => "haproxy",
        }
    }
}

/// The third-party proxies found on this machine, decided once before the rounds (mqsplice
/// itself is started by the harness `Daemon` from `MQSPLICE_BIN`).
struct Tools {
    nginx: Option<NginxTool>,
    haproxy: Option<PathBuf>,
}

/// The nginx binary and the `load_module` line its stream module needs (empty when built in).
struct NginxTool {
    binary: PathBuf,
    load_module: String,
}

/// Finds `name` in PATH or the sbin directories (which a non-root PATH often lacks).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// nginx with its stream module, or why it cannot be benchmarked.
fn find_nginx() -> Result<NginxTool, String> {
    let binary = find_program("nginx").ok_or("nginx is not installed")?;
    let module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    if module.is_file() {
        return Ok(NginxTool {
            binary,
            load_module: format!("load_module {};", module.display()),
        });
    }
    // `nginx -V` prints its configure flags on stderr; a static stream module needs no line.
    let flags = Command::new(&binary)
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .unwrap_or_default();
    if flags.split_whitespace().any(|f| f == "--with-stream") {
        Ok(NginxTool {
            binary,
            load_module: String::new(),
        })
    } else {
        Err("the nginx stream module is not installed (libnginx-mod-stream)".into())
    }
}

/// A proxy started as a child process (nginx, haproxy) with its temporary directory. Dropping
/// it stops the whole process tree and removes the directory, also when a phase panicked.
struct ChildProxy {
    child: Child,
    dir: PathBuf,
    /// Every process seen in the tree, with its start time: if the master dies first, its
    /// workers are re-parented away and only this list still finds them; the start time makes
    /// sure a reused pid is never signalled.
    seen: Mutex<Vec<(u32, u64)>>,
}

impl ChildProxy {
    /// Spawns `command` (its output goes to `dir/output.log`) and waits until `listen` accepts.
    fn spawn(mut command: Command, dir: PathBuf, listen: SocketAddr) -> anyhow::Result<Self> {
        let log = std::fs::File::create(dir.join("output.log"))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {command:?}"))?;
        let mut proxy = ChildProxy {
            child,
            dir,
            seen: Mutex::new(Vec::new()),
        };
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Some(status) = proxy.child.try_wait()? {
                bail!("{command:?} exited with {status}:\n{}", proxy.logs());
            }
            if TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok() {
                proxy.tree();
                return Ok(proxy);
            }
            if Instant::now() > deadline {
                bail!(
                    "{command:?} did not listen on {listen} within {START_LIMIT:?}:\n{}",
                    proxy.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The current process tree, also remembered for `drop`.
    fn tree(&self) -> Vec<u32> {
        let tree = process_tree(self.child.id());
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for &pid in &tree {
            if let Some(start) = start_time(pid)
                && !seen.contains(&(pid, start))
            {
                seen.push((pid, start));
            }
        }
        tree
    }

    /// Everything the proxy wrote to its output and error log, for failure messages.
    fn logs(&self) -> String {
        ["output.log", "error.log"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(self.dir.join(f)).ok())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Sends `signal` to one process by id (`kill(1)`: this crate has no libc binding).
fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

impl Drop for ChildProxy {
    /// SIGTERM to the root (nginx and haproxy then stop their workers), a grace period, then
    /// SIGKILL to every process of the tree still alive: killing only the master would leave
    /// the workers running.
    fn drop(&mut self) {
        self.tree();
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let seen = std::mem::take(self.seen.get_mut().unwrap_or_else(|e| e.into_inner()));
        for (pid, start) in seen {
            if pid != self.child.id() && start_time(pid) == Some(start) {
                signal(pid, "KILL");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What runs between the client and the echo broker.
enum Proxy {
    None,
    Mqsplice(Daemon),
    Child(ChildProxy),
}

/// A started path: where clients connect, and the proxy behind that address.
struct Peer {
    listen: SocketAddr,
    proxy: Proxy,
}

impl Peer {
    /// The proxy's processes (empty for `direct`).
    fn pids(&self) -> Vec<u32> {
        match &self.proxy {
            Proxy::None => Vec::new(),
            Proxy::Mqsplice(d) => process_tree(d.child.id()),
            Proxy::Child(c) => c.tree(),
        }
    }
}

impl Drop for Peer {
    /// Removes the daemon's config directory; the `Daemon` guard itself kills the process.
    fn drop(&mut self) {
        if let Proxy::Mqsplice(d) = &self.proxy
            && let Some(dir) = d.config_path.parent()
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A fresh temporary directory for one proxy run.
fn temp_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "mqsplice-bench-{}-{name}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Starts `kind` in front of the echo broker at `echo`, sized for `conns` client connections
/// (nginx preallocates its connection table and haproxy raises its descriptor limit to fit
/// `maxconn`, so both get what the run needs rather than a huge constant that would inflate
/// their memory or exceed the descriptor limit).
fn start_peer(
    kind: PathKind,
    tools: &Tools,
    echo: SocketAddr,
    conns: usize,
) -> anyhow::Result<Peer> {
    // Each client connection is two descriptors in the proxy (client side, broker side).
    let slots = 2 * conns + 256;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let proxy = match kind {
        PathKind::Direct => {
            return Ok(Peer {
                listen: echo,
                proxy: Proxy::None,
            });
        }
        PathKind::Mqsplice => {
            let stats: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
            let config = format!(
                r#"[stats]
listen = "{stats}"
[dataplane]
mode = "userspace"
[log]
access = "off"
[[upstream]]
name = "echo"
servers = [{{ addr = "{echo}" }}]
[[listener]]
name = "mqtt"
kind = "tcp"
listen = "{listen}"
upstream = "echo"
"#
            );
            // Daemon::start waits for the stats port, bound after the MQTT listener.
            Proxy::Mqsplice(Daemon::start(&config, listen, stats))
        }
        PathKind::Nginx => {
            let nginx = tools.nginx.as_ref().context("nginx not available")?;
            let dir = temp_dir("nginx")?;
            let d = dir.display();
            let config = format!(
                "{load}
daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile {nofile};
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections {slots}; }}
stream {{
    upstream b {{ server {echo}; }}
    server {{ listen {listen}; proxy_pass b; }}
}}
",
                load = nginx.load_module,
                nofile = slots + 64,
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
            Proxy::Child(ChildProxy::spawn(command, dir, listen)?)
        }
        PathKind::Haproxy => {
            let haproxy = tools.haproxy.as_ref().context("haproxy not available")?;
            let dir = temp_dir("haproxy")?;
            let config = format!(
                "global
    maxconn {maxconn}
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend f
    bind {listen}
    default_backend b
backend b
    server echo {echo}
",
                maxconn = conns + 64,
            );
            let file = dir.join("haproxy.cfg");
            std::fs::write(&file, config)?;
            let mut command = Command::new(haproxy);
            command.arg("-db").arg("-f").arg(&file);
            Proxy::Child(ChildProxy::spawn(command, dir, listen)?)
        }
    };
    Ok(Peer { listen, proxy })
}

// ---------------------------------------------------------------------------------------------
// One measurement
// ---------------------------------------------------------------------------------------------

/// Every figure of one path in one round; the proxy figures are `None` for `direct`.
#[derive(Debug, Clone)]
struct Sample {
    p50_us: f64,
    p99_us: f64,
    mb_per_s: f64,
    machine_cpu_s_per_gb: f64,
    proxy_cpu_s_per_gb: Option<f64>,
    rss_1conn_kib: Option<f64>,
    kib_per_idle_conn: Option<f64>,
}

/// A reported metric: JSON key, table header, getter.
type Metric = (&'static str, &'static str, fn(&Sample) -> Option<f64>);

/// Table and JSON columns, one definition so the two never disagree.
const METRICS: [Metric; 7] = [
    ("p50_us", "p50 µs", |s| Some(s.p50_us)),
    ("p99_us", "p99 µs", |s| Some(s.p99_us)),
    ("mb_per_s", "bulk MB/s", |s| Some(s.mb_per_s)),
    ("machine_cpu_s_per_gb", "machine CPU s/GB", |s| {
        Some(s.machine_cpu_s_per_gb)
    }),
    ("proxy_cpu_s_per_gb", "proxy CPU s/GB", |s| {
        s.proxy_cpu_s_per_gb
    }),
    ("rss_1conn_kib", "proxy RSS 1 conn KiB", |s| s.rss_1conn_kib),
    ("kib_per_idle_conn", "KiB/idle conn", |s| {
        s.kib_per_idle_conn
    }),
];

/// Runs every phase against one started path.
fn measure(peer: &Peer, args: &Args, user_hz: f64) -> anyhow::Result<Sample> {
    let (p50_us, p99_us) = measure_latency(peer.listen, args.round_trips).context("latency")?;
    // Taken once a worker has served the latency connection, so every worker is in it.
    let pids = peer.pids();
    let bytes = args.bulk_bytes();
    let (bulk, bulk_conn) = measure_bulk(peer.listen, bytes, &pids, user_hz).context("bulk")?;
    let gb = bytes as f64 / 1e9;
    // Let the proxy finish freeing whatever the transfer used before reading its memory.
    std::thread::sleep(Duration::from_millis(200));
    let rss_1 = rss_kib(&pids);
    let mut idle = Vec::with_capacity(args.idle_conns);
    let deadline = Instant::now() + PHASE_LIMIT;
    for i in 0..args.idle_conns {
        if Instant::now() > deadline {
            bail!("idle phase passed {PHASE_LIMIT:?} after {i} connections");
        }
        idle.push(mqtt_connect(peer.listen, &format!("bench-idle-{i}")).context("idle")?);
    }
    std::thread::sleep(Duration::from_millis(200));
    let rss_n = rss_kib(&pids);
    drop(idle);
    drop(bulk_conn);
    // A proxy process that died (or was replaced) mid-round would make its CPU and memory
    // figures meaningless: fail the run rather than report them.
    if let Some(gone) = pids.iter().find(|&&pid| start_time(pid).is_none()) {
        bail!("proxy process {gone} exited during the measurement");
    }
    Ok(Sample {
        p50_us,
        p99_us,
        mb_per_s: bulk.mb_per_s,
        machine_cpu_s_per_gb: bulk.machine_cpu_s / gb,
        proxy_cpu_s_per_gb: bulk.proxy_cpu_s.map(|s| s / gb),
        rss_1conn_kib: rss_1.map(|k| k as f64),
        kib_per_idle_conn: match (rss_1, rss_n) {
            (Some(a), Some(b)) => Some((b as f64 - a as f64) / args.idle_conns as f64),
            _ => None,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// Median of the values present (mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// Median of every metric over a path's rounds, keyed by the metric's JSON name.
fn medians(samples: &[Sample]) -> HashMap<&'static str, Option<f64>> {
    METRICS
        .iter()
        .map(|(key, _, get)| (*key, median(samples.iter().filter_map(get).collect())))
        .collect()
}

/// A number for the table: few digits for large values, more for small ones.
fn fmt_value(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) if v.abs() >= 0.1 => format!("{v:.2}"),
        Some(v) => format!("{v:.4}"),
    }
}

/// `value / base`, when both exist and the base is not zero.
fn ratio(value: Option<f64>, base: Option<f64>) -> Option<f64> {
    match (value, base) {
        (Some(v), Some(b)) if b != 0.0 => Some(v / b),
        _ => None,
    }
}

/// The results of every path that ran.
struct Results {
    order: Vec<PathKind>,
    samples: HashMap<&'static str, Vec<Sample>>,
}

impl Results {
    /// The markdown report: medians, then ratios against `direct` and against `nginx`.
    fn markdown(&self, args: &Args, skipped: &[(String, String)]) -> String {
        let mut out = String::new();
        let med: HashMap<&str, _> = self
            .order
            .iter()
            .map(|k| (k.name(), medians(&self.samples[k.name()])))
            .collect();
        out.push_str(&format!(
            "### Medians over {} round(s): {} round trips of a {PUBLISH_SIZE}-byte PUBLISH, \
             {} MiB bulk, {} idle connections\n\n",
            args.rounds, args.round_trips, args.bulk_mib, args.idle_conns
        ));
        let header: Vec<&str> = METRICS.iter().map(|m| m.1).collect();
        out.push_str(&format!("| path | {} |\n", header.join(" | ")));
        out.push_str(&format!("|---|{}\n", "---:|".repeat(METRICS.len())));
        for kind in &self.order {
            let m = &med[kind.name()];
            let cells: Vec<String> = METRICS.iter().map(|x| fmt_value(m[x.0])).collect();
            out.push_str(&format!("| {} | {} |\n", kind.name(), cells.join(" | ")));
        }
        for base in ["direct", "nginx"] {
            let Some(b) = med.get(base) else { continue };
            out.push_str(&format!(
                "\n### Ratios against {base} (×; lower is better except MB/s)\n\n"
            ));
            out.push_str(&format!("| path | {} |\n", header.join(" | ")));
            out.push_str(&format!("|---|{}\n", "---:|".repeat(METRICS.len())));
            for kind in &self.order {
                let m = &med[kind.name()];
                let cells: Vec<String> = METRICS
                    .iter()
                    .map(|x| fmt_value(ratio(m[x.0], b[x.0])))
                    .collect();
                out.push_str(&format!("| {} | {} |\n", kind.name(), cells.join(" | ")));
            }
        }
        if args.rounds > 1 {
            // Medians hide how far the rounds disagree; on small VMs the latency is bimodal
            // (threads on one CPU or woken across two), and this shows it.
            out.push_str("\n### Spread over rounds (min – max)\n\n");
            out.push_str(&format!("| path | {} |\n", header.join(" | ")));
            out.push_str(&format!("|---|{}\n", "---:|".repeat(METRICS.len())));
            for kind in &self.order {
                let cells: Vec<String> = METRICS
                    .iter()
                    .map(|x| {
                        let values: Vec<f64> =
                            self.samples[kind.name()].iter().filter_map(x.2).collect();
                        let min = values.iter().copied().reduce(f64::min);
                        let max = values.iter().copied().reduce(f64::max);
                        match (min, max) {
                            (Some(_), Some(_)) => {
                                format!("{} – {}", fmt_value(min), fmt_value(max))
                            }
                            _ => fmt_value(None),
                        }
                    })
                    .collect();
                out.push_str(&format!("| {} | {} |\n", kind.name(), cells.join(" | ")));
            }
        }
        out.push_str(
            "\nMB/s and s/GB count the bulk bytes once (each makes the full round trip \
             client → proxy → echo → proxy → client). Machine CPU: /proc/stat \
             user+nice+system+irq+softirq over the bulk phase, client and echo included. \
             Proxy CPU and RSS: every process of the proxy (master and workers).\n",
        );
        for (name, why) in skipped {
            out.push_str(&format!("\nSkipped {name}: {why}\n"));
        }
        out
    }

    /// The JSON report: parameters, every round's sample, medians and ratios.
    fn json(&self, args: &Args, skipped: &[(String, String)], user_hz: f64) -> Value {
        let sample_json = |s: &Sample| -> Value {
            METRICS
                .iter()
                .map(|(key, _, get)| (key.to_string(), json!(get(s))))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        let med: HashMap<&str, _> = self
            .order
            .iter()
            .map(|k| (k.name(), medians(&self.samples[k.name()])))
            .collect();
        let ratios = |m: &HashMap<&str, Option<f64>>, base: &str| -> Value {
            match med.get(base) {
                None => Value::Null,
                Some(b) => METRICS
                    .iter()
                    .map(|(key, ..)| (key.to_string(), json!(ratio(m[key], b[key]))))
                    .collect::<serde_json::Map<_, _>>()
                    .into(),
            }
        };
        let paths: Vec<Value> = self
            .order
            .iter()
            .map(|kind| {
                let m = &med[kind.name()];
                json!({
                    "path": kind.name(),
                    "rounds": self.samples[kind.name()].iter().map(sample_json).collect::<Vec<_>>(),
                    "median": m.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                    "vs_direct": ratios(m, "direct"),
                    "vs_nginx": ratios(m, "nginx"),
                })
            })
            .collect();
        json!({
            "params": {
                "rounds": args.rounds,
                "round_trips": args.round_trips,
                "publish_bytes": PUBLISH_SIZE,
                "bulk_mib": args.bulk_mib,
                "idle_conns": args.idle_conns,
                "user_hz": user_hz,
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            },
            "paths": paths,
            "skipped": skipped.iter().map(|(p, why)| json!({"path": p, "reason": why})).collect::<Vec<_>>(),
        })
    }
}

/// Where the JSON goes: `$CARGO_TARGET_DIR/bench`, else `target/bench` next to the
/// `target/release` this binary was built into.
fn output_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir).join("bench");
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.to_path_buf()))
        .filter(|t| t.file_name().is_some_and(|n| n == "target"))
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("bench")
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse()?;
    let mqsplice = std::env::var_os("MQSPLICE_BIN")
        .map(PathBuf::from)
        .context(
            "MQSPLICE_BIN is not set: build with `cargo build --release -p proxy-userspace` and \
         run with MQSPLICE_BIN=target/release/mqsplice (or use `cargo xtask bench`)",
        )?;
    if !mqsplice.is_file() {
        bail!("MQSPLICE_BIN={} is not a file", mqsplice.display());
    }
    // This process holds both ends of every idle connection (client and echo broker).
    if let Some(limit) = open_files_limit() {
        let fit = limit.saturating_sub(200) / 2;
        if args.idle_conns > fit {
            eprintln!(
                "open files limit {limit}: idle connections reduced from {} to {fit}",
                args.idle_conns
            );
            args.idle_conns = fit.max(1);
        }
    }
    let mut skipped = Vec::new();
    let nginx = find_nginx()
        .map_err(|why| {
            println!("skipping nginx: {why}");
            skipped.push(("nginx".to_string(), why));
        })
        .ok();
    let haproxy = find_program("haproxy");
    if haproxy.is_none() {
        println!("skipping haproxy: haproxy is not installed");
        skipped.push(("haproxy".into(), "haproxy is not installed".into()));
    }
    let tools = Tools { nginx, haproxy };
    let order: Vec<PathKind> = PathKind::ALL
        .into_iter()
        .filter(|k| match k {
            PathKind::Nginx => tools.nginx.is_some(),
            PathKind::Haproxy => tools.haproxy.is_some(),
            _ => true,
        })
        .collect();
    let user_hz = user_hz();
    let echo = EchoServer::start().context("echo server")?;
    eprintln!(
        "echo broker on {}; paths: {}; {args:?}",
        echo.addr,
        order
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let mut results = Results {
        order: order.clone(),
        samples: order.iter().map(|k| (k.name(), Vec::new())).collect(),
    };
    let started = Instant::now();
    for round in 0..args.rounds {
        // Rotate the starting path each round so no path always runs first (or last).
        for i in 0..order.len() {
            let kind = order[(i + round) % order.len()];
            let peer = start_peer(kind, &tools, echo.addr, args.idle_conns + 2)
                .with_context(|| format!("start {}", kind.name()))?;
            let sample = measure(&peer, &args, user_hz)
                .with_context(|| format!("round {} of {}", round + 1, kind.name()))?;
            drop(peer);
            eprintln!(
                "[{:>5.1}s] round {}/{} {:<8} p50 {:.1} µs  p99 {:.1} µs  {:.0} MB/s  \
                 machine {:.2} s/GB  proxy {} s/GB  rss {} KiB  {} KiB/conn",
                started.elapsed().as_secs_f64(),
                round + 1,
                args.rounds,
                kind.name(),
                sample.p50_us,
                sample.p99_us,
                sample.mb_per_s,
                sample.machine_cpu_s_per_gb,
                fmt_value(sample.proxy_cpu_s_per_gb),
                fmt_value(sample.rss_1conn_kib),
                fmt_value(sample.kib_per_idle_conn),
            );
            results
                .samples
                .get_mut(kind.name())
                .expect("every path has a slot")
                .push(sample);
        }
    }

    println!("{}", results.markdown(&args, &skipped));
    let dir = output_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let file = dir.join("bench.json");
    std::fs::write(
        &file,
        serde_json::to_string_pretty(&results.json(&args, &skipped, user_hz))?,
    )
    .with_context(|| format!("write {}", file.display()))?;
    eprintln!("wrote {}", file.display());
    Ok(())
}
