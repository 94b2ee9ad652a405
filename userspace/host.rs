//! What this host can do: the compat layer's file-based detection plus what only trying
//! can tell (trial loads, the vDSO's version note, raising the memlock limit).

use std::cell::Cell;
use std::os::fd::OwnedFd;
use std::path::Path;

use libbpf_rs::MapType;
use tcpconnlat_compat::btf::{self, BtfError, BtfFacts, SockOffsets};
use tcpconnlat_compat::{tracefs, AttachPoints, Features, Func, KernelVersion, Probe, Trials};

use crate::probes;
use crate::timing;

pub struct Host {
    pub features: Features,
    pub trials: Trials,
    /// struct sock offsets for probes that cannot use CO-RE, and where they came from.
    pub sock_offsets: Result<KnownOffsets, String>,
    /// Where we mounted tracefs because nothing had (see [`mount_tracefs`]).
    pub mounted_tracefs: Option<String>,
    /// The kernel's LINUX_VERSION_CODE from its vDSO, which kprobe programs must carry
    /// before Linux 5.0, or why it is unknown (libbpf then guesses from `uname -r`).
    pub version_code: Result<u32, String>,
    /// Why RLIMIT_MEMLOCK could not be raised on a kernel that charges BPF memory to it
    /// (before 5.11); `None` where it was raised or plays no part.
    pub memlock: Option<String>,
    /// The fentry trial's program, still attached: see [`Host::end_fentry_trial`].
    fentry_trial: Cell<Option<OwnedFd>>,
}

impl Host {
    /// Detect what choosing a mode needs. Trials need privileges; without them the trials
    /// stay unknown and the plan says so. Kernel symbols are read only where a kprobe
    /// mode may be used: when no earlier mode is, or for `every_mode` (the `--features`
    /// report, a forced mode).
    pub fn detect(
        privileged: bool,
        btf_file: Option<&Path>,
        every_mode: bool,
        mounted_tracefs: Option<String>,
    ) -> Host {
        let root = Path::new(ROOT);
        let features = timing::step("features", || Features::detect(root));
        // The kernel's BTF, streamed once (compat::btf): what fentry can hook, struct offsets.
        let kernel_btf = timing::step("kernel BTF", || features.btf.then(btf::read_kernel));
        let fentry_targets = match &kernel_btf {
            None => Probe::No("no kernel BTF".to_owned()),
            Some(facts) => Probe::from_result(
                facts
                    .as_ref()
                    .map(|f| with_module_functions(f.functions.clone()))
                    .map_err(|e| e.to_string()),
            ),
        };
        let trial_target = kernel_btf
            .as_ref()
            .and_then(|facts| facts.as_ref().ok()?.tcp_v4_connect_id);
        let sock_offsets = find_offsets(kernel_btf, features.release.as_deref(), btf_file);
        let mut fentry_trial = None;
        let mut trials = Trials {
            sock_offsets: Probe::from_result(
                sock_offsets
                    .as_ref()
                    .map(|o| o.source.clone())
                    .map_err(Clone::clone),
            ),
            fentry_targets,
            ..Trials::default()
        };
        if !privileged {
            trials.fentry = Probe::Unknown("needs root to try".to_owned());
            trials.ringbuf = Probe::Unknown("needs root to try".to_owned());
        } else {
            let trial = timing::step("fentry trial", || trial_fentry(&features, trial_target));
            trials.fentry = Probe::from_result(trial.as_ref().map(drop).map_err(Clone::clone));
            fentry_trial = trial.ok();
            trials.ringbuf = match timing::step("ringbuf trial", || MapType::RingBuf.is_supported())
            {
                Ok(true) => Probe::Yes(()),
                Ok(false) => Probe::No("no BPF ring buffer (Linux 5.8+)".to_owned()),
                Err(e) => Probe::Unknown(e.to_string()),
            };
        }
        let memlock = raise_memlock(&features);
        let mut host = Host {
            features,
            trials,
            sock_offsets,
            mounted_tracefs,
            version_code: vdso_version_code(),
            memlock,
            fentry_trial: Cell::new(fentry_trial),
        };
        if every_mode || !host.trials.fentry.is_yes() {
            host.read_symbols();
        }
        host
    }

    /// Detach the fentry trial's program. Done once the tracer is attached: detaching the
    /// last program from a function makes ftrace wait for RCU tasks (over 100 ms), which
    /// does not happen while the tracer's own fentry program keeps the function hooked.
    pub fn end_fentry_trial(&self) {
        drop(self.fentry_trial.take());
    }

    /// Resolve the kprobe targets, if kprobes can be used at all and it is not done yet.
    pub fn read_symbols(&mut self) {
        if self.features.kprobes() && self.features.attach_points.is_unknown() {
            timing::step("kernel symbols", || {
                self.features.read_symbols(Path::new(ROOT))
            });
        }
    }
}

const ROOT: &str = "/";

