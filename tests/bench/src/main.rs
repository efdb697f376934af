//! `cargo xtask bench`: mqsplice against the proxies it replaces, side by side in one run.
//!
//! Five paths from an MQTT load generator to a cheap echo broker, all on 127.0.0.1: `direct`
//! (the limit), `mqsplice-sockmap` (the in-kernel sockmap splice; needs root, skipped with the
//! reason otherwise), `mqsplice-userspace`, `nginx` (stream proxy) and `haproxy` (`mode tcp`).
//! For each: round-trip latency of 64-byte QoS 0 PUBLISHes one at a time (p50, p99); a windowed
//! PUBLISH stream of 64 B and of 1 KiB payloads (msg/s, MB/s, whole-machine and proxy CPU
//! seconds per GB); a full-speed full-duplex stream of 16 KiB PUBLISHes with no window (the same
//! figures, and the share of its bytes a splice's daemon copied); the proxy's RSS per held connection at 10,000 idle sessions. Rounds
//! interleave the paths (each proxy started fresh every round) so that drift in the machine
//! spreads over all of them; medians with min–max, ratios and the project's targets go to
//! stdout as markdown and to `target/bench/bench.json`.
//!
//! Then MQTT over WebSocket (see `ws`): mqsplice (ws → tcp) against NGINX (ws → ws) and the
//! direct WebSocket, latency and 64 B message throughput.
//!
//! Flags: `--rounds N`, `--round-trips N`, `--stream-ms N`, `--window N`,
//! `--conns N`, `--paths a,b,…`, `--quick`. `--tls` runs the TLS benchmark instead (see
//! [`tls`]), with `--tls-rounds N`, `--tls-seconds N`, `--tls-clients N`, `--tls-mib N`;
//! `--ws-only` runs only the WebSocket comparison, `--no-ws` leaves it out.

mod broker;
mod load;
mod paths;
mod procfs;
mod report;
mod tls;
mod ws;

use anyhow::{Context, bail};
use paths::{PathKind, Peer, Tools, find_nginx, find_program, start_peer};
use report::{Results, Sample, fmt_value};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Payload of the small-message stream.
const SMALL_PAYLOAD: usize = 64;
/// Payload of the bulk stream.
const BULK_PAYLOAD: usize = 1024;
/// Time the eBPF daemon gets to have every held connection in the splice.
const SPLICE_WAIT: Duration = Duration::from_secs(10);
/// Descriptors kept free besides two per held connection: listeners, the other phases'
/// connections, and a proxy's own (epoll, eBPF maps and programs, logs).
const FD_RESERVE: u64 = 256;
/// Time a proxy gets to settle (free what a phase used) before its memory is read.
const SETTLE: Duration = Duration::from_millis(300);

/// Benchmark sizes, from the command line. Which benchmarks run: `tls` (`--tls`) is the TLS
/// benchmark instead of the plain one; `ws` adds the WebSocket comparison (`--no-ws` turns it
/// off) and `ws_only` runs nothing else.
#[derive(Debug, Clone)]
struct Args {
    rounds: usize,
    round_trips: usize,
    stream: Duration,
    window: u64,
    conns: usize,
    ws: bool,
    ws_only: bool,
    tls: Option<tls::TlsArgs>,
    paths: Option<Vec<String>>,
}

impl Args {
    /// Parses `std::env::args`; `--quick` sets small sizes, later flags still override them.
    fn parse() -> anyhow::Result<Args> {
        let mut args = Args {
            rounds: 5,
            round_trips: 20_000,
            stream: Duration::from_millis(2000),
            window: 256,
            conns: 10_000,
            paths: None,
            tls: None,
            ws: true,
            ws_only: false,
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
                "--stream-ms" => args.stream = Duration::from_millis(value("--stream-ms")?),
                "--window" => args.window = value("--window")?,
                "--conns" => args.conns = value("--conns")? as usize,
                "--paths" => {
                    let list = it.next().context("--paths needs a value")?;
                    args.paths = Some(list.split(',').map(str::to_owned).collect());
                }
                "--tls" => {
                    args.tls.get_or_insert(tls::TlsArgs {
                        rounds: 3,
                        seconds: Duration::from_secs(5),
                        clients: 16,
                        mib: 1024,
                    });
                }
                "--tls-rounds" | "--tls-seconds" | "--tls-clients" | "--tls-mib" => {
                    let n = value(&flag)?;
                    let t = args.tls.get_or_insert(tls::TlsArgs {
                        rounds: 3,
                        seconds: Duration::from_secs(5),
                        clients: 16,
                        mib: 1024,
                    });
                    match flag.as_str() {
                        "--tls-rounds" => t.rounds = n as usize,
                        "--tls-seconds" => t.seconds = Duration::from_secs(n),
                        "--tls-clients" => t.clients = n as usize,
                        _ => t.mib = n as usize,
                    }
                }
                "--ws-only" => args.ws_only = true,
                "--no-ws" => args.ws = false,
                "--quick" => {
                    args.rounds = 1;
                    args.round_trips = 2000;
                    args.stream = Duration::from_millis(500);
                    args.conns = 1000;
                }
                "-h" | "--help" => {
                    println!(
                        "usage: bench [--rounds N] [--round-trips N] [--stream-ms N] [--window N] [--conns N] [--paths a,b] [--quick] [--ws-only] [--no-ws]\n\
                         \x20      bench --tls [--tls-rounds N] [--tls-seconds N] [--tls-clients N] [--tls-mib N]\n\
                         paths: {}\n(MQSPLICE_BIN must name the built mqsplice)",
                        PathKind::ALL.map(|k| k.name()).join(",")
                    );
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?} (try --help)"),
            }
        }
        Ok(args)
    }
}

