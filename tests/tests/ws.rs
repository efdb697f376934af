//! MQTT over WebSocket: a tokio-tungstenite client through a `ws` listener to a real broker and
//! to raw backends that see the exact bytes; frames cut anywhere; stickiness shared with TCP;
//! every kind of bad input answered, closed and counted. The same client over rustls through a
//! `wss` listener (test PKI from rcgen): ALPN `http/1.1` by default, other ALPN and plain ws
//! bytes refused as TLS handshake failures.

use futures_util::{SinkExt, StreamExt};
use mqsplice::stats::{ListenerStats, WsStats};
use mqsplice_tests::broker::EmbeddedBroker;
use mqsplice_tests::fake::FakeBroker;

use mqsplice_tests::pki::Pki;
use mqsplice_tests::proxy::run_binary;
use mqsplice_tests::raw::{self, Closed, connect_v311};
use mqsplice_tests::setup::{Kind, Listener, Setup, Tls};
use mqsplice_tests::wait_until;
use mqsplice_tests::ws::{self, frame, packet_len, publish_qos1, subscribe, upgrade_request};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const WAIT: Duration = Duration::from_secs(5);
const CONNACK_OK: &[u8] = &[0x20, 0x02, 0x00, 0x00];

/// A tcp listener `mqtt` and a ws listener `ws` on upstream `brokers` with `servers`
/// (dataplane.mode = auto: the ws listener must be userspace regardless).
fn setup(servers: &[SocketAddr]) -> Setup {
    Setup::one(Kind::Tcp, "mqtt", servers).listener(Listener::new("ws", Kind::Ws, "brokers"))
}

/// Only the ws listener (an `upstream_protocol = "ws"` upstream is for ws only).
fn ws_only(servers: &[SocketAddr]) -> Setup {
    Setup::one(Kind::Ws, "ws", servers)
}

fn ws_stats(running: &mqsplice::Running) -> WsStats {
    let stats = running.typed_stats();
    stats.listeners["ws"].ws.clone().expect("ws stats")
}

fn failed(running: &mqsplice::Running, reason: &str) -> u64 {
    ws_stats(running).upgrades_failed[reason]
}

fn closed_for(running: &mqsplice::Running, reason: &str) -> u64 {
    ws_stats(running).closed_for[reason]
}

/// CONNECT as `id`, subscribe to `topic` at QoS 1, then publish on it at QoS 0 and QoS 1: the
/// CONNACK, SUBACK, both deliveries and the PUBACK come back through the proxy.
async fn pubsub_roundtrip<S>(client: &mut ws::WsClient<S>, id: &str, topic: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    client.send(&connect_v311(id)).await.unwrap();
    assert_eq!(client.packet(WAIT).await.unwrap(), CONNACK_OK);
    client.send(&subscribe(1, topic, 1)).await.unwrap();
    assert_eq!(
        client.packet(WAIT).await.unwrap(),
        [0x90, 0x03, 0x00, 0x01, 0x01]
    );
    client
        .send(&raw::publish_qos0(topic, b"zero"))
        .await
        .unwrap();
    // Delivered at the broker's choice of QoS (rumqttd uses the subscription's).
    let delivered = client.packet(WAIT).await.unwrap();
    assert_eq!(delivered[0] & 0xf0, 0x30, "{delivered:02x?}");
    assert!(
        delivered[4..4 + topic.len()] == *topic.as_bytes() && delivered.ends_with(b"zero"),
        "{delivered:02x?}"
    );
    client.send(&publish_qos1(7, topic, b"one")).await.unwrap();
    // The PUBACK for our id 7 and the delivery (QoS 1, broker's id), in either order.
    let mut got_puback = false;
    let mut got_delivery = false;
    for _ in 0..2 {
        let p = client.packet(WAIT).await.unwrap();
        if p == [0x40, 0x02, 0x00, 0x07] {
            got_puback = true;
        } else {
            assert_eq!(p[0], 0x32, "unexpected packet {p:02x?}");
            assert!(p.ends_with(b"one"));
            got_delivery = true;
        }
    }
    assert!(got_puback && got_delivery);
}

