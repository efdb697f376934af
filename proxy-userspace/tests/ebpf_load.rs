//! The kernel data plane really splices: bytes from a client reach an echo server and come back
//! through the SOCKHASH redirect, with the test never reading the two proxied sockets itself.
//!
//! Needs root (or CAP_BPF + CAP_NET_ADMIN); without it the test prints `SKIPPED: <reason>` and
//! passes, unless `CI=true`, where a skip would hide a broken runner and so fails instead.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::{fd::AsFd, unix::fs::MetadataExt},
    thread,
    time::Duration,
};

use mqsplice::dataplane::ebpf::{EbpfPrograms, EbpfUnavailable};

fn skip_or_fail(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("eBPF data plane test cannot run under CI=true: {reason}");
    }
    println!("SKIPPED: {reason}");
}

/// A one-connection echo server; returns its address.
fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("echo accept");
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
    addr
}

fn read_exactly(client: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    client
        .read_exact(&mut got)
        .unwrap_or_else(|e| panic!("reading {len} echoed bytes through the splice: {e}"));
    got
}

#[test]
fn sockhash_splices_client_to_echo_server() {
    let euid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    let pin_dir = format!("/sys/fs/bpf/mqsplice-test-{}", std::process::id());
    let mut programs = match EbpfPrograms::load_with_pin_dir(&pin_dir) {
        Ok(p) => p,
        Err(e @ (EbpfUnavailable::NotPermitted(_) | EbpfUnavailable::NotBuilt)) => {
            return skip_or_fail(&e.to_string());
        }
        Err(e) if euid != 0 => return skip_or_fail(&format!("not root (euid {euid}): {e}")),
        Err(e) => panic!("loading the eBPF data plane as root failed: {e}"),
    };
    println!("loaded; maps pinned under {}", programs.pin_dir().display());
    assert!(
        std::path::Path::new(&pin_dir).join("mqs_socks").exists(),
        "mqs_socks is pinned"
    );

    // client ↔ A is the accepted side of a tiny relay; B connects on to the echo server.
    let echo = echo_server();
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(relay.local_addr().unwrap()).unwrap();
    let (a, _) = relay.accept().unwrap();
    let b = TcpStream::connect(echo).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();

    // Bytes that arrive on A before it joins the map must still be forwarded (the kick).
    let early = b"queued before the splice;";
    client.write_all(early).unwrap();
    thread::sleep(Duration::from_millis(100));

    let (ca, cb) = programs.splice(a.as_fd(), b.as_fd()).expect("splice");
    assert_ne!(ca, cb, "distinct sockets have distinct cookies");
    assert_eq!(read_exactly(&mut client, early.len()), early);

    let late = b"hello through the kernel";
    for _ in 0..3 {
        client.write_all(late).unwrap();
        assert_eq!(read_exactly(&mut client, late.len()), late);
    }

    // A larger burst, to cover more than one skb per direction.
    let big: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let mut writer = client.try_clone().unwrap();
    let to_send = big.clone();
    let sender = thread::spawn(move || writer.write_all(&to_send).unwrap());
    assert_eq!(read_exactly(&mut client, big.len()), big);
    sender.join().unwrap();

    programs.unsplice(ca, cb);
    client.shutdown(Shutdown::Both).ok();
    drop(programs);
    assert!(
        !std::path::Path::new(&pin_dir).exists(),
        "pins are removed on drop"
    );
}
