//! Kernel struct offsets for probes that cannot use CO-RE, and which hooked functions
//! fentry can attach to: read from BTF (the kernel's own `/sys/kernel/btf/vmlinux`, or a
//! file the user gives, e.g. from BTFHub).
//!
//! Both are read by streaming the raw file once (its strings, then its types), without
//! building what a full parser (libbpf's) builds and validates, and without holding the
//! file: vmlinux BTF is megabytes, with over 100,000 types. (docs/benchmarks.md has what
//! this saves at start-up.)

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use aho_corasick::packed;
use serde::Serialize;
use thiserror::Error;

use crate::kallsyms::{AttachPoints, Func};

mod minimal;

/// One field of `probes/sock_fields.h`: its name in `struct sock_layout` and its member
/// path in the kernel's `struct sock`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SockField {
    pub name: &'static str,
    pub path: &'static [&'static str],
}

include!(concat!(env!("OUT_DIR"), "/sock_fields.rs"));

/// How many fields `probes/sock_fields.h` lists.
pub const SOCK_FIELDS: usize = SOCK_FIELD_LIST.len();

/// The fields of `probes/sock_fields.h`, in order.
pub fn sock_fields() -> &'static [SockField] {
    SOCK_FIELD_LIST
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

/// What one reading of a BTF file tells: the struct sock offsets, which hooked functions
/// it describes (an fentry program attaches by BTF name, so for fentry this, not kallsyms,
/// says whether a function is there) and their type ids, and a BTF of its own for the
/// CO-RE probes' relocations.
#[derive(Debug)]
pub struct BtfFacts {
    pub sock: Result<SockOffsets, BtfError>,
    pub functions: AttachPoints,
    /// The BTF type id of each hooked function's FUNC: what fentry programs attach to.
    pub function_ids: FunctionIds,
    /// The BTF type id of [`STATE_TRACEPOINT_TYPEDEF`]: what a BTF-typed raw tracepoint
    /// program on `sock:inet_sock_set_state` attaches to.
    pub state_tracepoint_id: Option<u32>,
    /// The [`CORE_ROOTS`] structs and every type they embed, as raw BTF (see
    /// [`minimal`]): all that the CO-RE probes' relocations need, for libbpf to read
    /// instead of the whole file.
    pub core_btf: Result<Vec<u8>, String>,
}

/// The BTF type ids of the hooked functions the kernel describes.
#[derive(Debug, Clone, Default)]
pub struct FunctionIds(Vec<(Func, u32)>);

impl FunctionIds {
    /// The BTF type id of `func`'s FUNC.
    pub fn get(&self, func: Func) -> Option<u32> {
        self.0.iter().find(|(f, _)| *f == func).map(|(_, id)| *id)
    }
}