#[tokio::test]
async fn mqtt_over_ws_subscribes_and_publishes_through_a_broker() {
    let broker = EmbeddedBroker::start();
    let running = setup(&[broker.addr]).start().await;
    let addr = running.listener_addr("ws").unwrap();
    let mut client = ws::connect(addr, "/mqtt", Some("mqtt"), &[]).await.unwrap();
    pubsub_roundtrip(&mut client, "ws-pubsub", "ws/t").await;

    let stats = running.typed_stats();
    let listener = &stats.listeners["ws"];
    assert_eq!(listener.kind, "ws");
    assert_eq!(listener.data_path, "userspace");
    assert_eq!(listener.data_path_reason, "websocket");
    let ws = listener.ws.as_ref().expect("ws stats");
    assert_eq!(ws.upgrades_ok, 1);
    assert!(ws.frames_in >= 4);
    assert!(ws.frames_out >= 4);
    assert!(ws.bytes_in > 0);
    assert!(ws.handshake_ms_max > 0.0);
}

#[tokio::test]
async fn packets_split_across_frames_and_many_packets_in_one_frame_reach_the_broker_intact() {
    let mut backend = FakeBroker::start().await;
    let running = setup(&[backend.addr]).start().await;
    let addr = running.listener_addr("ws").unwrap();
    // No subprotocol offered: accepted as MQTT.
    let mut client = ws::connect(addr, "/mqtt", None, &[]).await.unwrap();
    let connect = connect_v311("split");
    let pub1 = raw::publish_qos0("a/b", &raw::pattern(3000, 1));
    let pub2 = raw::publish_qos0("a/c", b"x");
    // CONNECT in three frames (one of a single byte), then the rest of it and two whole
    // packets and half of a third in one frame, then the other half.
    client.send(&connect[..1]).await.unwrap();
    client.send(&connect[1..4]).await.unwrap();
    let mut mixed = connect[4..].to_vec();
    mixed.extend_from_slice(&pub1);
    mixed.extend_from_slice(&pub2[..3]);
    client.send(&mixed).await.unwrap();
    client.send(&pub2[3..]).await.unwrap();
    let mut expected = connect.clone();
    expected.extend_from_slice(&pub1);
    expected.extend_from_slice(&pub2);
    let mut broker = backend.next(WAIT).await;
    assert_eq!(
        raw::read_exactly(&mut broker, expected.len(), WAIT).await,
        expected
    );

    // And back: the broker's bytes, written in odd pieces, arrive as one stream.
    let mut down = CONNACK_OK.to_vec();
    down.extend_from_slice(&raw::publish_qos0("d", &raw::pattern(40_000, 2)));
    for piece in down.chunks(7_000) {
        broker.write_all(piece).await.unwrap();
    }
    assert_eq!(client.bytes(down.len(), WAIT).await.unwrap(), down);
}

#[tokio::test]
async fn client_id_goes_to_the_same_broker_over_ws_and_tcp() {
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(FakeBroker::start().await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let running = setup(&addrs)
        .upstream_with(|u| u.balance("client_id"))
        .start()
        .await;
    let tcp_addr = running.listener_addr("mqtt").unwrap();
    let ws_addr = running.listener_addr("ws").unwrap();
    let which = |backends: &[FakeBroker], before: &[usize]| {
        backends
            .iter()
            .zip(before)
            .position(|(b, n)| b.accepted() > *n)
    };
    let mut used = std::collections::HashSet::new();
    for i in 0..12 {
        let id = format!("sticky-{i}");
        let before: Vec<usize> = backends.iter().map(FakeBroker::accepted).collect();
        let mut tcp = TcpStream::connect(tcp_addr).await.unwrap();
        tcp.write_all(&connect_v311(&id)).await.unwrap();
        assert!(wait_until(WAIT, || which(&backends, &before).is_some()).await);
        let over_tcp = which(&backends, &before).unwrap();

        let before: Vec<usize> = backends.iter().map(FakeBroker::accepted).collect();
        let mut client = ws::connect(ws_addr, "/mqtt", Some("mqtt"), &[])
            .await
            .unwrap();
        client.send(&connect_v311(&id)).await.unwrap();
        assert!(wait_until(WAIT, || which(&backends, &before).is_some()).await);
        let over_ws = which(&backends, &before).unwrap();
        assert_eq!(over_tcp, over_ws, "client id {id}");
        used.insert(over_ws);
    }
    assert!(
        used.len() > 1,
        "12 client ids all hashed to one of 3 brokers"
    );
}

#[tokio::test]
async fn trusted_proxy_forwarded_for_becomes_the_proxy_protocol_source() {
    for (trusted, header, expected) in [
        (
            "127.0.0.0/8",
            ("X-Forwarded-For", "198.51.100.1, 203.0.113.7"),
            "203.0.113.7",
        ),
        ("127.0.0.1", ("X-Real-IP", "203.0.113.9"), "203.0.113.9"),
        (
            "10.0.0.0/8",
            ("X-Forwarded-For", "203.0.113.7"),
            "127.0.0.1",
        ),
    ] {
        let mut backend = FakeBroker::start().await;
        let running = setup(&[backend.addr])
            .upstream_with(|u| u.proxy_protocol("v1"))
            .listener_with("ws", |l| l.trust_forwarded_for(&[trusted]))
            .start()
            .await;
        let addr = running.listener_addr("ws").unwrap();
        let mut client = ws::connect(addr, "/mqtt", Some("mqtt"), &[header])
            .await
            .unwrap();
        client.send(&connect_v311("fwd")).await.unwrap();
        let mut broker = backend.next(WAIT).await;
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n") && got.len() < 108 {
            broker.read_exact(&mut byte).await.unwrap();
            got.push(byte[0]);
        }
        let line = String::from_utf8(got).unwrap();
        let fields: Vec<&str> = line.trim_end().split(' ').collect();
        assert_eq!(
            fields[..3],
            ["PROXY", "TCP4", expected],
            "{line:?} for {trusted}"
        );
        let connect = connect_v311("fwd");
        assert_eq!(
            raw::read_exactly(&mut broker, connect.len(), WAIT).await,
            connect
        );
    }
}

