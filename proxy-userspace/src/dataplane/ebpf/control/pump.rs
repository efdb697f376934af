//! Moving a throttled direction's bytes: whole-queue reads within the held-bytes bounds, writes
//! into the peer, and the end of the stream.

use super::{
    Action, BACKOFF_MAX, BACKOFF_START, FlowCore, Limits, ReadOutcome, Stage, Timer, WriteOutcome,
};

/// Room for skbs that reach a clamped socket beyond its receive buffer: TCP accepts one more
/// segment over it (up to 64 KiB on loopback or with GRO).
pub const SKB_SLACK: u64 = 64 * 1024;

/// What the receive buffer of a throttled socket is clamped to (the `SO_RCVBUF` value; the kernel
/// doubles it), so that its whole queue, plus one segment, fits `held_per_flow`.
pub fn clamped_rcvbuf(held_per_flow: u64) -> u64 {
    (held_per_flow.saturating_sub(SKB_SLACK) / 2).max(4096)
}

/// How much one read of a throttled socket may take, or `None` to wait for room.
///
/// A read must take the socket's whole queue: a read that stops inside one of the kernel's queued
/// messages replayed bytes on 6.18 (the cause is under investigation), so reads never depend on
/// stopping early. The queue is what TCP received and neither the program redirected nor the
/// daemon read (`unread`, a FIN included), plus what arrives before the read: once the clamp
/// holds, the whole queue fits `held_per_flow`; until then (`window_left`: what the window offered
/// before the clamp may still bring) it may grow by that much and one clamped buffer more.
///
/// The daemon may hold all of a read if the peer takes nothing, so a read bigger than the
/// per-flow bound is made when the total has room for it, or when nothing else is held (so one
/// flow cannot wait forever; the total is then exceeded by that one read).
pub fn read_size(limits: &Limits, unread: u64, window_left: u64, held_total: u64) -> Option<usize> {
    let arriving = if window_left > 0 {
        window_left + limits.held_per_flow
    } else {
        SKB_SLACK
    };
    let size = limits.held_per_flow.max(unread + arriving);
    let room = limits.held_total.saturating_sub(held_total);
    (size <= room || held_total == 0).then(|| usize::try_from(size).unwrap_or(usize::MAX))
}

impl FlowCore {
    /// Moves the bytes of throttled direction `side` from its socket into the peer: asks for the
    /// next write of what it holds, or the next read. The outcome comes back as an event and
    /// continues from there, until a side would block (the next readiness edge calls again).
    pub(super) fn pump(&mut self, side: usize) {
        if self.reset.is_some_and(|(reset, _)| reset != side) {
            // The peer was reset: nothing can be delivered into it any more.
            return;
        }
        let c = self.obs.sides[side];
        let daemon_read = self.ways[side].daemon_read;
        let limits = self.limits;
        let held_total = self.obs.held_total;
        let Some(t) = self.ways[side].throttle.as_mut().filter(|t| t.copying) else {
            return;
        };
        if t.io_pending {
            return;
        }
        if t.held_len() > 0 {
            t.io_pending = true;
            return self.out.push(Action::Write(side));
        }
        if t.eof {
            return self.finished(side);
        }
        let unread = c.received.saturating_sub(c.redirected + daemon_read);
        // After a reset nothing more arrives.
        let window_left = if self.reset.is_some_and(|(s, _)| s == side) {
            0
        } else {
            t.rcvbuf_before
                .saturating_sub(c.received - t.received_at_clamp.min(c.received))
        };
        match read_size(&limits, unread, window_left, held_total) {
            Some(max) => {
                t.room_backoff = None;
                t.io_pending = true;
                self.out.push(Action::Read(side, max));
            }
            None if t.timer_pending => {}
            None => {
                let wait = t
                    .room_backoff
                    .map_or(BACKOFF_START, |b| (b * 2).min(BACKOFF_MAX));
                t.room_backoff = Some(wait);
                t.timer_pending = true;
                tracing::trace!(side, unread, held_total, "no room to read; waiting");
                self.at(wait, Timer::Pump(side));
            }
        }
    }

