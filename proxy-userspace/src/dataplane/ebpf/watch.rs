//! The splice watcher: one thread, one epoll set, every spliced socket registered for
//! `EPOLLRDHUP` alone (edge-triggered), so bytes moving through the kernel never wake it.
//!
//! It is woken by a close, by the program's signal that a direction's redirected bytes passed the
//! point it asked about, or by its own timers, and it:
//! - propagates each side's FIN by the counter rule (shared/notes §3): the peer's write side is
//!   shut only once every byte received before the FIN has been written into the peer;
//! - on a reset of one side, drains what that side sent into the other and closes it with a FIN
//!   once its peer has acknowledged everything (or resets it after `close_drain_timeout`);
//! - bounds the bytes the kernel holds for a peer that does not read (backpressure): a direction
//!   with more than `max_inflight_per_flow` in flight, or the biggest ones when all together pass
//!   `max_inflight_total`, is throttled. Its skbs then stay in its own socket, whose window closes;
//!   once the kernel's queue towards the peer is empty the watcher copies the rest itself. It
//!   hands the direction back only when every byte the socket received was either redirected or
//!   read by the watcher (nothing left in the socket for a redirected skb to overtake), and then
//!   stops reading it at once;
//! - applies `idle_timeout` from the kernel's per-flow counters.

use super::sockopt::{Epoll, Event, Wakeup, reset_on_close, set_rcvlowat, tcp_bytes, unacked_out};
use super::{Limits, ProgramLogger, SharedMaps, SpliceCounters};
use crate::dataplane::{CloseReason, DataPath, FlowEnd};
use aya::maps::{MapData, RingBuf};
use proxy_common::{PeerEntry, SignalEvent, direction, throttle};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Token of the wake-up eventfd; flow tokens are `id << 2 | side` with ids from 1.
const WAKE_TOKEN: u64 = 0;
/// Token of the programs' log ring buffer.
const LOG_TOKEN: u64 = 1;
/// Token of the signal ring buffer.
const EVENTS_TOKEN: u64 = 2;
/// The first re-check of a drain or of bytes in flight, doubled up to the maximum.
const BACKOFF_START: Duration = Duration::from_millis(1);
const BACKOFF_MAX: Duration = Duration::from_millis(20);
/// Smallest step between two signals of one direction: below it the watcher would wake for
/// ordinary bursts.
pub const MIN_SIGNAL_STEP: u64 = 64 * 1024;
/// Smallest hard limit ahead of what a direction's peer has taken: under global pressure every
/// direction still gets this much, so the kernel may hold up to this per direction beyond
/// `max_inflight_total`.
pub const MIN_GRANT: u64 = 16 * 1024;
/// How long a direction may stay over `max_inflight_per_flow` before it is throttled, and how far
/// over it may go meanwhile.
const OVER_LIMIT_GRACE: Duration = Duration::from_millis(20);
const OVER_LIMIT_FACTOR: u64 = 8;
/// Added to the largest receive buffer a socket can have when sizing the watcher's read buffer:
/// room for the skbs that may arrive beyond it.
const READ_BUFFER_SLACK: usize = 1024 * 1024;

/// How far ahead of what its peer has taken a direction's hard limit is set when `flows` pairs
/// are spliced: an equal share of `max_inflight_total`, never more than the per-flow limit's
/// "far over" bound, never less than [`MIN_GRANT`]. Shares, not first-come reservations: idle
/// flows' limits cost nothing, and however many directions fill theirs at once, the kernel holds
/// at most the total plus `MIN_GRANT` per direction (a direction set when fewer pairs were spliced
/// keeps its larger share until its next check).
pub fn grant(limits: &Limits, flows: u64) -> u64 {
    (limits.total / (2 * flows).max(1))
        .min(OVER_LIMIT_FACTOR * limits.per_flow)
        .max(MIN_GRANT)
}

/// Side index: the client socket.
const CLIENT: usize = 0;
/// Side index: the broker socket.
const BROKER: usize = 1;

