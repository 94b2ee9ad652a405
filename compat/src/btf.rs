//! Kernel struct offsets for probes that cannot use CO-RE, and which hooked functions
//! fentry can attach to: read from BTF (the kernel's own `/sys/kernel/btf/vmlinux`, or a
//! file the user gives, e.g. from BTFHub).
//!
//! Both are read in one pass over the raw types, without building what a full parser
//! (libbpf's) builds and validates: vmlinux BTF holds over 100,000 types, and parsing it in
//! full took most of start-up. libbpf parses it once more when it loads the probes.

use std::path::Path;

use serde::Serialize;
use thiserror::Error;

use crate::kallsyms::{AttachPoints, Func};

/// `probes/sock_fields.h`: the one list of the struct sock fields the probes without CO-RE
/// read, as `SOCK_FIELD(name, member.path)` lines.
const SOCK_FIELDS_H: &str = include_str!("../../probes/sock_fields.h");

/// How many fields `probes/sock_fields.h` lists.
pub const SOCK_FIELDS: usize = count_fields(SOCK_FIELDS_H.as_bytes());

const fn count_fields(text: &[u8]) -> usize {
    const NEEDLE: &[u8] = b"\nSOCK_FIELD(";
    let (mut i, mut n) = (0, 0);
    while i + NEEDLE.len() <= text.len() {
        let mut j = 0;
        while j < NEEDLE.len() && text[i + j] == NEEDLE[j] {
            j += 1;
        }
        n += (j == NEEDLE.len()) as usize;
        i += 1;
    }
    n
}

/// One field of `probes/sock_fields.h`: its name in `struct sock_layout` and its member
/// path in the kernel's `struct sock`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SockField {
    pub name: &'static str,
    pub path: Vec<&'static str>,
}

/// The fields of `probes/sock_fields.h`, in order.
pub fn sock_fields() -> &'static [SockField] {
    static FIELDS: std::sync::LazyLock<Vec<SockField>> = std::sync::LazyLock::new(|| {
        SOCK_FIELDS_H
            .lines()
            .filter_map(|line| line.strip_prefix("SOCK_FIELD(")?.split_once(')'))
            .map(|(args, _)| {
                let (name, member) = args.split_once(',').expect("SOCK_FIELD(name, member)");
                SockField {
                    name: name.trim(),
                    path: member.trim().split('.').collect(),
                }
            })
            .collect()
    });
    &FIELDS
}

/// Byte offsets in `struct sock` of what the non-CO-RE probes read, in the order of
/// `probes/sock_fields.h` (that of `struct sock_layout`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets(pub [u16; SOCK_FIELDS]);

impl SockOffsets {
    /// Build from (field, offset) pairs; every field must be there.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, u16)>,
    ) -> Result<SockOffsets, String> {
        let mut found: [Option<u16>; SOCK_FIELDS] = [None; SOCK_FIELDS];
        for (name, offset) in pairs {
            if let Some(i) = sock_fields().iter().position(|f| f.name == name) {
                found[i] = Some(offset);
            }
        }
        let mut offsets = [0; SOCK_FIELDS];
        for (i, field) in sock_fields().iter().enumerate() {
            offsets[i] = found[i].ok_or_else(|| format!("no offset for {}", field.name))?;
        }
        Ok(SockOffsets(offsets))
    }

    /// The offset of field `name`.
    pub fn get(&self, name: &str) -> Option<u16> {
        let i = sock_fields().iter().position(|f| f.name == name)?;
        Some(self.0[i])
    }
}

/// As an object of field names and offsets (`--features --json`).
impl Serialize for SockOffsets {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(SOCK_FIELDS))?;
        for (field, offset) in sock_fields().iter().zip(self.0) {
            map.serialize_entry(field.name, &offset)?;
        }
        map.end()
    }
}

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("cannot read BTF from {path}: {why}")]
    Read { path: String, why: String },
    #[error("{path}: BTF has no struct sock")]
    NoSock { path: String },
    #[error("{path}: struct sock has no field {field} in its BTF")]
    NoField { path: String, field: String },
}

