//! Clients that are not (yet) good MQTT clients: each gets exactly its CONNACK or a silent
//! close, is counted under its reason, never reaches a broker, and leaves the proxy serving.

use mqsplice::Running;
use mqsplice_tests::broker::EmbeddedBroker;
use mqsplice_tests::client::connect;
use mqsplice_tests::flows::Rng;
use mqsplice_tests::raw::{self, Closed, connect_packet, connect_v5, connect_v311};
use mqsplice_tests::setup::{Kind, Listener, Server, Setup, Upstream};
use mqsplice_tests::stats::{REJECT_REASONS, totals};
use mqsplice_tests::{Mode, wait_until};
use rumqttc::QoS;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// What the proxy must answer a bad client.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// Close without sending a byte (FIN or reset).
    Close,
    /// Exactly these bytes, then an orderly EOF.
    Connack(&'static [u8]),
}

struct Case {
    what: &'static str,
    bytes: Vec<u8>,
    answer: Answer,
}

fn case(what: &'static str, bytes: Vec<u8>, answer: Answer) -> Case {
    Case {
        what,
        bytes,
        answer,
    }
}

/// The listener as the setup makes it.
fn plain(listener: Listener) -> Listener {
    listener
}

async fn start(mode: Mode, broker: SocketAddr, listener: fn(Listener) -> Listener) -> Running {
    Setup::tcp(mode, &[broker])
        .listener_with("mqtt", listener)
        .start()
        .await
}

fn short_connect_timeout(listener: Listener) -> Listener {
    listener.connect_packet_timeout("300ms")
}

/// Sends `bytes` as one client would and checks what comes back.
async fn send_expect(addr: SocketAddr, what: &str, bytes: &[u8], answer: Answer) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // A refused client may be reset while still writing; what it reads back is what counts.
    let _ = stream.write_all(bytes).await;
    let (got, closed) = raw::read_to_close(&mut stream, Duration::from_secs(5)).await;
    match answer {
        Answer::Close => assert!(got.is_empty(), "{what}: expected a close, got {got:02x?}"),
        Answer::Connack(connack) => {
            assert_eq!(got, connack, "{what}: CONNACK");
            assert_eq!(closed, Closed::Eof, "{what}: close after the CONNACK");
        }
    }
}

/// Waits until `reason` was counted `n` times globally and on listener `mqtt`, then checks
/// no other reason was counted.
async fn expect_rejected(running: &Running, reason: &str, n: u64, what: &str) {
    let counted = wait_until(Duration::from_secs(5), || {
        let stats = running.typed_stats();
        stats.connections.rejected[reason] == n
            && stats.listeners["mqtt"].connections.rejected[reason] == n
    })
    .await;
    let stats = running.typed_stats();
    assert!(counted, "{what}: {reason} not counted {n} times: {stats:?}");
    for other in REJECT_REASONS.iter().filter(|r| **r != reason) {
        let listener = &stats.listeners["mqtt"].connections;
        assert_eq!(
            (
                stats.connections.rejected[*other],
                listener.rejected[*other]
            ),
            (0, 0),
            "{what}: {other} (everywhere, on listener mqtt)"
        );
    }
}

/// Nothing reached the broker: no flow handled, no connection counted on the server.
fn expect_nothing_reached_broker(running: &Running, what: &str) {
    let stats = running.typed_stats();
    assert_eq!(totals(&stats), vec![0], "{what}: {stats:?}");
    assert_eq!(stats.connections.handled, 0, "{what}: {stats:?}");
}

/// A good client still subscribes and receives its own publish through `addr`.
async fn still_serves(addr: SocketAddr, id: &str) {
    let mut client = connect(addr, id)
        .await
        .unwrap_or_else(|e| panic!("{id}: good client refused after a bad one: {e}"));
    let topic = format!("check/{id}");
    client.subscribe(&topic, QoS::AtMostOnce).await.unwrap();
    client
        .publish(&topic, QoS::AtMostOnce, b"still serving".to_vec())
        .await
        .unwrap();
    let got = client.next_publish(Duration::from_secs(10)).await.unwrap();
    assert_eq!(got.topic, topic);
    assert_eq!(&got.payload[..], b"still serving");
    client.disconnect().await;
}