/// A flow through a fresh proxy's ws listener: the client (offering `subprotocol`) has sent
/// `id`'s CONNECT; `broker` is the fake broker's end, the CONNECT not yet read from it.
struct WsFlow {
    _running: mqsplice::Running,
    client: ws::WsClient,
    broker: TcpStream,
    connect: Vec<u8>,
}

async fn ws_flow(id: &str, subprotocol: Option<&str>) -> WsFlow {
    let mut backend = FakeBroker::start().await;
    let running = setup(&[backend.addr]).start().await;
    let addr = running.listener_addr("ws").unwrap();
    let mut client = ws::connect(addr, "/mqtt", subprotocol, &[]).await.unwrap();
    let connect = connect_v311(id);
    client.send(&connect).await.unwrap();
    let broker = backend.next(WAIT).await;
    WsFlow {
        _running: running,
        client,
        broker,
        connect,
    }
}

#[tokio::test]
async fn ping_is_answered_and_a_close_frame_ends_the_broker_leg() {
    let WsFlow {
        _running,
        mut client,
        mut broker,
        connect,
    } = ws_flow("pinger", Some("mqttv3.1")).await;
    raw::read_exactly(&mut broker, connect.len(), WAIT).await;
    client.ws.send(Message::Ping("hi".into())).await.unwrap();
    let pong = tokio::time::timeout(WAIT, client.ws.next()).await.unwrap();
    assert!(matches!(pong, Some(Ok(Message::Pong(p))) if &p[..] == b"hi"));
    client.ws.close(None).await.unwrap();
    let (rest, closed) = raw::read_to_close(&mut broker, WAIT).await;
    assert!(rest.is_empty());
    assert_eq!(closed, Closed::Eof);
}

/// Sends `request` on a raw socket; returns the response and how the proxy closed.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (String, Closed) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let (got, closed) = raw::read_to_close(&mut tcp, WAIT).await;
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

