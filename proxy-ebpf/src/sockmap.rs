//! Stream verdict program: forwards bytes between two spliced sockets without waking userspace.
//!
//! The daemon puts both sockets of a client↔broker pair into `MQS_SOCKS` and records each one's
//! peer in `MQS_PEERS`; from then on every skb that arrives on one socket is queued directly on the
//! other socket's send path. Verdict only, no stream parser: MQTT framing does not matter to a
//! byte splice, and the parser clones every skb, which costs CPU.
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
    helpers::{bpf_get_socket_cookie, bpf_probe_read_kernel},
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::warn;
use proxy_common::{
    FlowCounters, FlowKey, GlobalCounters, PeerEntry, SegmentCheck, SignalEvent, check_segment,
    direction, throttle,
};

/// Offsets in the running kernel's structs, from its BTF, written by the daemon at load time
/// (`EbpfLoader::override_global`); 0 when unknown, and then skbs are not checked against the stream.
/// `sk_buff.cb`: TCP keeps a segment's sequence number at its start (`TCP_SKB_CB(skb)->seq`), still
/// there when the verdict runs.
#[unsafe(no_mangle)]
static SKB_CB_OFFSET: u32 = 0;
/// `sk_buff.sk`: the socket the skb was received on.
#[unsafe(no_mangle)]
static SKB_SK_OFFSET: u32 = 0;
/// `tcp_sock.copied_seq`: the next byte a reader of the socket would get.
#[unsafe(no_mangle)]
static TCP_COPIED_SEQ_OFFSET: u32 = 0;

/// Most bytes one call of `bpf_skb_adjust_room` takes off an sk_skb's head.
const TRIM_STEP: u32 = 4095;
/// Bound of the trim loop (the verifier needs one): up to 1 MiB of already-seen bytes.
const TRIM_STEPS_MAX: u32 = 256;

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

/// Reads a kernel value at `base + offset` (a scalar address: the verifier lets a privileged
/// program hand any address to `bpf_probe_read_kernel`, which fails cleanly on a bad one).
fn read_kernel<T>(base: u64, offset: u32) -> Option<T> {
    // SAFETY: the helper copies `size_of::<T>()` bytes into a local, checking the address itself;
    // nothing in the program dereferences it.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.ok()
}

/// Makes the skb start at the socket's next unseen byte, so no byte goes on twice.
///
/// TCP queues a segment that begins before `rcv_nxt` (a retransmission overlapping bytes already
/// received, or a skb a reader has partly consumed) as it came, and leaves it to the reader to
/// skip the seen part by `copied_seq`; the verdict path (`tcp_read_skb` → `sk_psock_verdict_recv`)
/// hands the whole skb over and would send the seen bytes again. Measured here (docs/
/// sockmap-replay.md): a 198,656-byte skb whose first 130,966 bytes the program had already
/// forwarded. The program keeps each socket's next sequence number, starting from `copied_seq` at
/// its first verdict, and trims what came before it; an skb of seen bytes only is dropped. An skb
/// it cannot trim is dropped and the flow marked broken: the daemon resets it rather than let a
/// byte be sent twice.
fn skip_seen_bytes(
    ctx: &SkBuffContext,
    flow: *mut FlowCounters,
    totals: Option<*mut GlobalCounters>,
    cookie: FlowKey,
) -> Result<(), u32> {
    // SAFETY: constants of the object, patched by the loader before the program was loaded.
    let (cb, sk_off, copied_off) = unsafe {
        (
            core::ptr::read_volatile(&SKB_CB_OFFSET),
            core::ptr::read_volatile(&SKB_SK_OFFSET),
            core::ptr::read_volatile(&TCP_COPIED_SEQ_OFFSET),
        )
    };
    if cb == 0 {
        return Ok(());
    }
    let skb = ctx.as_ptr() as u64;
    let Some(seq) = read_kernel::<u32>(skb, cb) else {
        return Ok(());
    };
    let len = ctx.len();
    // SAFETY: a single writer per entry, in place (see `FlowCounters`).
    let (next, known) = unsafe { ((*flow).next_seq, (*flow).seq_known != 0) };
    let (next, known) = if known || sk_off == 0 || copied_off == 0 {
        (next, known)
    } else {
        // The first verdict on this socket: the daemon may have read (or peeked) up to here.
        match read_kernel::<u64>(skb, sk_off).and_then(|sk| read_kernel::<u32>(sk, copied_off)) {
            Some(copied) => (copied, true),
            None => (0, false),
        }
    };
    let seen = match check_segment(next, known, seq, len) {
        SegmentCheck::New => 0,
        SegmentCheck::Gap(skipped) => {
            // Bytes went around the program (read by the daemon before its first verdict, or
            // taken by a plain `recvmsg`): nothing to undo here, the counters rule sees it.
            warn!(
                ctx,
                "socket {}: skb at seq {} is {} bytes past the next unseen one",
                cookie,
                seq,
                skipped
            );
            0
        }
        SegmentCheck::Replay => {
            count(totals, |t| {
                t.replayed_skbs += 1;
                t.replayed_bytes += len as u64;
            });
            // SAFETY: as above.
            unsafe { (*flow).replayed_bytes += len as u64 };
            return Err(SK_DROP);
        }
        SegmentCheck::Overlap(seen) => seen,
    };
    if seen > 0 {
        let mut left = seen;
        for _ in 0..TRIM_STEPS_MAX {
            if left == 0 {
                break;
            }
            let step = if left < TRIM_STEP { left } else { TRIM_STEP };
            if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
                break;
            }
            left -= step;
        }
        if left > 0 {
            warn!(
                ctx,
                "socket {}: could not trim {} seen bytes off an skb: flow marked broken",
                cookie,
                left
            );
            // SAFETY: as above.
            unsafe { (*flow).broken = 1 };
            count(totals, |t| t.trim_failed += 1);
            if MQS_EVENTS
                .output::<SignalEvent>(SignalEvent { cookie }, 0)
                .is_err()
            {
                count(totals, |t| t.signals_lost += 1);
            }
            return Err(SK_DROP);
        }
        count(totals, |t| {
            t.overlap_skbs += 1;
            t.overlap_bytes_trimmed += seen as u64;
        });
    }
    // SAFETY: as above.
    unsafe {
        (*flow).next_seq = seq.wrapping_add(len);
        (*flow).seq_known = 1;
    }
    Ok(())
}

/// Adds to this CPU's slot of the totals.
fn count(totals: Option<*mut GlobalCounters>, add: impl FnOnce(&mut GlobalCounters)) {
    if let Some(totals) = totals {
        // SAFETY: per-CPU slot of an array map, valid for this program run, not shared.
        add(unsafe { &mut *totals });
    }
}

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
    if let Some(flow) = flow {
        skip_seen_bytes(ctx, flow, totals, cookie)?;
    }
    // Trimming shortens the skb: every count below is of the bytes that go on.
    let len = ctx.len() as u64;
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
