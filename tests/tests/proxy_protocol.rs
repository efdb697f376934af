//! The PROXY header on the broker leg, parsed by an independent implementation (the `ppp`
//! crate): it names the real client and the address it reached, and the CONNECT follows intact.

use mqsplice_tests::Mode;
use mqsplice_tests::fake::FakeBroker;
use mqsplice_tests::raw::{self, connect_v311};
use mqsplice_tests::setup::Setup;
use ppp::PartialResult;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);
const CONNACK_OK: &[u8] = &[0x20, 0x02, 0x00, 0x00];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Version {
    Off,
    V1,
    V2,
}

/// The addresses a header announced: (source, destination).
type Announced = Option<(SocketAddr, SocketAddr)>;

/// Parses a complete header at the start of `buf`: its length and addresses, or `None` while
/// more bytes are needed.
fn parse_header(version: Version, buf: &[u8]) -> Option<(usize, Announced)> {
    match version {
        Version::Off => Some((0, None)),
        Version::V1 => {
            let parsed = ppp::v1::Header::try_from(buf);
            if parsed.is_incomplete() {
                return None;
            }
            let header = parsed.unwrap_or_else(|e| panic!("bad v1 header: {e:?} in {buf:02x?}"));
            let addrs = match header.addresses {
                ppp::v1::Addresses::Tcp4(a) => (
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                ),
                other => panic!("v1 header announced {other:?}"),
            };
            Some((header.header.len(), Some(addrs)))
        }
        Version::V2 => {
            let parsed = ppp::v2::Header::try_from(buf);
            if parsed.is_incomplete() {
                return None;
            }
            let header = parsed.unwrap_or_else(|e| panic!("bad v2 header: {e:?} in {buf:02x?}"));
            assert_eq!(header.command, ppp::v2::Command::Proxy);
            assert_eq!(header.protocol, ppp::v2::Protocol::Stream);
            let addrs = match header.addresses {
                ppp::v2::Addresses::IPv4(a) => (
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                ),
                other => panic!("v2 header announced {other:?}"),
            };
            Some((header.len(), Some(addrs)))
        }
    }
}

/// The broker side: reads the header and the CONNECT, checks the CONNECT is exactly
/// `connect`, answers CONNACK and returns what the header announced.
async fn broker_side(mut stream: TcpStream, version: Version, connect: &[u8]) -> Announced {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    for _ in 0..1000 {
        if let Some((header_len, announced)) = parse_header(version, &buf)
            && buf.len() >= header_len + connect.len()
        {
            assert_eq!(
                &buf[header_len..],
                connect,
                "the bytes after the header are exactly the client's CONNECT"
            );
            stream.write_all(CONNACK_OK).await.unwrap();
            return announced;
        }
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("header and CONNECT within 5s")
            .unwrap();
        assert!(n > 0, "proxy closed after {buf:02x?}");
        buf.extend_from_slice(&chunk[..n]);
    }
    panic!("no header and CONNECT in 1000 reads: {buf:02x?}");
}

async fn proxy_header(mode: Mode, version: Version) {
    let setting = match version {
        Version::Off => "off",
        Version::V1 => "v1",
        Version::V2 => "v2",
    };
    let mut backend = FakeBroker::start().await;
    let running = Setup::tcp(mode, &[backend.addr])
        .upstream_with(|u| u.proxy_protocol(setting))
        .start()
        .await;
    let listener = running.listener_addr("mqtt").unwrap();

    let connect = connect_v311(&format!("pp-{setting}"));
    let mut client = TcpStream::connect(listener).await.unwrap();
    client.write_all(&connect).await.unwrap();
    let stream = backend.next(WAIT).await;
    let announced = broker_side(stream, version, &connect).await;
    assert_eq!(raw::read_exactly(&mut client, 4, WAIT).await, CONNACK_OK);

    match version {
        Version::Off => assert_eq!(announced, None),
        Version::V1 | Version::V2 => assert_eq!(
            announced,
            Some((client.local_addr().unwrap(), listener)),
            "{setting}: (source, destination) = (the client's socket, the listener)"
        ),
    }
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_proxy_protocol_v1_announces_client_and_listener() {
    proxy_header(Mode::Userspace, Version::V1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_proxy_protocol_v2_announces_client_and_listener() {
    proxy_header(Mode::Userspace, Version::V2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_proxy_protocol_off_sends_the_connect_first() {
    proxy_header(Mode::Userspace, Version::Off).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_proxy_protocol_v1_announces_client_and_listener() {
    if Mode::Sockmap.runnable() {
        proxy_header(Mode::Sockmap, Version::V1).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_proxy_protocol_v2_announces_client_and_listener() {
    if Mode::Sockmap.runnable() {
        proxy_header(Mode::Sockmap, Version::V2).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_proxy_protocol_off_sends_the_connect_first() {
    if Mode::Sockmap.runnable() {
        proxy_header(Mode::Sockmap, Version::Off).await;
    }
}
