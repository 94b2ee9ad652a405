//! Loading and attaching the probes for one [`Mode`]. Modes differ only in the data of
//! their [`ModeSpec`]: which object, which programs, and how each one attaches.

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::libbpf_sys::bpf_object__set_kversion;
use libbpf_rs::{AsRawLibbpf, Link, MapCore, MapFlags, Object, ObjectBuilder, OpenObject};
use tcpconnlat_compat::btf::SockOffsets;
use tcpconnlat_compat::{AttachPoints, Features, Func, Mode, Probe, StateLayout, Trials};

use crate::cli::TransportArg;
use crate::kprobes::{self, Kprobe, KprobeAttach};
use crate::probes::{self, maps, Config, RawStateLayout, RawStateRecord, Report};
use crate::timing;

/// How events reach userspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// BPF ring buffer (Linux 5.8+): one buffer for all CPUs, batched wakeups.
    RingBuf,
    /// Perf event array: every kernel.
    PerfBuf,
}

impl Transport {
    /// The ring buffer where the kernel has one, unless the user asked otherwise.
    pub fn choose(requested: TransportArg, trials: &Trials) -> Result<Transport> {
        let ring = trials.ringbuf.is_yes();
        match requested {
            TransportArg::Ringbuf if !ring => {
                bail!("this kernel has no BPF ring buffer (Linux 5.8+): use --transport perfbuf")
            }
            TransportArg::Ringbuf => Ok(Transport::RingBuf),
            TransportArg::Perfbuf => Ok(Transport::PerfBuf),
            TransportArg::Auto if ring => Ok(Transport::RingBuf),
            TransportArg::Auto => Ok(Transport::PerfBuf),
        }
    }

    /// The map the probes write to; the other transport's map is never created.
    pub fn map(self) -> &'static str {
        match self {
            Transport::RingBuf => maps::EVENTS_RB,
            Transport::PerfBuf => maps::EVENTS_PB,
        }
    }

    /// Emitting programs exist once per transport, named `<hook>_<suffix>`.
    fn suffix(self) -> &'static str {
        match self {
            Transport::RingBuf => "rb",
            Transport::PerfBuf => "pb",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Transport::RingBuf => "ring buffer",
            Transport::PerfBuf => "perf buffer",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracepoint {
    /// `sock:inet_sock_set_state`: finishes every connect; required.
    State,
    /// `tcp:tcp_retransmit_skb`: SYN retransmit counts.
    Retransmit,
    /// `tcp:tcp_receive_reset`: RSTs, so refusals are known without sk_err.
    Reset,
}

/// Where a program goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// fentry or fexit, by BTF name as the program's section says.
    Fentry(Func),
    /// By the symbol kallsyms gave for the function.
    Kprobe(Func),
    Kretprobe(Func),
    /// As the program's section says.
    Tracepoint(Tracepoint),
}

#[derive(Clone, Copy, Debug)]
struct Hook {
    prog: &'static str,
    attach: Attach,
    /// Built once per transport (the program name gets the transport's suffix).
    emits: bool,
    /// What is lost when the kernel lacks this hook; `None`: the mode cannot do without.
    if_missing: Option<&'static str>,
}

const fn hook(prog: &'static str, attach: Attach) -> Hook {
    Hook {
        prog,
        attach,
        emits: false,
        if_missing: None,
    }
}

/// A hook the mode can do without, and what is lost without it.
const fn optional(prog: &'static str, attach: Attach, if_missing: &'static str) -> Hook {
    Hook {
        if_missing: Some(if_missing),
        ..hook(prog, attach)
    }
}

struct ModeSpec {
    object: &'static [u8],
    hooks: &'static [Hook],
    /// The object has a ring buffer variant (legacy mode does without).
    ringbuf: bool,
}

mod hooks {
    use super::{hook, optional, Attach::*, Hook, Tracepoint::*};
    use tcpconnlat_compat::Func::*;

    const NO_IPV6: &str = "IPv6 connects are not traced";
    const NO_RETRANSMITS: &str = "SYN retransmits are not counted";
    const NO_RESETS: &str = "RSTs are only seen through sk_err";

