//! tcpconnlat: TCP connect latency, traced with eBPF in whichever way this kernel allows.

mod cli;
mod event;
mod features;
mod kprobes;
mod loader;
mod output;
mod perfbuf;
mod probes;
mod stats;
mod stream;

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::error::ErrorKind;
use clap::Parser;
use futures::{FutureExt, StreamExt};
use tcpconnlat_compat::{Mode, Plan};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::Cli;
use crate::features::Host;
use crate::loader::{Filters, Tracer};
use crate::output::{Columns, Printer, View};
use crate::stats::{By, Hists, Summary};
use crate::stream::{EventStream, Record};

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            // clap's message is a paragraph (the error, possible values, a tip); ours is
            // its first part on one line, with where to look.
            let text = e.to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let message = message.join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            eprintln!("tcpconnlat: {message} (see tcpconnlat --help)");
            return ExitCode::from(2);
        }
    };
    match run(&cli, started) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcpconnlat: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

/// CAP_BPF + CAP_PERFMON (Linux 5.8+) or CAP_SYS_ADMIN.
fn privileged() -> bool {
    use caps::{has_cap, CapSet, Capability};
    let has = |c| has_cap(None, CapSet::Effective, c).unwrap_or(false);
    has(Capability::CAP_SYS_ADMIN) || (has(Capability::CAP_BPF) && has(Capability::CAP_PERFMON))
}

