//! How a flow ends: a FIN passed on by the counter rule, a reset drained into the other side,
//! idleness, and a flow with a side gone that stopped making progress.

use super::{Action, BACKOFF_MAX, BACKOFF_START, FlowCore, Stage, Timer, error_reason, side_name};

impl FlowCore {
    /// The counter rule: once every byte received on `side` before its FIN has been written into
    /// the other socket, shut that socket's write side; otherwise check again later.
    pub(super) fn try_drain(&mut self, side: usize) {
        let Stage::Draining { since, backoff } = self.ways[side].stage else {
            return;
        };
        let peer = 1 - side;
        let before_fin = self.obs.sides[side].received.saturating_sub(1);
        let written = self.written_into_peer(side);
        if before_fin <= written {
            self.out.push(Action::ShutdownWrite(peer));
            self.ways[side].stage = Stage::Closed;
            return self.close_if_done();
        }
        let now = self.obs.now;
        if now.duration_since(since) < self.limits.close_drain_timeout {
            self.ways[side].stage = Stage::Draining {
                since,
                backoff: (backoff * 2).min(BACKOFF_MAX),
            };
            return self.at(backoff, Timer::Drain(side));
        }
        tracing::warn!(
            "the {} sent a FIN, but {} of the {} bytes before it had not reached the {} after {:?} \
             ({} redirected by the kernel and not yet sent); resetting both sides",
            side_name(side),
            before_fin - written,
            before_fin,
            side_name(peer),
            self.limits.close_drain_timeout,
            self.measured_inflight(side),
        );
        self.finish(crate::dataplane::CloseReason::DrainTimeout, [true, true]);
    }

    /// Side `side` was reset. What it sent before still goes into the other side, which is then
    /// closed with a FIN once its peer has acknowledged every byte (`try_reset_drain`).
    pub(super) fn on_reset(&mut self, side: usize) {
        match self.reset {
            Some((first, _)) if first != side => {
                // Both sides are gone: nothing left to deliver.
                return self.finish(error_reason(side), [false, false]);
            }
            Some(_) => return,
            None => {}
        }
        self.reset = Some((side, self.obs.now));
        self.side_ended();
        // Nothing can be delivered into the reset side any more: what the daemon held for it is
        // dropped.
        self.ways[1 - side].stage = Stage::Closed;
        if let Some(t) = &mut self.ways[1 - side].throttle {
            self.dropped += t.held_len();
            t.held = Vec::new();
            t.start = 0;
        }
        // Bytes passed to the socket and not read (around a hand-back) are read out now: the
        // check throttles the direction if there are any. A throttled direction reads out what
        // its socket still holds (the reset does not discard it); then the drain below waits for
        // the peer to acknowledge it all.
        self.check_inflight(side);
        self.pump(side);
        self.try_reset_drain();
    }

    pub(super) fn try_reset_drain(&mut self) {
        let Some((side, since)) = self.reset else {
            return;
        };
        if self.finished {
            return;
        }
        let peer = 1 - side;
        let c = self.obs.sides[side];
        let way = &self.ways[side];
        // A throttled direction first has to copy out what its socket still holds.
        let copied_out = way
            .throttle
            .as_ref()
            .is_none_or(|t| t.eof && t.held_len() == 0);
        // After a reset nothing more arrives, and the program has seen every byte TCP received
        // except a FIN, which it drops: a gap between the two is that FIN, whether its hang-up
        // was seen before the reset or came in the same event.
        let fin = u64::from(c.received > c.redirected + c.passed);
        let sent = c.received - fin;
        let written = self.written_into_peer(side);
        let unacked = self.obs.sides[peer].outq;
        if copied_out && sent <= written && unacked == 0 {
            // What the peer sent towards the reset side and nobody will take (bytes left in its
            // socket, or held by the daemon) is lost: then the peer gets a reset, not a FIN, as
            // closing a socket with unread bytes does, or a peer writing into a zero window
            // would wait forever.
            let p = self.obs.sides[peer];
            let fin = u64::from(self.fin_seen[peer]);
            let unread = p
                .received
                .saturating_sub(fin + p.redirected + self.ways[peer].daemon_read);
            if unread > 0 || self.dropped > 0 {
                tracing::debug!(
                    unread,
                    dropped = self.dropped,
                    "the {} sent bytes the reset {} will not get; resetting it",
                    side_name(peer),
                    side_name(side)
                );
                let mut reset = [false; 2];
                reset[peer] = true;
                return self.finish(error_reason(side), reset);
            }
            self.out.push(Action::ShutdownWrite(peer));
            return self.finish(error_reason(side), [false, false]);
        }
        let now = self.obs.now;
        let waited = now.duration_since(since);
        if waited >= self.limits.close_drain_timeout {
            tracing::warn!(
                "the {side} was reset; after {:?}, {} of the {sent} bytes it sent had not been \
                 written into the {peer} and the {peer} had not acknowledged {unacked} more; \
                 resetting the {peer} too",
                self.limits.close_drain_timeout,
                sent.saturating_sub(written),
                side = side_name(side),
                peer = side_name(peer),
            );
            let mut reset = [false; 2];
            reset[peer] = true;
            return self.finish(error_reason(side), reset);
        }
        let wait = (waited / 4).clamp(BACKOFF_START, BACKOFF_MAX);
        self.at(wait, Timer::ResetDrain);
    }

    pub(super) fn close_if_done(&mut self) {
        if self.ways.iter().all(|w| w.stage == Stage::Closed) {
            let reason = self
                .first_fin
                .unwrap_or(crate::dataplane::CloseReason::ClientClosed);
            self.finish(reason, [false, false]);
        }
    }

