//! One typed way to describe the mqsplice a test runs, rendered to TOML in one place
//! ([`Setup::render`]) and started in process ([`Setup::start`]) or as the built binary
//! ([`Setup::spawn_binary`]).
//!
//! Tests name what they change (`.balance("client_id")`, `.connect_packet_timeout("300ms")`)
//! instead of pasting TOML; only the tests about the parser itself keep TOML text.

use crate::Mode;
use crate::daemon::Daemon;
use crate::flows::Graceful;
use mqsplice::Running;
use mqsplice::config::Config;
use std::net::SocketAddr;
use std::path::Path;
use toml::{Table, Value};

/// The whole configuration: `[stats]`, `[dataplane]`, `[log]`, upstreams and listeners.
#[derive(Debug, Clone)]
pub struct Setup {
    stats_listen: String,
    access_log: Option<String>,
    dataplane: Table,
    upstreams: Vec<Upstream>,
    listeners: Vec<Listener>,
}

/// One `[[upstream]]`: a named group of brokers and how to reach them.
#[derive(Debug, Clone)]
pub struct Upstream {
    name: String,
    servers: Vec<Server>,
    keys: Table,
}

/// One entry of an upstream's `servers`.
#[derive(Debug, Clone)]
pub struct Server {
    keys: Table,
}

/// One `[[listener]]`: where clients connect, and what it accepts.
#[derive(Debug, Clone)]
pub struct Listener {
    keys: Table,
}

/// A listener's `tls` table (kinds `tls` and `wss`).
#[derive(Debug, Clone)]
pub struct Tls {
    keys: Table,
}

/// The listener kinds, as the `kind` key spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Plain MQTT over TCP.
    Tcp,
    /// MQTT over TLS.
    Tls,
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Tls => "tls",
            Kind::Ws => "ws",
            Kind::Wss => "wss",
        }
    }
}

fn strings(values: &[&str]) -> Value {
    Value::Array(values.iter().map(|v| Value::from(*v)).collect())
}

fn int(n: u64) -> Value {
    Value::Integer(i64::try_from(n).expect("fits a TOML integer"))
}

impl Setup {
    /// Nothing but the stats endpoint on a free port and no access log: `[dataplane]` stays
    /// empty (mode `auto`) until [`Setup::mode`] names one.
    pub fn empty() -> Setup {
        Setup {
            stats_listen: "127.0.0.1:0".to_string(),
            access_log: None,
            dataplane: Table::new(),
            upstreams: Vec::new(),
            listeners: Vec::new(),
        }
    }

    /// The common case: data path `mode`, upstream `brokers` with `servers`, and a tcp listener
    /// `mqtt` in front of it.
    pub fn tcp(mode: Mode, servers: &[SocketAddr]) -> Setup {
        Setup::empty()
            .mode(mode)
            .upstream(Upstream::new("brokers", servers))
            .listener(Listener::new("mqtt", Kind::Tcp, "brokers"))
    }

    /// Upstream `brokers` with `servers` and one listener `name` of `kind` in front of it, on the
    /// default data path (`auto`; tls, ws and wss listeners copy in userspace regardless).
    pub fn one(kind: Kind, name: &str, servers: &[SocketAddr]) -> Setup {
        Setup::empty()
            .upstream(Upstream::new("brokers", servers))
            .listener(Listener::new(name, kind, "brokers"))
    }

    /// `dataplane.mode`; the sockmap path also gets a `bpffs_pin` no other instance uses.
    pub fn mode(mut self, mode: Mode) -> Setup {
        self.dataplane
            .insert("mode".into(), mode.config_value().into());
        if mode == Mode::Sockmap {
            self.dataplane
                .insert("bpffs_pin".into(), crate::unique_pin_dir().into());
        }
        if mode == Mode::Packet {
            // Client, proxy and broker all on loopback.
            let mut packet = Table::new();
            packet.insert("interfaces".into(), Value::Array(vec!["lo".into()]));
            self.dataplane.insert("packet".into(), Value::Table(packet));
        }
        self
    }

    /// `dataplane.mode` spelled as given, for the names [`Mode`] does not cover (`"ebpf"`,
    /// the old name of `sockmap`).
    pub fn mode_named(self, name: &str) -> Setup {
        self.dataplane_key("mode", name.into())
    }

    /// `dataplane.mode = "auto"` spelled out (the default, as an operator's file may say it).
    pub fn auto_mode(self) -> Setup {
        self.dataplane_key("mode", "auto".into())
    }

    /// Drops `dataplane.mode` (the default, `auto`) but keeps any pin directory: `auto` pins
    /// there when it loads the programs.
    pub fn default_mode(mut self) -> Setup {
        self.dataplane.remove("mode");
        self
    }