    /// The tracepoints every mode but legacy finishes connects with.
    macro_rules! with_tracepoints {
        ($($hook:expr),* $(,)?) => {
            &[
                $($hook,)*
                Hook { emits: true, ..hook("tp_state", Tracepoint(State)) },
                optional("tp_retransmit", Tracepoint(Retransmit), NO_RETRANSMITS),
                optional("tp_reset", Tracepoint(Reset), NO_RESETS),
            ]
        };
    }

    pub const FENTRY: &[Hook] = with_tracepoints![
        hook("fentry_v4_connect", Fentry(TcpV4Connect)),
        hook("fexit_v4_connect", Fentry(TcpV4Connect)),
        optional("fentry_v6_connect", Fentry(TcpV6Connect), NO_IPV6),
        optional("fexit_v6_connect", Fentry(TcpV6Connect), NO_IPV6),
        hook("fentry_rcv_state", Fentry(TcpRcvStateProcess)),
    ];
    pub const KPROBE: &[Hook] = with_tracepoints![
        hook("kprobe_v4_connect", Kprobe(TcpV4Connect)),
        hook("kretprobe_v4_connect", Kretprobe(TcpV4Connect)),
        optional("kprobe_v6_connect", Kprobe(TcpV6Connect), NO_IPV6),
        optional("kretprobe_v6_connect", Kretprobe(TcpV6Connect), NO_IPV6),
        hook("kprobe_rcv_state", Kprobe(TcpRcvStateProcess)),
    ];
    pub const TRACEPOINT: &[Hook] = with_tracepoints![];
    /// No tracepoints: everything by kprobe, one program serving both address families.
    pub const LEGACY: &[Hook] = &[
        hook("legacy_connect", Kprobe(TcpV4Connect)),
        optional("legacy_connect", Kprobe(TcpV6Connect), NO_IPV6),
        hook("legacy_connect_return", Kretprobe(TcpV4Connect)),
        optional("legacy_connect_return", Kretprobe(TcpV6Connect), NO_IPV6),
        hook("legacy_rcv_state", Kprobe(TcpRcvStateProcess)),
        hook("legacy_set_state", Kprobe(TcpSetState)),
        optional(
            "legacy_retransmit",
            Kprobe(TcpRetransmitSkb),
            NO_RETRANSMITS,
        ),
        optional("legacy_reset", Kprobe(TcpReset), NO_RESETS),
    ];
}

fn spec(mode: Mode) -> ModeSpec {
    let (object, hooks, ringbuf) = match mode {
        Mode::Fentry => (probes::CORE_OBJECT, hooks::FENTRY, true),
        Mode::Kprobe => (probes::CORE_OBJECT, hooks::KPROBE, true),
        Mode::Tracepoint => (probes::TRACEPOINT_OBJECT, hooks::TRACEPOINT, true),
        Mode::Legacy => (probes::LEGACY_OBJECT, hooks::LEGACY, false),
    };
    ModeSpec {
        object,
        hooks,
        ringbuf,
    }
}

/// What the user asked the probes to filter (all applied in the kernel).
#[derive(Clone, Debug)]
pub struct Filters {
    pub min_lat_ns: u64,
    /// Empty: every process.
    pub pids: Vec<u32>,
    /// 4 or 6.
    pub ip_version: Option<u8>,
    pub uid: Option<u32>,
    /// cgroup v2 id (the cgroup directory's inode number).
    pub cgroup_id: Option<u64>,
    pub comm: Option<String>,
    /// Empty: every destination port.
    pub dports: Vec<u16>,
    pub established: bool,
    pub failed: bool,
}

impl Default for Filters {
    fn default() -> Filters {
        Filters {
            min_lat_ns: 0,
            pids: Vec::new(),
            ip_version: None,
            uid: None,
            cgroup_id: None,
            comm: None,
            dports: Vec::new(),
            established: true,
            failed: true,
        }
    }
}

