//! The CO-RE object (fentry and kprobe modes) without the kernel's whole BTF in memory.
//! Left to itself, libbpf reads /sys/kernel/btf/vmlinux (megabytes) into a buffer and
//! parses it into a copy, both alive at once, before Linux 6.16 lets it map the file:
//! to relocate the probes, and to find each fentry program's attach target. Our own
//! streamed reading of that file (compat::btf) gives both instead:
//! - relocations: libbpf relocates against the minimal BTF compat made (struct sock,
//!   struct pt_regs and what they embed), handed over as `btf_custom_path`, a memfd;
//! - attach targets: each fentry section, and the BTF-typed raw tracepoint's, gets a
//!   libbpf handler of ours that sets the BTF id our reading found, so libbpf has no name
//!   to look up.
//!
//! libbpf loads the kernel's BTF for a tracing program unless the program names a target
//! program (`attach_prog_fd`, for fentry on BPF programs): ours name a placeholder, which
//! the handler clears again before the program is loaded (`attach_btf_obj_fd` 0 means
//! vmlinux, on every kernel that has fentry).

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::libbpf_sys;
use libbpf_rs::{ObjectBuilder, OpenObject};
use tcpconnlat_compat::btf::{FunctionIds, STATE_TRACEPOINT_TYPEDEF, VMLINUX};
use tcpconnlat_compat::{Attach, Func, Tracepoint};

/// What the CO-RE object needs from the kernel's BTF, from our own reading of it.
#[derive(Debug, Clone)]
pub struct CoreBtf {
    /// Raw BTF: the structs the probes read through CO-RE and every type they embed.
    pub minimal: Vec<u8>,
    /// The BTF type id of each hooked function the kernel describes.
    pub function_ids: FunctionIds,
    /// The BTF type id of the state tracepoint's arguments, where the kernel describes them.
    pub state_tracepoint_id: Option<u32>,
}

/// While the object is open and loading: the files libbpf was told about.
pub struct CoreBtfFiles {
    /// The minimal BTF, at /proc/self/fd/N.
    _minimal: File,
    /// The tracing programs' placeholder target (see the module's comment).
    placeholder: Option<File>,
}

impl CoreBtf {
    /// Point `builder` at the minimal BTF; what is returned must outlive loading.
    pub fn relocate_with(&self, builder: &mut ObjectBuilder) -> Result<CoreBtfFiles> {
        let fd = nix::sys::memfd::memfd_create(
            c"tcpconnlat-core-btf",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .context("creating a memfd for the minimal BTF")?;
        let mut file = File::from(fd);
        file.write_all(&self.minimal)
            .context("writing the minimal BTF")?;
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        builder.btf_custom_path(&path)?;
        Ok(CoreBtfFiles {
            _minimal: file,
            placeholder: None,
        })
    }

    /// Before `open` is opened: make each tracing program on `hooks` (fentry, BTF-typed
    /// raw tracepoint) load with our id.
    pub fn register_handlers(&self, hooks: &[Attach]) -> Result<()> {
        let targets: Vec<Target> = hooks
            .iter()
            .filter_map(|&attach| self.target(attach).transpose())
            .collect::<Result<_>>()?;
        if targets.is_empty() {
            return Ok(());
        }
        register_handlers(&targets)
    }

    /// After opening: name the placeholder target in each tracing program on `hooks`.
    pub fn name_placeholders(
        &self,
        open: &mut OpenObject,
        hooks: &[Attach],
        files: &mut CoreBtfFiles,
    ) -> Result<()> {
        let sections: Vec<String> = hooks.iter().filter_map(|&a| tracing_section(a)).collect();
        if sections.is_empty() {
            return Ok(());
        }
        let placeholder = match &files.placeholder {
            Some(file) => file.as_raw_fd(),
            None => {
                let file = File::open(VMLINUX).with_context(|| format!("opening {VMLINUX}"))?;
                files.placeholder.insert(file).as_raw_fd()
            }
        };
        for mut prog in open.progs_mut() {
            let section = prog.section().to_string_lossy().into_owned();
            if sections.contains(&section) {
                prog.set_attach_target(placeholder, None)
                    .with_context(|| format!("preparing {section}"))?;
            }
        }
        Ok(())
    }

    /// The tracing program's target for `attach` (`None`: not a tracing program).
    fn target(&self, attach: Attach) -> Result<Option<Target>> {
        let Some(section) = tracing_section(attach) else {
            return Ok(None);
        };
        let (attach_type, id) = match attach {
            Attach::Fentry(func) => (libbpf_sys::BPF_TRACE_FENTRY, self.id_of(func)?),
            _ => (
                libbpf_sys::BPF_TRACE_RAW_TP,
                self.state_tracepoint_id.ok_or_else(|| {
                    anyhow!("{STATE_TRACEPOINT_TYPEDEF} is not in the kernel's BTF")
                })?,
            ),
        };
        Ok(Some(Target {
            section,
            attach_type,
            id,
        }))
    }

    fn id_of(&self, func: Func) -> Result<u32> {
        self.function_ids
            .get(func)
            .ok_or_else(|| anyhow!("{} is not in the kernel's BTF", func.name()))
    }
}

/// The section of the tracing program on `attach` (probes/tcpconnlat.bpf.c), if it is one.
fn tracing_section(attach: Attach) -> Option<String> {
    match attach {
        Attach::Fentry(func) => Some(format!("fentry/{}", func.name())),
        Attach::BtfTracepoint(Tracepoint::State) => Some("tp_btf/inet_sock_set_state".into()),
        _ => None,
    }
}

/// A tracing program's section, and where it attaches: the BTF id in vmlinux.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    section: String,
    attach_type: libbpf_sys::bpf_attach_type,
    id: u32,
}

