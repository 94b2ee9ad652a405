//! The `--features` report: what this host offers and the mode plan, as text or JSON.

use serde_json::{json, Value};
use tcpconnlat_compat::kversion;
use tcpconnlat_compat::{AttachPoints, Finding, Func, Plan};

use super::offsets::OffsetSource;
use super::{Host, KprobeTargets, TracefsMount};

/// The report as aligned `name  value` lines, then the plan.
pub fn report_text(host: &Host, plan: &Plan) -> String {
    let mut rows = kernel_rows(host);
    rows.extend(hook_rows(host));
    let mut out: String = rows
        .into_iter()
        .map(|(name, value)| format!("{name:<24}{value}\n"))
        .collect();
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

type Row = (String, String);

fn row(name: &str, value: impl Into<String>) -> Row {
    (name.to_owned(), value.into())
}

/// The kernel and what it offers for loading.
fn kernel_rows(host: &Host) -> Vec<Row> {
    let f = &host.features;
    let mut rows = vec![
        row(
            "kernel",
            match (&f.release, f.version) {
                (Some(r), Some(v)) => format!("{r} ({v})"),
                (Some(r), None) => r.clone(),
                _ => "unknown".to_owned(),
            },
        ),
        row(
            "version code",
            match &host.version_code {
                Ok(code) => format!("{} (from the vDSO)", kversion::display(*code)),
                Err(why) => format!("unknown ({why})"),
            },
        ),
    ];
    if let Some(why) = &host.memlock {
        rows.push(row("memlock", why.clone()));
    }
    rows.extend([
        row(
            "BTF",
            if f.btf {
                "yes"
            } else {
                "no (/sys/kernel/btf/vmlinux: Linux 5.4+, built with CONFIG_DEBUG_INFO_BTF)"
            },
        ),
        row(
            "tracefs",
            match (&f.tracefs, &host.tracefs_mount) {
                (Some(dir), TracefsMount::Mounted(_)) => {
                    format!("{} (mounted by tcpconnlat)", dir.display())
                }
                (Some(dir), _) => dir.display().to_string(),
                (None, TracefsMount::Failed(why)) => format!("not mounted ({why})"),
                (None, _) => "not mounted".to_owned(),
            },
        ),
        row(
            "kprobe PMU",
            if f.kprobe_pmu {
                "yes"
            } else {
                "no (Linux 4.17+: kprobes go through tracefs kprobe_events)"
            },
        ),
        row("kprobe_events", yes_no(f.kprobe_events)),
        row(
            "fentry",
            finding_text(&host.findings.fentry, |()| "yes".to_owned()),
        ),
        row(
            "struct sock offsets",
            match host.offsets.known() {
                Ok(known) if known.notes.is_empty() => format!("from {}", known.source),
                Ok(known) => format!("from {} ({})", known.source, known.notes.join("; ")),
                Err(_) => format!(
                    "unknown ({})",
                    host.offsets.why_unknown(f).unwrap_or_default()
                ),
            },
        ),
        row(
            "ring buffer",
            finding_text(&host.findings.ringbuf, |()| "yes".to_owned()),
        ),
        row(
            "global data",
            match f.global_data() {
                Some(true) => "yes",
                Some(false) => "no (Linux 5.2+)",
                None => "unknown",
            },
        ),
        row(
            "ends not seen",
            finding_text(&host.findings.on_demand, |()| {
                "found by the sweeper (it runs a program on demand)".to_owned()
            }),
        ),
    ]);
    rows
}

/// The tracepoints and kernel functions the modes hook.
fn hook_rows(host: &Host) -> Vec<Row> {
    let f = &host.features;
    let found = |r: &Result<u16, String>| match r {
        Ok(_) => "yes".to_owned(),
        Err(why) => format!("no ({why})"),
    };
    let mut rows = vec![
        row(
            "tracepoint",
            match &f.state_tracepoint {
                Ok(_) => "sock:inet_sock_set_state".to_owned(),
                Err(why) => format!("no ({why})"),
            },
        ),
        row("SYN retransmits", found(&f.retransmit_tracepoint)),
        row("RST tracepoint", found(&f.reset_tracepoint)),
        row(
            "fentry targets",
            finding_text(&host.findings.fentry_targets, |targets| {
                Func::ALL
                    .iter()
                    .filter_map(|&func| targets.get(func))
                    .collect::<Vec<_>>()
                    .join(" ")
            }),
        ),
    ];
    match &f.attach_points {
        Finding::Yes(points) => {
            let from = match host.kprobe_targets {
                Some(KprobeTargets::ByName) => "(by their own names: the kprobe PMU takes them)",
                _ => "(from /proc/kallsyms)",
            };
            rows.push(row("kprobe symbols", from));
            rows.extend(symbol_rows(points));
        }
        _ if !f.kprobes() => rows.push(row("kprobe symbols", "not needed (no kprobes)")),
        other => rows.push(row(
            "kprobe symbols",
            finding_text(other, |_| String::new()),
        )),
    }
    rows
}

fn symbol_rows(points: &AttachPoints) -> Vec<Row> {
    Func::ALL
        .iter()
        .map(|&func| {
            let symbol = points.get(func).unwrap_or("absent");
            row(&format!("  {}", func.name()), symbol)
        })
        .collect()
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn finding_text<T>(probe: &Finding<T>, yes: impl FnOnce(&T) -> String) -> String {
    match probe {
        Finding::Yes(found) => yes(found),
        Finding::No(why) => format!("no ({why})"),
        Finding::Unknown(why) => format!("unknown ({why})"),
    }
}

/// true, false, or null for unknown.
fn finding_json<T>(probe: &Finding<T>) -> Value {
    match probe {
        Finding::Yes(_) => json!(true),
        Finding::No(_) => json!(false),
        Finding::Unknown(_) => Value::Null,
    }
}

/// Why not, where the answer is no or unknown.
fn finding_why<T>(probe: &Finding<T>) -> Option<&str> {
    match probe {
        Finding::Yes(_) => None,
        Finding::No(why) | Finding::Unknown(why) => Some(why),
    }
}

pub fn report_json(host: &Host, plan: &Plan) -> Value {
    let f = &host.features;
    let t = &host.findings;
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
        "tracefs_mounted_by_us": matches!(host.tracefs_mount, TracefsMount::Mounted(_)),
        "kprobe_pmu": f.kprobe_pmu,
        "kprobe_events": f.kprobe_events,
        "fentry": finding_json(&t.fentry),
        "fentry_error": finding_why(&t.fentry),
        "tracepoint": f.state_tracepoint.is_ok(),
        "tracepoint_layout": f.state_tracepoint.as_ref().ok(),
        "tracepoint_error": f.state_tracepoint.as_ref().err(),
        "retransmit_tracepoint": f.retransmit_tracepoint.is_ok(),
        "reset_tracepoint": f.reset_tracepoint.is_ok(),
        "sock_offsets": host.offsets.known().ok().map(|o| o.offsets),
        "sock_offsets_error": host.offsets.why_unknown(f),
        "sock_offsets_source": host.offsets.known().ok().map(|o| o.source.to_string()),
        "sock_offsets_discovered": host.offsets.known().ok().map(|o| matches!(o.source, OffsetSource::Discovered { .. })),
        "sock_offsets_notes": host.offsets.known().ok().map(|o| &o.notes),
        "ringbuf": finding_json(&t.ringbuf),
        "on_demand": finding_json(&t.on_demand),
        "on_demand_error": finding_why(&t.on_demand),
        "global_data": f.global_data(),
        "symbols": f.attach_points.yes(),
        "symbols_error": finding_why(&f.attach_points),
        "fentry_targets": t.fentry_targets.yes(),
        "plan": plan.steps.iter().map(|s| json!({
            "mode": s.mode,
            "usable": s.verdict.is_ok(),
            "reason": s.verdict.as_ref().err().map(|e| e.to_string()),
        })).collect::<Vec<_>>(),
        "auto": plan.first(),
    })
}
