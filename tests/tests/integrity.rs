//! Every byte a client sends comes back through an echo broker exactly once and in order, on the
//! default configuration and on each data path chosen explicitly, with default limits: one big
//! full-duplex flow, many parallel ones, a client that stops reading now and then, a broker that
//! reads slowly (issue 14: the sockmap path replayed and hung such flows). Every byte is numbered
//! (`numbered`), so a failure says where and how (a replay and its distance, a loss, a hang).
//! Paho-style disconnects (DISCONNECT with the FIN, a reset right after) and a client that
//! vanishes while throttled close their pairs promptly. After each case nothing is left held:
//! connections, spliced pairs, per-server counts, pinned map entries, and bytes the daemon holds
//! itself (`dataplane.daemon_held_bytes`, when the daemon reports it).
//!
//! The daemon runs as the built binary (`MQSPLICE_BIN`); the sockmap path needs root (see
//! `Mode::runnable`). The cases run one at a time: they share two cores, and a hang is judged by
//! time.

use mqsplice_tests::flows::{Graceful, MIB, connect_flow, flow_backend, linger_zero, wait_for};
use mqsplice_tests::held_bytes::{self, Sampler};
use mqsplice_tests::numbered::client::{FlowSpec, paho_disconnect, run_flows};
use mqsplice_tests::numbered::pauses::Pauses;
use mqsplice_tests::numbered::summary::Summary;
use mqsplice_tests::numbered::upstream::{await_disconnect, echo_backend};
use mqsplice_tests::numbered::{Checker, Numbering};
use mqsplice_tests::settle::settled;
use mqsplice_tests::setup::Setup;
use mqsplice_tests::stats::{fetch, fetch_json as stats, splice};
use mqsplice_tests::{Mode, numbered};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// One case at a time (see the module comment).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The configuration a case runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// No `dataplane.mode` key: `auto`, whatever path it chooses (the userspace path while no
    /// spliced one is proven byte-exact; the case passes only if that choice is exact).
    Default,
    /// `dataplane.mode` set to this path.
    Explicit(Mode),
}

impl Path {
    fn runnable(self) -> bool {
        match self {
            Path::Default => true,
            Path::Explicit(mode) => mode.runnable(),
        }
    }

    /// The setup for `brokers` with default limits; the caller adds dataplane keys.
    fn setup(self, brokers: &[SocketAddr]) -> Setup {
        match self {
            Path::Explicit(mode) => Setup::tcp(mode, brokers),
            // Keeps the unique `bpffs_pin`: `auto` pins there when it loads the programs.
            Path::Default => Setup::tcp(Mode::Sockmap, brokers).default_mode(),
        }
    }
}

/// The daemon for one case, and the path it reports it runs.
fn start(
    path: Path,
    brokers: &[SocketAddr],
    limits: impl FnOnce(Setup) -> Setup,
) -> (Graceful, String) {
    let daemon = limits(path.setup(brokers)).spawn_graceful();
    let running = fetch(daemon.stats).dataplane.mode;
    if let Path::Explicit(mode @ (Mode::Sockmap | Mode::Packet)) = path {
        let name = mode.config_value();
        assert_eq!(running, name, "mode = \"{name}\" runs {running}");
    }
    (daemon, running)
}

/// Nothing held once the flows are done (15 s to settle), and held bytes back to 0.
fn nothing_left(what: &str, stats_addr: SocketAddr) -> Value {
    if let Err(e) = settled(stats_addr, Duration::from_secs(15)) {
        panic!("{what}: {e}");
    }
    stats(stats_addr)
}