#[tokio::test]
async fn bad_requests_get_http_errors_and_are_counted() {
    let backend = FakeBroker::start().await;
    let running = setup(&[backend.addr])
        .listener_with("ws", |l| {
            l.paths(&["/mqtt", "/ws"])
                .allowed_origins(&["https://app.example"])
        })
        .start()
        .await;
    let addr = running.listener_addr("ws").unwrap();
    let origin = "Origin: https://app.example\r\n";
    let cases: Vec<(String, &str, &str)> = vec![
        (
            upgrade_request(addr, "/other", origin),
            "404 Not Found",
            "not_found",
        ),
        (
            format!("GET /mqtt HTTP/1.1\r\nHost: x\r\n{origin}\r\n"),
            "426 Upgrade Required",
            "not_upgrade",
        ),
        (
            "POST /mqtt HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".into(),
            "405 Method Not Allowed",
            "method",
        ),
        (
            "\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00\r\n\r\n".into(),
            "400 Bad Request",
            "bad_request",
        ),
        (
            upgrade_request(addr, "/mqtt", origin).replace("Version: 13", "Version: 8"),
            "426 Upgrade Required",
            "version",
        ),
        (
            upgrade_request(
                addr,
                "/mqtt",
                &format!("{origin}Sec-WebSocket-Protocol: chat\r\n"),
            ),
            "400 Bad Request",
            "subprotocol",
        ),
        (
            upgrade_request(addr, "/mqtt", "Origin: https://evil.example\r\n"),
            "403 Forbidden",
            "origin",
        ),
        (
            upgrade_request(
                addr,
                "/ws",
                &format!("{origin}X-Big: {}\r\n", "b".repeat(9000)),
            ),
            "431 ",
            "headers_too_large",
        ),
    ];
    for (request, status, reason) in cases {
        let (response, closed) = raw_exchange(addr, request.as_bytes()).await;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}")),
            "{reason}: got {response:?}"
        );
        assert_eq!(closed, Closed::Eof, "{reason}");
        assert_eq!(failed(&running, reason), 1, "{reason}");
    }
    let (response, _) = raw_exchange(
        addr,
        upgrade_request(
            addr,
            "/ws",
            &format!("{origin}Sec-WebSocket-Protocol: chat\r\n"),
        )
        .as_bytes(),
    )
    .await;
    assert!(
        response.contains("supported: mqtt, mqttv3.1"),
        "{response:?}"
    );
    // Counted as rejected once the refused client is gone (the proxy drains it after its FIN).
    let rejected =
        || running.typed_stats().listeners["ws"].connections.rejected["ws_handshake"] == 9;
    assert!(
        wait_until(WAIT, rejected).await,
        "{:?}",
        running.typed_stats()
    );
    assert_eq!(backend.accepted(), 0);
    // The same listener still upgrades a good request on its second path.
    let good = ws::connect(
        addr,
        "/ws",
        Some("mqtt"),
        &[("Origin", "https://app.example")],
    )
    .await;
    assert!(good.is_ok());
}

