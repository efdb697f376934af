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

/// The receive buffer a socket gets when it is spliced (the `SO_RCVBUF` value): the clamp's, from
/// the start.
///
/// A throttled socket is read in whole-queue reads, and TCP does not take back a window it
/// offered: with the buffer autotuned (to `tcp_rmem`'s maximum, 32 MiB on the test machines) the
/// first read after a throttle had to be sized for tens of MiB, so the per-flow bound meant
/// nothing, a few such reads filled `max_daemon_held_total`, and the reservations that keep flows
/// from wedging ([`admit`]) left one flow at a time to move. Bounded from the start, the window
/// never offers more than the clamped queue, and every read is a clamped queue's. The cost: a
/// spliced direction's window is about `max_daemon_held_per_flow`, which caps it at about that
/// much per round trip (plenty on a LAN; raise the bound for long fat links).
pub fn spliced_rcvbuf(limits: &Limits) -> u64 {
    clamped_rcvbuf(limits.held_per_flow)
}

/// What the receive buffer of a clamped socket is, as the kernel keeps it (twice the value set).
pub fn clamped_buffer(held_per_flow: u64) -> u64 {
    2 * clamped_rcvbuf(held_per_flow)
}

/// How much one read of a throttled socket must be able to take.
///
/// A read must take the socket's whole queue: a read that stops inside one of the kernel's queued
/// messages replayed bytes on 6.18 (the cause is under investigation), so reads never depend on
/// stopping early. The queue is what TCP received and neither the program redirected nor the
/// daemon read (`unread`, a FIN included), plus what arrives before the read: once the clamp
/// holds, the whole queue fits `held_per_flow`; until then (`window_left`: what a window offered
/// before the clamp, bigger than the clamped buffer, may still bring) it may grow by that much
/// and one clamped buffer more.
pub fn read_size(limits: &Limits, unread: u64, window_left: u64) -> u64 {
    let arriving = if window_left > 0 {
        window_left + limits.held_per_flow
    } else {
        SKB_SLACK
    };
    limits.held_per_flow.max(unread + arriving)
}

