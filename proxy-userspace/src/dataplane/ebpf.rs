//! The in-kernel splice: once the CONNECT is peeked and a broker connected, both sockets join a
//! sockmap and the verdict program forwards every byte; the daemon only watches for the close.
//!
//! Hand-over order (docs/architecture.md, *The in-kernel splice*): per-flow counters and both peer entries first, then the
//! broker socket, then the client socket, then the `SO_RCVLOWAT` kick on both, which makes the
//! kernel forward the CONNECT still queued in the client socket and anything pipelined behind it.

mod btf;
mod control;
mod loader;
pub(crate) use loader::{OBJECT, raise_memlock};
mod sockopt;
mod watch;

pub use control::Limits;
pub use loader::{EbpfPrograms, EbpfUnavailable, Maps, ProgramLogger};

use super::{ConnectHandling, DataPath, DataPlane, Flow, FlowEnd, FlowFuture, UserspaceCopy};
use crate::config::{DataplaneConfig, InflightLimit, auto_inflight_per_flow};
use crate::stats::{ByteMeter, Direction};
use crate::stats::{SpliceCloses, SpliceStats};
use control::FlowSetup;
use proxy_common::{FlowCounters, PeerEntry, direction, throttle};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use watch::{Spliced, Watcher};

pub use sockopt::{
    TcpBytes, peek, queued_in, reset_on_close, set_rcvlowat, socket_cookie, tcp_bytes, tcp_info,
    unacked_out, wait_readable,
};

/// The maps, shared by the connection tasks (insert) and the watcher thread (counters, removal).
pub type SharedMaps = Arc<Mutex<Maps>>;

/// Counters of the splice itself, for `GET /stats`.
#[derive(Debug, Default)]
pub struct SpliceCounters {
    /// Pairs in the kernel path now.
    pub spliced_active: AtomicU64,
    /// Pairs ever handed to the kernel path.
    pub spliced_total: AtomicU64,
    /// Pairs the kernel refused (a socket no longer ESTABLISHED), served on userspace instead.
    pub splice_refused: AtomicU64,
    /// Spliced pairs closed by FIN on both sides, each drained by the counter rule.
    pub fin_drained: AtomicU64,
    /// Spliced pairs ended by a reset of one side (what it sent drained into the other first).
    pub rst: AtomicU64,
    /// Spliced pairs closed by `idle_timeout`.
    pub idle: AtomicU64,
    /// Spliced pairs whose bytes before a close did not drain in time.
    pub drain_timeout: AtomicU64,
    /// Spliced directions throttled now (served by the daemon until they close).
    pub throttled_active: AtomicU64,
    /// Directions ever throttled.
    pub throttles_total: AtomicU64,
    /// Bytes redirected by the kernel and not yet written into their peer socket, summed over
    /// directions, as last measured.
    pub inflight_bytes: AtomicU64,
    /// Bytes of throttled directions the daemon read and their peer has not taken yet.
    pub daemon_held_bytes: AtomicU64,
    /// Throttled copies that waited for a readiness event that never came, moved on by a
    /// progress check (non-zero means the kernel dropped a wake-up: worth a report).
    pub copies_resumed: AtomicU64,
}

/// The eBPF data plane: the loaded programs, the watcher thread, and the counters.
pub struct EbpfSplice {
    shared: Arc<Shared>,
}

struct Shared {
    maps: SharedMaps,
    /// Spliced flows now running, by client cookie, with what their meters were given so far.
    live: Mutex<HashMap<u64, LiveFlow>>,
    watcher: Watcher,
    counters: Arc<SpliceCounters>,
    pin_dir: String,
    limits: Limits,
    // Keeps the program attached and the pins and lock in place for the life of the plane.
    /// Whether the program trims skbs to their unseen bytes (see `btf`).
    stream_check: bool,
    /// Where `max_inflight_per_flow` came from: the configuration, or `auto` and what it read.
    inflight_source: &'static str,
    _programs: EbpfPrograms,
}

impl std::fmt::Debug for EbpfSplice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfSplice")
            .field("pin_dir", &self.shared.pin_dir)
            .finish_non_exhaustive()
    }
}

