//! The packet splice across three network namespaces (see `mqsplice_tests::netns`): every
//! rewritten segment leaves by another interface than it came in (`bpf_redirect_neigh`), with its
//! addresses rewritten too. Needs root; the namespaces are removed even when a test fails.

use mqsplice_tests::Mode;
use mqsplice_tests::netns::{BROKER, PROXY_CLIENT_SIDE, Topology, run_in};
use mqsplice_tests::numbered::client::{FlowSpec, run_flows};
use mqsplice_tests::numbered::summary::Summary;
use mqsplice_tests::numbered::upstream::echo_backend_on;
use mqsplice_tests::stats::fetch;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// The daemon running in the proxy namespace; killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn numbered_flows_cross_three_namespaces_packet_spliced() {
    if Mode::Packet.runnable() {
        flows_across(0);
    }
}

/// With 1 % of the TCP segments dropped at random on both legs (in the client's and the
/// broker's namespace, both ways), from before the hand-over on: the endpoints' own
/// retransmissions go through the rewrite and every byte arrives once, in order.
#[test]
fn numbered_flows_stay_whole_with_one_percent_loss_on_both_legs() {
    if Mode::Packet.runnable() {
        flows_across(1);
    }
}

/// Drops `percent` % of TCP segments in and out of namespace `ns` (nftables `numgen random`).
fn lose(ns: &str, percent: u32) {
    let nft = |rule: &str| {
        let status = Topology::command(ns, "nft")
            .arg(rule)
            .status()
            .expect("nft");
        assert!(status.success(), "nft {rule}");
    };
    nft("add table inet mqsloss");
    for (chain, hook) in [("in", "input"), ("out", "output")] {
        nft(&format!(
            "add chain inet mqsloss {chain} {{ type filter hook {hook} priority 0 ; }}"
        ));
        nft(&format!(
            "add rule inet mqsloss {chain} meta l4proto tcp numgen random mod 100 < {percent} drop"
        ));
    }
}

/// 8 numbered flows of 32 MiB through the proxy namespace, `loss` % of segments dropped on both
/// legs when it is not 0.
fn flows_across(loss: u32) {
    let net = Topology::three();
    let broker = run_in(&net.broker, || {
        echo_backend_on(TcpListener::bind((BROKER, 1883)).expect("broker listen"))
    });
    let listen: SocketAddr = format!("{PROXY_CLIENT_SIDE}:1883").parse().unwrap();
    let stats: SocketAddr = format!("{PROXY_CLIENT_SIDE}:8888").parse().unwrap();
    // Default keys but the mode: the program attaches to every interface that is up.
    let config = format!(
        "[stats]\nlisten = \"{stats}\"\n[dataplane]\nmode = \"packet\"\n[log]\naccess = \"off\"\n\
         [[upstream]]\nname = \"brokers\"\nservers = [{{ addr = \"{broker}\" }}]\n\
         [[listener]]\nname = \"mqtt\"\nkind = \"tcp\"\nlisten = \"{listen}\"\nupstream = \"brokers\"\n"
    );
    let path = std::env::temp_dir().join(format!("mqsplice-{}.toml", net.proxy));
    std::fs::write(&path, config).unwrap();
    // The daemon's log, for a failing run: /tmp/mqsplice-<namespace>.log.
    let log = std::env::temp_dir().join(format!("mqsplice-{}.log", net.proxy));
    let _daemon = Daemon(
        Topology::command(&net.proxy, mqsplice_tests::proxy::binary())
            .args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("daemon log"))
            .spawn()
            .expect("spawn mqsplice"),
    );
    run_in(&net.client, || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&stats, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "the daemon never served stats");
            std::thread::sleep(Duration::from_millis(50));
        }
    });

    if loss > 0 {
        lose(&net.client, loss);
        lose(&net.broker, loss);
    }
    const FLOWS: usize = 8;
    let specs: Vec<FlowSpec> = (0..FLOWS).map(|i| FlowSpec::new(i, 32 << 20)).collect();
    let summary = Summary::of(&run_in(&net.client, || run_flows(listen, &specs)));
    assert_eq!(
        summary.ok, FLOWS as u64,
        "across namespaces, {loss} % loss: {summary}"
    );
    let after = run_in(&net.client, || fetch(stats));
    let packet = after.dataplane.packet.unwrap_or_default();
    println!("across namespaces, {loss} % loss: {summary}; {packet:?}");
    assert!(
        packet.spliced_total >= FLOWS as u64 && packet.fallbacks.is_empty(),
        "{} of {FLOWS} flows packet-spliced, fallbacks {:?}",
        packet.spliced_total,
        packet.fallbacks
    );
    assert!(
        packet.interfaces.len() >= 3,
        "attached to {:?}: lo and both veths",
        packet.interfaces
    );
    let _ = std::fs::remove_file(&path);
}
