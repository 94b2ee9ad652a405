//! Finding out what this host can do: the compat layer's file-based detection plus the
//! trials only a real load can answer, and the `--features` report.

use std::path::Path;

use anyhow::Result;
use libbpf_rs::{MapType, ObjectBuilder};
use serde_json::json;
use tcpconnlat_compat::btf::{self, BtfError, BtfFacts, SockOffsets};
use tcpconnlat_compat::kversion;
use tcpconnlat_compat::{tracefs, AttachPoints, Features, Func, KernelVersion, Plan, Trials};

use crate::probes;

pub struct Host {
    pub features: Features,
    pub trials: Trials,
    /// struct sock offsets for probes that cannot use CO-RE, and where they came from.
    pub sock_offsets: Result<KnownOffsets, String>,
    /// We mounted tracefs because nothing had.
    pub mounted_tracefs: Option<String>,
    /// The kernel's LINUX_VERSION_CODE from its vDSO, which kprobe programs must carry
    /// before Linux 5.0, or why it is unknown (libbpf then guesses from `uname -r`).
    pub version_code: Result<u32, String>,
    /// Why RLIMIT_MEMLOCK could not be raised on a kernel that charges BPF memory to it
    /// (before 5.11); `None` where it was raised or plays no part.
    pub memlock: Option<String>,
}

impl Host {
    /// Detect what choosing a mode needs. Trials and mounting need privileges; without
    /// them the trials stay unknown and the plan says so. Kernel symbols are read only
    /// where a kprobe mode may be used: when no earlier mode is, or for `every_mode`
    /// (the `--features` report, a forced mode).
    pub fn detect(privileged: bool, btf_file: Option<&Path>, every_mode: bool) -> Host {
        let root = Path::new(ROOT);
        let mut features = Features::detect(root);
        // The kernel's BTF, parsed once: most of start-up and of peak memory.
        let kernel_btf = features.btf.then(btf::read_kernel);
        let fentry_targets = kernel_btf.as_ref().map(|facts| {
            facts
                .as_ref()
                .map(|f| with_module_functions(f.functions.clone()))
                .map_err(|e| e.to_string())
        });
        let sock_offsets = find_offsets(kernel_btf, features.release.as_deref(), btf_file);
        let mut mounted_tracefs = None;
        if features.tracefs.is_none() && privileged {
            if let Some(dir) = mount_tracefs() {
                mounted_tracefs = Some(dir);
                features = Features::detect(root);
            }
        }
        let mut trials = Trials {
            sock_offsets: Some(
                sock_offsets
                    .as_ref()
                    .map(|o| o.source.clone())
                    .map_err(Clone::clone),
            ),
            fentry_targets,
            ..Trials::default()
        };
        if privileged {
            trials.fentry = Some(trial_fentry(&features));
            trials.ringbuf = Some(MapType::RingBuf.is_supported().unwrap_or(false));
        }
        let memlock = raise_memlock(&features);
        let mut host = Host {
            features,
            trials,
            sock_offsets,
            mounted_tracefs,
            version_code: vdso_version_code(),
            memlock,
        };
        if every_mode || !matches!(host.trials.fentry, Some(Ok(()))) {
            host.read_symbols();
        }
        host
    }