    pub(super) fn on_read(&mut self, side: usize, outcome: ReadOutcome) {
        let peer = 1 - side;
        let c = self.obs.sides[side];
        let now = self.obs.now;
        let timeout = self.limits.close_drain_timeout;
        let way = &mut self.ways[side];
        let Some(t) = way.throttle.as_mut() else {
            return;
        };
        t.io_pending = false;
        match outcome {
            ReadOutcome::Data(bytes) => {
                way.daemon_read += bytes.len() as u64;
                // Straight into the peer; what it does not take is held.
                t.held = bytes;
                t.start = 0;
                self.pump(side);
            }
            // A read of 0 says the FIN is next in the socket's *message* queue; a passed skb the
            // kernel deferred (its own queue was busy) may still be on its way there. TCP's count
            // decides: everything before the FIN must have been redirected or read.
            ReadOutcome::Eof
                if c.received.saturating_sub(1) > c.redirected + way.daemon_read
                    && now.duration_since(*t.early_fin_since.get_or_insert(now)) < timeout =>
            {
                // Look again shortly: the deferred skb's arrival may not raise another edge.
                if !t.timer_pending {
                    t.timer_pending = true;
                    self.at(BACKOFF_START, Timer::Pump(side));
                }
            }
            ReadOutcome::Eof => {
                t.eof = true;
                self.pump(side);
            }
            ReadOutcome::WouldBlock => {
                let blocked = t.peer_blocked;
                self.set_interest(peer, None, Some(blocked));
                if !blocked {
                    self.try_return(side);
                }
            }
            ReadOutcome::Failed => {
                // A reset: everything readable has been read.
                t.eof = true;
                self.on_reset(side);
            }
        }
    }

    pub(super) fn on_wrote(&mut self, side: usize, outcome: WriteOutcome) {
        let peer = 1 - side;
        let way = &mut self.ways[side];
        let Some(t) = way.throttle.as_mut() else {
            return;
        };
        t.io_pending = false;
        match outcome {
            WriteOutcome::Wrote(n) => {
                t.start += n;
                way.daemon_written += n as u64;
                if t.start >= t.held.len() {
                    // Gives the memory back at once.
                    t.held = Vec::new();
                    t.start = 0;
                }
                t.peer_blocked = false;
                self.pump(side);
            }
            WriteOutcome::WouldBlock => {
                t.peer_blocked = true;
                self.set_interest(peer, None, Some(true));
            }
            WriteOutcome::Failed => self.on_reset(peer),
        }
    }

    /// Throttled direction `side` read its end and wrote everything into the peer.
    fn finished(&mut self, side: usize) {
        if self.reset.is_some() {
            // The reset drain decides when to close (once the peer acknowledged everything).
            return self.try_reset_drain();
        }
        if self.ways[side].stage == Stage::Closed {
            return;
        }
        self.out.push(Action::ShutdownWrite(1 - side));
        self.ways[side].stage = Stage::Closed;
        self.first_fin.get_or_insert(super::closed_reason(side));
        self.side_ended();
        self.close_if_done();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn reads_take_the_whole_queue_within_the_bounds() {
        let limits = Limits {
            per_flow: 1 << 20,
            total: 256 << 20,
            close_drain_timeout: Duration::from_secs(30),
            held_per_flow: 256 << 10,
            held_total: 1 << 20,
        };
        // (unread, window left from before the clamp, held by all flows, read size)
        let table = [
            // A clamped queue: the per-flow bound.
            (0, 0, 0, Some(256 << 10)),
            (100 << 10, 0, 512 << 10, Some(256 << 10)),
            // The total has no room for another per-flow read: wait.
            (0, 0, (1 << 20) - 1000, None),
            // A queue that filled before the clamp: all of it, if the total has room.
            (512 << 10, 0, 0, Some((512 << 10) + SKB_SLACK)),
            (512 << 10, 0, 512 << 10, None),
            // The old window still open: what it may bring, and a clamped buffer more.
            (
                100 << 10,
                200 << 10,
                0,
                Some((100 << 10) + (200 << 10) + (256 << 10)),
            ),
            // Bigger than the total, and nothing else held: read anyway.
            (4 << 20, 0, 0, Some((4 << 20) + SKB_SLACK)),
        ];
        for (unread, window_left, held, want) in table {
            assert_eq!(
                read_size(&limits, unread, window_left, held),
                want.map(|w: u64| w as usize),
                "unread {unread} held {held}"
            );
        }
    }

    #[test]
    fn a_clamped_queue_fits_the_per_flow_bound() {
        for bound in [128 << 10, 256 << 10, 1 << 20] {
            assert!(2 * clamped_rcvbuf(bound) + SKB_SLACK <= bound);
        }
    }
}
