//! Where legacy mode's struct sock offsets come from, in order: a BTF file the user gave,
//! the kernel's own BTF, offsets built in from kernel headers for this release.

use std::path::Path;

use tcpconnlat_compat::btf::{self, BtfError, BtfFacts, SockOffsets};

use crate::tracer::objects;

/// struct sock offsets, and where they came from.
#[derive(Clone, Debug)]
pub struct KnownOffsets {
    pub offsets: SockOffsets,
    pub source: String,
}

/// In order: the BTF file the user gave, the kernel's own BTF (already parsed), offsets
/// built in from kernel headers for this release; else an error naming both remedies.
pub fn find(
    kernel_btf: Option<Result<BtfFacts, BtfError>>,
    release: Option<&str>,
    btf_file: Option<&Path>,
) -> Result<KnownOffsets, String> {
    let from_btf = |path: &Path, offsets: Result<SockOffsets, BtfError>| {
        offsets
            .map(|offsets| KnownOffsets {
                offsets,
                source: format!("BTF {}", path.display()),
            })
            .map_err(|e| e.to_string())
    };
    if let Some(path) = btf_file {
        return from_btf(path, btf::sock_offsets(path));
    }
    if let Some(facts) = kernel_btf {
        return from_btf(Path::new(btf::VMLINUX), facts.and_then(|f| f.sock));
    }
    let release = release.unwrap_or("unknown");
    objects::header_offsets(release)
        .map(|offsets| KnownOffsets {
            offsets,
            source: format!("kernel headers for {release}, built in"),
        })
        .ok_or_else(|| {
            format!(
                "no BTF and no struct offsets built in for kernel {release}: give --btf FILE \
                 (e.g. from BTFHub) or rebuild with KERNEL_HEADERS=/path/to/its/build/tree"
            )
        })
}
