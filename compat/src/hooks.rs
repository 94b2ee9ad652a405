//! Each mode's facts, in one place: its probe object, which of its programs goes on which
//! kernel hook, and what the mode cannot do without. [`Mode::check`](crate::Mode::check)
//! (can the mode run here?) and [`plan_hooks`] (what goes where) both read these tables,
//! and build.rs refuses to build when a program named here is not in the mode's object.

use crate::features::{Features, Finding, Findings};
use crate::kallsyms::Func;
use crate::plan::{Mode, Unsupported};

/// The probe objects build.rs compiles from `probes/<stem>.bpf.c`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeObject {
    /// fentry and kprobe programs (CO-RE) with the state raw tracepoint and the others.
    Core,
    /// Tracepoint mode: no CO-RE relocation, loads without BTF.
    Tracepoint,
    /// Legacy mode: kprobes, no CO-RE, no global data, perf buffer.
    Legacy,
    /// Offset discovery: one kprobe that copies struct sock for our own connects.
    Discover,
    /// Only its BTF: the structs shared with userspace, generated as Rust.
    Types,
    /// Empty programs on our hooks: the benchmark's floor.
    Empty,
}

impl ProbeObject {
    pub const ALL: [ProbeObject; 6] = [
        ProbeObject::Core,
        ProbeObject::Tracepoint,
        ProbeObject::Legacy,
        ProbeObject::Discover,
        ProbeObject::Types,
        ProbeObject::Empty,
    ];

    /// The source is `probes/<stem>.bpf.c`, the object `<stem>.bpf.o`.
    pub fn stem(self) -> &'static str {
        match self {
            ProbeObject::Core => "tcpconnlat",
            ProbeObject::Tracepoint => "tcpconnlat_tp",
            ProbeObject::Legacy => "tcpconnlat_legacy",
            ProbeObject::Discover => "discover",
            ProbeObject::Types => "types",
            ProbeObject::Empty => "empty",
        }
    }

    /// Loaded on Linux 4.4, whose verifier knows only the BPF v1 instruction set (32-bit
    /// jumps are 5.1's, jump-if-less 4.14's) and which has no BTF: such an object is built
    /// for v1 and x86-64's struct pt_regs.
    pub fn loads_on_4_4(self) -> bool {
        matches!(self, ProbeObject::Legacy | ProbeObject::Discover)
    }
}

/// The tracepoints the probes attach to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracepoint {
    /// `sock:inet_sock_set_state`: starts and finishes every connect.
    State,
    /// `tcp:tcp_retransmit_skb`: SYN retransmit counts.
    Retransmit,
    /// `tcp:tcp_receive_reset`: RSTs, so refusals are known without sk_err.
    Reset,
}

/// Where a program goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// fentry, by BTF name as the program's section says.
    Fentry(Func),
    /// By the symbol kallsyms gave for the function.
    Kprobe(Func),
    /// As the program's section says.
    Tracepoint(Tracepoint),
    /// The same tracepoint as a raw tracepoint (Linux 4.17, commit c4f6699dfcb8 "bpf:
    /// introduce BPF_RAW_TRACEPOINT"), as the program's section says: called with the
    /// tracepoint's arguments, no record built for it.
    RawTracepoint(Tracepoint),
    /// A raw tracepoint whose arguments the verifier knows by BTF (Linux 5.5, commit
    /// 9e15db66136a "bpf: Implement accurate raw_tp context access via BTF"): a tracing
    /// program, as fentry's are, that loads the socket's fields directly. Attached by the
    /// BTF id of the tracepoint's `btf_trace_` typedef.
    BtfTracepoint(Tracepoint),
}

/// One program of a mode on one hook.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    pub prog: &'static str,
    pub attach: Attach,
    /// Built once per transport and record read (see [`Hook::program`]).
    pub emits: bool,
    /// What is lost when the kernel lacks this hook; `None`: the mode cannot do without.
    pub if_missing: Option<&'static str>,
}

