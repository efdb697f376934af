//! How a TCP segment of one leg of a packet-spliced flow becomes a segment of the other leg.
//!
//! Once a flow is packet-spliced, the client and the broker run one TCP conversation through two
//! connections that the proxy opened and then muted: each leg has its own initial sequence
//! numbers, timestamp clock, window scale and options. The TC program rewrites every segment with
//! these rules; they live here, over plain integers and a fixed-size option buffer, so that they
//! are unit-tested on the host and stay within what the BPF verifier accepts (bounded loops,
//! checked indexes, no allocation).

/// Most bytes of TCP options a segment can carry: a data offset of 15 words, less the 20-byte header.
pub const TCP_OPTIONS_MAX: usize = 40;

/// TCP option kinds the rewrite reads.
pub mod option_kind {
    /// End of the option list.
    pub const END: u8 = 0;
    /// Padding.
    pub const NOP: u8 = 1;
    /// Selective acknowledgment blocks (RFC 2018): pairs of sequence numbers of received data.
    pub const SACK: u8 = 5;
    /// Timestamps (RFC 7323): the sender's clock (TSval) and the echo of the peer's (TSecr).
    pub const TIMESTAMP: u8 = 8;
}

/// Length of the timestamp option: kind, length, TSval, TSecr.
const TIMESTAMP_LEN: usize = 10;
/// Most SACK blocks an option can hold within [`TCP_OPTIONS_MAX`].
pub const SACK_BLOCKS_MAX: usize = 4;

/// A sequence number moved by `delta` in 32-bit serial arithmetic: how every sequence,
/// acknowledgment and SACK edge crosses from one leg's number space to the other's.
pub fn shift_seq(seq: u32, delta: u32) -> u32 {
    seq.wrapping_add(delta)
}

/// The delta that maps `from` onto `to`: for a direction, the next sequence number the outgoing
/// leg would send minus the next one expected on the incoming leg, both read from the muted
/// sockets (`TCP_QUEUE_SEQ`).
pub fn seq_delta(from: u32, to: u32) -> u32 {
    to.wrapping_sub(from)
}

/// A window field read with the sending leg's scale and written for the receiving leg's.
///
/// Each leg negotiated its own window scale in its handshake: a window advertised by the client
/// is read by the proxy's client socket as `window << from_shift`, and the broker reads what the
/// proxy's broker socket sends as `window << to_shift`. Rounded down, so the receiver is never
/// promised more room than its peer has, except that a non-zero window stays non-zero (a zero
/// window would make the sender stop and probe). Shifts above 14 are invalid in TCP and taken as 14.
pub fn rescale_window(window: u16, from_shift: u8, to_shift: u8) -> u16 {
    let from_shift = from_shift.min(14);
    let to_shift = to_shift.min(14);
    let bytes = (window as u32) << from_shift;
    let scaled = bytes >> to_shift;
    if scaled == 0 && bytes != 0 {
        1
    } else if scaled > u16::MAX as u32 {
        u16::MAX
    } else {
        scaled as u16
    }
}

/// How the options of one forwarded segment change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OptionRewrite {
    /// Added to TSval, so that the receiving end sees the sending leg's clock continue from
    /// where the proxy's own socket on the receiving leg left it. `None` until learned from the
    /// first segment that carries a timestamp (see `ts_val_target`).
    pub ts_val_delta: Option<u32>,
    /// What the first TSval seen must become: the proxy's next TSval on the receiving leg
    /// (`TCP_TIMESTAMP` of its muted socket, plus one), so that the receiver's last recorded
    /// TSval (from the proxy) is never ahead of the sender's (PAWS would drop the segment).
    pub ts_val_target: u32,
    /// Added to TSecr: the opposite direction's TSval delta, taken back out (its negation);
    /// `None` while that direction has not learned its delta, and then TSecr is set to 0, which
    /// a receiver takes as "no echo" for round-trip measurement.
    pub ts_ecr_delta: Option<u32>,
    /// Added to each SACK edge: the edges are sequence numbers of data the sender of this segment
    /// received, so they move like its acknowledgment number.
    pub sack_delta: u32,
}

