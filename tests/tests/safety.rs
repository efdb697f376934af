//! What must hold however flows end and however fast their peers are: many flows closed three
//! ways lose nothing and leave nothing behind; resets mid-flow deliver what was acknowledged and
//! close the other side; a global in-flight limit throttles fast clients; a spliced bulk transfer
//! does not wake the daemon; `auto` falls back to userspace and says why. The daemon runs as the
//! built binary (`MQSPLICE_BIN`); the eBPF tests need root (see `Mode::runnable`).

use mqsplice_tests::daemon::write_config;
use mqsplice_tests::flows::{
    End, KIB, MIB, Received, Rng, bytes_acked, connect_flow, flow_backend, flow_connect,
    linger_zero, read_stream, voluntary_ctxt_switches, wait_for, world_readable, write_stream,
};
use mqsplice_tests::setup::Setup;
use mqsplice_tests::stats::{Stats, fetch, splice};
use mqsplice_tests::{Mode, maps, unique_pin_dir};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// Per-flow results a broker stand-in hands back, by flow index.
type Results<T> = Arc<Mutex<HashMap<usize, T>>>;

/// Waits (bounded) until the daemon has no connection open, then checks that the eBPF maps are
/// empty; returns the last stats.
fn settled(mode: Mode, stats_addr: SocketAddr) -> Stats {
    let mut json = fetch(stats_addr);
    wait_for(Duration::from_secs(15), || {
        json = fetch(stats_addr);
        json.connections.active == 0
    });
    assert_eq!(
        json.connections.active, 0,
        "{mode:?}: flows left open: {json:?}"
    );
    if mode == Mode::Sockmap {
        let pin = &splice(&json).expect("splice figures").bpffs_pin;
        assert_eq!(
            maps::flow_entries(pin),
            [0, 0, 0],
            "socks/peers/counters entries left in {pin}"
        );
    }
    json
}

// ---------------------------------------------------------------------------------------------
// 200 flows, 50 at a time, closed three ways.

/// How a flow of the close test ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Both send at once; the client shuts its write side and reads to EOF; the broker closes
    /// after its own stream is sent and the client's EOF is read.
    HalfClose,
    /// The broker sends first; the client reads all of it, then writes and closes fully at once.
    ClientClosesAtOnce,
    /// The client sends first; the broker reads all of it, then writes and closes fully at once.
    BrokerClosesFirst,
}

/// One flow of the plan: bytes each way and how it ends.
#[derive(Debug, Clone, Copy)]
struct Plan {
    up: u64,
    down: u64,
    way: Way,
}

/// Fixed-seed plan: sizes log-uniform 1 KiB–16 MiB each way, the three ways round robin.
fn plan(flows: usize) -> Vec<Plan> {
    let mut rng = Rng::new(20_261_125);
    let ways = [
        Way::HalfClose,
        Way::ClientClosesAtOnce,
        Way::BrokerClosesFirst,
    ];
    (0..flows)
        .map(|i| Plan {
            up: rng.log_uniform(KIB, 16 * MIB),
            down: rng.log_uniform(KIB, 16 * MIB),
            way: ways[i % 3],
        })
        .collect()
}

/// Stream seeds: client → broker and broker → client of flow `i`.
fn seeds(i: usize) -> (u64, u64) {
    (1000 + 2 * i as u64, 1001 + 2 * i as u64)
}

const IDLE: Duration = Duration::from_secs(30);

/// The broker's side of flow `i`: (digest it sent, what it received).
fn broker_role(i: usize, mut s: TcpStream, p: Plan) -> ([u8; 32], Received) {
    let (_, down_seed) = seeds(i);
    match p.way {
        Way::HalfClose => {
            let mut tx = s.try_clone().unwrap();
            let writer = thread::spawn(move || {
                let d = write_stream(&mut tx, down_seed, p.down);
                tx.shutdown(Shutdown::Write).unwrap();
                d
            });
            let got = read_stream(&mut s, None, IDLE, None);
            (writer.join().unwrap(), got)
        }
        Way::ClientClosesAtOnce => {
            let sent = write_stream(&mut s, down_seed, p.down);
            (sent, read_stream(&mut s, None, IDLE, None))
        }
        Way::BrokerClosesFirst => {
            let got = read_stream(&mut s, Some(p.up), IDLE, None);
            let sent = write_stream(&mut s, down_seed, p.down);
            drop(s);
            (sent, got)
        }
    }
}