/// Probes loaded and attached; dropping it detaches everything.
pub struct Tracer {
    pub mode: Mode,
    pub transport: Transport,
    pub object: Object,
    /// Things the user should know about what is and is not traced.
    pub notes: Vec<String>,
    pub sizes: Sizes,
    _links: Vec<Link>,
    _kprobes: Vec<Kprobe>,
}

/// One program on one hook: its name in the object and, for kprobes, the kernel symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedHook {
    pub prog: String,
    pub attach: Attach,
    pub symbol: Option<String>,
}

/// Which programs go where, and what the user should know about hooks the kernel lacks.
#[derive(Debug, Default)]
pub struct HookPlan {
    pub hooks: Vec<PlannedHook>,
    pub notes: Vec<String>,
}

/// How to load: what the host offers and the user asked for, beyond the filters.
pub struct Setup<'a> {
    pub features: &'a Features,
    /// What fentry can attach to, from the kernel's BTF.
    pub fentry_targets: Option<&'a AttachPoints>,
    /// struct sock offsets, for the probes that cannot use CO-RE.
    pub sock: Option<&'a SockOffsets>,
    pub transport: Transport,
    pub kprobe_attach: KprobeAttach,
    /// Read the state tracepoint's record through its offsets even where its layout is
    /// `struct state_record` (the hidden `--record-offsets`, for tests).
    pub record_offsets: bool,
    pub sizes: Sizes,
    /// The kernel's LINUX_VERSION_CODE, where known (see `Host::version_code`).
    pub version_code: Option<u32>,
    /// Events carry the connecting process's cgroup id (`--label cgroup`).
    pub label_cgroup: bool,
}

/// How big the kernel-side tables are (`--buffer-pages`, `--max-pending`).
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Pages of event buffer, per CPU for the perf buffer, in all for the ring buffer;
    /// `None` for the defaults below.
    pub buffer_pages: Option<u32>,
    /// Connects that can be in flight at once and still be timed.
    pub max_pending: u32,
}

impl Sizes {
    /// Perf buffer pages per CPU when the user does not say (bcc's default).
    const PERF_PAGES: u32 = 64;

    /// The ring buffer holds, by default, an event for every connect that can be in
    /// flight: when they all fail at once (a SYN flood timing out: the timer wheel fires
    /// thousands in one softirq) no reader could drain it fast enough, and none is lost.
    pub fn ring_bytes(&self) -> u32 {
        let page = page_size();
        match self.buffer_pages {
            Some(pages) => pages * page,
            None => {
                let record = std::mem::size_of::<crate::probes::RawEvent>() as u64 + 8;
                let bytes = u64::from(self.max_pending) * record;
                let pages = bytes.div_ceil(u64::from(page)).next_power_of_two();
                // --max-pending is at most 4,194,304: about 512 MiB.
                pages as u32 * page
            }
        }
    }

    /// Perf buffer pages per CPU: the per-CPU cost forbids sizing it by --max-pending.
    pub fn perf_pages(&self) -> u32 {
        self.buffer_pages.unwrap_or(Self::PERF_PAGES)
    }
}

/// Load and attach `mode`'s probes: plan, open, load, configure, attach. Whether the
/// kernel can run the mode at all was decided before (compat's `Mode::check`).
pub fn start(mode: Mode, setup: &Setup<'_>, filters: &Filters) -> Result<Tracer> {
    check_filters(mode, filters, setup)?;
    let spec = spec(mode);
    let transport = if spec.ringbuf {
        setup.transport
    } else {
        Transport::PerfBuf
    };
    let layout = setup.features.state_tracepoint.as_ref().ok();
    let direct = !setup.record_offsets && layout.is_some_and(is_state_record);
    let mut plan = plan_hooks(
        mode,
        setup.features,
        setup.fentry_targets,
        transport,
        direct,
    )
    .map_err(|why| anyhow!(why))?;
    // The CO-RE probes read sk_err themselves; the tracepoint object needs its offset.
    if setup.sock.is_none() && spec.object == probes::TRACEPOINT_OBJECT {
        note(
            &mut plan.notes,
            "failed connects are told apart only as refused or timeout: no BTF to find sk_err in",
        );
    }
    let object = timing::step("open", || open(&spec, &plan, transport, setup))?;
    let object = timing::step("load", || object.load())
        .with_context(|| format!("loading the {mode} probes (run with -v for the verifier log)"))?;
    configure(&object, filters, setup)?;
    let (links, kprobes) = timing::step("attach", || attach_all(&object, &plan, setup))?;
    Ok(Tracer {
        mode,
        transport,
        object,
        notes: plan.notes,
        sizes: setup.sizes,
        _links: links,
        _kprobes: kprobes,
    })
}

