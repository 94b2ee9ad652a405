//! Tracing: the probes of one [`Mode`] loaded, configured and attached, and their events
//! read back as a stream. Modes differ only in data: each one's object and hook table
//! (compat's `hooks`); everything else is one code path.
//!
//! - `hooks`: how this kernel's state record is read;
//! - `objects`: the embedded probe objects and the types generated from their header;
//! - `config`: the filters and layouts written into the probes' maps;
//! - `core_btf`: the CO-RE object relocated and attached by our own reading of the
//!   kernel's BTF, so that libbpf need not hold it;
//! - `transport`: ring buffer or perf buffer, and table sizes;
//! - `kprobes`: attaching through the kprobe PMU or tracefs `kprobe_events`;
//! - `stream`, `perfbuf`, `sweeper`: the event stream and what keeps its tables honest;
//! - `event`: one decoded connect.

mod config;
mod core_btf;
pub mod event;
mod hooks;
pub mod kprobes;
pub mod objects;
mod perfbuf;
pub mod stream;
mod sweeper;
mod transport;

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::libbpf_sys::bpf_object__set_kversion;
use libbpf_rs::{AsRawLibbpf, Link, MapCore, Object, ObjectBuilder, OpenObject};
use tcpconnlat_compat::btf::SockOffsets;
use tcpconnlat_compat::{
    plan_hooks, Attach, Features, Findings, HookChoice, HookPlan, Mode, ModeSpec, OffsetNeed, Plan,
    RecordRead, Transport, Unsupported,
};

use crate::timing;
pub use config::{Filters, IpVersion, Outcomes};
pub use core_btf::CoreBtf;
use core_btf::CoreBtfFiles;
use kprobes::{Kprobe, KprobeAttach, KprobeAttacher, KprobeSite};
use objects::maps;
pub use sweeper::{run_on_demand, SweepTimes, STALE};
pub use transport::{choose_transport, Sizes, TransportArg};

/// Probes loaded and attached; dropping it detaches everything.
pub struct Tracer {
    pub mode: Mode,
    pub transport: Transport,
    pub object: Object,
    /// Things the user should know about what is and is not traced.
    pub notes: Vec<String>,
    pub sizes: Sizes,
    /// The program the sweeper runs to ask about a pending connect (probes/common.bpf.h
    /// `confirm_pending`), where the kernel runs programs on demand and the socket's
    /// offsets are known.
    pub confirm: Option<&'static str>,
    _links: Vec<Link>,
    _kprobes: Vec<Kprobe>,
    _pins: Pins,
}

/// Maps pinned for tests (`--pin-maps`); unpinned when dropped, so that nothing outlives
/// the tracer.
struct Pins(Vec<std::path::PathBuf>);

