//! Stream verdict program: forwards bytes between two spliced sockets without waking userspace.
//!
//! The daemon puts both sockets of a client↔broker pair into `MQS_SOCKS` and records each one's
//! peer in `MQS_PEERS`; from then on every skb that arrives on one socket is queued directly on the
//! other socket's send path. Verdict only, no stream parser: MQTT framing does not matter to a
//! byte splice, and the parser's skb clones cost CPU (measured in shared/notes §5).
//!
//! `sk_msg` is not used: it acts on data a local process *sends*, and here nothing is sent by the
//! daemon once a flow is spliced; every byte comes in from the network on one socket.
//!
//! Backpressure: the kernel's redirect queue towards a peer is unbounded, so the daemon watches
//! each direction's bytes in flight. The program tells it, through `MQS_EVENTS`, when a socket's
//! redirected bytes pass the point the daemon asked about; a throttled socket's skbs are passed to
//! its own receive queue, where they count against its window, and the daemon moves them. Each
//! socket also has a hard limit the daemon keeps moving forward as its peer takes bytes; an skb
//! that would cross it is passed, not redirected, so the kernel's queues stay bounded however
//! late the daemon reacts.

use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::warn;
use proxy_common::{
    FlowCounters, FlowKey, GlobalCounters, PeerEntry, SignalEvent, direction, throttle,
};

/// Upper bound on spliced sockets (two per proxied connection).
const MAX_SOCKETS: u32 = 262_144;

/// Spliced sockets, keyed by socket cookie; the redirect helper needs the target to live here.
#[map(name = "mqs_socks")]
static MQS_SOCKS: SockHash<FlowKey> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Socket cookie → peer cookie, direction, throttle flag and signal point (daemon-written).
/// A socket without an entry is passed to its own receive queue, so userspace can read it.
#[map(name = "mqs_peers")]
static MQS_PEERS: HashMap<FlowKey, PeerEntry> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Socket cookie → what the program did with that socket's bytes (program-written).
#[map(name = "mqs_flow_counters")]
static MQS_FLOW_COUNTERS: HashMap<FlowKey, FlowCounters> =
    HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Totals over all flows, one slot per CPU.
#[map(name = "mqs_totals")]
static MQS_TOTALS: PerCpuArray<GlobalCounters> = PerCpuArray::with_max_entries(1, 0);

/// Signal events for the daemon: a socket passed its signal point.
#[map(name = "mqs_events")]
static MQS_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Entry point the kernel calls for every skb received on a socket in `MQS_SOCKS`.
#[stream_verdict]
pub fn mqs_verdict(ctx: SkBuffContext) -> u32 {
    match try_verdict(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_verdict(ctx: &SkBuffContext) -> Result<u32, u32> {
    let len = ctx.len() as u64;
    let totals = MQS_TOTALS.get_ptr_mut(0);
    // A bare FIN arrives as an empty skb. Redirected it races the daemon's own shutdown of the
    // peer and can put EPIPE on it; the daemon propagates FIN by the counter rule instead.
    if len == 0 {
        if let Some(totals) = totals {
            // SAFETY: per-CPU slot of an array map, valid for this program run, not shared.
            unsafe { (*totals).empty_dropped += 1 };
        }
        return Err(SK_DROP);
    }
    // SAFETY: `ctx.as_ptr()` is the `__sk_buff` the kernel passed to this program, which is the
    // context type `bpf_get_socket_cookie` expects for sk_skb programs.
    let cookie: FlowKey = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the entry is copied out at once, so no reference outlives this statement even if
    // userspace replaces or deletes the entry concurrently.
    let Some(entry) = (unsafe { MQS_PEERS.get(cookie) }).copied() else {
        return Ok(SK_PASS);
    };
    let flow = MQS_FLOW_COUNTERS.get_ptr_mut(cookie);
    // SAFETY: reads of this socket's own counters, written only under the same socket lock.
    let (redirected, passed) = flow.map_or((0, 0), |f| unsafe { ((*f).bytes, (*f).passed_bytes) });
    // Passed bytes not yet read by the daemon: redirecting now would overtake them.
    let unread = passed > entry.daemon_read;
    let over_limit = redirected + len > entry.hard_limit;
    let pass = entry.throttled == throttle::ON || unread || over_limit;
    if over_limit && !unread && entry.throttled != throttle::ON {
        // Throttling itself: the first skb over the limit. Tell the daemon, which takes over.
        if MQS_EVENTS
            .output::<SignalEvent>(SignalEvent { cookie }, 0)
            .is_err()
            && let Some(totals) = totals
        {
            // SAFETY: per-CPU slot of an array map, valid for this program run, not shared.
            unsafe { (*totals).signals_lost += 1 };
        }
    }
    if pass {
        // SAFETY: the flow's value; only this socket's verdicts write it, one at a time under the
        // socket's lock (see `FlowCounters`), and the daemon never writes it in place.
        if let Some(flow) = flow {
            unsafe { (*flow).passed_bytes += len };
        }
        if let Some(totals) = totals {
            // SAFETY: per-CPU slot of an array map, valid for this program run, not shared.
            unsafe { (*totals).passed_bytes += len };
        }
        return Ok(SK_PASS);
    }
    let mut signal = false;
    if let Some(flow) = flow {
        // SAFETY: as above: a single writer per entry, in place.
        unsafe {
            (*flow).bytes += len;
            (*flow).packets += 1;
            if (*flow).bytes >= entry.signal_at && (*flow).signaled_at != entry.signal_at {
                (*flow).signaled_at = entry.signal_at;
                signal = true;
            }
        }
    }
    let mut peer = entry.peer_cookie;
    // Flags 0 = queue on the peer's egress (send it out), not BPF_F_INGRESS (its receive queue).
    // The helper returns SK_PASS on success and SK_DROP when the peer is not in MQS_SOCKS.
    let verdict = MQS_SOCKS.redirect_skb(ctx, &mut peer, 0) as u32;
    let lost_signal = signal
        && MQS_EVENTS
            .output::<SignalEvent>(SignalEvent { cookie }, 0)
            .is_err();
    if verdict == SK_DROP {
        // Rare and serious (the bytes are lost): worth a line in the daemon's log.
        warn!(
            ctx,
            "redirect from socket {} to {} failed: peer not in mqs_socks", cookie, peer
        );
    }
    if let Some(totals) = totals {
        // SAFETY: per-CPU slot of an array map, valid for this program run, not shared.
        unsafe {
            if lost_signal {
                (*totals).signals_lost += 1;
            }
            if verdict == SK_DROP {
                (*totals).redirect_failed += 1;
            } else if entry.direction == direction::TO_UPSTREAM {
                (*totals).bytes_to_upstream += len;
                (*totals).packets += 1;
            } else {
                (*totals).bytes_to_client += len;
                (*totals).packets += 1;
            }
        }
    }
    Ok(verdict)
}
