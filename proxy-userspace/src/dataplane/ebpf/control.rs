//! The splice's control rules as a pure state machine: one [`FlowCore`] per spliced pair.
//!
//! The watcher thread (`watch.rs`) owns the sockets, the maps, epoll and the timers. For each
//! thing that happens to a flow it reads the flow's counters ([`Observed`]), calls
//! [`FlowCore::step`] with the [`Event`], and carries out the [`Action`]s it gets back
//! (`control/interface.rs`); the result of a read or a write comes back as the next event.
//! Nothing here makes a syscall, so the rules are tested against a simulated kernel
//! (`control/sim.rs`) over generated schedules.
//!
//! The rules (docs/architecture.md, *The in-kernel splice*):
//! - FIN: the peer's write side is shut only once every byte received before the FIN has been
//!   written into the peer (the counter rule, [`close`]);
//! - reset: what the reset side sent still goes into the other side, which is then closed once
//!   its peer has acknowledged everything (with a reset if bytes it sent can no longer be
//!   delivered), or reset after `close_drain_timeout`;
//! - backpressure: a direction with too much in flight is throttled; the daemon then moves its
//!   bytes, reading a socket only in whole-queue reads that fit the held-bytes bounds, and hands
//!   it back to the kernel once nothing waits in the socket ([`throttle`], [`pump`]); a flow that
//!   holds bytes keeps room in the total for the next read of both its directions, so the total
//!   never wedges flows whose peers wait on each other ([`pump::admit`]);
//! - idle: nothing moved for `idle_timeout`; and a flow with a side gone that makes no progress
//!   for `close_drain_timeout` ends.

mod close;
mod interface;
mod pump;
#[cfg(test)]
mod sim;
mod throttle;

pub use interface::{
    Action, Count, Event, Observed, ReadOutcome, SideCounters, Timer, WriteOutcome,
};
pub use throttle::{grant, pick_to_throttle};

use crate::dataplane::CloseReason;
use proxy_common::{PeerEntry, direction};
use std::time::{Duration, Instant};

/// Side index: the client socket.
pub const CLIENT: usize = 0;
/// Side index: the broker socket.
pub const BROKER: usize = 1;

/// The first re-check of a drain or of bytes in flight, doubled up to the maximum.
const BACKOFF_START: Duration = Duration::from_millis(1);
const BACKOFF_MAX: Duration = Duration::from_millis(20);

/// The backpressure, memory and close settings the rules apply.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `dataplane.max_inflight_per_flow`.
    pub per_flow: u64,
    /// `dataplane.max_inflight_total`.
    pub total: u64,
    /// `dataplane.close_drain_timeout`.
    pub close_drain_timeout: Duration,
    /// `dataplane.max_daemon_held_per_flow`.
    pub held_per_flow: u64,
    /// `dataplane.max_daemon_held_total`.
    pub held_total: u64,
}

/// Where a direction (the bytes received on one side, written into the other) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Open,
    /// A FIN arrived on the kernel path; waiting for the bytes before it to reach the peer.
    Draining {
        since: Instant,
        backoff: Duration,
    },
    /// The end was passed on (the peer's write side is shut), or the direction is dead.
    Closed,
}

/// A throttled direction: the daemon moves its bytes.
#[derive(Debug, Default)]
struct Throttle {
    /// False while the kernel's queue towards the peer still holds redirected bytes.
    copying: bool,
    /// Bytes read from the source that the peer did not take yet (from `start`); empty, and
    /// holding no memory, whenever the peer keeps up.
    held: Vec<u8>,
    start: usize,
    eof: bool,
    /// A read or write was asked for and its result has not come back.
    io_pending: bool,
    /// The peer's last write would have blocked.
    peer_blocked: bool,
    /// When a read of 0 first came before TCP's count said every byte had arrived.
    early_fin_since: Option<Instant>,
    /// Back-off of the wait for room to read.
    room_backoff: Option<Duration>,
    /// A `Pump` timer is set.
    timer_pending: bool,
    /// Bytes read plus bytes written at the last progress check ([`FlowCore::check_progress`]).
    progress_mark: u64,
    /// The read or write in progress was asked for by a progress check, not by readiness.
    kicked: bool,
}

impl Throttle {
    fn held_len(&self) -> u64 {
        (self.held.len() - self.start) as u64
    }
}

