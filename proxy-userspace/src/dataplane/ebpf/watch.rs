//! The splice watcher: one thread, one epoll set, every spliced socket registered for
//! `EPOLLRDHUP` alone (edge-triggered), so bytes moving through the kernel never wake it.
//!
//! It is woken by a close, by the program's signal that a direction's redirected bytes passed the
//! point it asked about, or by its own timers. This file is the I/O half: it turns those into
//! [`Event`]s for the flow's [`FlowCore`] (with the flow's counters read just before) and carries
//! out the [`Action`]s the core returns; the rules themselves live in `control`.

use super::control::{
    Action, Count, Event, FlowCore, FlowSetup, Limits, Observed, ReadOutcome, SideCounters, Timer,
    WriteOutcome, pick_to_throttle,
};
use super::sockopt::{
    Epoll, Wakeup, release_free_memory, reset_on_close, set_rcvlowat, tcp_bytes, unacked_out,
};
use super::{ProgramLogger, SharedMaps, SpliceCounters};
use crate::dataplane::{CloseReason, DataPath, FlowEnd};
use aya::maps::{MapData, RingBuf};
use proxy_common::SignalEvent;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
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

/// A pair handed to the kernel, as the watcher receives it.
pub struct Spliced {
    /// `[client, broker]`.
    pub sockets: [TcpStream; 2],
    pub setup: FlowSetup,
    pub done: oneshot::Sender<FlowEnd>,
}

struct FlowState {
    spliced: Spliced,
    core: FlowCore,
    /// The TCP counters as last read, for sides an event does not need read again.
    last: [SideCounters; 2],
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
            held_total: 0,
            reserved_total: 0,
            read_buf: Vec::new(),
            throttled_before: false,
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
    /// Sums over flows of [`FlowCore::inflight`], [`FlowCore::held_bytes`] and
    /// [`FlowCore::reserved`] (what the cores' held-bytes rule is given).
    inflight_total: u64,
    held_total: u64,
    reserved_total: u64,
    /// Where throttled sockets are read into: one bounded read, kept while any direction is
    /// throttled (what a read returns is copied out at its exact size).
    read_buf: Vec<u8>,
    /// Whether a direction was throttled at the end of the previous turn of the loop.
    throttled_before: bool,
}

fn token(id: u64, side: usize) -> u64 {
    id << 2 | side as u64
}

