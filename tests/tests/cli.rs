//! The `mqsplice` binary as an operator runs it (needs `MQSPLICE_BIN`, set by `cargo xtask test`).

use mqsplice_tests::Mode;
use mqsplice_tests::broker::EmbeddedBroker;
use mqsplice_tests::client::connect;
use mqsplice_tests::proxy::run_binary;
use mqsplice_tests::setup::Setup;
use mqsplice_tests::stats::fetch_async;
use std::time::Duration;

#[test]
fn check_accepts_the_minimal_config() {
    let out = run_binary(
        "check",
        "[[upstream]]\nname = \"emqx\"\nservers = [{ addr = \"emqx1.example:1883\" }]\n\n\
         [[listener]]\nname = \"mqtt\"\nkind = \"tcp\"\nlisten = \"0.0.0.0:1883\"\nupstream = \"emqx\"\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn check_names_the_key_path_and_line_and_exits_2() {
    let out = run_binary(
        "check",
        "[[upstream]]\nname = \"emqx\"\nservers = [\n  { addr = \"a.example:1883\" },\n  { addr = \"b.example:1883\", weight = 0 },\n]\n\n\
         [[listener]]\nname = \"mqtt\"\nkind = \"tcp\"\nlisten = \"0.0.0.0:1883\"\nupstream = \"emqx\"\n",
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("upstream[0].servers[1].weight"), "{stderr}");
    assert!(stderr.contains("line 5"), "{stderr}");
}

#[test]
fn run_fails_fast_with_a_reason_when_ebpf_is_demanded_but_cannot_load() {
    // A pin directory that is not on bpffs: the eBPF data plane cannot start, whoever runs this.
    let (text, _, _) = Setup::tcp(Mode::Userspace, &["127.0.0.1:1".parse().unwrap()])
        .mode_named("ebpf")
        .bpffs_pin("/tmp/mqsplice-not-bpffs")
        .for_binary();
    let out = run_binary("run", &text);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("dataplane.mode = \"sockmap\""), "{stderr}");
    assert!(
        stderr.contains("not on a mounted bpf filesystem"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_daemon_serves_logs_each_connection_and_stops_on_sigterm() {
    let broker = EmbeddedBroker::start();
    let mut daemon = Setup::tcp(Mode::Userspace, &[broker.addr]).spawn_binary();
    let (listen, stats) = (daemon.listen, daemon.stats);
    let client = connect(listen, "daemon-1").await.unwrap();
    let json = fetch_async(stats).await;
    assert_eq!(json.connections.handled, 1);
    assert_eq!(json.dataplane.mode, "userspace");
    client.disconnect().await;
    let logged = mqsplice_tests::wait_until(Duration::from_secs(5), || {
        daemon
            .stderr()
            .lines()
            .any(|l| l.contains("client_id=\"daemon-1\"") && l.contains("close="))
    })
    .await;
    let stderr = daemon.stderr();
    assert!(logged, "no access-log line:\n{stderr}");
    assert!(stderr.contains("open-file limit"), "{stderr}");
    assert!(stderr.contains("data path"), "{stderr}");
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_daemon_returns_every_descriptor_after_500_connections() {
    let broker = EmbeddedBroker::start();
    let daemon = Setup::tcp(Mode::Userspace, &[broker.addr]).spawn_binary();
    let (listen, stats) = (daemon.listen, daemon.stats);
    // The readiness probe's connection must be gone before the baseline is taken.
    for _ in 0..100 {
        if fetch_async(stats).await.connections.active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let baseline = daemon.open_fds();
    let mut clients = Vec::new();
    for i in 0..250 {
        clients.push(connect(listen, &format!("fd-{i}")).await.unwrap());
    }
    let during = daemon.open_fds();
    // Two descriptors per flow; the baseline may still have held the stats request's socket.
    assert!(
        during >= baseline + 499,
        "two descriptors per flow expected: {baseline} -> {during}"
    );
    for client in clients {
        client.disconnect().await;
    }
    // Another 250 that only connect and vanish without DISCONNECT.
    for i in 0..250 {
        let client = connect(listen, &format!("fd-drop-{i}")).await.unwrap();
        drop(client);
    }
    let settled =
        mqsplice_tests::wait_until(Duration::from_secs(10), || daemon.open_fds() <= baseline).await;
    assert!(
        settled,
        "descriptors leaked: {baseline} before, {} after",
        daemon.open_fds()
    );
    let json = fetch_async(stats).await;
    assert_eq!(json.connections.active, 0);
    assert_eq!(json.connections.handled, 500);
}
