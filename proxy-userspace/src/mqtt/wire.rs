//! Wire primitives shared by the packet modules: variable byte integers and a bounded cursor.

use std::ops::Range;

/// Outcome of decoding a variable byte integer from a buffer that may end early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VarInt {
    /// The value and how many bytes encoded it.
    Value { value: usize, len: usize },
    /// The buffer ended while the continuation bit was still set.
    Incomplete,
    /// A fourth byte still had its continuation bit set; MQTT allows at most four.
    TooLong,
}

/// Decodes an MQTT variable byte integer; non-minimal encodings are accepted like most brokers do.
pub(crate) fn decode_varint(buf: &[u8]) -> VarInt {
    let mut value = 0usize;
    for (i, &byte) in buf.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return VarInt::Value { value, len: i + 1 };
        }
    }
    if buf.len() >= 4 {
        VarInt::TooLong
    } else {
        VarInt::Incomplete
    }
}

/// A cursor that cannot read past the end of the packet it was given, so every field read
/// either succeeds or names the field that overran.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Starts at `pos` in `buf`; `buf` must end where the packet ends so overruns are caught.
    pub(crate) fn new(buf: &'a [u8], pos: usize) -> Self {
        Reader { buf, pos }
    }

    /// Offset of the next byte to read.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    /// Bytes left before the end of the packet.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Takes `n` bytes, or `None` (consuming nothing) when fewer remain.
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let bytes = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A two-byte length followed by that many bytes (MQTT strings and binary data), with the
    /// range of the content so callers can point back into the packet.
    pub(crate) fn length_prefixed(&mut self) -> Option<(&'a [u8], Range<usize>)> {
        let start = self.pos;
        let len = match self.u16() {
            Some(len) => usize::from(len),
            None => return None,
        };
        match self.take(len) {
            Some(bytes) => Some((bytes, self.pos - len..self.pos)),
            None => {
                self.pos = start;
                None
            }
        }
    }

    /// A variable byte integer, distinguishing running out of bytes from an over-long encoding.
    pub(crate) fn varint(&mut self) -> VarInt {
        let rest = self.buf.get(self.pos..).unwrap_or(&[]);
        let decoded = decode_varint(rest);
        if let VarInt::Value { len, .. } = decoded {
            self.pos += len;
        }
        decoded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_lengths() {
        assert_eq!(decode_varint(&[0x00]), VarInt::Value { value: 0, len: 1 });
        assert_eq!(decode_varint(&[0x7f]), VarInt::Value { value: 127, len: 1 });
        assert_eq!(
            decode_varint(&[0x80, 0x01]),
            VarInt::Value { value: 128, len: 2 }
        );
        assert_eq!(
            decode_varint(&[0xff, 0x7f]),
            VarInt::Value {
                value: 16_383,
                len: 2
            }
        );
        assert_eq!(
            decode_varint(&[0x80, 0x80, 0x01]),
            VarInt::Value {
                value: 16_384,
                len: 3
            }
        );
        assert_eq!(
            decode_varint(&[0xff, 0xff, 0xff, 0x7f]),
            VarInt::Value {
                value: 268_435_455,
                len: 4
            }
        );
        // Non-minimal: 0 encoded on two bytes.
        assert_eq!(
            decode_varint(&[0x80, 0x00]),
            VarInt::Value { value: 0, len: 2 }
        );
        // Trailing bytes after the integer are not consumed.
        assert_eq!(
            decode_varint(&[0x05, 0xff]),
            VarInt::Value { value: 5, len: 1 }
        );
    }

    #[test]
    fn varint_incomplete_and_too_long() {
        assert_eq!(decode_varint(&[]), VarInt::Incomplete);
        assert_eq!(decode_varint(&[0x80]), VarInt::Incomplete);
        assert_eq!(decode_varint(&[0x80, 0x80, 0x80]), VarInt::Incomplete);
        assert_eq!(decode_varint(&[0x80, 0x80, 0x80, 0x80]), VarInt::TooLong);
        assert_eq!(
            decode_varint(&[0x80, 0x80, 0x80, 0x80, 0x01]),
            VarInt::TooLong
        );
    }

    #[test]
    fn reader_never_overruns() {
        let mut r = Reader::new(&[0x00, 0x03, b'a', b'b'], 0);
        assert_eq!(r.length_prefixed(), None);
        assert_eq!(r.remaining(), 4, "a failed read consumes nothing");
        assert_eq!(r.u32(), Some(0x0003_6162));
        assert_eq!(r.u8(), None);
        assert_eq!(r.remaining(), 0);
    }
}