impl EbpfSplice {
    /// Loads and attaches the programs (maps pinned under `bpffs_pin`) and starts the watcher.
    pub fn start(config: &DataplaneConfig) -> Result<EbpfSplice, EbpfUnavailable> {
        let pin_dir = config.bpffs_pin.as_path();
        let (mut programs, mut maps) = EbpfPrograms::load(pin_dir)?;
        let events = maps.events.take();
        let maps = Arc::new(Mutex::new(maps));
        let counters = Arc::new(SpliceCounters::default());
        let limits = Limits {
            per_flow: match config.max_inflight_per_flow {
                InflightLimit::Bytes(n) => n as u64,
                InflightLimit::Auto => {
                    let sysctl = |name: &str| {
                        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).ok()
                    };
                    auto_inflight_per_flow(
                        sysctl("tcp_rmem").as_deref(),
                        sysctl("tcp_wmem").as_deref(),
                    )
                }
            },
            total: config.max_inflight_total as u64,
            close_drain_timeout: config.close_drain_timeout,
            held_per_flow: config.max_daemon_held_per_flow as u64,
            held_total: config.max_daemon_held_total as u64,
        };
        let logger = programs.take_logger();
        let watcher = Watcher::start(maps.clone(), counters.clone(), limits, logger, events)
            .map_err(|e| EbpfUnavailable::Other(format!("splice watcher: {e}")))?;
        tracing::info!(
            "eBPF splice loaded; maps pinned under {} (bpftool map show pinned {}/mqs_socks)",
            pin_dir.display(),
            pin_dir.display()
        );
        if let Err(why) = programs.stream_check() {
            tracing::warn!(
                "the splice cannot check skbs against their sockets' stream positions ({why}): \
                 a segment the kernel hands over again would reach the peer twice"
            );
        }
        let stream_check = programs.stream_check().is_ok();
        Ok(EbpfSplice {
            shared: Arc::new(Shared {
                maps,
                live: Mutex::new(HashMap::new()),
                watcher,
                counters,
                pin_dir: pin_dir.display().to_string(),
                limits,
                stream_check,
                inflight_source: match config.max_inflight_per_flow {
                    InflightLimit::Bytes(_) => "configured",
                    InflightLimit::Auto => {
                        "auto: net.ipv4.tcp_rmem maximum + net.ipv4.tcp_wmem maximum"
                    }
                },
                _programs: programs,
            }),
        })
    }
}

impl EbpfSplice {
    /// Whether the program trims skbs to their sockets' unseen bytes (the kernel's BTF gave it
    /// the offsets it needs): only then is the splice byte-exact on 6.18.
    pub fn checks_the_stream(&self) -> bool {
        self.shared.stream_check
    }
}

impl DataPlane for EbpfSplice {
    fn path(&self) -> DataPath {
        DataPath::Sockmap
    }

    fn connect_handling(&self) -> ConnectHandling {
        ConnectHandling::Peek
    }

    fn run(&self, flow: Flow) -> FlowFuture {
        let shared = self.shared.clone();
        Box::pin(async move { shared.splice_or_copy(flow).await })
    }

    fn refresh_meters(&self) {
        self.shared.refresh_meters();
    }

    fn splice_stats(&self) -> Option<SpliceStats> {
        let c = &self.shared.counters;
        let totals = {
            let maps = self.shared.maps.lock().unwrap_or_else(|p| p.into_inner());
            maps.totals.get(&0, 0).map(|per_cpu| {
                per_cpu
                    .iter()
                    .fold(proxy_common::GlobalCounters::default(), |mut sum, t| {
                        sum.bytes_to_upstream += t.bytes_to_upstream;
                        sum.bytes_to_client += t.bytes_to_client;
                        sum.packets += t.packets;
                        sum.empty_dropped += t.empty_dropped;
                        sum.redirect_failed += t.redirect_failed;
                        sum.passed_bytes += t.passed_bytes;
                        sum.signals_lost += t.signals_lost;
                        sum.replayed_skbs += t.replayed_skbs;
                        sum.replayed_bytes += t.replayed_bytes;
                        sum.overlap_skbs += t.overlap_skbs;
                        sum.overlap_bytes_trimmed += t.overlap_bytes_trimmed;
                        sum.trim_failed += t.trim_failed;
                        sum
                    })
            })
        }
        .unwrap_or_default();
        Some(SpliceStats {
            bpffs_pin: self.shared.pin_dir.clone(),
            spliced_active: c.spliced_active.load(Relaxed),
            spliced_total: c.spliced_total.load(Relaxed),
            splice_refused: c.splice_refused.load(Relaxed),
            bytes_to_upstream: totals.bytes_to_upstream,
            bytes_to_client: totals.bytes_to_client,
            packets: totals.packets,
            empty_skbs_dropped: totals.empty_dropped,
            redirect_failed: totals.redirect_failed,
            passed_bytes: totals.passed_bytes,
            signals_lost: totals.signals_lost,
            stream_check: self.shared.stream_check,
            replayed_skbs_dropped: totals.replayed_skbs,
            replayed_bytes_dropped: totals.replayed_bytes,
            overlapping_skbs_trimmed: totals.overlap_skbs,
            overlap_bytes_trimmed: totals.overlap_bytes_trimmed,
            untrimmable_skbs: totals.trim_failed,
            throttled_active: c.throttled_active.load(Relaxed),
            throttles_total: c.throttles_total.load(Relaxed),
            inflight_bytes: c.inflight_bytes.load(Relaxed),
            max_inflight_per_flow: self.shared.limits.per_flow,
            max_inflight_per_flow_source: self.shared.inflight_source.to_string(),
            max_inflight_total: self.shared.limits.total,
            daemon_held_bytes: c.daemon_held_bytes.load(Relaxed),
            copies_resumed: c.copies_resumed.load(Relaxed),
            max_daemon_held_per_flow: self.shared.limits.held_per_flow,
            max_daemon_held_total: self.shared.limits.held_total,
            closes: SpliceCloses {
                fin_drained: c.fin_drained.load(Relaxed),
                rst: c.rst.load(Relaxed),
                idle_timeout: c.idle.load(Relaxed),
                drain_timeout: c.drain_timeout.load(Relaxed),
            },
        })
    }
}