/// The held-bytes check, or a printed line saying why it was skipped.
fn held_bytes_bounded(what: &str, samples: &held_bytes::Samples, after: &Value) {
    match held_bytes::judge(samples, after) {
        Ok(Some(peak)) => println!(
            "{what}: dataplane.{} peaked at {} KiB (bound {:?}), 0 after",
            held_bytes::KEY,
            peak >> 10,
            samples.bound
        ),
        Ok(None) => println!(
            "SKIPPED (held bytes): {what}: the daemon does not report dataplane.{}",
            held_bytes::KEY
        ),
        Err(e) => panic!("{what}: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Numbered flows through an echo broker.

/// One shape of load: `flows` flows of `len` bytes each, `rounds` times, on one daemon.
#[derive(Debug, Clone, Copy)]
struct Load {
    name: &'static str,
    rounds: usize,
    flows: usize,
    len: u64,
    pausing_reader: bool,
    slow_broker: bool,
}

const BULK: Load = Load {
    name: "1 flow of 256 MiB",
    rounds: 3,
    flows: 1,
    len: 256 * MIB,
    pausing_reader: false,
    slow_broker: false,
};

const PARALLEL: Load = Load {
    name: "50 parallel flows of 16 MiB",
    rounds: 3,
    flows: 50,
    len: 16 * MIB,
    pausing_reader: false,
    slow_broker: false,
};

const PAUSING_READER: Load = Load {
    name: "20 flows of 32 MiB, readers pausing 30-300 ms every 0.5-4 MiB",
    rounds: 3,
    flows: 20,
    len: 32 * MIB,
    pausing_reader: true,
    slow_broker: false,
};

const SLOW_BROKER: Load = Load {
    name: "20 flows of 16 MiB, the broker sleeping 5-50 ms every 64-512 KiB",
    rounds: 1,
    flows: 20,
    len: 16 * MIB,
    pausing_reader: false,
    slow_broker: true,
};

/// Runs `load` on `path`: every flow must come back whole, nothing may be left held after each
/// round, and (when the daemon reports it) the bytes it holds itself stay bounded.
fn numbered_flows(path: Path, load: Load) {
    if !path.runnable() {
        return;
    }
    let _serial = serial();
    let slow = load.slow_broker;
    let broker = echo_backend(move |i| slow.then(|| Pauses::slow_broker(i as u64)));
    let (daemon, running) = start(path, &[broker], |s| s);
    let what = format!("{path:?} ({running}): {}", load.name);
    let mut all = Summary::default();
    let started = Instant::now();
    for round in 0..load.rounds {
        let specs: Vec<FlowSpec> = (0..load.flows)
            .map(|i| FlowSpec {
                pauses: load
                    .pausing_reader
                    .then(|| Pauses::client((round * 1000 + i) as u64)),
                ..FlowSpec::new(round * 1000 + i, load.len)
            })
            .collect();
        let sampler = Sampler::start(daemon.stats, Duration::from_secs(300));
        let begun = Instant::now();
        let reports = run_flows(daemon.listen, &specs);
        let summary = Summary::of(&reports);
        println!(
            "{what}, round {round}: {summary} in {:.1}s",
            begun.elapsed().as_secs_f64()
        );
        assert_eq!(
            (summary.corrupt, summary.hung, summary.short, summary.bytes),
            (0, 0, 0, load.flows as u64 * load.len),
            "{what}, round {round} (corrupt, hung, short, bytes back): {summary}"
        );
        let after = nothing_left(&format!("{what}, round {round}"), daemon.stats);
        let samples = sampler.finish(&after);
        println!(
            "{what}, round {round}: throttles_total {:?}",
            samples.throttles
        );
        if load.pausing_reader || load.slow_broker {
            held_bytes_bounded(&what, &samples, &after);
        }
        all.merge(&summary);
    }
    let json = fetch(daemon.stats);
    if running == "sockmap" {
        let spliced = splice(&json).map_or(0, |s| s.spliced_total);
        assert!(
            spliced >= all.flows,
            "{what}: only {spliced} of {} flows were spliced",
            all.flows
        );
        // Otherwise this case would not reach the throttle and hand-back it is here for.
        let throttles = splice(&json).map_or(0, |s| s.throttles_total);
        assert!(
            !load.pausing_reader || throttles > 0,
            "{what}: pausing readers never throttled a direction (throttles_total {throttles})"
        );
    }
    if running == "packet" {
        let packet = json.dataplane.packet.clone().unwrap_or_default();
        assert!(
            packet.spliced_total >= all.flows && packet.fallbacks.is_empty(),
            "{what}: {} of {} flows packet-spliced, fallbacks {:?}",
            packet.spliced_total,
            all.flows,
            packet.fallbacks
        );
    }
    println!(
        "{what}: {all} in {:.1}s; dataplane {:?}",
        started.elapsed().as_secs_f64(),
        json.dataplane
    );
}

const USERSPACE: Path = Path::Explicit(Mode::Userspace);
const SOCKMAP: Path = Path::Explicit(Mode::Sockmap);
const PACKET: Path = Path::Explicit(Mode::Packet);

#[test]
fn default_one_256_mib_full_duplex_flow_three_rounds_comes_back_whole() {
    numbered_flows(Path::Default, BULK);
}

#[test]
fn userspace_one_256_mib_full_duplex_flow_three_rounds_comes_back_whole() {
    numbered_flows(USERSPACE, BULK);
}

#[test]
fn sockmap_one_256_mib_full_duplex_flow_three_rounds_comes_back_whole() {
    numbered_flows(SOCKMAP, BULK);
}

#[test]
fn packet_one_256_mib_full_duplex_flow_three_rounds_comes_back_whole() {
    numbered_flows(PACKET, BULK);
}

#[test]
fn default_50_parallel_16_mib_flows_three_rounds_come_back_whole() {
    numbered_flows(Path::Default, PARALLEL);
}

#[test]
fn userspace_50_parallel_16_mib_flows_three_rounds_come_back_whole() {
    numbered_flows(USERSPACE, PARALLEL);
}

#[test]
fn sockmap_50_parallel_16_mib_flows_three_rounds_come_back_whole() {
    numbered_flows(SOCKMAP, PARALLEL);
}

#[test]
fn packet_50_parallel_16_mib_flows_three_rounds_come_back_whole() {
    numbered_flows(PACKET, PARALLEL);
}

#[test]
fn default_readers_pausing_at_random_moments_get_every_byte_once() {
    numbered_flows(Path::Default, PAUSING_READER);
}

#[test]
fn userspace_readers_pausing_at_random_moments_get_every_byte_once() {
    numbered_flows(USERSPACE, PAUSING_READER);
}

#[test]
fn sockmap_readers_pausing_at_random_moments_get_every_byte_once() {
    numbered_flows(SOCKMAP, PAUSING_READER);
}

#[test]
fn packet_readers_pausing_at_random_moments_get_every_byte_once() {
    numbered_flows(PACKET, PAUSING_READER);
}

#[test]
fn default_a_slowly_reading_broker_gets_and_echoes_every_byte_once() {
    numbered_flows(Path::Default, SLOW_BROKER);
}

#[test]
fn userspace_a_slowly_reading_broker_gets_and_echoes_every_byte_once() {
    numbered_flows(USERSPACE, SLOW_BROKER);
}

#[test]
fn sockmap_a_slowly_reading_broker_gets_and_echoes_every_byte_once() {
    numbered_flows(SOCKMAP, SLOW_BROKER);
}

#[test]
fn packet_a_slowly_reading_broker_gets_and_echoes_every_byte_once() {
    numbered_flows(PACKET, SLOW_BROKER);
}

// ---------------------------------------------------------------------------------------------
// Paho-style disconnects.

/// 100 clients each send DISCONNECT with their FIN and reset right after, through a broker that
/// closes on the DISCONNECT: every broker gets the DISCONNECT, every pair is closed within 5 s
/// (far below the 30 s `close_drain_timeout`), logged as the client's close, and nothing is left.
fn paho_disconnects(path: Path) {
    if !path.runnable() {
        return;
    }
    let _serial = serial();
    const CLIENTS: usize = 100;
    let got: Arc<Mutex<HashMap<usize, bool>>> = Arc::default();
    let results = got.clone();
    let broker = flow_backend(move |i, s| {
        let disconnect = await_disconnect(s);
        results.lock().unwrap().insert(i, disconnect);
    });
    let (daemon, running) = start(path, &[broker], |s| s);
    let what = format!("{path:?} ({running}): {CLIENTS} paho-style disconnects");
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let listen = daemon.listen;
            thread::spawn(move || paho_disconnect(listen, i))
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        c.join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{what}: client {i}: {e}"));
    }
    let closed_at = Instant::now();
    let settled_in = settled(daemon.stats, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{what}: pairs not closed within 5 s of the last reset: {e}"));
    assert!(
        wait_for(Duration::from_secs(5), || got.lock().unwrap().len()
            == CLIENTS),
        "{what}: only {} brokers saw their client go",
        got.lock().unwrap().len()
    );
    let missing: Vec<usize> = got
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, disconnect)| !**disconnect)
        .map(|(i, _)| *i)
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: the DISCONNECT did not reach the broker for flows {missing:?}"
    );
    let json = fetch(daemon.stats);
    println!(
        "{what}: settled {settled_in:?} after the last reset ({:?} since); dataplane {:?}",
        closed_at.elapsed(),
        json.dataplane
    );
    // Counted as what it was: the client closed (its FIN came first), or it reset. A flow's
    // record is written after its counters drop (and reaches us through a pipe), so the lines
    // may trail the settled stats a little.
    let flow_lines = |log: &str| log.matches("client_id=\"flow-").count();
    wait_for(Duration::from_secs(5), || {
        flow_lines(&daemon.stderr()) >= CLIENTS
    });
    let log = daemon.stderr();
    let closes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("client_id=\"flow-"))
        .filter_map(|l| l.split(" close=").nth(1))
        .collect();
    let wrong: Vec<&&str> = closes
        .iter()
        .filter(|c| !matches!(**c, "client_closed" | "client_error"))
        .collect();
    assert!(
        closes.len() == CLIENTS && wrong.is_empty(),
        "{what}: {} access log lines, closes other than the client's: {wrong:?}",
        closes.len()
    );
    if running == "sockmap" {
        let c = &splice(&json).expect("splice figures").closes;
        let counted = c.fin_drained + c.rst;
        assert!(
            c.drain_timeout == 0 && c.idle_timeout == 0 && counted == CLIENTS as u64,
            "{what}: closes counted {c:?}, expected {CLIENTS} as fin_drained or rst"
        );
    }
}

