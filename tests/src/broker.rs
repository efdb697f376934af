//! MQTT brokers for tests: rumqttd in process, or in a child process a test can kill.

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The rumqttd configuration for one plain MQTT 3.1.1 listener on `addr`.
pub fn rumqttd_config(addr: SocketAddr) -> rumqttd::Config {
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 20000
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "{addr}"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = 100
    dynamic_filters = true
"#
    );
    toml::from_str(&text).expect("rumqttd config")
}

/// A rumqttd broker running on its own threads for the rest of the test process
/// (rumqttd cannot be stopped in process; use [`ChildBroker`] for a broker that must die).
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    pub addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts a broker on a free loopback port and waits until it accepts connections.
    pub fn start() -> EmbeddedBroker {
        let addr = crate::free_addr();
        let config = rumqttd_config(addr);
        std::thread::Builder::new()
            .name(format!("rumqttd-{}", addr.port()))
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(e) = broker.start() {
                    eprintln!("embedded broker {addr}: {e}");
                }
            })
            .unwrap();
        wait_for_port(addr, Duration::from_secs(10));
        EmbeddedBroker { addr }
    }
}

/// A broker in a child process (the `test-broker` binary of this crate): killable.
#[derive(Debug)]
pub struct ChildBroker {
    pub addr: SocketAddr,
    child: Child,
}

impl ChildBroker {
    /// Starts `program` (pass `env!("CARGO_BIN_EXE_test-broker")` from an integration test) on a
    /// free port and waits until it accepts connections.
    pub fn start(program: &str) -> ChildBroker {
        let addr = crate::free_addr();
        let child = Command::new(program)
            .arg(addr.to_string())
            .spawn()
            .expect("spawn test-broker");
        wait_for_port(addr, Duration::from_secs(10));
        ChildBroker { addr, child }
    }

    /// Kills the broker (SIGKILL) and waits until its port refuses connections.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Blocks until `addr` accepts a TCP connection, panicking after `timeout`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listening on {addr} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
