//! The whole document: every key's default, the error messages operators see (key path and
//! line), and the checks across sections.

use super::*;
use std::path::PathBuf;
use std::time::Duration;

const FULL: &str = r#"[stats]
listen = "127.0.0.1:8888"           # GET /stats -> JSON
[dataplane]
mode = "auto"                       # auto | ebpf | userspace
[log]
access = "stderr"                   # off | stderr | FILE (any other string is a file path)
[[upstream]]
name = "emqx"
balance = "client_id"               # round_robin | least_conn | ip_hash | client_id
proxy_protocol = "off"              # off | v1 | v2
connect_timeout = "10s"
resolve_interval = "30s"
servers = [
  { addr = "emqx1.example:1883", weight = 3, max_fails = 2, fail_timeout = "10s" },
  { addr = "127.0.0.1:18832", down = true },
  { addr = "127.0.0.1:18833", backup = true },
]
[[listener]]
name = "mqtt"
kind = "tcp"                        # tcp | tls | ws | wss
listen = "0.0.0.0:1883"
upstream = "emqx"
connect_packet_timeout = "5s"
max_connect_size = "64KiB"
idle_timeout = "1800s"
tcp_nodelay = true
buffer_size = "16KiB"
max_connections = 100000
"#;

/// One upstream with one server (line 3), one listener (lines 4-8).
const MINIMAL: &str = r#"[[upstream]]
name = "emqx"
servers = [{ addr = "127.0.0.1:1883" }]
[[listener]]
name = "mqtt"
kind = "tcp"
listen = "0.0.0.0:1883"
upstream = "emqx"
"#;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn server(addr: &str) -> ServerConfig {
    ServerConfig {
        addr: addr.into(),
        weight: 1,
        max_fails: 1,
        fail_timeout: secs(10),
        down: false,
        backup: false,
    }
}

fn err(text: &str) -> ConfigError {
    match Config::from_toml_str(text) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e,
    }
}

/// Asserts the key path, line and a piece of the reason, and that the message shows all three.
#[track_caller]
fn assert_err(text: &str, path: &str, line: usize, reason: &str) {
    let e = err(text);
    assert_eq!(e.key_path(), Some(path), "{e}");
    assert_eq!(e.line(), Some(line), "{e}");
    assert!(e.reason().contains(reason), "{e}");
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("{path} (line {line}")),
        "{shown}"
    );
    assert!(shown.contains(reason), "{shown}");
}

/// MINIMAL with `extra` appended after line 8 (so `extra`'s first line is line 9).
fn minimal_plus(extra: &str) -> String {
    format!("{MINIMAL}{extra}")
}

/// MINIMAL with `key = value` lines inserted into the upstream table (from line 3 on).
fn upstream_with(lines: &str) -> String {
    MINIMAL.replacen("servers = ", &format!("{lines}\nservers = "), 1)
}

/// MINIMAL with `lines` appended to the listener table (from line 9 on).
fn listener_with(lines: &str) -> String {
    minimal_plus(&format!("{lines}\n"))
}

/// What MINIMAL parses to: every default, written out.
fn minimal_expected() -> Config {
    Config {
        stats: StatsConfig {
            listen: Some("127.0.0.1:8888".parse().unwrap()),
        },
        dataplane: DataplaneConfig {
            mode: DataplaneMode::Auto,
            bpffs_pin: DEFAULT_BPFFS_PIN.into(),
            close_drain_timeout: DEFAULT_CLOSE_DRAIN_TIMEOUT,
            max_inflight_per_flow: InflightLimit::Auto,
            max_inflight_total: DEFAULT_MAX_INFLIGHT_TOTAL,
            max_daemon_held_per_flow: DEFAULT_MAX_DAEMON_HELD_PER_FLOW,
            max_daemon_held_total: DEFAULT_MAX_DAEMON_HELD_TOTAL,
            packet: PacketConfig {
                interfaces: Vec::new(),
                flow_table_size: DEFAULT_FLOW_TABLE_SIZE,
            },
        },
        log: LogConfig {
            access: AccessLog::Stderr,
        },
        upstreams: vec![UpstreamConfig {
            name: "emqx".into(),
            balance: BalanceMethod::RoundRobin,
            proxy_protocol: ProxyProtocol::Off,
            connect_timeout: secs(60),
            resolve_interval: secs(30),
            servers: vec![server("127.0.0.1:1883")],
            tls: None,
            upstream_protocol: UpstreamProtocol::Tcp,
            upstream_host: None,
        }],
        listeners: vec![ListenerConfig {
            name: "mqtt".into(),
            kind: ListenerKind::Tcp,
            listen: "0.0.0.0:1883".parse().unwrap(),
            upstream: "emqx".into(),
            connect_packet_timeout: secs(5),
            max_connect_size: 64 * 1024,
            idle_timeout: secs(600),
            tcp_nodelay: true,
            buffer_size: 16 * 1024,
            max_connections: 100_000,
            tls: None,
            rewrite_client_id: None,
            rewrite_username: None,
            ws: None,
        }],
    }
}

