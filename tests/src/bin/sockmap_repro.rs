//! `sockmap_repro`: the splice's data path without the daemon (issue 14, item 1).
//!
//! Builds one spliced pair by hand, all on 127.0.0.1:
//!
//! ```text
//! client C ──► proxy socket A ══(sockmap)══ proxy socket B ──► echo server E
//! ```
//!
//! with the project's own verdict program and maps (`EbpfPrograms::load`), peer entries for both
//! sockets, then B, then A into the socket map, then the `SO_RCVLOWAT` kick on both (the hand-over
//! order of docs/architecture.md). The client writes numbered bytes (4-byte little-endian word counters) in 64 KiB writes
//! from one thread and reads the echo back in 64 KiB reads on another, checking every byte as it
//! arrives. One suspect at a time is added by the scenario:
//!
//! - `redirect`: pure redirect both ways (hard limit and signal point at `u64::MAX`);
//! - `throttle`: from `--after` bytes on, one direction is throttled for good (`throttled = ON`);
//!   this program then waits until the kernel's queue towards the peer is empty, reads the
//!   throttled socket and writes the bytes into the peer itself, while the other direction stays
//!   redirected (so the throttled socket is also the egress target of the peer's skbs);
//! - `toggle`: `throttle` plus hand-back (`RETURNING`, `daemon_read` = passed bytes) once every
//!   byte received was redirected or read, and a new throttle after a random interval, over and
//!   over, as the daemon's watcher does.
//!
//! Options add the other suspects: `--read` size (or `whole`: larger than any receive queue),
//! `--rcvbuf` (clamp `SO_RCVBUF` of the throttled socket when throttling), `--peek` (a `MSG_PEEK`
//! before every read), `--fionread` (a `FIONREAD` before every read).
//!
//! The bytes this program reads from the throttled socket are checked too: each read must be the
//! stream at `redirected + read so far`, so a replay is caught where it first appears (in the
//! throttled socket's `recvmsg`, or only on the client's side of the redirect path).
//!
//! Run as root: `sockmap_repro --scenario toggle --side a --runs 10 --mib 256`.

use mqsplice::dataplane::ebpf::{
    EbpfPrograms, Maps, peek, queued_in, set_rcvlowat, socket_cookie, tcp_bytes, unacked_out,
    wait_readable,
};
use proxy_common::{FlowCounters, GlobalCounters, PeerEntry, direction, throttle};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CHUNK: usize = 64 * 1024;
/// Bytes shown around a bad offset, and matched against the pattern to find their origin.
const SHOW: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Redirect,
    Throttle,
    Toggle,
}

#[derive(Debug, Clone)]
struct Args {
    scenario: Scenario,
    runs: u32,
    bytes: u64,
    /// 0: client-facing socket A (client → broker direction); 1: broker-facing B; 2: both
    /// (two drivers, one per direction, as the daemon may throttle both).
    side: usize,
    /// Redirected bytes of the throttled side before the first throttle.
    after: u64,
    read_size: usize,
    timeout: Duration,
    rcvbuf: Option<usize>,
    peek: bool,
    fionread: bool,
    /// Redirect period between hand-back and the next throttle, in µs (uniform).
    gap_us: (u64, u64),
    /// Least time a throttle lasts before a hand-back is tried, in µs (uniform): the daemon's
    /// throttles last while the kernel's queue towards a slow peer drains.
    hold_us: (u64, u64),
    /// The client's reader sleeps up to this many µs after every `reader_pause_every`-th read, so
    /// the proxy socket towards it backs up and the kernel's queue of skbs redirected into it
    /// (its psock `ingress_skb`) fills: a throttled socket's own passed skbs then queue behind them.
    reader_pause_us: u64,
    reader_pause_every: u64,
    /// On hand-back, the hard limit is set this far beyond the redirected bytes, as the daemon
    /// does (it uses `MIN_GRANT`, 16 KiB): the program then passes by itself the first skb
    /// that would cross it, and the driver throttles as soon as it sees a passed byte unread.
    grant: Option<u64>,
    /// Pairs run at the same time in one run (each its own client, proxy pair and echo).
    flows: u32,
    seed: u64,
}