    /// `dataplane.max_inflight_per_flow` (a size such as `"64KiB"`).
    pub fn max_inflight_per_flow(self, size: &str) -> Setup {
        self.dataplane_key("max_inflight_per_flow", size.into())
    }

    /// `dataplane.max_inflight_total` (a size).
    pub fn max_inflight_total(self, size: &str) -> Setup {
        self.dataplane_key("max_inflight_total", size.into())
    }

    /// `dataplane.max_daemon_held_total` in bytes.
    pub fn max_daemon_held_total(self, bytes: u64) -> Setup {
        self.dataplane_key("max_daemon_held_total", int(bytes))
    }

    /// `dataplane.close_drain_timeout` (a duration such as `"2s"`).
    pub fn close_drain_timeout(self, duration: &str) -> Setup {
        self.dataplane_key("close_drain_timeout", duration.into())
    }

    /// `dataplane.bpffs_pin`, for tests about the pin directory itself.
    pub fn bpffs_pin(self, dir: &str) -> Setup {
        self.dataplane_key("bpffs_pin", dir.into())
    }

    fn dataplane_key(mut self, key: &str, value: Value) -> Setup {
        self.dataplane.insert(key.into(), value);
        self
    }

    /// `log.access`: `"off"` (in process, the default), `"stderr"` (the binary's default, so
    /// its output holds one line per connection) or a path.
    pub fn access_log(mut self, to: &str) -> Setup {
        self.access_log = Some(to.to_string());
        self
    }

    /// `stats.listen` (`"off"` turns the endpoint off).
    pub fn stats_listen(mut self, listen: &str) -> Setup {
        self.stats_listen = listen.to_string();
        self
    }

    /// Adds an upstream.
    pub fn upstream(mut self, upstream: Upstream) -> Setup {
        self.upstreams.push(upstream);
        self
    }

    /// Adds a listener.
    pub fn listener(mut self, listener: Listener) -> Setup {
        self.listeners.push(listener);
        self
    }

    /// Changes the first upstream (`brokers` in [`Setup::tcp`] and [`Setup::one`]).
    pub fn upstream_with(mut self, change: impl FnOnce(Upstream) -> Upstream) -> Setup {
        let first = self.upstreams.remove(0);
        self.upstreams.insert(0, change(first));
        self
    }

    /// Changes the listener called `name`.
    pub fn listener_with(mut self, name: &str, change: impl FnOnce(Listener) -> Listener) -> Setup {
        let at = self
            .listeners
            .iter()
            .position(|l| l.keys["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no listener {name}"));
        let listener = self.listeners.remove(at);
        self.listeners.insert(at, change(listener));
        self
    }

    /// The TOML document: the only place test configurations are written out.
    pub fn render(&self) -> String {
        let mut root = Table::new();
        let mut stats = Table::new();
        stats.insert("listen".into(), self.stats_listen.clone().into());
        root.insert("stats".into(), stats.into());
        if !self.dataplane.is_empty() {
            root.insert("dataplane".into(), self.dataplane.clone().into());
        }
        let mut log = Table::new();
        let access = self.access_log.as_deref().unwrap_or("off");
        log.insert("access".into(), access.into());
        root.insert("log".into(), log.into());
        let upstreams = self.upstreams.iter().map(Upstream::table).collect();
        root.insert("upstream".into(), Value::Array(upstreams));
        let listeners = self
            .listeners
            .iter()
            .map(|l| l.keys.clone().into())
            .collect();
        root.insert("listener".into(), Value::Array(listeners));
        toml::to_string(&root).expect("render test config")
    }

    /// The parsed configuration, exactly as the daemon would read [`Setup::render`].
    pub fn config(&self) -> Config {
        let text = self.render();
        Config::from_toml_str(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
    }

    /// Starts mqsplice in process (listeners on port 0: read them back from [`Running`]).
    pub async fn start(&self) -> Running {
        mqsplice::start(self.config())
            .await
            .expect("start mqsplice")
    }

    /// Starts mqsplice in process with custom options (a test resolver).
    pub async fn start_with(&self, options: mqsplice::Options) -> Running {
        mqsplice::start_with(self.config(), options)
            .await
            .expect("start mqsplice")
    }

    /// For the binary, which cannot report the ports it bound: every port-0 address (stats and
    /// listeners) moved to a free fixed port, the access log on stderr unless set, and the
    /// first listener's and the stats endpoint's addresses.
    pub fn for_binary(&self) -> (String, SocketAddr, SocketAddr) {
        let mut fixed = self.clone();
        let free = crate::free_addr;
        let stats = free();
        if fixed.stats_listen == "127.0.0.1:0" {
            fixed.stats_listen = stats.to_string();
        }
        fixed.access_log.get_or_insert_with(|| "stderr".to_string());
        for listener in &mut fixed.listeners {
            if listener.keys["listen"].as_str() == Some("127.0.0.1:0") {
                listener
                    .keys
                    .insert("listen".into(), free().to_string().into());
            }
        }
        let listen = fixed
            .listeners
            .first()
            .and_then(|l| l.keys["listen"].as_str()?.parse().ok())
            .unwrap_or_else(free);
        (fixed.render(), listen, stats)
    }

    /// Starts the built binary (`MQSPLICE_BIN`) on [`Setup::for_binary`]'s configuration.
    pub fn spawn_binary(&self) -> Daemon {
        let (text, listen, stats) = self.for_binary();
        Daemon::start(&text, listen, stats)
    }

    /// [`Setup::spawn_binary`], stopped with SIGTERM at the end so its pins are removed.
    pub fn spawn_graceful(&self) -> Graceful {
        Graceful(self.spawn_binary())
    }
}

impl Upstream {
    /// Upstream `name` with one plain server entry per address.
    pub fn new(name: &str, servers: &[SocketAddr]) -> Upstream {
        Upstream::named(name, servers.iter().map(|a| Server::new(&a.to_string())))
    }

