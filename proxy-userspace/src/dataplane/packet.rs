//! The packet splice: after the CONNECT, a TC program (proxy-ebpf/src/tc.rs) rewrites every
//! segment of the client's connection into a segment of the broker's and back, so the two run
//! one TCP conversation and the proxy holds no bytes.
//!
//! In development: a flow it cannot take is copied in userspace (not yet offered to the sockmap
//! splice), and `auto` does not choose it yet.

// The one module here that makes syscalls.
#[allow(unsafe_code)]
pub mod repair;

pub mod handover;
pub mod loader;
pub mod route;
pub mod splice;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::sync::oneshot;

use super::{
    CloseReason, ConnectHandling, DataPath, DataPlane, Flow, FlowEnd, FlowFuture, UserspaceCopy,
};
use crate::config::PacketConfig;
use crate::stats::Direction;
use handover::Fallback;
use loader::{PacketMaps, PacketPrograms};
use proxy_common::direction::{TO_CLIENT, TO_UPSTREAM};
use proxy_common::packet::{PacketEndEvent, PacketFlowState, PacketTotals};

/// How long the drain before the mute may take; a flow that does not drain is copied instead.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a finished flow's entries stay, for the peers' last retransmissions (a FIN whose
/// acknowledgment was lost).
const END_GRACE: Duration = Duration::from_secs(2);
/// How often the ring of flow ends is read.
const EVENT_POLL: Duration = Duration::from_millis(50);
/// Idle flows are looked for every this many polls (a second).
const IDLE_SWEEP_TICKS: u32 = 20;

/// How a packet-spliced flow ended, as the program saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Both FINs acknowledged, or a RST.
    Closed,
    /// No segment for `idle_timeout`.
    Idle,
}

/// A flow the program carries, waiting for its end.
struct LiveFlow {
    done: oneshot::Sender<Ended>,
    idle_timeout_ns: u64,
    /// When the flow was handed over (`CLOCK_MONOTONIC`): its idle clock until a segment passes.
    since_ns: u64,
}

/// Counters of the packet splice (`dataplane.packet.*` in stats).
#[derive(Debug, Default)]
pub struct PacketCounters {
    pub spliced_active: AtomicU64,
    pub spliced_total: AtomicU64,
    pub fallbacks: Mutex<HashMap<&'static str, u64>>,
}

/// The packet splice data plane.
pub struct PacketSplice {
    _programs: PacketPrograms,
    interfaces: Vec<String>,
    flow_table_size: u32,
    maps: Arc<Mutex<PacketMaps>>,
    live: Arc<Mutex<HashMap<u64, LiveFlow>>>,
    next_flow: AtomicU64,
    pub counters: Arc<PacketCounters>,
}

impl std::fmt::Debug for PacketSplice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketSplice").finish_non_exhaustive()
    }
}

/// The interfaces to attach to when none are configured: every one that is up (`IFF_UP`; a veth
/// whose peer just came up may still report its operational state as down), loopback included.
fn interfaces_up() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return vec!["lo".into()];
    };
    let mut up: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let flags = std::fs::read_to_string(e.path().join("flags")).unwrap_or_default();
            let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap_or(0);
            (flags & 1 != 0).then_some(name)
        })
        .collect();
    up.sort();
    up
}

impl PacketSplice {
    /// Loads and attaches the program and starts the watcher of flow ends (on the current tokio
    /// runtime).
    pub fn start(config: &PacketConfig) -> Result<PacketSplice, String> {
        let interfaces = if config.interfaces.is_empty() {
            interfaces_up()
        } else {
            config.interfaces.clone()
        };
        let (programs, mut maps) = PacketPrograms::load(&interfaces, config.flow_table_size)?;
        let events = maps.events.take().ok_or("the end-event ring is missing")?;
        let maps = Arc::new(Mutex::new(maps));
        let live: Arc<Mutex<HashMap<u64, LiveFlow>>> = Arc::default();
        tokio::spawn(watch_ends(events, maps.clone(), live.clone()));
        tracing::info!(?interfaces, "packet splice attached at ingress");
        Ok(PacketSplice {
            _programs: programs,
            interfaces,
            flow_table_size: config.flow_table_size,
            maps,
            live,
            next_flow: AtomicU64::new(1),
            counters: Arc::default(),
        })
    }
}

/// Tells each flow's task when the program saw it end, and finds idle ones. The ring is read
/// every [`EVENT_POLL`]: a flow's end waits [`END_GRACE`] anyway, so a readiness wake-up would
/// buy nothing.
async fn watch_ends(
    mut events: RingBuf<MapData>,
    maps: Arc<Mutex<PacketMaps>>,
    live: Arc<Mutex<HashMap<u64, LiveFlow>>>,
) {
    let mut tick = tokio::time::interval(EVENT_POLL);
    let mut ticks = 0u32;
    loop {
        tick.tick().await;
        let mut ended = Vec::new();
        while let Some(item) = events.next() {
            if item.len() >= std::mem::size_of::<PacketEndEvent>() {
                ended.push(u64::from_ne_bytes(item[..8].try_into().expect("8 bytes")));
            }
        }
        if !ended.is_empty() {
            let mut live = live.lock().unwrap_or_else(|p| p.into_inner());
            for flow in ended {
                if let Some(f) = live.remove(&flow) {
                    let _ = f.done.send(Ended::Closed);
                }
            }
        }
        ticks += 1;
        if ticks.is_multiple_of(IDLE_SWEEP_TICKS) {
            sweep_idle(&maps, &live);
        }
    }
}