fn usage() -> ! {
    eprintln!(
        "usage: sockmap_repro [--scenario redirect|throttle|toggle] [--side a|b|both] [--runs N] \
         [--mib M] [--after-mib M] [--read BYTES|whole] [--timeout-s S] [--rcvbuf BYTES] \
         [--peek] [--fionread] [--gap-us MIN,MAX] [--hold-us MIN,MAX] [--reader-pause-us MAX] [--reader-pause-every K] [--grant BYTES] [--flows N] [--seed N]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        scenario: Scenario::Redirect,
        runs: 5,
        bytes: 128 << 20,
        side: 0,
        after: 8 << 20,
        read_size: CHUNK,
        timeout: Duration::from_secs(60),
        rcvbuf: None,
        peek: false,
        fionread: false,
        gap_us: (200, 5000),
        hold_us: (500, 5000),
        reader_pause_us: 0,
        reader_pause_every: 16,
        grant: None,
        flows: 1,
        seed: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        let num = |s: String| s.parse::<u64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--scenario" => {
                a.scenario = match val().as_str() {
                    "redirect" => Scenario::Redirect,
                    "throttle" => Scenario::Throttle,
                    "toggle" => Scenario::Toggle,
                    _ => usage(),
                }
            }
            "--side" => {
                a.side = match val().as_str() {
                    "a" => 0,
                    "b" => 1,
                    "both" => 2,
                    _ => usage(),
                }
            }
            "--runs" => a.runs = num(val()).clamp(1, 100) as u32,
            "--mib" => a.bytes = num(val()).clamp(1, 4096) << 20,
            "--after-mib" => a.after = num(val()) << 20,
            "--read" => {
                let v = val();
                a.read_size = if v == "whole" {
                    max_receive_queue() + (1 << 20)
                } else {
                    num(v).clamp(1, 1 << 30) as usize
                };
            }
            "--timeout-s" => a.timeout = Duration::from_secs(num(val()).clamp(1, 600)),
            "--rcvbuf" => a.rcvbuf = Some(num(val()) as usize),
            "--peek" => a.peek = true,
            "--fionread" => a.fionread = true,
            "--gap-us" => {
                let v = val();
                let (lo, hi) = v.split_once(',').unwrap_or_else(|| usage());
                a.gap_us = (num(lo.into()), num(hi.into()).max(num(lo.into())));
            }
            "--hold-us" => {
                let v = val();
                let (lo, hi) = v.split_once(',').unwrap_or_else(|| usage());
                a.hold_us = (num(lo.into()), num(hi.into()).max(num(lo.into())));
            }
            "--reader-pause-us" => a.reader_pause_us = num(val()).min(1_000_000),
            "--reader-pause-every" => a.reader_pause_every = num(val()).max(1),
            "--grant" => a.grant = Some(num(val())),
            "--flows" => a.flows = num(val()).clamp(1, 32) as u32,
            "--seed" => a.seed = num(val()),
            _ => usage(),
        }
    }
    if a.seed == 0 {
        a.seed = Instant::now().elapsed().as_nanos() as u64
            ^ u64::from(std::process::id()).rotate_left(32)
            ^ 0x9e37_79b9_7f4a_7c15;
    }
    a
}

/// TCP's autotuning maximum or twice `net.core.rmem_max`, whichever is larger (as the daemon).
fn max_receive_queue() -> usize {
    let read = |path: &str, field: usize| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.split_whitespace().nth(field)?.parse::<usize>().ok())
    };
    let tcp_max = read("/proc/sys/net/ipv4/tcp_rmem", 2).unwrap_or(6 << 20);
    let core_max = read("/proc/sys/net/core/rmem_max", 0).unwrap_or(0);
    tcp_max.max(2 * core_max)
}

/// The byte the client sent at stream offset `off`.
fn expected(off: u64) -> u8 {
    ((off >> 2) as u32).to_le_bytes()[(off & 3) as usize]
}

fn fill(buf: &mut [u8], off: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = expected(off + i as u64);
    }
}

