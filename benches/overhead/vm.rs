//! The instruction-counted profile of the overhead benchmark (`ci/bench.sh --vm ID`): run
//! inside a QEMU guest with `-icount shift=0,sleep=off` and one vCPU, where the guest clock
//! advances one nanosecond per guest instruction, so every figure is a count of guest
//! instructions that host load cannot reach. One storm (two client threads, loopback,
//! connect+accept+close), in interleaved rounds: untraced, empty programs on each mode's
//! hooks (the floor), tcpconnlat in each mode with its default text output to a file and
//! to /dev/null, and the reference tool (bcc's libbpf-tools `tcpconnlat`) the same way.
//! With one vCPU, everything the tracer does (its probes, wakeups and its own CPU) comes
//! out of the storm's time. Prints tables; judges nothing.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{
    connects, median, peak_rss_kb, prog_fdinfo, rounds, storm, BpfStats, Floor, Server, BIN,
};

/// What one measurement traces with.
#[derive(Clone)]
enum Setup {
    Untraced,
    Floor(String),
    /// tcpconnlat in a mode (None: auto), or the reference tool; output to a file or not.
    Tool(Tool, Output),
}

#[derive(Clone, PartialEq)]
enum Tool {
    Ours(Option<String>),
    /// The same, built from an earlier commit (TCPCONNLAT_BENCH_BEFORE), measured beside.
    Before(PathBuf, Option<String>),
    /// Legacy mode with its struct offsets found at start-up: what discovery costs.
    Discovering,
    /// Fleet mode (auto): `--serve`, events into the metrics instead of lines.
    Serving,
    Reference(PathBuf),
}

#[derive(Clone, Copy, PartialEq)]
enum Output {
    File,
    Null,
}

impl Tool {
    fn name(&self, auto: &str) -> String {
        match self {
            Tool::Ours(None) => format!("tcpconnlat (auto: {auto})"),
            Tool::Ours(Some(mode)) => format!("tcpconnlat --mode {mode}"),
            Tool::Before(_, None) => format!("before: tcpconnlat (auto: {auto})"),
            Tool::Before(_, Some(mode)) => format!("before: tcpconnlat --mode {mode}"),
            Tool::Discovering => "tcpconnlat --mode legacy --offsets discover".into(),
            Tool::Serving => format!("tcpconnlat --serve (auto: {auto})"),
            Tool::Reference(_) => "reference (libbpf-tools tcpconnlat)".into(),
        }
    }

    /// The command, showing only connects of process `pid` (both tools filter in the
    /// kernel).
    fn command(&self, pid: u32) -> Command {
        match self {
            Tool::Ours(_) | Tool::Before(..) | Tool::Discovering | Tool::Serving => {
                let bin = match self {
                    Tool::Before(path, _) => path.as_path(),
                    _ => Path::new(BIN),
                };
                let mut c = Command::new(bin);
                c.args(["-v", "-p", &pid.to_string()]);
                match self {
                    Tool::Ours(Some(mode)) | Tool::Before(_, Some(mode)) => {
                        c.args(["--mode", mode])
                    }
                    Tool::Discovering => c.args(["--mode", "legacy", "--offsets", "discover"]),
                    Tool::Serving => c.args(["--serve", "127.0.0.1:0"]),
                    _ => &mut c,
                };
                c
            }
            Tool::Reference(path) => {
                let mut c = Command::new(path);
                c.args(["-p", &pid.to_string()]);
                c
            }
        }
    }
}

impl Setup {
    fn name(&self, auto: &str) -> String {
        match self {
            Setup::Untraced => "untraced".into(),
            Setup::Floor(mode) => format!("empty programs on {mode}'s hooks (floor)"),
            Setup::Tool(tool, Output::File) => format!("{}, text to a file", tool.name(auto)),
            Setup::Tool(Tool::Serving, _) => Tool::Serving.name(auto),
            Setup::Tool(tool, Output::Null) => format!("{}, text to /dev/null", tool.name(auto)),
        }
    }

    /// The floor for a tool: empty programs on the hooks of the mode it runs in.
    fn floor_mode(&self, auto: &str) -> Option<String> {
        match self {
            Setup::Tool(Tool::Ours(Some(mode)) | Tool::Before(_, Some(mode)), _) => {
                Some(mode.clone())
            }
            Setup::Tool(Tool::Ours(None) | Tool::Before(_, None) | Tool::Serving, _) => {
                Some(auto.into())
            }
            Setup::Tool(Tool::Discovering, _) => Some("legacy".into()),
            // The reference uses fentry where the kernel has it, as auto does here.
            Setup::Tool(Tool::Reference(_), _) => Some("fentry".into()),
            _ => None,
        }
    }
}