/// Filters and labels a mode cannot apply.
fn check_filters(mode: Mode, filters: &Filters, setup: &Setup<'_>) -> Result<()> {
    if mode == Mode::Legacy && filters.cgroup_id.is_some() {
        bail!("--cgroup needs a helper legacy mode does without (Linux 4.18+): use another mode");
    }
    if mode == Mode::Legacy && setup.label_cgroup {
        bail!("--label cgroup needs a helper legacy mode does without (Linux 4.18+): use another mode");
    }
    Ok(())
}

/// Which program of `mode` goes on which hook of this kernel (pure: from what was
/// detected). The emitting program is the one for `transport`, reading the state record
/// directly where `direct`. A hook the kernel lacks is left out with a note where the mode
/// can do without it, and is an error where it cannot.
pub fn plan_hooks(
    mode: Mode,
    features: &Features,
    fentry_targets: Option<&AttachPoints>,
    transport: Transport,
    direct: bool,
) -> Result<HookPlan, String> {
    let mut plan = HookPlan::default();
    for hook in spec(mode).hooks {
        let symbol = match target(hook.attach, features, fentry_targets) {
            Ok(symbol) => symbol,
            Err(missing) => match hook.if_missing {
                Some(lost) => {
                    note(&mut plan.notes, &format!("{lost}: {missing}"));
                    continue;
                }
                None => return Err(missing),
            },
        };
        let prog = match hook.attach {
            _ if !hook.emits => hook.prog.to_owned(),
            // A record laid out as `struct state_record` is read directly, by programs of
            // their own (`<hook>_direct_<suffix>`).
            Attach::Tracepoint(Tracepoint::State) if direct => {
                format!("{}_direct_{}", hook.prog, transport.suffix())
            }
            _ => format!("{}_{}", hook.prog, transport.suffix()),
        };
        plan.hooks.push(PlannedHook {
            prog,
            attach: hook.attach,
            symbol,
        });
    }
    Ok(plan)
}

/// Where `attach` goes on this kernel: the symbol for kprobes (`None` for hooks the
/// program's section names), or what is missing.
fn target(
    attach: Attach,
    features: &Features,
    fentry_targets: Option<&AttachPoints>,
) -> Result<Option<String>, String> {
    let tracepoint = |found: Result<(), &String>| found.map(|()| None).map_err(Clone::clone);
    let (points, source) = match attach {
        Attach::Tracepoint(Tracepoint::State) => {
            return tracepoint(features.state_tracepoint.as_ref().map(drop))
        }
        Attach::Tracepoint(Tracepoint::Retransmit) => {
            return tracepoint(features.retransmit_tracepoint.as_ref().map(drop))
        }
        Attach::Tracepoint(Tracepoint::Reset) => {
            return tracepoint(features.reset_tracepoint.as_ref().map(drop))
        }
        Attach::Fentry(_) => (
            fentry_targets.ok_or("the kernel's BTF could not be read")?,
            "the kernel's BTF",
        ),
        Attach::Kprobe(_) | Attach::Kretprobe(_) => match &features.attach_points {
            Probe::Yes(points) => (points, "/proc/kallsyms"),
            Probe::No(why) | Probe::Unknown(why) => return Err(why.clone()),
        },
    };
    let (Attach::Fentry(func) | Attach::Kprobe(func) | Attach::Kretprobe(func)) = attach else {
        unreachable!("tracepoints returned above")
    };
    match points.get(func) {
        Some(symbol) => Ok(Some(symbol.to_owned())),
        None => Err(format!(
            "kernel function {} is not in {source}",
            func.name()
        )),
    }
}

