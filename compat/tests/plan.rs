//! Detection and planning against fixture trees captured from real kernels
//! (ci/capture-fixture.sh), and variants of them with one thing changed.

use std::fs;
use std::path::Path;

use tcpconnlat_compat::{AttachPoints, Features, Finding, Findings, Func, Mode, Plan, Unsupported};

use tcpconnlat_compat::fixtures::{detect, root as fixture};

/// A writable copy of a fixture, for variants.
fn copy_of(name: &str) -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let dest = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &dest);
            } else {
                fs::copy(entry.path(), dest).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(&fixture(name), dir.path());
    dir
}

/// The kernel's BTF describing every hooked function but `missing`.
fn btf_functions(missing: &[Func]) -> AttachPoints {
    AttachPoints::from_fn(|func| (!missing.contains(&func)).then(|| func.name().to_owned()))
}

const FORMAT: &str = "sys/kernel/tracing/events/sock/inet_sock_set_state/format";

fn findings(fentry: Result<(), &str>) -> Findings {
    Findings {
        fentry: Finding::from_result(fentry.map_err(str::to_owned)),
        ringbuf: Finding::Yes(()),
        on_demand: Finding::Yes(()),
        sock_offsets: Finding::Yes("BTF /sys/kernel/btf/vmlinux".to_owned()),
        fentry_targets: Finding::Yes(btf_functions(&[])),
    }
}

/// fentry allowed, and the kernel's BTF without `missing`.
fn btf_without(missing: &[Func]) -> Findings {
    Findings {
        fentry_targets: Finding::Yes(btf_functions(missing)),
        ..findings(Ok(()))
    }
}

fn verdicts(plan: &Plan) -> Vec<(Mode, Result<(), Unsupported>)> {
    plan.steps
        .iter()
        .map(|s| (s.mode, s.verdict.clone()))
        .collect()
}

#[test]
fn host_6_18_without_kprobes_or_fentry_plans_tracepoint() {
    let f = detect(&fixture("host-6.18"));
    assert_eq!(f.release.as_deref(), Some("6.18.44-fc-v669"));
    assert!(f.btf && !f.kprobe_pmu && !f.kprobe_events);
    assert_eq!(f.global_data(), Some(true));
    let layout = f.state_tracepoint.clone().unwrap();
    assert_eq!(
        (layout.skaddr, layout.oldstate, layout.newstate),
        (8, 16, 20)
    );
    assert_eq!(
        (layout.protocol, layout.saddr_v6, layout.daddr_v6),
        (Some(30), 40, 56)
    );
    let points = f.attach_points.yes().unwrap().clone();
    for func in Func::ALL {
        assert_eq!(points.get(func), Some(func.name()));
    }

    let plan = Plan::new(
        &f,
        &findings(Err("Operation not permitted (os error 1)")),
        None,
    );
    assert_eq!(
        verdicts(&plan),
        [
            (
                Mode::Fentry,
                Err(Unsupported::FentryRefused(
                    "Operation not permitted (os error 1)".into()
                ))
            ),
            (Mode::Kprobe, Err(Unsupported::NoKprobes)),
            (Mode::Tracepoint, Ok(())),
            (Mode::Legacy, Err(Unsupported::NoKprobes)),
        ]
    );
    assert_eq!(plan.first(), Some(Mode::Tracepoint));

    // Were fentry allowed, it would come first.
    assert_eq!(
        Plan::new(&f, &findings(Ok(())), None).first(),
        Some(Mode::Fentry)
    );
    // Without privileges the fentry trial is unknown, and said so.
    let unknown = Plan::new(&f, &Findings::default(), Some(Mode::Fentry));
    assert!(matches!(
        unknown.steps[0].verdict,
        Err(Unsupported::NotTried(_))
    ));
}

#[test]
fn kprobe_pmu_or_kprobe_events_enable_kprobe_mode() {
    for path in [
        "sys/bus/event_source/devices/kprobe/type",
        "sys/kernel/tracing/kprobe_events",
    ] {
        let dir = copy_of("host-6.18");
        let file = dir.path().join(path);
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(&file, "6\n").unwrap();
        let f = detect(dir.path());
        let plan = Plan::new(&f, &findings(Err("EPERM")), None);
        assert_eq!(plan.first(), Some(Mode::Kprobe), "{path}");
    }
}

#[test]
fn without_btf_no_co_re_mode_is_planned() {
    let dir = copy_of("host-6.18");
    fs::remove_file(dir.path().join("sys/kernel/btf/vmlinux")).unwrap();
    fs::create_dir_all(dir.path().join("sys/bus/event_source/devices/kprobe")).unwrap();
    fs::write(
        dir.path().join("sys/bus/event_source/devices/kprobe/type"),
        "6\n",
    )
    .unwrap();
    let f = detect(dir.path());
    assert!(!f.btf);
    let plan = Plan::new(&f, &findings(Ok(())), None);
    assert_eq!(plan.steps[0].verdict, Err(Unsupported::NoBtf));
    assert_eq!(plan.steps[1].verdict, Err(Unsupported::NoBtf));
    assert_eq!(plan.first(), Some(Mode::Tracepoint));
}

