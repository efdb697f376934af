//! A simulated kernel for the control core: a socket pair with, per direction, TCP's counters, the
//! queue of skbs the verdict has not seen yet, the program's verdict (a copy of `sockmap.rs`'s
//! rules), the redirect queue towards the peer, the pass queue (with the kernel's deferral) and
//! the peer's send queue; remote senders and receivers that write numbered bytes, stall, send
//! FINs and resets. Generated schedules interleave all of that with the core's reads and writes,
//! and check that the bytes written into each peer are exactly the bytes received, once, in
//! order; that a FIN is passed on only after all of them; and that a flow whose sides both end
//! ends too, without a drain timeout when every byte could be delivered.

use super::*;
use crate::dataplane::CloseReason;
use proxy_common::throttle;
use std::collections::{BinaryHeap, VecDeque};

/// splitmix64: small, seeded, good enough to pick schedules.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Byte `i` of direction `d`: a pattern whose period (251) matches no buffer size, so a replayed
/// or skipped run shows.
fn byte(d: usize, i: u64) -> u8 {
    ((i + 97 * d as u64) % 251) as u8
}

/// Limits drawn for a schedule: small, so that schedules reach them.
fn random_limits(rng: &mut Rng) -> Limits {
    let limits = Limits {
        per_flow: 8 * 1024 + rng.below(32 * 1024),
        total: 64 * 1024 + rng.below(256 * 1024),
        close_drain_timeout: Duration::from_secs(30),
        held_per_flow: 96 * 1024 + rng.below(160 * 1024),
        held_total: 0,
    };
    // Never less than the per-flow bound (the configuration insists).
    Limits {
        held_total: limits.held_per_flow + rng.below(512 * 1024),
        ..limits
    }
}

/// How a remote ends its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Fin,
    /// A FIN, then a reset soon after (paho's DISCONNECT).
    FinThenRst,
    /// A reset in the middle of the stream.
    Rst,
}

/// One socket of the proxy, with its remote end.
#[derive(Debug, Default)]
struct Sock {
    // --- receive side: what its remote sends
    /// Bytes the remote will send, and how far it got.
    total: u64,
    sent: u64,
    fin_sent: bool,
    rst: bool,
    /// The error is reported once (by a read, or `take_error`).
    error_reported: bool,
    received: u64,
    /// skbs TCP queued and the verdict has not seen: `(offset, len)`, len 0 for a FIN.
    unverdicted: VecDeque<(u64, u64)>,
    /// Passed skbs the kernel deferred (its psock backlog), not yet readable.
    deferred: VecDeque<(u64, u64)>,
    /// Readable bytes: `(offset, len)`, partly read from `read_off`.
    rcvq: VecDeque<(u64, u64)>,
    /// Receive buffer: what TCP may queue (unread and unverdicted).
    rcvbuf: u64,
    /// The right edge of the window offered so far: TCP never takes it back, so a sender may
    /// fill the queue up to it even after the buffer was made smaller.
    right_edge: u64,
    // --- the program's counters for this socket
    redirected: u64,
    passed: u64,
    signaled_at: u64,
    entry: Option<proxy_common::PeerEntry>,
    // --- send side: towards its remote
    /// Redirected skbs from the other socket, not yet sent by the kernel's worker.
    redirect_q: VecDeque<(u64, u64)>,
    /// Bytes written into the socket (kernel and daemon) and not yet acknowledged.
    sendq: u64,
    acked: u64,
    /// Everything written into this socket, in order (checked against the pattern as it goes).
    written: u64,
    shut: bool,
    /// The remote stopped reading until this step.
    stalled_until: u64,
    interest: (bool, bool),
}

const SNDBUF: u64 = 48 * 1024;