/// A tracer running for one measurement.
struct Running {
    child: Child,
    output: Option<tempfile::NamedTempFile>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// Started and seen tracing, and how long that took (`probe`: a server of its own for
    /// the connects that tell, so that they are not counted as the storm's).
    fn start(tool: &Tool, output: Output, probe: &Server) -> (Running, Duration) {
        let file = (output == Output::File)
            .then(|| tempfile::NamedTempFile::new().expect("a temporary file"));
        let stdout = match &file {
            Some(f) => Stdio::from(f.reopen().expect("reopen the output file")),
            None => Stdio::from(File::create("/dev/null").expect("open /dev/null")),
        };
        let started = Instant::now();
        let mut child = tool
            .command(std::process::id())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the tracer");
        let said_tracing = said_tracing(child.stderr.take().unwrap());
        let running = Running {
            child,
            output: file,
        };
        let took = match tool {
            // When it says so: right after it attached.
            Tool::Ours(_) | Tool::Before(..) | Tool::Discovering | Tool::Serving => {
                said_tracing
                    .recv()
                    .expect("the tracer did not start tracing");
                started.elapsed()
            }
            Tool::Reference(_) => running.wait_until_tracing(probe, started),
        };
        (running, took)
    }

    /// From `started` until one of our connects runs its BPF programs (the reference says
    /// nothing when it starts). Two programs at least: it first tries one fentry program
    /// alone, to learn whether the kernel allows fentry.
    fn wait_until_tracing(&self, server: &Server, started: Instant) -> Duration {
        let pid = self.child.id();
        // Run counts are kept only while BPF stats are on: on only now, not in the storms.
        let _stats = BpfStats::enable();
        loop {
            storm(server, 1);
            if programs_run(pid) >= 2 {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the tracer did not start tracing"
            );
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Its CPU time so far, all threads (the scheduler's own count, in nanoseconds).
    fn cpu_ns(&self) -> u64 {
        let tasks = format!("/proc/{}/task", self.child.id());
        std::fs::read_dir(tasks)
            .map(|dir| {
                dir.filter_map(|t| {
                    let stat = std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok()?;
                    stat.split_whitespace().next()?.parse::<u64>().ok()
                })
                .sum()
            })
            .unwrap_or(0)
    }

    /// Peak RSS so far, in kB.
    fn peak_rss_kb(&self) -> f64 {
        peak_rss_kb(self.child.id())
    }

    /// Stop it; the connect lines it wrote to `server`, where it wrote to a file.
    fn finish(mut self, server: &Server) -> Option<usize> {
        let ports: Vec<String> = server.ports().split(',').map(str::to_owned).collect();
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let _ = self.child.wait();
        let file = self
            .output
            .as_ref()?
            .reopen()
            .expect("reopen the output file");
        Some(
            BufReader::new(file)
                .lines()
                .map_while(Result::ok)
                // Both tools' columns: PID COMM IP SADDR DADDR DPORT LAT(ms).
                .filter(|l| {
                    l.split_whitespace()
                        .nth(5)
                        .is_some_and(|p| ports.iter().any(|q| q == p))
                })
                .count(),
        )
    }
}

/// Read a tracer's stderr to its end (so that it never blocks on it); the receiver gets a
/// message when it says "Tracing".
fn said_tracing(stderr: std::process::ChildStderr) -> std::sync::mpsc::Receiver<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("Tracing") {
                let _ = tx.send(());
            }
        }
    });
    rx
}

/// How many of the BPF programs `pid` holds have run (needs BPF stats on).
fn programs_run(pid: u32) -> usize {
    prog_fdinfo(pid, "run_cnt:")
        .unwrap_or_default()
        .into_iter()
        .filter(|&runs| runs > 0)
        .count()
}

/// What one measurement gave.
#[derive(Default, Clone)]
struct Sample {
    us_per_connect: f64,
    /// The tracer's CPU from the storm's start until it had shown everything.
    cpu_ns: u64,
    lines: Option<usize>,
    peak_rss_kb: f64,
}

