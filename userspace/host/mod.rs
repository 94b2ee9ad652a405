//! What this host can do: the compat layer's file-based detection plus what only trying
//! can tell (trial loads, the vDSO's version note, raising the memlock limit).

pub mod cgroup;
mod discovery;
mod offsets;
pub mod privileges;
pub mod report;
mod trials;
pub mod users;

use std::cell::{Cell, RefCell};
use std::os::fd::OwnedFd;
use std::path::Path;

use tcpconnlat_compat::btf;
use tcpconnlat_compat::{
    tracefs, AttachPoints, Features, Finding, Findings, Func, KernelVersion, Mode,
};

use crate::timing;
use crate::tracer::kprobes::{self, KprobeAttach};
use crate::tracer::{CoreBtf, FentryTrial};
pub use offsets::OffsetsArg;
use offsets::{Discovery, Offsets, Sources};
use trials::FentryAttach;

pub struct Host {
    pub features: Features,
    pub findings: Findings,
    /// struct sock offsets for probes that cannot use CO-RE: known, or found when needed.
    pub offsets: Offsets,
    /// What the CO-RE probes need from the kernel's BTF, from our reading of it.
    pub core_btf: Option<CoreBtf>,
    /// Whether tcpconnlat had to mount tracefs (see [`mount_tracefs`]).
    pub tracefs_mount: TracefsMount,
    /// The kernel's LINUX_VERSION_CODE from its vDSO, which kprobe programs must carry
    /// before Linux 5.0, or why it is unknown (libbpf then guesses from `uname -r`).
    pub version_code: Result<u32, String>,
    /// Why RLIMIT_MEMLOCK could not be raised on a kernel that charges BPF memory to it
    /// (before 5.11); `None` where it was raised or plays no part.
    pub memlock: Option<String>,
    /// The fentry trial's attach, perhaps still under way: see [`Host::end_trials`].
    fentry_trial: RefCell<FentryAttach>,
    /// The kprobe trial's events, still open: see [`Host::end_trials`].
    kprobe_trial: Cell<Vec<OwnedFd>>,
    /// Where the kprobe targets came from, once found.
    pub kprobe_targets: Option<KprobeTargets>,
}

/// Where the kprobe targets came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KprobeTargets {
    /// Each by its own name, which the kprobe PMU took.
    ByName,
    /// From /proc/kallsyms (a name was missing, or no PMU to ask).
    Kallsyms,
}

/// What to detect.
pub struct Detect<'a> {
    /// Trials (and mounting tracefs) need privileges; without them the trials stay
    /// unknown and the plan says so.
    pub privileged: bool,
    /// `--btf`: struct offsets from this file.
    pub btf_file: Option<&'a Path>,
    /// `--offsets`.
    pub offsets: OffsetsArg,
    /// `--kprobe-attach`, for offset discovery.
    pub kprobe_attach: KprobeAttach,
    /// Which modes will be looked at.
    pub scope: Scope,
}

/// Which modes detection serves: it does only what they need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `--mode auto`: the first mode that works, best first; what a later mode needs is
    /// read only where an earlier one cannot run.
    Auto,
    /// The one mode asked for.
    Only(Mode),
    /// Every mode, for the `--features` report.
    Every,
}

impl Scope {
    /// Whether the fentry trial is made.
    fn tries_fentry(self) -> bool {
        match self {
            Scope::Only(mode) => mode.spec().uses_fentry(),
            Scope::Auto | Scope::Every => true,
        }
    }

    /// Whether the ring buffer trial is made.
    fn tries_ringbuf(self) -> bool {
        match self {
            Scope::Only(mode) => mode.spec().ringbuf,
            Scope::Auto | Scope::Every => true,
        }
    }

    /// The functions whose kprobe targets are looked for: those of the mode asked for, or
    /// of every mode.
    fn kprobe_funcs(self) -> Vec<Func> {
        match self {
            Scope::Only(mode) => mode.spec().kprobe_funcs().collect(),
            Scope::Auto | Scope::Every => Func::ALL.to_vec(),
        }
    }

    /// Whether the kprobe targets are looked for, given what the fentry trial found.
    fn resolves_kprobes(self, fentry: &Finding<()>) -> bool {
        match self {
            Scope::Only(mode) => mode.spec().uses_kprobes(),
            Scope::Auto => !fentry.is_yes(),
            Scope::Every => true,
        }
    }
}

/// Whether tracefs had to be mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TracefsMount {
    /// It was mounted already (or could not be, unprivileged, and nothing was tried).
    Untouched,
    /// tcpconnlat mounted it: what, where ("tracefs at /sys/kernel/tracing").
    Mounted(String),
    /// It was not mounted, and mounting it failed: why.
    Failed(String),
}

