//! Kernel struct offsets for probes that cannot use CO-RE: read from BTF (the kernel's own
//! `/sys/kernel/btf/vmlinux`, or a file the user gives, e.g. from BTFHub).

use std::path::Path;

use libbpf_rs::btf::types::{self, Composite, MemberAttr};
use libbpf_rs::btf::{Btf, BtfType};
use serde::Serialize;
use thiserror::Error;

use crate::kallsyms::AttachPoints;

/// Byte offsets in `struct sock` of what the non-CO-RE probes read. Mirrors
/// `struct sock_layout` in `probes/tcpconnlat.h`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SockOffsets {
    pub family: u16,
    pub state: u16,
    /// Local port, host order.
    pub num: u16,
    /// Remote port, network order.
    pub dport: u16,
    pub rcv_saddr: u16,
    pub daddr: u16,
    pub v6_rcv_saddr: u16,
    pub v6_daddr: u16,
    pub err: u16,
    /// The error of an ICMP that arrived while the socket was locked.
    pub err_soft: u16,
}

impl SockOffsets {
    /// Each field with its path in `struct sock`.
    pub const FIELDS: [(&'static str, &'static [&'static str]); 10] = [
        ("family", &["__sk_common", "skc_family"]),
        ("state", &["__sk_common", "skc_state"]),
        ("num", &["__sk_common", "skc_num"]),
        ("dport", &["__sk_common", "skc_dport"]),
        ("rcv_saddr", &["__sk_common", "skc_rcv_saddr"]),
        ("daddr", &["__sk_common", "skc_daddr"]),
        ("v6_rcv_saddr", &["__sk_common", "skc_v6_rcv_saddr"]),
        ("v6_daddr", &["__sk_common", "skc_v6_daddr"]),
        ("err", &["sk_err"]),
        ("err_soft", &["sk_err_soft"]),
    ];

    /// Build from (field, offset) pairs; every field must be there.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, u16)>,
    ) -> Result<SockOffsets, String> {
        let mut found: [Option<u16>; 10] = [None; 10];
        for (name, offset) in pairs {
            if let Some(i) = Self::FIELDS.iter().position(|(n, _)| *n == name) {
                found[i] = Some(offset);
            }
        }
        let get = |i: usize| found[i].ok_or_else(|| format!("no offset for {}", Self::FIELDS[i].0));
        Ok(SockOffsets {
            family: get(0)?,
            state: get(1)?,
            num: get(2)?,
            dport: get(3)?,
            rcv_saddr: get(4)?,
            daddr: get(5)?,
            v6_rcv_saddr: get(6)?,
            v6_daddr: get(7)?,
            err: get(8)?,
            err_soft: get(9)?,
        })
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
    let mut pairs = Vec::new();
    for (name, field_path) in SockOffsets::FIELDS {
        let bits = offset_bits(btf, sock, field_path).ok_or_else(|| BtfError::NoField {
            path: shown.clone(),
            field: field_path.join("."),
        })?;
        let bytes = u16::try_from(bits / 8).map_err(|_| BtfError::NoField {
            path: shown.clone(),
            field: field_path.join("."),
        })?;
        pairs.push((name, bytes));
    }
    SockOffsets::from_pairs(pairs).map_err(|field| BtfError::NoField { path: shown, field })
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
