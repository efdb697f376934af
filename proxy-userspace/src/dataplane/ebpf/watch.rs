//! The splice watcher: one thread, one epoll set, every spliced socket registered for
//! `EPOLLRDHUP` alone (edge-triggered), so bytes moving through the kernel never wake it.
//!
//! It propagates each side's FIN by the counter rule (shared/notes §3): the peer's write side is
//! shut only once every byte received before the FIN has been written into the peer; closes both
//! sockets at once on a reset; and applies `idle_timeout` from the kernel's per-flow counters.

use super::sockopt::{Epoll, Event, Wakeup, tcp_bytes, unacked_out};
use super::{ProgramLogger, SharedMaps, SpliceCounters};
use crate::dataplane::{CloseReason, DataPath, FlowEnd};
use crate::stats::{ByteMeter, Direction};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Token of the wake-up eventfd; flow tokens are `id << 1 | side` with ids from 1.
const WAKE_TOKEN: u64 = 0;
/// Token of the programs' log ring buffer.
const LOG_TOKEN: u64 = 1;
/// The first drain re-check after a FIN, doubled up to [`DRAIN_BACKOFF_MAX`].
const DRAIN_BACKOFF_START: Duration = Duration::from_millis(1);
const DRAIN_BACKOFF_MAX: Duration = Duration::from_millis(20);
/// How long the bytes before a FIN may take to drain before both sides are closed.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

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
    pub broker_preamble_len: u64,
    pub idle_timeout: Duration,
    pub meters: Vec<Arc<ByteMeter>>,
    pub done: oneshot::Sender<FlowEnd>,
}

/// Where one direction (bytes received on a side) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirectionState {
    Open,
    /// A FIN arrived; waiting for the bytes before it to reach the peer.
    Draining {
        since: Instant,
        backoff: Duration,
    },
    /// The FIN was passed on (the peer's write side is shut).
    Closed,
}