impl Shared {
    fn live_flows(&self) -> std::sync::MutexGuard<'_, HashMap<u64, LiveFlow>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Feeds every running spliced flow's meters from the kernel's per-socket counters:
    /// redirected bytes plus bytes passed to the daemon while throttled (which it forwards).
    fn refresh_meters(&self) {
        let mut live = self.live_flows();
        if live.is_empty() {
            return;
        }
        let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        for flow in live.values_mut() {
            let moved = flow.cookies.map(|cookie| {
                let counters = flow_counters(&maps, cookie);
                counters.bytes + counters.passed_bytes
            });
            flow.report(moved);
        }
    }

    async fn splice_or_copy(self: Arc<Self>, flow: Flow) -> FlowEnd {
        // TLS or WebSocket: the bytes must pass through the daemon to be unwrapped. Such
        // listeners get the userspace plane at start (server.rs); this keeps any other caller's
        // flow whole.
        let flow = match flow.into_tcp() {
            Ok(flow) => flow,
            Err(layered) => return UserspaceCopy.run(*layered).await,
        };
        // Leave tokio's reactor: from here on only the watcher's epoll set looks at these sockets.
        let (Ok(client), Ok(broker)) = (flow.client.into_std(), flow.broker.into_std()) else {
            return FlowEnd::nothing_moved(DataPath::Sockmap, super::CloseReason::ClientError);
        };
        match self.insert(&client, &broker) {
            Ok((cookies, signal_at, hard_limit)) => {
                let setup = FlowSetup {
                    cookies,
                    signal_at,
                    hard_limit,
                    broker_preamble_len: flow.broker_preamble_len,
                    idle_timeout: flow.idle_timeout,
                };
                self.splice([client, broker], setup, flow.meters).await
            }
            Err(error) => {
                // Typically EOPNOTSUPP: a side already closed (no longer ESTABLISHED). The
                // CONNECT is still unread in the client socket, so the userspace path forwards it.
                tracing::debug!("splice refused ({error}); serving this pair on userspace");
                self.counters.splice_refused.fetch_add(1, Relaxed);
                let _ = set_rcvlowat(client.as_fd(), 1);
                let (Ok(client), Ok(broker)) = (
                    tokio::net::TcpStream::from_std(client),
                    tokio::net::TcpStream::from_std(broker),
                ) else {
                    return FlowEnd::nothing_moved(
                        DataPath::Userspace,
                        super::CloseReason::ClientError,
                    );
                };
                let flow = Flow {
                    client,
                    broker,
                    ..flow
                };
                UserspaceCopy.run(flow.into()).await
            }
        }
    }

