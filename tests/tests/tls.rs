//! TLS listeners: server and mutual authentication, refusals that never reach a broker, the
//! client identity taken from the certificate, resumption, certificate reload on SIGHUP, and a
//! real client publishing and subscribing through TLS. The PKI is generated per test (rcgen).

use mqsplice::mqtt::parse_connect;
use mqsplice::stats::TlsStats;
use mqsplice_tests::broker::EmbeddedBroker;
use mqsplice_tests::client::Client;

use mqsplice_tests::fake::FakeBroker;
use mqsplice_tests::pki::{self, Issued, Pki, Spec};
use mqsplice_tests::proxy::run_binary;
use mqsplice_tests::raw::connect_v311;
use mqsplice_tests::setup::{Kind, Setup, Tls};
use mqsplice_tests::stats::fetch_async;
use mqsplice_tests::wait_until;
use rumqttc::{MqttOptions, QoS, TlsConfiguration, Transport};
use rustls::pki_types::ServerName;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const WAIT: Duration = Duration::from_secs(10);

/// The server certificate, and the test CA for client certificates (not asked for by default).
fn server_tls(pki: &Pki) -> Tls {
    Tls::server(pki).client_ca(&pki.ca_path)
}

/// [`server_tls`] with client certificates required.
fn required(pki: &Pki) -> Tls {
    server_tls(pki).verify_client("required")
}

/// A one-listener config: a `tls` listener `mqtts` with `tls`, in front of `broker`.
fn setup(broker: SocketAddr, tls: Tls) -> Setup {
    Setup::one(Kind::Tls, "mqtts", &[broker])
        .auto_mode()
        .listener_with("mqtts", |l| l.connect_packet_timeout("3s").tls(tls))
}

async fn start(setup: Setup) -> (mqsplice::Running, SocketAddr) {
    let running = setup.start().await;
    let addr = running.listener_addr("mqtts").unwrap();
    (running, addr)
}

/// A TLS connection to mqsplice with `config`, server name `localhost`.
async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

fn tls_stats(running: &mqsplice::Running) -> TlsStats {
    let stats = running.typed_stats();
    stats.listeners["mqtts"].tls.clone().expect("tls stats")
}

/// Reads everything `backend`'s next connection receives until it has `len` bytes.
async fn backend_reads(backend: &mut FakeBroker, len: usize) -> Vec<u8> {
    let mut conn = backend.next(WAIT).await;
    let mut got = vec![0u8; len];
    tokio::time::timeout(WAIT, conn.read_exact(&mut got))
        .await
        .expect("backend read in time")
        .expect("backend read");
    got
}

#[tokio::test]
async fn server_auth_carries_the_connect_unchanged_on_the_userspace_path() {
    let pki = Pki::new();
    let mut backend = FakeBroker::start().await;
    let (running, addr) = start(setup(backend.addr, server_tls(&pki))).await;

    let mut tls = tls_connect(addr, pki.client_config(None)).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"mqtt"[..]));
    let connect = connect_v311("tls-client");
    tls.write_all(&connect).await.unwrap();
    tls.write_all(b"after").await.unwrap();
    let got = backend_reads(&mut backend, connect.len() + 5).await;
    assert_eq!(&got[..connect.len()], &connect[..]);
    assert_eq!(&got[connect.len()..], b"after");

    let stats = running.typed_stats();
    let listener = &stats.listeners["mqtts"];
    assert_eq!(listener.kind, "tls");
    assert_eq!(listener.data_path, "userspace");
    assert_eq!(listener.data_path_reason, "client_tls");
    assert_eq!(listener.connections.handled, 1);
    let tls = listener.tls.as_ref().expect("tls stats");
    assert_eq!(tls.handshakes_ok, 1);
    assert!(tls.handshake_time_total_us > 0);
}

#[tokio::test]
async fn mutual_tls_accepts_a_client_of_the_ca_directly_and_within_verify_depth() {
    let pki = Pki::new();
    let mut backend = FakeBroker::start().await;
    let (running, addr) = start(setup(backend.addr, required(&pki))).await;
    // verify_depth defaults to 1: one intermediate is fine.
    for intermediates in [0, 1] {
        let client = pki.client_via(intermediates, &Spec::leaf("device"));
        let mut tls = tls_connect(addr, pki.client_config(Some(&client)))
            .await
            .unwrap();
        let connect = connect_v311(&format!("dev{intermediates}"));
        tls.write_all(&connect).await.unwrap();
        assert_eq!(backend_reads(&mut backend, connect.len()).await, connect);
    }
    assert_eq!(tls_stats(&running).handshakes_ok, 2);
}