/// Runs every phase against one started path; `notes` gets the limits it ran into.
fn measure(
    peer: &Peer,
    args: &Args,
    round: usize,
    user_hz: f64,
    notes: &mut Vec<String>,
) -> anyhow::Result<Sample> {
    let (p50_us, p99_us) = load::latency(peer.listen, args.round_trips).context("latency")?;
    if let Some(splice) = peer.splice_stats().context("stats")?
        && splice["spliced_total"].as_u64().unwrap_or(0) == 0
    {
        bail!("the latency connection was not spliced: {splice}");
    }
    // Taken once a worker has served a connection, so every worker is in it.
    let pids = peer.pids();
    let stream = |payload| {
        load::throughput(
            peer.listen,
            payload,
            args.stream,
            args.window,
            &pids,
            user_hz,
        )
    };
    let small = stream(SMALL_PAYLOAD).context("64 B stream")?;
    let bulk = stream(BULK_PAYLOAD).context("1 KiB stream")?;
    // The splice's counters around the stream: bytes passed to the daemon, and copies that moved
    // again only on a progress check (a lost wake-up costs the stream up to a second).
    let splice = |key: &str| -> anyhow::Result<Option<u64>> {
        Ok(peer.splice_stats()?.and_then(|s| s[key].as_u64()))
    };
    let passed_before = splice("passed_bytes")?;
    let resumed_before = splice("copies_resumed")?;
    let duplex =
        load::duplex(peer.listen, args.stream, &pids, user_hz).context("full-duplex stream")?;
    // Both directions crossed the splice: bytes sent one way and echoed back the other.
    let duplex_daemon_share = match (passed_before, splice("passed_bytes")?) {
        (Some(before), Some(after)) if duplex.bytes > 0 => {
            Some(after.saturating_sub(before) as f64 / (2 * duplex.bytes) as f64)
        }
        _ => None,
    };
    let duplex_copies_resumed = match (resumed_before, splice("copies_resumed")?) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    let mut sample = Sample {
        round,
        p50_us,
        p99_us,
        small,
        bulk,
        duplex,
        duplex_daemon_share,
        duplex_copies_resumed,
        conns_held: None,
        rss_before_kib: None,
        rss_bytes_per_conn: None,
        splice: None,
    };
    if peer.proxy.is_some() {
        std::thread::sleep(SETTLE);
        let before = procfs::rss_kib(&pids);
        let (held, limit) = load::hold(peer.listen, args.conns);
        if let Some(why) = limit {
            let msg = format!(
                "{} round {round}: held {} of {} connections: {why}",
                peer.kind.name(),
                held.len(),
                args.conns
            );
            eprintln!("{msg}");
            notes.push(msg);
        }
        if held.is_empty() {
            bail!("no connection could be held");
        }
        if peer.kind.is_sockmap() {
            let deadline = Instant::now() + SPLICE_WAIT;
            loop {
                let splice = peer.splice_stats()?.unwrap_or_default();
                let active = splice["spliced_active"].as_u64().unwrap_or(0) as usize;
                if active >= held.len() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("only {active} of {} held connections spliced", held.len());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        std::thread::sleep(SETTLE);
        let after = procfs::rss_kib(&pids);
        sample.splice = peer.splice_stats()?;
        sample.conns_held = Some(held.len());
        sample.rss_before_kib = before;
        sample.rss_bytes_per_conn = match (before, after) {
            (Some(b), Some(a)) => Some((a as f64 - b as f64) * 1024.0 / held.len() as f64),
            _ => None,
        };
        drop(held);
    }
    // A proxy process that died (or was replaced) mid-round makes its CPU and memory figures
    // meaningless: fail the round rather than report them.
    if let Some(gone) = pids.iter().find(|&&pid| procfs::start_time(pid).is_none()) {
        bail!("proxy process {gone} exited during the measurement");
    }
    Ok(sample)
}

/// Busy CPUs of the machine while this benchmark is idle, over one second: what other work
/// (another developer's tests) adds to every whole-machine figure.
fn background_load(user_hz: f64) -> Option<f64> {
    let before = procfs::machine_cpu_ticks().ok()?;
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let after = procfs::machine_cpu_ticks().ok()?;
    Some((after - before) as f64 / user_hz / start.elapsed().as_secs_f64())
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
    let mut notes = Vec::new();
    // This process holds both ends of every held connection (client and echo broker), and
    // every proxy two descriptors per connection; all inherit this limit, and without
    // CAP_SYS_RESOURCE its hard limit is as far as anyone here can go.
    let limit = procfs::raise_open_files(2 * args.conns as u64 + FD_RESERVE);
    let fit = (limit as usize).saturating_sub(FD_RESERVE as usize) / 2;
    if args.conns > fit {
        let msg = format!(
            "open-file limit {limit} (the hard limit; raising it needs CAP_SYS_RESOURCE): held \
             connections reduced from {} to {fit}, so that the bench and every proxy fit",
            args.conns
        );
        eprintln!("{msg}");
        notes.push(msg);
        args.conns = fit.max(1);
    }

    if let Some(tls_args) = &args.tls {
        let tools = Tools {
            nofile: limit,
            mqsplice: mqsplice.clone(),
            nginx: find_nginx()
                .map_err(|why| println!("skipping nginx: {why}"))
                .ok(),
            haproxy: None,
        };
        return tls::run(&tools, tls_args, &output_dir());
    }

    if args.ws_only {
        let nginx = find_nginx().ok();
        return run_ws(&args, &mqsplice, nginx.as_ref());
    }
    let mut skipped = Vec::new();
    let mut skip = |name: &str, why: String| {
        println!("skipping {name}: {why}");
        skipped.push((name.to_string(), why));
    };
    let nginx = find_nginx().map_err(|why| skip("nginx", why)).ok();
    let haproxy = find_program("haproxy");
    if haproxy.is_none() {
        skip("haproxy", "haproxy is not installed".into());
    }
    let tools = Tools {
        nofile: limit,
        mqsplice: mqsplice.clone(),
        nginx,
        haproxy,
    };
    let wanted = |k: &PathKind| {
        args.paths
            .as_ref()
            .is_none_or(|p| p.iter().any(|n| n == k.name()))
    };
    let mut order: Vec<PathKind> = PathKind::ALL
        .into_iter()
        .filter(wanted)
        .filter(|k| match k {
            PathKind::Nginx => tools.nginx.is_some(),
            PathKind::Haproxy => tools.haproxy.is_some(),
            _ => true,
        })
        .collect();
    if order.iter().any(|k| k.is_sockmap()) {
        // The eBPF daemon needs root (CAP_BPF, CAP_NET_ADMIN) and a kernel with sockmap:
        // try it once, and leave the path out with the daemon's own words if it cannot start.
        match start_peer(PathKind::MqspliceSockmap, &tools, 16).and_then(Peer::stop) {
            Ok(()) => {}
            Err(e) => {
                skip(
                    "mqsplice-sockmap",
                    format!("the eBPF daemon did not start: {e:#}"),
                );
                order.retain(|k| !k.is_sockmap());
            }
        }
    }
    if order.contains(&PathKind::MqsplicePacket) {
        // The packet splice needs root (a TC program, TCP_REPAIR): tried once, like the sockmap.
        if let Err(e) = start_peer(PathKind::MqsplicePacket, &tools, 16).and_then(Peer::stop) {
            skip(
                "mqsplice-packet",
                format!("the packet splice did not start: {e:#}"),
            );
            order.retain(|k| *k != PathKind::MqsplicePacket);
        }
    }
    if order.is_empty() {
        bail!("no path to measure");
    }
    let user_hz = procfs::user_hz();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_before = procfs::load_average();
    let busy_before = background_load(user_hz);
    eprintln!(
        "paths: {}; {args:?}; background load {} busy CPUs of {cpus}",
        order
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", "),
        fmt_value(busy_before),
    );

    let mut results = Results {
        order: order.clone(),
        samples: order.iter().map(|k| (k.name(), Vec::new())).collect(),
        skipped,
        failures: Vec::new(),
        notes: Vec::new(),
    };
    let started = Instant::now();
    for round in 1..=args.rounds {
        // Rotate the starting path each round so that no path always runs first (or last).
        for i in 0..order.len() {
            let kind = order[(i + round - 1) % order.len()];
            let outcome = start_peer(kind, &tools, args.conns)
                .context("start")
                .and_then(|peer| {
                    let sample = measure(&peer, &args, round, user_hz, &mut notes);
                    // Stop even after a failed measurement; report the first error.
                    let stopped = peer.stop().context("stop");
                    let sample = sample?;
                    stopped?;
                    Ok(sample)
                });
            match outcome {
                Ok(s) => {
                    eprintln!(
                        "[{:>5.1}s] round {round}/{} {:<18} p50 {:.1} µs p99 {:.1} µs | 64 B {:.0} msg/s | \
                         1 KiB {:.0} MB/s machine {:.2} s/GB proxy {} s/GB | duplex {:.0} MB/s machine {:.2} s/GB daemon-copied {} resumed {} | {} B/conn ({} held)",
                        started.elapsed().as_secs_f64(),
                        args.rounds,
                        kind.name(),
                        s.p50_us,
                        s.p99_us,
                        s.small.msgs_per_s,
                        s.bulk.mb_per_s,
                        s.bulk.machine_cpu_s_per_gb,
                        fmt_value(s.bulk.proxy_cpu_s_per_gb),
                        s.duplex.mb_per_s,
                        s.duplex.machine_cpu_s_per_gb,
                        fmt_value(s.duplex_daemon_share),
                        s.duplex_copies_resumed
                            .map_or("–".into(), |n| n.to_string()),
                        fmt_value(s.rss_bytes_per_conn),
                        s.conns_held.map_or("–".into(), |n| n.to_string()),
                    );
                    results
                        .samples
                        .get_mut(kind.name())
                        .expect("every path has a slot")
                        .push(s);
                }
                Err(e) => {
                    eprintln!("round {round} {}: FAILED: {e:#}", kind.name());
                    results
                        .failures
                        .push((kind.name().into(), round, format!("{e:#}")));
                }
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let busy_after = background_load(user_hz);
    let leftovers = paths::remove_leftover_pins();
    if !leftovers.is_empty() {
        notes.push(format!("removed leftover pin directories: {leftovers:?}"));
    }
    notes.push(format!(
        "background load with the bench idle: {} busy CPUs of {cpus} before, {} after; \
         1-min load average {} before, {} after; whole-machine CPU figures include it",
        fmt_value(busy_before),
        fmt_value(busy_after),
        fmt_value(load_before),
        fmt_value(procfs::load_average()),
    ));
    results.notes = notes;

    let params = json!({
        "rounds": args.rounds,
        "round_trips": args.round_trips,
        "latency_publish_bytes": load::LATENCY_PUBLISH,
        "small_payload": SMALL_PAYLOAD,
        "stream_ms": args.stream.as_millis() as u64,
        "small_publish_bytes": load::publish_with_payload(SMALL_PAYLOAD).len(),
        "bulk_payload": BULK_PAYLOAD,
        "bulk_publish_bytes": load::publish_with_payload(BULK_PAYLOAD).len(),
        "duplex_publish_bytes": load::publish_with_payload(load::DUPLEX_PAYLOAD).len(),
        "window": args.window,
        "conns": args.conns,
        "user_hz": user_hz,
        "cpus": cpus,
        "seconds": elapsed,
    });
    println!("{}", results.markdown(&params));
    let dir = output_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let file = dir.join("bench.json");
    std::fs::write(&file, serde_json::to_string_pretty(&results.json(params))?)
        .with_context(|| format!("write {}", file.display()))?;
    eprintln!("wrote {} ({elapsed:.0} s of rounds)", file.display());
    if args.ws {
        run_ws(&args, &mqsplice, tools.nginx.as_ref())?;
    }
    if !results.failures.is_empty() {
        eprintln!("{} round(s) failed (listed above)", results.failures.len());
        std::process::exit(1);
    }
    Ok(())
}

/// The WebSocket comparison, its table on stdout and its figures in `bench-ws.json`.
fn run_ws(
    args: &Args,
    mqsplice: &std::path::Path,
    nginx: Option<&paths::NginxTool>,
) -> anyhow::Result<()> {
    let figures = ws::compare(
        mqsplice,
        nginx,
        args.rounds,
        args.round_trips,
        args.stream,
        args.window,
    );
    let dir = output_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let file = dir.join("bench-ws.json");
    std::fs::write(&file, serde_json::to_string_pretty(&figures)?)
        .with_context(|| format!("write {}", file.display()))?;
    eprintln!("wrote {}", file.display());
    if figures["failures"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
    {
        bail!("WebSocket rounds failed (listed above)");
    }
    Ok(())
}