/// The first position in `buf` (stream offset `off`) that is not the pattern.
fn first_mismatch(buf: &[u8], off: u64) -> Option<usize> {
    buf.iter()
        .enumerate()
        .position(|(i, &b)| b != expected(off + i as u64))
}

/// Where in the stream `bytes` came from, if they are a stretch of the pattern.
fn origin(bytes: &[u8]) -> Option<u64> {
    (0..4usize).find_map(|phase| {
        let word = bytes.get(phase..phase + 4)?;
        let w = u64::from(u32::from_le_bytes(word.try_into().ok()?));
        let start = (w * 4).checked_sub(phase as u64)?;
        bytes
            .iter()
            .enumerate()
            .all(|(i, &b)| b == expected(start + i as u64))
            .then_some(start)
    })
}

/// A broken stream as one observer saw it.
#[derive(Debug, Clone)]
struct Bad {
    offset: u64,
    expected: u8,
    got: u8,
    bytes: Vec<u8>,
    origin: Option<u64>,
}

impl std::fmt::Display for Bad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "offset {} (64K-aligned: {}) expected {:#04x} got {:#04x}; ",
            self.offset,
            self.offset.is_multiple_of(65536),
            self.expected,
            self.got
        )?;
        match self.origin {
            Some(o) if o < self.offset => write!(
                f,
                "replay of offset {o} (jump back {} bytes)",
                self.offset - o
            )?,
            Some(o) => write!(
                f,
                "bytes from offset {o} (jump ahead {} bytes)",
                o - self.offset
            )?,
            None => write!(f, "not the pattern anywhere")?,
        }
        write!(
            f,
            "; bytes {:02x?}",
            &self.bytes[..self.bytes.len().min(16)]
        )
    }
}

fn bad_at(buf: &[u8], pos: usize, off: u64) -> Bad {
    let bytes = buf[pos..buf.len().min(pos + SHOW)].to_vec();
    Bad {
        offset: off + pos as u64,
        expected: expected(off + pos as u64),
        got: buf[pos],
        origin: origin(&bytes),
        bytes,
    }
}

// ----- socket helpers -----

/// `tcpi_bytes_acked` and `tcpi_bytes_received` (zero when the kernel does not say).
fn tcp_counts(fd: BorrowedFd<'_>) -> (u64, u64) {
    tcp_bytes(fd).map_or((0, 0), |b| (b.acked, b.received))
}

/// Bytes written into `fd` and not yet acknowledged (`SIOCOUTQ`; zero when the kernel does not say).
fn unacked(fd: BorrowedFd<'_>) -> u64 {
    unacked_out(fd).unwrap_or(0)
}

fn counters(maps: &Mutex<Maps>, cookie: u64) -> FlowCounters {
    let maps = maps.lock().unwrap_or_else(|p| p.into_inner());
    maps.flow_counters.get(&cookie, 0).unwrap_or_default()
}

fn set_entry(maps: &Mutex<Maps>, cookie: u64, entry: PeerEntry) {
    let mut maps = maps.lock().unwrap_or_else(|p| p.into_inner());
    maps.peers
        .insert(cookie, entry, 0)
        .expect("update peer entry");
}