/// Ends the flows the program has not seen a segment of for their idle timeout.
fn sweep_idle(maps: &Mutex<PacketMaps>, live: &Mutex<HashMap<u64, LiveFlow>>) {
    let now = repair::monotonic_ns();
    let mut live = live.lock().unwrap_or_else(|p| p.into_inner());
    let idle: Vec<u64> = live
        .iter()
        .filter(|(flow, f)| {
            let seen = splice::flow_state(maps, **flow).map_or(0, |s| s.last_seen_ns);
            now.saturating_sub(seen.max(f.since_ns)) > f.idle_timeout_ns
        })
        .map(|(flow, _)| *flow)
        .collect();
    for flow in idle {
        if let Some(f) = live.remove(&flow) {
            let _ = f.done.send(Ended::Idle);
        }
    }
}

/// How a finished flow closed, from the program's state.
fn close_reason(ended: Ended, state: &PacketFlowState) -> CloseReason {
    let by = |dir: u32| dir as usize + 1;
    match (ended, state.reset_by as usize, state.first_fin as usize) {
        (Ended::Idle, _, _) => CloseReason::Idle,
        (_, r, _) if r == by(TO_UPSTREAM) => CloseReason::ClientError,
        (_, r, _) if r == by(TO_CLIENT) => CloseReason::BrokerError,
        (_, _, f) if f == by(TO_CLIENT) => CloseReason::BrokerClosed,
        _ => CloseReason::ClientClosed,
    }
}

impl PacketSplice {
    fn count_fallback(&self, reason: Fallback) {
        tracing::debug!("packet splice: {}; copying in userspace", reason.as_str());
        let mut f = self
            .counters
            .fallbacks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *f.entry(reason.as_str()).or_default() += 1;
    }

    async fn splice_or_copy(self: Arc<Self>, flow: Flow) -> FlowEnd {
        let flow = match flow.into_tcp() {
            Ok(flow) => flow,
            Err(layered) => return UserspaceCopy.run(*layered).await,
        };
        let id = self.next_flow.fetch_add(1, Relaxed);
        let (done, ended) = oneshot::channel();
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            LiveFlow {
                done,
                idle_timeout_ns: flow.idle_timeout.as_nanos() as u64,
                since_ns: repair::monotonic_ns(),
            },
        );
        let handed = splice::hand_over(&self.maps, id, flow.client, flow.broker, HANDOVER_TIMEOUT);
        let spliced = match handed.await {
            Ok(spliced) => spliced,
            Err((reason, client, broker)) => {
                self.live
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                self.count_fallback(reason);
                let flow = Flow {
                    client,
                    broker,
                    ..flow
                };
                return UserspaceCopy.run(flow.into()).await;
            }
        };
        self.counters.spliced_active.fetch_add(1, Relaxed);
        self.counters.spliced_total.fetch_add(1, Relaxed);
        let ended = ended.await.unwrap_or(Ended::Closed);
        tokio::time::sleep(END_GRACE).await;
        let drained = spliced.drained;
        let state = splice::flow_state(&self.maps, spliced.flow).unwrap_or_default();
        let forwarded = spliced.forwarded(&state);
        spliced.finish(&self.maps);
        self.counters.spliced_active.fetch_sub(1, Relaxed);
        let to_broker = drained[0] + forwarded[TO_UPSTREAM as usize];
        let to_client = drained[1] + forwarded[TO_CLIENT as usize];
        for meter in &flow.meters {
            meter.add(Direction::ToBroker, to_broker);
            meter.add(Direction::ToClient, to_client);
        }
        FlowEnd {
            path: DataPath::Packet,
            bytes_to_broker: to_broker,
            bytes_to_client: to_client,
            reason: close_reason(ended, &state),
        }
    }
}

impl DataPlane for Arc<PacketSplice> {
    fn path(&self) -> DataPath {
        DataPath::Packet
    }

    fn connect_handling(&self) -> ConnectHandling {
        // The daemon writes the CONNECT to the broker itself; the program carries what follows.
        ConnectHandling::Consume
    }

    fn run(&self, flow: Flow) -> FlowFuture {
        Box::pin(self.clone().splice_or_copy(flow))
    }

    fn packet_stats(&self) -> Option<crate::stats::PacketStats> {
        Some(self.stats())
    }
}

impl PacketSplice {
    /// The counters for `GET /stats`: the daemon's and the program's per-CPU totals summed.
    fn stats(&self) -> crate::stats::PacketStats {
        let totals = {
            let m = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            m.totals
                .get(&0, 0)
                .map(|per_cpu| per_cpu.iter().copied().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let sum = |f: fn(&PacketTotals) -> u64| totals.iter().map(f).sum();
        let fallbacks = self
            .counters
            .fallbacks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        crate::stats::PacketStats {
            interfaces: self.interfaces.clone(),
            flow_table_size: self.flow_table_size as u64,
            spliced_active: self.counters.spliced_active.load(Relaxed),
            spliced_total: self.counters.spliced_total.load(Relaxed),
            fallbacks,
            segments: sum(|t| t.segments),
            bytes: sum(|t| t.bytes),
            frozen_drops: sum(|t| t.frozen_drops),
            malformed_options: sum(|t| t.malformed_options),
            rewrite_failed: sum(|t| t.rewrite_failed),
            events_lost: sum(|t| t.events_lost),
        }
    }
}