#[derive(Debug)]
struct Way {
    stage: Stage,
    /// The peer entry as last written for this direction's source socket.
    entry: PeerEntry,
    throttle: Option<Throttle>,
    /// Bytes of this direction the daemon itself wrote into the peer.
    daemon_written: u64,
    /// Bytes of this direction the daemon read out of the source socket.
    daemon_read: u64,
    /// Bytes redirected by the kernel and not yet in the peer socket, as last measured.
    inflight: u64,
    /// Next re-check of `inflight` while it is non-zero.
    poll_backoff: Duration,
    poll_pending: bool,
    /// A `Progress` timer is set (one per direction, whatever throttles come and go).
    progress_pending: bool,
    /// Since when `inflight` has been over the per-flow limit.
    over_since: Option<Instant>,
}

/// The settings a flow is spliced with.
#[derive(Debug, Clone, Copy)]
pub struct FlowSetup {
    /// `[client cookie, broker cookie]`.
    pub cookies: [u64; 2],
    /// The signal point and hard limit both peer entries were inserted with.
    pub signal_at: u64,
    pub hard_limit: u64,
    /// Bytes the daemon wrote into the broker socket before the splice (a PROXY header).
    pub broker_preamble_len: u64,
    pub idle_timeout: Duration,
}

/// One spliced pair's control state.
#[derive(Debug)]
pub struct FlowCore {
    limits: Limits,
    setup: FlowSetup,
    ways: [Way; 2],
    first_fin: Option<CloseReason>,
    /// A side's FIN was seen (a hang-up without an error).
    fin_seen: [bool; 2],
    /// Bytes the daemon dropped because the side they were for was reset.
    dropped: u64,
    /// Room of `max_daemon_held_total` this flow reserved while it holds bytes: enough for the
    /// next read of each direction ([`pump::admit`]).
    reserve: u64,
    /// The side that was reset, and since when the other side drains.
    reset: Option<(usize, Instant)>,
    /// Epoll interest beyond the hang-up, per socket: readable, writable.
    interest: [(bool, bool); 2],
    last_activity: u64,
    last_change: Instant,
    /// When a side ended (FIN or reset); the `Ended` timer runs from then on.
    ended_at: Option<Instant>,
    finished: bool,
    /// The counters of the event being handled.
    obs: Observed,
    out: Vec<Action>,
}

impl FlowCore {
    /// A flow just spliced; the first actions schedule its timers.
    pub fn new(limits: Limits, setup: FlowSetup, now: Instant) -> (FlowCore, Vec<Action>) {
        let way = |side: usize| Way {
            stage: Stage::Open,
            entry: PeerEntry {
                peer_cookie: setup.cookies[1 - side],
                direction: if side == CLIENT {
                    direction::TO_UPSTREAM
                } else {
                    direction::TO_CLIENT
                },
                throttled: proxy_common::throttle::OFF,
                signal_at: setup.signal_at,
                daemon_read: 0,
                hard_limit: setup.hard_limit,
            },
            throttle: None,
            daemon_written: 0,
            daemon_read: 0,
            inflight: 0,
            poll_backoff: BACKOFF_START,
            poll_pending: false,
            progress_pending: false,
            over_since: None,
        };
        let core = FlowCore {
            limits,
            setup,
            ways: [way(CLIENT), way(BROKER)],
            first_fin: None,
            fin_seen: [false; 2],
            dropped: 0,
            reserve: 0,
            reset: None,
            interest: [(false, false); 2],
            last_activity: 0,
            last_change: now,
            ended_at: None,
            finished: false,
            obs: Observed {
                now,
                sides: [SideCounters::default(); 2],
                flows: 1,
                reserved_total: 0,
            },
            out: Vec::new(),
        };
        let actions = vec![Action::At(now + setup.idle_timeout / 4, Timer::Idle)];
        (core, actions)
    }