impl Host {
    /// Detect what choosing a mode in `what.scope` needs, and nothing more.
    pub fn detect(what: &Detect<'_>) -> Host {
        let tracefs_mount = if what.privileged {
            mount_tracefs()
        } else {
            TracefsMount::Untouched
        };
        let root = Path::new(ROOT);
        let features = timing::step("features", || Features::detect(root));
        // The kernel's BTF, streamed once (compat::btf): what fentry can hook, struct offsets.
        let kernel_btf = timing::step("kernel BTF", || features.btf.then(btf::read_kernel));
        let fentry_targets = match &kernel_btf {
            None => Finding::No("no kernel BTF".to_owned()),
            Some(facts) => Finding::from_result(
                facts
                    .as_ref()
                    .map(|f| with_module_functions(f.functions.clone()))
                    .map_err(|e| e.to_string()),
            ),
        };
        let facts = kernel_btf.as_ref().and_then(|facts| facts.as_ref().ok());
        let trial_target = facts.and_then(|f| trials::fentry_target(&f.function_ids));
        let core_btf = facts.and_then(|f| {
            Some(CoreBtf {
                minimal: f.core_btf.as_ref().ok()?.clone(),
                function_ids: f.function_ids.clone(),
                state_tracepoint_id: f.state_tracepoint_id,
            })
        });
        let version_code = vdso_version_code();
        let sources = Sources {
            kernel_btf,
            release: features.release.as_deref(),
            btf_file: what.btf_file,
            arg: what.offsets,
        };
        let offsets = Offsets::new(
            sources,
            Discovery {
                kprobe_attach: what.kprobe_attach,
                version_code: version_code.as_ref().ok().copied(),
                privileged: what.privileged,
            },
        );
        let mut findings = Findings {
            sock_offsets: offsets.finding(&features),
            fentry_targets,
            ..Findings::default()
        };
        let fentry_trial = try_loading(what, &features, trial_target, &mut findings);
        let memlock = raise_memlock(&features);
        let mut host = Host {
            features,
            findings,
            offsets,
            core_btf,
            tracefs_mount,
            version_code,
            memlock,
            fentry_trial: RefCell::new(fentry_trial),
            kprobe_trial: Cell::new(Vec::new()),
            kprobe_targets: None,
        };
        if what.scope.resolves_kprobes(&host.findings.fentry) {
            host.resolve_kprobe_targets(what.privileged, &what.scope.kprobe_funcs());
        }
        host
    }

    /// Detach the fentry trial's program and close the kprobe trial's events, off the main
    /// thread. Done once the tracer is attached: detaching the last program from a
    /// function makes ftrace wait for an RCU tasks grace period, which does not happen
    /// while the tracer's own fentry program keeps the function hooked; closing a kprobe
    /// event unregisters its kprobe, which waits for an RCU grace period each time.
    pub fn end_trials(&self) {
        let fentry = self.fentry_trial.replace(FentryAttach::None);
        let kprobe_events = self.kprobe_trial.take();
        if matches!(fentry, FentryAttach::None | FentryAttach::Refused(_))
            && kprobe_events.is_empty()
        {
            return;
        }
        // Where the attach is still under way, its thread drops the link once made.
        in_background(move || drop((fentry, kprobe_events)));
    }

    /// Resolve the kprobe targets, if kprobes can be used at all and it is not done yet:
    /// by their own names where the kernel takes them so (privileged), else from
    /// /proc/kallsyms.
    pub fn resolve_kprobe_targets(&mut self, privileged: bool, funcs: &[Func]) {
        if !self.features.kprobes() || !self.features.attach_points.is_unknown() {
            return;
        }
        let exact = (privileged && self.features.kprobe_pmu)
            .then(|| {
                timing::step("kprobe targets", || {
                    trials::exact_kprobe_targets(&self.features, funcs)
                })
            })
            .flatten();
        match exact {
            Some((points, events)) => {
                self.features.attach_points = Finding::Yes(points);
                self.kprobe_trial.set(events);
                self.kprobe_targets = Some(KprobeTargets::ByName);
            }
            None => {
                timing::step("kernel symbols", || {
                    self.features.read_symbols(Path::new(ROOT))
                });
                self.kprobe_targets = Some(KprobeTargets::Kallsyms);
            }
        }
    }

    /// Before tracing: remove what a killed tcpconnlat left behind. What the user should
    /// know of what was done to the host, or could not be.
    pub fn prepare_for_tracing(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(why) = &self.memlock {
            notes.push(why.clone());
        }
        match &self.tracefs_mount {
            TracefsMount::Mounted(dir) => {
                notes.push(format!("tracefs was not mounted; mounted {dir}"))
            }
            TracefsMount::Failed(why) => notes.push(format!(
                "tracefs is not mounted and mounting it failed ({why}): the tracepoint and tracefs kprobes cannot be used"
            )),
            TracefsMount::Untouched => {}
        }
        if let Some(tracefs) = &self.features.tracefs {
            let stale = kprobes::remove_stale(tracefs);
            if stale > 0 {
                notes.push(format!(
                    "removed {stale} kprobe events left by a tcpconnlat that was killed"
                ));
            }
        }
        notes
    }
}