/// The interest every spliced socket has: its hang-up, edge-triggered.
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
                    _ => self.on_socket_event(event.token, event.events),
                }
            }
            self.run_due_timers();
            self.counters
                .inflight_bytes
                .store(self.inflight_total, Relaxed);
            self.counters
                .daemon_held_bytes
                .store(self.held_total, Relaxed);
            let throttled = self.counters.throttled_active.load(Relaxed) > 0;
            if self.throttled_before && !throttled {
                // The last throttled direction was handed back or closed: give the memory back.
                self.read_buf = Vec::new();
                release_free_memory();
                tracing::debug!("no direction throttled any more: free memory released");
            }
            self.throttled_before = throttled;
        }
    }

    fn take_inbox(&mut self) {
        let new: Vec<Spliced> =
            std::mem::take(&mut *self.inbox.lock().unwrap_or_else(|p| p.into_inner()));
        for spliced in new {
            tracing::trace!(
                cookies = ?spliced.setup.cookies,
                client = ?spliced.sockets[0].peer_addr().ok(),
                broker_local = ?spliced.sockets[1].local_addr().ok(),
                "spliced flow registered"
            );
            let id = self.next_id;
            self.next_id += 1;
            for side in [0, 1] {
                if let Err(e) = self.epoll.add(
                    spliced.sockets[side].as_fd(),
                    BASE_INTEREST,
                    token(id, side),
                ) {
                    tracing::error!("splice watcher: cannot watch a socket: {e}");
                }
                self.by_cookie
                    .insert(spliced.setup.cookies[side], (id, side));
            }
            if tracing::enabled!(tracing::Level::DEBUG) {
                // Ties the flow's debug lines (their span carries the client socket's cookie) to
                // its client's address in the access log.
                let client = spliced.sockets[0].peer_addr().ok();
                tracing::debug!(cookie = spliced.setup.cookies[0], ?client, "flow spliced");
            }
            let (core, actions) = FlowCore::new(self.limits, spliced.setup, Instant::now());
            self.flows.insert(
                id,
                FlowState {
                    spliced,
                    core,
                    last: [SideCounters::default(); 2],
                },
            );
            let mut queue = VecDeque::new();
            for action in actions {
                self.apply(id, action, &mut queue);
            }
            self.drive(id, Event::Registered);
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
                self.drive(id, Event::Signal(side));
            }
        }
        self.enforce_total();
    }

    fn on_socket_event(&mut self, token: u64, events: u32) {
        let (id, side) = (token >> 2, (token & 1) as usize);
        let Some(flow) = self.flows.get(&id) else {
            return;
        };
        let error = flow.spliced.sockets[side].take_error().ok().flatten();
        let event = Event::Socket {
            side,
            error: error.is_some() || events & libc::EPOLLERR as u32 != 0,
            readable: events & libc::EPOLLIN as u32 != 0,
            writable: events & libc::EPOLLOUT as u32 != 0,
            hangup: events & (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0,
        };
        if let Some(error) = error {
            tracing::debug!(%error, side, "spliced socket error");
        }
        self.drive(id, event);
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
            self.drive(id, Event::Timer(timer));
            if matches!(timer, Timer::Inflight(_)) {
                self.enforce_total();
            }
        }
    }

    /// Over `max_inflight_total`: throttle the directions holding the most.
    fn enforce_total(&mut self) {
        if self.inflight_total <= self.limits.total {
            return;
        }
        let candidates = self
            .flows
            .iter()
            .flat_map(|(&id, flow)| {
                flow.core
                    .throttle_candidates()
                    .map(move |(inflight, side)| (inflight, (id, side)))
            })
            .collect();
        for (id, side) in pick_to_throttle(candidates, self.inflight_total, self.limits.total) {
            self.drive(id, Event::Throttle(side));
        }
    }

    /// Hands `event` to the flow's core with fresh counters, and carries out what it returns,
    /// feeding the outcome of each read and write back in as the next event.
    fn drive(&mut self, id: u64, event: Event) {
        let mut queue = VecDeque::from([event]);
        while let Some(event) = queue.pop_front() {
            let flows = self.flows.len() as u64;
            let Some(flow) = self.flows.get_mut(&id) else {
                return;
            };
            let _span =
                tracing::debug_span!("flow", cookie = flow.spliced.setup.cookies[0]).entered();
            tracing::trace!(?event, "event");
            let needs = flow.core.needs(&event);
            let obs = observe(&self.maps, flow, needs, flows, self.reserved_total);
            let before = (
                flow.core.inflight(),
                flow.core.held_bytes(),
                flow.core.reserved(),
            );
            let actions = flow.core.step(event, &obs);
            self.inflight_total = self.inflight_total - before.0 + flow.core.inflight();
            self.held_total = self.held_total - before.1 + flow.core.held_bytes();
            self.reserved_total = self.reserved_total - before.2 + flow.core.reserved();
            for action in actions {
                self.apply(id, action, &mut queue);
            }
        }
    }

    fn apply(&mut self, id: u64, action: Action, queue: &mut VecDeque<Event>) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let sockets = &flow.spliced.sockets;
        let cookies = flow.spliced.setup.cookies;
        match action {
            Action::SetEntry(side, entry) => {
                let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
                let _ = maps.peers.insert(cookies[side], entry, 0);
            }
            Action::Barrier(side) => {
                let _ = set_rcvlowat(sockets[side].as_fd(), 1);
            }
            Action::Interest(side, readable, writable) => {
                let mut wanted = BASE_INTEREST;
                if readable {
                    wanted |= libc::EPOLLIN as u32;
                }
                if writable {
                    wanted |= libc::EPOLLOUT as u32;
                }
                let _ = self
                    .epoll
                    .modify(sockets[side].as_fd(), wanted, token(id, side));
            }
            Action::Read(side, max) => {
                if self.read_buf.len() < max {
                    self.read_buf.resize(max, 0);
                }
                let buf = &mut self.read_buf[..max];
                let outcome = loop {
                    match (&sockets[side]).read(buf) {
                        Ok(0) => break ReadOutcome::Eof,
                        Ok(n) => {
                            break ReadOutcome::Data(buf[..n].to_vec());
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            break ReadOutcome::WouldBlock;
                        }
                        Err(_) => break ReadOutcome::Failed,
                    }
                };
                queue.push_back(Event::Read(side, outcome));
            }
            Action::Write(side) => {
                let data = flow.core.held(side);
                let outcome = loop {
                    match (&sockets[1 - side]).write(data) {
                        Ok(n) => break WriteOutcome::Wrote(n),
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            break WriteOutcome::WouldBlock;
                        }
                        Err(_) => break WriteOutcome::Failed,
                    }
                };
                queue.push_back(Event::Wrote(side, outcome));
            }
            Action::ShutdownWrite(side) => {
                let _ = sockets[side].shutdown(Shutdown::Write);
            }
            Action::Recheck(side) => queue.push_back(Event::Signal(side)),
            Action::At(at, timer) => self.timers.push(Reverse((at, id, timer))),
            Action::Count(count) => {
                let c = &self.counters;
                match count {
                    Count::Throttled => {
                        c.throttles_total.fetch_add(1, Relaxed);
                        c.throttled_active.fetch_add(1, Relaxed);
                    }
                    Count::HandedBack => {
                        c.throttled_active.fetch_sub(1, Relaxed);
                    }
                    Count::Rst => {
                        c.rst.fetch_add(1, Relaxed);
                    }
                    Count::DrainTimeout => {
                        c.drain_timeout.fetch_add(1, Relaxed);
                    }
                    Count::FinDrained => {
                        c.fin_drained.fetch_add(1, Relaxed);
                    }
                    Count::Idle => {
                        c.idle.fetch_add(1, Relaxed);
                    }
                    Count::Resumed => {
                        c.copies_resumed.fetch_add(1, Relaxed);
                    }
                }
            }
            Action::Finish { reason, reset } => {
                for side in [0, 1] {
                    if reset[side] {
                        reset_on_close(sockets[side].as_fd());
                    }
                }
                self.finish(id, reason);
            }
        }
    }

    /// Takes the pair out of the kernel path, closes both sockets and reports the flow's end.
    fn finish(&mut self, id: u64, reason: CloseReason) {
        let Some(flow) = self.flows.remove(&id) else {
            return;
        };
        let spliced = flow.spliced;
        tracing::trace!(cookies = ?spliced.setup.cookies, ?reason, "spliced flow finished");
        for (side, socket) in spliced.sockets.iter().enumerate() {
            self.epoll.remove(socket.as_fd());
            self.by_cookie.remove(&spliced.setup.cookies[side]);
        }
        self.inflight_total = self.inflight_total.saturating_sub(flow.core.inflight());
        self.held_total = self.held_total.saturating_sub(flow.core.held_bytes());
        self.reserved_total = self.reserved_total.saturating_sub(flow.core.reserved());
        self.counters
            .throttled_active
            .fetch_sub(flow.core.throttled() as u64, Relaxed);
        let [to_broker, to_client] = {
            let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            let counters = spliced
                .setup
                .cookies
                .map(|cookie| super::flow_counters(&maps, cookie));
            super::remove_pair(&mut maps, spliced.setup.cookies);
            flow.core.moved(&counters.map(|c| SideCounters {
                redirected: c.bytes,
                ..SideCounters::default()
            }))
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

/// Reads a flow's counters: the program's per-socket counters first, then TCP's (see
/// [`SideCounters`]) for the sides that `needs` says; the others keep their last values.
fn observe(
    maps: &SharedMaps,
    flow: &mut FlowState,
    needs: [bool; 2],
    flows: u64,
    reserved_total: u64,
) -> Observed {
    let spliced = &flow.spliced;
    let program = {
        let maps = maps.lock().unwrap_or_else(|p| p.into_inner());
        spliced
            .setup
            .cookies
            .map(|cookie| super::flow_counters(&maps, cookie))
    };
    let sides = [0, 1].map(|side| {
        if !needs[side] {
            return SideCounters {
                redirected: program[side].bytes,
                passed: program[side].passed_bytes,
                broken: program[side].broken != 0,
                ..flow.last[side]
            };
        }
        let fd = spliced.sockets[side].as_fd();
        match (tcp_bytes(fd), unacked_out(fd)) {
            (Ok(tcp), Ok(outq)) => SideCounters {
                redirected: program[side].bytes,
                passed: program[side].passed_bytes,
                received: tcp.received,
                acked: tcp.acked,
                outq,
                failed: false,
                broken: program[side].broken != 0,
            },
            _ => SideCounters {
                failed: true,
                ..SideCounters::default()
            },
        }
    });
    flow.last = sides;
    Observed {
        now: Instant::now(),
        sides,
        flows,
        reserved_total,
    }
}
