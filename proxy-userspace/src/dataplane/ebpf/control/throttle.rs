//! Backpressure: measuring a direction's bytes in flight, moving its limits, throttling it, and
//! handing it back to the kernel.

use super::{Action, BACKOFF_MAX, BACKOFF_START, Count, FlowCore, Limits, Stage, Throttle, Timer};
use proxy_common::throttle;
use std::time::Duration;

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
/// How often a copying direction is checked for progress ([`FlowCore::check_progress`]).
pub const PROGRESS_CHECK: Duration = Duration::from_secs(1);

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

/// Over `max_inflight_total`: the directions to throttle, the biggest first, until what they hold
/// brings the total down to half the limit (not just under it: the directions left running keep
/// adding until their next signal, and the throttled ones hold theirs until the kernel sent it).
/// `candidates` are `(bytes in flight, key)`.
pub fn pick_to_throttle<K: Ord + Copy>(
    mut candidates: Vec<(u64, K)>,
    total: u64,
    limit: u64,
) -> Vec<K> {
    if total <= limit {
        return Vec::new();
    }
    candidates.sort_unstable_by(|a, b| b.cmp(a));
    let mut excess = total - limit / 2;
    let mut picked = Vec::new();
    for (inflight, key) in candidates {
        if excess == 0 {
            break;
        }
        picked.push(key);
        excess = excess.saturating_sub(inflight);
    }
    picked
}

impl FlowCore {
    /// Measures the bytes of direction `side` the kernel holds for the peer, and throttles the
    /// direction or moves its next signal point.
    pub(super) fn check_inflight(&mut self, side: usize) {
        let way = &self.ways[side];
        let c = self.obs.sides[side];
        if way.throttle.is_none() && c.passed > way.entry.daemon_read {
            // A skb slipped into the socket around a hand-back (or before a FIN or a reset): only
            // the daemon can move it, whatever stage the direction is in.
            if way.stage != Stage::Closed {
                return self.throttle(side);
            }
        }
        // A throttled direction waiting for the kernel's queue to empty is checked whatever else
        // happened; any other direction only while it is open.
        if way.throttle.is_none() && (way.stage != Stage::Open || self.reset.is_some()) {
            return;
        }
        let inflight = self.measured_inflight(side);
        let limits = self.limits;
        let now = self.obs.now;
        let flows = self.obs.flows;
        let way = &mut self.ways[side];
        way.inflight = inflight;

        if let Some(throttle) = &mut way.throttle {
            if !throttle.copying {
                if inflight == 0 {
                    // The kernel's queue towards the peer is empty: the daemon may write now
                    // without overtaking anything.
                    tracing::trace!(side, redirected = c.redirected, "throttled: copying");
                    throttle.copying = true;
                    self.set_interest(side, Some(true), None);
                    self.schedule_progress(side);
                    self.pump(side);
                } else {
                    self.schedule_poll(side);
                }
            }
            return;
        }
        if inflight > limits.per_flow {
            // A peer that lags for a moment (its socket buffer full, the kernel's sender thread
            // not yet scheduled) drains within milliseconds; one that stopped reading does not.
            // Throttle when the excess lasts, or at once when it is far over.
            let since = *way.over_since.get_or_insert(now);
            if inflight > OVER_LIMIT_FACTOR * limits.per_flow
                || now.duration_since(since) >= OVER_LIMIT_GRACE
            {
                way.over_since = None;
                return self.throttle(side);
            }
            way.poll_backoff = BACKOFF_START;
            return self.schedule_poll(side);
        }
        way.over_since = None;
        // The hard limit: what the kernel may hold for this direction beyond what the peer has
        // taken, an equal share of the total.
        let grant = grant(&limits, flows);
        let delivered = c.redirected - inflight;
        let hard_limit = delivered + grant;
        // Signal halfway there, so a peer that keeps up gets its limit moved before reaching it;
        // at least a burst's worth ahead, or the watcher would wake for ordinary bursts.
        let step = (limits.per_flow / 2).min(grant / 2);
        let signal_at = (delivered + step).max(c.redirected + MIN_SIGNAL_STEP.min(step));
        if signal_at != way.entry.signal_at || hard_limit != way.entry.hard_limit {
            way.entry.signal_at = signal_at;
            way.entry.hard_limit = hard_limit;
            let entry = way.entry;
            self.out.push(Action::SetEntry(side, entry));
        }
        if inflight > 0 {
            self.schedule_poll(side);
        } else {
            self.ways[side].poll_backoff = BACKOFF_START;
        }
    }

