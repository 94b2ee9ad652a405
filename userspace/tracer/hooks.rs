//! Which program goes on which kernel hook, per mode: the hook tables (data, one per mode)
//! and `plan_hooks`, a pure function of them and what the kernel offers.

use tcpconnlat_compat::{AttachPoints, Features, Finding, Func, Mode, StateLayout};

use super::objects::{self, is_state_record};
use super::transport::Transport;

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
    /// fentry, by BTF name as the program's section says.
    Fentry(Func),
    /// By the symbol kallsyms gave for the function.
    Kprobe(Func),
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

pub(super) struct ModeSpec {
    pub object: &'static [u8],
    /// The object has CO-RE relocations (against the kernel's BTF).
    pub core: bool,
    hooks: &'static [Hook],
    /// The object has a ring buffer variant (legacy mode does without).
    pub ringbuf: bool,
}

mod tables {
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
        optional("fentry_v6_connect", Fentry(TcpV6Connect), NO_IPV6),
    ];
    pub const KPROBE: &[Hook] = with_tracepoints![
        hook("kprobe_v4_connect", Kprobe(TcpV4Connect)),
        optional("kprobe_v6_connect", Kprobe(TcpV6Connect), NO_IPV6),
    ];
    pub const TRACEPOINT: &[Hook] = with_tracepoints![];
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

pub(super) fn spec(mode: Mode) -> ModeSpec {
    let (object, core, hooks, ringbuf) = match mode {
        Mode::Fentry => (objects::CORE_OBJECT, true, tables::FENTRY, true),
        Mode::Kprobe => (objects::CORE_OBJECT, true, tables::KPROBE, true),
        Mode::Tracepoint => (objects::TRACEPOINT_OBJECT, false, tables::TRACEPOINT, true),
        Mode::Legacy => (objects::LEGACY_OBJECT, false, tables::LEGACY, false),
    };
    ModeSpec {
        object,
        core,
        hooks,
        ringbuf,
    }
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

/// How the programs read the sock:inet_sock_set_state record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordRead {
    /// It is laid out as `struct state_record`: read directly, by programs of their own.
    Direct,
    /// At the offsets its format file gives, through bpf_probe_read.
    AtOffsets,
}

impl RecordRead {
    /// Direct where the kernel's record is `struct state_record` and `preferred` allows
    /// it (the hidden `--record-offsets` prefers the path other kernels take, for tests).
    pub fn choose(layout: Option<&StateLayout>, preferred: RecordRead) -> RecordRead {
        if preferred == RecordRead::Direct && layout.is_some_and(is_state_record) {
            RecordRead::Direct
        } else {
            RecordRead::AtOffsets
        }
    }
}

