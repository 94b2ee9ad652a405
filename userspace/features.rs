//! Finding out what this host can do: the compat layer's file-based detection plus the
//! trials only a real load can answer, and the `--features` report.

use std::path::Path;

use anyhow::Result;
use libbpf_rs::{MapType, ObjectBuilder};
use serde_json::json;
use tcpconnlat_compat::btf::{self, SockOffsets};
use tcpconnlat_compat::{tracefs, Features, Func, Plan, Trials};

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

use crate::probes;

pub struct Host {
    pub features: Features,
    pub trials: Trials,
    /// struct sock offsets for probes that cannot use CO-RE, and where they came from.
    pub sock_offsets: Result<KnownOffsets, String>,
    /// We mounted tracefs because nothing had.
    pub mounted_tracefs: Option<String>,
}

impl Host {
    /// Detect everything. Trials and mounting need privileges; without them the trials
    /// stay unknown and the plan says so.
    pub fn detect(privileged: bool, btf_file: Option<&Path>) -> Host {
        let root = Path::new("/");
        // The two slow parts of start-up side by side: the kernel formatting
        // /proc/kallsyms (in Features::detect) and parsing its BTF for struct offsets.
        let (mut features, sock_offsets) = std::thread::scope(|scope| {
            let features = scope.spawn(|| Features::detect(root));
            let release = std::fs::read_to_string(root.join("proc/sys/kernel/osrelease"))
                .map(|r| r.trim().to_owned())
                .ok();
            let kernel_btf = Path::new(VMLINUX_BTF).is_file();
            let offsets = find_offsets(kernel_btf, release.as_deref(), btf_file);
            let features = features.join().expect("kernel feature detection panicked");
            (features, offsets)
        });
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
            ..Trials::default()
        };
        if privileged {
            trials.fentry = Some(trial_fentry(&features));
            trials.ringbuf = Some(MapType::RingBuf.is_supported().unwrap_or(false));
        }
        Host {
            features,
            trials,
            sock_offsets,
            mounted_tracefs,
        }
    }
}

/// struct sock offsets, and where they came from.
#[derive(Clone, Debug)]
pub struct KnownOffsets {
    pub offsets: SockOffsets,
    pub source: String,
}

/// In order: the BTF file the user gave, the kernel's own BTF, offsets built in from
/// kernel headers for this release; else an error naming both remedies.
fn find_offsets(
    kernel_btf: bool,
    release: Option<&str>,
    btf_file: Option<&Path>,
) -> Result<KnownOffsets, String> {
    let from_btf = |path: &Path| {
        btf::sock_offsets(path)
            .map(|offsets| KnownOffsets {
                offsets,
                source: format!("BTF {}", path.display()),
            })
            .map_err(|e| e.to_string())
    };
    if let Some(path) = btf_file {
        return from_btf(path);
    }
    if kernel_btf {
        return from_btf(Path::new(VMLINUX_BTF));
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
    match &f.attach_points {
        Ok(points) => {
            for func in Func::ALL {
                line(
                    &format!("  {}", func.name()),
                    points.get(func).unwrap_or("absent").to_owned(),
                );
            }
        }
        Err(why) => line("symbols", why.clone()),
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
        "kernel": { "release": f.release, "version": f.version.map(|v| v.to_string()) },
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
        "symbols": f.attach_points.as_ref().ok(),
        "symbols_error": f.attach_points.as_ref().err(),
        "plan": plan.steps.iter().map(|s| json!({
            "mode": s.mode,
            "usable": s.verdict.is_ok(),
            "reason": s.verdict.as_ref().err().map(|e| e.to_string()),
        })).collect::<Vec<_>>(),
        "auto": plan.first(),
    })
}
