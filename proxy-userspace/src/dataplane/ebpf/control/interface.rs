//! What passes between the core and its driver: the counters observed, the events in and the
//! actions out.

use super::CloseReason;
use proxy_common::PeerEntry;
use std::time::Instant;

/// One socket's counters as the driver read them: the program's per-socket counters first, then
/// TCP's, so a byte arriving in between shows up as received and not yet accounted for (and is
/// waited for) rather than the other way round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SideCounters {
    /// Bytes the program redirected from this socket to its peer.
    pub redirected: u64,
    /// Bytes the program passed to this socket's own receive queue.
    pub passed: u64,
    /// `tcpi_bytes_received` (a FIN counts as one).
    pub received: u64,
    /// `tcpi_bytes_acked` (a SYN this side sent counts as one).
    pub acked: u64,
    /// `SIOCOUTQ`: written into this socket, not yet acknowledged.
    pub outq: u64,
    /// The counters could not be read (the socket is unusable).
    pub failed: bool,
    /// The program dropped an skb it could not trim to its unseen bytes: the stream lost bytes.
    pub broken: bool,
}

/// What the driver observed just before an event is handled.
#[derive(Debug, Clone, Copy)]
pub struct Observed {
    pub now: Instant,
    /// `[client, broker]`.
    pub sides: [SideCounters; 2],
    /// Spliced pairs now: a direction's share of `max_inflight_total` depends on it.
    pub flows: u64,
    /// Room of `max_daemon_held_total` reserved over all flows ([`super::FlowCore::reserved`]),
    /// this one included.
    pub reserved_total: u64,
}

/// The flow's timers; the driver fires them at the time an [`Action::At`] asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    /// Re-check the counter rule for the FIN of this side.
    Drain(usize),
    /// Move this throttled direction's bytes again (an early FIN, or no room to read).
    Pump(usize),
    /// Re-measure this direction's bytes in flight.
    Inflight(usize),
    /// Check that this copying direction moved something since the last check.
    Progress(usize),
    /// Re-check the drain after a reset.
    ResetDrain,
    Idle,
    /// A side ended: check that the rest still makes progress.
    Ended,
}

/// What a read of a throttled socket returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOutcome {
    Data(Vec<u8>),
    Eof,
    WouldBlock,
    Failed,
}

/// What a write into a peer returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    Wrote(usize),
    WouldBlock,
    Failed,
}

/// Something that happened to a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The watcher just took the flow over: a signal the program sent before may have been missed.
    Registered,
    /// The program signalled that this socket's redirected bytes passed their signal point, or
    /// the driver wants them re-measured ([`Action::Recheck`]).
    Signal(usize),
    /// The bytes in flight over all flows are over `max_inflight_total`: throttle this direction.
    Throttle(usize),
    /// An epoll event on socket `side`.
    Socket {
        side: usize,
        /// `EPOLLERR`, or a pending socket error.
        error: bool,
        readable: bool,
        writable: bool,
        /// `EPOLLRDHUP` or `EPOLLHUP`.
        hangup: bool,
    },
    Timer(Timer),
    /// The result of [`Action::Read`] on socket `side`.
    Read(usize, ReadOutcome),
    /// The result of [`Action::Write`] of direction `side` (into socket `1 - side`).
    Wrote(usize, WriteOutcome),
}

/// Statistics the driver keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Throttled,
    HandedBack,
    Rst,
    DrainTimeout,
    FinDrained,
    Idle,
    /// A progress check found bytes to move that no readiness event had reported.
    Resumed,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Replace socket `side`'s entry in the peer map.
    SetEntry(usize, PeerEntry),
    /// Take socket `side`'s lock (`SO_RCVLOWAT`): once done, no verdict that read the previous
    /// entry is still counting.
    Barrier(usize),
    /// Socket `side`'s epoll interest beyond the hang-up: readable, writable.
    Interest(usize, bool, bool),
    /// Read at most `max` bytes from socket `side`; report [`Event::Read`].
    Read(usize, usize),
    /// Write direction `side`'s held bytes ([`FlowCore::held`]) into socket `1 - side`; report
    /// [`Event::Wrote`].
    Write(usize),
    /// Shut socket `side`'s write side (pass a FIN on).
    ShutdownWrite(usize),
    /// Measure again and send [`Event::Signal`] for this side.
    Recheck(usize),
    At(Instant, Timer),
    Count(Count),
    /// Take the pair out of the maps and close both sockets, those marked with a reset.
    Finish {
        reason: CloseReason,
        reset: [bool; 2],
    },
}