impl Hook {
    /// The program's name in the object: an emitting program has one per transport
    /// (`<prog>_<suffix>`), and the state tracepoint's another per transport for a record
    /// read directly (`<prog>_direct_<suffix>`).
    pub fn program(&self, transport: Transport, read: RecordRead) -> String {
        match self.attach {
            _ if !self.emits => self.prog.to_owned(),
            Attach::Tracepoint(Tracepoint::State) if read == RecordRead::Direct => {
                format!("{}_direct_{}", self.prog, transport.suffix())
            }
            _ => format!("{}_{}", self.prog, transport.suffix()),
        }
    }
}

/// How much a mode needs struct sock's offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetNeed {
    /// It reads the socket at them (legacy): find them if they are not known.
    Required,
    /// It reads sk_err at them where known (tracepoint), and does without otherwise.
    IfKnown,
}

/// Everything a mode is made of.
#[derive(Clone, Copy, Debug)]
pub struct ModeSpec {
    pub object: ProbeObject,
    /// The object has CO-RE relocations (against the kernel's BTF).
    pub core: bool,
    pub hooks: &'static [Hook],
    /// The object has a ring buffer variant (legacy mode does without).
    pub ringbuf: bool,
    pub offsets: OffsetNeed,
    /// The object gives events the connecting process's cgroup, through the helper
    /// bpf_get_current_cgroup_id (Linux 4.18, commit bf6fa2c893c5 "bpf: implement
    /// bpf_get_current_cgroup_id() helper"), which legacy mode does without.
    pub cgroup_helper: bool,
}

impl Mode {
    pub fn spec(self) -> ModeSpec {
        let (object, hooks) = match self {
            Mode::Fentry => (ProbeObject::Core, tables::FENTRY),
            Mode::Kprobe => (ProbeObject::Core, tables::KPROBE),
            Mode::Tracepoint => (ProbeObject::Tracepoint, tables::TRACEPOINT),
            Mode::Legacy => (ProbeObject::Legacy, tables::LEGACY),
        };
        ModeSpec {
            object,
            core: object == ProbeObject::Core,
            hooks,
            ringbuf: self != Mode::Legacy,
            offsets: match self {
                Mode::Legacy => OffsetNeed::Required,
                Mode::Fentry | Mode::Kprobe | Mode::Tracepoint => OffsetNeed::IfKnown,
            },
            cgroup_helper: self != Mode::Legacy,
        }
    }

    /// Every program name the mode may load: its hooks' in each transport and record
    /// read, and the sweeper's question (build.rs holds them to the object).
    pub fn program_names(self) -> Vec<String> {
        let spec = self.spec();
        let mut names = Vec::new();
        for &transport in spec.transports() {
            for read in [RecordRead::Direct, RecordRead::AtOffsets] {
                names.extend(spec.hooks.iter().map(|h| h.program(transport, read)));
            }
            names.push(transport.confirm_program().to_owned());
        }
        names.sort();
        names.dedup();
        names
    }
}

impl ModeSpec {
    /// Whether a hook of the mode is an fentry program: what the fentry trial tells.
    pub fn uses_fentry(&self) -> bool {
        self.hooks
            .iter()
            .any(|h| matches!(h.attach, Attach::Fentry(_)))
    }

    /// Whether a hook of the mode is a kprobe: its symbol must be found.
    pub fn uses_kprobes(&self) -> bool {
        self.kprobe_funcs().next().is_some()
    }

    /// The functions the mode's kprobes hook.
    pub fn kprobe_funcs(&self) -> impl Iterator<Item = Func> {
        self.hooks.iter().filter_map(|h| match h.attach {
            Attach::Kprobe(func) => Some(func),
            _ => None,
        })
    }

    /// The transports the object has programs for.
    pub fn transports(&self) -> &'static [Transport] {
        if self.ringbuf {
            &[Transport::RingBuf, Transport::PerfBuf]
        } else {
            &[Transport::PerfBuf]
        }
    }
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

/// What is lost without IPv6's connect function (also where discovery finds no IPv6).
pub const NO_IPV6: &str = "IPv6 connects are not traced";

mod tables {
    use super::{hook, optional, Attach::*, Hook, Tracepoint::*, NO_IPV6};
    use crate::kallsyms::Func::*;

