//! Byte-level behaviour of a spliced flow, seen from a raw client and a raw backend: what is
//! forwarded, half-closes in both directions, backpressure, idle timeout and byte counters.

use mqsplice::Running;
use mqsplice_tests::fake::FakeBroker;
use mqsplice_tests::raw::{self, Closed, connect_v311, pattern, publish_qos0};
use mqsplice_tests::setup::{Listener, Setup};
use mqsplice_tests::stats::upstream_servers;
use mqsplice_tests::{Mode, wait_until};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(5);

/// mqsplice on `mode` in front of one fake broker, its listener changed by `listener`.
async fn setup(mode: Mode, listener: impl FnOnce(Listener) -> Listener) -> (Running, FakeBroker) {
    let backend = FakeBroker::start().await;
    let running = Setup::tcp(mode, &[backend.addr])
        .listener_with("mqtt", listener)
        .start()
        .await;
    (running, backend)
}

/// A client whose CONNECT the backend has read (and checked): the flow is in the data plane.
async fn open_flow(
    running: &Running,
    backend: &mut FakeBroker,
    id: &str,
) -> (TcpStream, TcpStream, Vec<u8>) {
    let connect = connect_v311(id);
    let mut client = TcpStream::connect(running.listener_addr("mqtt").unwrap())
        .await
        .unwrap();
    client.write_all(&connect).await.unwrap();
    let mut broker = backend.next(WAIT).await;
    assert_eq!(
        raw::read_exactly(&mut broker, connect.len(), WAIT).await,
        connect
    );
    (client, broker, connect)
}

async fn wait_closed(running: &Running) {
    assert!(
        wait_until(WAIT, || running.typed_stats().connections.active == 0).await,
        "flow did not close: {:?}",
        running.typed_stats()
    );
}