    /// Upstream `name` with the given server entries (host names, weights, backups).
    pub fn named(name: &str, servers: impl IntoIterator<Item = Server>) -> Upstream {
        Upstream {
            name: name.to_string(),
            servers: servers.into_iter().collect(),
            keys: Table::new(),
        }
    }

    /// `balance`: `"round_robin"`, `"least_conn"`, `"client_id"`, …
    pub fn balance(self, how: &str) -> Upstream {
        self.key("balance", how.into())
    }

    /// `proxy_protocol`: `"v1"` or `"v2"` header towards the brokers.
    pub fn proxy_protocol(self, version: &str) -> Upstream {
        self.key("proxy_protocol", version.into())
    }

    /// `resolve_interval`: how often host names are resolved again (a duration).
    pub fn resolve_interval(self, duration: &str) -> Upstream {
        self.key("resolve_interval", duration.into())
    }

    /// `upstream_protocol`: `"ws"` speaks MQTT over WebSocket to the brokers.
    pub fn upstream_protocol(self, protocol: &str) -> Upstream {
        self.key("upstream_protocol", protocol.into())
    }

    /// `upstream_host`: the `Host` header towards WebSocket brokers.
    pub fn upstream_host(self, host: &str) -> Upstream {
        self.key("upstream_host", host.into())
    }

    /// `upstream_tls`: TLS towards the brokers, trusting `ca` for `server_name`.
    pub fn upstream_tls(self, ca: &Path, server_name: &str) -> Upstream {
        let mut tls = Table::new();
        tls.insert("ca".into(), ca.display().to_string().into());
        tls.insert("server_name".into(), server_name.into());
        self.key("upstream_tls", tls.into())
    }

    /// Changes every server entry (e.g. `max_fails` on all of them).
    pub fn each_server(mut self, change: impl Fn(Server) -> Server) -> Upstream {
        self.servers = self.servers.into_iter().map(change).collect();
        self
    }

    fn key(mut self, key: &str, value: Value) -> Upstream {
        self.keys.insert(key.into(), value);
        self
    }

    fn table(&self) -> Value {
        let mut table = self.keys.clone();
        table.insert("name".into(), self.name.clone().into());
        let servers = self.servers.iter().map(|s| s.keys.clone().into()).collect();
        table.insert("servers".into(), Value::Array(servers));
        table.into()
    }
}

impl Server {
    /// A server entry for `addr` (`host:port`; a host name is resolved by the proxy).
    pub fn new(addr: &str) -> Server {
        let mut keys = Table::new();
        keys.insert("addr".into(), addr.into());
        Server { keys }
    }

    /// `weight` for weighted balancing.
    pub fn weight(self, weight: u64) -> Server {
        self.key("weight", int(weight))
    }

    /// `backup = true`: used only when no other server is up.
    pub fn backup(self) -> Server {
        self.key("backup", true.into())
    }

    /// `down = true`: never chosen.
    pub fn down(self) -> Server {
        self.key("down", true.into())
    }

    /// `max_fails`: failed connects before the server is marked down.
    pub fn max_fails(self, n: u64) -> Server {
        self.key("max_fails", int(n))
    }

    /// `fail_timeout`: how long a failed server stays down (a duration).
    pub fn fail_timeout(self, duration: &str) -> Server {
        self.key("fail_timeout", duration.into())
    }

    fn key(mut self, key: &str, value: Value) -> Server {
        self.keys.insert(key.into(), value);
        self
    }
}

impl Listener {
    /// Listener `name` of `kind` on a free loopback port, in front of `upstream`.
    pub fn new(name: &str, kind: Kind, upstream: &str) -> Listener {
        let mut keys = Table::new();
        keys.insert("name".into(), name.into());
        keys.insert("kind".into(), kind.as_str().into());
        keys.insert("listen".into(), "127.0.0.1:0".into());
        keys.insert("upstream".into(), upstream.into());
        Listener { keys }
    }

