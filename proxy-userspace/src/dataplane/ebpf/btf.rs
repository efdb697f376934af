//! Offsets of the few kernel struct members the verdict program reads, taken from the running
//! kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The program reads a segment's TCP sequence number (`sk_buff.cb`) and, once per socket,
//! `tcp_sock.copied_seq`, with `bpf_probe_read_kernel`; those offsets differ between kernel
//! builds, and Rust BPF programs have no CO-RE relocations, so the daemon looks them up here and
//! writes them into the object before loading it. A parser over a byte slice: only what finding a
//! member needs (the type section's record sizes, struct and union members), unit-tested on
//! hand-built BTF.

use std::fmt;

/// Where the running kernel's BTF lives.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Why an offset could not be found; the program then runs without the stream check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BtfError(String);

impl fmt::Display for BtfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BtfError {}

fn err(msg: impl Into<String>) -> BtfError {
    BtfError(msg.into())
}

/// The offsets the verdict program needs, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct sk_buff`, member `cb`.
    pub skb_cb: u32,
    /// `struct sk_buff`, member `sk`.
    pub skb_sk: u32,
    /// `struct tcp_sock`, member `copied_seq`.
    pub tcp_copied_seq: u32,
}

impl KernelOffsets {
    /// Reads the running kernel's BTF.
    pub fn of_running_kernel() -> Result<Self, BtfError> {
        let data = std::fs::read(VMLINUX_BTF).map_err(|e| err(format!("{VMLINUX_BTF}: {e}")))?;
        Self::from_btf(&data)
    }

    /// Finds the offsets in a BTF blob.
    pub fn from_btf(data: &[u8]) -> Result<Self, BtfError> {
        let btf = Btf::parse(data)?;
        Ok(Self {
            skb_cb: btf.member_offset("sk_buff", "cb")?,
            skb_sk: btf.member_offset("sk_buff", "sk")?,
            tcp_copied_seq: btf.member_offset("tcp_sock", "copied_seq")?,
        })
    }
}

/// One type record: its kind, name, `size`/`type` word and where its trailing data starts.
#[derive(Debug, Clone, Copy)]
struct TypeRecord {
    kind: u32,
    kind_flag: bool,
    vlen: u32,
    name_off: u32,
    size_or_type: u32,
    extra: usize,
}