    /// Handles one event, given the counters observed just before; returns what to do.
    pub fn step(&mut self, event: Event, obs: &Observed) -> Vec<Action> {
        if self.finished {
            return Vec::new();
        }
        self.obs = *obs;
        if let Some(side) = (0..2).find(|&s| obs.sides[s].broken) {
            tracing::warn!(
                side = side_name(side),
                "the kernel handed over an skb with bytes already forwarded and it could not be \
                 trimmed; the flow is reset rather than send them twice"
            );
            self.on_reset(side);
            return std::mem::take(&mut self.out);
        }
        if let Some(side) = (0..2).find(|&s| obs.sides[s].failed) {
            tracing::debug!(
                side = side_name(side),
                "counters unreadable; taken as a reset"
            );
            self.on_reset(side);
            return std::mem::take(&mut self.out);
        }
        match event {
            Event::Registered => {
                // The kernel has carried this pair since the kick, before the watcher knew its
                // cookies: a signal it sent meanwhile found no flow. Above all one at the hard
                // limit, after which the program passes and only the daemon can move the bytes.
                for side in [CLIENT, BROKER] {
                    let c = obs.sides[side];
                    if c.passed > 0 || c.redirected >= self.ways[side].entry.signal_at {
                        self.check_inflight(side);
                    }
                }
            }
            Event::Signal(side) => self.check_inflight(side),
            Event::Throttle(side) => self.throttle(side),
            Event::Socket {
                side,
                error,
                readable,
                writable,
                hangup,
            } => self.on_socket(side, error, readable, writable, hangup),
            Event::Timer(timer) => match timer {
                Timer::Drain(side) => self.try_drain(side),
                Timer::Inflight(side) => {
                    self.ways[side].poll_pending = false;
                    self.check_inflight(side);
                }
                Timer::ResetDrain => self.try_reset_drain(),
                Timer::Pump(side) => {
                    if let Some(t) = &mut self.ways[side].throttle {
                        t.timer_pending = false;
                    }
                    self.pump(side);
                }
                Timer::Progress(side) => {
                    self.ways[side].progress_pending = false;
                    self.check_progress(side);
                }
                Timer::Idle => self.check_idle(),
                Timer::Ended => self.check_ended(),
            },
            Event::Read(side, outcome) => self.on_read(side, outcome),
            Event::Wrote(side, outcome) => self.on_wrote(side, outcome),
        }
        std::mem::take(&mut self.out)
    }

    /// Which sockets' TCP counters (`TCP_INFO`, `SIOCOUTQ`) `event` needs read; the
    /// others may be given as last read. `TCP_INFO` takes the socket's lock, which the kernel's
    /// receive path (and so the verdict) also takes: an open direction's routine check reads only
    /// its peer's, as the watcher always did.
    pub fn needs(&self, event: &Event) -> [bool; 2] {
        let side = match event {
            Event::Signal(side) | Event::Timer(Timer::Inflight(side)) => *side,
            _ => return [true; 2],
        };
        let way = &self.ways[side];
        let routine = way.throttle.is_none()
            && way.stage == Stage::Open
            && self.reset.is_none()
            && self.obs.sides[side].passed <= way.entry.daemon_read;
        if routine {
            let mut needs = [false; 2];
            needs[1 - side] = true;
            needs
        } else {
            [true; 2]
        }
    }

    /// The bytes direction `side` holds for its peer, for [`Action::Write`].
    pub fn held(&self, side: usize) -> &[u8] {
        self.ways[side]
            .throttle
            .as_ref()
            .map_or(&[], |t| &t.held[t.start..])
    }

    /// Bytes the daemon holds for this flow (both directions).
    pub fn held_bytes(&self) -> u64 {
        self.ways
            .iter()
            .filter_map(|w| w.throttle.as_ref())
            .map(Throttle::held_len)
            .sum()
    }

    /// Room of `max_daemon_held_total` this flow has reserved: none while it holds nothing and
    /// reads nothing, else at least what it holds ([`pump::admit`]).
    pub fn reserved(&self) -> u64 {
        let reading = self
            .ways
            .iter()
            .any(|w| w.throttle.as_ref().is_some_and(|t| t.io_pending));
        let held = self.held_bytes();
        if held > 0 || reading {
            self.reserve.max(held)
        } else {
            0
        }
    }

    /// Bytes the kernel holds for this flow's peers, as last measured (both directions).
    pub fn inflight(&self) -> u64 {
        self.ways.iter().map(|w| w.inflight).sum()
    }

    /// Directions the global limit may throttle: `(bytes in flight, side)`.
    pub fn throttle_candidates(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        (0..2).filter_map(|side| {
            let way = &self.ways[side];
            (way.throttle.is_none() && way.stage == Stage::Open && way.inflight > 0)
                .then_some((way.inflight, side))
        })
    }

