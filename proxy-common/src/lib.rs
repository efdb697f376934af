#![no_std]
//! Map keys and values shared by the kernel programs and the daemon.
//!
//! Both sides read the same bytes out of BPF maps, so every type here is `#[repr(C)]`, `Copy`
//! and free of padding surprises; the daemon gets `aya::Pod` impls behind the `user` feature.

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

/// Where bytes arriving on a socket must be forwarded: the value of the peer map.
///
/// A struct rather than a bare `u64` so per-direction state (the direction now, a throttle flag
/// with the backpressure work) travels with the one lookup the program already does.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerEntry {
    /// Cookie of the socket the verdict program redirects this socket's data to.
    pub peer_cookie: SockCookie,
    /// [`direction::TO_UPSTREAM`] or [`direction::TO_CLIENT`].
    pub direction: u32,
    /// Explicit padding, always zero, so both sides agree on every byte.
    pub _pad: u32,
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
}

/// Per-socket traffic counters kept by the kernel program.
///
/// The daemon reads these instead of the bytes themselves once a flow is spliced, so metrics and
/// idle detection keep working after userspace stops seeing the payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    /// Payload bytes redirected from this socket to its peer.
    pub bytes: u64,
    /// Number of skbs redirected (one per verdict call, not per MQTT packet).
    pub packets: u64,
}

// SAFETY: `PeerEntry` is `#[repr(C)]`, `Copy`, made of a `u64` and two `u32` (no implicit padding)
// and every bit pattern is a valid value, which is what `Pod` requires for copying it through map
// syscalls.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PeerEntry {}

// SAFETY: `FlowCounters` is `#[repr(C)]`, `Copy`, made of two `u64` fields (no padding) and every
// bit pattern is a valid value, which is what `Pod` requires for copying it through map syscalls.
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
        assert_eq!(core::mem::size_of::<PeerEntry>(), 16);
        assert_eq!(core::mem::size_of::<GlobalCounters>(), 40);
        assert_eq!(core::mem::size_of::<FlowCounters>(), 16);
        assert_eq!(core::mem::align_of::<FlowCounters>(), 8);
    }
}