fn totals(maps: &Mutex<Maps>) -> GlobalCounters {
    let maps = maps.lock().unwrap_or_else(|p| p.into_inner());
    let mut t = GlobalCounters::default();
    if let Ok(values) = maps.totals.get(&0, 0) {
        for v in values.iter() {
            t.bytes_to_upstream += v.bytes_to_upstream;
            t.bytes_to_client += v.bytes_to_client;
            t.packets += v.packets;
            t.empty_dropped += v.empty_dropped;
            t.redirect_failed += v.redirect_failed;
            t.passed_bytes += v.passed_bytes;
            t.signals_lost += v.signals_lost;
        }
    }
    t
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

// ----- one run -----

#[derive(Debug, Default)]
struct Outcome {
    received: u64,
    client_bad: Option<Bad>,
    driver_bad: Option<Bad>,
    excess: u64,
    stalled: bool,
    throttles: u64,
    handbacks: u64,
    daemon_read: u64,
    reads: u64,
    fionread_odd: u64,
    note: String,
}

/// What the "daemon" thread shares with the run.
struct Shared {
    stop: AtomicBool,
    throttles: AtomicU64,
    handbacks: AtomicU64,
    daemon_read: AtomicU64,
    reads: AtomicU64,
    fionread_odd: AtomicU64,
    bad: Mutex<Option<Bad>>,
    note: Mutex<String>,
}

fn run_once(args: &Args, maps: &Arc<Mutex<Maps>>, rng: &mut Rng) -> std::io::Result<Outcome> {
    let deadline = Instant::now() + args.timeout;
    // Echo server.
    let echo_l = TcpListener::bind("127.0.0.1:0")?;
    let proxy_l = TcpListener::bind("127.0.0.1:0")?;
    let client = TcpStream::connect(proxy_l.local_addr()?)?;
    let (a, _) = proxy_l.accept()?;
    let b = TcpStream::connect(echo_l.local_addr()?)?;
    let (e, _) = echo_l.accept()?;
    for s in [&client, &a, &b, &e] {
        s.set_nodelay(true)?;
    }
    let cookies = [socket_cookie(a.as_fd())?, socket_cookie(b.as_fd())?];
    let sockets = [a, b];
    // The kernel's "written into the peer" counters start after the handshake.
    let base: Vec<u64> = sockets
        .iter()
        .map(|s| tcp_counts(s.as_fd()).0 + unacked(s.as_fd()))
        .collect();
    let entry = |side: usize| PeerEntry {
        peer_cookie: cookies[1 - side],
        direction: if side == 0 {
            direction::TO_UPSTREAM
        } else {
            direction::TO_CLIENT
        },
        throttled: throttle::OFF,
        signal_at: u64::MAX,
        daemon_read: 0,
        hard_limit: u64::MAX,
    };
    {
        let mut m = maps.lock().unwrap_or_else(|p| p.into_inner());
        for (side, &cookie) in cookies.iter().enumerate() {
            m.flow_counters
                .insert(cookie, FlowCounters::default(), 0)
                .map_err(std::io::Error::other)?;
            m.peers
                .insert(cookie, entry(side), 0)
                .map_err(std::io::Error::other)?;
        }
        m.socks
            .insert(cookies[1], sockets[1].as_raw_fd(), 0)
            .map_err(std::io::Error::other)?;
        m.socks
            .insert(cookies[0], sockets[0].as_raw_fd(), 0)
            .map_err(std::io::Error::other)?;
    }
    for s in &sockets {
        set_rcvlowat(s.as_fd(), 1)?;
    }
    let sockets = Arc::new(sockets);
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        throttles: AtomicU64::new(0),
        handbacks: AtomicU64::new(0),
        daemon_read: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        fionread_odd: AtomicU64::new(0),
        bad: Mutex::new(None),
        note: Mutex::new(String::new()),
    });

    // Echo: everything back, 64 KiB at a time.
    let echo = {
        let shared = shared.clone();
        e.set_read_timeout(Some(Duration::from_millis(200)))?;
        e.set_write_timeout(Some(Duration::from_millis(200)))?;
        std::thread::spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            let mut e = e;
            while !shared.stop.load(Relaxed) && Instant::now() < deadline {
                let n = match e.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(x) if matches!(x.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        continue;
                    }
                    Err(x) if x.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let mut done = 0;
                while done < n && !shared.stop.load(Relaxed) && Instant::now() < deadline {
                    match e.write(&buf[done..n]) {
                        Ok(k) => done += k,
                        Err(x)
                            if matches!(
                                x.kind(),
                                ErrorKind::WouldBlock
                                    | ErrorKind::TimedOut
                                    | ErrorKind::Interrupted
                            ) => {}
                        Err(_) => return,
                    }
                }
            }
        })
    };

    // Client writer.
    let writer = {
        let mut c = client.try_clone()?;
        c.set_write_timeout(Some(Duration::from_millis(200)))?;
        let shared = shared.clone();
        let total = args.bytes;
        std::thread::spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            let mut off = 0u64;
            while off < total && !shared.stop.load(Relaxed) && Instant::now() < deadline {
                let n = CHUNK.min((total - off) as usize);
                fill(&mut buf[..n], off);
                let mut done = 0;
                while done < n && !shared.stop.load(Relaxed) && Instant::now() < deadline {
                    match c.write(&buf[done..n]) {
                        Ok(k) => done += k,
                        Err(x)
                            if matches!(
                                x.kind(),
                                ErrorKind::WouldBlock
                                    | ErrorKind::TimedOut
                                    | ErrorKind::Interrupted
                            ) => {}
                        Err(_) => return,
                    }
                }
                off += done as u64;
            }
        })
    };

    // The "daemon": throttles one side (or both) and moves its bytes.
    let sides: &[usize] = match (args.scenario, args.side) {
        (Scenario::Redirect, _) => &[],
        (_, 2) => &[0, 1],
        (_, 0) => &[0],
        _ => &[1],
    };
    let drivers: Vec<_> = sides
        .iter()
        .map(|&side| {
            let args = args.clone();
            let maps = maps.clone();
            let shared = shared.clone();
            let sockets = sockets.clone();
            let base = base.clone();
            let seed = rng.next();
            std::thread::spawn(move || {
                drive(
                    &args,
                    side,
                    &maps,
                    &shared,
                    &sockets,
                    cookies,
                    &base,
                    deadline,
                    Rng(seed | 1),
                )
            })
        })
        .collect();

    // Client reader (this thread).
    let mut out = Outcome::default();
    let mut c = client;
    c.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = vec![0u8; CHUNK];
    let mut last_progress = Instant::now();
    let mut reads = 0u64;
    while out.received < args.bytes && Instant::now() < deadline {
        match c.read(&mut buf) {
            Ok(0) => {
                out.note.push_str("client saw EOF; ");
                break;
            }
            Ok(n) => {
                last_progress = Instant::now();
                reads += 1;
                if args.reader_pause_us > 0 && reads.is_multiple_of(args.reader_pause_every) {
                    std::thread::sleep(Duration::from_micros(rng.between(0, args.reader_pause_us)));
                }
                if out.client_bad.is_none()
                    && let Some(pos) = first_mismatch(&buf[..n], out.received)
                {
                    let mut bad = bad_at(&buf[..n], pos, out.received);
                    if bad.bytes.len() < 8 {
                        // Too few bytes left in this read to tell their origin: take a little more.
                        let mut more = [0u8; SHOW];
                        if let Ok(k) = c.read(&mut more) {
                            bad.bytes.extend_from_slice(&more[..k]);
                            out.received += k as u64;
                            bad.origin = origin(&bad.bytes);
                        }
                    }
                    out.client_bad = Some(bad);
                }
                out.received += n as u64;
            }
            Err(x) if matches!(x.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if last_progress.elapsed() > Duration::from_secs(10) {
                    out.stalled = true;
                    break;
                }
            }
            Err(x) if x.kind() == ErrorKind::Interrupted => {}
            Err(x) => {
                out.note.push_str(&format!("client read error {x}; "));
                break;
            }
        }
    }
    if out.received < args.bytes && !out.stalled {
        out.stalled = true;
    }
    if out.received >= args.bytes {
        // More than was sent? Look for a little while.
        c.set_read_timeout(Some(Duration::from_millis(300)))?;
        let until = Instant::now() + Duration::from_millis(600);
        while Instant::now() < until {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.excess += n as u64,
                Err(_) => break,
            }
        }
        out.excess += out.received - args.bytes;
    }
    shared.stop.store(true, Relaxed);
    let _ = writer.join();
    let _ = echo.join();
    for d in drivers {
        let _ = d.join();
    }
    out.throttles = shared.throttles.load(Relaxed);
    out.handbacks = shared.handbacks.load(Relaxed);
    out.daemon_read = shared.daemon_read.load(Relaxed);
    out.reads = shared.reads.load(Relaxed);
    out.fionread_odd = shared.fionread_odd.load(Relaxed);
    out.driver_bad = shared.bad.lock().unwrap_or_else(|p| p.into_inner()).clone();
    out.note
        .push_str(&shared.note.lock().unwrap_or_else(|p| p.into_inner()));
    let addrs = [
        (sockets[0].local_addr()?, sockets[0].peer_addr()?),
        (sockets[1].local_addr()?, sockets[1].peer_addr()?),
    ];
    out.note
        .push_str(&format!("skmem at end: {}; ", skmem(&addrs)));
    let fc = [counters(maps, cookies[0]), counters(maps, cookies[1])];
    let tb = [
        tcp_counts(sockets[0].as_fd()),
        tcp_counts(sockets[1].as_fd()),
    ];
    out.note.push_str(&format!(
        "A: redirected {} passed {} tcp_received {}; B: redirected {} passed {} tcp_received {}",
        fc[0].bytes, fc[0].passed_bytes, tb[0].1, fc[1].bytes, fc[1].passed_bytes, tb[1].1
    ));
    {
        let mut m = maps.lock().unwrap_or_else(|p| p.into_inner());
        for cookie in cookies {
            let _ = m.socks.remove(&cookie);
            let _ = m.peers.remove(&cookie);
            let _ = m.flow_counters.remove(&cookie);
        }
    }
    let _ = c.shutdown(Shutdown::Both);
    drop(sockets);
    Ok(out)
}

