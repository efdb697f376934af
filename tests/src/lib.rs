//! Test harness: real brokers (embedded rumqttd, or a child process that can be killed), real
//! clients (rumqttc), and mqsplice itself, in process or as the built binary.

pub mod backend;
pub mod broker;
pub mod client;
pub mod daemon;
pub mod proxy;
pub mod raw;

/// The data path a test runs on, named in every test whose outcome depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Userspace,
}

impl Mode {
    /// Every data path this build can test.
    pub const ALL: [Mode; 1] = [Mode::Userspace];

    /// The `dataplane.mode` value selecting this path.
    pub fn config_value(self) -> &'static str {
        match self {
            Mode::Userspace => "userspace",
        }
    }
}

/// A free loopback TCP port (bound, then released: good enough for tests that must pass a port
/// to a broker that cannot bind port 0 and report it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes; true when it held.
pub async fn wait_until(timeout: std::time::Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    condition()
}
