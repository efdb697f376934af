//! The in-kernel splice: once the CONNECT is peeked and a broker connected, both sockets join a
//! sockmap and the verdict program forwards every byte; the daemon only watches for the close.
//!
//! Hand-over order (shared/notes §1–2): per-flow counters and both peer entries first, then the
//! broker socket, then the client socket, then the `SO_RCVLOWAT` kick on both, which makes the
//! kernel forward the CONNECT still queued in the client socket and anything pipelined behind it.

mod loader;
mod sockopt;
mod watch;

pub use loader::{EbpfPrograms, EbpfUnavailable, Maps, ProgramLogger};

use super::{ConnectHandling, DataPath, DataPlane, Flow, FlowEnd, FlowFuture, UserspaceCopy};
use aya::maps::PerCpuValues;
use proxy_common::{FlowCounters, PeerEntry, direction};
use serde_json::{Value, json};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use watch::{Spliced, Watcher};

pub use sockopt::{peek, set_rcvlowat, socket_cookie};

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
    /// Spliced pairs closed at once because a side was reset or failed.
    pub rst: AtomicU64,
    /// Spliced pairs closed by `idle_timeout`.
    pub idle: AtomicU64,
    /// Spliced pairs whose bytes before a FIN did not drain in time.
    pub drain_timeout: AtomicU64,
}

/// The eBPF data plane: the loaded programs, the watcher thread, and the counters.
pub struct EbpfSplice {
    shared: Arc<Shared>,
}

struct Shared {
    maps: SharedMaps,
    watcher: Watcher,
    counters: Arc<SpliceCounters>,
    pin_dir: String,
    nr_cpus: usize,
    // Keeps the program attached and the pins and lock in place for the life of the plane.
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
    /// Loads and attaches the programs (maps pinned under `pin_dir`) and starts the watcher.
    pub fn start(pin_dir: &Path) -> Result<EbpfSplice, EbpfUnavailable> {
        let (mut programs, maps) = EbpfPrograms::load(pin_dir)?;
        let nr_cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| EbpfUnavailable::Other(format!("{what}: {e}")))?;
        let maps = Arc::new(Mutex::new(maps));
        let counters = Arc::new(SpliceCounters::default());
        let watcher = Watcher::start(maps.clone(), counters.clone(), programs.take_logger())
            .map_err(|e| EbpfUnavailable::Other(format!("splice watcher: {e}")))?;
        tracing::info!(pin_dir = %pin_dir.display(), "eBPF splice loaded; maps pinned (bpftool map show pinned {}/mqs_socks)", pin_dir.display());
        Ok(EbpfSplice {
            shared: Arc::new(Shared {
                maps,
                watcher,
                counters,
                pin_dir: pin_dir.display().to_string(),
                nr_cpus,
                _programs: programs,
            }),
        })
    }

    /// The splice counters (tests read them directly).
    pub fn counters(&self) -> &SpliceCounters {
        &self.shared.counters
    }
}

impl DataPlane for EbpfSplice {
    fn path(&self) -> DataPath {
        DataPath::Ebpf
    }

    fn connect_handling(&self) -> ConnectHandling {
        ConnectHandling::Peek
    }

    fn run(&self, flow: Flow) -> FlowFuture {
        let shared = self.shared.clone();
        Box::pin(async move { shared.splice_or_copy(flow).await })
    }

    fn stats(&self) -> Value {
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
                        sum
                    })
            })
        }
        .unwrap_or_default();
        json!({
            "bpffs_pin": self.shared.pin_dir,
            "spliced_active": c.spliced_active.load(Relaxed),
            "spliced_total": c.spliced_total.load(Relaxed),
            "splice_refused": c.splice_refused.load(Relaxed),
            "bytes_to_upstream": totals.bytes_to_upstream,
            "bytes_to_client": totals.bytes_to_client,
            "packets": totals.packets,
            "empty_skbs_dropped": totals.empty_dropped,
            "redirect_failed": totals.redirect_failed,
            "closes": {
                "fin_drained": c.fin_drained.load(Relaxed),
                "rst": c.rst.load(Relaxed),
                "idle_timeout": c.idle.load(Relaxed),
                "drain_timeout": c.drain_timeout.load(Relaxed),
            },
        })
    }
}

