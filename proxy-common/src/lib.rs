#![no_std]
//! Map keys and values shared by the kernel programs and the daemon.
//!
//! Both sides read the same bytes out of BPF maps, so every type here is `#[repr(C)]`, `Copy`
//! and free of padding surprises; the daemon gets `aya::Pod` impls behind the `user` feature.

pub mod packet;
pub mod segment;

/// A socket's kernel cookie (`SO_COOKIE` / `bpf_get_socket_cookie`).
///
/// Cookies, unlike fds, mean the same thing in the daemon and in the kernel program and are never
/// reused while the host is up, so they are the key of every per-socket map.
pub type SockCookie = u64;

/// Key of the per-flow maps: one entry per spliced socket, named by its cookie.
pub type FlowKey = SockCookie;

/// Which way a socket's bytes travel once spliced: the index of the global counter they add to.
pub mod direction {
    /// The socket faces the client: what it receives goes to the broker (upstream).
    pub const TO_UPSTREAM: u32 = 0;
    /// The socket faces the broker: what it receives goes to the client.
    pub const TO_CLIENT: u32 = 1;
}

/// Where bytes arriving on a socket must be forwarded, and how: the value of the peer map.
///
/// Written only by the daemon (the program only reads it), so the daemon may replace an entry
/// at any time: that is how a direction is throttled or its next signal point moved.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerEntry {
    /// Cookie of the socket the verdict program redirects this socket's data to.
    pub peer_cookie: SockCookie,
    /// [`direction::TO_UPSTREAM`] or [`direction::TO_CLIENT`].
    pub direction: u32,
    /// [`throttle::OFF`], [`throttle::ON`] or [`throttle::RETURNING`]: whether this socket's skbs
    /// are redirected or passed to its own receive queue (where they count against its window
    /// and the daemon moves them).
    pub throttled: u32,
    /// When this socket's redirected bytes reach this count, the program tells the daemon (once
    /// per value) through the event ring buffer, so in-flight bytes are checked without polling.
    pub signal_at: u64,
    /// How many passed bytes the daemon has read out of this socket and written into the peer.
    /// The program redirects only while every passed byte is among them, so a redirected skb
    /// never overtakes a passed one (this is how a throttled direction is handed back).
    pub daemon_read: u64,
    /// The program stops redirecting by itself before this socket's redirected bytes would pass
    /// this count: it passes the skb instead (the direction is then throttled) and signals. The
    /// daemon moves it forward as the peer takes bytes, so what the kernel holds for all peers
    /// together stays bounded even while the daemon is slow to react.
    pub hard_limit: u64,
}

/// Values of [`PeerEntry::throttled`].
pub mod throttle {
    /// Redirect every skb (within the hard limit, and once every passed byte has been read).
    pub const OFF: u32 = 0;
    /// Pass every skb to the socket's own receive queue.
    pub const ON: u32 = 1;
    /// Handed back after a throttle: to the program the same as [`OFF`]; it tells the daemon that
    /// passed bytes may still be unread.
    pub const RETURNING: u32 = 2;
}

/// One event in the ring buffer: the socket whose redirected bytes crossed their signal point.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SignalEvent {
    /// The socket's cookie.
    pub cookie: SockCookie,
}

/// Global counters of the verdict program, one slot per CPU in a per-CPU array of length 1.
///
/// Summed by the daemon for `GET /stats`; kept in the kernel because spliced bytes never pass
/// through the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalCounters {
    /// Bytes redirected client → broker.
    pub bytes_to_upstream: u64,
    /// Bytes redirected broker → client.
    pub bytes_to_client: u64,
    /// skbs redirected (both directions).
    pub packets: u64,
    /// Zero-length skbs (bare FINs) dropped; the daemon propagates FIN itself.
    pub empty_dropped: u64,
    /// skbs whose redirect failed because the peer was not in the socket map (data lost).
    pub redirect_failed: u64,
    /// Bytes passed to their own socket because the direction was throttled.
    pub passed_bytes: u64,
    /// Signal events that did not fit in the ring buffer (the daemon's poll catches up).
    pub signals_lost: u64,
    /// skbs the kernel handed to the verdict a second time (every byte already seen): dropped.
    pub replayed_skbs: u64,
    /// Bytes of those skbs.
    pub replayed_bytes: u64,
    /// skbs that began before the next unseen byte but carried new bytes too: trimmed.
    pub overlap_skbs: u64,
    /// Bytes trimmed off those skbs.
    pub overlap_bytes_trimmed: u64,
    /// skbs that could not be trimmed: dropped, and their flow marked broken.
    pub trim_failed: u64,
}