#[test]
fn renamed_symbols_are_found_and_missing_ipv6_is_tolerated() {
    let dir = copy_of("host-6.18");
    fs::write(
        dir.path().join("proc/kallsyms"),
        "ffffffff82022bc0 t tcp_rcv_state_process.isra.0\n\
         ffffffff82022f00 t tcp_rcv_state_process.cold\n\
         ffffffff820311a0 t tcp_v4_connect.constprop.0\n",
    )
    .unwrap();
    let f = detect(dir.path());
    let points = f.attach_points.yes().unwrap().clone();
    assert_eq!(
        points.get(Func::TcpRcvStateProcess),
        Some("tcp_rcv_state_process.isra.0")
    );
    assert_eq!(
        points.get(Func::TcpV4Connect),
        Some("tcp_v4_connect.constprop.0")
    );
    assert_eq!(points.get(Func::TcpV6Connect), None);
    let plan = Plan::new(&f, &findings(Ok(())), None);
    assert_eq!(plan.first(), Some(Mode::Fentry));
}

#[test]
fn a_missing_connect_function_rejects_the_hooking_modes() {
    // kprobes need the symbol in kallsyms...
    let dir = copy_of("deb61");
    fs::write(
        dir.path().join("proc/kallsyms"),
        "ffffffff82022bc0 T tcp_rcv_state_process\n",
    )
    .unwrap();
    let f = detect(dir.path());
    let plan = Plan::new(&f, &findings(Err("EPERM")), None);
    assert_eq!(
        plan.steps[1].verdict,
        Err(Unsupported::MissingSymbol("tcp_v4_connect"))
    );
    assert_eq!(plan.first(), Some(Mode::Tracepoint));
    // ... and fentry the function in the kernel's BTF, whatever kallsyms says.
    let plan = Plan::new(
        &detect(&fixture("deb61")),
        &btf_without(&[Func::TcpV4Connect]),
        None,
    );
    assert_eq!(
        plan.steps[0].verdict,
        Err(Unsupported::MissingFunction("tcp_v4_connect"))
    );
    assert_eq!(plan.first(), Some(Mode::Kprobe));
    // IPv6 alone may be missing.
    assert_eq!(
        Plan::new(
            &detect(&fixture("deb61")),
            &btf_without(&[Func::TcpV6Connect]),
            None
        )
        .first(),
        Some(Mode::Fentry)
    );
}

#[test]
fn kernel_symbols_are_read_only_for_the_kprobe_modes() {
    // Not reading /proc/kallsyms is what auto does when fentry works: the kprobe modes
    // then say why they were not considered, and fentry and the tracepoint do not care.
    let f = Features::detect(&fixture("deb61"));
    assert!(f.attach_points.is_unknown());
    let plan = Plan::new(&f, &findings(Ok(())), None);
    assert_eq!(
        verdicts(&plan),
        [
            (Mode::Fentry, Ok(())),
            (Mode::Kprobe, Err(Unsupported::SymbolsNotRead)),
            (Mode::Tracepoint, Ok(())),
            (Mode::Legacy, Err(Unsupported::SymbolsNotRead)),
        ]
    );
}

#[test]
fn no_tracefs_means_no_tracepoint_and_says_how_to_fix_it() {
    let dir = copy_of("host-6.18");
    fs::remove_dir_all(dir.path().join("sys/kernel/tracing")).unwrap();
    let f = detect(dir.path());
    assert!(f.tracefs.is_none());
    let plan = Plan::new(&f, &findings(Ok(())), None);
    assert!(plan.first().is_none());
    let why = plan.steps[2].verdict.clone().unwrap_err().to_string();
    assert!(why.contains("tracefs is not mounted"), "{why}");
}

#[test]
fn tracefs_inside_debugfs_is_found() {
    let dir = copy_of("host-6.18");
    let debug = dir.path().join("sys/kernel/debug");
    fs::create_dir_all(&debug).unwrap();
    fs::rename(dir.path().join("sys/kernel/tracing"), debug.join("tracing")).unwrap();
    let f = detect(dir.path());
    assert_eq!(f.tracefs, Some(debug.join("tracing")));
    assert!(f.state_tracepoint.is_ok());
}

