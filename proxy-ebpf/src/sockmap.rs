//! Stream verdict program: forwards bytes between two spliced sockets without waking userspace.
//!
//! The daemon puts both sockets of a client↔broker pair into `MQS_SOCKS` and records each one's
//! peer in `MQS_PEERS`; from then on every skb that arrives on one socket is queued directly on the
//! other socket's send path.

use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};
use proxy_common::{FlowKey, PeerEntry};

/// Upper bound on spliced sockets (two per proxied connection); userspace may resize at load.
const MAX_SOCKETS: u32 = 65_536;

/// Spliced sockets, keyed by socket cookie; the redirect helper needs the target to live here.
#[map(name = "mqs_socks")]
static MQS_SOCKS: SockHash<FlowKey> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Socket cookie → the cookie of the socket its bytes go to. A socket without an entry is passed
/// to its normal receive queue, so userspace keeps reading it.
#[map(name = "mqs_peers")]
static MQS_PEERS: HashMap<FlowKey, PeerEntry> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Entry point the kernel calls for every skb received on a socket in `MQS_SOCKS`.
#[stream_verdict]
pub fn mqs_verdict(ctx: SkBuffContext) -> u32 {
    match try_verdict(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_verdict(ctx: &SkBuffContext) -> Result<u32, u32> {
    // Nothing to forward; the kernel does not expect empty skbs here, so refuse them.
    if ctx.len() == 0 {
        return Err(SK_DROP);
    }
    // SAFETY: `ctx.as_ptr()` is the `__sk_buff` the kernel passed to this program, which is the
    // context type `bpf_get_socket_cookie` expects for sk_skb programs.
    let cookie: FlowKey = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the entry is copied out at once, so no reference outlives this statement even if
    // userspace rewrites or deletes the entry concurrently.
    let Some(entry) = (unsafe { MQS_PEERS.get(cookie) }).copied() else {
        return Ok(SK_PASS);
    };
    let mut peer = entry.peer_cookie;
    // Flags 0 = queue on the peer's egress (send it out), not BPF_F_INGRESS (its receive queue).
    // The helper returns SK_PASS on success and SK_DROP when the peer is not in MQS_SOCKS.
    let verdict = MQS_SOCKS.redirect_skb(ctx, &mut peer, 0);
    Ok(verdict as u32)
}
