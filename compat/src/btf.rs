//! Kernel struct offsets for probes that cannot use CO-RE: read from BTF (the kernel's own
//! `/sys/kernel/btf/vmlinux`, or a file the user gives, e.g. from BTFHub).

use std::path::Path;

use libbpf_rs::btf::types::{self, Composite, MemberAttr};
use libbpf_rs::btf::{Btf, BtfType};
use serde::Serialize;
use thiserror::Error;

use crate::kallsyms::AttachPoints;

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
    #[error("cannot read BTF from {path}: {source}")]
    Read {
        path: String,
        source: libbpf_rs::Error,
    },
    #[error("{path}: BTF has no struct sock")]
    NoSock { path: String },
    #[error("{path}: struct sock has no field {field} in its BTF")]
    NoField { path: String, field: String },
}

/// What one parse of a BTF file tells: the struct sock offsets, and which hooked
/// functions it describes (an fentry program attaches by BTF name, so for fentry this, not
/// kallsyms, says whether a function is there).
#[derive(Debug)]
pub struct BtfFacts {
    pub sock: Result<SockOffsets, BtfError>,
    pub functions: AttachPoints,
}

/// Parse a BTF file once (vmlinux BTF is megabytes: parsing it is most of start-up).
pub fn read(path: &Path) -> Result<BtfFacts, BtfError> {
    let btf = Btf::from_path(path).map_err(|source| BtfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok(facts(&btf, path))
}

/// The running kernel's BTF, `/sys/kernel/btf/vmlinux`. libbpf maps it where the kernel
/// allows (6.16+) instead of reading it into a copy: half the peak memory of [`read`].
pub fn read_kernel() -> Result<BtfFacts, BtfError> {
    let btf = Btf::from_vmlinux().map_err(|source| BtfError::Read {
        path: VMLINUX.to_owned(),
        source,
    })?;
    Ok(facts(&btf, Path::new(VMLINUX)))
}

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

fn facts(btf: &Btf<'_>, path: &Path) -> BtfFacts {
    BtfFacts {
        sock: offsets_in(btf, path),
        functions: AttachPoints::from_fn(|func| {
            btf.type_by_name::<types::Func<'_>>(func.name())
                .map(|_| func.name().to_owned())
        }),
    }
}

/// Read the offsets from a BTF file.
pub fn sock_offsets(path: &Path) -> Result<SockOffsets, BtfError> {
    read(path)?.sock
}

fn offsets_in(btf: &Btf<'_>, path: &Path) -> Result<SockOffsets, BtfError> {
    let shown = path.display().to_string();
    let sock = btf
        .type_by_name::<Composite<'_>>("sock")
        .ok_or_else(|| BtfError::NoSock {
            path: shown.clone(),
        })?;
    let mut offsets = [0; SOCK_FIELDS];
    for (offset, field) in offsets.iter_mut().zip(sock_fields()) {
        let missing = || BtfError::NoField {
            path: shown.clone(),
            field: field.path.join("."),
        };
        let bits = offset_bits(btf, sock, &field.path).ok_or_else(missing)?;
        *offset = u16::try_from(bits / 8).map_err(|_| missing())?;
    }
    Ok(SockOffsets(offsets))
}

/// The bit offset of `path` inside `composite`, looking through anonymous structs and
/// unions (where the kernel keeps skc_daddr, skc_num and friends).
fn offset_bits(btf: &Btf<'_>, composite: Composite<'_>, path: &[&str]) -> Option<u32> {
    let (first, rest) = path.split_first()?;
    for member in composite.iter() {
        let MemberAttr::Normal { offset } = member.attr else {
            continue;
        };
        let inner = || {
            btf.type_by_id::<BtfType<'_>>(member.ty)
                .map(|t| t.skip_mods_and_typedefs())
                .and_then(|t| Composite::try_from(t).ok())
        };
        match member.name {
            Some(name) if name == *first => {
                if rest.is_empty() {
                    return Some(offset);
                }
                return offset_bits(btf, inner()?, rest).map(|o| o + offset);
            }
            None => {
                if let Some(found) = inner().and_then(|c| offset_bits(btf, c, path)) {
                    return Some(found + offset);
                }
            }
            Some(_) => {}
        }
    }
    None
}