    pub(super) fn schedule_poll(&mut self, side: usize) {
        let way = &mut self.ways[side];
        if way.poll_pending {
            return;
        }
        way.poll_pending = true;
        let wait = way.poll_backoff;
        way.poll_backoff = (wait * 2).min(BACKOFF_MAX);
        self.at(wait, Timer::Inflight(side));
    }

    /// Stops redirecting direction `side`: its skbs go to its own socket, whose window closes
    /// when its receive buffer is full; the daemon reads it in bounded reads.
    pub(super) fn throttle(&mut self, side: usize) {
        let way = &mut self.ways[side];
        if way.throttle.is_some() || way.stage == Stage::Closed {
            return;
        }
        way.entry.throttled = throttle::ON;
        let entry = way.entry;
        way.throttle = Some(Throttle::default());
        way.poll_backoff = BACKOFF_START;
        tracing::debug!(
            side = super::side_name(side),
            inflight = way.inflight,
            "direction throttled"
        );
        self.out.extend([
            Action::SetEntry(side, entry),
            // A barrier: setting a socket option takes the socket's lock, which every verdict on
            // it runs under; once it returns, no verdict that read the old entry is still
            // counting, so the counters measured next are final.
            Action::Barrier(side),
            Action::Count(Count::Throttled),
            Action::Recheck(side),
        ]);
    }

    /// A copying direction that moved nothing since the last check is pumped again, whatever
    /// readiness said. The copy waits on edge-triggered readiness, and a wait that no edge ends
    /// would hold the flow until both its ends gave up: should a read or write then move bytes,
    /// an edge was lost, and it is counted and logged; an idle direction costs one read a check.
    pub(super) fn check_progress(&mut self, side: usize) {
        if self.reset.is_some() {
            return;
        }
        let c = self.obs.sides[side];
        let interest = self.interest;
        let way = &mut self.ways[side];
        let mark = way.daemon_read + way.daemon_written;
        let daemon_read = way.daemon_read;
        let Some(t) = way.throttle.as_mut().filter(|t| t.copying) else {
            return;
        };
        let idle = mark == t.progress_mark && !t.io_pending && !t.timer_pending;
        t.progress_mark = mark;
        if idle {
            tracing::debug!(
                side,
                received = c.received,
                redirected = c.redirected,
                passed = c.passed,
                daemon_read,
                held = t.held_len(),
                peer_blocked = t.peer_blocked,
                ?interest,
                "copying direction moved nothing since the last check: pumping again"
            );
            t.kicked = true;
            self.pump(side);
            if let Some(t) = &mut self.ways[side].throttle
                && !t.io_pending
            {
                t.kicked = false;
            }
        }
        if self.ways[side].throttle.is_some() && !self.finished {
            self.schedule_progress(side);
        }
    }

    /// Sets direction `side`'s progress check unless one is set: a direction handed back and
    /// throttled again within the second keeps one timer, not one per throttle.
    fn schedule_progress(&mut self, side: usize) {
        if !std::mem::replace(&mut self.ways[side].progress_pending, true) {
            self.at(PROGRESS_CHECK, Timer::Progress(side));
        }
    }