/// Which program of `mode` goes on which hook of this kernel (pure: from what was
/// detected). The emitting program is the one for `transport`, reading the state record
/// directly where `read` says. A hook the kernel lacks is left out with a note where the mode
/// can do without it, and is an error where it cannot.
pub fn plan_hooks(
    mode: Mode,
    features: &Features,
    fentry_targets: Option<&AttachPoints>,
    transport: Transport,
    read: RecordRead,
) -> Result<HookPlan, String> {
    let mut plan = HookPlan::default();
    for hook in spec(mode).hooks {
        let symbol = match target(hook.attach, features, fentry_targets) {
            Ok(symbol) => symbol,
            Err(missing) => match hook.if_missing {
                Some(lost) => {
                    plan.note(&format!("{lost}: {missing}"));
                    continue;
                }
                None => return Err(missing),
            },
        };
        let prog = match hook.attach {
            _ if !hook.emits => hook.prog.to_owned(),
            // A record laid out as `struct state_record` is read directly, by programs of
            // their own (`<hook>_direct_<suffix>`).
            Attach::Tracepoint(Tracepoint::State) if read == RecordRead::Direct => {
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
        Attach::Kprobe(_) => match &features.attach_points {
            Finding::Yes(points) => (points, "/proc/kallsyms"),
            Finding::No(why) | Finding::Unknown(why) => return Err(why.clone()),
        },
    };
    let (Attach::Fentry(func) | Attach::Kprobe(func)) = attach else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracer::objects::maps;
    use libbpf_rs::ObjectBuilder;

    use tcpconnlat_compat::fixtures::features as kernel;

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
                for read in [RecordRead::AtOffsets, RecordRead::Direct] {
                    let all = AttachPoints::from_fn(|func| Some(func.name().to_owned()));
                    let mut features = kernel("deb61");
                    features.attach_points = Finding::Yes(all.clone());
                    let plan = plan_hooks(mode, &features, Some(&all), transport, read).unwrap();
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
        let fentry = plan_hooks(
            Mode::Fentry,
            &deb61,
            Some(&btf),
            Transport::RingBuf,
            RecordRead::Direct,
        );
        assert_eq!(
            progs(&fentry.unwrap()),
            [
                ("fentry_v4_connect", Some("tcp_v4_connect")),
                ("fentry_v6_connect", Some("tcp_v6_connect")),
                ("tp_state_direct_rb", None),
                ("tp_retransmit", None),
                ("tp_reset", None),
            ]
        );
        // 5.4: its record is read at its offsets, through the perf buffer.
        let old54 = kernel("old54");
        let tracepoint = plan_hooks(
            Mode::Tracepoint,
            &old54,
            None,
            Transport::PerfBuf,
            RecordRead::AtOffsets,
        );
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
        // 4.14: kprobes only, at the symbols kallsyms gives; tcp_set_state serves both
        // families, start and end.
        let legacy = plan_hooks(
            Mode::Legacy,
            &kernel("old414"),
            None,
            Transport::PerfBuf,
            RecordRead::AtOffsets,
        );
        assert_eq!(
            progs(&legacy.unwrap()),
            [
                ("legacy_set_state", Some("tcp_set_state")),
                ("legacy_rcv_state", Some("tcp_rcv_state_process")),
                ("legacy_retransmit", Some("tcp_retransmit_skb")),
                ("legacy_reset", Some("tcp_reset")),
            ]
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
        old414.attach_points = Finding::Yes(without(&[Func::TcpV6Connect, Func::TcpReset]));
        let plan = plan_hooks(
            Mode::Legacy,
            &old414,
            None,
            Transport::PerfBuf,
            RecordRead::AtOffsets,
        )
        .unwrap();
        assert_eq!(plan.hooks.len(), 3);
        assert_eq!(
            plan.notes,
            ["RSTs are only seen through sk_err: kernel function tcp_reset is not in /proc/kallsyms"]
        );
        // The CO-RE kprobe mode does without tcp_v6_connect, and says what that costs.
        let mut noftrace = kernel("noftrace");
        noftrace.attach_points = Finding::Yes(without(&[Func::TcpV6Connect]));
        let plan = plan_hooks(
            Mode::Kprobe,
            &noftrace,
            None,
            Transport::RingBuf,
            RecordRead::Direct,
        )
        .unwrap();
        assert_eq!(
            plan.notes,
            ["IPv6 connects are not traced: kernel function tcp_v6_connect is not in /proc/kallsyms"]
        );
        old414.attach_points = Finding::Yes(without(&[Func::TcpSetState]));
        assert_eq!(
            plan_hooks(
                Mode::Legacy,
                &old414,
                None,
                Transport::PerfBuf,
                RecordRead::AtOffsets
            )
            .unwrap_err(),
            "kernel function tcp_set_state is not in /proc/kallsyms"
        );
        // No state tracepoint (4.14): the tracepoint mode cannot be planned, and says why.
        let why = plan_hooks(
            Mode::Tracepoint,
            &kernel("old414"),
            None,
            Transport::PerfBuf,
            RecordRead::AtOffsets,
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
        let fixtures = tcpconnlat_compat::fixtures::root("");
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