    /// Starts the splice of a pair whose map entries are in: caps the windows, kicks the
    /// verdict, and waits for the watcher's end of the flow.
    async fn splice(
        &self,
        sockets: [std::net::TcpStream; 2],
        setup: FlowSetup,
        meters: Vec<Arc<ByteMeter>>,
    ) -> FlowEnd {
        // Counted before the kick: from then on the kernel may carry the whole exchange before
        // this task runs again, and stats read meanwhile must already show the flow.
        let cookies = setup.cookies;
        self.counters.spliced_active.fetch_add(1, Relaxed);
        self.counters.spliced_total.fetch_add(1, Relaxed);
        self.live_flows().insert(
            cookies[0],
            LiveFlow {
                cookies,
                meters,
                reported: [0, 0],
            },
        );
        // A throttle passes to the socket whatever its peer may still send, up to the window
        // the socket has advertised, and the daemon copies all of it. Spliced, a socket's queue
        // is always empty, so its window would be its whole (autotuned) buffer, megabytes: the
        // window is capped at the daemon's per-flow bound, so a throttle costs at most that
        // much copying. Before the kick, when only the CONNECT has arrived. The cost: about
        // that much per round trip on a long fat link.
        for socket in &sockets {
            if let Err(e) = sockopt::set_window_clamp(socket.as_fd(), self.limits.held_per_flow) {
                tracing::debug!("cannot cap a spliced socket's window: {e}");
            }
        }
        // The kick: the verdict now runs over the CONNECT (and whatever followed it) that is
        // still queued in the client socket, and over anything the broker sent.
        for socket in &sockets {
            if let Err(e) = set_rcvlowat(socket.as_fd(), 1) {
                tracing::warn!("SO_RCVLOWAT kick failed: {e}");
            }
        }
        let (done, ended) = tokio::sync::oneshot::channel();
        self.watcher.add(Spliced {
            sockets,
            setup,
            done,
        });
        let end = ended.await.unwrap_or(FlowEnd::nothing_moved(
            DataPath::Sockmap,
            super::CloseReason::BrokerError,
        ));
        if let Some(mut live) = self.live_flows().remove(&cookies[0]) {
            live.report([end.bytes_to_broker, end.bytes_to_client]);
        }
        end
    }

    /// Inserts the pair in map order; on failure every entry made is removed again. Returns the
    /// cookies and the first signal point.
    fn insert(
        &self,
        client: &std::net::TcpStream,
        broker: &std::net::TcpStream,
    ) -> std::io::Result<([u64; 2], u64, u64)> {
        let cookies = [
            socket_cookie(client.as_fd())?,
            socket_cookie(broker.as_fd())?,
        ];
        let [client_cookie, broker_cookie] = cookies;
        // The first hard limit: this flow's share of the total, counting itself.
        let flows = self.counters.spliced_active.load(Relaxed) + 1;
        let hard_limit = control::grant(&self.limits, flows);
        let signal_at = hard_limit / 2;
        let entry = |peer_cookie, direction| PeerEntry {
            peer_cookie,
            direction,
            throttled: throttle::OFF,
            signal_at,
            daemon_read: 0,
            hard_limit,
        };
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let result = (|| {
            for cookie in cookies {
                maps.flow_counters
                    .insert(cookie, FlowCounters::default(), 0)
                    .map_err(std::io::Error::other)?;
            }
            maps.peers
                .insert(
                    client_cookie,
                    entry(broker_cookie, direction::TO_UPSTREAM),
                    0,
                )
                .map_err(std::io::Error::other)?;
            maps.peers
                .insert(broker_cookie, entry(client_cookie, direction::TO_CLIENT), 0)
                .map_err(std::io::Error::other)?;
            maps.socks
                .insert(broker_cookie, broker.as_raw_fd(), 0)
                .map_err(std::io::Error::other)?;
            maps.socks
                .insert(client_cookie, client.as_raw_fd(), 0)
                .map_err(std::io::Error::other)?;
            Ok(())
        })();
        if let Err(e) = result {
            remove_pair(&mut maps, cookies);
            return Err(e);
        }
        Ok((cookies, signal_at, hard_limit))
    }
}

/// A spliced flow's byte meters and what they were given so far: fed from the kernel's counters
/// whenever stats are read, topped up to the flow's exact totals when it ends.
struct LiveFlow {
    cookies: [u64; 2],
    meters: Vec<Arc<ByteMeter>>,
    /// `[to broker, to client]` already added to every meter.
    reported: [u64; 2],
}

impl LiveFlow {
    /// Adds to every meter what `moved` (`[to broker, to client]`) has beyond what they were
    /// given. Never takes back: a figure read live may count passed bytes a reset later
    /// discarded, and a meter that went backwards would confuse every rate computed from it.
    fn report(&mut self, moved: [u64; 2]) {
        for (i, dir) in [Direction::ToBroker, Direction::ToClient]
            .into_iter()
            .enumerate()
        {
            let more = moved[i].saturating_sub(self.reported[i]);
            if more > 0 {
                for meter in &self.meters {
                    meter.add(dir, more);
                }
                self.reported[i] += more;
            }
        }
    }
}

/// What the verdict program did with the socket `cookie`'s bytes so far.
fn flow_counters(maps: &Maps, cookie: u64) -> FlowCounters {
    maps.flow_counters.get(&cookie, 0).unwrap_or_default()
}

/// Removes a pair's entries: sockets first (no more redirects), then peers, then counters.
fn remove_pair(maps: &mut Maps, cookies: [u64; 2]) {
    for cookie in &cookies {
        let _ = maps.socks.remove(cookie);
    }
    for cookie in &cookies {
        let _ = maps.peers.remove(cookie);
        let _ = maps.flow_counters.remove(cookie);
    }
}
