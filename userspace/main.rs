//! tcpconnlat: TCP connect latency, traced with eBPF in whichever way this kernel allows.
//!
//! A run: parse the command line → detect what the host can do → plan the modes →
//! start the first that loads and attaches → pump events to the output (or serve them as
//! metrics) → report.
//!
//! Each concern has its folder, and dependencies run one way: `main` → `cli` → `host`,
//! `fleet`, `output` → `pump` → `tracer` → `compat` (the library crate that decides).

/// `eprintln!` that never panics: where stderr's reader has gone (`tcpconnlat -v 2>&1 |
/// head -1`), a note is lost, not the trace.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod cli;
mod fleet;
mod host;
mod output;
mod pump;
mod timing;
mod tracer;

use std::io;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use clap::error::ErrorKind;
use clap::Parser;
use tcpconnlat_compat::{Mode, Plan};

use crate::cli::Cli;
use crate::fleet::{Fleet, Identity};
use crate::host::users::Unknown;
use crate::host::{Detect, Host, Scope};
use crate::output::Printer;
use crate::pump::Signals;
use crate::tracer::stream::EventStream;
use crate::tracer::{LoadOptions, Tracer};

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            note!("tcpconnlat: {} (see tcpconnlat --help)", one_line(&e));
            return ExitCode::from(2);
        }
    };
    match run(&cli, started) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => {
            note!("tcpconnlat: stopped: the output's reader went away (broken pipe)");
            ExitCode::FAILURE
        }
        Err(e) => {
            note!("tcpconnlat: {e:#}");
            let bad_argument = e
                .downcast_ref::<Unknown>()
                .is_some_and(Unknown::is_bad_argument);
            ExitCode::from(if bad_argument { 2 } else { 1 })
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
    e.chain()
        .filter_map(|cause| cause.downcast_ref::<io::Error>())
        .any(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

fn run(cli: &Cli, started: Instant) -> Result<()> {
    if let Some(what) = cli.generate {
        return cli::generate(what, &mut io::stdout().lock()).context("writing it");
    }
    set_libbpf_log(cli.verbose);
    let privileged = host::privileges::privileged();
    let filters = cli.filters()?;
    let fleet = cli.serve_args().map(Fleet::new).transpose()?;
    if let Some(path) = &cli.btf {
        // Checked before anything else: a wrong path should not wait for a failed load.
        tcpconnlat_compat::btf::sock_offsets(path).map_err(|e| anyhow!("--btf: {e}"))?;
    }
    let forced = cli.forced_mode();
    let host = Host::detect(&Detect {
        privileged,
        btf_file: cli.btf.as_deref(),
        offsets: cli.offsets,
        kprobe_attach: cli.kprobe_attach,
        scope: match forced {
            _ if cli.features => Scope::Every,
            Some(mode) => Scope::Only(mode),
            None => Scope::Auto,
        },
    });
    let options = cli.load_options(&host)?;
    if cli.features {
        return print_features(cli.json, &host, &options, privileged);
    }
    if !privileged {
        anyhow::bail!(
            "loading BPF programs needs root (or CAP_BPF and CAP_PERFMON): run it with sudo"
        );
    }
    for note in host.prepare_for_tracing() {
        note!("tcpconnlat: {note}");
    }
    // Handlers first: a signal that arrives while loading must still end us cleanly.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")?;
    let _guard = runtime.enter();
    let signals = Signals::new()?;
    // Bound before loading: a port in use fails at once.
    let server = fleet
        .map(|fleet| runtime.block_on(fleet.bind()))
        .transpose()?;
    let mut plan = Plan::new(&host.features, &host.findings, forced);
    let tracer = tracer::start_first(&mut plan, &options, &filters, forced)?;
    timing::step("end of the trials", || host.end_trials());
    let stream = timing::step("buffers", || {
        EventStream::new(&tracer, cli.max_delay(), cli.sweep_times())
    })?;
    host::privileges::drop_capabilities(|| stream.can_make_its_calls())?;
    announce(&tracer, &plan, forced);
    if cli.verbose {
        // The probes without CO-RE read the socket at these offsets.
        if !tracer.mode.spec().core {
            if let Ok(known) = host.offsets.known() {
                note!("tcpconnlat: struct sock offsets from {}", known.source);
            }
        }
        let ms = started.elapsed().as_secs_f64() * 1e3;
        note!("tcpconnlat: attached {ms:.1} ms after start");
        note!("tcpconnlat: start-up steps: {}", timing::summary());
    }
    if let Some(server) = server {
        let identity = Identity {
            mode: tracer.mode,
            transport: tracer.transport.name(),
            kernel: host.features.release.as_deref().unwrap_or("unknown"),
        };
        return runtime.block_on(server.serve(stream, &identity, cli.duration, signals));
    }
    // Stdout alone flushes every line: a write per event would cost more than the probes.
    // Lines are flushed whenever the queue is empty, so none waits longer than --max-delay.
    let out = io::BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    let mut printer = Printer::new(out, cli.output(), tracer.mode);
    printer.start().context(pump::WRITING)?;
    runtime.block_on(pump::pump(stream, &mut printer, cli.limits(), signals))?;
    printer.finish().context(pump::WRITING)?;
    Ok(())
}

fn set_libbpf_log(verbose: bool) {
    if verbose {
        libbpf_rs::set_print(Some((libbpf_rs::PrintLevel::Debug, |_, msg| {
            // Called from C: a panic here would abort.
            let _ = io::Write::write_all(&mut io::stderr(), msg.as_bytes());
        })));
    } else {
        // Failed trial loads are expected; their reasons reach the user through the plan.
        libbpf_rs::set_print(None);
    }
}

/// `--features`: as root, every mode the plan allows is started first (loaded, attached,
/// detached), so that one called usable really works here.
fn print_features(
    json: bool,
    host: &Host,
    options: &LoadOptions<'_>,
    privileged: bool,
) -> Result<()> {
    use std::io::Write;
    let mut plan = Plan::new(&host.features, &host.findings, None);
    if privileged {
        tracer::prove_usable(&mut plan, options);
    }
    let mut out = io::stdout().lock();
    if json {
        writeln!(out, "{}", host::report::report_json(host, &plan))?;
    } else {
        write!(out, "{}", host::report::report_text(host, &plan))?;
    }
    Ok(())
}

/// The start-up line: the mode, the transport, and why no better mode was used.
fn announce(tracer: &Tracer, plan: &Plan, forced: Option<Mode>) {
    for note in &tracer.notes {
        note!("tcpconnlat: {note}");
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
    note!(
        "Tracing TCP connects in {} mode ({}){why}. Ctrl-C to end.",
        tracer.mode,
        tracer.transport.name(),
    );
}