/// A pair handed to the kernel, as the watcher receives it.
pub struct Spliced {
    /// `[client, broker]`.
    pub sockets: [TcpStream; 2],
    /// `[client cookie, broker cookie]`.
    pub cookies: [u64; 2],
    /// The signal point both peer entries were inserted with.
    pub signal_at: u64,
    /// The hard limit both peer entries were inserted with.
    pub hard_limit: u64,
    pub broker_preamble_len: u64,
    pub idle_timeout: Duration,
    pub done: oneshot::Sender<FlowEnd>,
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
struct Throttle {
    /// False while the kernel's queue towards the peer still holds redirected bytes.
    copying: bool,
    /// Bytes read from the source that the peer did not take yet (from `start`); empty, and
    /// holding no memory, whenever the peer keeps up.
    pending: Vec<u8>,
    start: usize,
    eof: bool,
    /// When a read of 0 first came before TCP's count said every byte had arrived.
    early_fin_since: Option<Instant>,
}

struct Way {
    stage: Stage,
    /// The peer entry as last written for this direction's source socket.
    entry: PeerEntry,
    throttle: Option<Throttle>,
    /// Bytes of this direction the daemon itself wrote into the peer.
    daemon_written: u64,
    /// Bytes of this direction the daemon read out of the source socket (passed by the program,
    /// or taken from the socket before the program saw them).
    daemon_read: u64,
    /// Bytes redirected by the kernel and not yet in the peer socket, as last measured.
    inflight: u64,
    /// Next re-check of `inflight` while it is non-zero.
    poll_backoff: Duration,
    poll_pending: bool,
    /// Since when `inflight` has been over the per-flow limit.
    over_since: Option<Instant>,
}

struct FlowState {
    spliced: Spliced,
    ways: [Way; 2],
    first_fin: Option<CloseReason>,
    /// The side that was reset, and since when the other side drains.
    reset: Option<(usize, Instant)>,
    interest: [u32; 2],
    last_activity: u64,
    last_change: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Drain(usize),
    /// A throttled direction read its FIN before every byte ahead of it had arrived.
    Pump(usize),
    Inflight(usize),
    ResetDrain,
    Idle,
}

/// Hands flows to the watcher thread.
pub struct Watcher {
    inbox: Arc<Mutex<Vec<Spliced>>>,
    wakeup: Arc<Wakeup>,
}

impl Watcher {
    /// Starts the watcher thread.
    pub fn start(
        maps: SharedMaps,
        counters: Arc<SpliceCounters>,
        limits: Limits,
        logger: Option<ProgramLogger>,
        events: Option<RingBuf<MapData>>,
    ) -> std::io::Result<Watcher> {
        let epoll = Epoll::new()?;
        let wakeup = Arc::new(Wakeup::new()?);
        epoll.add(wakeup.fd(), libc::EPOLLIN as u32, WAKE_TOKEN)?;
        if let Some(logger) = &logger {
            epoll.add(logger.as_fd(), libc::EPOLLIN as u32, LOG_TOKEN)?;
        }
        if let Some(events) = &events {
            epoll.add(events.as_fd(), libc::EPOLLIN as u32, EVENTS_TOKEN)?;
        }
        let inbox = Arc::new(Mutex::new(Vec::new()));
        let mut thread = WatchThread {
            epoll,
            wakeup: wakeup.clone(),
            inbox: inbox.clone(),
            maps,
            counters,
            limits,
            logger,
            events,
            flows: HashMap::new(),
            by_cookie: HashMap::new(),
            timers: BinaryHeap::new(),
            next_id: 1,
            inflight_total: 0,
            read_buf: Vec::new(),
        };
        std::thread::Builder::new()
            .name("mqs-splice-watch".into())
            .spawn(move || thread.run())?;
        Ok(Watcher { inbox, wakeup })
    }