/// Connects with `client` (or none), sends a CONNECT, and expects the connection to end
/// without the CONNECT reaching any broker; the failure is counted under `reason`.
async fn refused(pki: &Pki, tls: Tls, client: Option<&Issued>, reason: &str) {
    let backend = FakeBroker::start().await;
    let (running, addr) = start(setup(backend.addr, tls)).await;
    // With TLS 1.3 the client finishes its side before the server has checked its certificate,
    // so the refusal shows as an alert or EOF on the first read.
    if let Ok(mut tls) = tls_connect(addr, pki.client_config(client)).await {
        let _ = tls.write_all(&connect_v311("intruder")).await;
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(WAIT, tls.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "{reason}: got {read:?}");
    }
    assert!(
        wait_until(WAIT, || tls_stats(&running).handshakes_failed.get(reason)
            == Some(&1))
        .await,
        "{reason}: {:?}",
        tls_stats(&running)
    );
    assert_eq!(tls_stats(&running).handshakes_ok, 0, "{reason}");
    let stats = running.typed_stats();
    let listener = &stats.listeners["mqtts"].connections;
    assert_eq!(listener.rejected["tls_handshake"], 1);
    assert_eq!(listener.handled, 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(backend.accepted(), 0, "{reason}: a broker was reached");
}

#[tokio::test]
async fn mutual_tls_refusals_are_counted_and_reach_no_broker() {
    let pki = Pki::new();
    let other_root = pki::root("another root");
    let foreign = pki::issue(&other_root, &Spec::leaf("foreign"));
    refused(&pki, required(&pki), Some(&foreign), "unknown_ca").await;

    let expired = pki.client(&Spec {
        expires: Some((2021, 1, 1)),
        ..Spec::leaf("expired")
    });
    refused(&pki, required(&pki), Some(&expired), "expired").await;

    let deep = pki.client_via(2, &Spec::leaf("deep"));
    refused(&pki, required(&pki), Some(&deep), "chain_too_long").await;
    // The same chain passes when verify_depth allows two intermediates.
    let mut backend = FakeBroker::start().await;
    let (_running, addr) = start(setup(backend.addr, required(&pki).verify_depth(2))).await;
    let mut tls = tls_connect(addr, pki.client_config(Some(&deep)))
        .await
        .unwrap();
    tls.write_all(&connect_v311("deep")).await.unwrap();
    backend_reads(&mut backend, connect_v311("deep").len()).await;

    refused(&pki, required(&pki), None, "no_certificate").await;
    // `optional` still refuses a certificate that does not verify.
    let optional = server_tls(&pki).verify_client("optional");
    refused(&pki, optional, Some(&foreign), "unknown_ca").await;
}

#[tokio::test]
async fn client_id_and_username_are_taken_from_the_certificate() {
    let pki = Pki::new();
    let client = pki.client(&Spec {
        serial: Some(&[0x2A, 0x2B, 0x3C, 0x4D]),
        dns: &["device-7.example"],
        ..Spec::leaf("device-7")
    });
    let cases = [
        (
            "cert_serial",
            "cert_cn",
            "2A2B3C4D".to_string(),
            "device-7".to_string(),
        ),
        (
            "cert_fingerprint",
            "cert_san_dns",
            Sha256::digest(client.der().as_ref())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            "device-7.example".to_string(),
        ),
    ];
    for (id_field, user_field, want_id, want_user) in cases {
        let mut backend = FakeBroker::start().await;
        let (running, addr) = start(
            setup(backend.addr, required(&pki)).listener_with("mqtts", |l| {
                l.rewrite_client_id(id_field).rewrite_username(user_field)
            }),
        )
        .await;
        let mut tls = tls_connect(addr, pki.client_config(Some(&client)))
            .await
            .unwrap();
        // A client claiming someone else's identity.
        let claimed = connect_v311("somebody-else");
        tls.write_all(&claimed).await.unwrap();
        tls.write_all(b"\xc0\x00").await.unwrap(); // PINGREQ behind it, untouched
        let expected_len =
            claimed.len() - "somebody-else".len() + want_id.len() + 2 + want_user.len();
        let got = backend_reads(&mut backend, expected_len + 2).await;
        let connect = parse_connect(&got).unwrap();
        assert_eq!(connect.client_id, want_id);
        assert_eq!(connect.username.as_deref(), Some(want_user.as_str()));
        assert_eq!(connect.keep_alive, 60);
        assert_eq!(&got[connect.packet_len..], b"\xc0\x00");
        assert_eq!(
            running.typed_stats().listeners["mqtts"].connections.handled,
            1
        );
    }
}

#[tokio::test]
async fn optional_client_without_certificate_is_refused_when_its_identity_is_needed() {
    let pki = Pki::new();
    let backend = FakeBroker::start().await;
    let (running, addr) = start(
        setup(backend.addr, server_tls(&pki).verify_client("optional"))
            .listener_with("mqtts", |l| l.rewrite_client_id("cert_serial")),
    )
    .await;
    let mut tls = tls_connect(addr, pki.client_config(None)).await.unwrap();
    tls.write_all(&connect_v311("anonymous")).await.unwrap();
    let mut connack = [0u8; 4];
    tls.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x05], "not authorized");
    let stats = running.typed_stats();
    assert_eq!(
        stats.listeners["mqtts"].connections.rejected["cert_identity"],
        1
    );
    assert_eq!(backend.accepted(), 0);
}