    const NO_RETRANSMITS: &str = "SYN retransmits are not counted";
    const NO_RESETS: &str = "RSTs are only seen through sk_err";

    /// The tracepoints every mode but legacy finishes connects with: the state machine on
    /// `$state` (the tracepoint, or the raw one where the object reads the socket by BTF).
    macro_rules! with_tracepoints {
        ($state:expr; $($hook:expr),* $(,)?) => {
            &[
                $($hook,)*
                Hook { emits: true, ..$state },
                optional("tp_retransmit", Tracepoint(Retransmit), NO_RETRANSMITS),
                optional("tp_reset", Tracepoint(Reset), NO_RESETS),
            ]
        };
    }

    /// The CO-RE object's state machine: the raw tracepoint costs each of the state changes
    /// a connect and its accept go through (most of them none of ours) less than the
    /// tracepoint, which copies the socket's addresses into a record for every one. Where
    /// tracing programs load (fentry mode), BTF-typed: the socket's fields are loads, not
    /// helper calls.
    const RAW_STATE: Hook = hook("raw_state", RawTracepoint(State));
    const BTF_STATE: Hook = hook("btf_state", BtfTracepoint(State));

    pub const FENTRY: &[Hook] = with_tracepoints![
        BTF_STATE;
        hook("fentry_v4_connect", Fentry(TcpV4Connect)),
        optional("fentry_v6_connect", Fentry(TcpV6Connect), NO_IPV6),
    ];
    pub const KPROBE: &[Hook] = with_tracepoints![
        RAW_STATE;
        hook("kprobe_v4_connect", Kprobe(TcpV4Connect)),
        optional("kprobe_v6_connect", Kprobe(TcpV6Connect), NO_IPV6),
    ];
    pub const TRACEPOINT: &[Hook] = with_tracepoints![hook("tp_state", Tracepoint(State));];
    /// No tracepoints: everything by kprobe; tcp_set_state starts and ends every connect.
    pub const LEGACY: &[Hook] = &[
        hook("legacy_set_state", Kprobe(TcpSetState)),
        hook("legacy_rcv_state", Kprobe(TcpRcvStateProcess)),
        optional(
            "legacy_retransmit",
            Kprobe(TcpRetransmitSkb),
            NO_RETRANSMITS,
        ),
        optional("legacy_reset", Kprobe(TcpReset), NO_RESETS),
    ];
}

/// How events reach userspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// BPF ring buffer (Linux 5.8+, commit 457f44363a88 "bpf: Implement BPF ring buffer
    /// and verifier support for it"): one buffer for all CPUs, batched wakeups.
    RingBuf,
    /// Perf event array: every kernel.
    PerfBuf,
}

impl Transport {
    /// The map the probes write to; the other transport's map is never created.
    pub fn map(self) -> &'static str {
        match self {
            Transport::RingBuf => "events_rb",
            Transport::PerfBuf => "events_pb",
        }
    }

    /// Emitting programs exist once per transport, named `<hook>_<suffix>`.
    pub fn suffix(self) -> &'static str {
        match self {
            Transport::RingBuf => "rb",
            Transport::PerfBuf => "pb",
        }
    }

    /// The sweeper's question about a pending connect, which reports what it finds
    /// through this transport (probes/common.bpf.h `CONFIRM_PROGRAM`).
    pub fn confirm_program(self) -> &'static str {
        match self {
            Transport::RingBuf => "confirm_rb",
            Transport::PerfBuf => "confirm_pb",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Transport::RingBuf => "ring buffer",
            Transport::PerfBuf => "perf buffer",
        }
    }
}

/// How the programs read the sock:inet_sock_set_state record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordRead {
    /// It is laid out as the probes' `struct state_record`: read directly, by programs of
    /// their own.
    Direct,
    /// At the offsets its format file gives, through bpf_probe_read.
    AtOffsets,
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

impl HookPlan {
    /// Tell the user `text`, once.
    pub fn note(&mut self, text: &str) {
        if !self.notes.iter().any(|n| n == text) {
            self.notes.push(text.to_owned());
        }
    }
}