    /// `listen` at a fixed address.
    pub fn listen(self, addr: SocketAddr) -> Listener {
        self.key("listen", addr.to_string().into())
    }

    /// The `tls` table (server certificate, client verification).
    pub fn tls(self, tls: Tls) -> Listener {
        self.key("tls", tls.keys.into())
    }

    /// `connect_packet_timeout`: how long a client may take to send its CONNECT.
    pub fn connect_packet_timeout(self, duration: &str) -> Listener {
        self.key("connect_packet_timeout", duration.into())
    }

    /// `idle_timeout` of flows from this listener.
    pub fn idle_timeout(self, duration: &str) -> Listener {
        self.key("idle_timeout", duration.into())
    }

    /// `handshake_timeout` of the WebSocket upgrade.
    pub fn handshake_timeout(self, duration: &str) -> Listener {
        self.key("handshake_timeout", duration.into())
    }

    /// `max_connect_size`: the largest CONNECT accepted (a size).
    pub fn max_connect_size(self, size: &str) -> Listener {
        self.key("max_connect_size", size.into())
    }

    /// `max_connections` open at once on this listener.
    pub fn max_connections(self, n: u64) -> Listener {
        self.key("max_connections", int(n))
    }

    /// `rewrite_client_id`: the certificate field that becomes the MQTT client id.
    pub fn rewrite_client_id(self, field: &str) -> Listener {
        self.key("rewrite_client_id", field.into())
    }

    /// `rewrite_username`: the certificate field that becomes the MQTT user name.
    pub fn rewrite_username(self, field: &str) -> Listener {
        self.key("rewrite_username", field.into())
    }

    /// `path`: the one WebSocket request path served.
    pub fn path(self, path: &str) -> Listener {
        self.key("path", path.into())
    }

    /// `path` as a list: every WebSocket request path served.
    pub fn paths(self, paths: &[&str]) -> Listener {
        self.key("path", strings(paths))
    }

    /// `allowed_origins` of WebSocket upgrades.
    pub fn allowed_origins(self, origins: &[&str]) -> Listener {
        self.key("allowed_origins", strings(origins))
    }

    /// `require_subprotocol`: refuse upgrades that do not offer `mqtt`.
    pub fn require_subprotocol(self, required: bool) -> Listener {
        self.key("require_subprotocol", required.into())
    }

    /// `max_frame_size` of WebSocket frames (a size).
    pub fn max_frame_size(self, size: &str) -> Listener {
        self.key("max_frame_size", size.into())
    }

    /// `trust_forwarded_for`: the networks whose `X-Forwarded-For` is believed.
    pub fn trust_forwarded_for(self, networks: &[&str]) -> Listener {
        self.key("trust_forwarded_for", strings(networks))
    }

    fn key(mut self, key: &str, value: Value) -> Listener {
        self.keys.insert(key.into(), value);
        self
    }
}

impl Tls {
    /// A server certificate and key.
    pub fn new(cert: &Path, key: &Path) -> Tls {
        let mut keys = Table::new();
        keys.insert("cert".into(), cert.display().to_string().into());
        keys.insert("key".into(), key.display().to_string().into());
        Tls { keys }
    }

    /// The test PKI's server certificate and key.
    pub fn server(pki: &crate::pki::Pki) -> Tls {
        Tls::new(&pki.server_cert, &pki.server_key)
    }

    /// `client_ca`: the CA client certificates must chain to.
    pub fn client_ca(self, ca: &Path) -> Tls {
        self.key("client_ca", ca.display().to_string().into())
    }

    /// `verify_client`: `"required"` or `"optional"`.
    pub fn verify_client(self, how: &str) -> Tls {
        self.key("verify_client", how.into())
    }

    /// `verify_depth`: intermediates allowed in a client chain.
    pub fn verify_depth(self, depth: u64) -> Tls {
        self.key("verify_depth", int(depth))
    }

    /// `protocols`: the TLS versions offered.
    pub fn protocols(self, versions: &[&str]) -> Tls {
        self.key("protocols", strings(versions))
    }

    /// `ciphers`: the cipher suites offered.
    pub fn ciphers(self, ciphers: &str) -> Tls {
        self.key("ciphers", ciphers.into())
    }

    /// `alpn`: the protocols offered in the handshake.
    pub fn alpn(self, protocols: &[&str]) -> Tls {
        self.key("alpn", strings(protocols))
    }

    fn key(mut self, key: &str, value: Value) -> Tls {
        self.keys.insert(key.into(), value);
        self
    }
}
