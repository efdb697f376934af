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
    if !Mode::Packet.runnable() {
        return;
    }
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
    let path = std::env::temp_dir().join(format!("mqsplice-packet-{}.toml", std::process::id()));
    std::fs::write(&path, config).unwrap();
    let _daemon = Daemon(
        Topology::command(&net.proxy, mqsplice_tests::proxy::binary())
            .args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
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

    const FLOWS: usize = 8;
    let specs: Vec<FlowSpec> = (0..FLOWS).map(|i| FlowSpec::new(i, 32 << 20)).collect();
    let summary = Summary::of(&run_in(&net.client, || run_flows(listen, &specs)));
    assert_eq!(summary.ok, FLOWS as u64, "across namespaces: {summary}");
    let after = run_in(&net.client, || fetch(stats));
    let packet = after.dataplane.packet.unwrap_or_default();
    println!("across namespaces: {summary}; {packet:?}");
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