impl Pins {
    fn pin(object: &mut Object, dir: Option<&std::path::Path>) -> Result<Pins> {
        let mut pins = Pins(Vec::new());
        let Some(dir) = dir else {
            return Ok(pins);
        };
        for mut map in object.maps_mut() {
            let path = dir.join(map.name().to_string_lossy().as_ref());
            map.pin(&path)
                .with_context(|| format!("--pin-maps: pinning at {}", path.display()))?;
            pins.0.push(path);
        }
        Ok(pins)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// How to load: what the host offers and the user asked for, beyond the filters.
pub struct LoadOptions<'a> {
    pub features: &'a Features,
    /// What was found by trying and reading beyond `features` (fentry's targets).
    pub findings: &'a Findings,
    /// What the CO-RE object needs from the kernel's BTF, where our reading of it has it
    /// (else libbpf reads the whole file itself).
    pub core_btf: Option<&'a CoreBtf>,
    /// struct sock offsets, for the probes that cannot use CO-RE.
    pub sock: &'a dyn SockOffsetsSource,
    pub transport: Transport,
    pub kprobe_attach: KprobeAttach,
    /// How the state tracepoint's record is read where either way works.
    pub record: RecordRead,
    pub sizes: Sizes,
    /// The kernel's LINUX_VERSION_CODE, where known (see `Host::version_code`).
    pub version_code: Option<u32>,
    /// Events carry the connecting process's cgroup id (`--label cgroup`).
    pub label_cgroup: bool,
    /// Where to pin the maps while tracing (the hidden `--pin-maps`, for tests).
    pub pin_maps: Option<&'a std::path::Path>,
    /// Whether the kernel runs a program on demand (`Findings::on_demand`), or why not.
    pub on_demand: Result<(), &'a str>,
    /// The fentry trial, whose attach fentry programs wait for.
    pub fentry_trial: &'a dyn FentryTrial,
}

/// Where struct sock's offsets come from (the host: BTF, headers or discovery), asked only
/// when a mode that needs them loads.
pub trait SockOffsetsSource {
    /// The offsets, and what the user should know of fields that could not be had.
    fn sock_offsets(&self, need: OffsetNeed) -> Result<(&SockOffsets, &[String]), String>;
}

/// The host's fentry trial, whose attach may still be under way while a mode loads (the
/// plan's fentry finding then told only its load).
pub trait FentryTrial {
    /// Wait for the trial's attach: whether the kernel attached an fentry program, or why
    /// not.
    fn fentry_attached(&self) -> Result<(), String>;
}

/// Start the first mode of the plan that loads and attaches, recording in the plan why
/// the others did not. A `forced` mode's failure is the error.
pub fn start_first(
    plan: &mut Plan,
    options: &LoadOptions<'_>,
    filters: &Filters,
    forced: Option<Mode>,
) -> Result<Tracer> {
    let candidates: Vec<Mode> = plan.candidates().collect();
    for mode in candidates {
        match start(mode, options, filters) {
            Ok(tracer) => return Ok(tracer),
            Err(e) if forced.is_some() => {
                return Err(e.context(format!("cannot trace in {mode} mode")));
            }
            Err(e) => plan.fail(mode, format!("{e:#}")),
        }
    }
    let reasons = plan
        .steps
        .iter()
        .filter_map(|s| s.verdict.as_ref().err().map(|e| format!("{}: {e}", s.mode)))
        .collect::<Vec<_>>()
        .join("; ");
    Err(match forced {
        Some(mode) => anyhow!(
            "cannot trace in {mode} mode on this kernel: {reasons}; try --mode auto, and --features to see what this kernel supports"
        ),
        None => anyhow!("no tracing mode works on this kernel: {reasons}"),
    })
}

/// Start (and stop again) every mode the plan calls usable, so that one called usable
/// really loads and attaches here; record why any did not.
pub fn prove_usable(plan: &mut Plan, options: &LoadOptions<'_>) {
    let candidates: Vec<Mode> = plan.candidates().collect();
    for mode in candidates {
        if let Err(e) = start(mode, options, &Filters::default()) {
            plan.fail(mode, format!("{e:#}"));
        }
    }
}

/// Load and attach `mode`'s probes: plan, open, load, configure, attach. Whether the
/// kernel can run the mode at all was decided before (compat's `Mode::check`).
pub fn start(mode: Mode, options: &LoadOptions<'_>, filters: &Filters) -> Result<Tracer> {
    let spec = mode.spec();
    // Before planning, which may run offset discovery.
    check_filters(mode, &spec, filters)?;
    let loadout = plan(mode, spec, options)?;
    let (object, core_files) = timing::step("open", || open(&loadout, options, filters))?;
    let mut object = timing::step("load", || object.load())
        .with_context(|| format!("loading the {mode} probes (run with -v for the verifier log)"))?;
    drop(core_files);
    config::configure(&object, filters, options, &loadout)?;
    let pins = Pins::pin(&mut object, options.pin_maps)?;
    if spec.uses_fentry() {
        timing::step("fentry trial's attach", || {
            options.fentry_trial.fentry_attached()
        })
        .map_err(|why| anyhow!(Unsupported::FentryRefused(why)))?;
    }
    let (links, kprobes) = timing::step("attach", || attach_all(&object, &loadout.hooks, options))?;
    Ok(Tracer {
        mode,
        transport: loadout.transport,
        object,
        notes: loadout.hooks.notes,
        sizes: options.sizes,
        confirm: loadout.confirm,
        _links: links,
        _kprobes: kprobes,
        _pins: pins,
    })
}

/// What one mode loads on this kernel, decided before anything is opened.
struct Loadout<'a> {
    spec: ModeSpec,
    transport: Transport,
    /// Which program goes where, and what the user should know.
    hooks: HookPlan,
    sock: Option<&'a SockOffsets>,
    /// The sweeper's question, where it can be asked.
    confirm: Option<&'static str>,
}