/// Read a raw BTF file (as `/sys/kernel/btf/vmlinux`, BTFHub and `pahole
/// --btf_encode_detached` give them).
pub fn read(path: &Path) -> Result<BtfFacts, BtfError> {
    let shown = path.display().to_string();
    let failed = |why: String| BtfError::Read {
        path: shown.clone(),
        why,
    };
    let file = File::open(path).map_err(|e| failed(e.to_string()))?;
    let btf = StreamedBtf::scan(file).map_err(failed)?;
    btf.facts(&shown).map_err(failed)
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

/// BTF kinds (include/uapi/linux/btf.h).
mod kind {
    pub const UNKN: u32 = 0;
    pub const INT: u32 = 1;
    pub const PTR: u32 = 2;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const FWD: u32 = 7;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC: u32 = 12;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const FLOAT: u32 = 16;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

const MAGIC: u16 = 0xeb9f;

/// Reads of this size at most: the file is streamed, never held.
const CHUNK: usize = 64 * 1024;

/// What one streamed pass over a BTF file found: where each type starts (4 bytes a type:
/// the one table kept), the string offsets of the names this reader looks for, and the
/// ids of the hooked functions and of struct sock. Types are read again by id, from the
/// file, where struct sock's members are resolved.
struct StreamedBtf {
    file: File,
    /// File offset of the type section.
    types_at: u64,
    /// File offset and length of the string section.
    strings_at: u64,
    strings_len: u64,
    /// Offset in the type section of type id i + 1 (id 0 is void).
    starts: Vec<u32>,
    /// String offset → the wanted name there.
    names: WantedNames,
    functions: Vec<(Func, u32)>,
    state_tracepoint: Option<u32>,
    sock: Option<u32>,
    /// The ids of the [`CORE_ROOTS`] structs, in that order: the first of each name (a
    /// BTF made without deduplication, as RHEL 7's is, has a copy per compile unit).
    core_roots: [Option<u32>; CORE_ROOTS.len()],
}

/// The wanted names' string offsets, in order: looked up for every function, struct and
/// typedef of the kernel's. A bit for each offset's low 16 bits rules out almost all of
/// them in one load; a binary search of the few dozen tells the rest.
struct WantedNames {
    found: Vec<(u32, &'static str)>,
    maybe: Box<[u64; 1 << 10]>,
}

impl WantedNames {
    fn new(found: Vec<(u32, &'static str)>) -> WantedNames {
        let mut maybe = Box::new([0u64; 1 << 10]);
        for &(offset, _) in &found {
            let (word, bit) = Self::bit(offset);
            maybe[word] |= bit;
        }
        WantedNames { found, maybe }
    }

    /// Where `offset`'s bit is in `maybe`: the word, and the bit in it.
    fn bit(offset: u32) -> (usize, u64) {
        let low = offset & 0xffff;
        ((low / 64) as usize, 1 << (low % 64))
    }

    fn get(&self, offset: u32) -> Option<&'static str> {
        let (word, bit) = Self::bit(offset);
        if self.maybe[word] & bit == 0 {
            return None;
        }
        let i = self
            .found
            .binary_search_by_key(&offset, |&(at, _)| at)
            .ok()?;
        Some(self.found[i].1)
    }
}

/// One type's header (struct btf_type), and what follows it when it was read.
#[derive(Clone)]
struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    vlen: usize,
    /// size or type: the type it refers to, for modifiers and typedefs.
    size_type: u32,
    /// Members (name_off, type, offset) of a struct or union.
    members: Vec<[u32; 3]>,
}

/// The native-endian u32 at `at` (BTF is in the byte order of the machine it describes).
fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap())
}

impl Type {
    fn header(bytes: &[u8; 12]) -> Type {
        let info = word(bytes, 4);
        let (kind, vlen) = kind_and_vlen(info);
        Type {
            name_off: word(bytes, 0),
            kind,
            kind_flag: info >> 31 == 1,
            vlen,
            size_type: word(bytes, 8),
            members: Vec::new(),
        }
    }
}

/// A type's kind and vlen, from its header's info word.
fn kind_and_vlen(info: u32) -> (u32, usize) {
    ((info >> 24) & 0x1f, (info & 0xffff) as usize)
}

/// The structs the CO-RE probes (probes/tcpconnlat.bpf.c) read through CO-RE
/// relocations: struct sock's fields, inet_sock's source port and the kprobes' arguments in
/// struct pt_regs. The
/// minimal BTF holds these and what they embed; the test in userspace/tracer/core_btf.rs
/// fails if the probes read another.
pub const CORE_ROOTS: [&str; 3] = ["sock", "inet_sock", "pt_regs"];

/// The type the kernel describes `sock:inet_sock_set_state`'s arguments with, for programs
/// that attach to it as a BTF-typed raw tracepoint (Linux 5.5, commit 9e15db66136a "bpf:
/// Implement accurate raw_tp context access via BTF").
pub const STATE_TRACEPOINT_TYPEDEF: &str = "btf_trace_inet_sock_set_state";

/// Every name the reader looks for: the hooked functions, struct sock and its field
/// paths, the CO-RE roots.
fn wanted_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Func::ALL.iter().map(|f| f.name()).collect();
    names.extend(CORE_ROOTS);
    names.push(STATE_TRACEPOINT_TYPEDEF);
    for field in sock_fields() {
        names.extend(field.path.iter().copied());
    }
    names.sort_unstable();
    names.dedup();
    names
}

fn io_error(e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "truncated BTF".into()
    } else {
        e.to_string()
    }
}

