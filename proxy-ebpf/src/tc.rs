//! TC classifier of the packet splice: at ingress of the interfaces that carry client and broker
//! traffic, every segment of a spliced flow's one leg is rewritten into a segment of its other leg.
//!
//! The daemon relays the CONNECT, freezes the flow (`leg_mode::FREEZE`: data and FIN segments are
//! dropped, to be sent again by their peer), moves what its sockets already hold, mutes them
//! (`TCP_REPAIR`) and then writes each leg's rewrite (`leg_mode::SPLICE`): addresses and ports,
//! sequence and acknowledgment numbers, SACK edges, timestamps and the window field move from one
//! leg's number space to the other's. The client and the broker then run one TCP conversation with
//! their own windows and retransmissions; nothing is queued here. The rules themselves are pure
//! functions in `proxy_common::segment`, tested on the host.
//!
//! The program watches each flow's FINs and RST and tells the daemon once, through
//! `MQS_PKT_EVENTS`, when the flow is over; it never signals per packet.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_ns, bpf_redirect_neigh},
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use proxy_common::packet::{
    PacketEndEvent, PacketFlowState, PacketKey, PacketLeg, PacketTotals, family, leg_mode,
};
use proxy_common::segment::{
    OptionAt, OptionRewrite, SACK_BLOCKS_MAX, TCP_OPTIONS_MAX, next_option, option_kind,
    rescale_window, rewrite_timestamp_values, shift_seq,
};

/// Default size of the flow table (two legs per flow); the daemon sets it from
/// `dataplane.packet.flow_table_size` when it loads the program.
const MAX_LEGS: u32 = 131_072;

/// The program's verdicts. The bindings type them `u32` on the bpf target and `i32` on the host,
/// where this file is only linted.
#[allow(clippy::unnecessary_cast)]
const PASS: i32 = TC_ACT_OK as i32;
#[allow(clippy::unnecessary_cast)]
const DROP: i32 = TC_ACT_SHOT as i32;
/// A segment that is not ours: the next program on the interface decides (`TCX_NEXT`, which is
/// `TC_ACT_UNSPEC` for a classic filter), so instances attached to one interface (tests, an
/// upgrade) each see their own flows.
const NEXT: i32 = -1;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Offsets in the TCP header.
const TCP_SEQ: usize = 4;
const TCP_ACK_SEQ: usize = 8;
const TCP_WINDOW: usize = 14;
const TCP_CHECK: usize = 16;

/// Hash maps allocate an entry when the daemon inserts it, not all of them when the object is
/// loaded: the table is sized for the most flows, and is loaded beside the sockmap programs too.
const NO_PREALLOC: u32 = BPF_F_NO_PREALLOC;

/// The flow table: a leg's incoming segments (as they arrive) → how they are rewritten. A plain
/// hash, not an LRU: an evicted live flow would hang; a flow that does not fit is not spliced.
#[map(name = "mqs_pkt_flows")]
static MQS_PKT_FLOWS: HashMap<PacketKey, PacketLeg> =
    HashMap::with_max_entries(MAX_LEGS, NO_PREALLOC);

/// Per-flow state, keyed by the flow id in [`PacketLeg::flow`] (daemon-created, program-written).
#[map(name = "mqs_pkt_state")]
static MQS_PKT_STATE: HashMap<u64, PacketFlowState> =
    HashMap::with_max_entries(MAX_LEGS, NO_PREALLOC);

/// Totals over all flows, one slot per CPU.
#[map(name = "mqs_pkt_totals")]
static MQS_PKT_TOTALS: PerCpuArray<PacketTotals> = PerCpuArray::with_max_entries(1, 0);

/// Flows that ended (both FINs acknowledged, or a RST), for the daemon.
#[map(name = "mqs_pkt_events")]
static MQS_PKT_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// What the headers of a TCP segment say, and where they are.
struct Segment {
    key: PacketKey,
    /// Offset of the IP header.
    l3: usize,
    /// Offset of the TCP header.
    l4: usize,
    /// Bytes of TCP options.
    options_len: usize,
    payload_len: u32,
    flags: u8,
}

#[classifier]
pub fn mqs_packet(ctx: TcContext) -> i32 {
    match try_splice(&ctx) {
        Ok(action) => action,
        Err(()) => {
            count(|t| t.rewrite_failed += 1);
            DROP
        }
    }
}

fn count(update: impl FnOnce(&mut PacketTotals)) {
    if let Some(totals) = MQS_PKT_TOTALS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of a per-CPU array; the program does not run reentrantly on a CPU.
        update(unsafe { &mut *totals });
    }
}

/// Reads a value at `offset`, `Err` when the packet is shorter.
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, ()> {
    ctx.load::<T>(offset).map_err(|_| ())
}