/// The client's side of flow `i`: (digest it sent, what it received).
fn client_role(i: usize, addr: SocketAddr, p: Plan) -> ([u8; 32], Received) {
    let (up_seed, _) = seeds(i);
    let mut s = connect_flow(addr, i);
    match p.way {
        Way::HalfClose => {
            let mut tx = s.try_clone().unwrap();
            let writer = thread::spawn(move || {
                let d = write_stream(&mut tx, up_seed, p.up);
                tx.shutdown(Shutdown::Write).unwrap();
                d
            });
            let got = read_stream(&mut s, None, IDLE, None);
            (writer.join().unwrap(), got)
        }
        Way::ClientClosesAtOnce => {
            let got = read_stream(&mut s, Some(p.down), IDLE, None);
            let sent = write_stream(&mut s, up_seed, p.up);
            drop(s);
            (sent, got)
        }
        Way::BrokerClosesFirst => {
            let sent = write_stream(&mut s, up_seed, p.up);
            (sent, read_stream(&mut s, None, IDLE, None))
        }
    }
}

fn close_three_ways(mode: Mode) {
    const FLOWS: usize = 200;
    const AT_ONCE: usize = 50;
    let started = Instant::now();
    let plans = Arc::new(plan(FLOWS));
    let total: u64 = plans.iter().map(|p| p.up + p.down).sum();
    println!("{mode:?}: {FLOWS} flows, {} MiB in all", total / MIB);
    let at_broker: Results<([u8; 32], Received)> = Arc::default();
    let (results, roles) = (at_broker.clone(), plans.clone());
    let broker = flow_backend(move |i, s| {
        let r = broker_role(i, s, roles[i]);
        results.lock().unwrap().insert(i, r);
    });
    let daemon = Setup::tcp(mode, &[broker]).spawn_graceful();
    let (listen, stats_addr) = (daemon.listen, daemon.stats);
    let baseline = daemon.open_fds();

    let workers: Vec<_> = (0..AT_ONCE)
        .map(|w| {
            let plans = plans.clone();
            thread::spawn(move || {
                (w..FLOWS)
                    .step_by(AT_ONCE)
                    .map(|i| (i, client_role(i, listen, plans[i])))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut at_client = HashMap::new();
    for w in workers {
        at_client.extend(w.join().expect("a client role panicked"));
    }
    assert!(
        wait_for(Duration::from_secs(30), || at_broker.lock().unwrap().len()
            == FLOWS),
        "{mode:?}: broker roles finished for only {} of {FLOWS} flows",
        at_broker.lock().unwrap().len()
    );
    let at_broker = at_broker.lock().unwrap();
    for (i, p) in plans.iter().enumerate() {
        let (up_sent, down_got) = at_client[&i];
        let (down_sent, up_got) = at_broker[&i];
        let (up_end, down_end) = match p.way {
            Way::HalfClose => (End::Eof, End::Eof),
            Way::ClientClosesAtOnce => (End::Eof, End::Limit),
            Way::BrokerClosesFirst => (End::Limit, End::Eof),
        };
        assert_eq!(
            (up_got.len, up_got.end, up_got.digest == up_sent),
            (p.up, up_end, true),
            "{mode:?} flow {i} {p:?}: client → broker stream (length, end, digest matches)"
        );
        assert_eq!(
            (down_got.len, down_got.end, down_got.digest == down_sent),
            (p.down, down_end, true),
            "{mode:?} flow {i} {p:?}: broker → client stream (length, end, digest matches)"
        );
    }
    let json = settled(mode, stats_addr);
    println!("{mode:?}: dataplane {:?}", json.dataplane);
    assert!(
        wait_for(Duration::from_secs(10), || daemon.open_fds() <= baseline),
        "{mode:?}: descriptors {baseline} at start, {} after {FLOWS} flows",
        daemon.open_fds()
    );
    println!("{mode:?}: took {:?}", started.elapsed());
}

#[test]
fn userspace_200_flows_50_at_a_time_close_three_ways_losing_nothing() {
    close_three_ways(Mode::Userspace);
}

#[test]
fn ebpf_200_flows_50_at_a_time_close_three_ways_losing_nothing() {
    if !Mode::Sockmap.runnable() {
        return;
    }
    close_three_ways(Mode::Sockmap);
}

// ---------------------------------------------------------------------------------------------
// Global in-flight limit.

#[test]
fn ebpf_global_limit_throttles_100_fast_clients_to_one_slow_broker() {
    if !Mode::Sockmap.runnable() {
        return;
    }
    const CLIENTS: usize = 100;
    const EACH: u64 = 8 * MIB;
    let started = Instant::now();
    let at_broker: Results<Received> = Arc::default();
    let results = at_broker.clone();
    // 64 KiB every 5 ms per connection: far slower than a client can write.
    let broker = flow_backend(move |i, mut s| {
        let got = read_stream(
            &mut s,
            None,
            Duration::from_secs(60),
            Some((64 * KIB as usize, Duration::from_millis(5))),
        );
        results.lock().unwrap().insert(i, got);
    });
    let daemon = Setup::tcp(Mode::Sockmap, &[broker])
        .max_inflight_per_flow("64MiB")
        .max_inflight_total("16MiB")
        .spawn_graceful();
    let (listen, stats_addr) = (daemon.listen, daemon.stats);

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let polls = Arc::new(AtomicU64::new(0));
    let poller = {
        let (stop, peak, polls) = (stop.clone(), peak.clone(), polls.clone());
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Relaxed) && Instant::now() < deadline {
                if let Some(n) = splice(&fetch(stats_addr)).map(|s| s.inflight_bytes) {
                    peak.fetch_max(n, Relaxed);
                    polls.fetch_add(1, Relaxed);
                }
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            thread::spawn(move || {
                let mut s = connect_flow(listen, i);
                s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
                let sent = write_stream(&mut s, 5000 + i as u64, EACH);
                s.shutdown(Shutdown::Write).unwrap();
                let end = read_stream(&mut s, None, Duration::from_secs(60), None).end;
                (sent, end)
            })
        })
        .collect();
    let sent: Vec<_> = clients
        .into_iter()
        .map(|c| c.join().expect("a client panicked"))
        .collect();
    let all_in = wait_for(Duration::from_secs(30), || {
        at_broker.lock().unwrap().len() == CLIENTS
    });
    stop.store(true, Relaxed);
    poller.join().unwrap();
    let took = started.elapsed();
    assert!(
        all_in,
        "only {} flows reached the broker",
        at_broker.lock().unwrap().len()
    );
    let at_broker = at_broker.lock().unwrap();
    for (i, (digest, end)) in sent.iter().enumerate() {
        let got = at_broker[&i];
        assert_eq!(
            (got.len, got.end, got.digest == *digest),
            (EACH, End::Eof, true),
            "flow {i}: length, end, digest matches"
        );
        assert_eq!(
            *end,
            End::Eof,
            "flow {i}: the client did not see the broker's close"
        );
    }
    let json = settled(Mode::Sockmap, stats_addr);
    let dataplane = &json.dataplane;
    let throttles = splice(&json).map(|s| s.throttles_total);
    let peak = peak.load(Relaxed);
    println!(
        "{CLIENTS} × 8 MiB in {took:?}: peak inflight_bytes {} KiB over {} polls; {dataplane:?}",
        peak / KIB,
        polls.load(Relaxed)
    );
    let mut failures = Vec::new();
    if polls.load(Relaxed) == 0 {
        failures.push("dataplane.inflight_bytes was never reported".to_string());
    }
    if throttles.is_none_or(|n| n == 0) {
        failures.push(format!(
            "dataplane.throttles_total is {throttles:?}, not > 0"
        ));
    }
    if peak > 24 * MIB {
        failures.push(format!(
            "peak inflight_bytes {} KiB > 16 MiB + 8 MiB slack",
            peak / KIB
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("; "));
    assert!(took < Duration::from_secs(120), "took {took:?}");
}

/// Full-duplex flows whose readers are slow on both sides: every direction keeps being throttled
/// and handed back. The bytes the daemon holds stay within `max_daemon_held_total`, both streams
/// of every flow arrive intact, and once the flows are gone the daemon's memory is back within
/// 10 MB of what it was before the load.
#[test]
fn ebpf_throttled_full_duplex_flows_stay_within_the_daemon_bounds_and_give_memory_back() {
    if !Mode::Sockmap.runnable() {
        return;
    }
    const FLOWS: usize = 40;
    const EACH: u64 = 8 * MIB;
    const HELD_TOTAL: u64 = 4 * MIB;
    const WARM_UP: usize = 999;
    let slow = Some((64 * KIB as usize, Duration::from_millis(4)));
    let started = Instant::now();
    let at_broker: Results<([u8; 32], Received)> = Arc::default();
    let results = at_broker.clone();
    let broker = flow_backend(move |i, mut s| {
        if i == WARM_UP {
            let _ = read_stream(&mut s, None, Duration::from_secs(10), None);
            return;
        }
        let mut tx = s.try_clone().unwrap();
        let writer = thread::spawn(move || {
            tx.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
            let d = write_stream(&mut tx, 9001 + 2 * i as u64, EACH);
            tx.shutdown(Shutdown::Write).unwrap();
            d
        });
        let got = read_stream(&mut s, None, Duration::from_secs(60), slow);
        let sent = writer.join().unwrap();
        results.lock().unwrap().insert(i, (sent, got));
    });
    let daemon = Setup::tcp(Mode::Sockmap, &[broker])
        .max_inflight_per_flow("64KiB")
        .max_daemon_held_total(HELD_TOTAL)
        .spawn_graceful();
    let (listen, stats_addr) = (daemon.listen, daemon.stats);
    // A warmed-up idle instance: one flow through it first.
    {
        let mut s = connect_flow(listen, WARM_UP);
        s.shutdown(Shutdown::Write).unwrap();
        let _ = read_stream(&mut s, None, Duration::from_secs(10), None);
    }
    let fresh_kib = daemon.rss_kib();

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let poller = {
        let (stop, peak) = (stop.clone(), peak.clone());
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Relaxed) && Instant::now() < deadline {
                if let Some(n) = splice(&fetch(stats_addr)).map(|s| s.daemon_held_bytes) {
                    peak.fetch_max(n, Relaxed);
                }
                thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let clients: Vec<_> = (0..FLOWS)
        .map(|i| {
            thread::spawn(move || {
                let mut s = connect_flow(listen, i);
                let mut tx = s.try_clone().unwrap();
                let writer = thread::spawn(move || {
                    tx.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
                    let d = write_stream(&mut tx, 9000 + 2 * i as u64, EACH);
                    tx.shutdown(Shutdown::Write).unwrap();
                    d
                });
                let got = read_stream(&mut s, None, Duration::from_secs(60), slow);
                (writer.join().unwrap(), got)
            })
        })
        .collect();
    let at_client: Vec<_> = clients
        .into_iter()
        .map(|c| c.join().expect("a client panicked"))
        .collect();
    let all_in = wait_for(Duration::from_secs(30), || {
        at_broker.lock().unwrap().len() == FLOWS
    });
    stop.store(true, Relaxed);
    poller.join().unwrap();
    let took = started.elapsed();
    assert!(
        all_in,
        "only {} flows ended at the broker",
        at_broker.lock().unwrap().len()
    );
    let at_broker = at_broker.lock().unwrap();
    for (i, (client_sent, client_got)) in at_client.iter().enumerate() {
        let (broker_sent, broker_got) = at_broker[&i];
        assert_eq!(
            (
                broker_got.len,
                broker_got.end,
                broker_got.digest == *client_sent
            ),
            (EACH, End::Eof, true),
            "flow {i} client → broker: length, end, digest matches"
        );
        assert_eq!(
            (
                client_got.len,
                client_got.end,
                client_got.digest == broker_sent
            ),
            (EACH, End::Eof, true),
            "flow {i} broker → client: length, end, digest matches"
        );
    }
    let json = settled(Mode::Sockmap, stats_addr);
    let dataplane = &json.dataplane;
    let (throttles, held) = match splice(&json) {
        Some(s) => (Some(s.throttles_total), Some(s.daemon_held_bytes)),
        None => (None, None),
    };
    let peak = peak.load(Relaxed);
    // Memory freed by the allocator may take a moment to be returned.
    let mut rss_kib = daemon.rss_kib();
    wait_for(Duration::from_secs(3), || {
        rss_kib = daemon.rss_kib();
        rss_kib <= fresh_kib + 10 * 1024
    });
    println!(
        "{FLOWS} flows × 8 MiB each way in {took:?}: peak daemon_held_bytes {} KiB; RSS {} KiB idle \
         before, {} KiB after; {dataplane:?}",
        peak / KIB,
        fresh_kib,
        rss_kib
    );
    let mut failures = Vec::new();
    if throttles.is_none_or(|n| n < FLOWS as u64) {
        failures.push(format!("only {throttles:?} throttles"));
    }
    if peak > HELD_TOTAL {
        failures.push(format!("peak daemon_held_bytes {peak} > {HELD_TOTAL}"));
    }
    if held != Some(0) {
        failures.push(format!("{held:?} bytes still held"));
    }
    if rss_kib > fresh_kib + 10 * 1024 {
        failures.push(format!(
            "RSS {rss_kib} KiB, {fresh_kib} KiB before the load"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("; "));
}

// ---------------------------------------------------------------------------------------------
// Resets mid-flow.

/// The stats' `dataplane.closes.rst` counted at least once (eBPF only).
fn rst_counted(mode: Mode, json: &Stats) {
    if mode == Mode::Sockmap {
        assert!(
            splice(json).is_some_and(|s| s.closes.rst >= 1),
            "closes.rst not counted: {:?}",
            json.dataplane
        );
    }
}

/// A client sending fast closes with unread input, so its kernel sends a RST: every byte it
/// had acknowledged reaches the broker, in order, and the broker then sees a FIN.
fn client_rst_while_sending(mode: Mode) {
    const SEED: u64 = 77;
    let (tx, rx) = mpsc::channel();
    let broker = flow_backend(move |_, mut s| {
        // Bytes the client never reads: its close becomes a reset.
        s.write_all(b"unread").unwrap();
        let got = read_stream(
            &mut s,
            None,
            Duration::from_secs(30),
            Some((64 * KIB as usize, Duration::from_millis(2))),
        );
        let _ = tx.send(got);
    });
    let daemon = Setup::tcp(mode, &[broker]).spawn_graceful();
    let (listen, stats_addr) = (daemon.listen, daemon.stats);
    let mut client = connect_flow(listen, 0);
    let mut peeked = [0u8; 1];
    assert_eq!(
        client.peek(&mut peeked).unwrap(),
        1,
        "the unread bytes did not arrive"
    );

    // Send for one second, as fast as the slow broker lets us.
    client
        .set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut sent = 0u64;
    let until = Instant::now() + Duration::from_secs(1);
    let mut k = u64::MAX;
    let mut current = Vec::new();
    while Instant::now() < until && sent < 256 * MIB {
        if sent / MIB != k {
            k = sent / MIB;
            current = mqsplice_tests::flows::chunk(SEED, k);
        }
        match client.write(&current[(sent % MIB) as usize..]) {
            Ok(n) => sent += n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("{mode:?}: client write after {sent} bytes: {e}"),
        }
    }
    let acked = bytes_acked(&client) - 1 - flow_connect(0).len() as u64;
    drop(client);
    let got = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the broker never finished reading");
    println!(
        "{mode:?}: client sent {} KiB, {} KiB acknowledged, broker got {} KiB, then {:?}",
        sent / KIB,
        acked / KIB,
        got.len / KIB,
        got.end
    );
    assert!(
        got.len >= acked && got.len <= sent,
        "{mode:?}: the broker got {} bytes; the client had {acked} acknowledged of {sent} sent",
        got.len
    );
    assert!(
        got.digest == mqsplice_tests::flows::digest_of(SEED, got.len),
        "{mode:?}: the {} bytes the broker got are not a prefix of what the client sent",
        got.len
    );
    assert_eq!(got.end, End::Eof, "{mode:?}: the broker saw no clean FIN");
    let json = settled(mode, stats_addr);
    rst_counted(mode, &json);
}

/// A broker reset mid-flow closes the client's side within a few seconds.
fn broker_rst(mode: Mode) {
    let (tx, rx) = mpsc::channel();
    let broker = flow_backend(move |_, mut s| {
        let got = read_stream(&mut s, Some(4 * MIB), Duration::from_secs(10), None);
        linger_zero(&s);
        drop(s);
        let _ = tx.send((got, Instant::now()));
    });
    let daemon = Setup::tcp(mode, &[broker]).spawn_graceful();
    let (listen, stats_addr) = (daemon.listen, daemon.stats);
    let client = connect_flow(listen, 0);
    let mut tx = client.try_clone().unwrap();
    let writer = thread::spawn(move || {
        tx.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let chunk = mqsplice_tests::flows::chunk(1, 0);
        for _ in 0..256 {
            if tx.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let (got, reset_at) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the broker did not read 4 MiB");
    assert_eq!(got.end, End::Limit, "{mode:?}: broker read {got:?}");
    let mut client = client;
    let end = read_stream(&mut client, None, Duration::from_secs(5), None).end;
    let after = reset_at.elapsed();
    println!("{mode:?}: the client saw {end:?} {after:?} after the broker's reset");
    assert!(
        matches!(end, End::Eof | End::Reset) && after < Duration::from_secs(5),
        "{mode:?}: the client side was not closed within 5 s of the broker's reset ({end:?})"
    );
    drop(client);
    writer.join().unwrap();
    let json = settled(mode, stats_addr);
    rst_counted(mode, &json);
}

/// A client reset mid-flow (killed: SO_LINGER 0) closes the broker's side within a few seconds.
fn client_rst(mode: Mode) {
    let (tx, rx) = mpsc::channel();
    let broker = flow_backend(move |_, mut s| {
        let mut out = s.try_clone().unwrap();
        let writer = thread::spawn(move || {
            out.set_write_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let chunk = mqsplice_tests::flows::chunk(2, 0);
            for _ in 0..256 {
                if out.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let got = read_stream(&mut s, None, Duration::from_secs(30), None);
        let _ = tx.send((got, Instant::now()));
        writer.join().unwrap();
    });
    let daemon = Setup::tcp(mode, &[broker]).spawn_graceful();
    let (listen, stats_addr) = (daemon.listen, daemon.stats);
    let mut client = connect_flow(listen, 0);
    let got = read_stream(&mut client, Some(4 * MIB), Duration::from_secs(10), None);
    assert_eq!(got.end, End::Limit, "{mode:?}: client read {got:?}");
    linger_zero(&client);
    let reset_at = Instant::now();
    drop(client);
    let (got, closed_at) = rx
        .recv_timeout(Duration::from_secs(40))
        .expect("the broker role never ended");
    let after = closed_at.saturating_duration_since(reset_at);
    println!(
        "{mode:?}: the broker saw {:?} {after:?} after the client's reset",
        got.end
    );
    assert!(
        matches!(got.end, End::Eof | End::Reset) && after < Duration::from_secs(5),
        "{mode:?}: the broker side was not closed within 5 s of the client's reset ({:?})",
        got.end
    );
    let json = settled(mode, stats_addr);
    rst_counted(mode, &json);
}

#[test]
fn userspace_reset_mid_flow_by_a_client_with_unread_input_delivers_every_acked_byte_then_fin() {
    client_rst_while_sending(Mode::Userspace);
}

#[test]
fn ebpf_reset_mid_flow_by_a_client_with_unread_input_delivers_every_acked_byte_then_fin() {
    if !Mode::Sockmap.runnable() {
        return;
    }
    client_rst_while_sending(Mode::Sockmap);
}

#[test]
fn userspace_reset_mid_flow_by_the_broker_closes_the_client() {
    broker_rst(Mode::Userspace);
}

#[test]
fn ebpf_reset_mid_flow_by_the_broker_closes_the_client() {
    if !Mode::Sockmap.runnable() {
        return;
    }
    broker_rst(Mode::Sockmap);
}

#[test]
fn userspace_reset_mid_flow_by_a_killed_client_closes_the_broker() {
    client_rst(Mode::Userspace);
}

#[test]
fn ebpf_reset_mid_flow_by_a_killed_client_closes_the_broker() {
    if !Mode::Sockmap.runnable() {
        return;
    }
    client_rst(Mode::Sockmap);
}

// ---------------------------------------------------------------------------------------------
// A spliced bulk transfer does not wake the daemon.

#[test]
fn ebpf_512_mib_spliced_transfer_costs_under_2000_voluntary_context_switches() {
    if !Mode::Sockmap.runnable() {
        return;
    }
    const LEN: u64 = 512 * MIB;
    let (tx, rx) = mpsc::channel();
    let broker = flow_backend(move |_, mut s| {
        let _ = tx.send(read_stream(
            &mut s,
            Some(LEN),
            Duration::from_secs(30),
            None,
        ));
    });
    let daemon = Setup::tcp(Mode::Sockmap, &[broker]).spawn_graceful();
    let (listen, stats_addr) = (daemon.listen, daemon.stats);
    let mut client = connect_flow(listen, 0);
    assert!(
        wait_for(Duration::from_secs(5), || {
            splice(&fetch(stats_addr)).is_some_and(|s| s.spliced_active == 1)
        }),
        "the flow was not spliced: {:?}",
        fetch(stats_addr).dataplane
    );
    let pid = daemon.child.id();
    let before = voluntary_ctxt_switches(pid);
    let started = Instant::now();
    let sent = write_stream(&mut client, 9, LEN);
    let got = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the broker did not get 512 MiB");
    let switches = voluntary_ctxt_switches(pid) - before;
    println!(
        "512 MiB spliced in {:?}: {switches} voluntary context switches in the daemon",
        started.elapsed()
    );
    assert_eq!((got.len, got.digest == sent), (LEN, true), "stream differs");
    assert!(
        switches < 2000,
        "the daemon was woken {switches} times during a spliced transfer"
    );
}

// ---------------------------------------------------------------------------------------------
// `auto` without the means to splice.

/// A daemon child started by hand (as another user), with its stderr collected; killed on drop.
struct Spawned {
    child: std::process::Child,
    stderr: Arc<Mutex<String>>,
}

impl Spawned {
    fn start(command: &mut std::process::Command, stats: SocketAddr) -> Spawned {
        let mut child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn mqsplice");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (pipe, sink) = (child.stderr.take().unwrap(), stderr.clone());
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut all = sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        let spawned = Spawned { child, stderr };
        let up = wait_for(Duration::from_secs(20), || {
            TcpStream::connect(stats).is_ok()
        });
        assert!(up, "the daemon did not serve stats: {}", spawned.stderr());
        spawned
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mode = "auto"` spelled out, with pins under `pin`.
fn auto(brokers: &[SocketAddr], pin: &str) -> Setup {
    Setup::tcp(Mode::Userspace, brokers)
        .auto_mode()
        .bpffs_pin(pin)
}

/// A broker stand-in that answers CONNACK and drains.
fn drain_broker() -> SocketAddr {
    flow_backend(|_, mut s| {
        read_stream(&mut s, None, Duration::from_secs(30), None);
    })
}

/// The daemon at `listen` passes a CONNECT/CONNACK and reports the userspace path.
fn serves_on_userspace(listen: SocketAddr, stats_addr: SocketAddr, stderr: &str) {
    drop(connect_flow(listen, 0));
    let dataplane = fetch(stats_addr).dataplane;
    assert_eq!(
        dataplane.mode, "userspace",
        "{dataplane:?}\nstderr:\n{stderr}"
    );
}

#[test]
fn auto_without_privilege_or_with_a_locked_pin_dir_serves_on_userspace_and_says_why() {
    use std::os::unix::process::CommandExt;
    let broker = drain_broker();

    // (a) As `nobody`, which may not load BPF programs (when not root, as ourselves).
    let (text, listen, stats_addr) = auto(&[broker], &unique_pin_dir()).for_binary();
    let path = write_config(&text);
    world_readable(path.parent().unwrap());
    world_readable(&path);
    let mut command = std::process::Command::new(mqsplice_tests::proxy::binary());
    command.args(["run", "--config"]).arg(&path);
    if Mode::Sockmap.runnable() {
        command.uid(65534).gid(65534);
    }
    let unprivileged = Spawned::start(&mut command, stats_addr);
    if Mode::Sockmap.runnable() {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", unprivileged.child.id())).unwrap();
        assert!(
            status.lines().any(|l| l.starts_with("Uid:\t65534")),
            "the daemon does not run as nobody"
        );
    }
    serves_on_userspace(listen, stats_addr, &unprivileged.stderr());
    // Both halves run and report together, so one missing reason does not hide the other.
    let mut failures = Vec::new();
    wait_for(Duration::from_secs(5), || {
        unprivileged.stderr().contains("not permitted")
    });
    let stderr = unprivileged.stderr();
    if !stderr.contains("not permitted") {
        failures.push(format!(
            "(a) unprivileged auto: stderr does not say \"not permitted\":\n{stderr}"
        ));
    }
    drop(unprivileged);

    // (b) As root, with the pin directory held by a running eBPF instance.
    if !Mode::Sockmap.runnable() {
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        return;
    }
    let holder = Setup::tcp(Mode::Sockmap, &[broker]).spawn_graceful();
    let stats_addr = holder.stats;
    let pin = splice(&fetch(stats_addr))
        .expect("splice figures")
        .bpffs_pin
        .clone();
    let second = auto(&[broker], &pin).spawn_graceful();
    let (listen, stats_addr) = (second.listen, second.stats);
    serves_on_userspace(listen, stats_addr, &second.stderr());
    // The log line is written before stats are served, but reaches us through a pipe and a
    // reader thread, so it may trail.
    let said = wait_for(Duration::from_secs(5), || {
        second
            .stderr()
            .contains("in use by another mqsplice instance")
    });
    if !said {
        failures.push(format!(
            "(b) auto with a held pin directory: stderr does not say \"in use by another \
             mqsplice instance\":\n{}",
            second.stderr()
        ));
    }
    assert!(
        std::path::Path::new(&pin).join("mqs_socks").exists(),
        "the second instance disturbed the first one's pins"
    );
    drop(second);
    drop(holder);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn auto_splices_in_the_kernel_when_the_programs_load_and_check_the_stream() {
    if !Mode::Sockmap.runnable() {
        return;
    }
    let broker = drain_broker();
    let pin = unique_pin_dir();
    let auto = auto(&[broker], &pin).spawn_graceful();
    let (listen, stats_addr) = (auto.listen, auto.stats);
    drop(connect_flow(listen, 0));
    let dataplane = fetch(stats_addr).dataplane;
    assert_eq!(dataplane.requested, "auto", "{dataplane:?}");
    assert_eq!(
        dataplane.mode,
        "sockmap",
        "{dataplane:?}\nstderr:\n{}",
        auto.stderr()
    );
    let splice = dataplane.splice.as_ref();
    assert_eq!(splice.map(|s| s.stream_check), Some(true), "{dataplane:?}");
    assert!(
        splice.is_some_and(|s| s.max_inflight_per_flow >= 64 << 10
            && s.max_inflight_per_flow_source.starts_with("auto")),
        "{dataplane:?}"
    );
}