#[test]
fn default_paho_style_disconnects_close_every_pair_within_5_s() {
    paho_disconnects(Path::Default);
}

#[test]
fn userspace_paho_style_disconnects_close_every_pair_within_5_s() {
    paho_disconnects(USERSPACE);
}

#[test]
fn sockmap_paho_style_disconnects_close_every_pair_within_5_s() {
    paho_disconnects(SOCKMAP);
}

// Known failing, kept out of CI until fixed: the packet splice's freeze drops a segment that
// carries data, for its sender to send again once the flow is spliced; a paho-style client that
// sends its DISCONNECT and FIN inside that window and resets right after never sends it again,
// and the broker does not get the DISCONNECT (1 to 5 flows of 100 in most runs). Run it with
// `cargo test --test integrity packet_paho -- --ignored`.
#[test]
#[ignore = "packet splice: a DISCONNECT dropped by the freeze and then abandoned by the client's reset is lost (known bug)"]
fn packet_paho_style_disconnects_close_every_pair_within_5_s() {
    paho_disconnects(PACKET);
}

// ---------------------------------------------------------------------------------------------
// A client that vanishes mid-throttle.

/// `close_drain_timeout` in this case: the pair must be gone within it.
const DRAIN: Duration = Duration::from_secs(5);
/// Polling and reaction time allowed on top of it.
const SLACK: Duration = Duration::from_secs(1);