/// Whether a flow may read now: the read and what the flow may need next reserve `need` bytes of
/// `max_daemon_held_total`; the flow has `have` reserved, the other flows `others`.
///
/// The reservation is what keeps the total from wedging flows. A flow holds bytes for a peer that
/// may take them only once the flow's *other* direction has moved (an echoing broker stops
/// reading while it cannot write back; so may a client). Were that direction's read to wait for
/// room in the total, and every flow that holds room to be in the same state, nothing would ever
/// free any. So a flow that holds bytes keeps room for the next read of both its directions,
/// taken when it starts holding (while it holds nothing, waiting blocks no one): the reads of a
/// flow holding bytes come out of its own reservation and never wait for other flows. Reservations
/// over all flows stay within the total, and so do the bytes held; beyond it only for a flow alone
/// (`others == 0`) whose reads are bigger than the whole total, or it could never move.
pub fn admit(limits: &Limits, need: u64, have: u64, others: u64) -> bool {
    need <= have || others + need <= limits.held_total || others == 0
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
        let size = self.next_read(side);
        // Room for this read, and for the other direction's next one (see `admit`).
        let need = size + self.claim(1 - side);
        let have = self.reserved();
        let others = self.obs.reserved_total.saturating_sub(have);
        let admitted = admit(&self.limits, need, have, others);
        if admitted {
            self.reserve = if have > 0 { have.max(need) } else { need };
        }
        let Some(t) = self.ways[side].throttle.as_mut() else {
            return;
        };
        if admitted {
            t.room_backoff = None;
            t.io_pending = true;
            let max = usize::try_from(size).unwrap_or(usize::MAX);
            self.out.push(Action::Read(side, max));
        } else if !t.timer_pending {
            // Polled: room comes back as other flows' peers take what those flows hold.
            let wait = t
                .room_backoff
                .map_or(BACKOFF_START, |b| (b * 2).min(BACKOFF_MAX));
            t.room_backoff = Some(wait);
            t.timer_pending = true;
            tracing::trace!(side, need, have, others, "no room to read; waiting");
            self.at(wait, Timer::Pump(side));
        }
    }

    /// The size direction `side`'s next read needs, were it made now (0 if it reads no more).
    fn next_read(&self, side: usize) -> u64 {
        let way = &self.ways[side];
        let c = self.obs.sides[side];
        let into_reset = self.reset.is_some_and(|(reset, _)| reset != side);
        let done = way
            .throttle
            .as_ref()
            .map_or(way.stage == Stage::Closed, |t| t.eof);
        if into_reset || done {
            return 0;
        }
        let unread = c.received.saturating_sub(c.redirected + way.daemon_read);
        let bound = clamped_buffer(self.limits.held_per_flow);
        // After a reset nothing more arrives.
        let reset_here = self.reset.is_some_and(|(reset, _)| reset == side);
        match way.throttle.as_ref().filter(|t| t.clamped) {
            // A buffer never bigger than the clamp offered no window beyond it.
            Some(t) if reset_here || t.rcvbuf_before <= bound => read_size(&self.limits, unread, 0),
            Some(t) => {
                let since_clamp = c.received - t.received_at_clamp.min(c.received);
                let window_left = t.rcvbuf_before.saturating_sub(since_clamp);
                read_size(&self.limits, unread, window_left)
            }
            // Not clamped yet: before the clamp the window offered so far may still bring up to
            // the whole buffer (and a segment), and a window bigger than the clamp that much again.
            None => {
                let window_left = if c.rcvbuf > bound { c.rcvbuf } else { 0 };
                read_size(&self.limits, unread + c.rcvbuf + SKB_SLACK, window_left)
            }
        }
    }

    /// What direction `side` may need of its flow's reservation before its next read: what it
    /// holds (written before it reads again), or that read.
    fn claim(&self, side: usize) -> u64 {
        let held = self.ways[side]
            .throttle
            .as_ref()
            .map_or(0, |t| t.held_len());
        held.max(self.next_read(side))
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
    fn reads_take_the_whole_queue() {
        let limits = Limits {
            per_flow: 1 << 20,
            total: 256 << 20,
            close_drain_timeout: Duration::from_secs(30),
            held_per_flow: 256 << 10,
            held_total: 1 << 20,
        };
        // (unread, window left from before the clamp, read size)
        let table = [
            // A clamped queue: the per-flow bound.
            (0, 0, 256 << 10),
            (100 << 10, 0, 256 << 10),
            // A queue that filled before the clamp: all of it, and a segment.
            (512 << 10, 0, (512 << 10) + SKB_SLACK),
            // The old window still open: what it may bring, and a clamped buffer more.
            (
                100 << 10,
                200 << 10,
                (100 << 10) + (200 << 10) + (256 << 10),
            ),
        ];
        for (unread, window_left, want) in table {
            assert_eq!(
                read_size(&limits, unread, window_left),
                want,
                "unread {unread} window left {window_left}"
            );
        }
    }

    #[test]
    fn a_flow_reads_within_its_reservation_or_the_room_left() {
        let limits = Limits {
            per_flow: 1 << 20,
            total: 256 << 20,
            close_drain_timeout: Duration::from_secs(30),
            held_per_flow: 256 << 10,
            held_total: 1 << 20,
        };
        // (need, reserved by this flow, by the others, admitted)
        let table = [
            // Room in the total.
            (512 << 10, 0, 512 << 10, true),
            (512 << 10, 0, (512 << 10) + 1, false),
            // Within what it reserved: whatever the others hold (the wedge this prevents).
            (512 << 10, 512 << 10, 1 << 20, true),
            // More than it reserved: the growth must fit.
            ((512 << 10) + 1, 512 << 10, 512 << 10, false),
            ((512 << 10) + 1, 512 << 10, (512 << 10) - 1, true),
            // Bigger than the total, and no other flow reserves anything: read anyway.
            (4 << 20, 0, 0, true),
            (4 << 20, 0, 1, false),
        ];
        for (need, have, others, want) in table {
            assert_eq!(
                admit(&limits, need, have, others),
                want,
                "need {need} have {have} others {others}"
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
