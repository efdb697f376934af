//! The rules of a packet splice's hand-over, as pure functions over what the daemon reads from
//! its two sockets: whether the legs can be spliced at all, when the sockets may be muted, and
//! how each leg's segments are rewritten from then on.
//!
//! The hand-over itself (proxy-ebpf/src/tc.rs has the program's side):
//! 1. The flow is frozen: the program drops every segment of either leg that carries data or a
//!    FIN (its sender sends it again later), and lets pure acknowledgments through, recording the
//!    highest acknowledgment each peer sent, dropped segments included. (Known bug: a segment
//!    dropped here and then abandoned by its sender's reset is lost; see docs/architecture.md.)
//! 2. The daemon moves what its sockets already hold (and acknowledged) to the other socket, until
//!    both receive queues are empty and each peer has acknowledged everything the proxy sent it
//!    ([`drained`]): then nothing exists that only the proxy's sockets could retransmit.
//! 3. Both sockets are muted (`TCP_REPAIR`) and their sequence numbers read; the rewrites
//!    ([`rewrites`]) replace the frozen entries, and the peers' retransmissions of what was
//!    dropped go through translated, exactly once and in order.

use super::repair::{Negotiated, QueueSeqs};
use proxy_common::segment::seq_delta;

/// Why a flow is not packet-spliced and goes to the next data path; counted by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// One leg sends timestamps and the other does not: there is no clock to translate.
    TimestampsDiffer,
    /// One leg negotiated SACK and the other did not: SACK blocks would reach a peer that cannot
    /// read them, and its own would be missing.
    SackDiffers,
    /// Segments the client may send are larger than the broker's leg takes (different MSS).
    MssTooSmall,
    /// Client and broker are of different address families.
    AddressFamily,
    /// The flow table is full.
    TableFull,
    /// No route to a peer in the main table.
    NoRoute,
    /// The sockets did not drain in time (a peer that does not acknowledge).
    DrainTimeout,
    /// A side closed or reset during the hand-over; the copy path ends the flow.
    PeerClosed,
}

impl Fallback {
    /// The name in stats (`dataplane.fallbacks.<reason>`) and the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::TimestampsDiffer => "timestamps_differ",
            Fallback::SackDiffers => "sack_differs",
            Fallback::MssTooSmall => "mss_too_small",
            Fallback::AddressFamily => "address_family",
            Fallback::TableFull => "table_full",
            Fallback::NoRoute => "no_route",
            Fallback::DrainTimeout => "drain_timeout",
            Fallback::PeerClosed => "peer_closed",
        }
    }
}

/// Whether the two legs can run as one conversation: the options that need translating are on
/// both legs or on neither.
pub fn check_legs(client: &Negotiated, broker: &Negotiated) -> Result<(), Fallback> {
    if client.timestamps != broker.timestamps {
        return Err(Fallback::TimestampsDiffer);
    }
    if client.sack != broker.sack {
        return Err(Fallback::SackDiffers);
    }
    Ok(())
}

/// Whether what each peer may send fits the other leg: the MSS the proxy announced to one peer
/// (the largest segment it sends) must not exceed the MSS the other peer announced to the proxy
/// (the largest it takes), read from the muted sockets. Segments go on as they came, so a smaller
/// MSS on one leg (a link with a smaller MTU) cannot be spliced.
pub fn check_mss(client: &Muted, broker: &Muted) -> Result<(), Fallback> {
    if client.negotiated.announced_mss > broker.peer_mss
        || broker.negotiated.announced_mss > client.peer_mss
    {
        return Err(Fallback::MssTooSmall);
    }
    Ok(())
}

/// One proxy socket during the drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketQueues {
    /// Bytes received and not yet read by the daemon (`SIOCINQ`).
    pub unread: u64,
    /// Bytes sent and not acknowledged as far as the socket knows (`SIOCOUTQ`).
    pub unacked: u64,
    /// The next sequence number the socket would send.
    pub send_next: u32,
    /// The highest acknowledgment number its peer sent, as the program recorded it (dropped
    /// segments included, whose acknowledgments the socket never saw); `None` before any.
    pub peer_acked: Option<u32>,
}