/// libbpf's handlers are process-wide and must not change once an object uses them (it
/// keeps pointers into their table): registered once, for the one kernel there is.
fn register_handlers(targets: &[Target]) -> Result<()> {
    static REGISTERED: OnceLock<Result<Vec<Target>, String>> = OnceLock::new();
    let registered = REGISTERED.get_or_init(|| {
        for target in targets {
            register(target)?;
        }
        Ok(targets.to_vec())
    });
    match registered {
        Ok(done) if targets.iter().all(|t| done.contains(t)) => Ok(()),
        Ok(done) => bail!("tracing handlers were registered for {done:?}, not {targets:?}"),
        Err(e) => bail!("{e}"),
    }
}

fn register(target: &Target) -> Result<(), String> {
    let section = CString::new(target.section.as_str()).map_err(|e| e.to_string())?;
    let opts = libbpf_sys::libbpf_prog_handler_opts {
        sz: std::mem::size_of::<libbpf_sys::libbpf_prog_handler_opts>() as _,
        cookie: target.id as _,
        prog_prepare_load_fn: Some(load_with_our_id),
        ..Default::default()
    };
    // SAFETY: the section name and options are valid for the call; libbpf copies both.
    let handler = unsafe {
        libbpf_sys::libbpf_register_prog_handler(
            section.as_ptr(),
            libbpf_sys::BPF_PROG_TYPE_TRACING,
            target.attach_type,
            &opts,
        )
    };
    if handler < 0 {
        return Err(format!(
            "registering a libbpf handler for {}: {}",
            target.section,
            std::io::Error::from_raw_os_error(-handler)
        ));
    }
    Ok(())
}