fn plan<'a>(mode: Mode, spec: ModeSpec, options: &LoadOptions<'a>) -> Result<Loadout<'a>> {
    let transport = if spec.ringbuf {
        options.transport
    } else {
        Transport::PerfBuf
    };
    let layout = options.features.state_tracepoint.as_ref().ok();
    let choice = HookChoice {
        mode,
        transport,
        read: hooks::record_read(layout, options.record),
    };
    let mut hooks = plan_hooks(choice, options.features, options.findings)?;
    note_cgroup_label(mode, &spec, options, &mut hooks);
    let sock = sock_offsets(&spec, options, &mut hooks)?;
    let confirm = confirm_program(options, sock, transport, &mut hooks);
    Ok(Loadout {
        spec,
        transport,
        hooks,
        sock,
        confirm,
    })
}

/// struct sock's offsets: legacy mode cannot do without them (they may be discovered
/// now); tracepoint mode reads sk_err at them where they are known; every mode's
/// question about a pending connect reads the socket at them (the CO-RE probes read it
/// themselves otherwise).
fn sock_offsets<'a>(
    spec: &ModeSpec,
    options: &LoadOptions<'a>,
    plan: &mut HookPlan,
) -> Result<Option<&'a SockOffsets>> {
    let need = spec.offsets;
    match options.sock.sock_offsets(need) {
        Ok((offsets, notes)) => {
            for note in notes {
                plan.note(note);
            }
            Ok(Some(offsets))
        }
        Err(why) if need == OffsetNeed::Required => Err(anyhow!(why)),
        Err(_) => {
            // The CO-RE probes read sk_err by BTF; the others only at these offsets.
            if !spec.core {
                plan.note(
                    "failed connects are told apart only as refused or timeout: no BTF to find sk_err in",
                );
            }
            Ok(None)
        }
    }
}

/// The question the sweeper asks about connects pending a while, where the kernel can run
/// it (and the socket's offsets are known); otherwise the user is told what that costs.
fn confirm_program(
    options: &LoadOptions<'_>,
    sock: Option<&SockOffsets>,
    transport: Transport,
    plan: &mut HookPlan,
) -> Option<&'static str> {
    let why_not = match (options.on_demand, sock) {
        (Ok(()), Some(_)) => return Some(transport.confirm_program()),
        (Err(why), _) => why.to_owned(),
        (Ok(()), None) => "struct sock's offsets are unknown".to_owned(),
    };
    plan.note(&format!(
        "a connect whose end the kernel shows no probe is reported only after {} minutes, as missed: the sweeper cannot ask about its socket ({why_not})",
        STALE.as_secs() / 60
    ));
    None
}

/// Filters a mode cannot apply: an error (a filter not applied would show what was not
/// asked for).
fn check_filters(mode: Mode, spec: &ModeSpec, filters: &Filters) -> Result<()> {
    if !spec.cgroup_helper && filters.cgroup_id.is_some() {
        bail!("--cgroup needs a helper {mode} mode does without (Linux 4.18+): use another mode");
    }
    Ok(())
}

/// Events carry the connecting process's cgroup where asked, but not where the mode's
/// object leaves out the helper (legacy): the label says "unknown" there, so that one
/// fleet-wide configuration also runs on the oldest nodes. The user is told.
fn note_cgroup_label(mode: Mode, spec: &ModeSpec, options: &LoadOptions<'_>, plan: &mut HookPlan) {
    if !spec.cgroup_helper && options.label_cgroup {
        plan.note(&format!("the cgroup label reads \"unknown\" in {mode} mode: the helper that gives a connect's cgroup is Linux 4.18+, and {mode} mode does without it"));
    }
}

