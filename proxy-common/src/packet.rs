//! Map keys and values of the packet splice: the flow table the TC program rewrites segments
//! with, the per-flow state it keeps, and what it tells the daemon.
//!
//! A packet-spliced flow has two legs, the client's connection to the proxy and the proxy's
//! connection to the broker. Each leg's incoming segments (as they arrive at the proxy host) have
//! an entry in the flow table, keyed by their addresses and ports, saying how they become segments
//! of the other leg.

/// Address family values of [`PacketKey::family`].
pub mod family {
    /// IPv4: the address is in the first four bytes, the rest zero.
    pub const V4: u16 = 4;
    /// IPv6.
    pub const V6: u16 = 6;
}

/// What the program does with a leg's segments: [`PacketLeg::mode`].
pub mod leg_mode {
    /// The hand-over is in progress: segments that carry data or a FIN are dropped (their sender
    /// sends them again later, translated), so nothing new reaches the proxy's sockets while the
    /// daemon moves what they already hold; pure acknowledgments still reach them, so their
    /// send queues can empty.
    pub const FREEZE: u32 = 1;
    /// Every segment is rewritten for the other leg.
    pub const SPLICE: u32 = 2;
}

/// A segment's addresses and ports as it arrives at the proxy host, in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PacketKey {
    /// Source address (IPv4 in the first four bytes).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// [`family::V4`] or [`family::V6`].
    pub family: u16,
    /// Zero (explicit padding, so the key hashes the same on both sides).
    pub pad: u16,
}

/// How one leg's segments become the other leg's: the flow table's value (daemon-written).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketLeg {
    /// Key of the flow's [`PacketFlowState`].
    pub flow: u64,
    /// The source address the segment leaves with (the proxy's address on the other leg).
    pub new_src: [u8; 16],
    /// The destination address (the other leg's peer).
    pub new_dst: [u8; 16],
    /// New source port, network byte order.
    pub new_sport: u16,
    /// New destination port, network byte order.
    pub new_dport: u16,
    /// [`leg_mode::FREEZE`] or [`leg_mode::SPLICE`].
    pub mode: u32,
    /// [`crate::direction::TO_UPSTREAM`] for the client's leg, [`crate::direction::TO_CLIENT`]
    /// for the broker's: the index of this leg in the state's per-direction fields.
    pub direction: u32,
    /// Added to the sequence number (see [`crate::segment::seq_delta`]).
    pub seq_delta: u32,
    /// Added to the acknowledgment number and to SACK edges.
    pub ack_delta: u32,
    /// The proxy's next TSval on the other leg: what the first forwarded TSval becomes.
    pub ts_val_target: u32,
    /// The window scale the sender of these segments uses for its window field.
    pub wscale_from: u8,
    /// The window scale the receiver on the other leg reads window fields with.
    pub wscale_to: u8,
    /// Zero.
    pub pad: u16,
    /// Interface to send the rewritten segment out of (`bpf_redirect_neigh`); 0 lets it continue
    /// up this host's stack (the other leg's peer is local, as on loopback).
    pub redirect_ifindex: u32,
}

/// What the program learns and counts for one flow (created by the daemon, written by the
/// program; each field has one writer value, so concurrent CPUs never lose an update that matters).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketFlowState {
    /// Payload bytes rewritten, per direction (retransmissions included).
    pub bytes: [u64; 2],
    /// Segments rewritten, per direction.
    pub packets: [u64; 2],
    /// When a segment of the flow was last seen (`bpf_ktime_get_ns`): the idle timeout's clock.
    pub last_seen_ns: u64,
    /// TSval delta learned from each direction's first timestamped segment.
    pub ts_val_delta: [u32; 2],
    /// Non-zero once `ts_val_delta` of that direction holds a value.
    pub ts_learned: [u32; 2],
    /// Sequence number (on the receiving leg) just past each direction's FIN, once one passed.
    pub fin_end: [u32; 2],
    /// Non-zero once a FIN passed in that direction.
    pub fin_seen: [u32; 2],
    /// Non-zero once the other side acknowledged that direction's FIN.
    pub fin_acked: [u32; 2],
    /// While the flow is frozen: the highest acknowledgment number each leg's peer sent (on its
    /// own leg), from every segment, those dropped included, so the daemon knows what the peers
    /// have even when the acknowledgment rode on a segment its socket never saw.
    pub peer_acked: [u32; 2],
    /// Non-zero once `peer_acked` of that leg holds a value.
    pub peer_acked_seen: [u32; 2],
    /// The sequence number (on the receiving leg) just past the furthest payload byte forwarded
    /// in each direction: with the leg's sequence number at the hand-over, the bytes the flow
    /// moved, each counted once however often it was sent.
    pub seq_end: [u32; 2],
    /// Non-zero once `seq_end` of that direction holds a value.
    pub seq_end_seen: [u32; 2],
    /// Which direction's FIN came first, plus one (0: no FIN yet): who closed the flow.
    pub first_fin: u32,
    /// Which direction's RST came first, plus one (0: none).
    pub reset_by: u32,
    /// Non-zero once a RST passed either way.
    pub reset: u32,
    /// Non-zero once the program told the daemon the flow is over.
    pub end_signaled: u32,
}

/// Totals of the TC program, one slot per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketTotals {
    /// Segments rewritten (both directions).
    pub segments: u64,
    /// Payload bytes rewritten.
    pub bytes: u64,
    /// Segments dropped while their flow's hand-over was in progress (sent again by their peer).
    pub frozen_drops: u64,
    /// Segments whose TCP options ended in a malformed option (rewritten up to it).
    pub malformed_options: u64,
    /// Segments the program could not rewrite (a helper failed): dropped, their peer sends them
    /// again.
    pub rewrite_failed: u64,
    /// Flow-end events that did not fit in the ring buffer (the daemon's sweep finds those flows).
    pub events_lost: u64,
}

/// A flow the program saw end: both FINs acknowledged, or a RST.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketEndEvent {
    /// The flow's key in the state map.
    pub flow: u64,
}

// SAFETY: `PacketKey` is `#[repr(C)]`, `Copy`, two 16-byte arrays and four `u16` (no implicit
// padding) and every bit pattern is a valid value, which is what `Pod` requires.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PacketKey {}

// SAFETY: `PacketLeg` is `#[repr(C)]`, `Copy`, laid out without implicit padding (checked by the
// size test below) and every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PacketLeg {}

// SAFETY: `PacketFlowState` is `#[repr(C)]`, `Copy`, `u64` arrays then `u32` fields (no implicit
// padding, checked below) and every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PacketFlowState {}

// SAFETY: `PacketTotals` is `#[repr(C)]`, `Copy`, only `u64` fields, any bit pattern valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PacketTotals {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        // Compiled for two targets; pinned sizes catch a field added on one side only.
        assert_eq!(core::mem::size_of::<PacketKey>(), 40);
        assert_eq!(core::mem::size_of::<PacketLeg>(), 72);
        assert_eq!(core::mem::size_of::<PacketFlowState>(), 128);
        assert_eq!(core::mem::size_of::<PacketTotals>(), 48);
        assert_eq!(core::mem::size_of::<PacketEndEvent>(), 8);
    }
}