/// The throttle driver: the daemon's rules for one direction, nothing else.
#[allow(clippy::too_many_arguments)]
fn drive(
    args: &Args,
    side: usize,
    maps: &Mutex<Maps>,
    shared: &Shared,
    sockets: &[TcpStream; 2],
    cookies: [u64; 2],
    base: &[u64],
    deadline: Instant,
    mut rng: Rng,
) {
    let peer = 1 - side;
    let cookie = cookies[side];
    let source = &sockets[side];
    let sink = &sockets[peer];
    if source.set_nonblocking(true).is_err() {
        return;
    }
    let _ = sink.set_write_timeout(Some(Duration::from_millis(200)));
    let mut entry = PeerEntry {
        peer_cookie: cookies[peer],
        direction: if side == 0 {
            direction::TO_UPSTREAM
        } else {
            direction::TO_CLIENT
        },
        throttled: throttle::OFF,
        signal_at: u64::MAX,
        daemon_read: 0,
        hard_limit: u64::MAX,
    };
    let mut buf = vec![0u8; args.read_size];
    let mut peek_buf = if args.peek {
        vec![0u8; args.read_size]
    } else {
        Vec::new()
    };
    let mut daemon_read = 0u64;
    let mut daemon_written = 0u64;
    let live = || !shared.stop.load(Relaxed) && Instant::now() < deadline;
    let note = |s: String| {
        let mut n = shared.note.lock().unwrap_or_else(|p| p.into_inner());
        if n.len() < 2000 {
            n.push_str(&s);
            n.push_str("; ");
        }
    };
    // Wait for the first throttle point.
    while live() && counters(maps, cookie).bytes < args.after {
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut first = true;
    while live() {
        // Throttle.
        if shared.throttles.load(Relaxed) < 4 {
            let c = counters(maps, cookie);
            note(format!(
                "throttle #{}: redirected {} passed {} entry.daemon_read {} read {}",
                shared.throttles.load(Relaxed),
                c.bytes,
                c.passed_bytes,
                entry.daemon_read,
                daemon_read
            ));
        }
        entry.throttled = throttle::ON;
        set_entry(maps, cookie, entry);
        // Barrier: the socket lock every verdict runs under.
        let _ = set_rcvlowat(source.as_fd(), 1);
        if first {
            if let Some(n) = args.rcvbuf {
                let _ = socket2::SockRef::from(source).set_recv_buffer_size(n);
            }
            first = false;
        }
        shared.throttles.fetch_add(1, Relaxed);
        // Wait until the kernel's queue towards the peer is empty.
        let redirected = counters(maps, cookie).bytes;
        loop {
            if !live() {
                return;
            }
            let written =
                (tcp_counts(sink.as_fd()).0 + unacked(sink.as_fd())).saturating_sub(base[peer]);
            if redirected <= written.saturating_sub(daemon_written) {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        // Copy: every read is the stream at `redirected + daemon_read`.
        let hold_until =
            Instant::now() + Duration::from_micros(rng.between(args.hold_us.0, args.hold_us.1));
        let mut handed_back = false;
        while live() && !handed_back {
            if args.fionread {
                let q = queued_in(source.as_fd());
                if q.is_err() || q.is_ok_and(|q| q as usize > max_receive_queue()) {
                    shared.fionread_odd.fetch_add(1, Relaxed);
                }
            }
            if args.peek {
                let _ = peek(source.as_fd(), &mut peek_buf);
            }
            match (&*source).read(&mut buf) {
                Ok(0) => {
                    note("throttled socket read 0".into());
                    return;
                }
                Ok(n) => {
                    shared.reads.fetch_add(1, Relaxed);
                    let at = redirected + daemon_read;
                    let mut guard = shared.bad.lock().unwrap_or_else(|p| p.into_inner());
                    if guard.is_none()
                        && let Some(pos) = first_mismatch(&buf[..n], at)
                    {
                        let bad = bad_at(&buf[..n], pos, at);
                        note(format!(
                            "driver read #{} of {n} bytes at stream offset {at} went bad at +{pos}",
                            shared.reads.load(Relaxed)
                        ));
                        *guard = Some(bad);
                    }
                    drop(guard);
                    daemon_read += n as u64;
                    shared.daemon_read.fetch_add(n as u64, Relaxed);
                    let mut done = 0;
                    while done < n && live() {
                        match (&*sink).write(&buf[done..n]) {
                            Ok(k) => done += k,
                            Err(x)
                                if matches!(
                                    x.kind(),
                                    ErrorKind::WouldBlock
                                        | ErrorKind::TimedOut
                                        | ErrorKind::Interrupted
                                ) => {}
                            Err(_) => return,
                        }
                    }
                    daemon_written += done as u64;
                }
                Err(x) if x.kind() == ErrorKind::WouldBlock => {
                    if args.scenario == Scenario::Toggle && Instant::now() >= hold_until {
                        // The daemon's hand-back rule: counters first, then TCP's count.
                        let c = counters(maps, cookie);
                        let received = tcp_counts(source.as_fd()).1;
                        if received == c.bytes + daemon_read {
                            entry.throttled = throttle::RETURNING;
                            entry.daemon_read = c.passed_bytes;
                            if let Some(grant) = args.grant {
                                entry.hard_limit = c.bytes + grant;
                            }
                            set_entry(maps, cookie, entry);
                            shared.handbacks.fetch_add(1, Relaxed);
                            handed_back = true;
                            continue;
                        }
                    }
                    wait_readable(source.as_fd(), 5);
                }
                Err(x) if x.kind() == ErrorKind::Interrupted => {}
                Err(x) => {
                    note(format!("throttled socket read error {x}"));
                    return;
                }
            }
        }
        // Redirected for a random while, then throttled again.
        let gap = Duration::from_micros(rng.between(args.gap_us.0, args.gap_us.1));
        let until = Instant::now() + gap;
        while live() && Instant::now() < until {
            if args.grant.is_some() {
                // The daemon's check: a passed byte it has not read means the program throttled
                // by itself (hard limit), and only the daemon can move it.
                if counters(maps, cookie).passed_bytes > entry.daemon_read {
                    break;
                }
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            std::thread::sleep(until.saturating_duration_since(Instant::now()).min(gap));
        }
    }
}

/// `ss -tnm`'s memory line (`skmem:(r<rmem_alloc>,rb<rcvbuf>,...,f<forward_alloc>,...)`) of
/// sockets A and B: once every byte has been read, `r` should be 0.
fn skmem(addrs: &[(std::net::SocketAddr, std::net::SocketAddr); 2]) -> String {
    let out = std::process::Command::new("ss")
        .args(["-tanmH"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let flat = out.replace("\n\t", " ").replace("\n ", " ");
    let mut found = Vec::new();
    for (name, (local, peer)) in ["A", "B"].iter().zip(addrs) {
        let (l, p) = (local.to_string(), peer.to_string());
        let line = flat
            .lines()
            .find(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                f.windows(2).any(|w| w[0] == l && w[1] == p)
            })
            .and_then(|line| line.split_whitespace().find(|w| w.starts_with("skmem:")))
            .unwrap_or("?");
        found.push(format!("{name} {line}"));
    }
    found.join(" ")
}

fn dmesg_lines() -> Vec<String> {
    std::process::Command::new("dmesg")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let args = parse_args();
    let pin_dir = format!("/sys/fs/bpf/mqsplice-repro-{}", std::process::id());
    let (programs, maps) = EbpfPrograms::load(&pin_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let maps = Arc::new(Mutex::new(maps));
    let mut rng = Rng(args.seed | 1);
    println!(
        "sockmap_repro {:?} side={} runs={} bytes={} after={} read={} rcvbuf={:?} peek={} fionread={} gap_us={:?} hold_us={:?} seed={} rmem={:?}",
        args.scenario,
        ["a", "b", "both"][args.side],
        args.runs,
        args.bytes,
        args.after,
        args.read_size,
        args.rcvbuf,
        args.peek,
        args.fionread,
        args.gap_us,
        args.hold_us,
        args.seed,
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
            .unwrap_or_default()
            .trim()
    );
    let mut failures = 0;
    let mut flows_total = 0;
    for run in 1..=args.runs {
        let before_dmesg = dmesg_lines();
        let t0 = totals(&maps);
        let started = Instant::now();
        let outs: Vec<std::io::Result<Outcome>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..args.flows)
                .map(|_| {
                    let mut flow_rng = Rng(rng.next() | 1);
                    let (args, maps) = (&args, &maps);
                    scope.spawn(move || run_once(args, maps, &mut flow_rng))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("panic")))
                })
                .collect()
        });
        let secs = started.elapsed().as_secs_f64();
        let t1 = totals(&maps);
        // Give a psock destroy (RCU work) a moment to run before looking at the kernel log.
        std::thread::sleep(Duration::from_millis(300));
        let after_dmesg = dmesg_lines();
        let new: Vec<&String> = after_dmesg
            .iter()
            .skip(before_dmesg.len().min(after_dmesg.len()))
            .filter(|l| l.contains("WARNING") || l.contains("BUG") || l.contains("skmsg"))
            .collect();
        println!(
            "run {run}: {} flows in {secs:.1}s totals: +up {} +down {} +passed {} redirect_failed +{} dmesg_new_warnings {}",
            outs.len(),
            t1.bytes_to_upstream - t0.bytes_to_upstream,
            t1.bytes_to_client - t0.bytes_to_client,
            t1.passed_bytes - t0.passed_bytes,
            t1.redirect_failed - t0.redirect_failed,
            new.len(),
        );
        for (flow, out) in outs.into_iter().enumerate() {
            let out = out?;
            let ok = out.client_bad.is_none()
                && out.driver_bad.is_none()
                && out.excess == 0
                && !out.stalled;
            flows_total += 1;
            if !ok {
                failures += 1;
            }
            println!(
                " flow {run}.{flow}: {} received {} ({:.0} MB/s) excess {} throttles {} handbacks {} daemon_read {} reads {} fionread_odd {}",
                if ok { "OK" } else { "FAIL" },
                out.received,
                out.received as f64 / secs / 1e6,
                out.excess,
                out.throttles,
                out.handbacks,
                out.daemon_read,
                out.reads,
                out.fionread_odd,
            );
            if out.stalled {
                println!("  stalled (no progress, or the {:?} cap)", args.timeout);
            }
            if let Some(b) = &out.client_bad {
                println!("  client: {b}");
            }
            if let Some(b) = &out.driver_bad {
                println!("  throttled-socket read: {b}");
            }
            println!("  {}", out.note);
        }
        for l in new.iter().take(5) {
            println!("  dmesg: {l}");
        }
    }
    println!(
        "summary {:?} side={} read={} flows={} grant={:?} pause={} : {failures} of {flows_total} flows failed",
        args.scenario,
        ["a", "b", "both"][args.side],
        args.read_size,
        args.flows,
        args.grant,
        args.reader_pause_us,
    );
    drop(programs);
    Ok(())
}