impl Shared {
    async fn splice_or_copy(self: Arc<Self>, flow: Flow) -> FlowEnd {
        let Flow {
            client,
            broker,
            idle_timeout,
            buffer_size,
            meters,
            broker_preamble_len,
        } = flow;
        // Leave tokio's reactor: from here on only the watcher's epoll set looks at these sockets.
        let (client, broker) = match (client.into_std(), broker.into_std()) {
            (Ok(client), Ok(broker)) => (client, broker),
            _ => {
                return FlowEnd {
                    path: DataPath::Ebpf,
                    bytes_to_broker: 0,
                    bytes_to_client: 0,
                    reason: super::CloseReason::ClientError,
                };
            }
        };
        match self.insert(&client, &broker) {
            Ok(cookies) => {
                // The kick: the verdict now runs over the CONNECT (and whatever followed it)
                // that is still queued in the client socket, and over anything the broker sent.
                for socket in [&client, &broker] {
                    if let Err(e) = set_rcvlowat(socket.as_fd(), 1) {
                        tracing::warn!("SO_RCVLOWAT kick failed: {e}");
                    }
                }
                self.counters.spliced_active.fetch_add(1, Relaxed);
                self.counters.spliced_total.fetch_add(1, Relaxed);
                let (done, ended) = tokio::sync::oneshot::channel();
                self.watcher.add(Spliced {
                    sockets: [client, broker],
                    cookies,
                    broker_preamble_len,
                    idle_timeout,
                    meters,
                    done,
                });
                ended.await.unwrap_or(FlowEnd {
                    path: DataPath::Ebpf,
                    bytes_to_broker: 0,
                    bytes_to_client: 0,
                    reason: super::CloseReason::BrokerError,
                })
            }
            Err(error) => {
                // Typically EOPNOTSUPP: a side already closed (no longer ESTABLISHED). The CONNECT
                // is still unread in the client socket, so the userspace path forwards it.
                tracing::debug!("splice refused ({error}); serving this pair on userspace");
                self.counters.splice_refused.fetch_add(1, Relaxed);
                let _ = set_rcvlowat(client.as_fd(), 1);
                let (Ok(client), Ok(broker)) = (
                    tokio::net::TcpStream::from_std(client),
                    tokio::net::TcpStream::from_std(broker),
                ) else {
                    return FlowEnd {
                        path: DataPath::Userspace,
                        bytes_to_broker: 0,
                        bytes_to_client: 0,
                        reason: super::CloseReason::ClientError,
                    };
                };
                let flow = Flow {
                    client,
                    broker,
                    idle_timeout,
                    buffer_size,
                    meters,
                    broker_preamble_len,
                };
                UserspaceCopy.run(flow).await
            }
        }
    }

    /// Inserts the pair in map order; on failure every entry made is removed again.
    fn insert(
        &self,
        client: &std::net::TcpStream,
        broker: &std::net::TcpStream,
    ) -> std::io::Result<[u64; 2]> {
        let cookies = [
            socket_cookie(client.as_fd())?,
            socket_cookie(broker.as_fd())?,
        ];
        let [client_cookie, broker_cookie] = cookies;
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let result = (|| {
            for cookie in cookies {
                let zero = PerCpuValues::try_from(vec![FlowCounters::default(); self.nr_cpus])?;
                maps.flow_counters
                    .insert(cookie, zero, 0)
                    .map_err(std::io::Error::other)?;
            }
            let to_broker = PeerEntry {
                peer_cookie: broker_cookie,
                direction: direction::TO_UPSTREAM,
                _pad: 0,
            };
            let to_client = PeerEntry {
                peer_cookie: client_cookie,
                direction: direction::TO_CLIENT,
                _pad: 0,
            };
            maps.peers
                .insert(client_cookie, to_broker, 0)
                .map_err(std::io::Error::other)?;
            maps.peers
                .insert(broker_cookie, to_client, 0)
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
        Ok(cookies)
    }
}

/// Bytes the verdict program redirected from the socket `cookie`, summed over CPUs.
fn flow_bytes(maps: &Maps, cookie: u64) -> u64 {
    maps.flow_counters
        .get(&cookie, 0)
        .map_or(0, |per_cpu| per_cpu.iter().map(|c| c.bytes).sum())
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