/// A parsed BTF blob: the type records in id order (id 0 is `void`) and the string section.
struct Btf<'a> {
    types: Vec<TypeRecord>,
    type_data: &'a [u8],
    strings: &'a [u8],
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| err("BTF truncated"))
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> Result<Self, BtfError> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| err("BTF truncated"))?;
        if magic != MAGIC {
            return Err(err(format!("not little-endian BTF (magic {magic:#06x})")));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or_else(|| err("BTF section out of bounds"))
        };
        let type_data = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;
        let mut types = vec![TypeRecord {
            kind: 0,
            kind_flag: false,
            vlen: 0,
            name_off: 0,
            size_or_type: 0,
            extra: 0,
        }];
        let mut at = 0;
        while at < type_data.len() {
            let name_off = u32_at(type_data, at)?;
            let info = u32_at(type_data, at + 4)?;
            let size_or_type = u32_at(type_data, at + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            let extra = at + 12;
            let trailing = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen as usize,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen as usize,
                0..=19 => 0,
                other => return Err(err(format!("unknown BTF kind {other}"))),
            };
            types.push(TypeRecord {
                kind,
                kind_flag: info >> 31 != 0,
                vlen,
                name_off,
                size_or_type,
                extra,
            });
            at = extra + trailing;
        }
        Ok(Self {
            types,
            type_data,
            strings,
        })
    }

    fn name(&self, off: u32) -> &'a [u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    /// The struct or union a type id stands for, looking through typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&TypeRecord> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `member` in `struct name`, looking into anonymous structs and unions.
    fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let strukt = self
            .types
            .iter()
            .find(|t| t.kind == KIND_STRUCT && self.name(t.name_off) == name.as_bytes())
            .ok_or_else(|| err(format!("struct {name} not in BTF")))?;
        let bits = self
            .find_member(strukt, member.as_bytes(), 0)?
            .ok_or_else(|| err(format!("struct {name} has no member {member}")))?;
        if bits % 8 != 0 {
            return Err(err(format!("{name}.{member} is a bitfield")));
        }
        Ok(bits / 8)
    }

    fn find_member(
        &self,
        strukt: &TypeRecord,
        member: &[u8],
        depth: u32,
    ) -> Result<Option<u32>, BtfError> {
        if depth > 8 {
            return Ok(None);
        }
        let mut anonymous = Vec::new();
        for i in 0..strukt.vlen as usize {
            let at = strukt.extra + 12 * i;
            let name_off = u32_at(self.type_data, at)?;
            let type_id = u32_at(self.type_data, at + 4)?;
            let offset = u32_at(self.type_data, at + 8)?;
            let bits = if strukt.kind_flag {
                offset & 0x00ff_ffff
            } else {
                offset
            };
            if name_off == 0 {
                anonymous.push((type_id, bits));
            } else if self.name(name_off) == member {
                return Ok(Some(bits));
            }
        }
        for (type_id, bits) in anonymous {
            if let Some(inner) = self
                .resolve(type_id)
                .filter(|t| matches!(t.kind, KIND_STRUCT | KIND_UNION))
                && let Some(found) = self.find_member(inner, member, depth + 1)?
            {
                return Ok(Some(bits + found));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob from `(kind, kind_flag, vlen, name, size_or_type, trailing words)`.
    fn blob(types: &[(u32, bool, &str, u32, Vec<u32>)]) -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut type_data = Vec::new();
        fn name_of(s: &str, strings: &mut Vec<u8>) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = strings.len() as u32;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            off
        }
        for (kind, flag, name, size, trailing) in types {
            let vlen = match *kind {
                KIND_STRUCT | KIND_UNION => trailing.len() as u32 / 3,
                _ => 0,
            };
            let info = (kind << 24) | vlen | if *flag { 1 << 31 } else { 0 };
            for w in [name_of(name, &mut strings), info, *size] {
                type_data.extend_from_slice(&w.to_le_bytes());
            }
            for w in trailing {
                type_data.extend_from_slice(&w.to_le_bytes());
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            type_data.len() as u32,
            type_data.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&type_data);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_direct_and_anonymous_members_and_skips_other_kinds() {
        // Member names are string offsets; types named after them put them in the string table
        // first. 1: int "cb", 2: int "sk", 3: int "copied_seq", 4: an enum without values.
        let mut types: Vec<(u32, bool, &str, u32, Vec<u32>)> = vec![
            (KIND_INT, false, "cb", 4, vec![32]),
            (KIND_INT, false, "sk", 4, vec![32]),
            (KIND_INT, false, "copied_seq", 4, vec![32]),
            (KIND_ENUM, false, "", 4, vec![]),
        ];
        // String offsets: "cb" at 1, "sk" at 4, "copied_seq" at 7.
        let (cb, sk, copied) = (1u32, 4u32, 7u32);
        // 5: anonymous union { sk } ; 6: struct sk_buff { (anon union at 192 bits), cb at 320 }
        types.push((KIND_UNION, false, "", 8, vec![sk, 2, 0]));
        types.push((
            KIND_STRUCT,
            false,
            "sk_buff",
            224,
            vec![0, 5, 192, cb, 1, 320],
        ));
        // 7: typedef of an int (an anonymous member that is no struct); 9: struct tcp_sock with a
        // bitfield-style (kind_flag) member list.
        types.push((KIND_TYPEDEF, false, "inner_t", 8, vec![]));
        types.push((KIND_INT, false, "pad", 4, vec![32]));
        types.push((
            KIND_STRUCT,
            true,
            "tcp_sock",
            2048,
            vec![0, 7, 0, copied, 3, 13_000],
        ));
        let data = blob(&types);
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(btf.member_offset("sk_buff", "cb"), Ok(40));
        assert_eq!(btf.member_offset("sk_buff", "sk"), Ok(24));
        assert_eq!(btf.member_offset("tcp_sock", "copied_seq"), Ok(1625));
        assert!(btf.member_offset("sk_buff", "len").is_err());
        assert!(btf.member_offset("sock", "sk").is_err());
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[0u8; 24]).is_err());
        let mut truncated = blob(&[(KIND_INT, false, "x", 4, vec![32])]);
        truncated.truncate(30);
        assert!(Btf::parse(&truncated).is_err());
    }

    #[test]
    fn the_running_kernel_has_the_offsets_the_program_needs() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            eprintln!("skipped: {VMLINUX_BTF} absent");
            return;
        }
        let offsets = KernelOffsets::of_running_kernel().unwrap();
        // sk_buff's layout before `cb` (list links, device, socket, timestamp) has been the same
        // on 64-bit kernels for years; a different answer means the parser is wrong.
        assert_eq!(offsets.skb_cb, 40);
        assert_eq!(offsets.skb_sk, 24);
        assert!(offsets.tcp_copied_seq > 1000, "{offsets:?}");
    }
}
