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