struct Sim {
    rng: Rng,
    core: FlowCore,
    socks: [Sock; 2],
    endings: [Ending; 2],
    start: Instant,
    clock: Duration,
    timers: BinaryHeap<std::cmp::Reverse<(Duration, u64, Timer)>>,
    timer_seq: u64,
    pending: VecDeque<Event>,
    finished: Option<(CloseReason, [bool; 2])>,
    step_no: u64,
    preamble: u64,
    settling: bool,
    closes_counted: u32,
    /// TCP's counters as last given to the core.
    last: [SideCounters; 2],
    trace: VecDeque<String>,
    /// The broker echoes what it reads, as the integrity tests' broker does: it reads only while
    /// it can write back, so a direction the daemon does not read stops the other one.
    echo: bool,
    /// In a [`World`]: what the other flows reserved, set before each step (else a random figure).
    others_reserved: Option<u64>,
    /// Percent of readiness events (readable, writable) the kernel never delivers.
    lost_edges: u64,
    /// Reads and writes a progress check moved after a lost event.
    resumed: u64,
}

/// How many bytes an echoing broker reads ahead of what it wrote back.
const ECHO_BUF: u64 = 32 * 1024;

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let limits = random_limits(&mut rng);
        Sim::build(rng, limits, None)
    }

    /// A flow with `limits`; in a world of `world` flows (echoing brokers, sockets whose buffers
    /// were bounded at the splice or not), or alone (independent remotes) when `None`.
    fn build(mut rng: Rng, limits: Limits, world: Option<u64>) -> Sim {
        let preamble = if rng.chance(50) {
            0
        } else {
            1 + rng.below(100)
        };
        let flows = world.unwrap_or_else(|| 1 + rng.below(4));
        let hard_limit = grant(&limits, flows);
        let setup = FlowSetup {
            cookies: [11, 22],
            signal_at: hard_limit / 2,
            hard_limit,
            broker_preamble_len: preamble,
            idle_timeout: Duration::from_secs(600),
        };
        let start = Instant::now();
        let (core, actions) = FlowCore::new(limits, setup, start);
        let ending = |rng: &mut Rng| match rng.below(10) {
            0 => Ending::FinThenRst,
            1 => Ending::Rst,
            _ => Ending::Fin,
        };
        let endings = if world.is_some() {
            // Both FIN once done: an echo broker ends when the client's stream did.
            [Ending::Fin; 2]
        } else {
            [ending(&mut rng), ending(&mut rng)]
        };
        let mut socks: [Sock; 2] = Default::default();
        for (side, sock) in socks.iter_mut().enumerate() {
            // What autotuning had reached: up to many times the daemon's bound.
            sock.rcvbuf = 64 * 1024 + rng.below(4 * 1024 * 1024);
            sock.total = match rng.below(4) {
                0 => rng.below(64),
                1 => rng.below(16 * 1024),
                _ => rng.below(400 * 1024),
            };
            sock.entry = Some(proxy_common::PeerEntry {
                peer_cookie: setup.cookies[1 - side],
                direction: side as u32,
                throttled: throttle::OFF,
                signal_at: setup.signal_at,
                daemon_read: 0,
                hard_limit,
            });
        }
        if world.is_some() {
            // The broker echoes the client's stream.
            socks[BROKER].total = socks[CLIENT].total;
        }
        // The broker socket made the connect (its SYN) and took the PROXY header.
        socks[BROKER].acked = 1 + preamble;
        let mut sim = Sim {
            rng,
            core,
            socks,
            endings,
            start,
            clock: Duration::ZERO,
            timers: BinaryHeap::new(),
            timer_seq: 0,
            pending: VecDeque::from([Event::Registered]),
            finished: None,
            step_no: 0,
            preamble,
            settling: false,
            closes_counted: 0,
            last: [SideCounters::default(); 2],
            trace: VecDeque::new(),
            echo: world.is_some(),
            others_reserved: world.map(|_| 0),
            lost_edges: 0,
            resumed: 0,
        };
        sim.apply_all(actions);
        sim
    }

    fn log(&mut self, line: String) {
        if self.trace.len() == 4000 {
            self.trace.pop_front();
        }
        self.trace.push_back(line);
    }

    fn now(&self) -> Instant {
        self.start + self.clock
    }

    fn observe(&mut self, needs: [bool; 2]) -> Observed {
        let program = [0, 1].map(|s| (self.socks[s].redirected, self.socks[s].passed));
        // Bytes may arrive between the program's counters and TCP's.
        if self.rng.chance(10) {
            let d = self.rng.below(2) as usize;
            self.remote_send(d);
        }
        let last = self.last;
        let sides = [0, 1].map(|s| {
            let sock = &self.socks[s];
            if !needs[s] {
                // As the driver does: TCP's counters as last read.
                return SideCounters {
                    redirected: program[s].0,
                    passed: program[s].1,
                    ..last[s]
                };
            }
            SideCounters {
                redirected: program[s].0,
                passed: program[s].1,
                received: sock.received,
                acked: sock.acked,
                outq: sock.sendq,
                failed: false,
                broken: false,
            }
        });
        // Other flows hold bytes too, for a while.
        let others = match self.others_reserved {
            Some(held) => held,
            None if self.settling => 0,
            None => self.rng.below(64 * 1024),
        };
        let reserved_total = self.core.reserved() + others;
        self.last = sides;
        Observed {
            now: self.now(),
            sides,
            flows: 1,
            reserved_total,
        }
    }

    /// Hands one event to the core and carries out its actions, feeding results back.
    fn drive(&mut self, event: Event) -> Result<(), String> {
        let mut queue = VecDeque::from([event]);
        while let Some(event) = queue.pop_front() {
            if self.finished.is_some() {
                return Ok(());
            }
            {
                let shown = match &event {
                    Event::Read(side, ReadOutcome::Data(d)) => {
                        format!("Read({side}, {} bytes)", d.len())
                    }
                    e => format!("{e:?}"),
                };
                let c = [0, 1].map(|s| {
                    let k = &self.socks[s];
                    (k.received, k.redirected, k.passed, k.written, k.sendq)
                });
                self.log(format!(
                    "{:?} {shown}   rcv/redir/pass/written/sendq {c:?}",
                    self.clock
                ));
            }
            let needs = self.core.needs(&event);
            let obs = self.observe(needs);
            let actions = self.core.step(event, &obs);
            for action in actions {
                if let Some(next) = self.apply(action)? {
                    queue.push_back(next);
                }
            }
        }
        Ok(())
    }

    fn apply_all(&mut self, actions: Vec<Action>) {
        for action in actions {
            let _ = self.apply(action);
        }
    }

    fn apply(&mut self, action: Action) -> Result<Option<Event>, String> {
        self.log(format!("  -> {action:?}"));
        match action {
            Action::SetEntry(side, entry) => self.socks[side].entry = Some(entry),
            Action::Barrier(_) => {}
            Action::Interest(side, r, w) => {
                self.socks[side].interest = (r, w);
                // epoll_ctl(MOD) reports a readiness that is already there.
                let readable = r && self.readable(side);
                let writable = w && self.socks[side].sendq < SNDBUF;
                if readable || writable {
                    let e = self.socket_event(side, readable, writable);
                    self.pending.push_back(e);
                }
            }
            Action::Read(side, max) => {
                if max as u64 > self.core.limits.held_per_flow {
                    return Err(format!(
                        "a read of {max} bytes is over the per-flow bound {}",
                        self.core.limits.held_per_flow
                    ));
                }
                return Ok(Some(Event::Read(side, self.read(side, max))));
            }
            Action::Write(side) => {
                let data = self.core.held(side).to_vec();
                let outcome = self.write(side, &data, true)?;
                return Ok(Some(Event::Wrote(side, outcome)));
            }
            Action::ShutdownWrite(side) => {
                let from = 1 - side;
                let src = &self.socks[from];
                if !src.rst && (src.written_into(&self.socks[side]) != src.total || !src.fin_sent) {
                    return Err(format!(
                        "FIN passed into the {} before all bytes: {} of {} written, fin {}",
                        side_name(side),
                        self.socks[side].written,
                        src.total,
                        src.fin_sent
                    ));
                }
                self.socks[side].shut = true;
            }
            Action::Recheck(side) => return Ok(Some(Event::Signal(side))),
            Action::At(at, timer) => {
                self.timer_seq += 1;
                let at = at.duration_since(self.start);
                self.timers
                    .push(std::cmp::Reverse((at, self.timer_seq, timer)));
            }
            Action::Count(Count::Throttled | Count::HandedBack) => {}
            Action::Count(Count::Resumed) => self.resumed += 1,
            // How the flow ended: counted once.
            Action::Count(_) => self.closes_counted += 1,
            Action::Finish { reason, reset } => self.finished = Some((reason, reset)),
        }
        Ok(None)
    }

    fn socket_event(&mut self, side: usize, readable: bool, writable: bool) -> Event {
        let sock = &mut self.socks[side];
        let error = sock.rst && !sock.error_reported;
        if error {
            sock.error_reported = true;
        }
        Event::Socket {
            side,
            error,
            readable,
            writable,
            hangup: sock.fin_sent || sock.rst,
        }
    }

    fn readable(&self, side: usize) -> bool {
        let s = &self.socks[side];
        !s.rcvq.is_empty() || s.fin_sent || s.rst
    }

    fn read(&mut self, side: usize, max: usize) -> ReadOutcome {
        let s = &mut self.socks[side];
        let queued: u64 = s.rcvq.iter().map(|(_, l)| l).sum();
        if queued == 0 {
            if s.rst && !s.error_reported {
                s.error_reported = true;
                return ReadOutcome::Failed;
            }
            // The FIN is seen by TCP, whatever the deferred queue still holds.
            return if s.fin_sent || s.rst {
                ReadOutcome::Eof
            } else {
                ReadOutcome::WouldBlock
            };
        }
        let mut out = Vec::new();
        while let Some((off, len)) = s.rcvq.front_mut() {
            let room = max as u64 - out.len() as u64;
            if room == 0 {
                break;
            }
            let take = (*len).min(room);
            out.extend((*off..*off + take).map(|i| byte(side, i)));
            *off += take;
            *len -= take;
            if *len == 0 {
                s.rcvq.pop_front();
            }
        }
        ReadOutcome::Data(out)
    }

    /// Writes bytes of direction `from` into socket `1 - from`, checking them against the pattern.
    fn write(&mut self, from: usize, data: &[u8], daemon: bool) -> Result<WriteOutcome, String> {
        let to = 1 - from;
        let sock = &mut self.socks[to];
        if sock.shut {
            return Err(format!("write into the {} after its FIN", side_name(to)));
        }
        if sock.rst {
            return Ok(WriteOutcome::Failed);
        }
        let n = (SNDBUF.saturating_sub(sock.sendq)).min(data.len() as u64);
        if n == 0 {
            return Ok(WriteOutcome::WouldBlock);
        }
        let base = sock.written;
        for (k, b) in data[..n as usize].iter().enumerate() {
            let i = base + k as u64;
            if *b != byte(from, i) {
                return Err(format!(
                    "byte {i} of the {} direction written {} is {b}, expected {}",
                    side_name(from),
                    if daemon {
                        "by the daemon"
                    } else {
                        "by the kernel"
                    },
                    byte(from, i)
                ));
            }
        }
        sock.written += n;
        sock.sendq += n;
        Ok(WriteOutcome::Wrote(n as usize))
    }

    /// The remote of socket `d` sends its next segment, if the window lets it.
    fn remote_send(&mut self, d: usize) {
        let s = &mut self.socks[d];
        if s.rst || s.fin_sent {
            return;
        }
        if s.sent == s.total {
            return;
        }
        let queued: u64 = s
            .unverdicted
            .iter()
            .chain(&s.rcvq)
            .chain(&s.deferred)
            .map(|x| x.1)
            .sum();
        s.right_edge = s
            .right_edge
            .max(s.received + s.rcvbuf.saturating_sub(queued));
        let mut len = (1 + self.rng.below(16 * 1024)).min(s.total - s.sent);
        if self.echo && d == BROKER {
            // Only what it read can be echoed.
            len = len.min(s.broker_read(self.preamble) - s.sent);
            if len == 0 {
                return;
            }
        }
        if s.received + len > s.right_edge {
            return;
        }
        s.unverdicted.push_back((s.sent, len));
        s.sent += len;
        s.received += len;
    }

    fn remote_end(&mut self, d: usize) {
        let (ending, s) = (self.endings[d], &mut self.socks[d]);
        if s.rst {
            return;
        }
        match ending {
            Ending::Rst if s.sent >= s.total / 2 => self.reset(d),
            Ending::Fin | Ending::FinThenRst if s.sent == s.total && !s.fin_sent => {
                s.fin_sent = true;
                s.received += 1;
                s.unverdicted.push_back((s.sent, 0));
                let readable = s.interest.0;
                let e = self.socket_event(d, readable, false);
                self.pending.push_back(e);
            }
            Ending::FinThenRst if s.fin_sent => self.reset(d),
            _ => {}
        }
    }

    fn reset(&mut self, d: usize) {
        // TCP handles segments in order, and the verdict runs as each one's data arrives: by the
        // time a reset is processed, every byte before it has been through the verdict.
        while !self.socks[d].unverdicted.is_empty() {
            self.verdict(d);
        }
        let s = &mut self.socks[d];
        s.rst = true;
        // Its send queue is gone; what it received stays readable.
        s.redirect_q.clear();
        s.sendq = 0;
        let readable = s.interest.0;
        let e = self.socket_event(d, readable, false);
        // A FIN and a reset often come in one epoll event.
        if self.rng.chance(50)
            && let Some(Event::Socket { side, error, .. }) = self.pending.back_mut()
            && *side == d
        {
            *error |= matches!(e, Event::Socket { error: true, .. });
            return;
        }
        self.pending.push_back(e);
    }

    /// The verdict program on socket `d`'s next skb.
    fn verdict(&mut self, d: usize) {
        let Some((off, len)) = self.socks[d].unverdicted.pop_front() else {
            return;
        };
        if len == 0 {
            return;
        }
        let s = &mut self.socks[d];
        let entry = s.entry.expect("entries stay until the end");
        let unread = s.passed > entry.daemon_read;
        let over = s.redirected + len > entry.hard_limit;
        let pass = entry.throttled == throttle::ON || unread || over;
        if over && !unread && entry.throttled != throttle::ON {
            self.pending.push_back(Event::Signal(d));
        }
        let s = &mut self.socks[d];
        if pass {
            s.passed += len;
            // The kernel defers a passed skb when its backlog is busy, and keeps the order.
            if !s.deferred.is_empty() || self.rng.chance(30) {
                s.deferred.push_back((off, len));
            } else {
                s.rcvq.push_back((off, len));
                if s.interest.0 {
                    let e = self.socket_event(d, true, false);
                    self.pending.push_back(e);
                }
            }
            return;
        }
        s.redirected += len;
        if s.redirected >= entry.signal_at && s.signaled_at != entry.signal_at {
            s.signaled_at = entry.signal_at;
            self.pending.push_back(Event::Signal(d));
        }
        self.socks[1 - d].redirect_q.push_back((off, len));
    }

    fn undefer(&mut self, d: usize) {
        let s = &mut self.socks[d];
        if let Some(skb) = s.deferred.pop_front() {
            s.rcvq.push_back(skb);
            if s.interest.0 {
                let e = self.socket_event(d, true, false);
                self.pending.push_back(e);
            }
        }
    }

    /// The kernel's worker sends redirected bytes into socket `to`.
    fn kworker(&mut self, to: usize) -> Result<(), String> {
        let from = 1 - to;
        let Some((off, len)) = self.socks[to].redirect_q.front().copied() else {
            return Ok(());
        };
        let data: Vec<u8> = (off..off + len).map(|i| byte(from, i)).collect();
        match self.write(from, &data, false)? {
            WriteOutcome::Wrote(n) => {
                let n = n as u64;
                let q = self.socks[to].redirect_q.front_mut().expect("peeked");
                q.0 += n;
                q.1 -= n;
                if q.1 == 0 {
                    self.socks[to].redirect_q.pop_front();
                }
            }
            WriteOutcome::WouldBlock => {}
            WriteOutcome::Failed => self.socks[to].redirect_q.clear(),
        }
        Ok(())
    }

    /// The remote of socket `p` reads (and acknowledges) what was sent to it.
    fn remote_recv(&mut self, p: usize) {
        let s = &mut self.socks[p];
        if s.rst || s.stalled_until > self.step_no || s.sendq == 0 {
            return;
        }
        let mut k = (1 + self.rng.below(32 * 1024)).min(s.sendq);
        if self.echo && p == BROKER {
            // It reads only while it can write back: the echo it still owes is bounded.
            k = k.min((s.sent + ECHO_BUF).saturating_sub(s.broker_read(self.preamble)));
            if k == 0 {
                return;
            }
        }
        s.sendq -= k;
        s.acked += k;
        if s.interest.1 {
            let e = self.socket_event(p, false, true);
            self.pending.push_back(e);
        }
    }

    fn fire_timer(&mut self) -> Result<(), String> {
        if let Some(std::cmp::Reverse((at, _, timer))) = self.timers.pop() {
            self.clock = self.clock.max(at);
            self.drive(Event::Timer(timer))?;
        }
        Ok(())
    }

    /// One random move of the world (or of the core).
    fn random_step(&mut self, settle: bool) -> Result<(), String> {
        self.step_no += 1;
        let d = self.rng.below(2) as usize;
        match self.rng.below(12) {
            0 | 1 => self.remote_send(d),
            2 => self.remote_end(d),
            3 | 4 => self.verdict(d),
            5 => self.undefer(d),
            6 => self.kworker(d)?,
            7 => self.remote_recv(d),
            8 if !settle && self.rng.chance(5) => {
                self.socks[d].stalled_until = self.step_no + self.rng.below(3000);
            }
            8 if self.rng.chance(3) => self.drive(Event::Throttle(d))?,
            9 | 10 => {
                if let Some(e) = self.pending.pop_front() {
                    let readiness = matches!(
                        e,
                        Event::Socket {
                            error: false,
                            hangup: false,
                            ..
                        }
                    );
                    if !(readiness && self.rng.chance(self.lost_edges)) {
                        self.drive(e)?;
                    }
                }
            }
            _ => {
                self.clock += Duration::from_micros(self.rng.below(3000));
                let due = self
                    .timers
                    .peek()
                    .is_some_and(|std::cmp::Reverse((at, _, _))| *at <= self.clock);
                if due {
                    self.fire_timer()?;
                }
            }
        }
        Ok(())
    }

    fn run(&mut self) -> Result<(), String> {
        for _ in 0..20_000 {
            if self.finished.is_some() {
                break;
            }
            self.random_step(false)?;
        }
        // Settle: everyone sends, reads and ends; time moves on.
        for d in [0, 1] {
            self.socks[d].stalled_until = 0;
        }
        self.settling = true;
        let mut steps = 0;
        while self.finished.is_none() && steps < 2_000_000 {
            steps += 1;
            self.random_step(true)?;
            if steps % 64 == 0 {
                self.tick()?;
            }
        }
        let Some((reason, reset)) = self.finished else {
            return Err(format!(
                "the flow did not end: core {:#?}, clock {:?}",
                self.core, self.clock
            ));
        };
        self.check_end(reason, reset)
    }

    /// Time passes at a steady pace while settling: a timeout shows as many steps.
    fn tick(&mut self) -> Result<(), String> {
        self.clock += Duration::from_millis(5);
        while self
            .timers
            .peek()
            .is_some_and(|std::cmp::Reverse((at, _, _))| *at <= self.clock)
        {
            self.fire_timer()?;
        }
        Ok(())
    }

    fn check_end(&self, reason: CloseReason, reset: [bool; 2]) -> Result<(), String> {
        if self.closes_counted != 1 {
            return Err(format!("the end was counted {} times", self.closes_counted));
        }
        for d in [0, 1] {
            let (src, dst) = (&self.socks[d], &self.socks[1 - d]);
            let delivered = src.written_into(dst);
            // Every byte that reached the proxy reached the other side, reset or not, unless
            // that side's remote was gone or the flow was torn down.
            if !dst.rst && !reset[1 - d] && delivered != src.sent {
                return Err(format!(
                    "{reason:?}: the {} sent {} bytes, {delivered} reached the {}",
                    side_name(d),
                    src.sent,
                    side_name(1 - d)
                ));
            }
        }
        if reason == CloseReason::DrainTimeout || reason == CloseReason::Idle {
            return Err(format!(
                "{reason:?} although every remote kept reading (preamble {})",
                self.preamble
            ));
        }
        Ok(())
    }
}

