//! tcpconnlat: TCP connect latency, traced with eBPF in whichever way this kernel allows.
//!
//! A run: parse the command line → detect what the host can do → plan the modes →
//! start the first that loads and attaches → pump events to the output → report.

mod cgroup;
mod cli;
mod event;
mod exporter;
mod host;
mod http;
mod kprobes;
mod loader;
mod output;
mod perfbuf;
mod privileges;
mod probes;
mod record;
mod report;
mod stats;
mod stream;
mod timing;

use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::error::ErrorKind;
use clap::Parser;
use futures::{FutureExt, StreamExt};
use tcpconnlat_compat::{Mode, Plan};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::{interval_at, sleep, Instant as TokioInstant, MissedTickBehavior};

use crate::cli::{Cli, Fleet, Limits};
use crate::exporter::{Exporter, Identity, Metrics};
use crate::host::Host;
use crate::loader::{Filters, Setup, Tracer};
use crate::output::{Printer, Sink};
use crate::stream::{EventStream, Record};

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            eprintln!("tcpconnlat: {} (see tcpconnlat --help)", one_line(&e));
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

/// clap's message is a paragraph (the error, possible values, a tip); ours is its first
/// part on one line.
fn one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let message: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let message = message.join(" ");
    message
        .strip_prefix("error: ")
        .unwrap_or(&message)
        .to_owned()
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

fn run(cli: &Cli, started: Instant) -> Result<()> {
    set_libbpf_log(cli.verbose);
    let privileged = privileges::privileged();
    let filters = cli.filters()?;
    let fleet = cli.fleet()?;
    if let Some(path) = &cli.btf {
        // Checked before anything else: a wrong path should not wait for a failed load.
        tcpconnlat_compat::btf::sock_offsets(path).map_err(|e| anyhow!("--btf: {e}"))?;
    }
    let mounted = privileged.then(host::mount_tracefs).flatten();
    let forced = cli.forced_mode();
    let every_mode = cli.features || forced.is_some();
    let host = Host::detect(privileged, cli.btf.as_deref(), every_mode, mounted);
    let setup = cli.setup(&host)?;
    if cli.features {
        return print_features(cli.json, &host, &setup, privileged);
    }
    if !privileged {
        anyhow::bail!(
            "loading BPF programs needs root (or CAP_BPF and CAP_PERFMON): run it with sudo"
        );
    }
    say_what_was_done_to_the_host(&host);
    // Handlers first: a signal that arrives while loading must still end us cleanly.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")?;
    let _guard = runtime.enter();
    let signals = Signals::new()?;
    // Bound before loading: a port in use fails at once.
    let listener = fleet
        .as_ref()
        .map(|f| runtime.block_on(http::bind(f.addr)))
        .transpose()?;
    let mut plan = Plan::new(&host.features, &host.trials, forced);
    let tracer = start_first(&mut plan, &setup, &filters, forced)?;
    host.end_fentry_trial();
    let stream = timing::step("buffers", || {
        EventStream::new(&tracer, cli.max_delay(), cli.sweep_times())
    })?;
    privileges::drop_capabilities(|| stream.can_read_counters())?;
    announce(&tracer, &plan, forced);
    if cli.verbose {
        let ms = started.elapsed().as_secs_f64() * 1e3;
        eprintln!("tcpconnlat: attached {ms:.1} ms after start");
        eprintln!("tcpconnlat: start-up steps: {}", timing::summary());
    }
    if let (Some(fleet), Some(listener)) = (fleet, listener) {
        let served = Served {
            fleet,
            listener,
            duration: cli.duration,
        };
        return export(served, &runtime, stream, &tracer, &host, signals);
    }
    // Stdout alone flushes every line: a write per event would cost more than the probes.
    // Lines are flushed whenever the queue is empty, so none waits longer than --max-delay.
    let out = io::BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    let mut printer = Printer::new(out, cli.format(), cli.view(), cli.columns(), tracer.mode);
    printer.start()?;
    runtime.block_on(pump(stream, &mut printer, &tracer, cli.limits(), signals))?;
    printer.report()?;
    printer.flush()?;
    Ok(())
}

/// What `--serve` runs with: its labels, its socket, and `-d`.
struct Served {
    fleet: Fleet,
    listener: tokio::net::TcpListener,
    duration: Option<Duration>,
}

/// `--serve`: connects become metrics, served until a signal (or `-d`).
fn export(
    served: Served,
    runtime: &tokio::runtime::Runtime,
    stream: EventStream<'_>,
    tracer: &Tracer,
    host: &Host,
    signals: Signals,
) -> Result<()> {
    let Served {
        fleet,
        listener,
        duration,
    } = served;
    let ttl = fleet.rules.ttl;
    let identity = Identity {
        mode: tracer.mode,
        transport: tracer.transport.name(),
        kernel: host.features.release.as_deref().unwrap_or("unknown"),
    };
    let metrics = Arc::new(Metrics::new(fleet.rules, fleet.buckets, &identity));
    let address = listener.local_addr()?;
    let server = runtime.spawn(http::serve(listener, metrics.clone()));
    eprintln!("tcpconnlat: serving Prometheus metrics at http://{address}/metrics");
    let mut exporter = Exporter {
        metrics: &metrics,
        cgroups: fleet.cgroups,
    };
    // Idle label sets are dropped as they pass --series-ttl, checked every few seconds.
    let limits = Limits {
        duration,
        count: None,
        interval: Some(ttl.min(Duration::from_secs(10))),
    };
    let result = runtime.block_on(pump(stream, &mut exporter, tracer, limits, signals));
    server.abort();
    result
}