impl StreamedBtf {
    fn scan(mut file: File) -> Result<StreamedBtf, String> {
        let mut header = [0u8; 24];
        file.read_exact(&mut header).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "not a BTF file (too short)".into(),
            _ => e.to_string(),
        })?;
        if u16::from_ne_bytes([header[0], header[1]]) != MAGIC {
            return Err(if header.starts_with(b"\x7fELF") {
                "an ELF file, not raw BTF (extract it: pahole --btf_encode_detached)".into()
            } else {
                "not a BTF file of this machine's byte order".into()
            });
        }
        let field = |at: usize| u64::from(word(&header, at));
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (field(4), field(8), field(12), field(16), field(20));
        let size = file.metadata().map_err(io_error)?.len();
        // Some pseudo-files state a size of 0: only a stated size is checked.
        if size > 0 && (hdr_len + type_off + type_len > size || hdr_len + str_off + str_len > size)
        {
            return Err("truncated BTF: a section runs past the end".into());
        }
        let names = Self::find_names(&mut file, hdr_len + str_off, str_len)?;
        let mut btf = StreamedBtf {
            file,
            types_at: hdr_len + type_off,
            strings_at: hdr_len + str_off,
            strings_len: str_len,
            starts: Vec::new(),
            names,
            functions: Vec::new(),
            state_tracepoint: None,
            sock: None,
            core_roots: [None; CORE_ROOTS.len()],
        };
        btf.index_types(type_len)?;
        Ok(btf)
    }

    /// Stream the string section for the wanted names' offsets (`find_strings`).
    fn find_names(file: &mut File, at: u64, len: u64) -> Result<WantedNames, String> {
        file.seek(SeekFrom::Start(at)).map_err(io_error)?;
        let strings = BufReader::with_capacity(CHUNK, file.take(len));
        let found = find_strings(strings, len, &wanted_names())?
            .into_iter()
            .map(|(offset, name)| {
                let offset = u32::try_from(offset).map_err(|_| "BTF strings past 4 GiB")?;
                Ok((offset, name))
            })
            .collect::<Result<_, String>>()?;
        Ok(WantedNames::new(found))
    }

    fn is(&self, name_off: u32, name: &str) -> bool {
        self.names.get(name_off) == Some(name)
    }

    /// Stream the type section once: where each type starts, the hooked functions,
    /// struct sock. Read a chunk at a time from where the next type starts, its headers
    /// parsed in place (the data after each is only skipped).
    fn index_types(&mut self, len: u64) -> Result<(), String> {
        let mut chunk = vec![0u8; CHUNK];
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(CHUNK as u64) as usize;
            if n < 12 {
                return Err("truncated BTF".into());
            }
            self.file
                .read_exact_at(&mut chunk[..n], self.types_at + at)
                .map_err(io_error)?;
            let mut i = 0;
            while i + 12 <= n {
                let (kind, vlen) = kind_and_vlen(word(&chunk, i + 4));
                let extra = extra_len(kind, vlen).ok_or("unknown BTF kind")?;
                self.starts.push((at + i as u64) as u32);
                if matches!(kind, kind::FUNC | kind::STRUCT | kind::TYPEDEF) {
                    self.index_named(kind, word(&chunk, i));
                }
                i += 12 + extra;
            }
            at += i as u64;
        }
        // A type whose data runs past the section is cut short.
        if at != len {
            return Err("truncated BTF type".into());
        }
        Ok(())
    }

    /// Whether the function, struct or typedef last indexed (its kind and name) is one
    /// of those looked for.
    fn index_named(&mut self, kind: u32, name_off: u32) {
        let id = self.starts.len() as u32;
        match (kind, self.names.get(name_off)) {
            (kind::FUNC, Some(name)) => {
                if let Some(func) = Func::ALL.iter().find(|f| f.name() == name) {
                    self.functions.push((*func, id));
                }
            }
            (kind::TYPEDEF, Some(STATE_TRACEPOINT_TYPEDEF)) => {
                self.state_tracepoint.get_or_insert(id);
            }
            (kind::STRUCT, Some(name)) => {
                if name == "sock" && self.sock.is_none() {
                    self.sock = Some(id);
                }
                if let Some(i) = CORE_ROOTS.iter().position(|&root| root == name) {
                    self.core_roots[i].get_or_insert(id);
                }
            }
            _ => {}
        }
    }

    /// Type `id`, with its members if it is a struct or union.
    fn by_id(&self, id: u32) -> Option<Type> {
        self.record(id).map(|(t, _)| t)
    }

    /// Type `id` and the bytes that follow its header (members, values, array or int
    /// data), read from the file.
    fn record(&self, id: u32) -> Option<(Type, Vec<u8>)> {
        let at = *self.starts.get((id as usize).checked_sub(1)?)?;
        let at = self.types_at + u64::from(at);
        let mut bytes = [0u8; 12];
        self.file.read_exact_at(&mut bytes, at).ok()?;
        let mut t = Type::header(&bytes);
        let mut extra = vec![0u8; extra_len(t.kind, t.vlen)?];
        self.file.read_exact_at(&mut extra, at + 12).ok()?;
        if matches!(t.kind, kind::STRUCT | kind::UNION) {
            t.members = extra
                .chunks_exact(12)
                .map(|m| std::array::from_fn(|i| word(m, 4 * i)))
                .collect();
        }
        Some((t, extra))
    }

    /// The string at `offset` in the string section, read from the file.
    fn string_at(&self, offset: u32) -> Option<Vec<u8>> {
        let mut name = Vec::new();
        let mut chunk = [0u8; 64];
        let mut at = u64::from(offset);
        // Kernel names are short; a string this long is a corrupt file.
        while name.len() < 4096 && at < self.strings_len {
            let n = ((self.strings_len - at) as usize).min(chunk.len());
            self.file
                .read_exact_at(&mut chunk[..n], self.strings_at + at)
                .ok()?;
            if let Some(end) = memchr::memchr(0, &chunk[..n]) {
                name.extend_from_slice(&chunk[..end]);
                return Some(name);
            }
            name.extend_from_slice(&chunk[..n]);
            at += n as u64;
        }
        None
    }

    fn facts(&self, path: &str) -> Result<BtfFacts, String> {
        let mut functions = AttachPoints::default();
        for (func, _) in &self.functions {
            *functions.slot(*func) = Some(func.name().to_owned());
        }
        let sock = match self.sock.map(|id| self.by_id(id)) {
            None => Err(BtfError::NoSock { path: path.into() }),
            Some(None) => return Err("truncated BTF type".into()),
            Some(Some(sock)) => self.offsets_in(&sock, path),
        };
        let core_btf = match self
            .core_roots
            .iter()
            .copied()
            .collect::<Option<Vec<u32>>>()
        {
            Some(roots) => minimal::MinimalBtf::of(self, &roots),
            None => Err(format!("not every one of the structs {CORE_ROOTS:?}")),
        };
        Ok(BtfFacts {
            sock,
            functions,
            function_ids: FunctionIds(self.functions.clone()),
            state_tracepoint_id: self.state_tracepoint,
            core_btf,
        })
    }

    fn offsets_in(&self, sock: &Type, path: &str) -> Result<SockOffsets, BtfError> {
        let mut offsets = [0; SOCK_FIELDS];
        for (offset, field) in offsets.iter_mut().zip(sock_fields()) {
            let missing = || BtfError::NoField {
                path: path.into(),
                field: field.path.join("."),
            };
            let bits = self.offset_bits(sock, field.path).ok_or_else(missing)?;
            *offset = u16::try_from(bits / 8).map_err(|_| missing())?;
        }
        Ok(SockOffsets(offsets))
    }

    /// A struct or union's members: (name offset, type id, bit offset), bitfields left out.
    fn members<'t>(&self, composite: &'t Type) -> impl Iterator<Item = (u32, u32, u32)> + 't {
        composite
            .members
            .iter()
            .filter_map(|&[name_off, ty, offset]| {
                // With kind_flag, the top 8 bits are a bitfield's size (0: not a bitfield).
                if composite.kind_flag && offset >> 24 != 0 {
                    return None;
                }
                let offset = if composite.kind_flag {
                    offset & 0xff_ffff
                } else {
                    offset
                };
                Some((name_off, ty, offset))
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
    fn offset_bits(&self, composite: &Type, path: &[&str]) -> Option<u32> {
        let (first, rest) = path.split_first()?;
        for (name_off, ty, offset) in self.members(composite) {
            if self.is(name_off, first) {
                if rest.is_empty() {
                    return Some(offset);
                }
                return self
                    .offset_bits(&self.composite(ty)?, rest)
                    .map(|o| o + offset);
            }
            if name_off == 0 {
                let found = self.composite(ty).and_then(|c| self.offset_bits(&c, path));
                if let Some(found) = found {
                    return Some(found + offset);
                }
            }
        }
        None
    }
}

/// Where each string equal to one of `names` starts in a string section of `len` bytes
/// read from `strings`: a name right after a NUL (the string before it ends there) and
/// followed by one, found by one multi-pattern search a chunk, not by a look at every
/// string, and by one across each seam between chunks. (Offset 0 is the empty string in
/// any BTF: every other string follows a NUL.)
fn find_strings<R: BufRead>(
    mut strings: R,
    len: u64,
    names: &[&'static str],
) -> Result<Vec<(u64, &'static str)>, String> {
    // With the NUL first, the search's fingerprints are those of a string's start.
    let patterns: Vec<Vec<u8>> = names
        .iter()
        .map(|n| [b"\0", n.as_bytes()].concat())
        .collect();
    let searcher = packed::Config::new()
        .match_kind(packed::MatchKind::LeftmostLongest)
        .builder()
        .extend(&patterns)
        .build()
        .ok_or("searching BTF strings: too many names")?;
    // A pattern and the NUL after it fit in this much on either side of a seam.
    let reach = patterns.iter().map(Vec::len).max().unwrap_or(0) + 1;
    // The last bytes read (as many as a seam needs) and the offset of the first of them.
    let (mut tail, mut tail_at) = (Vec::with_capacity(reach), 0u64);
    let mut seam = Vec::with_capacity(2 * reach);
    let (mut found, mut read) = (Vec::new(), 0u64);
    loop {
        let chunk = strings.fill_buf().map_err(io_error)?;
        if chunk.is_empty() {
            break;
        }
        // Matches that start before this chunk and end, or have their NUL, in it.
        seam.clear();
        seam.extend_from_slice(&tail);
        seam.extend_from_slice(&chunk[..chunk.len().min(reach)]);
        for m in searcher.find_iter(&seam) {
            let crosses = m.start() < tail.len() && m.end() >= tail.len();
            if crosses && seam.get(m.end()) == Some(&0) {
                found.push((
                    tail_at + m.start() as u64 + 1,
                    names[m.pattern().as_usize()],
                ));
            }
        }
        // Matches and their NULs wholly in this chunk.
        for m in searcher.find_iter(chunk) {
            if chunk.get(m.end()) == Some(&0) {
                found.push((read + m.start() as u64 + 1, names[m.pattern().as_usize()]));
            }
        }
        let n = chunk.len();
        tail.extend_from_slice(&chunk[n.saturating_sub(reach)..]);
        tail.drain(..tail.len().saturating_sub(reach));
        read += n as u64;
        tail_at = read - tail.len() as u64;
        strings.consume(n);
    }
    if read != len || tail.last().is_some_and(|&b| b != 0) {
        return Err("truncated BTF".into());
    }
    found.sort_unstable_by_key(|&(offset, _)| offset);
    Ok(found)
}

/// Bytes that follow a type's header, by kind (include/uapi/linux/btf.h); `None` for a
/// kind this reader does not know (a newer format: better to say so than misread).
fn extra_len(kind: u32, vlen: usize) -> Option<usize> {
    use kind::*;
    Some(match kind {
        UNKN | PTR | FWD | TYPEDEF | VOLATILE | CONST | RESTRICT | FUNC | FLOAT | TYPE_TAG => 0,
        INT | VAR | DECL_TAG => 4,
        ARRAY => 12,
        STRUCT | UNION | DATASEC | ENUM64 => 12 * vlen,
        ENUM | FUNC_PROTO => 8 * vlen,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;

    use proptest::prelude::*;

    /// A string section read back in chunks of the given sizes (as the kernel's file gives
    /// a page at a time).
    struct Chunked<'a> {
        bytes: &'a [u8],
        sizes: Vec<usize>,
        at: usize,
        next: usize,
    }

    impl std::io::Read for Chunked<'_> {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            unreachable!("read through BufRead")
        }
    }

    impl BufRead for Chunked<'_> {
        fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
            let size = self.sizes[self.next % self.sizes.len()];
            let end = (self.at + size).min(self.bytes.len());
            Ok(&self.bytes[self.at..end])
        }

        fn consume(&mut self, n: usize) {
            self.at += n;
            self.next += 1;
        }
    }

    const NAMES: [&str; 4] = ["sock", "sk_err", "inet_sock", "err"];

    proptest! {
        /// Wherever the chunks part the section, each string equal to a name is found at
        /// its offset, and nothing else: what splitting the section at every NUL finds.
        #[test]
        fn strings_are_found_across_any_chunking(
            strings in prop::collection::vec(
                prop::sample::select(vec!["", "sock", "sk_err", "inet_sock", "err", "xsock",
                    "sock_", "sk_er", "errr", "tcp_v4_connect", "s"]),
                0..40,
            ),
            sizes in prop::collection::vec(1usize..20, 1..8),
        ) {
            let mut section = vec![0u8];
            for s in &strings {
                section.extend_from_slice(s.as_bytes());
                section.push(0);
            }
            let mut expected = Vec::new();
            let mut offset = 0u64;
            for s in section[..section.len() - 1].split(|&b| b == 0) {
                if let Some(name) = NAMES.iter().find(|n| n.as_bytes() == s) {
                    expected.push((offset, *name));
                }
                offset += s.len() as u64 + 1;
            }
            let chunked = Chunked { bytes: &section, sizes, at: 0, next: 0 };
            let found = super::find_strings(chunked, section.len() as u64, &NAMES).unwrap();
            prop_assert_eq!(found, expected);
        }
    }
}