fn run(cli: &Cli, started: Instant) -> Result<()> {
    if cli.verbose {
        libbpf_rs::set_print(Some((libbpf_rs::PrintLevel::Debug, |_, msg| {
            eprint!("{msg}")
        })));
    } else {
        // Failed trial loads are expected; their reasons reach the user through the plan.
        libbpf_rs::set_print(None);
    }
    let privileged = privileged();
    for pid in &cli.pid {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            bail!("no process with PID {pid} (check it with: ps -p {pid})");
        }
    }
    let cgroup_id = cli.cgroup.as_deref().map(cgroup_id).transpose()?;
    if let Some(path) = &cli.btf {
        // Checked before anything else: a wrong path should not wait for a failed load.
        tcpconnlat_compat::btf::sock_offsets(path).map_err(|e| anyhow!("--btf: {e}"))?;
    }
    let forced = cli.forced_mode();
    let host = Host::detect(
        privileged,
        cli.btf.as_deref(),
        cli.features || forced.is_some(),
    );
    let filters = Filters {
        min_lat_ns: cli.min_ms.map_or(0, |ms| (ms * 1e6) as u64),
        pids: cli.pid.clone(),
        uid: cli.uid,
        cgroup_id,
        comm: cli.comm.clone(),
        dports: cli.dport.clone(),
        established: !cli.failed,
        failed: !cli.established,
        ip_version: if cli.ipv4 {
            Some(4)
        } else if cli.ipv6 {
            Some(6)
        } else {
            None
        },
    };
    let setup = loader::Setup {
        features: &host.features,
        fentry_targets: host
            .trials
            .fentry_targets
            .as_ref()
            .and_then(|t| t.as_ref().ok()),
        sock: host.sock_offsets.as_ref().ok().map(|o| &o.offsets),
        transport: loader::Transport::choose(&cli.transport, &host.trials)?,
        kprobe_attach: match cli.kprobe_attach.as_str() {
            "pmu" => kprobes::KprobeAttach::Pmu,
            "tracefs" => kprobes::KprobeAttach::Tracefs,
            _ => kprobes::KprobeAttach::Auto,
        },
        record_offsets: cli.record_offsets,
        sizes: loader::Sizes {
            buffer_pages: cli.buffer_pages,
            max_pending: cli.max_pending,
        },
        version_code: host.version_code.as_ref().ok().copied(),
    };
    if cli.features {
        let mut plan = Plan::new(&host.features, &host.trials, None);
        if privileged {
            verify_plan(&mut plan, &setup);
        }
        let mut out = io::stdout().lock();
        if cli.json {
            writeln!(out, "{}", features::report_json(&host, &plan))?;
        } else {
            write!(out, "{}", features::report_text(&host, &plan))?;
        }
        return Ok(());
    }
    if !privileged {
        bail!("loading BPF programs needs root (or CAP_BPF and CAP_PERFMON): run it with sudo");
    }
    if let Some(why) = &host.memlock {
        eprintln!("tcpconnlat: {why}");
    }
    if let Some(dir) = &host.mounted_tracefs {
        eprintln!("tcpconnlat: tracefs was not mounted; mounted it at {dir}");
    }
    if let Some(tracefs) = &host.features.tracefs {
        let stale = kprobes::remove_stale(tracefs);
        if stale > 0 {
            eprintln!(
                "tcpconnlat: removed {stale} kprobe events left by a tcpconnlat that was killed"
            );
        }
    }

    // Handlers first: a signal that arrives while loading must still end us cleanly.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")?;
    let _guard = runtime.enter();
    let mut sigint = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("handling SIGTERM")?;

    let mut plan = Plan::new(&host.features, &host.trials, forced);
    let tracer = start_first(&mut plan, &setup, &filters, forced)?;
    for note in &tracer.notes {
        eprintln!("tcpconnlat: {note}");
    }
    let sweep = stream::SweepTimes {
        look_after: cli.sweep_after.map_or(stream::STALE, Duration::from_secs),
        stale: cli.stale_after.map_or(stream::STALE, Duration::from_secs),
    };
    let stream = EventStream::new(&tracer, Duration::from_millis(cli.max_delay), sweep)?;
    drop_capabilities(|| stream.can_read_counters())?;
    // Why the better modes were not used (later ones do not matter).
    let why = plan
        .steps
        .iter()
        .take_while(|s| s.mode != tracer.mode)
        .filter_map(|s| s.verdict.as_ref().err().map(|e| format!("{}: {e}", s.mode)))
        .filter(|_| forced.is_none())
        .collect::<Vec<_>>();
    eprintln!(
        "Tracing TCP connects in {} mode ({}){}. Ctrl-C to end.",
        tracer.mode,
        tracer.transport.name(),
        if why.is_empty() {
            String::new()
        } else {
            format!("; not {}", why.join("; "))
        }
    );
    if cli.verbose {
        eprintln!(
            "tcpconnlat: attached {:.1} ms after start",
            started.elapsed().as_secs_f64() * 1e3
        );
    }

    let columns = Columns {
        timestamp: cli.timestamp,
        lport: cli.lport,
    };
    let view = if cli.hist {
        View::Hist(Hists::new(match cli.by.as_deref() {
            Some("dest") => By::Dest,
            Some("comm") => By::Comm,
            _ => By::All,
        }))
    } else if cli.summary {
        View::Summary(Summary::default())
    } else {
        View::Lines
    };
    // Stdout alone flushes every line: a write per event would cost more than the probes.
    // Lines are flushed whenever the queue is empty, so none waits longer than --max-delay.
    let out = io::BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    let mut printer = Printer::new(out, cli.json, view, columns, tracer.mode);
    printer.start()?;
    runtime.block_on(async {
        let mut stream = stream;
        let deadline = cli.duration.map(|d| tokio::time::Instant::now() + d);
        let sleep = tokio::time::sleep_until(deadline.unwrap_or_else(|| {
            tokio::time::Instant::now() + std::time::Duration::from_secs(86400 * 365)
        }));
        tokio::pin!(sleep);
        let mut interval = cli.interval.map(|every| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let mut shown = 0u64;
        let mut draining = false;
        loop {
            let record = if draining {
                // Ending: show what is already queued, then stop.
                stream.drain()?;
                match stream.next().now_or_never() {
                    Some(Some(record)) => record?,
                    _ => break,
                }
            } else {
                tokio::select! {
                    _ = sigint.recv() => { draining = true; continue }
                    _ = sigterm.recv() => { draining = true; continue }
                    _ = &mut sleep, if deadline.is_some() => { draining = true; continue }
                    _ = async { interval.as_mut().unwrap().tick().await }, if interval.is_some() => {
                        printer.report()?;
                        continue
                    }
                    record = stream.next() => match record {
                        Some(record) => record?,
                        None => break,
                    },
                }
            };
            match record {
                Record::Event(event) => {
                    printer.event(&event)?;
                    shown += 1;
                    if cli.count.is_some_and(|n| shown >= n) {
                        break;
                    }
                }
                Record::Lost(n) => printer.lost(n, tracer.transport.name())?,
                Record::Untracked(n) => printer.untracked(n, tracer.sizes.max_pending)?,
                Record::Missed(n) => printer.missed(n)?,
            }
            if stream.is_idle() {
                printer.flush()?;
            }
        }
        printer.report()?;
        printer.flush()?;
        Ok::<(), anyhow::Error>(())
    })?;
    drop(tracer);
    Ok(())
}