fn measure(setup: &Setup, server: &Server, probe: &Server) -> Sample {
    let n = connects();
    let per_connect = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    match setup {
        Setup::Untraced => Sample {
            us_per_connect: per_connect(storm(server, n)),
            ..Sample::default()
        },
        Setup::Floor(mode) => {
            let _floor = Floor::attach(mode);
            Sample {
                us_per_connect: per_connect(storm(server, n)),
                ..Sample::default()
            }
        }
        Setup::Tool(tool, output) => {
            let (tracer, _) = Running::start(tool, *output, probe);
            // Let start-up finish (the tracer is idle once it waits for events).
            thread::sleep(Duration::from_millis(300));
            let cpu = tracer.cpu_ns();
            let took = storm(server, n);
            // Both tools show an event within 100 ms of it.
            thread::sleep(Duration::from_millis(300));
            let cpu_ns = tracer.cpu_ns() - cpu;
            let peak_rss_kb = tracer.peak_rss_kb();
            Sample {
                us_per_connect: per_connect(took),
                cpu_ns,
                lines: tracer.finish(server),
                peak_rss_kb,
            }
        }
    }
}

/// The instruction-counted run: `usable` are the modes this kernel allows (auto's pick
/// first). With TCPCONNLAT_BENCH_STARTUP_ONLY=1, only start-up and peak memory, in every
/// mode (legacy too, and legacy with its offsets discovered): quick enough for every
/// matrix kernel.
pub fn run(usable: &[String], reference: Option<PathBuf>) {
    let auto = usable[0].clone();
    let probe = Server::loopback(1);
    if std::env::var("TCPCONNLAT_BENCH_STARTUP_ONLY").is_ok_and(|v| v == "1") {
        let mut tools = vec![Tool::Ours(None)];
        tools.extend(usable.iter().skip(1).map(|m| Tool::Ours(Some(m.clone()))));
        tools = with_before(tools);
        if usable.iter().any(|m| m == "legacy") {
            tools.push(Tool::Discovering);
        }
        tools.extend(reference.map(Tool::Reference));
        return print_startup(&tools, &probe, &auto);
    }
    let modes: Vec<String> = usable.iter().filter(|m| *m != "legacy").cloned().collect();
    let modes = &modes[..];
    let server = Server::loopback(2);
    let mut tools: Vec<Tool> = vec![Tool::Ours(None)];
    tools.extend(modes.iter().skip(1).map(|m| Tool::Ours(Some(m.clone()))));
    tools = with_before(tools);
    tools.push(Tool::Serving);
    tools.extend(reference.clone().map(Tool::Reference));
    let mut setups = vec![Setup::Untraced];
    setups.extend(modes.iter().map(|m| Setup::Floor(m.clone())));
    for tool in &tools {
        // --serve prints no lines: its output is the metrics.
        if *tool != Tool::Serving {
            setups.push(Setup::Tool(tool.clone(), Output::File));
        }
        setups.push(Setup::Tool(tool.clone(), Output::Null));
    }
    println!(
        "instruction-counted: {} connect+accept+close per measurement from 2 client threads, {} interleaved rounds, median shown",
        connects(),
        rounds()
    );
    if reference.is_none() {
        println!("(no reference tool: set TCPCONNLAT_BENCH_REFERENCE)");
    }
    storm(&server, connects() / 4);
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); setups.len()];
    for _ in 0..rounds() {
        for (i, setup) in setups.iter().enumerate() {
            samples[i].push(measure(setup, &server, &probe));
        }
    }
    print_overhead(&setups, &samples, &auto);
    print_bpf_time(&tools, modes, &server, &probe, &auto);
    print_startup(&tools, &probe, &auto);
}

fn print_overhead(setups: &[Setup], samples: &[Vec<Sample>], auto: &str) {
    let us = |i: usize| {
        median(
            &samples[i]
                .iter()
                .map(|s| s.us_per_connect)
                .collect::<Vec<_>>(),
        )
    };
    let untraced = us(0);
    println!(
        "\n{:<62} {:>10} {:>9} {:>9} {:>9} {:>13} {:>16} {:>9}",
        "configuration",
        "us/connect",
        "added us",
        "x untrace",
        "x floor",
        "tracer us/ev",
        "events (lost)",
        "peak RSS"
    );
    for (i, setup) in setups.iter().enumerate() {
        let floor = setup.floor_mode(auto).and_then(|m| {
            setups
                .iter()
                .position(|s| matches!(s, Setup::Floor(f) if *f == m))
        });
        let x_floor = floor.map_or(String::new(), |f| format!("{:.3}x", us(i) / us(f)));
        let (cpu, events, rss) = tracer_figures(&samples[i]);
        println!(
            "{:<62} {:>10.2} {:>9} {:>8.3}x {:>9} {cpu:>13} {events:>16} {rss:>9}",
            setup.name(auto),
            us(i),
            if i == 0 {
                String::new()
            } else {
                format!("{:+.2}", us(i) - untraced)
            },
            us(i) / untraced,
            x_floor,
        );
    }
}