struct FlowState {
    spliced: Spliced,
    directions: [DirectionState; 2],
    first_fin: Option<CloseReason>,
    last_bytes: u64,
    last_change: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Drain(usize),
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
        logger: Option<ProgramLogger>,
    ) -> std::io::Result<Watcher> {
        let epoll = Epoll::new()?;
        let wakeup = Arc::new(Wakeup::new()?);
        epoll.add(wakeup.fd(), libc::EPOLLIN as u32, WAKE_TOKEN)?;
        if let Some(logger) = &logger {
            epoll.add(logger.as_fd(), libc::EPOLLIN as u32, LOG_TOKEN)?;
        }
        let inbox = Arc::new(Mutex::new(Vec::new()));
        let mut thread = WatchThread {
            epoll,
            wakeup: wakeup.clone(),
            inbox: inbox.clone(),
            maps,
            counters,
            logger,
            flows: HashMap::new(),
            timers: BinaryHeap::new(),
            next_id: 1,
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
    logger: Option<ProgramLogger>,
    flows: HashMap<u64, FlowState>,
    timers: BinaryHeap<Reverse<(Instant, u64, Timer)>>,
    next_id: u64,
}

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
                if event.token == WAKE_TOKEN {
                    self.wakeup.clear();
                    self.take_inbox();
                } else if event.token == LOG_TOKEN {
                    if let Some(logger) = &mut self.logger {
                        logger.flush();
                    }
                } else {
                    self.on_event(*event);
                }
            }
            self.run_due_timers();
        }
    }

    fn take_inbox(&mut self) {
        let new: Vec<Spliced> =
            std::mem::take(&mut *self.inbox.lock().unwrap_or_else(|p| p.into_inner()));
        for spliced in new {
            let id = self.next_id;
            self.next_id += 1;
            let interest = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;
            for side in [CLIENT, BROKER] {
                if let Err(e) = self.epoll.add(
                    spliced.sockets[side].as_fd(),
                    interest,
                    id << 1 | side as u64,
                ) {
                    tracing::error!("splice watcher: cannot watch a socket: {e}");
                }
            }
            let now = Instant::now();
            let idle_check = spliced.idle_timeout / 4;
            self.timers
                .push(Reverse((now + idle_check, id, Timer::Idle)));
            self.flows.insert(
                id,
                FlowState {
                    spliced,
                    directions: [DirectionState::Open; 2],
                    first_fin: None,
                    last_bytes: 0,
                    last_change: now,
                },
            );
        }
    }

    fn on_event(&mut self, event: Event) {
        let (id, side) = (event.token >> 1, (event.token & 1) as usize);
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let error = flow.spliced.sockets[side].take_error().ok().flatten();
        if error.is_some() || event.events & libc::EPOLLERR as u32 != 0 {
            tracing::debug!(?error, side = side_name(side), "spliced socket reset");
            let reason = if side == CLIENT {
                CloseReason::ClientError
            } else {
                CloseReason::BrokerError
            };
            self.counters.rst.fetch_add(1, Relaxed);
            return self.finish(id, reason);
        }
        if event.events & (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0
            && flow.directions[side] == DirectionState::Open
        {
            flow.directions[side] = DirectionState::Draining {
                since: Instant::now(),
                backoff: DRAIN_BACKOFF_START,
            };
            flow.first_fin.get_or_insert(if side == CLIENT {
                CloseReason::ClientClosed
            } else {
                CloseReason::BrokerClosed
            });
            self.try_drain(id, side);
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
                Timer::Idle => self.check_idle(id, now),
            }
        }
    }

    /// The counter rule: once every byte received on `side` before its FIN has been written into
    /// the other socket, shut that socket's write side; otherwise check again later.
    fn try_drain(&mut self, id: u64, side: usize) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let DirectionState::Draining { since, backoff } = flow.directions[side] else {
            return;
        };
        let peer = 1 - side;
        match drained(&flow.spliced, side) {
            Ok(true) => {
                let _ = flow.spliced.sockets[peer].shutdown(Shutdown::Write);
                flow.directions[side] = DirectionState::Closed;
                if flow.directions[peer] == DirectionState::Closed {
                    let reason = flow.first_fin.unwrap_or(CloseReason::ClientClosed);
                    self.counters.fin_drained.fetch_add(1, Relaxed);
                    self.finish(id, reason);
                }
            }
            Ok(false) if since.elapsed() < DRAIN_TIMEOUT => {
                flow.directions[side] = DirectionState::Draining {
                    since,
                    backoff: (backoff * 2).min(DRAIN_BACKOFF_MAX),
                };
                self.timers
                    .push(Reverse((Instant::now() + backoff, id, Timer::Drain(side))));
            }
            Ok(false) => {
                tracing::warn!(
                    side = side_name(side),
                    "bytes before a FIN did not drain within {DRAIN_TIMEOUT:?}; closing both sides"
                );
                self.counters.drain_timeout.fetch_add(1, Relaxed);
                self.finish(id, CloseReason::DrainTimeout);
            }
            Err(e) => {
                tracing::debug!("drain check failed ({e}); treating as a reset");
                self.counters.rst.fetch_add(1, Relaxed);
                let reason = if peer == CLIENT {
                    CloseReason::ClientError
                } else {
                    CloseReason::BrokerError
                };
                self.finish(id, reason);
            }
        }
    }

    fn check_idle(&mut self, id: u64, now: Instant) {
        let bytes = {
            let Some(flow) = self.flows.get(&id) else {
                return;
            };
            let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            flow.spliced
                .cookies
                .iter()
                .map(|c| super::flow_bytes(&maps, *c))
                .sum::<u64>()
        };
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        if bytes != flow.last_bytes {
            flow.last_bytes = bytes;
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
        for socket in &spliced.sockets {
            self.epoll.remove(socket.as_fd());
        }
        let [to_broker, to_client] = {
            let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            let bytes = spliced.cookies.map(|c| super::flow_bytes(&maps, c));
            super::remove_pair(&mut maps, spliced.cookies);
            bytes
        };
        drop(spliced.sockets);
        for meter in &spliced.meters {
            meter.add(Direction::ToBroker, to_broker);
            meter.add(Direction::ToClient, to_client);
        }
        self.counters.spliced_active.fetch_sub(1, Relaxed);
        let _ = spliced.done.send(FlowEnd {
            path: DataPath::Ebpf,
            bytes_to_broker: to_broker,
            bytes_to_client: to_client,
            reason,
        });
    }
}

/// Whether every byte received on `side` (less its FIN) has been written into the other socket.
fn drained(spliced: &Spliced, side: usize) -> std::io::Result<bool> {
    let peer = 1 - side;
    let received = tcp_bytes(spliced.sockets[side].as_fd())?.received;
    let peer_bytes = tcp_bytes(spliced.sockets[peer].as_fd())?;
    let mut written = peer_bytes.acked + unacked_out(spliced.sockets[peer].as_fd())?;
    if peer == BROKER {
        // The broker socket made the connect(): its SYN is one acknowledged "byte"; and the daemon
        // itself wrote the PROXY header into it.
        written = written.saturating_sub(1 + spliced.broker_preamble_len);
    }
    // The FIN counts as one received byte.
    Ok(received.saturating_sub(1) <= written)
}

fn side_name(side: usize) -> &'static str {
    if side == CLIENT { "client" } else { "broker" }
}