#[test]
fn a_record_without_protocol_still_works_and_a_wrong_size_does_not() {
    let dir = copy_of("host-6.18");
    let format = dir.path().join(FORMAT);
    let text = fs::read_to_string(&format).unwrap();
    // A TCP-only record, without the protocol field.
    let old: String = text
        .lines()
        .filter(|l| !l.contains(" protocol;"))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&format, &old).unwrap();
    let f = detect(dir.path());
    assert_eq!(f.state_tracepoint.clone().unwrap().protocol, None);

    fs::write(
        &format,
        text.replace(
            "int oldstate;\toffset:16;\tsize:4;",
            "int oldstate;\toffset:16;\tsize:8;",
        ),
    )
    .unwrap();
    let f = detect(dir.path());
    let why = f.state_tracepoint.unwrap_err();
    assert!(why.contains("`oldstate` is 8 bytes, expected 4"), "{why}");
}

#[test]
fn debian_6_1_cloud_has_everything_and_plans_fentry() {
    let f = detect(&fixture("deb61"));
    assert!(f.release.as_deref().unwrap().starts_with("6.1.0-"));
    assert!(f.btf && f.kprobe_pmu && f.kprobe_events);
    assert!(f.state_tracepoint.is_ok());
    assert!(Func::ALL
        .iter()
        .all(|&func| f.attach_points.yes().unwrap().get(func).is_some()));
    let plan = Plan::new(&f, &findings(Ok(())), None);
    assert_eq!(
        verdicts(&plan),
        [
            (Mode::Fentry, Ok(())),
            (Mode::Kprobe, Ok(())),
            (Mode::Tracepoint, Ok(())),
            (Mode::Legacy, Ok(())),
        ]
    );
    // The same kernel with fentry refused falls back to kprobe, not to the tracepoint.
    assert_eq!(
        Plan::new(&f, &findings(Err("EPERM")), None).first(),
        Some(Mode::Kprobe)
    );
}

#[test]
fn without_btf_legacy_needs_offsets_and_comes_last() {
    let f = detect(&fixture("nobtf"));
    assert!(!f.btf && f.kprobe_pmu);
    let with = Findings {
        sock_offsets: Finding::Yes("kernel headers for 6.1.192, built in".into()),
        ..findings(Err("no kernel BTF"))
    };
    let plan = Plan::new(&f, &with, None);
    assert_eq!(plan.steps[0].verdict, Err(Unsupported::NoBtf));
    assert_eq!(plan.steps[1].verdict, Err(Unsupported::NoBtf));
    assert_eq!(plan.first(), Some(Mode::Tracepoint));
    assert_eq!(plan.steps[3].verdict, Ok(()));
    // Forced, legacy is the only step.
    assert_eq!(
        Plan::new(&f, &with, Some(Mode::Legacy)).first(),
        Some(Mode::Legacy)
    );

    let without = Findings {
        sock_offsets: Finding::No("no BTF and no struct offsets built in".into()),
        ..with
    };
    let plan = Plan::new(&f, &without, None);
    assert_eq!(
        plan.steps[3].verdict,
        Err(Unsupported::NoOffsets(
            "no BTF and no struct offsets built in".into()
        ))
    );
}

#[test]
fn linux_4_14_has_only_legacy_through_kprobe_events() {
    let f = detect(&fixture("old414"));
    assert_eq!(f.release.as_deref(), Some("4.14.325"));
    // No BTF, no kprobe PMU (4.17+), no sock:inet_sock_set_state (4.16+).
    assert!(!f.btf && !f.kprobe_pmu && f.kprobe_events);
    assert!(f.state_tracepoint.is_err());
    assert_eq!(f.global_data(), Some(false));
    let with = Findings {
        sock_offsets: Finding::Yes("kernel headers for 4.14.325, built in".into()),
        ..findings(Err("no kernel BTF"))
    };
    let plan = Plan::new(&f, &with, None);
    assert_eq!(plan.steps[0].verdict, Err(Unsupported::NoBtf));
    assert_eq!(plan.steps[1].verdict, Err(Unsupported::NoBtf));
    assert!(matches!(
        plan.steps[2].verdict,
        Err(Unsupported::NoTracepoint(_))
    ));
    assert_eq!(plan.first(), Some(Mode::Legacy));
}

#[test]
fn linux_5_4_reads_its_one_byte_protocol_and_plans_tracepoint() {
    let f = detect(&fixture("old54"));
    assert_eq!(f.release.as_deref(), Some("5.4.286"));
    assert!(!f.btf && f.kprobe_pmu && f.kprobe_events);
    let layout = f.state_tracepoint.clone().unwrap();
    // A __u8 protocol at 30 moves the addresses one byte down from today's record.
    assert_eq!((layout.protocol, layout.protocol_size), (Some(30), 1));
    assert_eq!((layout.saddr, layout.daddr_v6), (31, 55));
    let with = Findings {
        sock_offsets: Finding::Yes("kernel headers for 5.4.286, built in".into()),
        ..findings(Err("no kernel BTF"))
    };
    let plan = Plan::new(&f, &with, None);
    assert_eq!(plan.first(), Some(Mode::Tracepoint));
    assert_eq!(plan.steps[3].verdict, Ok(()));
}