#[tokio::test]
async fn second_handshake_resumes_on_tls13_and_tls12() {
    let pki = Pki::new();
    let broker = EmbeddedBroker::start();
    let (running, addr) = start(setup(broker.addr, server_tls(&pki))).await;
    let mut resumed = 0;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        // One client configuration, so its session store carries the ticket across connections.
        let config = pki::client_config(pki.client_roots(), None, &[version]);
        for attempt in 0..2 {
            let mut tls = tls_connect(addr, config.clone()).await.unwrap();
            let kind = tls.get_ref().1.handshake_kind();
            // A full MQTT exchange, so the TLS 1.3 tickets sent after the handshake are read.
            tls.write_all(&connect_v311(&format!("resume-{attempt}")))
                .await
                .unwrap();
            let mut connack = [0u8; 4];
            tls.read_exact(&mut connack).await.unwrap();
            assert_eq!(connack[0], 0x20);
            let expected = if attempt == 0 {
                rustls::HandshakeKind::Full
            } else {
                resumed += 1;
                rustls::HandshakeKind::Resumed
            };
            assert_eq!(kind, Some(expected), "{version:?} attempt {attempt}");
            tls.shutdown().await.unwrap();
        }
    }
    let stats = tls_stats(&running);
    assert_eq!(stats.resumed, resumed);
    assert_eq!(stats.handshakes_ok, 4);
}

#[tokio::test]
async fn garbage_and_plain_mqtt_on_the_tls_port_are_refused() {
    let pki = Pki::new();
    let backend = FakeBroker::start().await;
    let (running, addr) = start(setup(backend.addr, server_tls(&pki))).await;
    let inputs: [&[u8]; 2] = [
        &connect_v311("plain"),
        b"GET / HTTP/1.1\r\n\r\n\x00\xff\xfe garbage",
    ];
    for input in inputs {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(input).await.unwrap();
        let mut buf = vec![0u8; 64];
        // Closed (after at most an alert), never a CONNACK from a broker.
        let end = tokio::time::timeout(WAIT, async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => assert_eq!(buf[0], 0x15, "only a TLS alert may come back"),
                }
            }
        })
        .await;
        assert!(end.is_ok(), "the connection was not closed");
    }
    assert!(
        wait_until(WAIT, || tls_stats(&running)
            .handshakes_failed
            .get("malformed")
            == Some(&2))
        .await,
        "{:?}",
        tls_stats(&running)
    );
    assert_eq!(backend.accepted(), 0);
}

fn rumqttc_tls(
    addr: SocketAddr,
    client_id: &str,
    config: Arc<rustls::ClientConfig>,
) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "localhost", addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    options
}