/// What a walk over a segment's options found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OptionsRewritten {
    /// The segment carried a timestamp option.
    pub timestamp: bool,
    /// The TSval delta learned from this segment, when it was the first with a timestamp: the
    /// caller stores it for the direction's later segments.
    pub learned_ts_val_delta: Option<u32>,
    /// SACK blocks translated.
    pub sack_blocks: u8,
    /// The option list ended in a malformed option (a length that runs past the options or is
    /// below 2): the walk stopped there and left the rest as it was.
    pub malformed: bool,
}

fn read_u32(options: &[u8; TCP_OPTIONS_MAX], at: usize) -> Option<u32> {
    let bytes = options.get(at..at + 4)?;
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn write_u32(options: &mut [u8; TCP_OPTIONS_MAX], at: usize, value: u32) {
    if let Some(bytes) = options.get_mut(at..at + 4) {
        bytes.copy_from_slice(&value.to_be_bytes());
    }
}

/// What the option at one offset is, for a walk that reads two bytes at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionAt {
    /// The options are over (their end, or an end-of-list option).
    End,
    /// A length that runs past the options or is below 2: the walk stops here.
    Malformed,
    /// An option the rewrite leaves alone; the next one starts at this offset.
    Skip(usize),
    /// A timestamp option: TSval at `at + 2`, TSecr at `at + 6`; the next option at `next`.
    Timestamp { at: usize, next: usize },
    /// A SACK option of `blocks` blocks, the first edge at `at + 2`; the next option at `next`.
    Sack {
        at: usize,
        blocks: usize,
        next: usize,
    },
}

/// Says what the option starting at `at` is, from its first two bytes (`kind`, and `length`,
/// which means nothing for a one-byte option), among `len` bytes of options.
///
/// The walk reads those two bytes per step and this decides: the program reads them with a
/// helper at a plain offset, since indexing a stack copy by a moving offset made the verifier
/// tell every option position apart and give up at a million instructions.
pub fn next_option(at: usize, len: usize, kind: u8, length: u8) -> OptionAt {
    let len = if len > TCP_OPTIONS_MAX {
        TCP_OPTIONS_MAX
    } else {
        len
    };
    if at >= len || kind == option_kind::END {
        return OptionAt::End;
    }
    if kind == option_kind::NOP {
        return OptionAt::Skip(at + 1);
    }
    let option_len = length as usize;
    if at + 1 >= len || option_len < 2 || at + option_len > len {
        return OptionAt::Malformed;
    }
    let next = at + option_len;
    if kind == option_kind::TIMESTAMP && option_len == TIMESTAMP_LEN {
        OptionAt::Timestamp { at, next }
    } else if kind == option_kind::SACK {
        OptionAt::Sack {
            at,
            blocks: ((option_len - 2) / 8).min(SACK_BLOCKS_MAX),
            next,
        }
    } else {
        OptionAt::Skip(next)
    }
}

/// Rewrites the timestamp and SACK options among the first `len` bytes of `options` (the bytes
/// between the 20-byte TCP header and the payload) for the receiving leg, in place: the host's
/// twin of the program's walk, over the same [`next_option`] and [`rewrite_timestamp_values`].
///
/// Other options pass untouched (MSS and window scale only appear on SYNs, which are never
/// forwarded). The walk is bounded by [`TCP_OPTIONS_MAX`] steps.
pub fn rewrite_options(
    options: &mut [u8; TCP_OPTIONS_MAX],
    len: usize,
    rewrite: &OptionRewrite,
) -> OptionsRewritten {
    let mut done = OptionsRewritten::default();
    let mut at = 0;
    for _ in 0..TCP_OPTIONS_MAX {
        let kind = options.get(at).copied().unwrap_or(option_kind::END);
        let length = options.get(at + 1).copied().unwrap_or(0);
        match next_option(at, len, kind, length) {
            OptionAt::End => break,
            OptionAt::Malformed => {
                done.malformed = true;
                break;
            }
            OptionAt::Skip(next) => at = next,
            OptionAt::Timestamp { at: ts, next } => {
                rewrite_timestamp(options, ts, rewrite, &mut done);
                at = next;
            }
            OptionAt::Sack {
                at: sack,
                blocks,
                next,
            } => {
                for edge in 0..blocks * 2 {
                    let edge_at = sack + 2 + edge * 4;
                    if let Some(value) = read_u32(options, edge_at) {
                        write_u32(options, edge_at, shift_seq(value, rewrite.sack_delta));
                    }
                }
                done.sack_blocks += blocks as u8;
                at = next;
            }
        }
    }
    done
}

