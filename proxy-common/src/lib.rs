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

/// Where bytes arriving on a socket must be forwarded: the value of the peer map.
///
/// A struct rather than a bare `u64` so the splice work can add per-direction state (for example
/// a byte budget before handing the flow back to userspace) without changing every map user.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerEntry {
    /// Cookie of the socket the verdict program redirects this socket's data to.
    pub peer_cookie: SockCookie,
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

// SAFETY: `PeerEntry` is `#[repr(C)]`, `Copy`, has a single `u64` field (no padding) and every bit
// pattern is a valid value, which is what `Pod` requires for copying it through map syscalls.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PeerEntry {}

// SAFETY: `FlowCounters` is `#[repr(C)]`, `Copy`, made of two `u64` fields (no padding) and every
// bit pattern is a valid value, which is what `Pod` requires for copying it through map syscalls.
#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowCounters {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel_side() {
        // The BPF program and the daemon are compiled for different targets; pin the sizes so a
        // field added on one side only shows up here rather than as garbage in a map.
        assert_eq!(core::mem::size_of::<PeerEntry>(), 8);
        assert_eq!(core::mem::size_of::<FlowCounters>(), 16);
        assert_eq!(core::mem::align_of::<FlowCounters>(), 8);
    }
}