    /// Everything the source held has been written into the peer, which took it without
    /// blocking: offer the direction back to the kernel. If the peer is still slow, a later check
    /// throttles it again; that costs a few syscalls, where keeping a fast flow in userspace
    /// costs a copy.
    pub(super) fn try_return(&mut self, side: usize) {
        if self.reset.is_some() || self.ways[side].stage != Stage::Open {
            return;
        }
        let c = self.obs.sides[side];
        let way = &mut self.ways[side];
        let Some(throttle) = way.throttle.as_ref() else {
            return;
        };
        // Safe to hand back once the daemon has read every byte the program passed (and, nothing
        // being held, written it into the peer): a passed skb is counted at its verdict, so one
        // the kernel deferred is still counted as unread. Bytes TCP holds that no verdict has
        // seen yet need no wait: they meet the entry written below, and are redirected behind
        // what the daemon wrote, or passed (and then, being unread, keep the program passing).
        // Waiting for them as well, as the core did before, kept a saturated stream in the
        // daemon: its sender never leaves TCP's queue empty.
        if c.passed != way.daemon_read || throttle.held_len() != 0 {
            return;
        }
        // RETURNING with every passed byte counted as read: the program redirects from now on,
        // unless a skb was passed after the counters were read, which it then keeps passing.
        way.entry.throttled = throttle::RETURNING;
        way.entry.daemon_read = c.passed;
        // Nothing is in flight now (the daemon wrote only once the kernel's queue was empty, and
        // nothing was redirected since): the direction gets its full share at once. With only
        // `MIN_GRANT` a stream at full speed crossed it before the check that follows, and the
        // program throttled it again by itself: the daemon ended up copying half a bulk flow.
        let grant = grant(&self.limits, self.obs.flows);
        let step = (self.limits.per_flow / 2).min(grant / 2);
        way.entry.hard_limit = c.redirected + grant;
        way.entry.signal_at = c.redirected + step.max(MIN_SIGNAL_STEP.min(step));
        let entry = way.entry;
        // Handed back at once: the daemon reads nothing more of this socket, since a read now
        // could overtake bytes the program redirects. Should a skb have slipped into the socket
        // meanwhile, the next check sees it passed and throttles afresh.
        way.throttle = None;
        way.poll_backoff = BACKOFF_START;
        tracing::debug!(
            side = super::side_name(side),
            "throttled direction handed back to the kernel"
        );
        self.out.push(Action::SetEntry(side, entry));
        self.out.push(Action::Count(Count::HandedBack));
        self.set_interest(side, Some(false), None);
        self.set_interest(1 - side, None, Some(false));
        self.out.push(Action::Recheck(side));
        self.schedule_poll(side);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_flow: u64, total: u64) -> Limits {
        Limits {
            per_flow,
            total,
            close_drain_timeout: Duration::from_secs(30),
            held_per_flow: 256 << 10,
            held_total: 64 << 20,
        }
    }

    #[test]
    fn grant_is_a_share_within_bounds() {
        let l = limits(1 << 20, 256 << 20);
        // (flows, grant)
        let table = [
            (0, 8 << 20),
            (1, 8 << 20),
            (16, 8 << 20),
            (128, 1 << 20),
            (1 << 20, MIN_GRANT),
        ];
        for (flows, want) in table {
            assert_eq!(grant(&l, flows), want, "flows {flows}");
        }
    }

    #[test]
    fn the_biggest_are_throttled_down_to_half_the_limit() {
        let c = vec![(10, 'a'), (50, 'b'), (30, 'c'), (5, 'd')];
        assert_eq!(pick_to_throttle(c.clone(), 95, 100), Vec::<char>::new());
        // Excess over half of 80: 95 - 40 = 55, so b (50) then c.
        assert_eq!(pick_to_throttle(c.clone(), 95, 80), vec!['b', 'c']);
        assert_eq!(pick_to_throttle(c, 95, 0), vec!['b', 'c', 'a', 'd']);
    }
}