/// Per-socket traffic counters kept by the kernel program.
///
/// Written only by the program (the daemon creates, reads and deletes entries), in place. A plain
/// hash value rather than a per-CPU one: the skbs of one socket are handed to the verdict one at a
/// time under that socket's lock, so there is never a concurrent writer, and the program needs the
/// socket's running total to compare with its signal point.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    /// Payload bytes redirected from this socket to its peer.
    pub bytes: u64,
    /// Number of skbs redirected (one per verdict call, not per MQTT packet).
    pub packets: u64,
    /// Payload bytes passed to this socket's own receive queue while it was throttled.
    pub passed_bytes: u64,
    /// The `signal_at` value an event was last sent for (one event per signal point).
    pub signaled_at: u64,
    /// TCP sequence number of the next byte the program has not seen on this socket.
    pub next_seq: u32,
    /// Non-zero once `next_seq` holds a value (set by the first verdict on the socket).
    pub seq_known: u32,
    /// Bytes of skbs the kernel handed to the verdict again, all already seen: dropped.
    pub replayed_bytes: u64,
    /// Non-zero when an skb could not be trimmed to its unseen bytes and was dropped: the flow
    /// lost bytes and the daemon must reset it.
    pub broken: u64,
}

/// What an skb's place in the TCP stream says about it, against the next byte not yet seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentCheck {
    /// Starts at the next unseen byte (or the first skb of the socket): new bytes only.
    New,
    /// Every byte was seen before: the kernel is handing the same segment over again.
    Replay,
    /// Starts before the next unseen byte and ends after it: this many leading bytes were seen.
    Overlap(u32),
    /// Starts after the next unseen byte: bytes were skipped (read around the program).
    Gap(u32),
}

/// Classifies an skb of `len` bytes starting at sequence number `seq`, in serial-number
/// arithmetic (RFC 1982), so a stream wrapping past 2^32 is handled.
///
/// Kept here, not in the program, so the rule is unit-tested on the host.
pub fn check_segment(next_seq: u32, seq_known: bool, seq: u32, len: u32) -> SegmentCheck {
    if !seq_known {
        return SegmentCheck::New;
    }
    let start = seq.wrapping_sub(next_seq) as i32;
    if start == 0 {
        return SegmentCheck::New;
    }
    if start > 0 {
        return SegmentCheck::Gap(start as u32);
    }
    let end = seq.wrapping_add(len).wrapping_sub(next_seq) as i32;
    if end <= 0 {
        SegmentCheck::Replay
    } else {
        SegmentCheck::Overlap(start.unsigned_abs())
    }
}

// SAFETY: `PeerEntry` is `#[repr(C)]`, `Copy`, made of `u64`, two `u32` and `u64` (no implicit
// padding) and every bit pattern is a valid value, which is what `Pod` requires for copying it
// through map syscalls.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PeerEntry {}

// SAFETY: `FlowCounters` is `#[repr(C)]`, `Copy`, made of `u64` fields and one pair of `u32`s (no
// padding) and every bit pattern is a valid value, which is what `Pod` requires for copying it
// through map syscalls.
#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowCounters {}

// SAFETY: `GlobalCounters` is `#[repr(C)]`, `Copy`, made only of `u64` fields (no padding) and every
// bit pattern is a valid value, which is what `Pod` requires for copying it through map syscalls.
#[cfg(feature = "user")]
unsafe impl aya::Pod for GlobalCounters {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel_side() {
        // The BPF program and the daemon are compiled for different targets; pin the sizes so a
        // field added on one side only shows up here rather than as garbage in a map.
        assert_eq!(core::mem::size_of::<PeerEntry>(), 40);
        assert_eq!(core::mem::size_of::<SignalEvent>(), 8);
        assert_eq!(core::mem::size_of::<GlobalCounters>(), 96);
        assert_eq!(core::mem::size_of::<FlowCounters>(), 56);
        assert_eq!(core::mem::align_of::<FlowCounters>(), 8);
    }

    #[test]
    fn segments_are_classified_against_the_next_unseen_byte() {
        use SegmentCheck::*;
        // The first skb of a socket sets the position.
        assert_eq!(check_segment(0, false, 12345, 100), New);
        assert_eq!(check_segment(1000, true, 1000, 500), New);
        // The same segment again, or a part of what was seen.
        assert_eq!(check_segment(1500, true, 1000, 500), Replay);
        assert_eq!(check_segment(1500, true, 1200, 300), Replay);
        // Partly seen.
        assert_eq!(check_segment(1500, true, 1000, 600), Overlap(500));
        // Ahead of what was seen.
        assert_eq!(check_segment(1500, true, 1600, 100), Gap(100));
    }

    #[test]
    fn sequence_numbers_wrap() {
        use SegmentCheck::*;
        let next = 10u32;
        let seq = u32::MAX - 89; // 100 bytes before `next`, across the wrap
        assert_eq!(check_segment(next, true, seq, 100), Replay);
        assert_eq!(check_segment(next, true, seq, 150), Overlap(100));
        assert_eq!(check_segment(u32::MAX - 9, true, u32::MAX - 9, 100), New);
        assert_eq!(check_segment(u32::MAX - 9, true, 5, 100), Gap(15));
    }
}