/// The broker floods a client that stops reading after 1 MiB; once the path has throttled (the
/// sockmap path counts it; the userspace path is given 2 s), the client resets. The broker's
/// side is closed and nothing is left within `close_drain_timeout` (5 s here).
fn client_vanishes_mid_throttle(path: Path) {
    if !path.runnable() {
        return;
    }
    let _serial = serial();
    let (tx, rx) = mpsc::channel();
    let broker = flow_backend(move |i, mut s| {
        // Numbered bytes until the daemon closes this side.
        let numbering = Numbering::of(i as u64);
        let _ = s.set_write_timeout(Some(Duration::from_secs(60)));
        let mut buf = vec![0u8; 64 * 1024];
        let mut offset = 0u64;
        let result = loop {
            numbering.fill(offset, &mut buf);
            match s.write_all(&buf) {
                Ok(()) => offset += buf.len() as u64,
                Err(e) => break e,
            }
        };
        let _ = tx.send((offset, result.kind(), Instant::now()));
    });
    let (daemon, running) = start(path, &[broker], |s| {
        s.close_drain_timeout(&format!("{}s", DRAIN.as_secs()))
    });
    let what = format!("{path:?} ({running}): a client vanishing mid-throttle");
    let sampler = Sampler::start(daemon.stats, Duration::from_secs(60));
    let mut client = connect_flow(daemon.listen, 7);
    let mut checker = Checker::new(Numbering::of(7), u64::MAX);
    let mut buf = vec![0u8; 64 * 1024];
    while checker.offset() < MIB {
        let n = client.read(&mut buf).expect("read the flood");
        checker
            .check(&buf[..n])
            .unwrap_or_else(|m| panic!("{what}: {m}"));
    }
    let throttled = if running == "sockmap" {
        wait_for(Duration::from_secs(10), || {
            splice(&fetch(daemon.stats)).is_some_and(|s| s.throttles_total > 0)
        })
    } else {
        thread::sleep(Duration::from_secs(2));
        true
    };
    assert!(throttled, "{what}: the flood was never throttled");
    // SO_LINGER 0: the close resets, as when a client's host drops it.
    linger_zero(&client);
    let reset_at = Instant::now();
    drop(client);
    let gone = settled(daemon.stats, DRAIN + SLACK);
    let broker_end = rx.recv_timeout(DRAIN + SLACK);
    let after = stats(daemon.stats);
    let samples = sampler.finish(&after);
    let closes = splice(&fetch(daemon.stats)).map(|s| s.closes.clone());
    println!(
        "{what}: settled {gone:?} after the reset; the broker's write ended {:?}; closes {:?}",
        broker_end.as_ref().map(|(sent, kind, at)| (
            sent >> 20,
            kind,
            at.saturating_duration_since(reset_at)
        )),
        closes
    );
    if let Err(e) = gone {
        panic!("{what}: not gone within close_drain_timeout ({DRAIN:?}) + {SLACK:?}: {e}");
    }
    assert!(
        broker_end.is_ok(),
        "{what}: the broker's side was not closed within {:?}; its sockets now:\n{}",
        DRAIN + SLACK,
        sockets_of(broker)
    );
    held_bytes_bounded(&what, &samples, &after);
}

