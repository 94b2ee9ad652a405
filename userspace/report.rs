//! The `--features` report: what this host offers and the mode plan, as text or JSON.

use serde_json::json;
use tcpconnlat_compat::kversion;
use tcpconnlat_compat::{Func, Plan};

use crate::host::Host;

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