impl SocketQueues {
    /// Whether the peer has everything this socket sent: the socket saw it acknowledged, or the
    /// program saw an acknowledgment of it go by.
    fn all_acked(&self) -> bool {
        self.unacked == 0
            || self
                .peer_acked
                .is_some_and(|ack| ack.wrapping_sub(self.send_next) as i32 >= 0)
    }
}

/// Whether both sockets may be muted: nothing is left to read, and nothing is left that only
/// these sockets could send again.
pub fn drained(client: &SocketQueues, broker: &SocketQueues) -> bool {
    client.unread == 0 && broker.unread == 0 && client.all_acked() && broker.all_acked()
}

/// How one direction's segments are rewritten: the numbers of `proxy_common::packet::PacketLeg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewrite {
    pub seq_delta: u32,
    pub ack_delta: u32,
    pub ts_val_target: u32,
    pub wscale_from: u8,
    pub wscale_to: u8,
}

/// A muted socket: its sequence numbers and its timestamp clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Muted {
    pub seqs: QueueSeqs,
    pub negotiated: Negotiated,
    /// The MSS its peer announced (`TCP_MAXSEG` of a muted socket).
    pub peer_mss: u32,
    /// `TCP_TIMESTAMP` at the mute.
    pub ts_now: u32,
}