/// The trial's attach, for the tracer: waited for before fentry programs attach.
impl FentryTrial for Host {
    fn fentry_attached(&self) -> Result<(), String> {
        self.fentry_trial.borrow_mut().wait()
    }
}

/// The trials, where privileged: the fentry trial (its attach kept, see
/// [`Host::end_trials`]), the ring buffer and running a program on demand.
///
/// Where a mode is to be started, the fentry finding is the trial's load and its attach
/// as far as it went in [`trials::PATIENCE`]; an attach still under way then goes on
/// beside the probes' load, and the tracer waits for it before attaching fentry programs
/// ([`FentryTrial`]). The features report waits for it here.
fn try_loading(
    what: &Detect<'_>,
    features: &Features,
    fentry_target: Option<u32>,
    findings: &mut Findings,
) -> FentryAttach {
    if !what.privileged {
        findings.fentry = Finding::Unknown("needs root to try".to_owned());
        findings.ringbuf = Finding::Unknown("needs root to try".to_owned());
        findings.on_demand = Finding::Unknown("needs root to try".to_owned());
        return FentryAttach::None;
    }
    let not_needed = |what: &str| Finding::Unknown(format!("not tried: {what}"));
    let trial = if what.scope.tries_fentry() {
        let trial = timing::step("fentry trial", || {
            let mut trial = trials::fentry(features, fentry_target)?;
            if what.scope == Scope::Every {
                trial.wait()?;
            } else {
                // A refusal comes at once (a kernel without the function tracer): known
                // before the plan, fentry's probes are not loaded for nothing.
                trial.wait_at_most(trials::PATIENCE)?;
            }
            Ok(trial)
        });
        findings.fentry = Finding::from_result(trial.as_ref().map(drop).map_err(Clone::clone));
        trial.unwrap_or(FentryAttach::None)
    } else {
        findings.fentry = not_needed("the mode asked for uses no fentry program");
        FentryAttach::None
    };
    findings.ringbuf = if what.scope.tries_ringbuf() {
        timing::step("ringbuf trial", trials::ringbuf)
    } else {
        not_needed("the mode asked for has no ring buffer")
    };
    findings.on_demand = timing::step("on-demand trial", trials::on_demand);
    trial
}

const ROOT: &str = "/";

/// Run `work` on a thread of its own, or here where no thread can be made (a cgroup at
/// its pids.max): it is work that only takes time.
fn in_background<F: FnOnce() + Send + 'static>(work: F) {
    // A spawn that fails drops what it was given: shared, the work can still run here.
    let work = std::sync::Arc::new(std::sync::Mutex::new(Some(work)));
    let theirs = std::sync::Arc::clone(&work);
    let take = |work: &std::sync::Mutex<Option<F>>| work.lock().ok().and_then(|mut w| w.take());
    let spawned = std::thread::Builder::new().spawn(move || {
        if let Some(work) = take(&theirs) {
            work();
        }
    });
    if spawned.is_err() {
        if let Some(work) = take(&work) {
            work();
        }
    }
}

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

/// tracefs is not always mounted (this is the case on minimal and container hosts); the
/// tracepoint and tracefs kprobes need it, so mount it where the kernel expects it. Before
/// Linux 4.1 ("tracefs: Add new tracefs file system") tracing lives only in debugfs, which
/// is the case of CentOS/RHEL 7's 3.10.
fn mount_tracefs() -> TracefsMount {
    if tracefs::find_tracefs(Path::new(ROOT)).is_some() {
        return TracefsMount::Untouched;
    }
    let tracefs_dir = format!("/{}", tracefs::TRACEFS_DIRS[0]);
    let tracefs_err = match mount_fs("tracefs", &tracefs_dir) {
        Ok(()) => return TracefsMount::Mounted(format!("tracefs at {tracefs_dir}")),
        Err(e) => e,
    };
    let debugfs_dir = "/sys/kernel/debug";
    match mount_fs("debugfs", debugfs_dir) {
        Ok(()) if tracefs::find_tracefs(Path::new(ROOT)).is_some() => {
            TracefsMount::Mounted(format!("debugfs at {debugfs_dir}"))
        }
        Ok(()) => TracefsMount::Failed(format!(
            "mount -t tracefs at {tracefs_dir}: {tracefs_err}; debugfs mounted at {debugfs_dir} has no tracing/"
        )),
        Err(e) => TracefsMount::Failed(format!(
            "mount -t tracefs at {tracefs_dir}: {tracefs_err}; mount -t debugfs at {debugfs_dir}: {e}"
        )),
    }
}

fn mount_fs(fstype: &str, dir: &str) -> Result<(), &'static str> {
    use nix::mount::{mount, MsFlags};
    mount(
        Some(fstype),
        dir,
        Some(fstype),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| e.desc())
}