fn set_libbpf_log(verbose: bool) {
    if verbose {
        libbpf_rs::set_print(Some((libbpf_rs::PrintLevel::Debug, |_, msg| {
            eprint!("{msg}")
        })));
    } else {
        // Failed trial loads are expected; their reasons reach the user through the plan.
        libbpf_rs::set_print(None);
    }
}

/// `--features`: as root, every mode the plan allows is started first (loaded, attached,
/// detached), so that one called usable really works here.
fn print_features(json: bool, host: &Host, setup: &Setup<'_>, privileged: bool) -> Result<()> {
    let mut plan = Plan::new(&host.features, &host.trials, None);
    if privileged {
        let candidates: Vec<Mode> = plan.candidates().collect();
        for mode in candidates {
            if let Err(e) = loader::start(mode, setup, &Filters::default()) {
                plan.fail(mode, format!("{e:#}"));
            }
        }
    }
    let mut out = io::stdout().lock();
    if json {
        writeln!(out, "{}", report::report_json(host, &plan))?;
    } else {
        write!(out, "{}", report::report_text(host, &plan))?;
    }
    Ok(())
}

/// What tcpconnlat had to do to the host before tracing, and could not.
fn say_what_was_done_to_the_host(host: &Host) {
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
}

/// Start the first mode of the plan that loads and attaches, recording why the others
/// did not.
fn start_first(
    plan: &mut Plan,
    setup: &Setup<'_>,
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

/// The start-up line: the mode, the transport, and why no better mode was used.
fn announce(tracer: &Tracer, plan: &Plan, forced: Option<Mode>) {
    for note in &tracer.notes {
        eprintln!("tcpconnlat: {note}");
    }
    // Why the better modes were not used (later ones do not matter).
    let why = plan
        .steps
        .iter()
        .take_while(|s| s.mode != tracer.mode)
        .filter_map(|s| s.verdict.as_ref().err().map(|e| format!("{}: {e}", s.mode)))
        .filter(|_| forced.is_none())
        .collect::<Vec<_>>();
    let why = if why.is_empty() {
        String::new()
    } else {
        format!("; not {}", why.join("; "))
    };
    eprintln!(
        "Tracing TCP connects in {} mode ({}){why}. Ctrl-C to end.",
        tracer.mode,
        tracer.transport.name(),
    );
}

/// SIGINT and SIGTERM: both end tracing cleanly.
struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    fn new() -> Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("handling SIGINT")?,
            term: signal(SignalKind::terminate()).context("handling SIGTERM")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// Move records from the stream to the printer until a signal, `limits` or the stream
/// ends it; then show what is already queued.
async fn pump(
    mut stream: EventStream<'_>,
    printer: &mut dyn Sink,
    tracer: &Tracer,
    limits: Limits,
    mut signals: Signals,
) -> Result<()> {
    const FOREVER: std::time::Duration = std::time::Duration::from_secs(86400 * 365);
    let deadline = sleep(limits.duration.unwrap_or(FOREVER));
    tokio::pin!(deadline);
    let mut interval = limits.interval.map(|every| {
        let mut ticks = interval_at(TokioInstant::now() + every, every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticks
    });
    let mut shown = 0u64;
    loop {
        let record = tokio::select! {
            _ = signals.recv() => break,
            _ = &mut deadline => break,
            _ = async { interval.as_mut().unwrap().tick().await }, if interval.is_some() => {
                printer.report()?;
                continue
            }
            record = stream.next() => match record {
                Some(record) => record?,
                None => return Ok(()),
            },
        };
        // With the rest of what the last read queued, without a round of the select each.
        let queued = std::iter::from_fn(|| stream.next_queued());
        for record in std::iter::once(record).chain(queued) {
            if show(printer, tracer, record, &mut shown, limits.count)? {
                return Ok(());
            }
        }
        printer.flush()?;
    }
    // Ending: show what is already queued, then stop.
    stream.drain()?;
    while let Some(Some(record)) = stream.next().now_or_never() {
        if show(printer, tracer, record?, &mut shown, limits.count)? {
            break;
        }
    }
    Ok(())
}

/// Hand one record on, counting connects; whether `limit` (`--count`) is now reached.
fn show(
    printer: &mut dyn Sink,
    tracer: &Tracer,
    record: Record,
    shown: &mut u64,
    limit: Option<u64>,
) -> Result<bool> {
    match record {
        Record::Event(event) => {
            printer.event(&event)?;
            *shown += 1;
            return Ok(limit.is_some_and(|n| *shown >= n));
        }
        Record::Lost(n) => printer.lost(n, tracer.transport.name())?,
        Record::Untracked(n) => printer.untracked(n, tracer.sizes.max_pending)?,
        Record::Missed(n) => printer.missed(n)?,
    }
    Ok(false)
}