    /// Resolve the kprobe targets, if kprobes can be used at all and it is not done yet.
    pub fn read_symbols(&mut self) {
        if self.features.kprobes() && self.features.attach_points.is_none() {
            self.features.read_symbols(Path::new(ROOT));
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
fn mount_tracefs() -> Option<String> {
    use nix::mount::{mount, MsFlags};
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

/// Load and attach (then at once detach) an empty fentry program: the only way to learn
/// whether the kernel allows fentry. Hardened kernels refuse the load with EPERM even to
/// root; kernels built without the function tracer load it but cannot attach it.
fn trial_fentry(features: &Features) -> Result<(), String> {
    if !features.btf {
        return Err("no kernel BTF".to_owned());
    }
    let object = ObjectBuilder::default()
        .open_memory(probes::TRIAL_FENTRY_OBJECT)
        .and_then(|open| open.load())
        .map_err(|e| e.to_string())?;
    let mut progs = object.progs_mut();
    let prog = progs.next().ok_or("empty trial object")?;
    prog.attach().map(drop).map_err(|e| format!("attach: {e}"))
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn trial_text(t: &Option<Result<(), String>>) -> String {
    match t {
        None => "unknown (needs root to try)".to_owned(),
        Some(Ok(())) => "yes".to_owned(),
        Some(Err(why)) => format!("no ({why})"),
    }
}

pub fn report_text(host: &Host, plan: &Plan) -> String {
    let f = &host.features;
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<24}{v}\n"));
    line(
        "kernel",
        match (&f.release, f.version) {
            (Some(r), Some(v)) => format!("{r} ({v})"),
            (Some(r), None) => r.clone(),
            _ => "unknown".to_owned(),
        },
    );
    line(
        "version code",
        match &host.version_code {
            Ok(code) => format!("{} (from the vDSO)", kversion::display(*code)),
            Err(why) => format!("unknown ({why})"),
        },
    );
    if let Some(why) = &host.memlock {
        line("memlock", why.clone());
    }
    line("BTF", yes_no(f.btf).to_owned());
    line(
        "tracefs",
        match (&f.tracefs, &host.mounted_tracefs) {
            (Some(dir), Some(_)) => format!("{} (mounted by tcpconnlat)", dir.display()),
            (Some(dir), None) => dir.display().to_string(),
            (None, _) => "not mounted".to_owned(),
        },
    );
    line("kprobe PMU", yes_no(f.kprobe_pmu).to_owned());
    line("kprobe_events", yes_no(f.kprobe_events).to_owned());
    line("fentry", trial_text(&host.trials.fentry));
    line(
        "tracepoint",
        match &f.state_tracepoint {
            Ok(_) => "sock:inet_sock_set_state".to_owned(),
            Err(why) => format!("no ({why})"),
        },
    );
    let opt = |r: &Result<u16, String>| match r {
        Ok(_) => "yes".to_owned(),
        Err(why) => format!("no ({why})"),
    };
    line("SYN retransmits", opt(&f.retransmit_tracepoint));
    line("RST tracepoint", opt(&f.reset_tracepoint));
    line(
        "struct sock offsets",
        match &host.sock_offsets {
            Ok(o) => format!("from {}", o.source),
            Err(why) => format!("unknown ({why})"),
        },
    );
    line(
        "ring buffer",
        match host.trials.ringbuf {
            None => "unknown (needs root to try)".to_owned(),
            Some(b) => yes_no(b).to_owned(),
        },
    );
    line(
        "global data",
        f.global_data()
            .map_or("unknown".to_owned(), |b| yes_no(b).to_owned()),
    );
    line(
        "fentry targets",
        match &host.trials.fentry_targets {
            None => "unknown (no kernel BTF)".to_owned(),
            Some(Err(why)) => format!("unknown ({why})"),
            Some(Ok(targets)) => Func::ALL
                .iter()
                .filter_map(|&func| targets.get(func))
                .collect::<Vec<_>>()
                .join(" "),
        },
    );
    match &f.attach_points {
        None => line(
            "kprobe symbols",
            if f.kprobes() {
                "not read".to_owned()
            } else {
                "not needed (no kprobes)".to_owned()
            },
        ),
        Some(Ok(points)) => {
            line("kprobe symbols", "(from /proc/kallsyms)".to_owned());
            for func in Func::ALL {
                line(
                    &format!("  {}", func.name()),
                    points.get(func).unwrap_or("absent").to_owned(),
                );
            }
        }
        Some(Err(why)) => line("kprobe symbols", why.clone()),
    }
    out.push_str("\nmode plan (auto tries these in order):\n");
    for step in &plan.steps {
        let verdict = match &step.verdict {
            Ok(()) if Some(step.mode) == plan.first() => "usable  <- auto picks this".to_owned(),
            Ok(()) => "usable".to_owned(),
            Err(why) => format!("rejected: {why}"),
        };
        out.push_str(&format!("  {:<12}{verdict}\n", step.mode.name()));
    }
    out
}

pub fn report_json(host: &Host, plan: &Plan) -> serde_json::Value {
    let f = &host.features;
    let trial = |t: &Option<Result<(), String>>| match t {
        None => json!(null),
        Some(Ok(())) => json!(true),
        Some(Err(_)) => json!(false),
    };
    json!({
        "kernel": {
            "release": f.release,
            "version": f.version.map(|v| v.to_string()),
            "version_code": host.version_code.as_ref().ok().map(|&c| kversion::display(c)),
            "version_code_error": host.version_code.as_ref().err(),
        },
        "memlock_error": host.memlock,
        "btf": f.btf,
        "tracefs": f.tracefs,
        "tracefs_mounted_by_us": host.mounted_tracefs.is_some(),
        "kprobe_pmu": f.kprobe_pmu,
        "kprobe_events": f.kprobe_events,
        "fentry": trial(&host.trials.fentry),
        "fentry_error": host.trials.fentry.as_ref().and_then(|t| t.as_ref().err()),
        "tracepoint": f.state_tracepoint.is_ok(),
        "tracepoint_layout": f.state_tracepoint.as_ref().ok(),
        "tracepoint_error": f.state_tracepoint.as_ref().err(),
        "retransmit_tracepoint": f.retransmit_tracepoint.is_ok(),
        "reset_tracepoint": f.reset_tracepoint.is_ok(),
        "sock_offsets": host.sock_offsets.as_ref().ok().map(|o| o.offsets),
        "sock_offsets_error": host.sock_offsets.as_ref().err(),
        "sock_offsets_source": host.sock_offsets.as_ref().ok().map(|o| o.source.clone()),
        "ringbuf": host.trials.ringbuf,
        "global_data": f.global_data(),
        "symbols": f.attach_points.as_ref().and_then(|p| p.as_ref().ok()),
        "symbols_error": f.attach_points.as_ref().and_then(|p| p.as_ref().err()),
        "fentry_targets": host.trials.fentry_targets.as_ref().and_then(|t| t.as_ref().ok()),
        "plan": plan.steps.iter().map(|s| json!({
            "mode": s.mode,
            "usable": s.verdict.is_ok(),
            "reason": s.verdict.as_ref().err().map(|e| e.to_string()),
        })).collect::<Vec<_>>(),
        "auto": plan.first(),
    })
}