/// Open the mode's object with only the planned programs, only the maps they use, sized
/// as asked, stamped with the kernel's version code.
fn open(
    spec: &ModeSpec,
    plan: &HookPlan,
    transport: Transport,
    setup: &Setup<'_>,
) -> Result<OpenObject> {
    let mut open = ObjectBuilder::default()
        .open_memory(spec.object)
        .context("opening the probe object")?;
    if let Some(code) = setup.version_code {
        // Kernels before 5.0 load a kprobe program only if it names their exact
        // LINUX_VERSION_CODE, which libbpf would guess from `uname -r`.
        // SAFETY: the object is open and not loaded yet.
        unsafe { bpf_object__set_kversion(open.as_libbpf_object().as_ptr(), code) };
    }
    for mut prog in open.progs_mut() {
        let wanted = plan.hooks.iter().any(|p| prog.name() == p.prog.as_str());
        prog.set_autoload(wanted);
    }
    // Maps no loaded program uses are never created: the other transport's buffer, and
    // the kretprobes' `connecting` table where there are no kretprobes.
    let kretprobes = plan
        .hooks
        .iter()
        .any(|p| matches!(p.attach, Attach::Kretprobe(_)));
    for mut map in open.maps_mut() {
        let name = map.name().to_string_lossy().into_owned();
        let buffers = [Transport::RingBuf.map(), Transport::PerfBuf.map()];
        let unused = (buffers.contains(&name.as_str()) && name != transport.map())
            || (name == maps::CONNECTING && !kretprobes);
        if unused {
            map.set_autocreate(false)
                .with_context(|| format!("leaving out map {name}"))?;
        }
        let size = match name.as_str() {
            maps::PENDING => Some(setup.sizes.max_pending),
            maps::EVENTS_RB => Some(setup.sizes.ring_bytes()),
            _ => None,
        };
        if let Some(size) = size {
            map.set_max_entries(size)
                .with_context(|| format!("sizing map {name}"))?;
        }
    }
    Ok(open)
}

/// Write the configuration and the filter sets, before anything is attached.
fn configure(object: &Object, filters: &Filters, setup: &Setup<'_>) -> Result<()> {
    let ring_bytes =
        find_map(object, Transport::RingBuf.map()).map_or(0, |m| u64::from(m.max_entries()));
    let layout = setup.features.state_tracepoint.as_ref().ok();
    let config = Config {
        label_cgroup: setup.label_cgroup.into(),
        ..config(filters, setup.features, layout, setup.sock, ring_bytes)
    };
    write_config(object, &config)?;
    write_set(
        object,
        maps::PIDS,
        filters.pids.iter().map(|p| p.to_ne_bytes().to_vec()),
    )?;
    write_set(
        object,
        maps::DPORTS,
        filters.dports.iter().map(|p| p.to_ne_bytes().to_vec()),
    )
}

/// Attach every planned program; what is returned detaches when dropped.
fn attach_all(
    object: &Object,
    plan: &HookPlan,
    setup: &Setup<'_>,
) -> Result<(Vec<Link>, Vec<Kprobe>)> {
    let (mut links, mut kprobes) = (Vec::new(), Vec::new());
    for (index, hook) in plan.hooks.iter().enumerate() {
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
            (Attach::Kprobe(_) | Attach::Kretprobe(_), Some(symbol)) => {
                let retprobe = matches!(hook.attach, Attach::Kretprobe(_));
                let probe = kprobes::attach(
                    &prog,
                    retprobe,
                    symbol,
                    setup.kprobe_attach,
                    setup.features.kprobe_pmu,
                    setup.features.tracefs.as_deref(),
                    index,
                )
                .with_context(context)?;
                kprobes.push(probe);
            }
            _ => links.push(prog.attach().with_context(context)?),
        }
    }
    Ok((links, kprobes))
}

