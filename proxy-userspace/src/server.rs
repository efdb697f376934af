//! Start-up: turn a [`Config`] into bound listeners, upstreams, a data plane and the stats endpoint.

use crate::access_log::AccessLog;
use crate::config::{Config, DataplaneConfig, DataplaneMode, ListenerConfig, ListenerKind};
use crate::dataplane::packet::PacketSplice;
use crate::dataplane::{DataPlane, EbpfSplice, PathReason, UserspaceCopy};
use crate::listener::{ListenerContext, accept_loop};
use crate::stats::{ConnectionCounters, DataplaneStats, ListenerStats, Stats, serve_stats};
use crate::tls::{DEFAULT_ALPN_MQTT, ServerTls, UpstreamTls};
use crate::upstream::{Resolve, SystemResolver, Upstream};
use crate::ws::WsListener;
use anyhow::{Context, bail};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The default ALPN list of a wss listener.
const DEFAULT_ALPN_WSS: &[&str] = &["http/1.1"];

/// Knobs that are not configuration: what tests and embedders swap out.
#[derive(Clone)]
pub struct Options {
    /// How server host names are resolved.
    pub resolver: Arc<dyn Resolve>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            resolver: Arc::new(SystemResolver),
        }
    }
}

/// The data plane in use, and why it was chosen.
#[derive(Debug, Clone)]
struct DataplaneChoice {
    plane: Arc<dyn DataPlane>,
    requested: DataplaneMode,
    reason: String,
}

/// A running proxy. Dropping it (or [`Running::shutdown`]) stops accepting; flows already handed
/// to a data plane end with the runtime.
pub struct Running {
    listeners: Vec<(String, SocketAddr)>,
    stats_addr: Option<SocketAddr>,
    snapshot: Arc<dyn Fn() -> Stats + Send + Sync>,
    tasks: Vec<JoinHandle<()>>,
    tls: Vec<(String, Arc<ServerTls>)>,
}

impl Running {
    /// The bound address of the listener called `name` (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// The bound address of the stats endpoint, if it is on.
    pub fn stats_addr(&self) -> Option<SocketAddr> {
        self.stats_addr
    }

    /// The same JSON `GET /stats` returns.
    pub fn stats(&self) -> Value {
        serde_json::to_value((self.snapshot)()).unwrap_or_default()
    }

    /// What `GET /stats` returns, typed.
    pub fn typed_stats(&self) -> Stats {
        (self.snapshot)()
    }

    /// Re-reads every TLS listener's certificate, key and CA files (SIGHUP): new handshakes use
    /// them, established connections keep theirs. A listener whose files fail keeps the old ones.
    pub fn reload_tls(&self) -> Vec<(String, anyhow::Result<()>)> {
        self.tls
            .iter()
            .map(|(name, tls)| (name.clone(), tls.reload()))
            .collect()
    }

    /// Stops accepting connections and serving stats.
    pub fn shutdown(self) {}
}