#[test]
fn full_example_parses_exactly() {
    let config = Config::from_toml_str(FULL).unwrap();
    // FULL writes most defaults out; these are the keys it sets to something else.
    let mut expected = minimal_expected();
    let upstream = &mut expected.upstreams[0];
    upstream.balance = BalanceMethod::ClientId;
    upstream.connect_timeout = secs(10);
    upstream.servers = vec![
        ServerConfig {
            weight: 3,
            max_fails: 2,
            ..server("emqx1.example:1883")
        },
        ServerConfig {
            down: true,
            ..server("127.0.0.1:18832")
        },
        ServerConfig {
            backup: true,
            ..server("127.0.0.1:18833")
        },
    ];
    expected.listeners[0].idle_timeout = secs(1800);
    assert_eq!(config, expected);
}

#[test]
fn minimal_gets_every_default() {
    let config = Config::from_toml_str(MINIMAL).unwrap();
    let expected = minimal_expected();
    assert_eq!(config, expected);
    // The published constants are the ones applied.
    let l = &config.listeners[0];
    assert_eq!(l.idle_timeout, DEFAULT_IDLE_TIMEOUT);
    assert_eq!(l.buffer_size, DEFAULT_BUFFER_SIZE);
    assert_eq!(l.max_connect_size, DEFAULT_MAX_CONNECT_SIZE);
    assert_eq!(l.max_connections, DEFAULT_MAX_CONNECTIONS);
    assert_eq!(l.connect_packet_timeout, DEFAULT_CONNECT_PACKET_TIMEOUT);
    assert_eq!(config.upstreams[0].connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(
        config.upstreams[0].resolve_interval,
        DEFAULT_RESOLVE_INTERVAL
    );
    assert_eq!(
        config.upstreams[0].servers[0].fail_timeout,
        DEFAULT_FAIL_TIMEOUT
    );
    assert_eq!(
        config.stats.listen,
        Some(DEFAULT_STATS_LISTEN.parse().unwrap())
    );
}

#[test]
fn other_spellings() {
    let text = format!(
        "[stats]\nlisten = \"off\"\n[dataplane]\nmode = \"userspace\"\n[log]\naccess = \"/var/log/mqsplice/access.log\"\n{}",
        upstream_with(
            "balance = \"least_conn\"\nproxy_protocol = \"v2\"\nconnect_timeout = 3\nresolve_interval = \"1m30s\""
        )
    ) + "connect_packet_timeout = \"500ms\"\nmax_connect_size = 1024\nidle_timeout = \"1h\"\ntcp_nodelay = false\nbuffer_size = \"1m\"\nmax_connections = 1\n";
    let c = Config::from_toml_str(&text).unwrap();
    assert_eq!(c.stats.listen, None);
    assert_eq!(c.dataplane.mode, DataplaneMode::Userspace);
    assert_eq!(
        c.log.access,
        AccessLog::File("/var/log/mqsplice/access.log".into())
    );
    let u = &c.upstreams[0];
    assert_eq!(u.balance, BalanceMethod::LeastConn);
    assert_eq!(u.proxy_protocol, ProxyProtocol::V2);
    assert_eq!(u.connect_timeout, secs(3));
    assert_eq!(u.resolve_interval, secs(90));
    let l = &c.listeners[0];
    assert_eq!(l.connect_packet_timeout, Duration::from_millis(500));
    assert_eq!(l.max_connect_size, 1024);
    assert_eq!(l.idle_timeout, secs(3600));
    assert!(!l.tcp_nodelay);
    assert_eq!(l.buffer_size, 1 << 20);
    assert_eq!(l.max_connections, 1);
}

#[test]
fn backup_with_hash_balancing_is_allowed() {
    for balance in ["ip_hash", "client_id"] {
        let text = MINIMAL.replacen(
            "servers = [{ addr = \"127.0.0.1:1883\" }]",
            &format!(
                "balance = \"{balance}\"\nservers = [{{ addr = \"a:1\" }}, {{ addr = \"b:1\", backup = true }}]"
            ),
            1,
        );
        let c = Config::from_toml_str(&text).unwrap();
        assert!(c.upstreams[0].servers[1].backup);
    }
}

#[test]
fn several_upstreams_and_listeners() {
    let text = minimal_plus(
        "[[upstream]]\nname = \"other\"\nservers = [{ addr = \"[::1]:1883\" }]\n[[listener]]\nname = \"second\"\nkind = \"tcp\"\nlisten = \"[::]:1884\"\nupstream = \"other\"\n",
    );
    let c = Config::from_toml_str(&text).unwrap();
    assert_eq!(c.upstreams.len(), 2);
    assert_eq!(c.listeners[1].upstream, "other");
    // Port 0 (an ephemeral port each) never clashes, not even with the stats port.
    let text = MINIMAL.replace("0.0.0.0:1883", "127.0.0.1:0")
        + "[[listener]]\nname = \"b\"\nkind = \"tcp\"\nlisten = \"127.0.0.1:0\"\nupstream = \"emqx\"\n";
    assert!(Config::from_toml_str(&text).is_ok());
}

#[test]
fn missing_sections() {
    let e = err(
        "[[listener]]\nname = \"m\"\nkind = \"tcp\"\nlisten = \"0.0.0.0:1\"\nupstream = \"x\"\n",
    );
    assert_eq!(e.key_path(), Some("upstream"));
    assert_eq!(e.line(), None);
    assert!(e.to_string().contains("at least one [[upstream]]"), "{e}");
    let e = err("[[upstream]]\nname = \"x\"\nservers = [{ addr = \"a:1\" }]\n");
    assert_eq!(e.key_path(), Some("listener"));
    assert!(e.to_string().contains("at least one [[listener]]"), "{e}");
    let e = err("");
    assert_eq!(e.key_path(), Some("upstream"));
    // An explicitly empty array has a line to point at... but serde gives us no span for an
    // empty Vec, so it is reported like an absent one.
    assert_eq!(err("upstream = []\n").key_path(), Some("upstream"));
}

#[test]
fn required_keys() {
    assert_err(
        "[[upstream]]\nservers = [{ addr = \"a:1\" }]\n",
        "upstream[0].name",
        1,
        "missing field `name`",
    );
    assert_err(
        &MINIMAL.replace("{ addr = \"127.0.0.1:1883\" }", "{ weight = 2 }"),
        "upstream[0].servers[0].addr",
        3,
        "missing field `addr`",
    );
    for key in ["name", "kind", "listen", "upstream"] {
        let text: String = MINIMAL
            .lines()
            .enumerate()
            .filter(|(i, l)| *i < 4 || !l.starts_with(&format!("{key} =")))
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        assert_err(
            &text,
            &format!("listener[0].{key}"),
            4,
            &format!("missing field `{key}`"),
        );
    }
}

#[test]
fn duplicate_names() {
    assert_err(
        &minimal_plus("[[upstream]]\nname = \"emqx\"\nservers = [{ addr = \"b:1\" }]\n"),
        "upstream[1].name",
        10,
        "duplicate upstream name \"emqx\"",
    );
    assert_err(
        &minimal_plus(
            "[[listener]]\nname = \"mqtt\"\nkind = \"tcp\"\nlisten = \"0.0.0.0:1884\"\nupstream = \"emqx\"\n",
        ),
        "listener[1].name",
        10,
        "duplicate listener name \"mqtt\"",
    );
}

#[test]
fn listener_upstream_must_exist() {
    assert_err(
        &MINIMAL.replace("upstream = \"emqx\"", "upstream = \"emq\""),
        "listener[0].upstream",
        8,
        "no upstream named \"emq\" (defined: emqx)",
    );
}

#[test]
fn servers_rules() {
    assert_err(
        &MINIMAL.replace("[{ addr = \"127.0.0.1:1883\" }]", "[]"),
        "upstream[0].servers",
        3,
        "needs at least one server",
    );
    assert_err(
        &MINIMAL.replace("servers = [{ addr = \"127.0.0.1:1883\" }]\n", ""),
        "upstream[0].servers",
        2,
        "needs at least one server",
    );
    let servers = |list: &str| MINIMAL.replace("[{ addr = \"127.0.0.1:1883\" }]", list);
    assert_err(
        &servers("[\n  { addr = \"a:1\" },\n  { addr = \"emqx1\" },\n]"),
        "upstream[0].servers[1].addr",
        5,
        "has no port",
    );
    assert_err(
        &servers("[{ addr = \"a:99999\" }]"),
        "upstream[0].servers[0].addr",
        3,
        "invalid port",
    );
    assert_err(
        &servers("[{ addr = \"::1:1883\" }]"),
        "upstream[0].servers[0].addr",
        3,
        "need brackets",
    );
    assert_err(
        &servers("[\n  { addr = \"a:1\" },\n  { addr = \"b:1\", weight = 0 },\n]"),
        "upstream[0].servers[1].weight",
        5,
        "weight must be at least 1",
    );
    assert_err(
        &servers("[{ addr = \"a:1\", max_fails = -1 }]"),
        "upstream[0].servers[0].max_fails",
        3,
        "max_fails must be between 0",
    );
    assert_err(
        &servers("[{ addr = \"a:1\" },\n{ addr = \"b:1\", backup = true, down = true }]"),
        "upstream[0].servers[1].backup",
        4,
        "both backup and down",
    );
    assert_err(
        &servers("[\n{ addr = \"a:1\", backup = true },\n{ addr = \"b:1\", backup = true }]"),
        "upstream[0].servers",
        3,
        "every server of upstream \"emqx\" is a backup",
    );
    // A down primary next to a backup is fine: the backup is what it is for.
    assert!(
        Config::from_toml_str(&servers(
            "[{ addr = \"a:1\", down = true }, { addr = \"b:1\", backup = true }]"
        ))
        .is_ok()
    );
}

#[test]
fn durations_must_be_positive() {
    for key in ["connect_timeout", "resolve_interval"] {
        assert_err(
            &upstream_with(&format!("{key} = \"0s\"")),
            &format!("upstream[0].{key}"),
            3,
            "must be greater than 0",
        );
    }
    assert_err(
        &MINIMAL.replace("\" }]", "\", fail_timeout = 0 }]"),
        "upstream[0].servers[0].fail_timeout",
        3,
        "must be greater than 0",
    );
    for key in ["connect_packet_timeout", "idle_timeout"] {
        assert_err(
            &listener_with(&format!("{key} = \"0\"")),
            &format!("listener[0].{key}"),
            9,
            "must be greater than 0",
        );
    }
    assert_err(
        &upstream_with("connect_timeout = \"10 seconds\""),
        "upstream[0].connect_timeout",
        3,
        "missing unit",
    );
    assert_err(
        &upstream_with("connect_timeout = -5"),
        "upstream[0].connect_timeout",
        3,
        "negative duration",
    );
    assert_err(
        &listener_with("idle_timeout = \"99999999w\""),
        "listener[0].idle_timeout",
        9,
        "must be at most 365d",
    );
    assert_err(
        &listener_with("idle_timeout = \"10y\""),
        "listener[0].idle_timeout",
        9,
        "unknown unit \"y\"",
    );
}

#[test]
fn size_and_count_limits() {
    assert_err(
        &listener_with("buffer_size = \"1023\""),
        "listener[0].buffer_size",
        9,
        "between 1KiB and 16MiB",
    );
    assert_err(
        &listener_with("buffer_size = \"17MiB\""),
        "listener[0].buffer_size",
        9,
        "between 1KiB and 16MiB",
    );
    assert_err(
        &listener_with("max_connect_size = 63"),
        "listener[0].max_connect_size",
        9,
        "between 64 bytes and 256MiB",
    );
    assert_err(
        &listener_with("max_connect_size = \"257MiB\""),
        "listener[0].max_connect_size",
        9,
        "between 64 bytes and 256MiB",
    );
    assert_err(
        &listener_with("max_connect_size = \"64KB\""),
        "listener[0].max_connect_size",
        9,
        "unknown unit \"KB\"",
    );
    assert_err(
        &listener_with("max_connections = 0"),
        "listener[0].max_connections",
        9,
        "max_connections must be at least 1",
    );
}

#[test]
fn ws_listener_keys() {
    let ws = MINIMAL.replace("kind = \"tcp\"", "kind = \"ws\"");
    let config = Config::from_toml_str(&format!(
        "{ws}path = [\"/mqtt\", \"/ws\"]\nmax_frame_size = \"64KiB\"\ntrust_forwarded_for = [\"10.0.0.0/8\"]\n"
    ))
    .unwrap();
    let listener = &config.listeners[0];
    assert_eq!(listener.kind, ListenerKind::Ws);
    let ws_config = listener.ws.as_ref().unwrap();
    assert_eq!(ws_config.paths, ["/mqtt", "/ws"]);
    assert_eq!(ws_config.max_frame_size, 64 * 1024);
    assert!(!ws_config.require_subprotocol);
    assert_eq!(
        Config::from_toml_str(&ws).unwrap().listeners[0]
            .ws
            .as_ref()
            .unwrap()
            .paths,
        [DEFAULT_WS_PATH]
    );
    assert_err(
        &listener_with("path = \"/mqtt\""),
        "listener[0].path",
        9,
        "path applies only to ws and wss listeners",
    );
    assert_err(
        &format!("{ws}max_frame_size = 10\n"),
        "listener[0].max_frame_size",
        9,
        "between 128 bytes and 256MiB",
    );
    assert_err(
        &MINIMAL.replace("servers =", "upstream_protocol = \"ws\"\nservers ="),
        "listener[0].upstream",
        9,
        "only ws and wss listeners can use it",
    );
    assert_err(
        &ws.replace(
            "servers =",
            "upstream_protocol = \"ws\"\nproxy_protocol = \"v2\"\nservers =",
        ),
        "upstream[0].proxy_protocol",
        4,
        "cannot be used with upstream_protocol",
    );
}

#[test]
fn listener_kind_and_listen() {
    assert_err(
        &MINIMAL.replace("kind = \"tcp\"", "kind = \"quic\""),
        "listener[0].kind",
        6,
        "expected one of: tcp",
    );
    assert_err(
        &MINIMAL.replace("0.0.0.0:1883", "localhost:1883"),
        "listener[0].listen",
        7,
        "not a socket address",
    );
    assert_err(
        &minimal_plus(
            "[[listener]]\nname = \"b\"\nkind = \"tcp\"\nlisten = \"127.0.0.1:1883\"\nupstream = \"emqx\"\n",
        ),
        "listener[1].listen",
        12,
        "clashes with listener[0].listen (0.0.0.0:1883)",
    );
    assert_err(
        &MINIMAL.replace("0.0.0.0:1883", "127.0.0.1:8888"),
        "listener[0].listen",
        7,
        "clashes with stats.listen (127.0.0.1:8888)",
    );
    assert_err(
        &format!("[stats]\nlisten = \"localhost:8888\"\n{MINIMAL}"),
        "stats.listen",
        2,
        "not a socket address",
    );
}

#[test]
fn tls_listener_table() {
    let tls = |table: &str| {
        MINIMAL.replace(
            "kind = \"tcp\"",
            &format!("kind = \"tls\"\ntls = {{ cert = \"c.pem\", key = \"k.pem\"{table} }}"),
        )
    };
    let config = Config::from_toml_str(&tls("")).unwrap();
    let t = config.listeners[0].tls.as_ref().unwrap();
    assert_eq!(config.listeners[0].kind, ListenerKind::Tls);
    assert_eq!(t.verify_client, VerifyClient::Off);
    assert_eq!(t.protocols, vec![TlsVersion::Tls12, TlsVersion::Tls13]);
    assert_eq!(t.session_timeout, Duration::from_secs(300));
    assert_eq!((t.alpn.clone(), t.ciphers.clone()), (None, None));
    let config = Config::from_toml_str(&tls(
        ", client_ca = \"ca.pem\", verify_client = \"required\", verify_depth = 2, \
         protocols = [\"TLSv1.3\"], ciphers = [\"TLS13_AES_128_GCM_SHA256\"], \
         session_cache = 100, session_timeout = \"10m\", alpn = []",
    ))
    .unwrap();
    let t = config.listeners[0].tls.as_ref().unwrap();
    assert_eq!(t.client_ca, Some(PathBuf::from("ca.pem")));
    assert_eq!(
        (t.verify_client, t.verify_depth),
        (VerifyClient::Required, 2)
    );
    assert_eq!(t.protocols, vec![TlsVersion::Tls13]);
    assert_eq!(
        (t.session_cache, t.session_timeout),
        (100, Duration::from_secs(600))
    );
    assert_eq!(t.alpn, Some(vec![]));

    assert_err(
        &MINIMAL.replace("kind = \"tcp\"", "kind = \"tls\""),
        "listener[0].tls",
        6,
        "needs a tls = { cert",
    );
    assert_err(
        &tls(", protocols = [\"TLSv1\", \"TLSv1.2\"]"),
        "listener[0].tls.protocols",
        7,
        "TLSv1 is not supported (rustls speaks TLS 1.2 and 1.3 only); accepted: \"TLSv1.2\", \"TLSv1.3\"",
    );
    assert_err(
        &tls(", ciphers = \"HIGH:!aNULL:!MD5\""),
        "listener[0].tls.ciphers",
        7,
        "OpenSSL cipher string, which rustls does not read; ciphers takes a list of IANA/rustls suite names",
    );
    assert_err(
        &tls(", verify_client = \"required\""),
        "listener[0].tls.client_ca",
        7,
        "verify_client needs client_ca",
    );
    assert_err(
        &listener_with("rewrite_client_id = \"cert_serial\""),
        "listener[0].rewrite_client_id",
        9,
        "needs a client certificate",
    );
    assert_err(
        &tls(", verfy_client = \"on\""),
        "listener[0].tls.verfy_client",
        7,
        "unknown field `verfy_client`",
    );
}

#[test]
fn upstream_tls_table() {
    let config = Config::from_toml_str(&upstream_with(
        "upstream_tls = { ca = \"brokers-ca.pem\", server_name = \"emqx.internal\" }",
    ))
    .unwrap();
    assert_eq!(
        config.upstreams[0].tls,
        Some(UpstreamTlsConfig {
            ca: "brokers-ca.pem".into(),
            server_name: Some("emqx.internal".into()),
        })
    );
    assert_err(
        &upstream_with("upstream_tls = { server_name = \"emqx.internal\" }"),
        "upstream[0].upstream_tls.ca",
        3,
        "missing field `ca`",
    );
    assert_err(
        &upstream_with("upstream_tls = { ca = \"ca.pem\", server_name = \"not a name\" }"),
        "upstream[0].upstream_tls.server_name",
        3,
        "not a valid DNS name or IP address",
    );
}

#[test]
fn daemon_held_bounds_parse_and_are_checked() {
    let config = Config::from_toml_str(&format!(
        "[dataplane]\nmax_daemon_held_per_flow = \"512KiB\"\nmax_daemon_held_total = 1073741824\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(config.dataplane.max_daemon_held_per_flow, 512 << 10);
    assert_eq!(config.dataplane.max_daemon_held_total, 1 << 30);
    let config = Config::from_toml_str(MINIMAL).unwrap();
    assert_eq!(config.dataplane.max_daemon_held_per_flow, 256 << 10);
    assert_eq!(config.dataplane.max_daemon_held_total, 64 << 20);
    assert_err(
        &format!("[dataplane]\nmax_daemon_held_per_flow = \"64KiB\"\n{MINIMAL}"),
        "dataplane.max_daemon_held_per_flow",
        2,
        "must be between 128KiB",
    );
    assert_err(
        &format!(
            "[dataplane]\nmax_daemon_held_per_flow = \"1MiB\"\nmax_daemon_held_total = \"512KiB\"\n{MINIMAL}"
        ),
        "dataplane.max_daemon_held_per_flow",
        2,
        "must not be more than dataplane.max_daemon_held_total",
    );
}

#[test]
fn bad_enum_values_name_the_allowed_ones() {
    assert_err(
        &format!("[dataplane]\nmode = \"xdp\"\n{MINIMAL}"),
        "dataplane.mode",
        2,
        "unknown dataplane mode \"xdp\", expected one of: auto, sockmap, userspace, packet",
    );
    assert_err(
        &upstream_with("balance = \"random\""),
        "upstream[0].balance",
        3,
        "expected one of: round_robin, least_conn, ip_hash, client_id",
    );
    assert_err(
        &upstream_with("proxy_protocol = \"on\""),
        "upstream[0].proxy_protocol",
        3,
        "expected one of: off, v1, v2",
    );
    assert_err(
        &format!("[log]\naccess = \"\"\n{MINIMAL}"),
        "log.access",
        2,
        "empty access log",
    );
}

#[test]
fn unknown_keys_are_named() {
    assert_err(
        &listener_with("tcp_no_delay = true"),
        "listener[0].tcp_no_delay",
        9,
        "unknown field `tcp_no_delay`",
    );
    assert_err(
        &MINIMAL.replace("\" }]", "\", wieght = 2 }]"),
        "upstream[0].servers[0].wieght",
        3,
        "unknown field `wieght`, expected one of `addr`, `weight`",
    );
    assert_err(
        &format!("[stats]\nlisten = \"off\"\nport = 1\n{MINIMAL}"),
        "stats.port",
        3,
        "unknown field `port`",
    );
    assert_err(
        &format!("[metrics]\nlisten = \"off\"\n{MINIMAL}"),
        "metrics",
        1,
        "unknown field `metrics`",
    );
}

#[test]
fn type_and_syntax_errors_have_line_and_column() {
    let e = err(&listener_with("max_connections = \"lots\""));
    assert_eq!(e.key_path(), Some("listener[0].max_connections"));
    assert_eq!((e.line(), e.column()), (Some(9), Some(19)));
    assert!(e.reason().contains("expected an integer"), "{e}");
    assert!(
        e.to_string()
            .starts_with("listener[0].max_connections (line 9, column 19): invalid type"),
        "{e}"
    );
    let e = err(&listener_with("tcp_nodelay = \"yes\""));
    assert_eq!(e.key_path(), Some("listener[0].tcp_nodelay"));
    assert!(e.reason().contains("expected a boolean"), "{e}");
    let e = err(&listener_with("buffer_size = true"));
    assert!(e.reason().contains("\"16KiB\""), "{e}");
    // At the end of the file there is no key left to name, only the place.
    let e = err(&minimal_plus("oops = [1,\n"));
    assert_eq!((e.line(), e.column()), (Some(9), Some(11)));
    assert!(
        e.to_string()
            .starts_with("line 9, column 11: unclosed array"),
        "{e}"
    );
    // Mid-file, the recovering parse still names the key.
    let e = err(&listener_with("idle_timeout = 10s"));
    assert_eq!(e.line(), Some(9));
    assert_eq!(e.key_path(), Some("listener[0].idle_timeout"), "{e}");
    let e = err("[[upstream]\n");
    assert_eq!(e.line(), Some(1));
}

#[test]
fn load_names_the_file() {
    let dir = std::env::temp_dir().join(format!("mqsplice-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, MINIMAL).unwrap();
    assert_eq!(
        Config::load(&good).unwrap(),
        Config::from_toml_str(MINIMAL).unwrap()
    );
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, listener_with("max_connections = 0")).unwrap();
    let e = Config::load(&bad).unwrap_err();
    assert_eq!(e.line(), Some(9));
    assert_eq!(e.key_path(), Some("listener[0].max_connections"));
    assert!(
        e.to_string().starts_with(&format!(
            "{}: listener[0].max_connections (line 9)",
            bad.display()
        )),
        "{e}"
    );
    let missing = dir.join("missing.toml");
    let e = Config::load(&missing).unwrap_err();
    assert!(e.to_string().contains("missing.toml"), "{e}");
    assert_eq!(e.line(), None);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// docs/configuration.md states each key's default; written into a file, every one of them must
/// give what leaving the key out gives, so the reference cannot drift from the code.
#[test]
fn the_documented_defaults_are_the_defaults() {
    let reference = include_str!("../../../docs/configuration.md");
    let tls_listener = |extra: &str| {
        MINIMAL.replace(
            "kind = \"tcp\"",
            &format!("kind = \"tls\"\ntls = {{ cert = \"c.pem\", key = \"k.pem\"{extra} }}"),
        )
    };
    let ws_listener = MINIMAL.replace("kind = \"tcp\"", "kind = \"ws\"");
    let mut section = "";
    let mut checked = Vec::new();
    for line in reference.lines() {
        if let Some(heading) = line
            .strip_prefix("#### ")
            .or_else(|| line.strip_prefix("###### "))
        {
            section = heading;
            continue;
        }
        if line.starts_with("Keys of `ws` listeners") {
            section = "ws";
            continue;
        }
        let cells: Vec<&str> = line.split(" | ").collect();
        if !line.starts_with("| `") || cells.len() < 3 {
            continue;
        }
        let key = cells[0].trim_start_matches("| ").trim_matches('`');
        // Only defaults written as a value (not "required", "none", "the client's `Host`").
        let Some(value) = cells[1]
            .strip_prefix('`')
            .and_then(|rest| rest.split('`').next())
        else {
            continue;
        };
        // The listener kind decides the ALPN default (`["mqtt"]`, or `["http/1.1"]` for wss).
        if key == "alpn" {
            continue;
        }
        let setting = format!("{key} = {value}");
        let (without, with) = match section {
            s if s.contains("[stats]")
                || s.contains("[dataplane]")
                || s.contains("[dataplane.packet]")
                || s.contains("[log]") =>
            {
                let table = s.trim_matches('`');
                (
                    MINIMAL.to_string(),
                    format!("{table}\n{setting}\n{MINIMAL}"),
                )
            }
            s if s.contains("[[upstream]]") => (MINIMAL.to_string(), upstream_with(&setting)),
            s if s.contains("servers[]") => (
                MINIMAL.to_string(),
                MINIMAL.replace("1883\" }", &format!("1883\", {setting} }}")),
            ),
            s if s.contains("[[listener]]") => (MINIMAL.to_string(), listener_with(&setting)),
            s if s.contains("tls = {") => (tls_listener(""), tls_listener(&format!(", {setting}"))),
            "ws" => (ws_listener.clone(), format!("{ws_listener}{setting}\n")),
            other => {
                panic!("docs/configuration.md: a key table under an unknown heading {other:?}")
            }
        };
        let documented = Config::from_toml_str(&with)
            .unwrap_or_else(|e| panic!("{section}: `{setting}` is refused: {e}"));
        assert_eq!(
            documented,
            Config::from_toml_str(&without).unwrap(),
            "{section}: `{setting}` is not the default"
        );
        checked.push(key);
    }
    // Every section's documented defaults were found and tried.
    assert!(checked.len() >= 35, "only {checked:?}");
}

#[test]
fn packet_splice_keys() {
    let config = Config::from_toml_str(&format!(
        "[dataplane]\nmode = \"packet\"\n[dataplane.packet]\ninterfaces = [\"lo\", \"eth0\"]\nflow_table_size = 1000\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(config.dataplane.mode, DataplaneMode::Packet);
    assert_eq!(config.dataplane.packet.interfaces, ["lo", "eth0"]);
    assert_eq!(config.dataplane.packet.flow_table_size, 1000);
    assert_err(
        &format!("[dataplane.packet]\nflow_table_size = 0\n{MINIMAL}"),
        "dataplane.packet.flow_table_size",
        2,
        "between 1 and",
    );
    assert_err(
        &format!("[dataplane.packet]\ninterfaces = [\"a b\"]\n{MINIMAL}"),
        "dataplane.packet.interfaces",
        2,
        "not an interface name",
    );
}
