//! Fixtures shared by the compat test binaries.
#![allow(dead_code)] // each test binary uses a different part

use std::path::Path;

/// The BTF that pahole made for the matrix's no-BTF 6.1 kernel, decompressed.
pub fn nobtf_btf() -> Vec<u8> {
    unxz(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/btf/nobtf-6.1.192.btf.xz"))
}

pub use tcpconnlat_compat::fixtures::unxz;