async fn rumqttc_connect(options: MqttOptions) -> Client {
    let (client, mut events) = rumqttc::AsyncClient::new(options, 64);
    tokio::time::timeout(WAIT, async {
        loop {
            match events.poll().await.expect("rumqttc over TLS") {
                rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack)) => {
                    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
                    return;
                }
                _ => continue,
            }
        }
    })
    .await
    .expect("CONNACK in time");
    Client { client, events }
}

#[tokio::test]
async fn rumqttc_publishes_and_subscribes_through_mutual_tls() {
    let pki = Pki::new();
    let broker = EmbeddedBroker::start();
    let (running, addr) = start(setup(broker.addr, required(&pki))).await;
    let sub_id = pki.client(&Spec::leaf("subscriber"));
    let pub_id = pki.client(&Spec::leaf("publisher"));
    let mut sub = rumqttc_connect(rumqttc_tls(addr, "sub", pki.client_config(Some(&sub_id)))).await;
    sub.subscribe("tls/topic", QoS::AtLeastOnce).await.unwrap();
    let mut publisher =
        rumqttc_connect(rumqttc_tls(addr, "pub", pki.client_config(Some(&pub_id)))).await;
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    publisher
        .publish("tls/topic", QoS::AtLeastOnce, payload.clone())
        .await
        .unwrap();
    let got = sub.next_publish(WAIT).await.unwrap();
    assert_eq!(got.payload.as_ref(), &payload[..]);
    assert_eq!(tls_stats(&running).handshakes_ok, 2);
}

#[test]
fn check_refuses_old_protocols_and_openssl_cipher_strings() {
    let pki = Pki::new();
    let broker: SocketAddr = "127.0.0.1:1883".parse().unwrap();
    let base = setup(broker, server_tls(&pki)).render();
    let run_check = |text: &str| {
        let out = run_binary("check", text);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(run_check(&base).0, Some(0), "{}", run_check(&base).1);
    let old = server_tls(&pki).protocols(&["TLSv1", "TLSv1.1", "TLSv1.2"]);
    let (code, stderr) = run_check(&setup(broker, old).render());
    assert_eq!(code, Some(2));
    assert!(stderr.contains("listener[0].tls.protocols"), "{stderr}");
    assert!(
        stderr.contains("rustls speaks TLS 1.2 and 1.3 only"),
        "{stderr}"
    );
    let openssl = server_tls(&pki).ciphers("HIGH:!aNULL:!MD5");
    let (code, stderr) = run_check(&setup(broker, openssl).render());
    assert_eq!(code, Some(2));
    assert!(stderr.contains("IANA/rustls suite names"), "{stderr}");
    // The files themselves are checked too.
    let missing = base.replace(
        &pki.server_key.display().to_string(),
        "/nonexistent/key.pem",
    );
    let (code, stderr) = run_check(&missing);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("/nonexistent/key.pem"), "{stderr}");
}

#[tokio::test]
async fn sighup_serves_a_new_certificate_keeps_established_connections_and_survives_a_bad_file() {
    let pki = Pki::new();
    let mut backend = FakeBroker::start().await;
    let mut daemon = setup(backend.addr, server_tls(&pki)).spawn_binary();
    let (listen, stats) = (daemon.listen, daemon.stats);

    let server_serial = |tls: &TlsStream<TcpStream>| {
        let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        mqsplice::tls::cert_field(&der, mqsplice::config::CertField::Serial).unwrap()
    };
    let mut before = tls_connect(listen, pki.client_config(None)).await.unwrap();
    let old_serial = server_serial(&before);
    let connect = connect_v311("long-lived");
    before.write_all(&connect).await.unwrap();
    let mut established = backend.next(WAIT).await;
    let mut got = vec![0u8; connect.len()];
    established.read_exact(&mut got).await.unwrap();

    // A new certificate (and key) in the same files, then SIGHUP.
    let renewed = pki::issue(
        &pki.root,
        &Spec {
            dns: &["localhost"],
            client: false,
            serial: Some(&[0x0B, 0xAD, 0xC0, 0xDE]),
            ..Spec::leaf("localhost")
        },
    );
    renewed.write(&pki.dir, "server");
    assert!(daemon.signal("HUP"));
    assert!(
        wait_until(WAIT, || daemon.stderr().contains("reloaded")).await,
        "{}",
        daemon.stderr()
    );

    let after = tls_connect(listen, pki.client_config(None)).await.unwrap();
    assert_eq!(server_serial(&after), "0BADC0DE");
    assert_ne!(old_serial, "0BADC0DE");
    // The connection from before the reload still carries bytes both ways.
    before.write_all(b"\xc0\x00").await.unwrap();
    let mut ping = [0u8; 2];
    established.read_exact(&mut ping).await.unwrap();
    assert_eq!(ping, [0xc0, 0x00]);
    established.write_all(b"\xd0\x00").await.unwrap();
    before.read_exact(&mut ping).await.unwrap();
    assert_eq!(ping, [0xd0, 0x00]);
    let reloaded = fetch_async(stats).await.listeners["mqtts"].tls.clone();
    assert_eq!(reloaded.expect("tls stats").reloads, 1);

    // A broken key file on the next SIGHUP: the error is logged, the last good files stay.
    std::fs::write(&pki.server_key, "not a key").unwrap();
    daemon.signal("HUP");
    assert!(
        wait_until(WAIT, || daemon.stderr().contains("not reloaded")).await,
        "{}",
        daemon.stderr()
    );
    let still = tls_connect(listen, pki.client_config(None)).await.unwrap();
    assert_eq!(server_serial(&still), "0BADC0DE");
    let failed = fetch_async(stats).await.listeners["mqtts"].tls.clone();
    assert_eq!(failed.expect("tls stats").reload_failures, 1);
    daemon.terminate();
}

