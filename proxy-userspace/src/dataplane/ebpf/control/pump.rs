//! Moving a throttled direction's bytes: bounded reads within the held-bytes bounds, writes
//! into the peer, and the end of the stream.

use super::{
    Action, BACKOFF_MAX, BACKOFF_START, Count, FlowCore, Limits, ReadOutcome, Stage, Timer,
    WriteOutcome,
};

/// How much one read of a throttled socket takes at most: the per-flow bound.
///
/// Reads are bounded, and stop wherever the bound falls in the socket's queue. An earlier design
/// read each throttled socket's whole queue, clamping its receive buffer to fit, because partial
/// reads seemed to replay bytes; the replays were TCP's (a retransmission overlapping received
/// bytes, queued whole and forwarded whole by the verdict path) and the program now trims them
/// (docs/sockmap-replay.md), and a socket in the map is read from its message queue only
/// (`tcp_bpf_recvmsg_parser`), where a partial read is exact. The socket's window, not the daemon,
/// holds the rest: the kernel's memory, bounded by TCP as for any proxy.
pub fn read_size(limits: &Limits) -> u64 {
    limits.held_per_flow
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
            tracing::trace!(side, held = t.held_len(), "write");
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
            tracing::trace!(side, size, "read");
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
        let into_reset = self.reset.is_some_and(|(reset, _)| reset != side);
        let done = way
            .throttle
            .as_ref()
            .map_or(way.stage == Stage::Closed, |t| t.eof);
        if into_reset || done {
            return 0;
        }
        read_size(&self.limits)
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
        tracing::trace!(side, outcome = ?outcome_summary(&outcome), "read done");
        let kicked = std::mem::take(&mut t.kicked);
        if kicked && let ReadOutcome::Data(bytes) = &outcome {
            tracing::warn!(
                side = super::side_name(side),
                bytes = bytes.len(),
                "a throttled socket held bytes that no readiness event reported; read them on a \
                 progress check"
            );
            self.out.push(Action::Count(Count::Resumed));
        }
        let way = &mut self.ways[side];
        let Some(t) = way.throttle.as_mut() else {
            return;
        };
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
        tracing::trace!(side, ?outcome, "write done");
        if std::mem::take(&mut t.kicked)
            && t.peer_blocked
            && matches!(outcome, WriteOutcome::Wrote(_))
        {
            tracing::warn!(
                side = super::side_name(side),
                "a peer took bytes after no readiness event said it could; written on a progress \
                 check"
            );
            self.out.push(Action::Count(Count::Resumed));
        }
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

/// A read's outcome without its bytes, for traces.
fn outcome_summary(outcome: &ReadOutcome) -> String {
    match outcome {
        ReadOutcome::Data(bytes) => format!("{} bytes", bytes.len()),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
}