/// A timestamp option's two values for the receiving leg: TSval and TSecr rewritten, and the
/// TSval delta when this segment taught it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimestampValues {
    /// The new TSval.
    pub ts_val: u32,
    /// The new TSecr.
    pub ts_ecr: u32,
    /// The delta learned from this segment (its direction's first timestamp).
    pub learned_ts_val_delta: Option<u32>,
}

/// TSval and TSecr of one segment, rewritten for the receiving leg (see [`OptionRewrite`]).
pub fn rewrite_timestamp_values(
    ts_val: u32,
    ts_ecr: u32,
    rewrite: &OptionRewrite,
) -> TimestampValues {
    let (delta, learned) = match rewrite.ts_val_delta {
        Some(delta) => (delta, None),
        None => {
            let delta = rewrite.ts_val_target.wrapping_sub(ts_val);
            (delta, Some(delta))
        }
    };
    TimestampValues {
        ts_val: ts_val.wrapping_add(delta),
        ts_ecr: match rewrite.ts_ecr_delta {
            Some(ecr_delta) if ts_ecr != 0 => ts_ecr.wrapping_add(ecr_delta),
            _ => 0,
        },
        learned_ts_val_delta: learned,
    }
}

fn rewrite_timestamp(
    options: &mut [u8; TCP_OPTIONS_MAX],
    at: usize,
    rewrite: &OptionRewrite,
    done: &mut OptionsRewritten,
) {
    let (Some(ts_val), Some(ts_ecr)) = (read_u32(options, at + 2), read_u32(options, at + 6))
    else {
        return;
    };
    done.timestamp = true;
    let values = rewrite_timestamp_values(ts_val, ts_ecr, rewrite);
    done.learned_ts_val_delta = values.learned_ts_val_delta;
    write_u32(options, at + 2, values.ts_val);
    write_u32(options, at + 6, values.ts_ecr);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Options as Linux sends them on an established flow: NOP, NOP, timestamp.
    fn timestamped(ts_val: u32, ts_ecr: u32) -> [u8; TCP_OPTIONS_MAX] {
        let mut o = [0u8; TCP_OPTIONS_MAX];
        o[0] = option_kind::NOP;
        o[1] = option_kind::NOP;
        o[2] = option_kind::TIMESTAMP;
        o[3] = TIMESTAMP_LEN as u8;
        o[4..8].copy_from_slice(&ts_val.to_be_bytes());
        o[8..12].copy_from_slice(&ts_ecr.to_be_bytes());
        o
    }

    fn u32_at(o: &[u8; TCP_OPTIONS_MAX], at: usize) -> u32 {
        u32::from_be_bytes([o[at], o[at + 1], o[at + 2], o[at + 3]])
    }

    #[test]
    fn sequence_numbers_cross_legs_across_the_wrap() {
        // The client's next byte is 4,000,000,000 on its leg and 100 on the broker's.
        let delta = seq_delta(4_000_000_000, 100);
        assert_eq!(shift_seq(4_000_000_000, delta), 100);
        assert_eq!(
            shift_seq(4_000_000_000u32.wrapping_add(295_000_000), delta),
            295_000_100
        );
        // The way back undoes it.
        let back = seq_delta(100, 4_000_000_000);
        assert_eq!(shift_seq(shift_seq(123_456, delta), back), 123_456);
    }

    #[test]
    fn windows_are_read_with_one_scale_and_written_with_the_other() {
        // The same scale: unchanged.
        assert_eq!(rescale_window(1000, 7, 7), 1000);
        // 1000 << 7 = 128,000 bytes; at scale 9 that is 250 units.
        assert_eq!(rescale_window(1000, 7, 9), 250);
        // Rounded down, never more room than there is.
        assert_eq!(rescale_window(1001, 7, 9), 250);
        // Towards a smaller scale the field grows, up to its maximum.
        assert_eq!(rescale_window(1000, 9, 7), 4000);
        assert_eq!(rescale_window(40_000, 14, 0), u16::MAX);
        // A small open window stays open; a closed one stays closed.
        assert_eq!(rescale_window(1, 0, 7), 1);
        assert_eq!(rescale_window(0, 0, 7), 0);
        // Out-of-range shifts are read as TCP's maximum, 14.
        assert_eq!(rescale_window(4, 30, 14), 4);
    }

    #[test]
    fn the_first_timestamp_teaches_the_delta_and_later_ones_use_it() {
        let mut o = timestamped(5_000, 0);
        let rewrite = OptionRewrite {
            ts_val_target: 90_001,
            ..OptionRewrite::default()
        };
        let done = rewrite_options(&mut o, 12, &rewrite);
        assert!(done.timestamp);
        let learned = done
            .learned_ts_val_delta
            .expect("learned from the first segment");
        assert_eq!(u32_at(&o, 4), 90_001);
        // No echo is known yet: TSecr 0.
        assert_eq!(u32_at(&o, 8), 0);

        let mut o = timestamped(5_010, 777);
        let rewrite = OptionRewrite {
            ts_val_delta: Some(learned),
            ts_ecr_delta: Some(1u32.wrapping_sub(1_000)),
            ..OptionRewrite::default()
        };
        let done = rewrite_options(&mut o, 12, &rewrite);
        assert_eq!(done.learned_ts_val_delta, None);
        assert_eq!(u32_at(&o, 4), 90_011);
        // The echo of a translated TSval goes back to the clock it came from, across the wrap.
        assert_eq!(u32_at(&o, 8), 777u32.wrapping_sub(999));
    }

    #[test]
    fn sack_edges_move_like_acknowledgments() {
        let mut o = [0u8; TCP_OPTIONS_MAX];
        // NOP, NOP, SACK with two blocks, then NOP NOP timestamp.
        o[0] = option_kind::NOP;
        o[1] = option_kind::NOP;
        o[2] = option_kind::SACK;
        o[3] = 2 + 16;
        let edges = [10u32, 20, u32::MAX - 5, 3];
        for (i, e) in edges.iter().enumerate() {
            o[4 + i * 4..8 + i * 4].copy_from_slice(&e.to_be_bytes());
        }
        o[20] = option_kind::NOP;
        o[21] = option_kind::NOP;
        o[22] = option_kind::TIMESTAMP;
        o[23] = TIMESTAMP_LEN as u8;
        o[24..28].copy_from_slice(&7u32.to_be_bytes());
        let rewrite = OptionRewrite {
            ts_val_delta: Some(100),
            sack_delta: 1_000,
            ..OptionRewrite::default()
        };
        let done = rewrite_options(&mut o, 32, &rewrite);
        assert_eq!(done.sack_blocks, 2);
        assert!(done.timestamp);
        for (i, e) in edges.iter().enumerate() {
            assert_eq!(u32_at(&o, 4 + i * 4), e.wrapping_add(1_000), "edge {i}");
        }
        assert_eq!(u32_at(&o, 24), 107);
    }

    #[test]
    fn malformed_options_stop_the_walk_and_change_nothing_after_them() {
        // A zero length would loop forever without the check.
        let mut o = timestamped(1, 1);
        o[0] = 30;
        o[1] = 0;
        let before = o;
        let done = rewrite_options(&mut o, 12, &OptionRewrite::default());
        assert!(done.malformed);
        assert_eq!(o, before);
        // A length running past the options.
        let mut o = timestamped(1, 1);
        o[3] = 39;
        let done = rewrite_options(&mut o, 12, &OptionRewrite::default());
        assert!(done.malformed && !done.timestamp);
        // An option kind cut off at the end.
        let mut o = [option_kind::NOP; TCP_OPTIONS_MAX];
        o[3] = option_kind::TIMESTAMP;
        let done = rewrite_options(&mut o, 4, &OptionRewrite::default());
        assert!(done.malformed);
        // A claimed length beyond the buffer is cut to it.
        let mut o = timestamped(1, 0);
        let done = rewrite_options(&mut o, 400, &OptionRewrite::default());
        assert!(done.timestamp && !done.malformed);
    }

    #[test]
    fn end_of_options_ends_the_walk() {
        let mut o = timestamped(1, 1);
        o[0] = option_kind::END;
        let before = o;
        let done = rewrite_options(&mut o, 12, &OptionRewrite::default());
        assert_eq!(done, OptionsRewritten::default());
        assert_eq!(o, before);
    }
}
