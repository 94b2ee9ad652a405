//! The kernels captured into `compat/tests/fixtures/<id>` (ci/capture-fixture.sh, from the
//! matrix VMs), for the tests of this crate and of the binary (feature `fixtures`).

use std::path::{Path, PathBuf};

use crate::Features;

/// The root directory of fixture kernel `id`.
pub fn root(id: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(id)
}

/// What the tracer learns of kernel `root` when a kprobe mode may be used: its files and
/// its kernel symbols.
pub fn detect(root: &Path) -> Features {
    let mut features = Features::detect(root);
    features.read_symbols(root);
    features
}

/// [`detect`] on fixture kernel `id`.
pub fn features(id: &str) -> Features {
    detect(&root(id))
}

/// The BTF of every kernel the matrix runs, by id, decompressed: this host's own
/// (`/sys/kernel/btf/vmlinux`, where it has one), Debian's 6.1 and 6.12 and the no-ftrace
/// build (their `.BTF` sections, from their images), what pahole made for the no-BTF 6.1
/// build, and the prebuilt 5.4, 4.14 and 4.9 kernels' (from TCPCONNLAT_KERNELS_DIR, else
/// `../shared/kernels/old` beside the checkout, as CI has them). A missing one is an
/// error naming it.
pub fn matrix_btfs() -> Vec<(&'static str, Vec<u8>)> {
    let mut btfs = Vec::new();
    if let Ok(host) = std::fs::read(HOST_BTF) {
        btfs.push(("host", host));
    }
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/btf");
    for (id, file) in [
        ("deb61", "deb61-6.1.0-57.btf.xz"),
        ("deb612", "deb612-6.12.118.btf.xz"),
        ("noftrace", "noftrace-6.1.192.btf.xz"),
        ("nobtf", "nobtf-6.1.192.btf.xz"),
    ] {
        btfs.push((id, unxz(&fixtures.join(file))));
    }
    let kernels = std::env::var_os("TCPCONNLAT_KERNELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/kernels/old"));
    for (id, version) in [
        ("old54", "5.4"),
        ("old414", "4.14"),
        ("old49", "4.9"),
        ("old44", "4.4"),
        ("rhel7", "3.10"),
    ] {
        btfs.push((id, unxz(&kernels.join(version).join("vmlinux.btf.xz"))));
    }
    btfs
}

const HOST_BTF: &str = "/sys/kernel/btf/vmlinux";

/// An .xz file's contents.
pub fn unxz(path: &Path) -> Vec<u8> {
    let out = std::process::Command::new("xz")
        .arg("-dc")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("xz -dc {} (xz-utils): {e}", path.display()));
    assert!(
        out.status.success(),
        "xz -dc {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