/// The segment's addresses, ports and lengths; `None` for anything but TCP over IPv4 (without
/// fragments) or IPv6 (without extension headers).
fn parse(ctx: &TcContext) -> Option<Segment> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let l3 = ETH_HLEN;
    let mut key = PacketKey::default();
    let (l4, ip_payload) = match ethertype {
        ETH_P_IP => {
            let version_ihl: u8 = ctx.load(l3).ok()?;
            let ihl = ((version_ihl & 0x0f) as usize) * 4;
            let protocol: u8 = ctx.load(l3 + 9).ok()?;
            let frag: u16 = u16::from_be(ctx.load(l3 + 6).ok()?);
            if ihl < 20 || protocol != IPPROTO_TCP || frag & 0x3fff != 0 {
                return None;
            }
            let total: u16 = u16::from_be(ctx.load(l3 + 2).ok()?);
            let src: [u8; 4] = ctx.load(l3 + 12).ok()?;
            let dst: [u8; 4] = ctx.load(l3 + 16).ok()?;
            key.src[..4].copy_from_slice(&src);
            key.dst[..4].copy_from_slice(&dst);
            key.family = family::V4;
            (l3 + ihl, (total as usize).checked_sub(ihl)?)
        }
        ETH_P_IPV6 => {
            let next: u8 = ctx.load(l3 + 6).ok()?;
            if next != IPPROTO_TCP {
                return None;
            }
            let payload: u16 = u16::from_be(ctx.load(l3 + 4).ok()?);
            key.src = ctx.load(l3 + 8).ok()?;
            key.dst = ctx.load(l3 + 24).ok()?;
            key.family = family::V6;
            (l3 + IPV6_HLEN, payload as usize)
        }
        _ => return None,
    };
    key.sport = ctx.load(l4).ok()?;
    key.dport = ctx.load(l4 + 2).ok()?;
    let doff: u8 = ctx.load(l4 + 12).ok()?;
    let header = ((doff >> 4) as usize) * 4;
    if header < TCP_HLEN {
        return None;
    }
    let flags: u8 = ctx.load(l4 + 13).ok()?;
    Some(Segment {
        key,
        l3,
        l4,
        options_len: header - TCP_HLEN,
        payload_len: ip_payload.checked_sub(header)? as u32,
        flags,
    })
}

fn try_splice(ctx: &TcContext) -> Result<i32, ()> {
    let Some(segment) = parse(ctx) else {
        return Ok(NEXT);
    };
    // SAFETY: a copy of the daemon-written value; the daemon replaces entries whole.
    let Some(leg) = (unsafe { MQS_PKT_FLOWS.get(segment.key) }).copied() else {
        return Ok(NEXT);
    };
    if leg.mode == leg_mode::FREEZE {
        if segment.flags & TCP_ACK != 0
            && let Some(state) = MQS_PKT_STATE.get_ptr_mut(leg.flow)
        {
            let ack = u32::from_be(load::<u32>(ctx, segment.l4 + TCP_ACK_SEQ)?);
            let dir = (leg.direction & 1) as usize;
            // SAFETY: this flow's state entry; a lost race only delays the drain to a later ACK.
            unsafe {
                if (*state).peer_acked_seen[dir] == 0
                    || ack.wrapping_sub((*state).peer_acked[dir]) as i32 > 0
                {
                    (*state).peer_acked[dir] = ack;
                    (*state).peer_acked_seen[dir] = 1;
                }
            }
        }
        if leg.mode == leg_mode::FREEZE && (segment.payload_len > 0 || segment.flags & TCP_FIN != 0)
        {
            count(|t| t.frozen_drops += 1);
            return Ok(DROP);
        }
        return Ok(PASS);
    }
    if leg.mode != leg_mode::SPLICE {
        return Ok(PASS);
    }
    let state = MQS_PKT_STATE.get_ptr_mut(leg.flow).ok_or(())?;
    let dir = (leg.direction & 1) as usize;
    rewrite_addresses(ctx, &segment, &leg)?;
    let (seq, ack) = rewrite_numbers(ctx, &segment, &leg)?;
    rewrite_option_bytes(ctx, &segment, &leg, state, dir)?;
    track_end(&segment, state, leg.flow, dir, seq, ack);
    count(|t| {
        t.segments += 1;
        t.bytes += segment.payload_len as u64;
    });
    if leg.redirect_ifindex != 0 {
        // SAFETY: plain helper call; the kernel checks the interface.
        let action =
            unsafe { bpf_redirect_neigh(leg.redirect_ifindex, core::ptr::null_mut(), 0, 0) };
        return Ok(action as i32);
    }
    Ok(PASS)
}

