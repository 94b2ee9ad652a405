//! Compiles every probe in `probes/` with clang (through libbpf-cargo) into OUT_DIR,
//! generates Rust types for the structs in `probes/tcpconnlat.h` from BTF, and, for legacy
//! mode on kernels without BTF, reads struct sock offsets from kernel headers
//! (KERNEL_HEADERS, colon-separated build trees) into a table keyed by kernel release.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use libbpf_cargo::SkeletonBuilder;
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};
use tcpconnlat_compat::{Mode, ProbeObject};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let probes = Path::new("probes");
    println!("cargo:rerun-if-changed=probes");
    println!("cargo:rerun-if-env-changed=KERNEL_HEADERS");
    revision();

    // The vendored vmlinux.h, the legacy probes' pt_regs and the kernel header paths below
    // are x86-64's: say so at once rather than build probes that would misread registers.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    assert!(
        arch == "x86_64",
        "tcpconnlat's probes are written for x86-64 (vmlinux.h, pt_regs); target {arch} is not supported"
    );
    // The legacy probes use the UAPI headers (linux/bpf.h) instead of vmlinux.h; on Debian
    // their asm/ part lives in the multiarch directory.
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let mut names = Names::default();
    for object in ProbeObject::ALL {
        let name = object.stem();
        let src = probes.join(format!("{name}.bpf.c"));
        let obj = out.join(format!("{name}.bpf.o"));
        let mut args = vec!["-I", "probes", "-idirafter", &multiarch, "-Wall", "-Werror"];
        if object.loads_on_4_4() {
            args.extend(["-mcpu=v1", "-D__TARGET_ARCH_x86"]);
        }
        let mut builder = SkeletonBuilder::new();
        builder.source(&src).obj(&obj).clang_args(args);
        // `types` exists only for its BTF: its skeleton is where the Rust side gets
        // `types::event` and `types::config` from.
        let result = if object == ProbeObject::Types {
            builder.build_and_generate(out.join("types.skel.rs"))
        } else {
            builder.build()
        };
        if let Err(err) = result {
            panic!("building {}: {err:#}", src.display());
        }
        names.read(object, &obj);
    }
    names.check_modes();
    fs::write(out.join("probe_names.rs"), names.generate()).expect("write probe_names.rs");

    let mut table = String::from(
        "/// struct sock offsets from kernel headers at build time: (release, offsets in\n\
         /// struct sock_layout order).\n\
         pub const HEADER_OFFSETS: &[(&str, [u16; tcpconnlat_compat::btf::SOCK_FIELDS])] = &[\n",
    );
    for dir in env::var("KERNEL_HEADERS").unwrap_or_default().split(':') {
        if dir.is_empty() {
            continue;
        }
        match header_offsets(Path::new(dir), &out) {
            Ok((release, offsets)) => {
                let _ = writeln!(table, "    ({release:?}, {offsets:?}),");
            }
            Err(why) => panic!("KERNEL_HEADERS={dir}: {why}"),
        }
    }
    table.push_str("];\n");
    fs::write(out.join("header_offsets.rs"), table).expect("write header_offsets.rs");
}

/// The commit this is built from, for `tcpconnlat_build_info` (TCPCONNLAT_REVISION, or
/// git's, or "unknown" outside a checkout).
fn revision() {
    println!("cargo:rerun-if-env-changed=TCPCONNLAT_REVISION");
    println!("cargo:rerun-if-changed=.git/HEAD");
    let revision = env::var("TCPCONNLAT_REVISION").ok().or_else(|| {
        let out = Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    });
    println!(
        "cargo:rustc-env=TCPCONNLAT_REVISION={}",
        revision.unwrap_or_else(|| "unknown".to_owned())
    );
}