fn config(
    filters: &Filters,
    features: &Features,
    layout: Option<&StateLayout>,
    sock: Option<&SockOffsets>,
    ring_bytes: u64,
) -> Config {
    const AF_INET: u16 = 2;
    const AF_INET6: u16 = 10;
    let mut comm = [0u8; 16];
    if let Some(name) = &filters.comm {
        // The CLI allows at most 15 bytes: the kernel's comm with its NUL.
        comm[..name.len()].copy_from_slice(name.as_bytes());
    }
    let layout = layout.cloned().unwrap_or_default();
    let sock = sock.copied().unwrap_or_default();
    Config {
        min_lat_ns: filters.min_lat_ns,
        // A quarter of the ring: early enough that a burst never fills it while the
        // reader sleeps, rare enough that steady traffic never wakes it.
        wakeup_bytes: ring_bytes / 4,
        cgroup_id: filters.cgroup_id.unwrap_or(0),
        uid: filters.uid.unwrap_or(0),
        family: match filters.ip_version {
            Some(4) => AF_INET,
            Some(6) => AF_INET6,
            _ => 0,
        },
        filter_uid: filters.uid.is_some().into(),
        filter_pids: (!filters.pids.is_empty()).into(),
        filter_dports: (!filters.dports.is_empty()).into(),
        filter_comm: filters.comm.is_some().into(),
        report: [
            (filters.established, Report::REPORT_ESTABLISHED),
            (filters.failed, Report::REPORT_FAILED),
        ]
        .into_iter()
        .filter(|(wanted, _)| *wanted)
        .fold(0, |bits, (_, bit)| bits | bit.0 as u8),
        retransmit_skaddr: *features.retransmit_tracepoint.as_ref().unwrap_or(&0),
        reset_skaddr: *features.reset_tracepoint.as_ref().unwrap_or(&0),
        comm,
        tp: RawStateLayout {
            skaddr: layout.skaddr,
            oldstate: layout.oldstate,
            newstate: layout.newstate,
            sport: layout.sport,
            dport: layout.dport,
            family: layout.family,
            protocol: layout.protocol.unwrap_or(0),
            protocol_size: layout.protocol_size,
            saddr: layout.saddr,
            daddr: layout.daddr,
            saddr_v6: layout.saddr_v6,
            daddr_v6: layout.daddr_v6,
        },
        sk: probes::sock_layout(&sock),
        ..Default::default()
    }
}

/// Fill a filter set map (keys only; the value is a present flag).
fn write_set(object: &Object, name: &str, keys: impl Iterator<Item = Vec<u8>>) -> Result<()> {
    let map = find_map(object, name)?;
    for key in keys {
        map.update(&key, &[1], MapFlags::ANY)
            .with_context(|| format!("filling the {name} filter"))?;
    }
    Ok(())
}

pub fn page_size() -> u32 {
    use nix::unistd::{sysconf, SysconfVar};
    match sysconf(SysconfVar::PAGE_SIZE) {
        Ok(Some(size)) => u32::try_from(size).unwrap_or(4096),
        _ => 4096,
    }
}

fn note(notes: &mut Vec<String>, text: &str) {
    if !notes.iter().any(|n| n == text) {
        notes.push(text.to_owned());
    }
}

/// Whether the kernel's state tracepoint record is laid out as `struct state_record`,
/// which the probes then read directly instead of field by field through bpf_probe_read.
fn is_state_record(layout: &StateLayout) -> bool {
    use std::mem::offset_of;
    [
        (layout.skaddr, offset_of!(RawStateRecord, skaddr)),
        (layout.oldstate, offset_of!(RawStateRecord, oldstate)),
        (layout.newstate, offset_of!(RawStateRecord, newstate)),
        (layout.sport, offset_of!(RawStateRecord, sport)),
        (layout.dport, offset_of!(RawStateRecord, dport)),
        (layout.family, offset_of!(RawStateRecord, family)),
        (layout.saddr, offset_of!(RawStateRecord, saddr)),
        (layout.daddr, offset_of!(RawStateRecord, daddr)),
        (layout.saddr_v6, offset_of!(RawStateRecord, saddr_v6)),
        (layout.daddr_v6, offset_of!(RawStateRecord, daddr_v6)),
    ]
    .into_iter()
    .all(|(found, ours)| usize::from(found) == ours)
        && layout.protocol.map(usize::from) == Some(offset_of!(RawStateRecord, protocol))
        && usize::from(layout.protocol_size) == std::mem::size_of::<u16>()
}