/// `ss` on both ends of the connections to `port`: state, queues, window (for a failure message).
fn sockets_of(addr: SocketAddr) -> String {
    let port = addr.port();
    std::process::Command::new("ss")
        .args(["-tanoi", &format!("( sport = :{port} or dport = :{port} )")])
        .output()
        .map_or_else(
            |e| format!("(ss: {e})"),
            |o| String::from_utf8_lossy(&o.stdout).into_owned(),
        )
}

#[test]
fn default_a_client_vanishing_mid_throttle_is_gone_within_close_drain_timeout() {
    client_vanishes_mid_throttle(Path::Default);
}

#[test]
fn userspace_a_client_vanishing_mid_throttle_is_gone_within_close_drain_timeout() {
    client_vanishes_mid_throttle(USERSPACE);
}

#[test]
fn sockmap_a_client_vanishing_mid_throttle_is_gone_within_close_drain_timeout() {
    client_vanishes_mid_throttle(SOCKMAP);
}

/// The engine judges a corrupted stream as corrupt: a test of the tests, so a broken checker
/// cannot pass every case above.
#[test]
fn a_replaying_broker_is_caught_with_its_distance() {
    let broker = flow_backend(|_, mut s| {
        // Read the whole stream first, so the close below leaves nothing unread (no reset).
        let mut buf = vec![0u8; 2 << 20];
        if s.read_exact(&mut buf).is_err() {
            return;
        }
        // Echo the first MiB, then replay the 131,072 bytes before it, then the rest.
        let (first, rest) = buf.split_at(1 << 20);
        let _ = s.write_all(first);
        let _ = s.write_all(&first[first.len() - 131_072..]);
        let _ = s.write_all(rest);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = s.read(&mut buf);
    });
    let reports = run_flows(broker, &[FlowSpec::new(3, 2 * MIB)]);
    match &reports[0].outcome {
        numbered::client::Outcome::Corrupt(m) => assert_eq!(
            m.source,
            numbered::Source::Replay { distance: 131_072 },
            "{m}"
        ),
        other => panic!("a replay judged {other:?}"),
    }
}