/// Compile probes/sock_offsets.c against one kernel build tree (an O= build directory
/// with its `source` link, or an in-tree build) and read the offsets from the assembly.
fn header_offsets(obj: &Path, out: &Path) -> Result<(String, Vec<u16>), String> {
    let src = if obj.join("source").exists() {
        obj.join("source")
    } else {
        obj.to_path_buf()
    };
    let utsrelease = fs::read_to_string(obj.join("include/generated/utsrelease.h"))
        .map_err(|e| format!("no include/generated/utsrelease.h (run make prepare): {e}"))?;
    let release = utsrelease
        .split('"')
        .nth(1)
        .ok_or("cannot read UTS_RELEASE")?
        .to_owned();
    let clang_include = Command::new("clang")
        .arg("-print-file-name=include")
        .output()
        .map_err(|e| format!("running clang: {e}"))?;
    let clang_include = String::from_utf8_lossy(&clang_include.stdout)
        .trim()
        .to_owned();
    let (s, o) = (src.display(), obj.display());
    let asm = out.join("sock_offsets.s");
    let output = Command::new("clang")
        .args(["-S", "-O2", "-w", "-nostdinc", "-isystem", &clang_include])
        .args([
            "-D__KERNEL__",
            "-fno-pie",
            "-mno-red-zone",
            "-mcmodel=kernel",
        ])
        .arg(format!("-I{s}/arch/x86/include"))
        .arg(format!("-I{o}/arch/x86/include/generated"))
        .arg(format!("-I{s}/include"))
        .arg(format!("-I{o}/include"))
        .arg(format!("-I{s}/arch/x86/include/uapi"))
        .arg(format!("-I{o}/arch/x86/include/generated/uapi"))
        .arg(format!("-I{s}/include/uapi"))
        .arg(format!("-I{o}/include/generated/uapi"))
        .args(["-include", &format!("{s}/include/linux/kconfig.h")])
        .arg("probes/sock_offsets.c")
        .arg("-o")
        .arg(&asm)
        .output()
        .map_err(|e| format!("running clang: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "compiling probes/sock_offsets.c against its headers failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let text = fs::read_to_string(&asm).map_err(|e| e.to_string())?;
    let mut offsets = Vec::new();
    for field in tcpconnlat_compat::btf::sock_fields() {
        let field = field.name;
        // "tcpconnlat_offset_family:\n\t.quad\t16"
        let label = format!("tcpconnlat_offset_{field}:");
        let value = text
            .lines()
            .skip_while(|l| l.trim() != label)
            .find_map(|l| l.trim().strip_prefix(".quad"))
            .map(|v| v.split('#').next().unwrap_or("").trim().to_owned())
            .ok_or_else(|| format!("no {label} in the compiled offsets"))?;
        offsets.push(
            value
                .parse()
                .map_err(|_| format!("{field}: offset {value:?} is not a number"))?,
        );
    }
    Ok((release, offsets))
}

/// The programs and maps of every compiled object, from its symbols.
#[derive(Default)]
struct Names {
    objects: Vec<Compiled>,
}

struct Compiled {
    object: ProbeObject,
    path: PathBuf,
    progs: Vec<String>,
    maps: Vec<String>,
}

impl Names {
    /// A program is a global function in a section of its own (`.text` holds the
    /// subprograms); a map, a symbol in `.maps`.
    fn read(&mut self, object: ProbeObject, path: &Path) {
        let data = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let elf = object::File::parse(&*data)
            .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
        let (mut progs, mut maps) = (Vec::new(), Vec::new());
        for symbol in elf.symbols() {
            let (Ok(name), Some(section)) = (symbol.name(), symbol.section_index()) else {
                continue;
            };
            let Ok(section) = elf
                .section_by_index(section)
                .and_then(|s| s.name().map(str::to_owned))
            else {
                continue;
            };
            if section == ".maps" {
                maps.push(name.to_owned());
            } else if symbol.kind() == SymbolKind::Text && symbol.is_global() && section != ".text"
            {
                progs.push(name.to_owned());
            }
        }
        self.objects.push(Compiled {
            object,
            path: path.to_path_buf(),
            progs,
            maps,
        });
    }

    /// Every program and event buffer compat's hook tables name for a mode is in the
    /// mode's object: a name changed on one side only fails the build, rather than
    /// pushing auto to a worse mode at run time.
    fn check_modes(&self) {
        for mode in Mode::ALL {
            let spec = mode.spec();
            let compiled = self
                .objects
                .iter()
                .find(|c| c.object == spec.object)
                .expect("every object is compiled");
            let stem = spec.object.stem();
            for name in mode.program_names() {
                assert!(
                    compiled.progs.contains(&name),
                    "probes/{stem}.bpf.c has no program {name}, which compat/src/hooks.rs names for {mode} mode"
                );
            }
            for transport in spec.transports() {
                let map = transport.map();
                assert!(
                    compiled.maps.iter().any(|m| m == map),
                    "probes/{stem}.bpf.c has no map {map}, which compat/src/hooks.rs names for {mode} mode"
                );
            }
        }
    }

    /// `objects::bytes` and the `maps` constants userspace opens maps by.
    fn generate(&self) -> String {
        let mut rust = String::from(
            "/// The compiled probe object.\n\
             pub fn bytes(object: ProbeObject) -> &'static [u8] {\n    match object {\n",
        );
        for Compiled { object, path, .. } in &self.objects {
            let _ = writeln!(
                rust,
                "        ProbeObject::{object:?} => include_bytes!({:?}),",
                path.display().to_string()
            );
        }
        rust.push_str(
            "    }\n}\n\n/// The probes' maps, by their names in C (every one, opened by name or not).\n\
             #[allow(dead_code)]\npub mod maps {\n",
        );
        let maps: std::collections::BTreeSet<&String> =
            self.objects.iter().flat_map(|c| &c.maps).collect();
        for map in maps {
            let _ = writeln!(
                rust,
                "    pub const {}: &str = {map:?};",
                map.to_ascii_uppercase()
            );
        }
        rust.push_str("}\n");
        rust
    }
}