impl Drop for Running {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts everything `config` describes with the default [`Options`].
pub async fn start(config: Config) -> anyhow::Result<Running> {
    start_with(config, Options::default()).await
}

/// Starts everything `config` describes; binds fail fast with the address in the error.
pub async fn start_with(config: Config, options: Options) -> anyhow::Result<Running> {
    let started = Instant::now();
    let dataplane = choose_dataplane(&config.dataplane)?;
    tracing::info!(
        mode = dataplane.plane.path().as_str(),
        "data path: {}",
        dataplane.reason
    );
    let shared = Shared {
        plane: dataplane.plane.clone(),
        global: Arc::new(ConnectionCounters::default()),
        access_log: Arc::new(
            AccessLog::open(&config.log.access).context("opening the access log")?,
        ),
    };
    let mut tasks = Vec::new();
    let mut upstreams: Vec<Arc<Upstream>> = Vec::new();
    for upstream_config in &config.upstreams {
        let upstream = start_upstream(upstream_config, &options).await?;
        tasks.push(tokio::spawn(upstream.clone().keep_resolving()));
        upstreams.push(upstream);
    }
    let mut contexts = Vec::new();
    let mut bound = Vec::new();
    for listener_config in &config.listeners {
        let (socket, ctx) = bind_listener(listener_config, &upstreams, &shared).await?;
        bound.push((listener_config.name.clone(), socket.local_addr()?));
        contexts.push(ctx.clone());
        tasks.push(tokio::spawn(accept_loop(socket, ctx)));
    }
    let tls = contexts
        .iter()
        .filter_map(|ctx| Some((ctx.config.name.clone(), ctx.tls.clone()?)))
        .collect();
    let snapshot: Arc<dyn Fn() -> Stats + Send + Sync> = {
        let (global, contexts, upstreams) = (shared.global, contexts, upstreams);
        Arc::new(move || stats(started, &dataplane, &global, &contexts, &upstreams))
    };
    let stats_addr = match config.stats.listen {
        Some(listen) => {
            let socket = TcpListener::bind(listen)
                .await
                .with_context(|| format!("stats: cannot listen on {listen}"))?;
            let addr = socket.local_addr()?;
            tracing::info!(%addr, "stats at http://{addr}/stats");
            tasks.push(tokio::spawn(serve_stats(socket, snapshot.clone())));
            Some(addr)
        }
        None => None,
    };
    Ok(Running {
        listeners: bound,
        stats_addr,
        snapshot,
        tasks,
        tls,
    })
}

/// What every listener shares: the data plane chosen at start, the process-wide counters and
/// the access log.
struct Shared {
    plane: Arc<dyn DataPlane>,
    global: Arc<ConnectionCounters>,
    access_log: Arc<AccessLog>,
}

/// An upstream with its broker-side TLS, its servers resolved once before any client arrives.
async fn start_upstream(
    config: &crate::config::UpstreamConfig,
    options: &Options,
) -> anyhow::Result<Arc<Upstream>> {
    let mut upstream = Upstream::new(config.clone(), options.resolver.clone());
    if let Some(tls) = &config.tls {
        upstream.tls = Some(
            UpstreamTls::new(tls)
                .with_context(|| format!("upstream {:?}: upstream_tls", config.name))?,
        );
    }
    let upstream = Arc::new(upstream);
    upstream.resolve_all().await;
    Ok(upstream)
}

/// Binds one listener and builds what its connections share, the data plane for its flows
/// among it: a listener whose bytes the daemon must unwrap (TLS, WebSocket, TLS to the brokers)
/// gets the userspace copy whatever `dataplane.mode` says, with the reason kept for stats.
async fn bind_listener(
    config: &ListenerConfig,
    upstreams: &[Arc<Upstream>],
    shared: &Shared,
) -> anyhow::Result<(TcpListener, Arc<ListenerContext>)> {
    let Some(upstream) = upstreams.iter().find(|u| u.config.name == config.upstream) else {
        bail!(
            "listener {:?}: no upstream named {:?}",
            config.name,
            config.upstream
        );
    };
    let socket = TcpListener::bind(config.listen).await.with_context(|| {
        format!(
            "listener {:?}: cannot listen on {}",
            config.name, config.listen
        )
    })?;
    let tls = match (&config.tls, config.kind) {
        (Some(tls_config), kind) => {
            // Browsers offer only http/1.1, and rustls refuses a client none of whose ALPN
            // names match.
            let alpn = if kind == ListenerKind::Wss {
                DEFAULT_ALPN_WSS
            } else {
                DEFAULT_ALPN_MQTT
            };
            let tls = ServerTls::new(tls_config, alpn)
                .with_context(|| format!("listener {:?}", config.name))?;
            Some(Arc::new(tls))
        }
        (None, _) => None,
    };
    let addr = socket.local_addr()?;
    tracing::info!(listener = %config.name, %addr, upstream = %upstream.config.name, "listening");
    let ws = config.ws.clone().map(|config| WsListener {
        config,
        stats: Arc::default(),
    });
    // Nothing below TLS can be spliced, on either side (the kernel here has no kTLS), and
    // WebSocket frames must be unwrapped by the daemon, whatever dataplane.mode says.
    let path_reason = PathReason::for_listener(tls.is_some(), ws.is_some(), upstream.tls.is_some());
    let dataplane: Arc<dyn DataPlane> = match path_reason {
        PathReason::Mode => shared.plane.clone(),
        _ => Arc::new(UserspaceCopy),
    };
    let ctx = Arc::new(ListenerContext {
        config: config.clone(),
        upstream: upstream.clone(),
        dataplane,
        path_reason,
        counters: ConnectionCounters::default(),
        bytes: Arc::default(),
        global: shared.global.clone(),
        access_log: shared.access_log.clone(),
        tls,
        ws,
    });
    Ok((socket, ctx))
}

/// Why `auto` does not choose the sockmap splice on a kernel without usable BTF, and what
/// `mode = "sockmap"` warns of there.
pub const NO_STREAM_CHECK: &str = "the kernel's BTF (/sys/kernel/btf/vmlinux) is not usable, so \
     the splice cannot trim the segments TCP queues with bytes it has already forwarded, and a \
     retransmission could reach the peer twice (docs/sockmap-replay.md)";

fn choose_dataplane(config: &DataplaneConfig) -> anyhow::Result<DataplaneChoice> {
    let mode = config.mode;
    let userspace = |reason: String| DataplaneChoice {
        plane: Arc::new(UserspaceCopy),
        requested: mode,
        reason,
    };
    match mode {
        DataplaneMode::Userspace => Ok(userspace("dataplane.mode = \"userspace\"".into())),
        // The splice only when its program can trim the segments TCP queues with bytes it has
        // already forwarded (docs/sockmap-replay.md): without the kernel's BTF it cannot, and a
        // proxy that sends a byte twice is unusable.
        DataplaneMode::Auto => match EbpfSplice::start(config) {
            Ok(plane) if plane.checks_the_stream() => Ok(DataplaneChoice {
                plane: Arc::new(plane),
                requested: mode,
                reason: format!(
                    "in-kernel sockmap splice (auto), maps pinned under {}",
                    config.bpffs_pin.display()
                ),
            }),
            Ok(_) => {
                let reason = format!("userspace copy: {NO_STREAM_CHECK}");
                tracing::warn!("dataplane.mode = \"auto\": {reason}");
                Ok(userspace(reason))
            }
            Err(e) => {
                let reason = format!("userspace copy: the eBPF data plane cannot be used: {e}");
                tracing::warn!("dataplane.mode = \"auto\": {reason}");
                Ok(userspace(reason))
            }
        },
        DataplaneMode::Packet => match PacketSplice::start(&config.packet) {
            Ok(plane) => Ok(DataplaneChoice {
                plane: Arc::new(Arc::new(plane)),
                requested: mode,
                reason: "packet splice (in development)".into(),
            }),
            Err(e) => bail!("dataplane.mode = \"packet\": the packet splice cannot be used: {e}"),
        },
        DataplaneMode::Sockmap => match EbpfSplice::start(config) {
            Ok(plane) => {
                if !plane.checks_the_stream() {
                    tracing::warn!("dataplane.mode = \"sockmap\": {NO_STREAM_CHECK}");
                }
                Ok(DataplaneChoice {
                    plane: Arc::new(plane),
                    requested: mode,
                    reason: format!(
                        "in-kernel sockmap splice, maps pinned under {}",
                        config.bpffs_pin.display()
                    ),
                })
            }
            Err(e) => {
                bail!("dataplane.mode = \"sockmap\": the eBPF data plane cannot be used: {e}")
            }
        },
    }
}

/// `dataplane`: the mode in use and why, merged with the data plane's own counters.
fn stats(
    started: Instant,
    dataplane: &DataplaneChoice,
    global: &ConnectionCounters,
    contexts: &[Arc<ListenerContext>],
    upstreams: &[Arc<Upstream>],
) -> Stats {
    dataplane.plane.refresh_meters();
    let listeners = contexts
        .iter()
        .map(|ctx| {
            let listener = ListenerStats {
                connections: ctx.counters.snapshot(),
                kind: ctx.config.kind.as_str().to_string(),
                listen: ctx.config.listen.to_string(),
                upstream: ctx.config.upstream.clone(),
                data_path: ctx.dataplane.path().as_str().to_string(),
                data_path_reason: ctx.path_reason.as_str().to_string(),
                bytes_from_clients: ctx.bytes.to_broker.load(Relaxed),
                bytes_to_clients: ctx.bytes.to_client.load(Relaxed),
                tls: ctx.tls.as_ref().map(|tls| tls.stats.snapshot()),
                ws: ctx.ws.as_ref().map(|ws| ws.stats.snapshot()),
            };
            (ctx.config.name.clone(), listener)
        })
        .collect();
    Stats {
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_secs: started.elapsed().as_secs(),
        dataplane: DataplaneStats {
            mode: dataplane.plane.path().as_str().to_string(),
            requested: dataplane.requested.as_str().to_string(),
            reason: dataplane.reason.clone(),
            splice: dataplane.plane.splice_stats(),
            packet: dataplane.plane.packet_stats(),
        },
        connections: global.snapshot(),
        listeners,
        upstreams: upstreams
            .iter()
            .map(|u| (u.config.name.clone(), u.snapshot()))
            .collect(),
    }
}
