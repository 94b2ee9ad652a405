//! Kernel struct offsets read from BTF, for probes that cannot use CO-RE.

use std::path::Path;

use libbpf_rs::btf::types::{MemberAttr, Struct};
use libbpf_rs::btf::Btf;
use serde::Serialize;
use thiserror::Error;

/// Byte offsets of the `struct sock` fields the non-CO-RE probes read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SockOffsets {
    pub sk_err: u16,
    /// The error of an ICMP that arrived while the socket was locked.
    pub sk_err_soft: u16,
}

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("cannot read BTF from {path}: {source}")]
    Read {
        path: String,
        source: libbpf_rs::Error,
    },
    #[error("BTF has no struct {0}")]
    NoStruct(&'static str),
    #[error("BTF struct {0} has no plain field {1}")]
    NoField(&'static str, &'static str),
}

/// Read the offsets from a BTF file (the kernel's `/sys/kernel/btf/vmlinux`, or one the
/// user gives, e.g. from BTFHub).
pub fn sock_offsets(path: &Path) -> Result<SockOffsets, BtfError> {
    let btf = Btf::from_path(path).map_err(|source| BtfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let sock = btf
        .type_by_name::<Struct<'_>>("sock")
        .ok_or(BtfError::NoStruct("sock"))?;
    let offset = |field: &'static str| -> Result<u16, BtfError> {
        sock.iter()
            .find(|m| m.name.is_some_and(|n| n == field))
            .and_then(|m| match m.attr {
                MemberAttr::Normal { offset } if offset % 8 == 0 => u16::try_from(offset / 8).ok(),
                _ => None,
            })
            .ok_or(BtfError::NoField("sock", field))
    };
    Ok(SockOffsets {
        sk_err: offset("sk_err")?,
        sk_err_soft: offset("sk_err_soft")?,
    })
}