/// How the programs of one mode go on this kernel.
#[derive(Clone, Copy, Debug)]
pub struct HookChoice {
    pub mode: Mode,
    pub transport: Transport,
    pub read: RecordRead,
}

/// Which program of the mode goes on which hook of this kernel (pure: from what was
/// detected). A hook the kernel lacks is left out with a note where the mode can do
/// without it, and is the error where it cannot.
pub fn plan_hooks(
    choice: HookChoice,
    features: &Features,
    findings: &Findings,
) -> Result<HookPlan, Unsupported> {
    let mut plan = HookPlan::default();
    for hook in choice.mode.spec().hooks {
        let symbol = match target(hook.attach, features, findings) {
            Ok(symbol) => symbol,
            Err(missing) => match hook.if_missing {
                Some(lost) => {
                    plan.note(&format!("{lost}: {missing}"));
                    continue;
                }
                None => return Err(missing),
            },
        };
        plan.hooks.push(PlannedHook {
            prog: hook.program(choice.transport, choice.read),
            attach: hook.attach,
            symbol,
        });
    }
    Ok(plan)
}

/// Whether the kernel has every hook `mode` cannot do without (the hooks alone; the
/// mode's other needs are `Mode::check`'s).
pub(crate) fn required_hooks(
    mode: Mode,
    features: &Features,
    findings: &Findings,
) -> Result<(), Unsupported> {
    mode.spec()
        .hooks
        .iter()
        .filter(|h| h.if_missing.is_none())
        .try_for_each(|h| target(h.attach, features, findings).map(drop))
}

/// Where `attach` goes on this kernel: the symbol for kprobes and fentry (`None` for
/// tracepoints, which the program's section names), or why it cannot go there.
fn target(
    attach: Attach,
    features: &Features,
    findings: &Findings,
) -> Result<Option<String>, Unsupported> {
    match attach {
        // The raw tracepoint is the tracepoint: found where its format file is.
        Attach::Tracepoint(tracepoint) | Attach::RawTracepoint(tracepoint) => {
            let found = match tracepoint {
                Tracepoint::State => features.state_tracepoint.as_ref().map(drop),
                Tracepoint::Retransmit => features.retransmit_tracepoint.as_ref().map(drop),
                Tracepoint::Reset => features.reset_tracepoint.as_ref().map(drop),
            };
            found
                .map(|()| None)
                .map_err(|why| Unsupported::NoTracepoint(why.clone()))
        }
        Attach::BtfTracepoint(tracepoint) => {
            tracing_allowed(findings)?;
            target(Attach::Tracepoint(tracepoint), features, findings)
        }
        Attach::Fentry(func) => {
            tracing_allowed(findings)?;
            let targets = match &findings.fentry_targets {
                Finding::Unknown(_) => {
                    return Err(Unsupported::NotTried("reading the kernel's BTF"))
                }
                Finding::No(why) => return Err(Unsupported::NoBtfFunctions(why.clone())),
                Finding::Yes(targets) => targets,
            };
            match targets.get(func) {
                Some(symbol) => Ok(Some(symbol.to_owned())),
                None => Err(Unsupported::MissingFunction(func.name())),
            }
        }
        Attach::Kprobe(func) => {
            if !features.kprobes() {
                return Err(Unsupported::NoKprobes);
            }
            let points = match &features.attach_points {
                Finding::Unknown(_) => return Err(Unsupported::SymbolsNotRead),
                Finding::No(why) => return Err(Unsupported::NoKallsyms(why.clone())),
                Finding::Yes(points) => points,
            };
            match points.get(func) {
                Some(symbol) => Ok(Some(symbol.to_owned())),
                None => Err(Unsupported::MissingSymbol(func.name())),
            }
        }
    }
}

/// Whether tracing programs (fentry's, the BTF-typed raw tracepoint's) load here: what
/// the fentry trial tells.
fn tracing_allowed(findings: &Findings) -> Result<(), Unsupported> {
    match &findings.fentry {
        Finding::Unknown(_) => Err(Unsupported::NotTried("an fentry trial load")),
        Finding::No(why) => Err(Unsupported::FentryRefused(why.clone())),
        Finding::Yes(()) => Ok(()),
    }
}