async fn pipelined(mode: Mode) {
    let (running, mut backend) = setup(mode, |l| l).await;
    let mut sent = connect_v311("pipelined");
    sent.extend(publish_qos0("a/1", &pattern(300, 1)));
    sent.extend(publish_qos0("a/2", &pattern(5000, 2)));
    let mut client = TcpStream::connect(running.listener_addr("mqtt").unwrap())
        .await
        .unwrap();
    client.write_all(&sent).await.unwrap(); // CONNECT and both PUBLISHes in one write
    let mut broker = backend.next(WAIT).await;
    assert_eq!(raw::read_exactly(&mut broker, sent.len(), WAIT).await, sent);
    client.shutdown().await.unwrap();
    let (rest, closed) = raw::read_to_close(&mut broker, WAIT).await;
    assert!(
        rest.is_empty(),
        "bytes forwarded twice: {} more",
        rest.len()
    );
    assert_eq!(closed, Closed::Eof);
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_bytes_pipelined_behind_connect_are_forwarded_once_in_order() {
    pipelined(Mode::Userspace).await;
}

async fn client_half_close(mode: Mode) {
    let (running, mut backend) = setup(mode, |l| l).await;
    let (mut client, mut broker, _) = open_flow(&running, &mut backend, "half-close").await;
    let up = pattern(10_000, 3);
    client.write_all(&up).await.unwrap();
    client.shutdown().await.unwrap();

    let (got, closed) = raw::read_to_close(&mut broker, WAIT).await;
    assert_eq!(closed, Closed::Eof, "client FIN reaches the broker");
    assert_eq!(got, up);
    // Only now, with the client's side closed, does the broker answer.
    let down = pattern(100 * 1024, 4);
    broker.write_all(&down).await.unwrap();
    broker.shutdown().await.unwrap();
    drop(broker);

    let (got, closed) = raw::read_to_close(&mut client, WAIT).await;
    assert_eq!(got.len(), down.len(), "reply after the client's FIN");
    assert_eq!(got, down);
    assert_eq!(closed, Closed::Eof);
    wait_closed(&running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_client_half_close_still_gets_the_whole_reply() {
    client_half_close(Mode::Userspace).await;
}

async fn broker_half_close(mode: Mode) {
    let (running, mut backend) = setup(mode, |l| l).await;
    let (mut client, mut broker, _) = open_flow(&running, &mut backend, "reverse").await;
    let down = pattern(1000, 5);
    broker.write_all(&down).await.unwrap();
    broker.shutdown().await.unwrap();

    let (got, closed) = raw::read_to_close(&mut client, WAIT).await;
    assert_eq!(closed, Closed::Eof, "broker FIN reaches the client");
    assert_eq!(got, down);
    // The client keeps sending on its open half; the broker still receives it.
    let up = pattern(50 * 1024, 6);
    client.write_all(&up).await.unwrap();
    assert_eq!(raw::read_exactly(&mut broker, up.len(), WAIT).await, up);
    client.shutdown().await.unwrap();
    let (rest, closed) = raw::read_to_close(&mut broker, WAIT).await;
    assert!(rest.is_empty());
    assert_eq!(closed, Closed::Eof);
    wait_closed(&running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_broker_half_close_keeps_the_client_direction_open() {
    broker_half_close(Mode::Userspace).await;
}

/// This process's resident set in KiB (the proxy runs in process).
fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

async fn stalled_broker(mode: Mode) {
    const LIMIT: usize = 64 * 1024 * 1024;
    let (running, mut backend) = setup(mode, |l| l).await;
    let rss_before = vm_rss_kib();
    // The broker reads the CONNECT, then never reads again (but stays connected).
    let (mut client, _stalled_broker, _) = open_flow(&running, &mut backend, "stalled").await;

    let chunk = pattern(64 * 1024, 7);
    let started = Instant::now();
    let mut last_progress = started;
    let (mut total, mut blocked) = (0usize, false);
    for _ in 0..100_000 {
        if started.elapsed() > Duration::from_secs(5) || total >= LIMIT {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(50), client.write(&chunk)).await {
            Ok(Ok(n)) => {
                total += n;
                last_progress = Instant::now();
            }
            Ok(Err(e)) => panic!("write failed after {total} bytes: {e}"),
            Err(_) => {}
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            blocked = true;
            break;
        }
    }
    let rss_after = vm_rss_kib();
    eprintln!(
        "stalled broker: {total} bytes accepted in {:?}, RSS {rss_before} -> {rss_after} KiB",
        started.elapsed()
    );
    assert!(
        blocked,
        "client never blocked: {total} bytes accepted in {:?}",
        started.elapsed()
    );
    assert!(total < LIMIT, "{total} bytes accepted before blocking");
    let growth_mib = rss_after.saturating_sub(rss_before) / 1024;
    assert!(
        growth_mib <= 32,
        "RSS grew {growth_mib} MiB ({rss_before} -> {rss_after} KiB) with {total} bytes in flight"
    );
    assert_eq!(running.typed_stats().connections.active, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_stalled_broker_blocks_its_client_without_buffering() {
    stalled_broker(Mode::Userspace).await;
}

async fn idle_timeout(mode: Mode) {
    let (running, mut backend) = setup(mode, |l| l.idle_timeout("1s")).await;
    let started = Instant::now();
    let (mut idle_client, mut idle_broker, _) = open_flow(&running, &mut backend, "idle").await;
    let (mut busy_client, mut busy_broker, _) = open_flow(&running, &mut backend, "busy").await;

    let idle = tokio::spawn(async move {
        let (got, _) = raw::read_to_close(&mut idle_client, Duration::from_secs(4)).await;
        (got, started.elapsed())
    });
    // Pacing traffic, not waiting for readiness: a byte every 300 ms for 2.4 s.
    for i in 0..8u8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        busy_client.write_all(&[i]).await.unwrap();
    }
    assert!(started.elapsed() > Duration::from_secs(2));
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(100), busy_client.read(&mut byte))
            .await
            .is_err(),
        "the busy flow was closed (or got bytes) after {:?}",
        started.elapsed()
    );
    assert_eq!(
        raw::read_exactly(&mut busy_broker, 8, WAIT).await,
        (0..8u8).collect::<Vec<_>>()
    );

    let (got, closed_after) = idle.await.unwrap();
    assert!(got.is_empty());
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after <= Duration::from_secs(3),
        "idle flow closed after {closed_after:?}, want about 1s"
    );
    let (got, _) = raw::read_to_close(&mut idle_broker, WAIT).await;
    assert!(got.is_empty(), "the idle flow's broker leg is closed too");
    assert_eq!(
        running.typed_stats().connections.active,
        1,
        "busy flow open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_idle_flow_is_closed_and_active_flow_is_not() {
    idle_timeout(Mode::Userspace).await;
}

async fn bytes_counted(mode: Mode) {
    let (running, mut backend) = setup(mode, |l| l).await;
    let (mut client, mut broker, connect) = open_flow(&running, &mut backend, "counted").await;
    let up = pattern(12_345, 8);
    let down = pattern(54_321, 9);
    client.write_all(&up).await.unwrap();
    assert_eq!(raw::read_exactly(&mut broker, up.len(), WAIT).await, up);
    broker.write_all(&down).await.unwrap();
    assert_eq!(raw::read_exactly(&mut client, down.len(), WAIT).await, down);
    client.shutdown().await.unwrap();
    assert_eq!(
        raw::read_to_close(&mut broker, WAIT).await,
        (vec![], Closed::Eof)
    );
    broker.shutdown().await.unwrap();
    assert_eq!(
        raw::read_to_close(&mut client, WAIT).await,
        (vec![], Closed::Eof)
    );
    wait_closed(&running).await;

    let stats = running.typed_stats();
    let to_server = (connect.len() + up.len()) as u64;
    let from_server = down.len() as u64;
    let servers = upstream_servers(&stats);
    let counted: Vec<(u64, u64)> = servers
        .iter()
        .map(|s| (s.bytes_to_server, s.bytes_from_server))
        .collect();
    assert_eq!(counted, vec![(to_server, from_server)], "{stats:?}");
    let listener = &stats.listeners["mqtt"];
    assert_eq!(
        (listener.bytes_from_clients, listener.bytes_to_clients),
        (to_server, from_server),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_bytes_are_counted_exactly_each_way() {
    bytes_counted(Mode::Userspace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_bytes_pipelined_behind_connect_are_forwarded_once_in_order() {
    if Mode::Sockmap.runnable() {
        pipelined(Mode::Sockmap).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_client_half_close_still_gets_the_whole_reply() {
    if Mode::Sockmap.runnable() {
        client_half_close(Mode::Sockmap).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_broker_half_close_keeps_the_client_direction_open() {
    if Mode::Sockmap.runnable() {
        broker_half_close(Mode::Sockmap).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_idle_flow_is_closed_and_active_flow_is_not() {
    if Mode::Sockmap.runnable() {
        idle_timeout(Mode::Sockmap).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_bytes_are_counted_exactly_each_way() {
    if Mode::Sockmap.runnable() {
        bytes_counted(Mode::Sockmap).await;
    }
}
