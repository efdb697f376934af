//! The in-kernel splice end to end: bulk integrity and the daemon's CPU, lossless close, the
//! hand-over race with a client that says everything at once, map hygiene over many cycles,
//! privileges and the pin directory's lock. The eBPF tests need root (see `Mode::runnable`).

use mqsplice::stats::SpliceStats;
use mqsplice_tests::fake::{Behaviour, FakeBroker};
use mqsplice_tests::proxy::{self, run_binary};
use mqsplice_tests::raw::{connect_v311, publish_qos0};
use mqsplice_tests::setup::Setup;
use mqsplice_tests::stats::{Stats, fetch, fetch_async, upstream_servers};
use mqsplice_tests::{Mode, maps, unique_pin_dir, wait_until};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;
use xxhash_rust::xxh3::Xxh3;

const MIB: usize = 1024 * 1024;
const CONNACK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

/// One MiB of pseudo-random bytes: repeated, it makes a stream whose checksum catches loss,
/// duplication and reordering of any chunk.
fn block(seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..MIB / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// Length and checksum of `mib` repetitions of `block`, as the sender sends them.
fn expected(block: &[u8], mib: usize) -> (u64, u64) {
    let mut hash = Xxh3::new();
    for _ in 0..mib {
        hash.update(block);
    }
    ((block.len() * mib) as u64, hash.digest())
}

/// Writes `mib` repetitions of `block`, then shuts the write side (`close` closes the socket).
fn send(mut stream: TcpStream, block: &[u8], mib: usize, close: bool) {
    for _ in 0..mib {
        stream.write_all(block).expect("send");
    }
    if close {
        drop(stream);
    } else {
        stream.shutdown(Shutdown::Write).expect("shutdown");
    }
}

/// Reads to EOF: length and checksum of everything received.
fn receive(mut stream: TcpStream) -> (u64, u64) {
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut hash = Xxh3::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (total, hash.digest()),
            Ok(n) => {
                hash.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) => panic!("receive after {total} bytes: {e}"),
        }
    }
}

/// The splice's own figures, which a daemon on the sockmap path reports.
fn splice_stats(stats: &Stats) -> SpliceStats {
    stats
        .dataplane
        .splice
        .clone()
        .expect("splice figures on the sockmap path")
}

/// Connects through the proxy at `addr` and waits for the CONNACK.
fn client(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    stream.write_all(&connect_v311("bulk")).unwrap();
    let mut connack = [0u8; 4];
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.read_exact(&mut connack).unwrap();
    assert_eq!(connack, CONNACK);
    stream
}

/// Moves `mib` MiB each way through a daemon on `mode`, checks both checksums, and returns the
/// CPU time the daemon spent meanwhile.
fn bulk_each_way(mode: Mode, mib: usize) -> Duration {
    let mut broker = FakeBroker::blocking(Behaviour::Connack(0));
    // This measures the splice itself. On these 2 cores the four test threads, not the proxy,
    // are the bottleneck, so with the default limits backpressure throttles the flow and the
    // daemon copies it (bounded memory, NGINX's CPU); lift the limits to keep it spliced.
    let daemon = Setup::tcp(mode, &[broker.addr])
        .max_inflight_per_flow("1GiB")
        .max_inflight_total("2GiB")
        .spawn_binary();
    let (listen, stats) = (daemon.listen, daemon.stats);
    let (up_block, down_block) = (block(1), block(2));
    let cpu_before = daemon.cpu_ns();

    let client = client(listen);
    let server = broker.next_std(Duration::from_secs(10));
    let (client_tx, server_tx) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (up, down) = (up_block.clone(), down_block.clone());
    let senders = [
        thread::spawn(move || send(client_tx, &up, mib, false)),
        thread::spawn(move || send(server_tx, &down, mib, false)),
    ];
    let at_server = thread::spawn(move || receive(server));
    let at_client = receive(client);
    let at_server = at_server.join().unwrap();
    for sender in senders {
        sender.join().unwrap();
    }
    let cpu = Duration::from_nanos(daemon.cpu_ns() - cpu_before);
    if mode == Mode::Sockmap {
        println!(
            "ebpf data plane after the bulk transfer: {:?}",
            fetch(stats).dataplane
        );
    }
    assert_eq!(
        at_server,
        expected(&up_block, mib),
        "{mode:?}: client → broker stream differs"
    );
    assert_eq!(
        at_client,
        expected(&down_block, mib),
        "{mode:?}: broker → client stream differs"
    );
    cpu
}