/// Each case on a fresh proxy: the answer, its counter, no broker reached, still serving.
async fn run_cases(mode: Mode, reason: &str, listener: fn(Listener) -> Listener, cases: Vec<Case>) {
    let broker = EmbeddedBroker::start();
    for (i, case) in cases.into_iter().enumerate() {
        let running = start(mode, broker.addr, listener).await;
        let addr = running.listener_addr("mqtt").unwrap();
        send_expect(addr, case.what, &case.bytes, case.answer).await;
        expect_rejected(&running, reason, 1, case.what).await;
        expect_nothing_reached_broker(&running, case.what);
        still_serves(addr, &format!("good-{reason}-{i}")).await;
    }
}

/// A CONNECT whose remaining length is `cut` bytes short, so its last field runs past the end.
fn truncated(mut packet: Vec<u8>, cut: usize) -> Vec<u8> {
    assert!(packet[1] < 0x80, "single-byte remaining length");
    packet[1] -= cut as u8;
    packet.truncate(packet.len() - cut);
    packet
}

async fn malformed_first_packet(mode: Mode) {
    run_cases(
        mode,
        "malformed",
        plain,
        vec![
            case(
                "PUBLISH first",
                raw::publish_qos0("a/b", b"hi"),
                Answer::Close,
            ),
            case(
                "HTTP request",
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
                Answer::Close,
            ),
            case(
                "CONNECT with reserved flags",
                {
                    let mut p = connect_v311("flags");
                    p[0] = 0x12;
                    p
                },
                Answer::Close,
            ),
            case(
                "5-byte remaining length",
                vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x01],
                Answer::Close,
            ),
            case(
                "3.1.1 client id truncated",
                truncated(connect_v311("truncated"), 4),
                Answer::Close,
            ),
            case(
                "5 client id truncated",
                truncated(connect_v5("truncated"), 4),
                Answer::Close,
            ),
            case(
                "protocol name truncated",
                vec![0x10, 0x04, 0x00, 0x04, b'M', b'Q'],
                Answer::Close,
            ),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_not_a_connect_or_malformed_framing_is_closed() {
    malformed_first_packet(Mode::Userspace).await;
}

async fn bad_protocol(mode: Mode) {
    const UNACCEPTABLE_VERSION: &[u8] = &[0x20, 0x02, 0x00, 0x01];
    run_cases(
        mode,
        "bad_protocol",
        plain,
        vec![
            case(
                "MQTX level 4",
                connect_packet("MQTX", 4, b"x"),
                Answer::Close,
            ),
            case(
                "MQTX level 5",
                connect_packet("MQTX", 5, b"x"),
                Answer::Close,
            ),
            case(
                "MQTT level 6",
                connect_packet("MQTT", 6, b"x"),
                Answer::Connack(UNACCEPTABLE_VERSION),
            ),
            case(
                "MQTT level 2",
                connect_packet("MQTT", 2, b"x"),
                Answer::Connack(UNACCEPTABLE_VERSION),
            ),
            case(
                "MQIsdp level 4",
                connect_packet("MQIsdp", 4, b"x"),
                Answer::Connack(UNACCEPTABLE_VERSION),
            ),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_unknown_protocol_or_level_is_refused() {
    bad_protocol(Mode::Userspace).await;
}

async fn bad_client_id(mode: Mode) {
    const V5_MALFORMED: &[u8] = &[0x20, 0x03, 0x00, 0x81, 0x00];
    run_cases(
        mode,
        "malformed",
        plain,
        vec![
            case(
                "3.1.1 id not UTF-8",
                connect_packet("MQTT", 4, &[b'a', 0xff, 0xfe]),
                Answer::Close,
            ),
            case(
                "3.1.1 id with U+0000",
                connect_packet("MQTT", 4, b"a\0b"),
                Answer::Close,
            ),
            case(
                "5 id not UTF-8",
                connect_packet("MQTT", 5, &[b'a', 0xff, 0xfe]),
                Answer::Connack(V5_MALFORMED),
            ),
            case(
                "5 id with U+0000",
                connect_packet("MQTT", 5, b"a\0b"),
                Answer::Connack(V5_MALFORMED),
            ),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_client_id_not_utf8_is_refused() {
    bad_client_id(Mode::Userspace).await;
}

async fn too_large(mode: Mode) {
    let id = "x".repeat(5000);
    run_cases(
        mode,
        "too_large",
        |l| l.max_connect_size("1KiB"),
        vec![
            case("3.1.1 5000-byte id", connect_v311(&id), Answer::Close),
            case(
                "3.1 5000-byte id",
                connect_packet("MQIsdp", 3, id.as_bytes()),
                Answer::Close,
            ),
            case(
                "5 5000-byte id",
                connect_v5(&id),
                Answer::Connack(&[0x20, 0x03, 0x00, 0x95, 0x00]),
            ),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_connect_over_max_connect_size_is_refused() {
    too_large(Mode::Userspace).await;
}

async fn connect_timeout(mode: Mode) {
    let broker = EmbeddedBroker::start();
    for (i, packet) in [connect_v311("slow"), connect_v5("slow")]
        .into_iter()
        .enumerate()
    {
        let running = start(mode, broker.addr, short_connect_timeout).await;
        let addr = running.listener_addr("mqtt").unwrap();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        stream.write_all(&packet[..packet.len() / 2]).await.unwrap();
        let (got, _) = raw::read_to_close(&mut stream, Duration::from_secs(5)).await;
        let waited = started.elapsed();
        assert!(got.is_empty(), "half CONNECT answered {got:02x?}");
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
            "closed after {waited:?}, want about 300ms"
        );
        expect_rejected(&running, "connect_timeout", 1, "half CONNECT").await;
        expect_nothing_reached_broker(&running, "half CONNECT");
        still_serves(addr, &format!("good-timeout-{i}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_incomplete_connect_times_out() {
    connect_timeout(Mode::Userspace).await;
}

async fn no_upstream(mode: Mode) {
    let broker = EmbeddedBroker::start();
    for (packet, connack) in [
        (connect_v311("nobody"), &[0x20, 0x02, 0x00, 0x03][..]),
        (connect_v5("nobody"), &[0x20, 0x03, 0x00, 0x88, 0x00][..]),
    ] {
        // Nothing listens on a freshly freed port; a second listener keeps a working broker.
        let dead = mqsplice_tests::free_addr();
        let running = Setup::empty()
            .mode(mode)
            .upstream(Upstream::named(
                "brokers",
                [Server::new(&dead.to_string()).max_fails(1)],
            ))
            .upstream(Upstream::new("good", &[broker.addr]))
            .listener(Listener::new("mqtt", Kind::Tcp, "brokers"))
            .listener(Listener::new("good", Kind::Tcp, "good"))
            .start()
            .await;
        let addr = running.listener_addr("mqtt").unwrap();
        send_expect(addr, "no broker", &packet, Answer::Connack(connack)).await;
        expect_rejected(&running, "no_upstream", 1, "no broker").await;
        expect_nothing_reached_broker(&running, "no broker");
        still_serves(running.listener_addr("good").unwrap(), "good-no-upstream").await;
        // And the refused listener itself still answers the next client.
        send_expect(addr, "no broker again", &packet, Answer::Connack(connack)).await;
        expect_rejected(&running, "no_upstream", 2, "no broker again").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_no_broker_available_is_refused() {
    no_upstream(Mode::Userspace).await;
}

async fn over_limit(mode: Mode) {
    let broker = EmbeddedBroker::start();
    let running = start(mode, broker.addr, |l| l.max_connections(2)).await;
    let addr = running.listener_addr("mqtt").unwrap();
    let held = [
        connect(addr, "held-1").await.unwrap(),
        connect(addr, "held-2").await.unwrap(),
    ];
    let started = Instant::now();
    send_expect(addr, "third", &connect_v311("third"), Answer::Close).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "third connection not closed at once: {:?}",
        started.elapsed()
    );
    expect_rejected(&running, "over_limit", 1, "third").await;
    let stats = running.typed_stats();
    assert_eq!(totals(&stats), vec![2], "only the held two: {stats:?}");
    assert_eq!(stats.connections.handled, 2, "{stats:?}");
    for client in held {
        client.disconnect().await;
    }
    assert!(
        wait_until(Duration::from_secs(5), || running
            .typed_stats()
            .connections
            .active
            == 0)
        .await,
        "held connections did not close: {:?}",
        running.typed_stats()
    );
    still_serves(addr, "good-over-limit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_over_max_connections_is_closed() {
    over_limit(Mode::Userspace).await;
}

async fn silent_client(mode: Mode) {
    let broker = EmbeddedBroker::start();
    let running = start(mode, broker.addr, plain).await;
    let addr = running.listener_addr("mqtt").unwrap();
    drop(TcpStream::connect(addr).await.unwrap());
    expect_rejected(&running, "closed", 1, "connect and close").await;
    expect_nothing_reached_broker(&running, "connect and close");
    still_serves(addr, "good-closed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_client_closing_before_connect_is_counted_closed() {
    silent_client(Mode::Userspace).await;
}

/// Panics anywhere in this test process (a proxy task's panic would not fail the test itself).
static PANICS: AtomicUsize = AtomicUsize::new(0);

async fn garbage(mode: Mode) {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Relaxed);
        default_hook(info);
    }));
    let broker = EmbeddedBroker::start();
    let running = start(mode, broker.addr, short_connect_timeout).await;
    let addr = running.listener_addr("mqtt").unwrap();
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    const CONNECTIONS: u64 = 200;
    let fuzz = async {
        for i in 0..CONNECTIONS {
            let len = 100 + (rng.next_u64() % 400) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            match i % 4 {
                // A CONNECT fixed header over garbage: exercises framing.
                1 => bytes[0] = 0x10,
                // A plausible CONNECT start over garbage: exercises field parsing.
                2 | 3 => {
                    let level = if i % 4 == 2 { 4 } else { 5 };
                    let mut head = vec![0x10];
                    head.extend(raw::varint(len + 7));
                    head.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', level]);
                    head.extend(bytes);
                    bytes = head;
                }
                _ => {}
            }
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let _ = stream.write_all(&bytes).await;
            let _ = stream.shutdown().await;
            let _ = raw::read_to_close(&mut stream, Duration::from_secs(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), fuzz)
        .await
        .expect("fuzz loop took over 60s");
    let settled = wait_until(Duration::from_secs(5), || {
        let c = running.typed_stats().connections;
        let rejected: u64 = REJECT_REASONS.iter().map(|r| c.rejected[*r]).sum();
        c.active == 0 && c.accepted == CONNECTIONS && rejected + c.handled == CONNECTIONS
    })
    .await;
    assert!(
        settled,
        "every garbage connection accounted for exactly once: {:?}",
        running.typed_stats()
    );
    eprintln!("after fuzz: {:?}", running.typed_stats().connections);
    assert_eq!(PANICS.load(Relaxed), 0, "something panicked");
    tokio::time::timeout(
        Duration::from_secs(20),
        still_serves(addr, "good-after-fuzz"),
    )
    .await
    .expect("good client after the fuzz loop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_garbage_never_breaks_the_proxy() {
    garbage(Mode::Userspace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_not_a_connect_or_malformed_framing_is_closed() {
    if Mode::Sockmap.runnable() {
        malformed_first_packet(Mode::Sockmap).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_unknown_protocol_or_level_is_refused() {
    if Mode::Sockmap.runnable() {
        bad_protocol(Mode::Sockmap).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_client_id_not_utf8_is_refused() {
    if Mode::Sockmap.runnable() {
        bad_client_id(Mode::Sockmap).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_connect_over_max_connect_size_is_refused() {
    if Mode::Sockmap.runnable() {
        too_large(Mode::Sockmap).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_incomplete_connect_times_out() {
    if Mode::Sockmap.runnable() {
        connect_timeout(Mode::Sockmap).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_no_broker_available_is_refused() {
    if Mode::Sockmap.runnable() {
        no_upstream(Mode::Sockmap).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_over_max_connections_is_closed() {
    if Mode::Sockmap.runnable() {
        over_limit(Mode::Sockmap).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_client_closing_before_connect_is_counted_closed() {
    if Mode::Sockmap.runnable() {
        silent_client(Mode::Sockmap).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_garbage_never_breaks_the_proxy() {
    if Mode::Sockmap.runnable() {
        garbage(Mode::Sockmap).await;
    }
}