impl Sock {
    /// Bytes the broker's remote read of what was written into this (broker) socket: the
    /// acknowledged bytes, less its SYN and the PROXY header.
    fn broker_read(&self, preamble: u64) -> u64 {
        self.acked.saturating_sub(1 + preamble)
    }

    /// Bytes of this socket's direction written into `peer` (the sim checks each against the
    /// pattern as it is written, so a count is enough).
    fn written_into(&self, peer: &Sock) -> u64 {
        peer.written
    }
}

/// A schedule in which a kernel loses `lost_edges` percent of readiness events.
fn run_seed_losing_edges(seed: u64, lost_edges: u64) -> Result<u64, String> {
    let mut sim = Sim::new(seed);
    sim.lost_edges = lost_edges;
    sim.run()
        .map_err(|e| describe(&sim, &format!("seed {seed}: {e}")))?;
    Ok(sim.resumed)
}

fn run_seed(seed: u64) -> Result<(), String> {
    let mut sim = Sim::new(seed);
    sim.run()
        .map_err(|e| describe(&sim, &format!("seed {seed}: {e}")))
}

/// A failure with the flow's state and its last steps (all of them in `MQS_SIM_TRACE`).
fn describe(sim: &Sim, e: &str) -> String {
    {
        if let Some(path) = std::env::var_os("MQS_SIM_TRACE") {
            let _ = std::fs::write(path, Vec::from(sim.trace.clone()).join("\n"));
        }
        let tail: Vec<_> = sim.trace.iter().rev().take(60).rev().cloned().collect();
        format!(
            "{e}\nendings {:?} pending {} steps {}\nsockets {:?}\nlast steps:\n{}",
            sim.endings,
            sim.pending.len(),
            sim.step_no,
            sim.socks
                .iter()
                .map(|s| (
                    s.total,
                    s.sent,
                    s.fin_sent,
                    s.rst,
                    s.unverdicted.len(),
                    s.deferred.len(),
                    s.rcvq.len(),
                    s.rcvbuf,
                    s.redirect_q.len()
                ))
                .collect::<Vec<_>>(),
            tail.join("\n")
        )
    }
}