/// Open the mode's object with only the planned programs, only the maps they use, sized
/// as asked, stamped with the kernel's version code; the CO-RE object with our reading of
/// the kernel's BTF where there is one (and the files libbpf reads it from at load).
fn open(
    loadout: &Loadout<'_>,
    options: &LoadOptions<'_>,
    filters: &Filters,
) -> Result<(OpenObject, Option<CoreBtfFiles>)> {
    let Loadout {
        spec,
        transport,
        hooks: plan,
        confirm,
        ..
    } = loadout;
    let mut builder = ObjectBuilder::default();
    let core = options.core_btf.filter(|_| spec.core);
    let hooks: Vec<Attach> = plan.hooks.iter().map(|h| h.attach).collect();
    let mut core_files = match core {
        Some(core) => {
            core.register_handlers(&hooks)?;
            Some(core.relocate_with(&mut builder)?)
        }
        None => None,
    };
    let mut open = builder
        .open_memory(objects::bytes(spec.object))
        .context("opening the probe object")?;
    if let (Some(core), Some(files)) = (core, core_files.as_mut()) {
        core.name_placeholders(&mut open, &hooks, files)?;
    }
    if let Some(code) = options.version_code {
        // Kernels before 5.0 load a kprobe program only if it names their exact
        // LINUX_VERSION_CODE, which libbpf would guess from `uname -r`.
        // SAFETY: the object is open and not loaded yet.
        unsafe { bpf_object__set_kversion(open.as_libbpf_object().as_ptr(), code) };
    }
    for mut prog in open.progs_mut() {
        let wanted = plan.hooks.iter().any(|p| prog.name() == p.prog.as_str())
            || confirm.is_some_and(|name| prog.name() == name);
        prog.set_autoload(wanted);
    }
    // Maps no loaded program uses are never created (nor sized): the other transport's
    // buffer, and the count of perf samples sent where there is no perf buffer.
    for mut map in open.maps_mut() {
        let name = map.name().to_string_lossy().into_owned();
        let buffers = [Transport::RingBuf.map(), Transport::PerfBuf.map()];
        let unused = (buffers.contains(&name.as_str()) && name != transport.map())
            || (name == maps::SENT && *transport != Transport::PerfBuf);
        if unused {
            map.set_autocreate(false)
                .with_context(|| format!("leaving out map {name}"))?;
            continue;
        }
        // Filter sets hold what was asked for (a map needs room for one at least).
        let size = match name.as_str() {
            maps::PENDING => Some(options.sizes.max_pending),
            maps::EVENTS_RB => Some(options.sizes.ring_bytes()),
            maps::PIDS => Some(filters.pids.len().max(1) as u32),
            maps::DPORTS => Some(filters.dports.len().max(1) as u32),
            maps::SENT => {
                Some(libbpf_rs::num_possible_cpus().context("counting the possible CPUs")? as u32)
            }
            _ => None,
        };
        if let Some(size) = size {
            map.set_max_entries(size)
                .with_context(|| format!("sizing map {name}"))?;
        }
    }
    Ok((open, core_files))
}

/// Attach every planned program; what is returned detaches when dropped.
fn attach_all(
    object: &Object,
    plan: &HookPlan,
    options: &LoadOptions<'_>,
) -> Result<(Vec<Link>, Vec<Kprobe>)> {
    let attacher = KprobeAttacher::new(options.kprobe_attach, options.features);
    let (mut links, mut kprobes) = (Vec::new(), Vec::new());
    for hook in &plan.hooks {
        let prog = object
            .progs_mut()
            .find(|prog| prog.name() == hook.prog.as_str())
            .ok_or_else(|| anyhow!("program {} missing from the probe object", hook.prog))?;
        let target = match &hook.symbol {
            Some(symbol) => symbol.clone(),
            None => prog.section().to_string_lossy().into_owned(),
        };
        let context = || format!("attaching {} to {target}", hook.prog);
        match (hook.attach, &hook.symbol) {
            (Attach::Kprobe(_), Some(symbol)) => {
                let site = KprobeSite {
                    symbol,
                    tag: &hook.prog,
                };
                kprobes.push(attacher.attach(&prog, &site).with_context(context)?);
            }
            // At the BTF id it was loaded with (libbpf knows no name for it: core_btf).
            (Attach::Fentry(_) | Attach::BtfTracepoint(_), _) => {
                links.push(prog.attach_trace().with_context(context)?)
            }
            _ => links.push(prog.attach().with_context(context)?),
        }
    }
    Ok((links, kprobes))
}

/// A descriptor of its own for the loaded program `name`.
pub fn find_program_fd(object: &Object, name: &str) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    let prog = object
        .progs()
        .find(|p| p.name() == name)
        .ok_or_else(|| anyhow!("program {name} missing from the probe object"))?;
    prog.as_fd()
        .try_clone_to_owned()
        .with_context(|| format!("holding program {name}"))
}

pub fn find_map<'a>(object: &'a Object, name: &str) -> Result<libbpf_rs::Map<'a>> {
    object
        .maps()
        .find(|m| m.name() == name)
        .ok_or_else(|| anyhow!("map {name} missing from the probe object"))
}