fn write_config(object: &Object, config: &Config) -> Result<()> {
    let map = find_map(object, maps::CONFIG)?;
    // SAFETY: Config is plain data (see probes.rs).
    let bytes = unsafe { plain::as_bytes(config) };
    map.update(&0u32.to_ne_bytes(), bytes, MapFlags::ANY)
        .context("writing the probe configuration")
}

pub fn find_map<'a>(object: &'a Object, name: &str) -> Result<libbpf_rs::Map<'a>> {
    object
        .maps()
        .find(|m| m.name() == name)
        .ok_or_else(|| anyhow!("map {name} missing from the probe object"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// What a fixture kernel (compat/tests/fixtures, captured from real kernels) offers.
    fn kernel(name: &str) -> Features {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("compat/tests/fixtures")
            .join(name);
        let mut features = Features::detect(&root);
        features.read_symbols(&root);
        features
    }

    fn progs(plan: &HookPlan) -> Vec<(&str, Option<&str>)> {
        plan.hooks
            .iter()
            .map(|h| (h.prog.as_str(), h.symbol.as_deref()))
            .collect()
    }

    /// Every program and map the loader and the event stream open by name is in the
    /// object of each mode (a renamed C program would otherwise push auto to a worse mode
    /// at run time).
    #[test]
    fn every_name_userspace_uses_is_in_the_embedded_objects() {
        for mode in Mode::ALL {
            let spec = spec(mode);
            let open = ObjectBuilder::default().open_memory(spec.object).unwrap();
            let progs: Vec<String> = open
                .progs()
                .map(|p| p.name().to_string_lossy().into_owned())
                .collect();
            let map_names: Vec<String> = open
                .maps()
                .map(|m| m.name().to_string_lossy().into_owned())
                .collect();
            let transports: &[Transport] = if spec.ringbuf {
                &[Transport::RingBuf, Transport::PerfBuf]
            } else {
                &[Transport::PerfBuf]
            };
            for &transport in transports {
                for direct in [false, true] {
                    let all = AttachPoints::from_fn(|func| Some(func.name().to_owned()));
                    let mut features = kernel("deb61");
                    features.attach_points = Probe::Yes(all.clone());
                    let plan = plan_hooks(mode, &features, Some(&all), transport, direct).unwrap();
                    for hook in plan.hooks {
                        assert!(
                            progs.contains(&hook.prog),
                            "{mode}: no program {}",
                            hook.prog
                        );
                    }
                    assert!(map_names.iter().any(|m| m == transport.map()), "{mode}");
                }
            }
            let used = [
                maps::CONFIG,
                maps::PENDING,
                maps::PIDS,
                maps::DPORTS,
                maps::COUNTERS,
            ];
            for name in used {
                assert!(map_names.iter().any(|m| m == name), "{mode}: no map {name}");
            }
        }
    }

    #[test]
    fn every_mode_plans_its_programs_on_the_kernels_hooks() {
        let deb61 = kernel("deb61");
        let btf = AttachPoints::from_fn(|func| Some(func.name().to_owned()));
        let fentry = plan_hooks(Mode::Fentry, &deb61, Some(&btf), Transport::RingBuf, true);
        assert_eq!(
            progs(&fentry.unwrap()),
            [
                ("fentry_v4_connect", Some("tcp_v4_connect")),
                ("fexit_v4_connect", Some("tcp_v4_connect")),
                ("fentry_v6_connect", Some("tcp_v6_connect")),
                ("fexit_v6_connect", Some("tcp_v6_connect")),
                ("fentry_rcv_state", Some("tcp_rcv_state_process")),
                ("tp_state_direct_rb", None),
                ("tp_retransmit", None),
                ("tp_reset", None),
            ]
        );
        // 5.4: its record is read at its offsets, through the perf buffer.
        let old54 = kernel("old54");
        let tracepoint = plan_hooks(Mode::Tracepoint, &old54, None, Transport::PerfBuf, false);
        let tracepoint = tracepoint.unwrap();
        assert_eq!(
            progs(&tracepoint),
            [
                ("tp_state_pb", None),
                ("tp_retransmit", None),
                ("tp_reset", None)
            ]
        );
        assert!(tracepoint.notes.is_empty(), "{:?}", tracepoint.notes);
        // 4.14: kprobes only, at the symbols kallsyms gives, one program for both families.
        let legacy = plan_hooks(
            Mode::Legacy,
            &kernel("old414"),
            None,
            Transport::PerfBuf,
            false,
        );
        let legacy = legacy.unwrap();
        assert_eq!(legacy.hooks.len(), 8);
        assert_eq!(
            legacy.hooks[1],
            PlannedHook {
                prog: "legacy_connect".into(),
                attach: Attach::Kprobe(Func::TcpV6Connect),
                symbol: Some("tcp_v6_connect".into()),
            }
        );
    }

    #[test]
    fn a_hook_the_mode_can_do_without_is_a_note_and_one_it_needs_an_error() {
        let mut old414 = kernel("old414");
        let without = |missing: &'static [Func]| {
            let all = AttachPoints::from_fn(|func| Some(func.name().to_owned()));
            AttachPoints::from_fn(|func| {
                (!missing.contains(&func)).then(|| all.get(func).unwrap().to_owned())
            })
        };
        old414.attach_points = Probe::Yes(without(&[Func::TcpV6Connect, Func::TcpReset]));
        let plan = plan_hooks(Mode::Legacy, &old414, None, Transport::PerfBuf, false).unwrap();
        assert_eq!(plan.hooks.len(), 5);
        assert_eq!(
            plan.notes,
            [
                "IPv6 connects are not traced: kernel function tcp_v6_connect is not in /proc/kallsyms",
                "RSTs are only seen through sk_err: kernel function tcp_reset is not in /proc/kallsyms",
            ]
        );
        old414.attach_points = Probe::Yes(without(&[Func::TcpSetState]));
        assert_eq!(
            plan_hooks(Mode::Legacy, &old414, None, Transport::PerfBuf, false).unwrap_err(),
            "kernel function tcp_set_state is not in /proc/kallsyms"
        );
        // No state tracepoint (4.14): the tracepoint mode cannot be planned, and says why.
        let why = plan_hooks(
            Mode::Tracepoint,
            &kernel("old414"),
            None,
            Transport::PerfBuf,
            false,
        )
        .unwrap_err();
        assert!(why.contains("inet_sock_set_state"), "{why}");
    }

    /// The record layout of every kernel we captured from 5.6 on (a 16-bit protocol) is
    /// the one the probes read directly; older ones, and any other layout, are read at
    /// their offsets.
    #[test]
    fn known_records_are_read_directly_and_others_at_their_offsets() {
        use tcpconnlat_compat::KernelVersion;
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/compat/tests/fixtures");
        let mut seen = 0;
        for kernel in std::fs::read_dir(fixtures).unwrap() {
            let root = kernel.unwrap().path();
            let format = root.join("sys/kernel/tracing/events/sock/inet_sock_set_state/format");
            let Ok(text) = std::fs::read_to_string(&format) else {
                continue;
            };
            let release = std::fs::read_to_string(root.join("proc/sys/kernel/osrelease")).unwrap();
            let modern = KernelVersion::parse(&release).unwrap() >= KernelVersion(5, 6, 0);
            let layout = StateLayout::from_format(&text).unwrap();
            assert_eq!(is_state_record(&layout), modern, "{}", format.display());
            seen += 1;
            if !modern {
                continue;
            }

            let mut older = layout.clone();
            older.protocol = None;
            assert!(!is_state_record(&older));
            let mut moved = layout;
            moved.daddr_v6 += 8;
            assert!(!is_state_record(&moved));
        }
        assert!(seen >= 6, "{seen} fixtures");
    }
}