/// Several flows on one daemon: they share `max_daemon_held_total`, and their brokers echo
/// (a broker reads only while it can write back), so a direction the daemon does not read stops
/// the other direction of its flow. With buffers bigger than the bound allows, or bounded at the
/// splice. Every flow must end with every byte delivered once, in order (whatever the others
/// hold, a flow whose peers take bytes makes progress), and the bytes held over all flows must
/// stay within the total (beyond it only for a lone flow whose one read is bigger than the total).
struct World {
    flows: Vec<Sim>,
    limits: Limits,
    seed: u64,
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng(seed);
        let limits = random_limits(&mut rng);
        let n = 2 + rng.below(5);
        let flows = (0..n)
            .map(|_| Sim::build(Rng(rng.next()), limits, Some(n)))
            .collect();
        World {
            flows,
            limits,
            seed,
        }
    }

    /// Tells flow `i` what the others reserved, as the driver's sum does.
    fn share(&mut self, i: usize) {
        let others = (self.flows.iter().enumerate())
            .filter(|&(k, _)| k != i)
            .map(|(_, f)| f.core.reserved())
            .sum();
        self.flows[i].others_reserved = Some(others);
    }

    fn check_bound(&self) -> Result<(), String> {
        let held: Vec<u64> = self.flows.iter().map(|f| f.core.held_bytes()).collect();
        let reserved: Vec<u64> = self.flows.iter().map(|f| f.core.reserved()).collect();
        let over = |v: &[u64]| {
            v.iter().sum::<u64>() > self.limits.held_total
                && v.iter().filter(|&&h| h > 0).count() > 1
        };
        if over(&held) || over(&reserved) || held.iter().zip(&reserved).any(|(h, r)| h > r) {
            return Err(format!(
                "the flows hold {held:?} and reserved {reserved:?}, over the total of {}",
                self.limits.held_total
            ));
        }
        Ok(())
    }

    fn step(&mut self, i: usize, settle: bool) -> Result<(), String> {
        self.share(i);
        self.flows[i].random_step(settle)?;
        self.check_bound()
    }

    fn fail(&self, i: usize, e: &str) -> String {
        let held: Vec<u64> = self.flows.iter().map(|f| f.core.held_bytes()).collect();
        describe(
            &self.flows[i],
            &format!(
                "world seed {} ({} flows, {:?}, held {held:?}), flow {i}: {e}",
                self.seed,
                self.flows.len(),
                self.limits
            ),
        )
    }

    fn run(&mut self) -> Result<(), String> {
        let n = self.flows.len();
        let mut rng = Rng(self.seed ^ 0x5eed);
        let live = |w: &World| -> Vec<usize> {
            (0..n).filter(|&k| w.flows[k].finished.is_none()).collect()
        };
        for _ in 0..20_000 * n {
            let open = live(self);
            let Some(&i) = open.get(rng.below(open.len() as u64) as usize) else {
                break;
            };
            self.step(i, false).map_err(|e| self.fail(i, &e))?;
        }
        for f in &mut self.flows {
            for d in [0, 1] {
                f.socks[d].stalled_until = 0;
            }
            f.settling = true;
        }
        let mut steps = 0u64;
        while steps < 1_000_000 * n as u64 {
            let open = live(self);
            let Some(&i) = open.get(rng.below(open.len() as u64) as usize) else {
                break;
            };
            steps += 1;
            self.step(i, true).map_err(|e| self.fail(i, &e))?;
            if steps.is_multiple_of(64) {
                for k in live(self) {
                    self.share(k);
                    self.flows[k].tick().map_err(|e| self.fail(k, &e))?;
                    self.check_bound().map_err(|e| self.fail(k, &e))?;
                }
            }
        }
        for (i, f) in self.flows.iter().enumerate() {
            let Some((reason, reset)) = f.finished else {
                return Err(self.fail(
                    i,
                    &format!(
                        "the flow did not end: core {:#?}, clock {:?}",
                        f.core, f.clock
                    ),
                ));
            };
            f.check_end(reason, reset).map_err(|e| self.fail(i, &e))?;
        }
        Ok(())
    }
}

