//! Each mode's hook table planned on fixture kernels: which program goes where, and what a
//! missing hook costs.

use tcpconnlat_compat::fixtures::features as kernel;
use tcpconnlat_compat::{
    plan_hooks, AttachPoints, Finding, Findings, Func, HookChoice, HookPlan, Mode, RecordRead,
    Transport, Unsupported,
};

fn progs(plan: &HookPlan) -> Vec<(&str, Option<&str>)> {
    plan.hooks
        .iter()
        .map(|h| (h.prog.as_str(), h.symbol.as_deref()))
        .collect()
}

fn choice(mode: Mode, transport: Transport, read: RecordRead) -> HookChoice {
    HookChoice {
        mode,
        transport,
        read,
    }
}

/// Every function there, under its own name.
fn all_functions() -> AttachPoints {
    AttachPoints::from_fn(|func| Some(func.name().to_owned()))
}

fn without(missing: &'static [Func]) -> AttachPoints {
    let all = all_functions();
    AttachPoints::from_fn(|func| {
        (!missing.contains(&func)).then(|| all.get(func).unwrap().to_owned())
    })
}

#[test]
fn every_mode_plans_its_programs_on_the_kernels_hooks() {
    let fentry_allowed = Findings {
        fentry: Finding::Yes(()),
        fentry_targets: Finding::Yes(all_functions()),
        ..Findings::default()
    };
    let fentry = plan_hooks(
        choice(Mode::Fentry, Transport::RingBuf, RecordRead::Direct),
        &kernel("deb61"),
        &fentry_allowed,
    );
    assert_eq!(
        progs(&fentry.unwrap()),
        [
            ("fentry_v4_connect", Some("tcp_v4_connect")),
            ("fentry_v6_connect", Some("tcp_v6_connect")),
            // The raw tracepoint reads no record: one program whatever its layout.
            ("btf_state_rb", None),
            ("tp_retransmit", None),
            ("tp_reset", None),
        ]
    );
    // 5.4: its record is read at its offsets, through the perf buffer.
    let tracepoint = plan_hooks(
        choice(Mode::Tracepoint, Transport::PerfBuf, RecordRead::AtOffsets),
        &kernel("old54"),
        &Findings::default(),
    )
    .unwrap();
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
        choice(Mode::Legacy, Transport::PerfBuf, RecordRead::AtOffsets),
        &kernel("old414"),
        &Findings::default(),
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
    let legacy = choice(Mode::Legacy, Transport::PerfBuf, RecordRead::AtOffsets);
    let mut old414 = kernel("old414");
    old414.attach_points = Finding::Yes(without(&[Func::TcpV6Connect, Func::TcpReset]));
    let plan = plan_hooks(legacy, &old414, &Findings::default()).unwrap();
    assert_eq!(plan.hooks.len(), 3);
    assert_eq!(
        plan.notes,
        ["RSTs are only seen through sk_err: kernel function tcp_reset is not in /proc/kallsyms"]
    );
    // The CO-RE kprobe mode does without tcp_v6_connect, and says what that costs.
    let mut noftrace = kernel("noftrace");
    noftrace.attach_points = Finding::Yes(without(&[Func::TcpV6Connect]));
    let kprobe = choice(Mode::Kprobe, Transport::RingBuf, RecordRead::Direct);
    let plan = plan_hooks(kprobe, &noftrace, &Findings::default()).unwrap();
    assert_eq!(
        plan.notes,
        ["IPv6 connects are not traced: kernel function tcp_v6_connect is not in /proc/kallsyms"]
    );
    old414.attach_points = Finding::Yes(without(&[Func::TcpSetState]));
    assert_eq!(
        plan_hooks(legacy, &old414, &Findings::default()).unwrap_err(),
        Unsupported::MissingSymbol("tcp_set_state")
    );
    // No state tracepoint (4.14): the tracepoint mode cannot be planned, and says why.
    let why = plan_hooks(
        choice(Mode::Tracepoint, Transport::PerfBuf, RecordRead::AtOffsets),
        &kernel("old414"),
        &Findings::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(why.contains("inet_sock_set_state"), "{why}");
}

/// What `Mode::check` calls runnable, the hooks can be planned for: the two read one table.
#[test]
fn a_mode_that_passes_its_check_plans_every_required_hook() {
    let kernels = std::fs::read_dir(tcpconnlat_compat::fixtures::root("")).unwrap();
    let names: Vec<String> = kernels
        .map(|k| k.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "btf")
        .collect();
    assert!(names.len() >= 7, "{names:?}");
    for name in &names {
        let features = kernel(name);
        let findings = Findings {
            fentry: Finding::Yes(()),
            fentry_targets: Finding::Yes(all_functions()),
            sock_offsets: Finding::Yes("fixture".to_owned()),
            ..Findings::default()
        };
        for mode in Mode::ALL {
            let checked = mode.check(&features, &findings);
            for &transport in mode.spec().transports() {
                let planned = plan_hooks(
                    choice(mode, transport, RecordRead::AtOffsets),
                    &features,
                    &findings,
                );
                if checked.is_ok() {
                    let plan = planned.unwrap_or_else(|e| panic!("{name} {mode}: {e}"));
                    let required = mode.spec().hooks.iter().filter(|h| h.if_missing.is_none());
                    for hook in required {
                        assert!(
                            plan.hooks.iter().any(|p| p.attach == hook.attach),
                            "{name} {mode}: {:?} not planned",
                            hook.attach
                        );
                    }
                }
            }
        }
    }
}