#[tokio::test]
async fn subprotocol_can_be_required() {
    let backend = FakeBroker::start().await;
    let running = setup(&[backend.addr])
        .listener_with("ws", |l| l.require_subprotocol(true))
        .start()
        .await;
    let addr = running.listener_addr("ws").unwrap();
    let (response, _) = raw_exchange(addr, upgrade_request(addr, "/mqtt", "").as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 400 "), "{response:?}");
    assert_eq!(failed(&running, "subprotocol"), 1);
    assert!(ws::connect(addr, "/mqtt", Some("mqtt"), &[]).await.is_ok());
}

#[tokio::test]
async fn slow_handshake_and_silent_clients_are_closed_and_counted() {
    let backend = FakeBroker::start().await;
    let running = setup(&[backend.addr])
        .listener_with("ws", |l| l.handshake_timeout("1s"))
        .start()
        .await;
    let addr = running.listener_addr("ws").unwrap();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /mqtt HTTP/1.1\r\nHost: slow\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (got, _) = raw::read_to_close(&mut tcp, WAIT).await;
    assert!(got.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(failed(&running, "timeout"), 1);
    drop(TcpStream::connect(addr).await.unwrap());
    assert!(wait_until(WAIT, || failed(&running, "closed") == 1).await);
}

/// Upgrades a raw socket (no frames of its own yet) and returns it after the 101.
async fn raw_upgraded(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(upgrade_request(addr, "/mqtt", "").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101 "));
    tcp
}

/// The close code of the close frame at the start of `got`, if it is one.
fn close_code(got: &[u8]) -> Option<u16> {
    (got.len() >= 4 && got[0] == 0x88).then(|| u16::from_be_bytes([got[2], got[3]]))
}

#[tokio::test]
async fn bad_frames_are_closed_with_a_code_and_counted() {
    let backend = FakeBroker::start().await;
    let running = setup(&[backend.addr])
        .listener_with("ws", |l| l.max_frame_size("1KiB"))
        .start()
        .await;
    let addr = running.listener_addr("ws").unwrap();
    let key = Some([1, 2, 3, 4]);
    let cases = [
        (
            frame(0x2, &connect_v311("u"), None),
            "unmasked_frame",
            CloseCode::Protocol,
        ),
        (
            frame(0x1, b"hello", key),
            "text_frame",
            CloseCode::Unsupported,
        ),
        (
            frame(0x2, &[0u8; 2048], key),
            "frame_too_large",
            CloseCode::Size,
        ),
        (
            vec![0xf2, 0x80, 1, 2, 3, 4],
            "protocol_error",
            CloseCode::Protocol,
        ),
    ];
    for (bytes, reason, code) in cases {
        let mut tcp = raw_upgraded(addr).await;
        tcp.write_all(&bytes).await.unwrap();
        let (got, _) = raw::read_to_close(&mut tcp, WAIT).await;
        assert_eq!(
            close_code(&got),
            Some(u16::from(code)),
            "{reason}: {got:02x?}"
        );
        assert_eq!(closed_for(&running, reason), 1, "{reason}");
    }
    assert_eq!(backend.accepted(), 0);
}

#[tokio::test]
async fn arbitrary_bytes_never_take_the_listener_down() {
    let broker = EmbeddedBroker::start();
    let running = setup(&[broker.addr]).start().await;
    let addr = running.listener_addr("ws").unwrap();
    // A deterministic spread of garbage: before the upgrade and after it.
    let mut seed: u32 = 0x1234_5678;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    for round in 0..40 {
        let len = (next() % 300) as usize;
        let junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let mut tcp = if round % 2 == 0 {
            TcpStream::connect(addr).await.unwrap()
        } else {
            raw_upgraded(addr).await
        };
        let _ = tcp.write_all(&junk).await;
        let _ = tcp.shutdown().await;
        let _ = tokio::time::timeout(WAIT, raw::read_to_close(&mut tcp, WAIT)).await;
    }
    let mut client = ws::connect(addr, "/mqtt", Some("mqtt"), &[]).await.unwrap();
    client.send(&connect_v311("after-junk")).await.unwrap();
    assert_eq!(client.packet(WAIT).await.unwrap(), CONNACK_OK);
}

#[test]
fn packet_len_reads_the_fixed_header() {
    assert_eq!(packet_len(&[0x20, 0x02, 0, 0]), Some(4));
    assert_eq!(packet_len(&[0x20, 0x02, 0]), None);
    assert_eq!(packet_len(&[0x30, 0x80, 0x01]), None);
}

/// The upgrade request as a ws broker saw it: request line then `name: value` lines.
type Seen = (String, Vec<u8>);

/// For `upstream_protocol = "ws"`: a WebSocket "broker" that records the upgrade request and
/// answers any CONNECT with a CONNACK, then echoes.
async fn ws_broker() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Seen>) {
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut seen = String::new();
                #[allow(clippy::result_large_err)] // tungstenite's callback signature
                let callback = |req: &Request, mut resp: Response| {
                    seen = format!("{} {}\n", req.method(), req.uri());
                    for (k, v) in req.headers() {
                        seen.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
                    }
                    if let Some(p) = req.headers().get("sec-websocket-protocol") {
                        resp.headers_mut()
                            .insert("sec-websocket-protocol", p.clone());
                    }
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                    return;
                };
                let mut got = Vec::new();
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Binary(b) = msg {
                        got.extend_from_slice(&b);
                        if packet_len(&got).is_some() {
                            break;
                        }
                    }
                }
                let _ = tx.send((seen, got));
                let _ = ws.send(Message::Binary(CONNACK_OK.into())).await;
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_binary() && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn ws_upstream_gets_the_clients_path_subprotocol_host_and_addresses() {
    let (broker, mut upgrades) = ws_broker().await;
    let running = ws_only(&[broker])
        .upstream_with(|u| u.upstream_protocol("ws").balance("client_id"))
        .listener_with("ws", |l| l.path("/mqtt"))
        .start()
        .await;
    let addr = running.listener_addr("ws").unwrap();
    let mut client = ws::connect(addr, "/mqtt?v=1", Some("mqtt"), &[])
        .await
        .unwrap();
    let connect = connect_v311("through-ws");
    client.send(&connect[..5]).await.unwrap();
    client.send(&connect[5..]).await.unwrap();
    assert_eq!(client.packet(WAIT).await.unwrap(), CONNACK_OK);
    let (seen, got) = tokio::time::timeout(WAIT, upgrades.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, connect);
    assert!(seen.starts_with("GET /mqtt?v=1\n"), "{seen}");
    assert!(seen.contains(&format!("host: {addr}\n")), "{seen}");
    assert!(seen.contains("sec-websocket-protocol: mqtt\n"), "{seen}");
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(seen.contains("x-real-ip: 127.0.0.1\n"), "{seen}");
    let publish = raw::publish_qos0("echo", &raw::pattern(5000, 3));
    client.send(&publish).await.unwrap();
    assert_eq!(client.packet(WAIT).await.unwrap(), publish);

    // upstream_host replaces the client's Host.
    let running = ws_only(&[broker])
        .upstream_with(|u| u.upstream_protocol("ws").upstream_host("brokers.internal"))
        .start()
        .await;
    let addr = running.listener_addr("ws").unwrap();
    let mut client = ws::connect(addr, "/mqtt", None, &[]).await.unwrap();
    client.send(&connect).await.unwrap();
    assert_eq!(client.packet(WAIT).await.unwrap(), CONNACK_OK);
    let (seen, _) = tokio::time::timeout(WAIT, upgrades.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(seen.contains("host: brokers.internal\n"), "{seen}");
    assert!(!seen.contains("sec-websocket-protocol"), "{seen}");
}

/// Which end of a [`WsFlow`] [`counted_writes`] writes into.
enum Writer {
    /// The fake broker's socket, towards the client.
    Broker(TcpStream),
    /// The ws client (binary frames), towards the broker.
    Client(Box<ws::WsClient>),
}

/// Writes `data` into `writer` in 64 KiB pieces on a task, counting the bytes written so far;
/// the task hands the writer back once everything is written.
fn counted_writes(
    mut writer: Writer,
    data: Vec<u8>,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<Writer>,
) {
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = written.clone();
    let task = tokio::spawn(async move {
        for chunk in data.chunks(64 << 10) {
            match &mut writer {
                Writer::Broker(broker) => broker.write_all(chunk).await.unwrap(),
                Writer::Client(client) => client.send(chunk).await.unwrap(),
            }
            counter.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        }
        writer
    });
    (written, task)
}

/// The writer whose progress is `progress` must have stopped, far short of `total`, while its
/// reader reads nothing: no progress over a second, after 1.5 s to fill the buffers on the way.
async fn assert_stalls(progress: &std::sync::atomic::AtomicUsize, total: usize, what: &str) {
    use std::sync::atomic::Ordering::Relaxed;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stalled_at = progress.load(Relaxed);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let later = progress.load(Relaxed);
    assert_eq!(stalled_at, later, "{what}");
    assert!(later < total / 2, "{later} bytes accepted with no reader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_stops_the_broker_and_loses_nothing() {
    const TOTAL: usize = 64 << 20;
    let WsFlow {
        _running,
        mut client,
        mut broker,
        connect,
    } = ws_flow("slow-reader", Some("mqtt")).await;
    raw::read_exactly(&mut broker, connect.len(), WAIT).await;
    let data = raw::pattern(TOTAL, 9);
    let expected = data.clone();
    let (written, writer) = counted_writes(Writer::Broker(broker), data);
    // The client reads nothing: the broker must stall once the socket buffers on the way are
    // full (mqsplice holds at most one frame), far short of everything.
    assert_stalls(
        &written,
        TOTAL,
        "the broker kept writing while the client read nothing",
    )
    .await;
    let got = client.bytes(TOTAL, Duration::from_secs(60)).await.unwrap();
    assert!(got == expected, "the stream arrived altered");
    drop(writer.await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_reading_stops_the_client_and_loses_nothing() {
    const TOTAL: usize = 64 << 20;
    let WsFlow {
        _running,
        client,
        mut broker,
        connect,
    } = ws_flow("slow-broker", Some("mqtt")).await;
    let data = raw::pattern(TOTAL, 5);
    let expected = data.clone();
    let (sent, sender) = counted_writes(Writer::Client(Box::new(client)), data);
    assert_stalls(
        &sent,
        TOTAL,
        "the client kept sending while the broker read nothing",
    )
    .await;
    let got = raw::read_exactly(&mut broker, connect.len() + TOTAL, Duration::from_secs(60)).await;
    assert!(
        got[connect.len()..] == expected[..],
        "the stream arrived altered"
    );
    drop(sender.await.unwrap());
}

/// A `wss` listener `wss` (no `alpn` key: the default must be `http/1.1`) in front of
/// `servers` (dataplane.mode = auto: wss must be userspace regardless).
fn wss(pki: &Pki, servers: &[SocketAddr]) -> Setup {
    wss_with(servers, Tls::server(pki))
}

/// [`wss`] with the `tls` table given.
fn wss_with(servers: &[SocketAddr], tls: Tls) -> Setup {
    Setup::one(Kind::Wss, "wss", servers)
        .auto_mode()
        .listener_with("wss", |l| l.connect_packet_timeout("3s").tls(tls))
}

/// What a browser offers: ALPN `http/1.1` only.
const BROWSER_ALPN: &[&str] = &["http/1.1"];

#[tokio::test]
async fn mqtt_over_wss_subscribes_and_publishes_through_a_broker() {
    let pki = Pki::new();
    let broker = EmbeddedBroker::start();
    let running = wss(&pki, &[broker.addr]).start().await;
    let addr = running.listener_addr("wss").unwrap();
    let mut client = ws::connect_tls(
        addr,
        "/mqtt",
        Some("mqtt"),
        pki.client_config_alpn(BROWSER_ALPN),
    )
    .await
    .unwrap();
    assert_eq!(
        client.ws.get_ref().get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..])
    );
    pubsub_roundtrip(&mut client, "wss-pubsub", "wss/t").await;
    // A client that offers no ALPN at all (some MQTT SDKs) is served too.
    let mut quiet = ws::connect_tls(addr, "/mqtt", None, pki.client_config_alpn(&[]))
        .await
        .unwrap();
    quiet.send(&connect_v311("wss-no-alpn")).await.unwrap();
    assert_eq!(quiet.packet(WAIT).await.unwrap(), CONNACK_OK);

    let listener = wss_stats(&running);
    let (tls, ws) = (listener.tls.clone().unwrap(), listener.ws.clone().unwrap());
    assert_eq!(listener.kind, "wss", "{listener:?}");
    assert_eq!(listener.data_path, "userspace", "{listener:?}");
    assert_eq!(tls.handshakes_ok, 2, "{listener:?}");
    assert_eq!(ws.upgrades_ok, 2, "{listener:?}");
    assert_eq!(listener.connections.handled, 2, "{listener:?}");
    assert!(ws.frames_in >= 5, "{listener:?}");
    assert!(listener.bytes_from_clients > 0, "{listener:?}");
}

fn wss_stats(running: &mqsplice::Running) -> ListenerStats {
    running.typed_stats().listeners["wss"].clone()
}

/// Whether listener `wss` counted `n` failed TLS handshakes for `reason`, each refused.
fn tls_refused(running: &mqsplice::Running, reason: &str, n: u64) -> bool {
    let listener = wss_stats(running);
    let tls = listener.tls.expect("tls stats");
    tls.handshakes_failed[reason] == n && listener.connections.rejected["tls_handshake"] == n
}

#[tokio::test]
async fn wss_refuses_a_client_offering_only_alpn_mqtt() {
    let pki = Pki::new();
    let backend = FakeBroker::start().await;
    let running = wss(&pki, &[backend.addr]).start().await;
    let addr = running.listener_addr("wss").unwrap();
    let refused = ws::connect_tls(
        addr,
        "/mqtt",
        Some("mqtt"),
        pki.client_config_alpn(&["mqtt"]),
    )
    .await;
    let error = refused
        .err()
        .expect("a handshake offering only mqtt must fail");
    assert!(
        format!("{error:#}").contains("NoApplicationProtocol")
            || format!("{error:#}").contains("no_application_protocol"),
        "{error:#}"
    );
    let counted = || tls_refused(&running, "no_alpn", 1);
    assert!(wait_until(WAIT, counted).await, "{:?}", wss_stats(&running));
    let listener = wss_stats(&running);
    assert_eq!(
        listener.tls.as_ref().unwrap().handshakes_ok,
        0,
        "{listener:?}"
    );
    assert_eq!(listener.ws.as_ref().unwrap().upgrades_ok, 0, "{listener:?}");
    assert_eq!(backend.accepted(), 0);
}

#[tokio::test]
async fn plain_ws_on_the_wss_port_is_refused_as_a_tls_handshake_failure() {
    let pki = Pki::new();
    let backend = FakeBroker::start().await;
    let running = wss(&pki, &[backend.addr]).start().await;
    let addr = running.listener_addr("wss").unwrap();
    // A raw upgrade request: closed after at most a TLS alert, never an HTTP answer.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(upgrade_request(addr, "/mqtt", "").as_bytes())
        .await
        .unwrap();
    let (got, _) = raw::read_to_close(&mut tcp, WAIT).await;
    assert!(
        got.is_empty() || got[0] == 0x15,
        "only a TLS alert may come back: {:?}",
        String::from_utf8_lossy(&got)
    );
    // A real ws:// client fails its upgrade.
    assert!(ws::connect(addr, "/mqtt", Some("mqtt"), &[]).await.is_err());
    let counted = || tls_refused(&running, "malformed", 2);
    assert!(wait_until(WAIT, counted).await, "{:?}", wss_stats(&running));
    let listener = wss_stats(&running);
    assert_eq!(listener.ws.as_ref().unwrap().upgrades_ok, 0, "{listener:?}");
    assert_eq!(
        listener.connections.rejected["ws_handshake"], 0,
        "{listener:?}"
    );
    assert_eq!(backend.accepted(), 0);
}

#[tokio::test]
async fn wss_listener_forwards_to_a_ws_upstream() {
    let pki = Pki::new();
    let (broker, mut upgrades) = ws_broker().await;
    let running = wss(&pki, &[broker])
        .upstream_with(|u| u.upstream_protocol("ws"))
        .start()
        .await;
    let addr = running.listener_addr("wss").unwrap();
    let mut client = ws::connect_tls(
        addr,
        "/mqtt",
        Some("mqtt"),
        pki.client_config_alpn(BROWSER_ALPN),
    )
    .await
    .unwrap();
    let connect = connect_v311("wss-to-ws");
    client.send(&connect).await.unwrap();
    assert_eq!(client.packet(WAIT).await.unwrap(), CONNACK_OK);
    let (seen, got) = tokio::time::timeout(WAIT, upgrades.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, connect);
    assert!(seen.starts_with("GET /mqtt\n"), "{seen}");
    assert!(seen.contains("sec-websocket-protocol: mqtt\n"), "{seen}");
    assert!(seen.contains("x-real-ip: 127.0.0.1\n"), "{seen}");
    let publish = raw::publish_qos0("echo", &raw::pattern(5000, 4));
    client.send(&publish).await.unwrap();
    assert_eq!(client.packet(WAIT).await.unwrap(), publish);
}

#[test]
fn check_accepts_a_wss_listener_and_refuses_one_without_a_tls_table() {
    let pki = Pki::new();
    let run_check = |text: &str| {
        let out = run_binary("check", text);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // Raw TOML: this test is about what the parser says of the file's own lines.
    let good = format!(
        r#"
[log]
access = "off"
[[upstream]]
name = "brokers"
servers = [{{ addr = "127.0.0.1:1883" }}]
[[listener]]
name = "wss"
kind = "wss"
listen = "127.0.0.1:0"
upstream = "brokers"
tls = {{ cert = "{cert}", key = "{key}" }}
path = ["/mqtt", "/ws"]
require_subprotocol = true
"#,
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
    );
    let (code, output) = run_check(&good);
    assert_eq!(code, Some(0), "{output}");
    let tls_line = format!(
        "tls = {{ cert = \"{}\", key = \"{}\" }}\n",
        pki.server_cert.display(),
        pki.server_key.display()
    );
    assert!(good.contains(&tls_line));
    let (code, output) = run_check(&good.replace(&tls_line, ""));
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("listener[0].tls"), "{output}");
    assert!(
        output.contains("a wss listener needs a tls = { cert = \"...\", key = \"...\" } table"),
        "{output}"
    );
    // And a ws listener with a tls table is told to be a wss one.
    let (code, output) = run_check(&good.replace("kind = \"wss\"", "kind = \"ws\""));
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("listener[0].tls"), "{output}");
}

#[tokio::test]
async fn a_tls_mqtt_client_let_through_by_alpn_gets_400_not_a_broker() {
    let pki = Pki::new();
    let backend = FakeBroker::start().await;
    let both = Tls::server(&pki).alpn(&["http/1.1", "mqtt"]);
    let running = wss_with(&[backend.addr], both).start().await;
    let addr = running.listener_addr("wss").unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(pki.client_config(None))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"mqtt"[..]));
    tls.write_all(&connect_v311("tls-mqtt")).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut got)).await;
    let response = String::from_utf8_lossy(&got);
    assert!(response.starts_with("HTTP/1.1 400 "), "{response:?}");
    let listener = wss_stats(&running);
    assert_eq!(
        listener.tls.as_ref().unwrap().handshakes_ok,
        1,
        "{listener:?}"
    );
    assert_eq!(
        listener.ws.as_ref().unwrap().upgrades_failed["bad_request"],
        1,
        "{listener:?}"
    );
    assert_eq!(backend.accepted(), 0);
}