/// The seeds a test runs: `MQS_SIM_CASES` (scaled by `share`, default `default`) from
/// `MQS_SIM_SEED` (default 1).
fn seeds(default: u64, share: u64) -> std::ops::Range<u64> {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let cases = env("MQS_SIM_CASES").map_or(default, |c| c.div_ceil(share));
    let first = env("MQS_SIM_SEED").unwrap_or(1);
    first..first + cases
}

#[test]
fn generated_schedules_deliver_every_byte_once_in_order() {
    for seed in seeds(2000, 1) {
        if let Err(e) = run_seed(seed) {
            panic!("{e}");
        }
    }
}

#[test]
fn flows_sharing_the_held_bound_with_echoing_brokers_all_finish() {
    for seed in seeds(300, 4) {
        if let Err(e) = World::new(seed).run() {
            panic!("{e}");
        }
    }
}

#[test]
fn a_copy_whose_wake_ups_are_lost_moves_on_at_its_progress_checks() {
    let seeds = seeds(500, 4);
    let cases = seeds.end - seeds.start;
    let mut resumed = 0;
    for seed in seeds {
        match run_seed_losing_edges(seed, 100) {
            Ok(n) => resumed += n,
            Err(e) => panic!("{e}"),
        }
    }
    // Only timers, signals and hang-ups drive the copies: without the checks, flows end by drain
    // timeout (or not at all); with them, every byte still arrives once, in order, and some
    // check did find bytes to move.
    assert!(
        resumed > 0,
        "no progress check moved anything in {cases} schedules"
    );
}