    /// Directions throttled now.
    pub fn throttled(&self) -> usize {
        self.ways.iter().filter(|w| w.throttle.is_some()).count()
    }

    /// Bytes each direction moved into its peer: `[to broker, to client]`, given the counters.
    pub fn moved(&self, sides: &[SideCounters; 2]) -> [u64; 2] {
        [CLIENT, BROKER].map(|side| sides[side].redirected + self.ways[side].daemon_written)
    }

    /// Bytes written into socket `1 - side` that came from `side` (kernel or daemon alike).
    fn written_into_peer(&self, side: usize) -> u64 {
        let peer = 1 - side;
        let c = self.obs.sides[peer];
        let mut written = c.acked + c.outq;
        if peer == BROKER {
            // The broker socket made the connect(): its SYN is one acknowledged "byte"; and the
            // daemon itself wrote the PROXY header into it.
            written = written.saturating_sub(1 + self.setup.broker_preamble_len);
        }
        written
    }

    /// Bytes of direction `side` the kernel redirected and the peer socket has not taken.
    fn measured_inflight(&self, side: usize) -> u64 {
        let written = self.written_into_peer(side);
        self.obs.sides[side]
            .redirected
            .saturating_sub(written.saturating_sub(self.ways[side].daemon_written))
    }

    fn at(&mut self, after: Duration, timer: Timer) {
        self.out.push(Action::At(self.obs.now + after, timer));
    }

    /// Adds or removes interest in socket `side` being readable / writable.
    fn set_interest(&mut self, side: usize, readable: Option<bool>, writable: Option<bool>) {
        let (r, w) = self.interest[side];
        let wanted = (readable.unwrap_or(r), writable.unwrap_or(w));
        if wanted != self.interest[side] {
            tracing::trace!(side, readable = wanted.0, writable = wanted.1, "interest");
            self.interest[side] = wanted;
            self.out.push(Action::Interest(side, wanted.0, wanted.1));
        }
    }

    /// Ends the flow, counted once, by how it ended.
    fn finish(&mut self, reason: CloseReason, reset: [bool; 2]) {
        if !self.finished {
            self.finished = true;
            let count = match reason {
                CloseReason::ClientClosed | CloseReason::BrokerClosed => Count::FinDrained,
                CloseReason::ClientError | CloseReason::BrokerError => Count::Rst,
                CloseReason::Idle => Count::Idle,
                CloseReason::DrainTimeout => Count::DrainTimeout,
            };
            self.out.push(Action::Count(count));
            self.out.push(Action::Finish { reason, reset });
        }
    }

    fn on_socket(&mut self, side: usize, error: bool, readable: bool, writable: bool, hup: bool) {
        tracing::trace!(side, error, readable, writable, hup, "socket event");
        if error {
            tracing::debug!(side = side_name(side), "spliced socket reset");
            return self.on_reset(side);
        }
        if hup {
            self.fin_seen[side] = true;
        }
        if hup && self.ways[side].stage == Stage::Open {
            self.first_fin.get_or_insert(closed_reason(side));
            self.side_ended();
            // Bytes may wait in this socket (passed around a hand-back): then the daemon takes
            // the direction over, and its copy passes the FIN on.
            self.check_inflight(side);
            if self.finished {
                return;
            }
            if self.ways[side].throttle.is_none() {
                self.ways[side].stage = Stage::Draining {
                    since: self.obs.now,
                    backoff: BACKOFF_START,
                };
                return self.try_drain(side);
            }
        }
        if readable || hup {
            self.pump(side);
        }
        if writable {
            // This socket can take more of what the other side sent.
            if let Some(t) = &mut self.ways[1 - side].throttle {
                t.peer_blocked = false;
            }
            self.pump(1 - side);
        }
    }
}

/// The close reason of a FIN first seen on `side`.
fn closed_reason(side: usize) -> CloseReason {
    if side == CLIENT {
        CloseReason::ClientClosed
    } else {
        CloseReason::BrokerClosed
    }
}

/// The close reason of a reset on `side`.
fn error_reason(side: usize) -> CloseReason {
    if side == CLIENT {
        CloseReason::ClientError
    } else {
        CloseReason::BrokerError
    }
}

pub fn side_name(side: usize) -> &'static str {
    if side == CLIENT { "client" } else { "broker" }
}