/// Once attached, the tracer needs almost no privilege: it reads its buffers through shared
/// memory and its maps through descriptors it holds, and removing its tracefs kprobe events
/// on exit needs only root's ownership of the file. Kernels before 6.5 still check
/// CAP_BPF (or CAP_SYS_ADMIN before 5.8) on every bpf() call while unprivileged BPF is off;
/// that one capability is kept only if `works_without` says reading a map fails without it.
fn drop_capabilities(works_without: impl Fn() -> bool) -> Result<()> {
    use caps::{CapSet, Capability};
    let context = || "dropping capabilities after attaching";
    let keep = [Capability::CAP_BPF, Capability::CAP_SYS_ADMIN]
        .into_iter()
        .find(|&c| caps::has_cap(None, CapSet::Effective, c).unwrap_or(false));
    for set in [CapSet::Ambient, CapSet::Inheritable] {
        caps::clear(None, set).with_context(context)?;
    }
    let kept: caps::CapsHashSet = keep.into_iter().collect();
    caps::set(None, CapSet::Effective, &caps::CapsHashSet::new()).with_context(context)?;
    if works_without() {
        caps::clear(None, CapSet::Permitted).with_context(context)?;
    } else {
        caps::set(None, CapSet::Permitted, &kept).with_context(context)?;
        caps::set(None, CapSet::Effective, &kept).with_context(context)?;
    }
    Ok(())
}

/// The cgroup v2 id of a cgroup directory: its inode number.
fn cgroup_id(path: &std::path::Path) -> Result<u64> {
    use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let fs = statfs(path).map_err(|e| anyhow!("--cgroup {shown}: {}", e.desc()))?;
    if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
        bail!(
            "--cgroup {shown} is not in a cgroup v2 hierarchy (usually mounted at /sys/fs/cgroup)"
        );
    }
    let meta = std::fs::metadata(path).map_err(|e| anyhow!("--cgroup {shown}: {e}"))?;
    if !meta.is_dir() {
        bail!("--cgroup {shown} is not a cgroup directory");
    }
    match kernfs_id(path) {
        Ok(id) => Ok(id),
        // From 5.5 the id is the inode number.
        Err(_) if !kernel_before(5, 5) => Ok(meta.ino()),
        Err(e) => bail!(
            "--cgroup: before Linux 5.5 a cgroup's id holds a generation that only \
             name_to_handle_at(2) shows, and it fails here ({}; a kernel built without \
             CONFIG_FHANDLE): filter with -p or --comm instead",
            e.desc()
        ),
    }
}

/// Whether the running kernel is older than `major.minor`.
fn kernel_before(major: u32, minor: u32) -> bool {
    use tcpconnlat_compat::KernelVersion;
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    KernelVersion::parse(&release).is_some_and(|v| v < KernelVersion(major, minor, 0))
}

/// The id the kernel gives a cgroup (bpf_get_current_cgroup_id), from the file handle of
/// its directory. From Linux 5.5 it is the inode number; before, the generation is in its
/// upper 32 bits, which stat does not show.
fn kernfs_id(path: &std::path::Path) -> nix::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    #[repr(C)]
    struct Handle {
        bytes: libc::c_uint,
        kind: libc::c_int,
        id: [u8; 8],
    }
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| nix::errno::Errno::EINVAL)?;
    let mut handle = Handle {
        bytes: 8,
        kind: 0,
        id: [0; 8],
    };
    let mut mount_id = 0;
    // SAFETY: `handle` is a struct file_handle with room for the 8 bytes it says.
    let rc = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            path.as_ptr(),
            (&raw mut handle).cast(),
            &mut mount_id,
            0,
        )
    };
    nix::errno::Errno::result(rc)?;
    if handle.bytes != 8 {
        return Err(nix::errno::Errno::EOVERFLOW);
    }
    Ok(u64::from_ne_bytes(handle.id))
}

/// `--features` tells what really works: every mode the plan allows is started (loaded
/// and attached, then detached at once), and one that fails is marked with the reason.
fn verify_plan(plan: &mut Plan, setup: &loader::Setup<'_>) {
    let candidates: Vec<Mode> = plan.candidates().collect();
    for mode in candidates {
        if let Err(e) = loader::start(mode, setup, &Filters::default()) {
            plan.fail(mode, format!("{e:#}"));
        }
    }
}

/// Start the first mode of the plan that loads and attaches, recording why the others
/// did not.
fn start_first(
    plan: &mut Plan,
    setup: &loader::Setup<'_>,
    filters: &Filters,
    forced: Option<Mode>,
) -> Result<Tracer> {
    let candidates: Vec<Mode> = plan.candidates().collect();
    for mode in candidates {
        match loader::start(mode, setup, filters) {
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