/// What one reading of a BTF file tells: the struct sock offsets, and which hooked
/// functions it describes (an fentry program attaches by BTF name, so for fentry this, not
/// kallsyms, says whether a function is there).
#[derive(Debug)]
pub struct BtfFacts {
    pub sock: Result<SockOffsets, BtfError>,
    pub functions: AttachPoints,
    /// The BTF type id of `tcp_v4_connect`'s FUNC: what a trial fentry program attaches to.
    pub tcp_v4_connect_id: Option<u32>,
}

/// Read a raw BTF file (as `/sys/kernel/btf/vmlinux`, BTFHub and `pahole
/// --btf_encode_detached` give them).
pub fn read(path: &Path) -> Result<BtfFacts, BtfError> {
    let shown = path.display().to_string();
    let data = std::fs::read(path).map_err(|e| BtfError::Read {
        path: shown.clone(),
        why: e.to_string(),
    })?;
    let btf = RawBtf::parse(&data).map_err(|why| BtfError::Read {
        path: shown.clone(),
        why,
    })?;
    Ok(btf.facts(&shown))
}

/// The running kernel's BTF.
pub fn read_kernel() -> Result<BtfFacts, BtfError> {
    read(Path::new(VMLINUX))
}

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Read the offsets from a BTF file.
pub fn sock_offsets(path: &Path) -> Result<SockOffsets, BtfError> {
    read(path)?.sock
}

/// BTF kinds this reader looks at (include/uapi/linux/btf.h).
mod kind {
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC: u32 = 12;
    pub const TYPE_TAG: u32 = 18;
}

/// Raw BTF: its type and string sections, and where each type starts.
struct RawBtf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// Byte offset in `types` of type id i + 1 (id 0 is void).
    starts: Vec<u32>,
}

/// One type's header (struct btf_type).
#[derive(Clone, Copy)]
struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    vlen: usize,
    /// size or type: the type it refers to, for modifiers and typedefs.
    size_type: u32,
    /// Where what follows the header (members, params...) starts in `types`.
    extra: usize,
}

const MAGIC: u16 = 0xeb9f;

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