/// The client's segments as the broker's and the broker's as the client's, from the muted
/// sockets: `(client → broker, broker → client)`.
///
/// A segment from the client carries the client's sequence numbers, continued by the proxy's
/// broker socket, and acknowledges bytes that came from the broker through the proxy's client
/// socket; its window is read with the client's scale and written with the scale the broker reads
/// the proxy's windows with. Its timestamp continues the proxy's broker-side clock, so the
/// broker's last recorded TSval is never ahead (PAWS).
pub fn rewrites(client: &Muted, broker: &Muted) -> (Rewrite, Rewrite) {
    let one_way = |from: &Muted, to: &Muted| Rewrite {
        seq_delta: seq_delta(from.seqs.recv_next, to.seqs.send_next),
        ack_delta: seq_delta(from.seqs.send_next, to.seqs.recv_next),
        ts_val_target: to.ts_now.wrapping_add(1),
        wscale_from: from.negotiated.peer_wscale,
        wscale_to: to.negotiated.own_wscale,
    };
    (one_way(client, broker), one_way(broker, client))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::segment::shift_seq;

    fn negotiated(wscale: u8, mss: u32) -> Negotiated {
        Negotiated {
            timestamps: true,
            sack: true,
            window_scaling: true,
            peer_wscale: wscale,
            own_wscale: wscale,
            announced_mss: mss,
        }
    }

    fn leg(mss: u32) -> Negotiated {
        negotiated(7, mss)
    }

    #[test]
    fn legs_must_agree_on_the_options_that_are_translated() {
        assert_eq!(check_legs(&leg(1460), &leg(1460)), Ok(()));
        let mut no_ts = leg(1460);
        no_ts.timestamps = false;
        assert_eq!(
            check_legs(&leg(1460), &no_ts),
            Err(Fallback::TimestampsDiffer)
        );
        // Neither side with timestamps is fine: there is nothing to translate.
        assert_eq!(check_legs(&no_ts, &no_ts), Ok(()));
        let mut no_sack = leg(1460);
        no_sack.sack = false;
        assert_eq!(check_legs(&no_sack, &leg(1460)), Err(Fallback::SackDiffers));
    }

    fn muted(announced: u32, peer: u32) -> Muted {
        Muted {
            seqs: QueueSeqs {
                recv_next: 0,
                send_next: 0,
            },
            negotiated: Negotiated {
                announced_mss: announced,
                ..negotiated(7, announced)
            },
            peer_mss: peer,
            ts_now: 0,
        }
    }

    #[test]
    fn what_each_peer_may_send_must_fit_the_other_leg() {
        // Loopback on both legs.
        assert_eq!(
            check_mss(&muted(65_483, 65_483), &muted(65_483, 65_483)),
            Ok(())
        );
        // A broker on a link whose MSS is 1,000: the client may send 1,460-byte segments.
        assert_eq!(
            check_mss(&muted(1_460, 1_460), &muted(1_000, 1_000)),
            Err(Fallback::MssTooSmall)
        );
        // Aligned before the connect: the proxy announced 1,000 to the client as well.
        assert_eq!(
            check_mss(&muted(1_000, 1_460), &muted(1_000, 1_000)),
            Ok(())
        );
        // The broker may send more than the client takes.
        assert_eq!(
            check_mss(&muted(1_000, 1_000), &muted(1_460, 1_460)),
            Err(Fallback::MssTooSmall)
        );
    }

    fn queues(unread: u64, unacked: u64, send_next: u32, peer_acked: Option<u32>) -> SocketQueues {
        SocketQueues {
            unread,
            unacked,
            send_next,
            peer_acked,
        }
    }

    #[test]
    fn sockets_are_muted_only_when_nothing_only_they_could_resend_is_left() {
        let idle = queues(0, 0, 100, None);
        assert!(drained(&idle, &idle));
        // Bytes still to move.
        assert!(!drained(&queues(10, 0, 100, None), &idle));
        // Sent, not acknowledged anywhere.
        assert!(!drained(&idle, &queues(0, 500, 100, Some(99))));
        // Acknowledged in a segment the program dropped: the socket never saw it, the peer has it.
        assert!(drained(&idle, &queues(0, 500, 100, Some(100))));
        // Across the wrap.
        assert!(drained(&idle, &queues(0, 500, u32::MAX - 3, Some(2))));
    }

    #[test]
    fn every_byte_lands_where_the_other_leg_expects_it() {
        // The client's leg: the proxy expects client byte 1,000 next and would send byte 50.
        let client = Muted {
            seqs: QueueSeqs {
                recv_next: 1_000,
                send_next: 50,
            },
            negotiated: Negotiated {
                peer_wscale: 7,
                own_wscale: 9,
                ..negotiated(0, 1460)
            },
            peer_mss: 1460,
            ts_now: 5_000,
        };
        // The broker's leg: the proxy would send byte 4,000,000,000 next and expects byte 7.
        let broker = Muted {
            seqs: QueueSeqs {
                recv_next: 7,
                send_next: 4_000_000_000,
            },
            negotiated: Negotiated {
                peer_wscale: 5,
                own_wscale: 3,
                ..negotiated(0, 1460)
            },
            peer_mss: 1460,
            ts_now: 90_000,
        };
        let (up, down) = rewrites(&client, &broker);
        // The client's next byte is the broker socket's next byte.
        assert_eq!(shift_seq(1_000, up.seq_delta), 4_000_000_000);
        // The client acknowledging all it got means the broker's bytes up to 7.
        assert_eq!(shift_seq(50, up.ack_delta), 7);
        // And back.
        assert_eq!(shift_seq(7, down.seq_delta), 50);
        assert_eq!(shift_seq(4_000_000_000, down.ack_delta), 1_000);
        // The client's windows are read at its scale (7) and written at the scale the proxy
        // gave the broker (3); the broker's at 5 and written at 9 for the client.
        assert_eq!((up.wscale_from, up.wscale_to), (7, 3));
        assert_eq!((down.wscale_from, down.wscale_to), (5, 9));
        // Timestamps go on from the clock of the proxy's socket on the receiving leg.
        assert_eq!(up.ts_val_target, 90_001);
        assert_eq!(down.ts_val_target, 5_001);
    }
}