/// Replaces `len` bytes at `offset` (addresses, ports) and folds the change into the checksums:
/// the TCP one always (addresses through the pseudo-header), the IPv4 header's for addresses.
fn replace_word(
    ctx: &TcContext,
    offset: usize,
    check: usize,
    ip_check: Option<usize>,
    old: u32,
    new: u32,
    pseudo: bool,
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.store(offset, &new, 0).map_err(|_| ())?;
    let flags = if pseudo { BPF_F_PSEUDO_HDR as u64 } else { 0 } | 4;
    ctx.l4_csum_replace(check, old as u64, new as u64, flags)
        .map_err(|_| ())?;
    if let Some(ip_check) = ip_check {
        ctx.l3_csum_replace(ip_check, old as u64, new as u64, 4)
            .map_err(|_| ())?;
    }
    Ok(())
}

fn word(bytes: &[u8; 16], i: usize) -> u32 {
    let at = i * 4;
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn rewrite_addresses(ctx: &TcContext, segment: &Segment, leg: &PacketLeg) -> Result<(), ()> {
    let check = segment.l4 + TCP_CHECK;
    let (words, src_at, dst_at, ip_check) = if segment.key.family == family::V4 {
        (1, segment.l3 + 12, segment.l3 + 16, Some(segment.l3 + 10))
    } else {
        (4, segment.l3 + 8, segment.l3 + 24, None)
    };
    for i in 0..4 {
        if i >= words {
            break;
        }
        let (old_src, new_src) = (word(&segment.key.src, i), word(&leg.new_src, i));
        replace_word(ctx, src_at + i * 4, check, ip_check, old_src, new_src, true)?;
        let (old_dst, new_dst) = (word(&segment.key.dst, i), word(&leg.new_dst, i));
        replace_word(ctx, dst_at + i * 4, check, ip_check, old_dst, new_dst, true)?;
    }
    // Both ports in one word: source then destination, as in the header.
    let old_ports = (segment.key.sport as u32) | ((segment.key.dport as u32) << 16);
    let new_ports = (leg.new_sport as u32) | ((leg.new_dport as u32) << 16);
    replace_word(ctx, segment.l4, check, None, old_ports, new_ports, false)
}

/// Sequence, acknowledgment and window; returns the segment's sequence number on the receiving
/// leg and its acknowledgment number as sent (in the sender's leg).
fn rewrite_numbers(ctx: &TcContext, segment: &Segment, leg: &PacketLeg) -> Result<(u32, u32), ()> {
    let check = segment.l4 + TCP_CHECK;
    let raw_seq: u32 = load(ctx, segment.l4 + TCP_SEQ)?;
    let seq = shift_seq(u32::from_be(raw_seq), leg.seq_delta);
    replace_word(
        ctx,
        segment.l4 + TCP_SEQ,
        check,
        None,
        raw_seq,
        seq.to_be(),
        false,
    )?;
    let raw_ack: u32 = load(ctx, segment.l4 + TCP_ACK_SEQ)?;
    if segment.flags & TCP_ACK != 0 {
        let ack = shift_seq(u32::from_be(raw_ack), leg.ack_delta);
        replace_word(
            ctx,
            segment.l4 + TCP_ACK_SEQ,
            check,
            None,
            raw_ack,
            ack.to_be(),
            false,
        )?;
    }
    let raw_window: u16 = load(ctx, segment.l4 + TCP_WINDOW)?;
    let window = rescale_window(u16::from_be(raw_window), leg.wscale_from, leg.wscale_to).to_be();
    if window != raw_window {
        ctx.store(segment.l4 + TCP_WINDOW, &window, 0)
            .map_err(|_| ())?;
        ctx.l4_csum_replace(check, raw_window as u64, window as u64, 2)
            .map_err(|_| ())?;
    }
    Ok((seq, u32::from_be(raw_ack)))
}

/// Timestamps and SACK edges, walked two bytes at a time (`next_option` decides) and rewritten
/// in the packet at the offsets found.
fn rewrite_option_bytes(
    ctx: &TcContext,
    segment: &Segment,
    leg: &PacketLeg,
    state: *mut PacketFlowState,
    dir: usize,
) -> Result<(), ()> {
    let len = segment.options_len;
    let base = segment.l4 + TCP_HLEN;
    let check = segment.l4 + TCP_CHECK;
    let mut at = 0usize;
    for _ in 0..TCP_OPTIONS_MAX {
        if at >= len {
            break;
        }
        // The last option byte may be a one-byte option: then the second byte read is payload
        // (or nothing), and `next_option` does not use it.
        let pair: [u8; 2] = ctx.load(base + at).unwrap_or([option_kind::END, 0]);
        match next_option(at, len, pair[0], pair[1]) {
            OptionAt::End => break,
            OptionAt::Malformed => {
                count(|t| t.malformed_options += 1);
                break;
            }
            OptionAt::Skip(next) => at = next,
            OptionAt::Timestamp { at: ts, next } => {
                rewrite_timestamp(ctx, base + ts + 2, check, leg, state, dir)?;
                at = next;
            }
            OptionAt::Sack {
                at: sack,
                blocks,
                next,
            } => {
                for edge in 0..SACK_BLOCKS_MAX * 2 {
                    if edge >= blocks * 2 {
                        break;
                    }
                    let edge_at = base + sack + 2 + edge * 4;
                    let raw: u32 = load(ctx, edge_at)?;
                    let moved = shift_seq(u32::from_be(raw), leg.ack_delta).to_be();
                    replace_word(ctx, edge_at, check, None, raw, moved, false)?;
                }
                at = next;
            }
        }
    }
    Ok(())
}

/// TSval and TSecr at `at` for the receiving leg; the direction's first timestamp teaches its delta.
fn rewrite_timestamp(
    ctx: &TcContext,
    at: usize,
    check: usize,
    leg: &PacketLeg,
    state: *mut PacketFlowState,
    dir: usize,
) -> Result<(), ()> {
    let other = dir ^ 1;
    // SAFETY: fields of this flow's state entry, read by value.
    let (learned, delta, other_learned, other_delta) = unsafe {
        (
            (*state).ts_learned[dir] != 0,
            (*state).ts_val_delta[dir],
            (*state).ts_learned[other] != 0,
            (*state).ts_val_delta[other],
        )
    };
    let rewrite = OptionRewrite {
        ts_val_delta: learned.then_some(delta),
        ts_val_target: leg.ts_val_target,
        ts_ecr_delta: other_learned.then_some(0u32.wrapping_sub(other_delta)),
        sack_delta: leg.ack_delta,
    };
    let raw_val: u32 = load(ctx, at)?;
    let raw_ecr: u32 = load(ctx, at + 4)?;
    let values = rewrite_timestamp_values(u32::from_be(raw_val), u32::from_be(raw_ecr), &rewrite);
    replace_word(ctx, at, check, None, raw_val, values.ts_val.to_be(), false)?;
    replace_word(
        ctx,
        at + 4,
        check,
        None,
        raw_ecr,
        values.ts_ecr.to_be(),
        false,
    )?;
    if let Some(learned) = values.learned_ts_val_delta {
        // SAFETY: this flow's state entry; the delta is written before the flag that publishes it.
        unsafe {
            (*state).ts_val_delta[dir] = learned;
            (*state).ts_learned[dir] = 1;
        }
    }
    Ok(())
}

/// Counts the segment and notes FINs, their acknowledgment and RSTs; tells the daemon once
/// when the flow is over.
fn track_end(
    segment: &Segment,
    state: *mut PacketFlowState,
    flow: u64,
    dir: usize,
    seq: u32,
    ack: u32,
) {
    let other = dir ^ 1;
    // SAFETY: this flow's state entry. Counters may lose an increment when two CPUs race on one
    // flow (they are for stats); each flag is only ever set to 1.
    unsafe {
        (*state).bytes[dir] += segment.payload_len as u64;
        (*state).packets[dir] += 1;
        (*state).last_seen_ns = bpf_ktime_get_ns();
        let end = seq.wrapping_add(segment.payload_len);
        if segment.payload_len > 0
            && ((*state).seq_end_seen[dir] == 0
                || end.wrapping_sub((*state).seq_end[dir]) as i32 > 0)
        {
            (*state).seq_end[dir] = end;
            (*state).seq_end_seen[dir] = 1;
        }
        if segment.flags & TCP_FIN != 0 {
            (*state).fin_end[dir] = seq.wrapping_add(segment.payload_len).wrapping_add(1);
            (*state).fin_seen[dir] = 1;
            if (*state).first_fin == 0 {
                (*state).first_fin = dir as u32 + 1;
            }
        }
        if segment.flags & TCP_ACK != 0
            && (*state).fin_seen[other] != 0
            && ack.wrapping_sub((*state).fin_end[other]) as i32 >= 0
        {
            (*state).fin_acked[other] = 1;
        }
        if segment.flags & TCP_RST != 0 {
            if (*state).reset_by == 0 {
                (*state).reset_by = dir as u32 + 1;
            }
            (*state).reset = 1;
        }
        let over =
            (*state).reset != 0 || ((*state).fin_acked[0] != 0 && (*state).fin_acked[1] != 0);
        if over && (*state).end_signaled == 0 {
            (*state).end_signaled = 1;
            let event = PacketEndEvent { flow };
            if MQS_PKT_EVENTS.output::<PacketEndEvent>(&event, 0).is_err() {
                count(|t| t.events_lost += 1);
            }
        }
    }
}