/// LINUX_VERSION_CODE from the vDSO the kernel mapped into this process.
fn vdso_version_code() -> Result<u32, String> {
    let start = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;
    if start == 0 {
        return Err("the kernel mapped no vDSO".to_owned());
    }
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| format!("cannot read /proc/self/maps: {e}"))?;
    let end = maps
        .lines()
        .filter(|l| l.ends_with("[vdso]"))
        .filter_map(|l| l.split(' ').next()?.split_once('-'))
        .filter(|(from, _)| usize::from_str_radix(from, 16) == Ok(start))
        .find_map(|(_, to)| usize::from_str_radix(to, 16).ok())
        .ok_or("the vDSO is not in /proc/self/maps")?;
    // SAFETY: the kernel maps the vDSO readable for the life of the process, and
    // /proc/self/maps gave its extent.
    let image = unsafe { std::slice::from_raw_parts(start as *const u8, end - start) };
    tcpconnlat_compat::kversion::from_vdso(image).map_err(|e| e.to_string())
}

/// Before Linux 5.11 every BPF map and program is charged to RLIMIT_MEMLOCK, whose
/// default (64 KiB on older distributions) holds almost nothing: raise it, and say why
/// not where that fails. From 5.11 memory is charged to the cgroup and the limit plays no
/// part (raising it needs CAP_SYS_RESOURCE, which sandboxes often lack: no failure then).
fn raise_memlock(features: &Features) -> Option<String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    if features
        .version
        .is_some_and(|v| v >= KernelVersion(5, 11, 0))
    {
        return None;
    }
    match setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        Ok(()) => None,
        Err(e) => {
            let (soft, _) = getrlimit(Resource::RLIMIT_MEMLOCK).unwrap_or((0, 0));
            Some(format!(
                "cannot raise RLIMIT_MEMLOCK ({}), which this kernel charges BPF memory to \
                 (it is {} KiB): run as root, or with CAP_SYS_RESOURCE, or raise it first \
                 (ulimit -l unlimited)",
                e.desc(),
                soft / 1024
            ))
        }
    }
}

/// With IPv6 built as a module, tcp_v6_connect is described by the module's BTF, which
/// the kernel publishes while the module is loaded (and libbpf attaches fentry there).
fn with_module_functions(mut functions: AttachPoints) -> AttachPoints {
    if functions.get(Func::TcpV6Connect).is_none() && Path::new(IPV6_MODULE_BTF).is_file() {
        functions = AttachPoints::from_fn(|func| match func {
            Func::TcpV6Connect => Some(func.name().to_owned()),
            other => functions.get(other).map(str::to_owned),
        });
    }
    functions
}

const IPV6_MODULE_BTF: &str = "/sys/kernel/btf/ipv6";

/// struct sock offsets, and where they came from.
#[derive(Clone, Debug)]
pub struct KnownOffsets {
    pub offsets: SockOffsets,
    pub source: String,
}

/// In order: the BTF file the user gave, the kernel's own BTF (already parsed), offsets
/// built in from kernel headers for this release; else an error naming both remedies.
fn find_offsets(
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
    probes::header_offsets(release)
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

/// tracefs is not always mounted (this is the case on minimal and container hosts); the
/// tracepoint and tracefs kprobes need it, so mount it where the kernel expects it.
/// Where it was mounted, if it was not and now is.
pub fn mount_tracefs() -> Option<String> {
    use nix::mount::{mount, MsFlags};
    if tracefs::find_tracefs(Path::new(ROOT)).is_some() {
        return None;
    }
    let dir = format!("/{}", tracefs::TRACEFS_DIRS[0]);
    mount(
        Some("tracefs"),
        dir.as_str(),
        Some("tracefs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .ok()
    .map(|()| dir)
}

fn trial_fentry(features: &Features, target: Option<u32>) -> Result<OwnedFd, String> {
    use libbpf_rs::libbpf_sys as sys;
    use std::os::fd::{AsRawFd, FromRawFd};
    if !features.btf {
        return Err("no kernel BTF".to_owned());
    }
    let id = target.ok_or("tcp_v4_connect is not in the kernel's BTF")?;
    // r0 = 0; exit.
    let insns = [
        sys::bpf_insn {
            code: (sys::BPF_ALU64 | sys::BPF_MOV | sys::BPF_K) as u8,
            ..Default::default()
        },
        sys::bpf_insn {
            code: (sys::BPF_JMP | sys::BPF_EXIT) as u8,
            ..Default::default()
        },
    ];
    let mut opts = sys::bpf_prog_load_opts {
        sz: std::mem::size_of::<sys::bpf_prog_load_opts>() as sys::size_t,
        expected_attach_type: sys::BPF_TRACE_FENTRY,
        attach_btf_id: id,
        ..Default::default()
    };
    // SAFETY: every pointer is valid for the call; libbpf returns a new fd or -errno.
    let prog = unsafe {
        sys::bpf_prog_load(
            sys::BPF_PROG_TYPE_TRACING,
            c"trial_fentry".as_ptr(),
            c"Dual BSD/GPL".as_ptr(),
            insns.as_ptr(),
            insns.len() as sys::size_t,
            &mut opts,
        )
    };
    if prog < 0 {
        return Err(std::io::Error::from_raw_os_error(-prog).to_string());
    }
    // SAFETY: a descriptor just created, owned by nothing else.
    let prog = unsafe { OwnedFd::from_raw_fd(prog) };
    // SAFETY: as above; a null name attaches a tracing program to its BTF target.
    let link = unsafe { sys::bpf_raw_tracepoint_open(std::ptr::null(), prog.as_raw_fd()) };
    if link < 0 {
        let e = std::io::Error::from_raw_os_error(-link);
        return Err(format!("attach: {e}"));
    }
    // SAFETY: as above; closing it detaches the program.
    Ok(unsafe { OwnedFd::from_raw_fd(link) })
}