    /// Takes over a spliced pair; its `done` channel fires when both sides are closed.
    pub fn add(&self, spliced: Spliced) {
        self.inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(spliced);
        self.wakeup.wake();
    }
}

struct WatchThread {
    epoll: Epoll,
    wakeup: Arc<Wakeup>,
    inbox: Arc<Mutex<Vec<Spliced>>>,
    maps: SharedMaps,
    counters: Arc<SpliceCounters>,
    limits: Limits,
    logger: Option<ProgramLogger>,
    events: Option<RingBuf<MapData>>,
    flows: HashMap<u64, FlowState>,
    by_cookie: HashMap<u64, (u64, usize)>,
    timers: BinaryHeap<Reverse<(Instant, u64, Timer)>>,
    next_id: u64,
    inflight_total: u64,
    /// Read buffer of every throttled direction, allocated at the first throttle.
    read_buf: Vec<u8>,
}

fn token(id: u64, side: usize) -> u64 {
    id << 2 | side as u64
}

/// The interest every spliced socket has: its hang-up, edge-triggered, and nothing else.
const BASE_INTEREST: u32 = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;

impl WatchThread {
    fn run(&mut self) {
        let mut events = Vec::with_capacity(256);
        loop {
            let timeout = self.timers.peek().map_or(-1, |Reverse((at, _, _))| {
                let wait = at.saturating_duration_since(Instant::now());
                // Round up: waking a hair early would only spin.
                wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
            });
            events.clear();
            if let Err(e) = self.epoll.wait(&mut events, timeout) {
                tracing::error!("splice watcher: epoll_wait failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            for event in &events {
                match event.token {
                    WAKE_TOKEN => {
                        self.wakeup.clear();
                        self.take_inbox();
                    }
                    LOG_TOKEN => {
                        if let Some(logger) = &mut self.logger {
                            logger.flush();
                        }
                    }
                    EVENTS_TOKEN => self.read_signals(),
                    _ => self.on_socket_event(*event),
                }
            }
            self.run_due_timers();
            self.counters
                .inflight_bytes
                .store(self.inflight_total, Relaxed);
        }
    }

    fn take_inbox(&mut self) {
        let new: Vec<Spliced> =
            std::mem::take(&mut *self.inbox.lock().unwrap_or_else(|p| p.into_inner()));
        for spliced in new {
            tracing::trace!(
                cookies = ?spliced.cookies,
                client = ?spliced.sockets[CLIENT].peer_addr().ok(),
                broker_local = ?spliced.sockets[BROKER].local_addr().ok(),
                "spliced flow registered"
            );
            let id = self.next_id;
            self.next_id += 1;
            for side in [CLIENT, BROKER] {
                if let Err(e) = self.epoll.add(
                    spliced.sockets[side].as_fd(),
                    BASE_INTEREST,
                    token(id, side),
                ) {
                    tracing::error!("splice watcher: cannot watch a socket: {e}");
                }
                self.by_cookie.insert(spliced.cookies[side], (id, side));
            }
            let now = Instant::now();
            self.timers
                .push(Reverse((now + spliced.idle_timeout / 4, id, Timer::Idle)));
            let way = |side: usize| Way {
                stage: Stage::Open,
                entry: PeerEntry {
                    peer_cookie: spliced.cookies[1 - side],
                    direction: if side == CLIENT {
                        direction::TO_UPSTREAM
                    } else {
                        direction::TO_CLIENT
                    },
                    throttled: throttle::OFF,
                    signal_at: spliced.signal_at,
                    daemon_read: 0,
                    hard_limit: spliced.hard_limit,
                },
                throttle: None,
                daemon_written: 0,
                daemon_read: 0,
                inflight: 0,
                poll_backoff: BACKOFF_START,
                poll_pending: false,
                over_since: None,
            };
            let ways = [way(CLIENT), way(BROKER)];
            self.flows.insert(
                id,
                FlowState {
                    spliced,
                    ways,
                    first_fin: None,
                    reset: None,
                    interest: [BASE_INTEREST; 2],
                    last_activity: 0,
                    last_change: now,
                },
            );
            // The kernel has carried this pair since the kick, before the watcher knew its
            // cookies: a signal it sent meanwhile found no flow here. Above all one at the hard
            // limit, after which the program passes and only the daemon can move the bytes. One
            // map lookup per side tells whether a signal point was reached.
            for side in [CLIENT, BROKER] {
                let Some(flow) = self.flows.get(&id) else {
                    break;
                };
                let counters = {
                    let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
                    super::flow_counters(&maps, flow.spliced.cookies[side])
                };
                if counters.passed_bytes > 0 || counters.bytes >= flow.ways[side].entry.signal_at {
                    self.check_inflight(id, side);
                }
            }
        }
    }

    fn read_signals(&mut self) {
        let mut cookies = Vec::new();
        if let Some(events) = &mut self.events {
            while let Some(item) = events.next() {
                if item.len() >= std::mem::size_of::<SignalEvent>() {
                    cookies.push(u64::from_ne_bytes(item[..8].try_into().expect("8 bytes")));
                }
            }
        }
        for cookie in cookies {
            if let Some(&(id, side)) = self.by_cookie.get(&cookie) {
                self.check_inflight(id, side);
            }
        }
        self.enforce_total();
    }

    fn on_socket_event(&mut self, event: Event) {
        let (id, side) = (event.token >> 2, (event.token & 1) as usize);
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let error = flow.spliced.sockets[side].take_error().ok().flatten();
        if error.is_some() || event.events & libc::EPOLLERR as u32 != 0 {
            tracing::debug!(?error, side = side_name(side), "spliced socket reset");
            return self.on_reset(id, side);
        }
        let readable = event.events & libc::EPOLLIN as u32 != 0;
        let writable = event.events & libc::EPOLLOUT as u32 != 0;
        let hangup = event.events & (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0;
        if hangup && flow.ways[side].stage == Stage::Open {
            flow.first_fin.get_or_insert(if side == CLIENT {
                CloseReason::ClientClosed
            } else {
                CloseReason::BrokerClosed
            });
            // Bytes may wait in this socket (passed around a hand-back): then the daemon takes
            // the direction over, and its copy passes the FIN on.
            self.check_inflight(id, side);
            let Some(flow) = self.flows.get_mut(&id) else {
                return;
            };
            if flow.ways[side].throttle.is_none() {
                flow.ways[side].stage = Stage::Draining {
                    since: Instant::now(),
                    backoff: BACKOFF_START,
                };
                self.try_drain(id, side);
                return;
            }
        }
        if readable || hangup {
            self.pump(id, side);
        }
        if writable {
            // This socket can take more of what the other side sent.
            self.pump(id, 1 - side);
        }
    }

    fn run_due_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, id, timer))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if !self.flows.contains_key(&id) {
                continue;
            }
            match timer {
                Timer::Drain(side) => self.try_drain(id, side),
                Timer::Inflight(side) => {
                    if let Some(flow) = self.flows.get_mut(&id) {
                        flow.ways[side].poll_pending = false;
                    }
                    self.check_inflight(id, side);
                    self.enforce_total();
                }
                Timer::ResetDrain => self.try_reset_drain(id),
                Timer::Pump(side) => self.pump(id, side),
                Timer::Idle => self.check_idle(id, now),
            }
        }
    }

    /// Bytes written into socket `1 - side` that came from `side` (kernel or daemon alike).
    fn written_into_peer(flow: &FlowState, side: usize) -> std::io::Result<u64> {
        let peer = 1 - side;
        let socket = flow.spliced.sockets[peer].as_fd();
        let mut written = tcp_bytes(socket)?.acked + unacked_out(socket)?;
        if peer == BROKER {
            // The broker socket made the connect(): its SYN is one acknowledged "byte"; and the
            // daemon itself wrote the PROXY header into it.
            written = written.saturating_sub(1 + flow.spliced.broker_preamble_len);
        }
        Ok(written)
    }

    /// Measures the bytes of direction `side` the kernel holds for the peer, and throttles the
    /// direction or moves its next signal point.
    fn check_inflight(&mut self, id: u64, side: usize) {
        let Some(flow) = self.flows.get(&id) else {
            return;
        };
        let way = &flow.ways[side];
        // A throttled direction waiting for the kernel's queue to empty is checked whatever else
        // happened; any other direction only while it is open.
        if way.throttle.is_none() && (way.stage != Stage::Open || flow.reset.is_some()) {
            return;
        }
        let counters = {
            let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            super::flow_counters(&maps, flow.spliced.cookies[side])
        };
        let (redirected, passed) = (counters.bytes, counters.passed_bytes);
        let Ok(written) = Self::written_into_peer(flow, side) else {
            return;
        };
        let inflight = redirected.saturating_sub(written.saturating_sub(way.daemon_written));
        let flows = self.flows.len() as u64;
        let flow = self.flows.get_mut(&id).expect("checked above");
        let way = &mut flow.ways[side];
        self.inflight_total = self.inflight_total.saturating_sub(way.inflight) + inflight;
        way.inflight = inflight;

        if let Some(throttle) = &mut way.throttle {
            if !throttle.copying {
                if inflight == 0 {
                    // The kernel's queue towards the peer is empty: the daemon may write now
                    // without overtaking anything.
                    tracing::trace!(
                        cookie = flow.spliced.cookies[side],
                        redirected,
                        passed,
                        written,
                        daemon_written = way.daemon_written,
                        "throttled: copying"
                    );
                    throttle.copying = true;
                    self.set_interest(id, side, libc::EPOLLIN as u32, true);
                    self.pump(id, side);
                } else {
                    self.schedule_poll(id, side);
                }
                return;
            }
            return;
        }
        if passed > way.entry.daemon_read {
            // A skb slipped into the socket around a hand-back: only the daemon can move it.
            return self.throttle(id, side);
        }
        if inflight > self.limits.per_flow {
            // A peer that lags for a moment (its socket buffer full, the kernel's sender thread
            // not yet scheduled) drains within milliseconds; one that stopped reading does not.
            // Throttle when the excess lasts, or at once when it is far over.
            let since = *way.over_since.get_or_insert(Instant::now());
            if inflight > OVER_LIMIT_FACTOR * self.limits.per_flow
                || since.elapsed() >= OVER_LIMIT_GRACE
            {
                way.over_since = None;
                return self.throttle(id, side);
            }
            way.poll_backoff = BACKOFF_START;
            return self.schedule_poll(id, side);
        }
        way.over_since = None;
        // The hard limit: what the kernel may hold for this direction beyond what the peer has
        // taken, an equal share of the total.
        let grant = grant(&self.limits, flows);
        let delivered = redirected - inflight;
        let hard_limit = delivered + grant;
        // Signal halfway there, so a peer that keeps up gets its limit moved before reaching it;
        // at least a burst's worth ahead, or the watcher would wake for ordinary bursts.
        let step = (self.limits.per_flow / 2).min(grant / 2);
        let signal_at = (delivered + step).max(redirected + MIN_SIGNAL_STEP.min(step));
        if signal_at != way.entry.signal_at || hard_limit != way.entry.hard_limit {
            way.entry.signal_at = signal_at;
            way.entry.hard_limit = hard_limit;
            let cookie = flow.spliced.cookies[side];
            let entry = way.entry;
            let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            let _ = maps.peers.insert(cookie, entry, 0);
        }
        if inflight > 0 {
            self.schedule_poll(id, side);
        } else if let Some(flow) = self.flows.get_mut(&id) {
            flow.ways[side].poll_backoff = BACKOFF_START;
        }
    }

    fn schedule_poll(&mut self, id: u64, side: usize) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let way = &mut flow.ways[side];
        if way.poll_pending {
            return;
        }
        way.poll_pending = true;
        let wait = way.poll_backoff;
        way.poll_backoff = (wait * 2).min(BACKOFF_MAX);
        self.timers
            .push(Reverse((Instant::now() + wait, id, Timer::Inflight(side))));
    }

    /// Over `max_inflight_total`: throttle the directions holding the most, until what they hold
    /// brings the total down to half the limit.
    fn enforce_total(&mut self) {
        if self.inflight_total <= self.limits.total {
            return;
        }
        let mut candidates: Vec<(u64, u64, usize)> = self
            .flows
            .iter()
            .flat_map(|(&id, flow)| {
                (0..2).filter_map(move |side| {
                    let way = &flow.ways[side];
                    (way.throttle.is_none() && way.stage == Stage::Open && way.inflight > 0)
                        .then_some((way.inflight, id, side))
                })
            })
            .collect();
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        // Down to half the limit, not just under it: the directions left running keep adding until
        // their next signal, and the throttled ones hold theirs until the kernel has sent it.
        let mut excess = self.inflight_total - self.limits.total / 2;
        for (inflight, id, side) in candidates {
            if excess == 0 {
                break;
            }
            self.throttle(id, side);
            excess = excess.saturating_sub(inflight);
        }
    }

    /// Stops redirecting direction `side`: its skbs go to its own socket, whose window closes.
    fn throttle(&mut self, id: u64, side: usize) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let way = &mut flow.ways[side];
        if way.throttle.is_some() {
            return;
        }
        way.entry.throttled = throttle::ON;
        let (cookie, entry) = (flow.spliced.cookies[side], way.entry);
        {
            let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            let _ = maps.peers.insert(cookie, entry, 0);
        }
        // A barrier: setting a socket option takes the socket's lock, which every verdict on it
        // runs under; once it returns, no verdict that read the old entry is still counting, so
        // the redirected total below is final.
        let _ = set_rcvlowat(flow.spliced.sockets[side].as_fd(), 1);
        way.throttle = Some(Throttle {
            copying: false,
            pending: Vec::new(),
            start: 0,
            eof: false,
            early_fin_since: None,
        });
        way.poll_backoff = BACKOFF_START;
        self.counters.throttles_total.fetch_add(1, Relaxed);
        self.counters.throttled_active.fetch_add(1, Relaxed);
        tracing::debug!(
            side = side_name(side),
            cookie,
            inflight = way.inflight,
            "direction throttled"
        );
        self.check_inflight(id, side);
    }

    /// Adds (`on`) or removes `bits` from the epoll interest of socket `side`.
    fn set_interest(&mut self, id: u64, side: usize, bits: u32, on: bool) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let wanted = if on {
            flow.interest[side] | bits
        } else {
            flow.interest[side] & !bits
        };
        if wanted != flow.interest[side] {
            flow.interest[side] = wanted;
            let _ = self
                .epoll
                .modify(flow.spliced.sockets[side].as_fd(), wanted, token(id, side));
        }
    }

    /// Moves the bytes of throttled direction `side` from its socket into the peer until one of
    /// them would block (edge-triggered: the next readiness edge calls again).
    fn pump(&mut self, id: u64, side: usize) {
        let peer = 1 - side;
        let mut peer_blocked = false;
        let mut source_error = false;
        let mut peer_error = false;
        let mut finished = false;
        let mut source_empty = false;
        let mut fin_early = false;
        {
            let Some(flow) = self.flows.get_mut(&id) else {
                return;
            };
            let cookie = flow.spliced.cookies[side];
            let [source, sink] = if side == CLIENT {
                let [a, b] = &flow.spliced.sockets;
                [a, b]
            } else {
                let [a, b] = &flow.spliced.sockets;
                [b, a]
            };
            let way = &mut flow.ways[side];
            let Some(throttle) = way.throttle.as_mut().filter(|t| t.copying) else {
                return;
            };
            // One read takes everything the socket holds: a read that stops inside one of the
            // kernel's queued messages can return some of its bytes a second time later (seen
            // on 6.18), so the buffer is larger than any socket's receive queue can grow.
            if self.read_buf.is_empty() {
                self.read_buf = vec![0u8; max_receive_queue() + READ_BUFFER_SLACK];
            }
            let read_buf = &mut self.read_buf;
            loop {
                if throttle.start < throttle.pending.len() {
                    match (&*sink).write(&throttle.pending[throttle.start..]) {
                        Ok(n) => {
                            throttle.start += n;
                            way.daemon_written += n as u64;
                            if throttle.start == throttle.pending.len() {
                                throttle.pending = Vec::new();
                                throttle.start = 0;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            peer_blocked = true;
                            break;
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => {
                            peer_error = true;
                            break;
                        }
                    }
                } else if throttle.eof {
                    finished = true;
                    break;
                } else {
                    match (&*source).read(read_buf) {
                        // A read of 0 says the FIN is next in the socket's *message* queue; a
                        // passed skb the kernel deferred (its own queue was busy) may still be on
                        // its way there. TCP's count decides: everything before the FIN must have
                        // been redirected or read.
                        Ok(0)
                            if !all_read_before_fin(
                                source,
                                cookie,
                                &self.maps,
                                way.daemon_read,
                            ) && throttle
                                .early_fin_since
                                .get_or_insert_with(Instant::now)
                                .elapsed()
                                < self.limits.close_drain_timeout =>
                        {
                            fin_early = true;
                            break;
                        }
                        Ok(0) => throttle.eof = true,
                        Ok(n) => {
                            way.daemon_read += n as u64;
                            // Straight into the peer; what it does not take now is kept.
                            let mut done = 0;
                            while done < n {
                                match (&*sink).write(&read_buf[done..n]) {
                                    Ok(k) => {
                                        done += k;
                                        way.daemon_written += k as u64;
                                    }
                                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                                    Err(_) => {
                                        peer_error = true;
                                        break;
                                    }
                                }
                            }
                            if done < n {
                                throttle.pending = read_buf[done..n].to_vec();
                                throttle.start = 0;
                            }
                            if peer_error {
                                break;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            source_empty = true;
                            break;
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => {
                            // A reset: everything readable has been read.
                            throttle.eof = true;
                            source_error = true;
                        }
                    }
                }
            }
        }
        self.set_interest(id, peer, libc::EPOLLOUT as u32, peer_blocked);
        if fin_early {
            // Look again shortly: the deferred skb's arrival may not raise another edge.
            let at = Instant::now() + BACKOFF_START;
            self.timers.push(Reverse((at, id, Timer::Pump(side))));
        }
        if source_empty && !peer_blocked {
            self.try_return(id, side);
        }
        if peer_error {
            return self.on_reset(id, peer);
        }
        if source_error {
            self.on_reset(id, side);
        }
        if finished {
            let Some(flow) = self.flows.get_mut(&id) else {
                return;
            };
            if flow.reset.is_some() {
                // The reset drain decides when to close (once the peer acknowledged everything).
                return self.try_reset_drain(id);
            }
            let _ = flow.spliced.sockets[peer].shutdown(Shutdown::Write);
            flow.ways[side].stage = Stage::Closed;
            flow.first_fin.get_or_insert(if side == CLIENT {
                CloseReason::ClientClosed
            } else {
                CloseReason::BrokerClosed
            });
            self.close_if_done(id);
        }
    }

    /// Everything the source held has been written into the peer, which took it without blocking:
    /// offer the direction back to the kernel. If the peer is still slow, a later check throttles
    /// it again; that costs a few syscalls, where keeping a fast flow in userspace costs a copy.
    fn try_return(&mut self, id: u64, side: usize) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        if flow.reset.is_some() || flow.ways[side].stage != Stage::Open {
            return;
        }
        let cookie = flow.spliced.cookies[side];
        // Safe to hand back only when every byte this socket has received was either redirected
        // by the program or read by the daemon (and, the buffer being empty, written into the
        // peer): nothing may still wait anywhere in the socket (its queue, or the kernel's
        // deferred queue of passed skbs), or a redirected skb could overtake it. Counters first,
        // then TCP's count: anything arriving in between makes the sums differ, and waits.
        let counters = {
            let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            super::flow_counters(&maps, cookie)
        };
        let Ok(received) = tcp_bytes(flow.spliced.sockets[side].as_fd()).map(|t| t.received) else {
            return;
        };
        let way = &mut flow.ways[side];
        let Some(throttle) = way.throttle.as_ref() else {
            return;
        };
        if received != counters.bytes + way.daemon_read || !throttle.pending.is_empty() {
            return;
        }
        // RETURNING with every passed byte counted as read: the program redirects from now on,
        // unless a skb was passed after the counters were read, which it then keeps passing.
        way.entry.throttled = throttle::RETURNING;
        way.entry.daemon_read = counters.passed_bytes;
        // Nothing is in flight now; the check below sets the limit and signal point proper.
        way.entry.hard_limit = counters.bytes + MIN_GRANT;
        way.entry.signal_at = counters.bytes + MIN_GRANT / 2;
        let entry = way.entry;
        {
            let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            let _ = maps.peers.insert(cookie, entry, 0);
        }
        // Handed back at once: the daemon reads nothing more of this socket, since a read now
        // could overtake bytes the program redirects. Should a skb have slipped into the socket
        // meanwhile, the next check sees it passed and throttles afresh.
        way.throttle = None;
        way.poll_backoff = BACKOFF_START;
        self.counters.throttled_active.fetch_sub(1, Relaxed);
        tracing::debug!(
            side = side_name(side),
            cookie,
            "throttled direction handed back to the kernel"
        );
        self.set_interest(id, side, libc::EPOLLIN as u32, false);
        self.set_interest(id, 1 - side, libc::EPOLLOUT as u32, false);
        self.check_inflight(id, side);
        self.schedule_poll(id, side);
    }

    /// The counter rule: once every byte received on `side` before its FIN has been written into
    /// the other socket, shut that socket's write side; otherwise check again later.
    fn try_drain(&mut self, id: u64, side: usize) {
        let Some(flow) = self.flows.get(&id) else {
            return;
        };
        let Stage::Draining { since, backoff } = flow.ways[side].stage else {
            return;
        };
        let peer = 1 - side;
        let drained = tcp_bytes(flow.spliced.sockets[side].as_fd()).and_then(|mine| {
            Ok(mine.received.saturating_sub(1) <= Self::written_into_peer(flow, side)?)
        });
        let flow = self.flows.get_mut(&id).expect("checked above");
        match drained {
            Ok(true) => {
                let _ = flow.spliced.sockets[peer].shutdown(Shutdown::Write);
                flow.ways[side].stage = Stage::Closed;
                self.close_if_done(id);
            }
            Ok(false) if since.elapsed() < self.limits.close_drain_timeout => {
                flow.ways[side].stage = Stage::Draining {
                    since,
                    backoff: (backoff * 2).min(BACKOFF_MAX),
                };
                self.timers
                    .push(Reverse((Instant::now() + backoff, id, Timer::Drain(side))));
            }
            Ok(false) => {
                tracing::warn!(
                    side = side_name(side),
                    "bytes before a FIN did not drain within {:?}; resetting both sides",
                    self.limits.close_drain_timeout
                );
                self.counters.drain_timeout.fetch_add(1, Relaxed);
                for socket in &flow.spliced.sockets {
                    reset_on_close(socket.as_fd());
                }
                self.finish(id, CloseReason::DrainTimeout);
            }
            Err(e) => {
                tracing::debug!("drain check failed ({e}); treating it as a reset");
                self.on_reset(id, peer);
            }
        }
    }

    /// Side `side` was reset. What it sent before still goes into the other side, which is then
    /// closed with a FIN once its peer has acknowledged every byte (`try_reset_drain`).
    fn on_reset(&mut self, id: u64, side: usize) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        match flow.reset {
            Some((first, _)) if first != side => {
                // Both sides are gone: nothing left to deliver.
                let reason = if side == CLIENT {
                    CloseReason::ClientError
                } else {
                    CloseReason::BrokerError
                };
                return self.finish(id, reason);
            }
            Some(_) => return,
            None => {}
        }
        self.counters.rst.fetch_add(1, Relaxed);
        flow.reset = Some((side, Instant::now()));
        // Nothing can be delivered into the reset side any more.
        flow.ways[1 - side].stage = Stage::Closed;
        // A throttled direction reads out what its socket still holds (the reset does not
        // discard it), then the drain below waits for the peer to acknowledge it all.
        self.pump(id, side);
        self.try_reset_drain(id);
    }

    fn try_reset_drain(&mut self, id: u64) {
        let Some(flow) = self.flows.get(&id) else {
            return;
        };
        let Some((side, since)) = flow.reset else {
            return;
        };
        let peer = 1 - side;
        let way = &flow.ways[side];
        // A throttled direction first has to copy out what its socket still holds.
        let copied_out = way
            .throttle
            .as_ref()
            .is_none_or(|t| t.eof && t.pending.is_empty());
        let drained = copied_out
            && tcp_bytes(flow.spliced.sockets[side].as_fd()).is_ok_and(|mine| {
                let fin = u64::from(way.stage != Stage::Open);
                Self::written_into_peer(flow, side)
                    .is_ok_and(|written| mine.received.saturating_sub(fin) <= written)
            })
            && unacked_out(flow.spliced.sockets[peer].as_fd()).is_ok_and(|queued| queued == 0);
        let reason = if side == CLIENT {
            CloseReason::ClientError
        } else {
            CloseReason::BrokerError
        };
        if drained {
            let _ = flow.spliced.sockets[peer].shutdown(Shutdown::Write);
            return self.finish(id, reason);
        }
        if since.elapsed() >= self.limits.close_drain_timeout {
            tracing::warn!(
                side = side_name(side),
                "after a reset, the bytes before it did not reach the other side within {:?}; resetting it too",
                self.limits.close_drain_timeout
            );
            self.counters.drain_timeout.fetch_add(1, Relaxed);
            reset_on_close(flow.spliced.sockets[peer].as_fd());
            return self.finish(id, reason);
        }
        let wait = (since.elapsed() / 4).clamp(BACKOFF_START, BACKOFF_MAX);
        self.timers
            .push(Reverse((Instant::now() + wait, id, Timer::ResetDrain)));
    }

    fn close_if_done(&mut self, id: u64) {
        let Some(flow) = self.flows.get(&id) else {
            return;
        };
        if flow.ways.iter().all(|w| w.stage == Stage::Closed) {
            let reason = flow.first_fin.unwrap_or(CloseReason::ClientClosed);
            self.counters.fin_drained.fetch_add(1, Relaxed);
            self.finish(id, reason);
        }
    }

    fn check_idle(&mut self, id: u64, now: Instant) {
        let activity = {
            let Some(flow) = self.flows.get(&id) else {
                return;
            };
            let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            let kernel: u64 = flow
                .spliced
                .cookies
                .iter()
                .map(|c| {
                    let counters = super::flow_counters(&maps, *c);
                    counters.bytes + counters.passed_bytes
                })
                .sum();
            kernel + flow.ways.iter().map(|w| w.daemon_written).sum::<u64>()
        };
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        if activity != flow.last_activity {
            flow.last_activity = activity;
            flow.last_change = now;
        } else if now.duration_since(flow.last_change) >= flow.spliced.idle_timeout {
            self.counters.idle.fetch_add(1, Relaxed);
            return self.finish(id, CloseReason::Idle);
        }
        let next = now + flow.spliced.idle_timeout / 4;
        self.timers.push(Reverse((next, id, Timer::Idle)));
    }

    /// Takes the pair out of the kernel path, closes both sockets and reports the flow's end.
    fn finish(&mut self, id: u64, reason: CloseReason) {
        let Some(flow) = self.flows.remove(&id) else {
            return;
        };
        let spliced = flow.spliced;
        tracing::trace!(cookies = ?spliced.cookies, ?reason, "spliced flow finished");
        for (side, socket) in spliced.sockets.iter().enumerate() {
            self.epoll.remove(socket.as_fd());
            self.by_cookie.remove(&spliced.cookies[side]);
        }
        for way in &flow.ways {
            self.inflight_total = self.inflight_total.saturating_sub(way.inflight);

            if way.throttle.is_some() {
                self.counters.throttled_active.fetch_sub(1, Relaxed);
            }
        }
        let [to_broker, to_client] = {
            let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            let moved = [CLIENT, BROKER].map(|side| {
                super::flow_counters(&maps, spliced.cookies[side]).bytes
                    + flow.ways[side].daemon_written
            });
            super::remove_pair(&mut maps, spliced.cookies);
            moved
        };
        drop(spliced.sockets);
        self.counters.spliced_active.fetch_sub(1, Relaxed);
        let _ = spliced.done.send(FlowEnd {
            path: DataPath::Sockmap,
            bytes_to_broker: to_broker,
            bytes_to_client: to_client,
            reason,
        });
    }
}

/// The most a socket's receive queue can hold: TCP's autotuning maximum, or twice
/// `net.core.rmem_max` (what `SO_RCVBUF` may set), whichever is larger.
fn max_receive_queue() -> usize {
    let read = |path: &str, field: usize| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.split_whitespace().nth(field)?.parse::<usize>().ok())
    };
    let tcp_max = read("/proc/sys/net/ipv4/tcp_rmem", 2).unwrap_or(6 * 1024 * 1024);
    let core_max = read("/proc/sys/net/core/rmem_max", 0).unwrap_or(0);
    tcp_max.max(2 * core_max)
}

/// Whether every byte socket `source` received before its FIN was either redirected by the
/// program or read by the daemon (`daemon_read`): only then is a read of 0 the end of the stream.
fn all_read_before_fin(
    source: &TcpStream,
    cookie: u64,
    maps: &SharedMaps,
    daemon_read: u64,
) -> bool {
    let redirected = {
        let maps = maps.lock().unwrap_or_else(|p| p.into_inner());
        super::flow_counters(&maps, cookie).bytes
    };
    tcp_bytes(source.as_fd())
        .is_ok_and(|t| t.received.saturating_sub(1) <= redirected + daemon_read)
}

fn side_name(side: usize) -> &'static str {
    if side == CLIENT { "client" } else { "broker" }
}