#[test]
fn ebpf_256_mib_each_way_arrive_intact_for_under_5_percent_of_the_userspace_cpu() {
    if !Mode::Sockmap.runnable() {
        return;
    }
    let userspace = bulk_each_way(Mode::Userspace, 256);
    let ebpf = bulk_each_way(Mode::Sockmap, 256);
    println!("daemon CPU for 256 MiB each way: userspace {userspace:?}, ebpf {ebpf:?}");
    assert!(
        ebpf.as_nanos() * 20 < userspace.as_nanos(),
        "the spliced daemon used {ebpf:?}, not under 5% of the userspace path's {userspace:?}"
    );
}

/// How one lossless-close case ends a flow.
#[derive(Debug, Clone, Copy)]
enum Close {
    /// The client sends, shuts its write side; the broker replies afterwards, then closes.
    ClientFirst,
    /// The broker sends and shuts its write side; the client replies afterwards, then closes.
    BrokerFirst,
    /// The client (having read everything it was sent) writes and closes the socket at once.
    ClientWritesAndCloses,
}

async fn lossless_close(mode: Mode, close: Close, mib: usize, rounds: usize) {
    let broker = FakeBroker::with(Behaviour::Connack(0)).await;
    let running = Setup::tcp(mode, &[broker.addr]).start().await;
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(broker));
    let addr = running.listener_addr("mqtt").unwrap();
    let (a, b) = (std::sync::Arc::new(block(3)), std::sync::Arc::new(block(4)));
    for round in 0..rounds {
        let (a2, b2, accepted) = (a.clone(), b.clone(), accepted.clone());
        let (got_up, got_down) = tokio::task::spawn_blocking(move || {
            let (a, b) = (a2, b2);
            let client = client(addr);
            let server = accepted.lock().unwrap().next_std(Duration::from_secs(10));
            match close {
                Close::ClientFirst => {
                    send(client.try_clone().unwrap(), &a, mib, false);
                    let got_up = receive(server.try_clone().unwrap());
                    send(server, &b, mib, true);
                    (got_up, receive(client))
                }
                Close::BrokerFirst => {
                    send(server.try_clone().unwrap(), &b, mib, false);
                    let got_down = receive(client.try_clone().unwrap());
                    send(client, &a, mib, true);
                    (receive(server), got_down)
                }
                Close::ClientWritesAndCloses => {
                    send(client, &a, mib, true);
                    let got_up = receive(server);
                    (got_up, expected(&b, mib))
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(
            got_up,
            expected(&a, mib),
            "{mode:?} {close:?} round {round}: client → broker"
        );
        assert_eq!(
            got_down,
            expected(&b, mib),
            "{mode:?} {close:?} round {round}: broker → client"
        );
        assert!(
            wait_until(Duration::from_secs(10), || running
                .typed_stats()
                .connections
                .active
                == 0)
            .await,
            "flows did not close: {:?}",
            running.typed_stats()
        );
    }
    if mode == Mode::Sockmap {
        let splice = splice_stats(&running.typed_stats());
        let pin = &splice.bpffs_pin;
        assert_eq!(
            maps::flow_entries(pin),
            [0, 0, 0],
            "socks/peers/counters entries left in {pin}"
        );
        assert_eq!(
            (splice.closes.rst, splice.redirect_failed),
            (0, 0),
            "(closes.rst, redirect_failed): {splice:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_client_first_close_loses_nothing() {
    lossless_close(Mode::Userspace, Close::ClientFirst, 4, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_client_first_close_loses_nothing_and_leaves_no_entries() {
    if Mode::Sockmap.runnable() {
        lossless_close(Mode::Sockmap, Close::ClientFirst, 4, 10).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_broker_first_close_loses_nothing() {
    lossless_close(Mode::Userspace, Close::BrokerFirst, 4, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_broker_first_close_loses_nothing_and_leaves_no_entries() {
    if Mode::Sockmap.runnable() {
        lossless_close(Mode::Sockmap, Close::BrokerFirst, 4, 10).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_client_that_writes_and_closes_at_once_loses_nothing() {
    lossless_close(Mode::Userspace, Close::ClientWritesAndCloses, 4, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_client_that_writes_and_closes_at_once_loses_nothing() {
    if Mode::Sockmap.runnable() {
        lossless_close(Mode::Sockmap, Close::ClientWritesAndCloses, 4, 10).await;
    }
}

/// CONNECT, PUBLISH, DISCONNECT and FIN in one go, without waiting for the CONNACK: the broker
/// must get every byte, whether the pair was spliced or the splice was refused.
async fn everything_at_once(mode: Mode) {
    let mut broker = FakeBroker::start().await;
    let running = Setup::tcp(mode, &[broker.addr]).start().await;
    let addr = running.listener_addr("mqtt").unwrap();
    let mut burst = connect_v311("at-once");
    burst.extend(publish_qos0("t/at-once", b"last words"));
    burst.extend([0xe0, 0x00]); // DISCONNECT
    for round in 0..20 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client.write_all(&burst).await.unwrap();
        client.shutdown().await.unwrap();
        let mut server = broker.next(Duration::from_secs(10)).await;
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), server.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            got, burst,
            "{mode:?} round {round}: the broker did not get exactly the burst"
        );
        drop(server);
        drop(client);
    }
    assert!(
        wait_until(Duration::from_secs(10), || running
            .typed_stats()
            .connections
            .active
            == 0)
        .await
    );
    if mode == Mode::Sockmap {
        let splice = splice_stats(&running.typed_stats());
        println!(
            "ebpf: {} spliced, {} refused (served on userspace)",
            splice.spliced_total, splice.splice_refused
        );
        assert_eq!(splice.spliced_total + splice.splice_refused, 20);
        assert_eq!(maps::flow_entries(&splice.bpffs_pin), [0, 0, 0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_connect_publish_disconnect_fin_in_one_go_all_reach_the_broker() {
    everything_at_once(Mode::Userspace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_connect_publish_disconnect_fin_in_one_go_all_reach_the_broker() {
    if Mode::Sockmap.runnable() {
        everything_at_once(Mode::Sockmap).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_20000_cycles_leave_the_maps_empty_and_descriptors_at_baseline() {
    if !Mode::Sockmap.runnable() {
        return;
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = FakeBroker::with(Behaviour::Echo).await;
    let daemon = Setup::tcp(Mode::Sockmap, &[broker.addr]).spawn_binary();
    let (listen, stats) = (daemon.listen, daemon.stats);
    let baseline = daemon.open_fds();
    let publish = publish_qos0("t/cycle", &[7u8; 100]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let publish = publish.clone();
        workers.spawn(async move {
            for i in 0..2500 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "20,000 cycles took over 240 s"
                );
                let mut stream = tokio::net::TcpStream::connect(listen).await.unwrap();
                stream
                    .write_all(&connect_v311(&format!("cycle-{worker}-{i}")))
                    .await
                    .unwrap();
                let mut connack = [0u8; 4];
                stream.read_exact(&mut connack).await.unwrap();
                assert_eq!(connack, CONNACK);
                stream.write_all(&publish).await.unwrap();
                let mut echoed = vec![0u8; publish.len()];
                stream.read_exact(&mut echoed).await.unwrap();
                assert_eq!(echoed, publish);
                stream.write_all(&[0xe0, 0x00]).await.unwrap();
                stream.shutdown().await.unwrap();
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest).await;
            }
        });
    }
    while let Some(result) = workers.join_next().await {
        result.unwrap();
    }
    let mut json = fetch_async(stats).await;
    for _ in 0..200 {
        if json.connections.active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        json = fetch_async(stats).await;
    }
    assert_eq!(json.connections.active, 0, "{json:?}");
    assert_eq!(json.connections.handled, 20_000);
    let splice = splice_stats(&json);
    assert_eq!(
        splice.spliced_total + splice.splice_refused,
        20_000,
        "{splice:?}"
    );
    println!(
        "20,000 cycles: {} spliced, {} refused; closes {:?}",
        splice.spliced_total, splice.splice_refused, splice.closes
    );
    let pin = &splice.bpffs_pin;
    assert_eq!(maps::flow_entries(pin), [0, 0, 0], "entries left in {pin}");
    assert!(
        wait_until(Duration::from_secs(10), || daemon.open_fds() <= baseline).await,
        "descriptors: {baseline} at start, {} after 20,000 cycles",
        daemon.open_fds()
    );
}

#[test]
fn ebpf_without_the_privilege_to_load_programs_refuses_to_start_and_says_why() {
    use std::os::unix::process::CommandExt;
    let (text, _, _) = Setup::tcp(Mode::Sockmap, &["127.0.0.1:1".parse().unwrap()]).for_binary();
    let path = mqsplice_tests::daemon::write_config(&text);
    // `nobody` must be able to read the file and its directory.
    let dir = path.parent().unwrap();
    for p in [dir, path.as_path()] {
        let mut perms = std::fs::metadata(p).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(p, perms).unwrap();
    }
    let mut command = std::process::Command::new(proxy::binary());
    command.args(["run", "--config"]).arg(&path);
    if Mode::Sockmap.runnable() {
        // As root: drop to `nobody`, which may not load BPF programs.
        command.uid(65534).gid(65534);
    }
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("dataplane.mode = \"sockmap\""), "{stderr}");
    assert!(
        stderr.contains("not permitted") || stderr.contains("bpffs"),
        "no reason given: {stderr}"
    );
}

#[test]
fn ebpf_a_killed_instance_pins_are_cleaned_and_a_live_instance_keeps_its_directory() {
    if !Mode::Sockmap.runnable() {
        return;
    }
    let pin = unique_pin_dir();
    let broker = "127.0.0.1:1".parse().unwrap();
    let setup = || Setup::tcp(Mode::Sockmap, &[broker]).bpffs_pin(&pin);
    let mut first = setup().spawn_binary();
    assert!(std::path::Path::new(&pin).join("mqs_socks").exists());
    first.kill();
    assert!(
        std::path::Path::new(&pin).join("mqs_socks").exists(),
        "SIGKILL leaves the pins behind"
    );

    let mut second = setup().spawn_binary();
    assert!(
        second.stderr().contains("removed stale pin"),
        "{}",
        second.stderr()
    );

    let (text3, _, _) = setup().for_binary();
    let out = run_binary("run", &text3);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("in use by another mqsplice instance"),
        "{stderr}"
    );
    assert!(second.terminate().success());
    assert!(
        !std::path::Path::new(&pin).exists(),
        "a clean stop removes the pins"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_program_warnings_reach_the_daemon_log() {
    if !Mode::Sockmap.runnable() {
        return;
    }
    let mut broker = FakeBroker::with(Behaviour::Connack(0)).await;
    let daemon = Setup::tcp(Mode::Sockmap, &[broker.addr]).spawn_binary();
    let (listen, stats) = (daemon.listen, daemon.stats);
    let mut client = client(listen);
    let _server = broker.next(Duration::from_secs(10)).await;
    let pin = splice_stats(&fetch_async(stats).await).bpffs_pin;
    // Pull the broker's socket out of mqs_socks behind the daemon's back, as an operator with
    // bpftool could: the next client bytes cannot be redirected, and the program says so.
    let peers = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned", &format!("{pin}/mqs_peers")])
        .output()
        .unwrap();
    let peers: serde_json::Value = serde_json::from_slice(&peers.stdout).unwrap();
    let broker_key: Vec<String> = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["value"][8] == "0x01") // direction TO_CLIENT: the broker's socket
        .expect("the broker socket's peer entry")["key"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap().trim_start_matches("0x").to_string())
        .collect();
    let deleted = std::process::Command::new("bpftool")
        .args([
            "map",
            "delete",
            "pinned",
            &format!("{pin}/mqs_socks"),
            "key",
            "hex",
        ])
        .args(&broker_key)
        .status()
        .unwrap();
    assert!(deleted.success());
    client
        .write_all(&publish_qos0("t/lost", b"into the void"))
        .unwrap();
    let logged = wait_until(Duration::from_secs(5), || {
        daemon.stderr().contains("redirect from socket")
    })
    .await;
    assert!(
        logged,
        "no program warning in the daemon log:\n{}",
        daemon.stderr()
    );
    assert!(splice_stats(&fetch_async(stats).await).redirect_failed >= 1);
}

/// Paho's way out: DISCONNECT with the FIN, and a reset right after. The broker takes every byte
/// and closes; each pair must end at once (counted as a reset), not wait for
/// `close_drain_timeout` as if bytes were missing.
#[test]
fn ebpf_disconnect_fin_then_reset_ends_the_pair_at_once() {
    use mqsplice_tests::flows::{connect_flow, flow_backend, linger_zero, wait_for};
    if !Mode::Sockmap.runnable() {
        return;
    }
    const PAIRS: usize = 20;
    let (tx, rx) = mpsc::channel();
    let broker = flow_backend(move |index, mut s| {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        let _ = tx.send((index, rest));
    });
    let daemon = Setup::tcp(Mode::Sockmap, &[broker]).spawn_binary();
    let (listen, stats_addr) = (daemon.listen, daemon.stats);
    let mut goodbye = publish_qos0("t/bye", b"last words");
    goodbye.extend([0xe0, 0x00]); // DISCONNECT
    for index in 0..PAIRS {
        let mut client = connect_flow(listen, index);
        client.write_all(&goodbye).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        linger_zero(&client);
        drop(client);
    }
    for _ in 0..PAIRS {
        let (index, rest) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a broker connection never ended");
        assert_eq!(
            rest, goodbye,
            "pair {index}: the broker did not get the goodbye"
        );
    }
    let ended = wait_for(Duration::from_secs(3), || {
        fetch(stats_addr).connections.active == 0
    });
    let json = fetch(stats_addr);
    let closes = &splice_stats(&json).closes;
    assert!(
        ended,
        "pairs still active 3 s after their last byte was acknowledged: {json:?}"
    );
    assert_eq!(closes.drain_timeout, 0, "{closes:?}");
    assert!(
        !daemon.stderr().contains("did not reach"),
        "{}",
        daemon.stderr()
    );
}

/// Operators graph per-server and per-listener bytes while sessions run: a spliced flow's bytes
/// must show there before it closes (they never pass the daemon), and match exactly after.
#[test]
fn sockmap_server_and_listener_bytes_move_while_a_spliced_flow_is_open() {
    if !Mode::Sockmap.runnable() {
        return;
    }
    let mut broker = FakeBroker::blocking(Behaviour::Connack(0));
    let daemon = Setup::tcp(Mode::Sockmap, &[broker.addr]).spawn_binary();
    let stats = || fetch(daemon.stats);
    let figures = |stats: &Stats| {
        let (server, listener) = (&upstream_servers(stats)[0], &stats.listeners["mqtt"]);
        [
            server.bytes_to_server,
            server.bytes_from_server,
            listener.bytes_from_clients,
            listener.bytes_to_clients,
        ]
    };
    let mut client = client(daemon.listen);
    let mut server = broker.next_std(Duration::from_secs(10));
    let connect_len = connect_v311("bulk").len() as u64;
    let (up, down) = (vec![0x5a_u8; 300_000], vec![0xa5_u8; 200_000]);
    client.write_all(&up).unwrap();
    server.write_all(&down).unwrap();
    let mut sink = vec![0u8; up.len()];
    server.read_exact(&mut sink).unwrap();
    let mut sink = vec![0u8; down.len()];
    client.read_exact(&mut sink).unwrap();

    // Open: the meters already hold every byte that crossed (CONNECT and CONNACK included).
    let open = (
        connect_len + up.len() as u64,
        CONNACK.len() as u64 + down.len() as u64,
    );
    let live = stats();
    let splice = splice_stats(&live);
    assert_eq!(splice.spliced_active, 1, "{splice:?}");
    assert_eq!(
        figures(&live),
        [open.0, open.1, open.0, open.1],
        "[to server, from server, from clients, to clients] while the flow is open"
    );
    drop(client);
    drop(server);
    assert!(
        mqsplice_tests::flows::wait_for(Duration::from_secs(10), || {
            splice_stats(&stats()).spliced_active == 0
        }),
        "the flow did not close"
    );
    assert_eq!(
        figures(&stats()),
        [open.0, open.1, open.0, open.1],
        "after the close the figures are the flow's totals, counted once"
    );
    drop(daemon);
}

/// A client whose first write is one segment, of which the daemon has already read a part
/// before the socket enters the map (as a proxy that reads exactly the CONNECT would): the
/// kernel hands the whole segment to the verdict, and the program must send on only the bytes
/// after what was read. Before the program trimmed skbs to the socket's next unseen byte, the
/// read bytes reached the broker a second time (docs/sockmap-replay.md). No daemon: the project's own
/// program and maps, set up in the hand-over order.
#[test]
fn sockmap_a_partly_read_segment_goes_on_from_the_first_unread_byte() {
    use mqsplice::dataplane::ebpf::{EbpfPrograms, set_rcvlowat, socket_cookie};
    use proxy_common::{FlowCounters, PeerEntry, direction, throttle};
    use std::os::fd::{AsFd, AsRawFd};

    if !Mode::Sockmap.runnable() {
        return;
    }
    let pin = unique_pin_dir();
    let (programs, maps) = EbpfPrograms::load(&pin).expect("load the splice programs");
    assert!(
        programs.stream_check().is_ok(),
        "the program needs the kernel's BTF here: {:?}",
        programs.stream_check()
    );
    let proxy_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let broker_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(proxy_l.local_addr().unwrap()).unwrap();
    let (mut a, _) = proxy_l.accept().unwrap();
    let b = TcpStream::connect(broker_l.local_addr().unwrap()).unwrap();
    let (mut broker, _) = broker_l.accept().unwrap();

    // One write, one segment on loopback: 4-byte counters 0..1000 (4,000 bytes).
    let stream: Vec<u8> = (0u32..1000).flat_map(u32::to_le_bytes).collect();
    client.write_all(&stream).unwrap();
    let mut probe = [0u8; 4000];
    for _ in 0..500 {
        if mqsplice::dataplane::ebpf::peek(a.as_fd(), &mut probe).unwrap_or(0) == stream.len() {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    // The "daemon" reads the first 100 bytes itself, as a CONNECT, and writes them on.
    let mut head = [0u8; 100];
    a.read_exact(&mut head).unwrap();
    let mut b_writer = b.try_clone().unwrap();
    b_writer.write_all(&head).unwrap();

    let cookies = [
        socket_cookie(a.as_fd()).unwrap(),
        socket_cookie(b.as_fd()).unwrap(),
    ];
    let entry = |side: usize| PeerEntry {
        peer_cookie: cookies[1 - side],
        direction: [direction::TO_UPSTREAM, direction::TO_CLIENT][side],
        throttled: throttle::OFF,
        signal_at: u64::MAX,
        daemon_read: 0,
        hard_limit: u64::MAX,
    };
    let mut maps = maps;
    for (side, &cookie) in cookies.iter().enumerate() {
        maps.flow_counters
            .insert(cookie, FlowCounters::default(), 0)
            .unwrap();
        maps.peers.insert(cookie, entry(side), 0).unwrap();
    }
    maps.socks.insert(cookies[1], b.as_raw_fd(), 0).unwrap();
    maps.socks.insert(cookies[0], a.as_raw_fd(), 0).unwrap();
    // The hand-over kick: the verdict runs over what is queued.
    set_rcvlowat(a.as_fd(), 1).unwrap();
    set_rcvlowat(b.as_fd(), 1).unwrap();
    client.shutdown(Shutdown::Write).unwrap();

    broker
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    // Read until a quiet half second after the last expected byte, to catch extra ones.
    loop {
        match broker.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let trimmed = maps
        .flow_counters
        .get(&cookies[0], 0)
        .map(|c| c.bytes)
        .unwrap_or_default();
    for cookie in cookies {
        let _ = maps.socks.remove(&cookie);
        let _ = maps.peers.remove(&cookie);
        let _ = maps.flow_counters.remove(&cookie);
    }
    drop(programs);
    assert_eq!(
        got.len(),
        stream.len(),
        "the broker got {} bytes for {} sent (100 of them read before the hand-over)",
        got.len(),
        stream.len()
    );
    assert!(got == stream, "the broker's bytes differ from the client's");
    assert_eq!(
        trimmed,
        stream.len() as u64 - 100,
        "the program should have forwarded exactly the unread bytes"
    );
}
