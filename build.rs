//! Compiles every probe in `probes/` with clang (through libbpf-cargo) into OUT_DIR, and
//! generates Rust types for the structs in `probes/tcpconnlat.h` from the object's BTF.

use std::env;
use std::path::{Path, PathBuf};

use libbpf_cargo::SkeletonBuilder;

/// Each probe object; userspace embeds them by these names.
const PROBES: &[&str] = &["tcpconnlat", "tcpconnlat_tp", "trial_fentry", "types"];

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let probes = Path::new("probes");
    println!("cargo:rerun-if-changed=probes");

    for name in PROBES {
        let src = probes.join(format!("{name}.bpf.c"));
        let obj = out.join(format!("{name}.bpf.o"));
        let mut builder = SkeletonBuilder::new();
        builder
            .source(&src)
            .obj(&obj)
            .clang_args(["-I", "probes", "-Wall", "-Werror"]);
        // `types` exists only for its BTF: its skeleton is where the Rust side gets
        // `types::event` and `types::config` from.
        let result = if *name == "types" {
            builder.build_and_generate(out.join("types.skel.rs"))
        } else {
            builder.build()
        };
        if let Err(err) = result {
            panic!("building {}: {err:#}", src.display());
        }
    }
}