/// libbpf's last word before loading a tracing program of ours: attach to the function or
/// tracepoint whose BTF id is `cookie`, in vmlinux; the placeholder target is gone.
unsafe extern "C" fn load_with_our_id(
    _prog: *mut libbpf_sys::bpf_program,
    opts: *mut libbpf_sys::bpf_prog_load_opts,
    cookie: std::os::raw::c_long,
) -> std::os::raw::c_int {
    // SAFETY: libbpf passes the load options it is about to use, valid and ours to change.
    let opts = unsafe { &mut *opts };
    opts.attach_prog_fd = 0;
    opts.attach_btf_obj_fd = 0;
    opts.attach_btf_id = cookie as u32;
    0
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use libbpf_rs::AsRawLibbpf;
    use tcpconnlat_compat::btf;

    use super::*;
    use crate::tracer::objects;
    use tcpconnlat_compat::ProbeObject;

    /// Every matrix kernel's BTF (compat's fixtures), as files in `dir`.
    fn btf_files(dir: &Path) -> Vec<PathBuf> {
        tcpconnlat_compat::fixtures::matrix_btfs()
            .into_iter()
            .map(|(id, btf)| {
                let path = dir.join(format!("{id}.btf"));
                std::fs::write(&path, btf).unwrap();
                path
            })
            .collect()
    }

    /// Each program of the CO-RE object as libbpf relocates it, map fds blanked.
    fn relocated(
        configure: impl FnOnce(&mut ObjectBuilder) -> Option<CoreBtfFiles>,
    ) -> Vec<(String, Vec<u64>)> {
        let mut builder = ObjectBuilder::default();
        let files = configure(&mut builder);
        let open = builder
            .open_memory(objects::bytes(ProbeObject::Core))
            .unwrap();
        let obj = open.as_libbpf_object().as_ptr();
        // SAFETY: the object is open and not loaded; prepare relocates without loading.
        let rc = unsafe { libbpf_sys::bpf_object__prepare(obj) };
        assert_eq!(rc, 0, "bpf_object__prepare");
        drop(files);
        open.progs()
            .map(|prog| {
                let raw = prog.as_libbpf_object().as_ptr();
                // SAFETY: a prepared program's instructions, valid while `open` is.
                let insns = unsafe {
                    std::slice::from_raw_parts(
                        libbpf_sys::bpf_program__insns(raw),
                        libbpf_sys::bpf_program__insn_cnt(raw) as usize,
                    )
                };
                let words = insns.iter().map(|i| {
                    // SAFETY: struct bpf_insn is 8 plain bytes.
                    let word: u64 = unsafe { std::mem::transmute_copy(i) };
                    // ld_imm64 of a map (BPF_PSEUDO_MAP_*): its imm is a map fd.
                    let (code, src) = (word & 0xff, (word >> 12) & 0xf);
                    if code == 0x18 && matches!(src, 1 | 2 | 5 | 6) {
                        word & 0xffff_ffff
                    } else {
                        word
                    }
                });
                (prog.name().to_string_lossy().into_owned(), words.collect())
            })
            .collect()
    }

    /// Relocated against the minimal BTF, every program is the one relocated against the
    /// whole file it was made from, instruction for instruction: on every BTF at hand.
    #[test]
    #[ignore = "needs root: libbpf creates the maps before relocating (./ci/test.sh runs it as root)"]
    fn the_minimal_btf_relocates_every_program_as_the_whole_one_does() {
        let dir = tempfile::tempdir().unwrap();
        for path in btf_files(dir.path()) {
            let facts = btf::read(&path).unwrap();
            let core = CoreBtf {
                minimal: facts.core_btf.unwrap(),
                function_ids: facts.function_ids,
                state_tracepoint_id: facts.state_tracepoint_id,
            };
            let whole = relocated(|b| {
                b.btf_custom_path(&path).unwrap();
                None
            });
            let ours = relocated(|b| Some(core.relocate_with(b).unwrap()));
            assert!(!whole.is_empty());
            for ((name, a), (_, b)) in whole.iter().zip(&ours) {
                let first = a.iter().zip(b).position(|(x, y)| x != y);
                assert!(
                    a.len() == b.len() && first.is_none(),
                    "{}: {name} differs at instruction {first:?} of {}/{}: {:#x?} against {:#x?}",
                    path.display(),
                    a.len(),
                    b.len(),
                    first.map(|i| a[i]),
                    first.map(|i| b[i]),
                );
            }
            assert_eq!(whole.len(), ours.len());
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            println!(
                "{}: minimal BTF {} bytes ({size} whole)",
                path.display(),
                core.minimal.len()
            );
        }
    }
}