#[tokio::test]
async fn upstream_tls_speaks_tls_to_the_broker_after_a_plain_proxy_header() {
    let pki = Pki::new();
    let mut broker = FakeBroker::start().await;
    let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(pki.server.full_chain(), pki.server.key_der())
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let running = Setup::one(Kind::Tcp, "mqtt", &[broker.addr])
        .stats_listen("off")
        .upstream_with(|u| {
            u.proxy_protocol("v1")
                .upstream_tls(&pki.ca_path, "localhost")
        })
        .start()
        .await;
    let addr = running.listener_addr("mqtt").unwrap();
    let mut client = TcpStream::connect(addr).await.unwrap();
    let connect = connect_v311("to-a-tls-broker");
    client.write_all(&connect).await.unwrap();

    let mut tcp = broker.next(WAIT).await;
    // The PROXY header comes in the clear, before the handshake, as brokers expect it.
    let mut header = Vec::new();
    while !header.ends_with(b"\r\n") {
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await.unwrap();
        header.push(byte[0]);
    }
    assert!(header.starts_with(b"PROXY TCP4 127.0.0.1 "), "{header:?}");
    let mut tls = tokio::time::timeout(WAIT, acceptor.accept(tcp))
        .await
        .unwrap()
        .unwrap();
    let mut got = vec![0u8; connect.len()];
    tls.read_exact(&mut got).await.unwrap();
    assert_eq!(got, connect);
    tls.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
    tls.flush().await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, client.read_exact(&mut connack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    let stats = running.typed_stats();
    assert_eq!(stats.listeners["mqtt"].data_path, "userspace");
    assert_eq!(stats.listeners["mqtt"].data_path_reason, "broker_tls");
}

#[tokio::test]
async fn a_resumed_session_keeps_its_client_certificate_for_the_rewrite() {
    let pki = Pki::new();
    let client = pki.client(&Spec {
        serial: Some(&[0x01, 0x02, 0x03]),
        ..Spec::leaf("device")
    });
    let mut backend = FakeBroker::start().await;
    let (running, addr) = start(
        setup(backend.addr, required(&pki))
            .listener_with("mqtts", |l| l.rewrite_client_id("cert_serial")),
    )
    .await;
    let config = pki.client_config(Some(&client));
    for attempt in 0..2 {
        let mut tls = tls_connect(addr, config.clone()).await.unwrap();
        let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        assert_eq!(resumed, attempt == 1);
        tls.write_all(&connect_v311("claimed")).await.unwrap();
        let mut conn = backend.next(WAIT).await;
        let mut got = vec![0u8; connect_v311("010203").len()];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(parse_connect(&got).unwrap().client_id, "010203");
        // A CONNACK from the "broker", so the client reads the TLS 1.3 tickets behind it.
        conn.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
        let mut connack = [0u8; 4];
        tls.read_exact(&mut connack).await.unwrap();
        tls.shutdown().await.unwrap();
    }
    assert_eq!(tls_stats(&running).resumed, 1);
}