impl<'a> RawBtf<'a> {
    fn parse(data: &'a [u8]) -> Result<RawBtf<'a>, String> {
        let magic = data.get(..2).map(|m| u16::from_ne_bytes([m[0], m[1]]));
        if magic != Some(MAGIC) {
            return Err(if data.starts_with(b"\x7fELF") {
                "an ELF file, not raw BTF (extract it: pahole --btf_encode_detached)".into()
            } else {
                "not a BTF file of this machine's byte order".into()
            });
        }
        let field = |i: usize| u32_at(data, 4 + 4 * i).ok_or("truncated BTF header");
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
        let section = |off: u32, len: u32| {
            let start = hdr_len as usize + off as usize;
            data.get(start..start + len as usize)
                .ok_or("truncated BTF: a section runs past the end")
        };
        let mut btf = RawBtf {
            types: section(type_off, type_len)?,
            strings: section(str_off, str_len)?,
            starts: Vec::new(),
        };
        btf.index()?;
        Ok(btf)
    }

    /// Walk the type section once, noting where each type starts.
    fn index(&mut self) -> Result<(), String> {
        let mut at = 0;
        while at < self.types.len() {
            self.starts.push(at as u32);
            let t = self.header(at).ok_or("truncated BTF type")?;
            at = t.extra + extra_len(t.kind, t.vlen).ok_or("unknown BTF kind")?;
        }
        if at != self.types.len() {
            return Err("truncated BTF type".into());
        }
        Ok(())
    }

    fn header(&self, at: usize) -> Option<Type> {
        let info = u32_at(self.types, at + 4)?;
        Some(Type {
            name_off: u32_at(self.types, at)?,
            kind: (info >> 24) & 0x1f,
            kind_flag: info >> 31 == 1,
            vlen: (info & 0xffff) as usize,
            size_type: u32_at(self.types, at + 8)?,
            extra: at + 12,
        })
    }

    fn by_id(&self, id: u32) -> Option<Type> {
        let at = *self.starts.get((id as usize).checked_sub(1)?)?;
        self.header(at as usize)
    }

    fn name(&self, off: u32) -> &'a [u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    fn types(&self) -> impl Iterator<Item = Type> + '_ {
        self.starts
            .iter()
            .filter_map(|&at| self.header(at as usize))
    }

    fn facts(&self, path: &str) -> BtfFacts {
        let mut sock = None;
        let mut functions = AttachPoints::default();
        let mut tcp_v4_connect_id = None;
        for (id, t) in (1..).zip(self.types()) {
            match t.kind {
                kind::FUNC => {
                    let name = self.name(t.name_off);
                    if let Some(func) = Func::ALL.iter().find(|f| f.name().as_bytes() == name) {
                        *functions.slot(*func) = Some(func.name().to_owned());
                        if *func == Func::TcpV4Connect {
                            tcp_v4_connect_id = Some(id);
                        }
                    }
                }
                kind::STRUCT if sock.is_none() && self.name(t.name_off) == b"sock" => {
                    sock = Some(t)
                }
                _ => {}
            }
        }
        BtfFacts {
            sock: sock
                .ok_or_else(|| BtfError::NoSock { path: path.into() })
                .and_then(|sock| self.offsets_in(sock, path)),
            functions,
            tcp_v4_connect_id,
        }
    }

    fn offsets_in(&self, sock: Type, path: &str) -> Result<SockOffsets, BtfError> {
        let mut offsets = [0; SOCK_FIELDS];
        for (offset, field) in offsets.iter_mut().zip(sock_fields()) {
            let missing = || BtfError::NoField {
                path: path.into(),
                field: field.path.join("."),
            };
            let bits = self.offset_bits(sock, &field.path).ok_or_else(missing)?;
            *offset = u16::try_from(bits / 8).map_err(|_| missing())?;
        }
        Ok(SockOffsets(offsets))
    }

    /// The members of a struct or union: (name, type id, bit offset), bitfields left out.
    fn members(&self, composite: Type) -> impl Iterator<Item = (&'a [u8], u32, u32)> + '_ {
        (0..composite.vlen).filter_map(move |i| {
            let at = composite.extra + 12 * i;
            let (name_off, ty, offset) = (
                u32_at(self.types, at)?,
                u32_at(self.types, at + 4)?,
                u32_at(self.types, at + 8)?,
            );
            // With kind_flag, the top 8 bits are a bitfield's size (0: not a bitfield).
            if composite.kind_flag && offset >> 24 != 0 {
                return None;
            }
            let offset = if composite.kind_flag {
                offset & 0xff_ffff
            } else {
                offset
            };
            Some((self.name(name_off), ty, offset))
        })
    }

    /// The struct or union type `id` names, through typedefs and qualifiers.
    fn composite(&self, mut id: u32) -> Option<Type> {
        for _ in 0..32 {
            let t = self.by_id(id)?;
            match t.kind {
                kind::STRUCT | kind::UNION => return Some(t),
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = t.size_type
                }
                _ => return None,
            }
        }
        None
    }

    /// The bit offset of `path` inside `composite`, looking through anonymous structs and
    /// unions (where the kernel keeps skc_daddr, skc_num and friends).
    fn offset_bits(&self, composite: Type, path: &[&str]) -> Option<u32> {
        let (first, rest) = path.split_first()?;
        for (name, ty, offset) in self.members(composite) {
            if name == first.as_bytes() {
                if rest.is_empty() {
                    return Some(offset);
                }
                return self
                    .offset_bits(self.composite(ty)?, rest)
                    .map(|o| o + offset);
            }
            if name.is_empty() {
                let found = self.composite(ty).and_then(|c| self.offset_bits(c, path));
                if let Some(found) = found {
                    return Some(found + offset);
                }
            }
        }
        None
    }
}

/// Bytes that follow a type's header, by kind (include/uapi/linux/btf.h); `None` for a
/// kind this reader does not know (a newer format: better to say so than misread).
fn extra_len(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        // UNKN, PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        0 | 2 | 7..=12 | 16 | 18 => 0,
        // INT, VAR, DECL_TAG
        1 | 14 | 17 => 4,
        // ARRAY
        3 => 12,
        // STRUCT, UNION, DATASEC, ENUM64
        4 | 5 | 15 | 19 => 12 * vlen,
        // ENUM, FUNC_PROTO
        6 | 13 => 8 * vlen,
        _ => return None,
    })
}