    /// What moved so far, kernel and daemon alike: unchanged means nothing moved.
    fn activity(&self) -> u64 {
        let kernel: u64 = self.obs.sides.iter().map(|c| c.redirected + c.passed).sum();
        kernel + self.ways.iter().map(|w| w.daemon_written).sum::<u64>()
    }

    pub(super) fn check_idle(&mut self) {
        let activity = self.activity();
        let now = self.obs.now;
        if activity != self.last_activity {
            self.last_activity = activity;
            self.last_change = now;
        } else if now.duration_since(self.last_change) >= self.setup.idle_timeout {
            return self.finish(crate::dataplane::CloseReason::Idle, [false, false]);
        }
        self.at(self.setup.idle_timeout / 4, Timer::Idle);
    }

    /// A side sent a FIN or was reset: from now on the flow must keep moving, or end within
    /// `close_drain_timeout`.
    pub(super) fn side_ended(&mut self) {
        if self.ended_at.is_none() {
            self.ended_at = Some(self.obs.now);
            self.last_activity = self.activity();
            self.last_change = self.obs.now;
            self.at(self.limits.close_drain_timeout / 4, Timer::Ended);
        }
    }

    /// A flow with a side gone in which nothing moved for `close_drain_timeout` (a peer that
    /// neither reads nor closes) is reset on both sides: it must not stay active forever.
    pub(super) fn check_ended(&mut self) {
        let activity = self.activity();
        let now = self.obs.now;
        if activity != self.last_activity {
            self.last_activity = activity;
            self.last_change = now;
        } else if now.duration_since(self.last_change) >= self.limits.close_drain_timeout {
            let (side, how) = match (self.reset, self.first_fin) {
                (Some((side, _)), _) => (side, "was reset"),
                (None, Some(reason)) => (
                    usize::from(reason == crate::dataplane::CloseReason::BrokerClosed),
                    "sent a FIN",
                ),
                (None, None) => (super::CLIENT, "ended"),
            };
            tracing::warn!(
                "the {} {how}, and nothing moved between the two sides for {:?} after that \
                 (the daemon held {} bytes, the kernel {} in flight); resetting both sides",
                side_name(side),
                self.limits.close_drain_timeout,
                self.held_bytes(),
                self.inflight(),
            );
            return self.finish(crate::dataplane::CloseReason::DrainTimeout, [true, true]);
        }
        self.at(self.limits.close_drain_timeout / 4, Timer::Ended);
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use std::time::{Duration, Instant};

    fn flow(now: Instant) -> FlowCore {
        let limits = Limits {
            per_flow: 1 << 20,
            total: 256 << 20,
            close_drain_timeout: Duration::from_secs(30),
            held_per_flow: 256 << 10,
            held_total: 64 << 20,
        };
        let setup = FlowSetup {
            cookies: [1, 2],
            signal_at: 1 << 20,
            hard_limit: 2 << 20,
            broker_preamble_len: 0,
            idle_timeout: Duration::from_secs(600),
        };
        FlowCore::new(limits, setup, now).0
    }

    /// A client reset, as counters: (client received, redirected, passed), broker (acked, outq,
    /// received and not passed on).
    type Row = (&'static str, (u64, u64, u64), (u64, u64, u64), &'static str);

    #[test]
    fn a_client_reset_ends_the_flow_once_its_bytes_are_acknowledged() {
        // The broker socket's acked count includes its SYN.
        let rows: [Row; 6] = [
            (
                "FIN and reset in one event, all acked",
                (101, 100, 0),
                (101, 0, 0),
                "fin",
            ),
            (
                "reset without a FIN, all acked",
                (100, 100, 0),
                (101, 0, 0),
                "fin",
            ),
            (
                "FIN and reset, 10 bytes not acked yet",
                (101, 100, 0),
                (91, 10, 0),
                "wait",
            ),
            (
                "FIN and reset, 10 not yet written",
                (101, 100, 0),
                (91, 0, 0),
                "wait",
            ),
            (
                "FIN and reset, 20 passed bytes unread",
                (101, 80, 20),
                (81, 0, 0),
                "throttle",
            ),
            (
                "all acked, but the broker's bytes for the client are stranded",
                (101, 100, 0),
                (101, 0, 4096),
                "reset broker",
            ),
        ];
        for (name, (received, redirected, passed), (acked, outq, stranded), want) in rows {
            let now = Instant::now();
            let mut core = flow(now);
            let mut obs = Observed {
                now,
                sides: [SideCounters::default(); 2],
                flows: 1,
                reserved_total: 0,
            };
            obs.sides[CLIENT] = SideCounters {
                received,
                redirected,
                passed,
                acked: 1,
                ..SideCounters::default()
            };
            obs.sides[BROKER] = SideCounters {
                received: stranded,
                acked,
                outq,
                ..SideCounters::default()
            };
            let event = Event::Socket {
                side: CLIENT,
                error: true,
                readable: false,
                writable: false,
                hangup: true,
            };
            let actions = core.step(event, &obs);
            let finish = actions.iter().find_map(|a| match a {
                Action::Finish {
                    reason: CloseReason::ClientError,
                    reset,
                } => Some(*reset),
                _ => None,
            });
            let throttled = actions
                .iter()
                .any(|a| matches!(a, Action::SetEntry(CLIENT, e) if e.throttled == 1));
            let fin = actions.contains(&Action::ShutdownWrite(BROKER));
            let got = match (finish, throttled) {
                (Some([false, false]), _) if fin => "fin",
                (Some([false, true]), _) if !fin => "reset broker",
                (Some(_), _) => "finished otherwise",
                (None, true) => "throttle",
                (None, false) => "wait",
            };
            assert_eq!(got, want, "{name}: {actions:?}");
        }
    }
}