/// Tracer CPU per event (median), events shown of made (lost), peak RSS (max) of a
/// tracer's samples; blanks for the others.
fn tracer_figures(samples: &[Sample]) -> (String, String, String) {
    if samples.iter().all(|s| s.cpu_ns == 0) {
        return Default::default();
    }
    let made = connects() * samples.len();
    let cpu = median(
        &samples
            .iter()
            .map(|s| s.cpu_ns as f64 / 1e3 / connects() as f64)
            .collect::<Vec<_>>(),
    );
    let events = if samples.iter().all(|s| s.lines.is_some()) {
        let seen: usize = samples.iter().filter_map(|s| s.lines).sum();
        format!("{seen} ({})", made.saturating_sub(seen))
    } else {
        String::new()
    };
    let rss = samples.iter().map(|s| s.peak_rss_kb).fold(0.0, f64::max);
    (
        format!("{cpu:.2}"),
        events,
        format!("{:.1} MB", rss / 1024.0),
    )
}

/// The kernel's count of time in BPF programs per connect: the probes' own cost.
fn print_bpf_time(tools: &[Tool], modes: &[String], server: &Server, probe: &Server, auto: &str) {
    println!("\nBPF run time per connect (the kernel's BPF stats, one storm each):");
    let stats = BpfStats::enable();
    let me = std::process::id();
    for mode in modes {
        let _floor = Floor::attach(mode);
        let ns = stats.per_connect(me, server);
        println!(
            "  {:<60} {ns:>8.0} ns",
            format!("empty programs on {mode}'s hooks")
        );
    }
    for tool in tools {
        let (tracer, _) = Running::start(tool, Output::Null, probe);
        let programs = stats.by_program(tracer.child.id(), server);
        let ns: f64 = programs.iter().map(|p| p.ns).sum();
        println!("  {:<60} {ns:>8.0} ns", tool.name(auto));
        // Where it goes: the profile of the probes, program by program.
        for p in programs.iter().filter(|p| p.runs > 0.0) {
            println!(
                "      {:<56} {:>8.0} ns {:>6.2} runs, {:>6.0} ns a run",
                p.name,
                p.ns,
                p.runs,
                p.ns / p.runs
            );
        }
        tracer.finish(server);
    }
}

/// Start-up: from exec until one of our connects runs the tracer's programs; peak RSS by
/// then; and tcpconnlat's own account of its steps (-v).
fn print_startup(tools: &[Tool], probe: &Server, auto: &str) {
    println!("\nstart-up (exec to tracing, 3 starts, median) and peak RSS once tracing:");
    for tool in tools {
        let mut times = Vec::new();
        let mut rss: f64 = 0.0;
        for _ in 0..3 {
            let (tracer, took) = Running::start(tool, Output::Null, probe);
            times.push(took.as_secs_f64() * 1e3);
            rss = rss.max(tracer.peak_rss_kb());
            tracer.finish(probe);
        }
        println!(
            "  {:<60} {:>8.1} ms {:>8.1} MB",
            tool.name(auto),
            median(&times),
            rss / 1024.0
        );
    }
    if let Some(steps) = own_steps() {
        println!("  tcpconnlat -v (auto) says:");
        for line in steps {
            println!("    {line}");
        }
    }
}

/// What tcpconnlat -v prints about its start-up, once.
fn own_steps() -> Option<Vec<String>> {
    let out = Command::new(BIN)
        .args(["-v", "-d", "0.1"])
        .stdout(Stdio::null())
        .output()
        .ok()?;
    Some(
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.contains(" ms"))
            .map(str::to_owned)
            .collect(),
    )
}

/// Each of our tools, followed by the same from the earlier build, where one is given
/// (TCPCONNLAT_BENCH_BEFORE).
fn with_before(tools: Vec<Tool>) -> Vec<Tool> {
    let Some(before) = std::env::var_os("TCPCONNLAT_BENCH_BEFORE").filter(|p| !p.is_empty()) else {
        return tools;
    };
    let before = PathBuf::from(before);
    let mut all = Vec::new();
    for tool in tools {
        let earlier = match &tool {
            Tool::Ours(mode) => Some(Tool::Before(before.clone(), mode.clone())),
            _ => None,
        };
        all.push(tool);
        all.extend(earlier);
    }
    all
}

/// The reference tool's path, if given and present, where it can run (it needs the
/// kernel's BTF).
pub fn reference() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("TCPCONNLAT_BENCH_REFERENCE")?);
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    (btf && path.exists()).then_some(path)
}
