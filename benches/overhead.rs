//! The overhead benchmark (`ci/bench.sh`, as root): connect storms on loopback (from two
//! client threads, and from one that leaves the tracer a core of its own) and across a veth
//! pair into a network namespace, measured side by side, in interleaved rounds, with no
//! tracer, with empty programs on the hooks each mode uses (the floor no tracer can go
//! below) and with tcpconnlat in each mode this kernel allows; then events received
//! against connects made (nothing may be lost), the tracer's CPU time, its start-up time
//! and peak memory. Prints figures; passes or fails nothing.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use libbpf_rs::{Link, ObjectBuilder};

const BIN: &str = env!("CARGO_BIN_EXE_tcpconnlat");
mod probes {
    #![allow(dead_code)]
    use tcpconnlat_compat::ProbeObject;
    include!(concat!(env!("OUT_DIR"), "/probe_names.rs"));
}

/// Client threads in a storm that keeps this machine's cores busy (the tracer's CPU then
/// comes out of the storm's).
const THREADS: usize = 2;

/// Connects per measurement (the matrix VMs, under emulation, use fewer).
fn connects() -> usize {
    from_env("TCPCONNLAT_BENCH_CONNECTS", 20_000)
}

/// Rounds of every configuration.
fn rounds() -> usize {
    from_env("TCPCONNLAT_BENCH_ROUNDS", 5)
}

fn from_env(name: &str, default: usize) -> usize {
    std::env::var(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, not {v:?}"))
    })
}

// The instruction-counted profile (ci/bench.sh --vm), in a folder of its own.
#[path = "overhead/vm.rs"]
mod vm;

fn main() {
    let features = features();
    // Across a veth pair too, unless told not to (the emulated matrix VM, for time).
    let veth = std::env::var("TCPCONNLAT_BENCH_VETH").map_or(true, |v| v != "0");
    let usable: Vec<String> = features["plan"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["usable"] == true)
        .map(|s| s["mode"].as_str().unwrap().to_owned())
        .collect();
    if std::env::var("TCPCONNLAT_BENCH_PROFILE").is_ok_and(|p| p == "vm") {
        return vm::run(&usable, vm::reference());
    }
    let modes: Vec<String> = usable.into_iter().filter(|m| m != "legacy").collect();
    // One client alone leaves the tracer a core of its own: what a traced connect costs the
    // process that makes it.
    let mut servers = vec![Server::loopback(THREADS), Server::loopback(1)];
    if veth {
        servers.push(Server::veth(THREADS));
    }
    println!(
        "kernel {}; {} CPUs; modes here: {}",
        features["kernel"]["release"].as_str().unwrap_or("?"),
        thread::available_parallelism().map_or(0, |n| n.get()),
        modes.join(", ")
    );
    println!(
        "{} connect+accept+close per measurement, {} interleaved rounds, median shown\n",
        connects(),
        rounds()
    );
    // Warm up the TCP stack, the page cache and the veth pair's neighbours.
    for server in &servers {
        storm(server, connects() / 4);
    }
    let setups = host_setups(&servers, &modes);
    let measured = measure_rounds(&setups, &servers);
    print_storm_table(&setups, &servers, &measured);
    print_host_bpf_time(&modes, &servers[1]);
    print_loss(&modes[0], &servers[0]);
    print_host_startup(&modes);
}

/// (network, setup): everything on the loopback storm; with one client and across veth
/// the tracer as it runs by default.
fn host_setups(servers: &[Server], modes: &[String]) -> Vec<(usize, Setup)> {
    let mut setups = Vec::new();
    for (net, _) in servers.iter().enumerate() {
        setups.push((net, Setup::Nothing));
        for mode in modes {
            setups.push((net, Setup::Floor(mode.clone())));
            setups.push((net, Setup::Tracer(mode.clone(), "ringbuf", true)));
            if net > 0 {
                continue;
            }
            // The perf buffer is what kernels before 5.8 (and legacy mode) get: same probes.
            setups.push((net, Setup::Tracer(mode.clone(), "perfbuf", true)));
            // Every probe runs in full but the last filter drops each event: the probes'
            // cost without any output.
            setups.push((net, Setup::Tracer(mode.clone(), "ringbuf", false)));
        }
    }
    setups
}

/// Every setup's storm times, and the tracer's (made, seen, CPU share) where one ran.
struct Measured {
    times: Vec<Vec<f64>>,
    tracer_stats: Vec<Vec<(usize, usize, f64)>>,
}

/// The setups measured in interleaved rounds, so that drift on the machine spreads over
/// all of them.
fn measure_rounds(setups: &[(usize, Setup)], servers: &[Server]) -> Measured {
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    let mut tracer_stats: Vec<Vec<(usize, usize, f64)>> = vec![Vec::new(); setups.len()];
    for _ in 0..rounds() {
        for (i, (net, setup)) in setups.iter().enumerate() {
            let (us, stats) = measure(setup, &servers[*net]);
            times[i].push(us);
            tracer_stats[i].extend(stats);
        }
    }
    Measured {
        times,
        tracer_stats,
    }
}

/// The storm's table: each setup's time per connect against no tracer and its floor,
/// then what each tracer added and how many events it showed.
fn print_storm_table(setups: &[(usize, Setup)], servers: &[Server], measured: &Measured) {
    let Measured {
        times,
        tracer_stats,
    } = measured;
    let names: Vec<String> = setups
        .iter()
        .map(|(net, setup)| format!("{}: {}", servers[*net].name, setup.name()))
        .collect();
    // Each network's untraced time.
    let base_of = |i: usize| {
        let net = setups[i].0;
        median(
            &times[setups
                .iter()
                .position(|(n, s)| *n == net && matches!(s, Setup::Nothing))
                .unwrap()],
        )
    };
    println!(
        "{:<84} {:>12} {:>12} {:>10} {:>10}",
        "configuration", "us/connect", "connects/s", "vs none", "vs floor"
    );
    // The floor of a tracer's mode: the empty programs on its hooks, on the same network.
    let floor_of = |i: usize| match &setups[i] {
        (net, Setup::Tracer(mode, _, _)) => setups
            .iter()
            .position(|(n, s)| n == net && matches!(s, Setup::Floor(m) if m == mode))
            .map(|f| median(&times[f])),
        _ => None,
    };
    for (i, name) in names.iter().enumerate() {
        let base = base_of(i);
        let us = median(&times[i]);
        let floor = floor_of(i);
        println!(
            "{name:<84} {us:>12.2} {:>12.0} {:>9.3}x {:>10}",
            1e6 / us,
            us / base,
            floor.map_or("".into(), |f| format!("{:.3}x", us / f))
        );
    }
    println!("\nadded per-connect cost over no tracer, and over the empty-program floor:");
    for (i, name) in names.iter().enumerate() {
        let Some(floor) = floor_of(i) else {
            continue;
        };
        let base = base_of(i);
        let us = median(&times[i]);
        println!(
            "  {name:<84} +{:.2} us ({:+.1} % of an untraced connect); probe logic over the floor: +{:.2} us ({:.2}x the floor's cost over none)",
            us - base,
            (us - base) / base * 100.0,
            us - floor,
            if floor > base { (us - base) / (floor - base) } else { f64::NAN },
        );
        let stats = &tracer_stats[i];
        if let (_, Setup::Tracer(_, _, false)) = setups[i] {
            continue;
        }
        let made: usize = stats.iter().map(|s| s.0).sum();
        let seen: usize = stats.iter().map(|s| s.1).sum();
        let cpu = stats.iter().map(|s| s.2).sum::<f64>() / stats.len() as f64;
        println!(
            "  {:<84} events: {seen} of {made} connects ({} lost); tracer CPU {:.1} % of one core while tracing",
            "", made.saturating_sub(seen), cpu * 100.0
        );
    }
}

/// The kernel's own count of time spent in BPF programs: no wall-clock noise, and the
/// probes' cost apart from the tracer's (and the storm's) userspace.
fn print_host_bpf_time(modes: &[String], server: &Server) {
    println!(
        "\nBPF time per connect ({}; the kernel's run-time stats, {} connects):",
        server.name,
        connects()
    );
    let stats = BpfStats::enable();
    for mode in modes {
        let floor = {
            let _floor = Floor::attach(mode);
            stats.per_connect(std::process::id(), server)
        };
        let mut ours = Vec::new();
        for extra in [&[][..], &["--record-offsets"][..]] {
            let tracer = Tracer::start(mode, "ringbuf", &server.ports(), extra);
            ours.push(stats.per_connect(tracer.child.id(), server));
            tracer.finish(connects());
        }
        println!(
            "  {mode:<12} empty programs {floor:.0} ns; tcpconnlat {:.0} ns ({:.2}x), with the tracepoint record read at its offsets {:.0} ns ({:.2}x)",
            ours[0],
            ours[0] / floor,
            ours[1],
            ours[1] / floor
        );
    }
    drop(stats);
}

/// Where loss starts: the first mode (auto's pick) on the busiest storm, with ever smaller
/// buffers.
fn print_loss(mode: &str, server: &Server) {
    println!(
        "\nevents lost at full rate ({}, {} mode) against buffer size:",
        server.name, mode
    );
    for transport in ["ringbuf", "perfbuf"] {
        let unit = match transport {
            "ringbuf" => "pages in all",
            _ => "pages per CPU",
        };
        let lost: Vec<String> = [1, 2, 4, 8, 16, 32, 64]
            .iter()
            .map(|pages| {
                let tracer = Tracer::start(
                    mode,
                    transport,
                    &server.ports(),
                    &["--buffer-pages", &pages.to_string()],
                );
                storm(server, connects());
                let (made, seen, _) = tracer.finish(connects());
                format!("{pages}: {}", made.saturating_sub(seen))
            })
            .collect();
        println!(
            "  {transport} ({unit}: lost of {}) {}",
            connects(),
            lost.join(", ")
        );
    }
}

/// Start-up (exec to attached, from -v) and peak memory, five starts of each mode.
fn print_host_startup(modes: &[String]) {
    println!("\nstart-up (exec to attached, from -v) and peak memory (VmHWM), 5 starts each:");
    for mode in modes {
        let mut ms = Vec::new();
        let mut rss = Vec::new();
        for _ in 0..5 {
            let (t, r) = startup(mode);
            ms.push(t);
            rss.push(r);
        }
        println!(
            "  {mode:<12} attached in {:.1} ms (median), peak RSS {:.1} MB (max)",
            median(&ms),
            rss.iter().cloned().fold(0.0, f64::max) / 1024.0
        );
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn features() -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["--features", "--json"])
        .output()
        .expect("run tcpconnlat");
    serde_json::from_slice(&out.stdout).expect("--features --json")
}

/// Where a storm goes, and from how many client threads. One listener per client thread:
/// each thread accepts its own connects (a shared accept thread falls behind under load,
/// overflows the accept queue and turns connects into 1 s SYN retransmits). Clients connect from 250 source addresses in turn: each has its own
/// ephemeral ports, so hundreds of thousands of connects never meet an old connection's
/// TIME_WAIT.
struct Server {
    name: String,
    listeners: Arc<Vec<TcpListener>>,
    sources: Arc<Vec<Ipv4Addr>>,
    _veth: Option<Veth>,
}

impl Server {
    /// On 127.0.0.1, from 127.0.0.2 to 127.0.0.251.
    fn loopback(clients: usize) -> Server {
        let listeners = (0..clients)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        Server {
            name: Server::name("loopback", clients),
            listeners: Arc::new(listeners),
            sources: Arc::new((2..252).map(|n| Ipv4Addr::new(127, 0, 0, n)).collect()),
            _veth: None,
        }
    }

    /// In a network namespace at the far end of a veth pair, from 250 addresses on the
    /// near end.
    fn veth(clients: usize) -> Server {
        let veth = Veth::create();
        let ns = std::fs::File::open(format!("/run/netns/{}", veth.ns)).expect("open the netns");
        // A thread that enters the namespace creates the listeners there; they stay in it.
        let listeners = thread::spawn(move || {
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            (0..clients)
                .map(|_| TcpListener::bind((Veth::FAR, 0)).expect("listen in the netns"))
                .collect()
        })
        .join()
        .unwrap();
        Server {
            name: Server::name("veth", clients),
            listeners: Arc::new(listeners),
            sources: Arc::new(Veth::near()),
            _veth: Some(veth),
        }
    }

    fn name(network: &str, clients: usize) -> String {
        match clients {
            1 => format!("{network}, 1 client"),
            n => format!("{network}, {n} clients"),
        }
    }

    /// Their ports, comma-separated for --dport.
    fn ports(&self) -> String {
        let ports: Vec<String> = self
            .listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port().to_string())
            .collect();
        ports.join(",")
    }
}

/// `n` connects, accepts and closes from the server's client threads; the wall time.
fn storm(server: &Server, n: usize) -> Duration {
    let left = Arc::new(AtomicUsize::new(n));
    let start = Instant::now();
    let workers: Vec<_> = (0..server.listeners.len())
        .map(|i| {
            let left = left.clone();
            let listeners = server.listeners.clone();
            let sources = server.sources.clone();
            thread::spawn(move || {
                let listener = &listeners[i];
                let to = listener.local_addr().unwrap();
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
                    .is_ok()
                {
                    let client = connect_from(next_source(&sources), to);
                    let (accepted, _) = listener.accept().expect("accept");
                    drop(client);
                    drop(accepted);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    start.elapsed()
}

/// The next source address, in turn.
fn next_source(sources: &[Ipv4Addr]) -> Ipv4Addr {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    sources[NEXT.fetch_add(1, Ordering::Relaxed) % sources.len()]
}

/// A veth pair into a namespace of our own, removed (with the pair) when dropped.
struct Veth {
    ns: String,
}

impl Veth {
    /// The listeners' address, in the namespace.
    const FAR: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);

    /// The clients' addresses, on the near end.
    fn near() -> Vec<Ipv4Addr> {
        (1..251).map(|n| Ipv4Addr::new(10, 231, 1, n)).collect()
    }

    fn create() -> Veth {
        let id = std::process::id();
        let veth = Veth {
            ns: format!("tcpconnlat-bench-{id}"),
        };
        let (near, far) = (format!("tclbn{id}"), format!("tclbf{id}"));
        let mut batch = vec![
            format!("netns add {}", veth.ns),
            format!(
                "link add {near} type veth peer name {far} netns {}",
                veth.ns
            ),
            format!("link set {near} up"),
            format!("-n {} link set lo up", veth.ns),
            format!("-n {} link set {far} up", veth.ns),
            format!("-n {} addr add {}/16 dev {far}", veth.ns, Veth::FAR),
        ];
        batch.extend(
            Veth::near()
                .iter()
                .map(|a| format!("addr add {a}/16 dev {near}")),
        );
        for command in batch {
            let args: Vec<&str> = command.split_whitespace().collect();
            let status = Command::new("ip").args(&args).status().expect("run ip");
            assert!(status.success(), "ip {command} failed");
        }
        veth
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Deleting one end removes the pair at once (the namespace's teardown is lazy).
        let near = format!("tclbn{}", std::process::id());
        let _ = Command::new("ip").args(["link", "del", &near]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// One blocking connect from `source`.
fn connect_from(source: Ipv4Addr, to: SocketAddr) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(to) = to else {
        unreachable!("the server is on 127.0.0.1")
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(source, 0)),
    )
    .expect("bind a loopback source");
    connect(fd.as_raw_fd(), &SockaddrIn::from(to)).expect("connect");
    fd
}

enum Setup {
    Nothing,
    /// Empty programs on a mode's hooks.
    Floor(String),
    /// Mode, transport, and whether events reach the output.
    Tracer(String, &'static str, bool),
}

impl Setup {
    fn name(&self) -> String {
        match self {
            Setup::Nothing => "no tracer".into(),
            Setup::Floor(mode) => format!("empty programs ({mode} hooks)"),
            Setup::Tracer(mode, transport, true) => {
                format!("tcpconnlat --mode {mode} --transport {transport}")
            }
            Setup::Tracer(mode, transport, false) => {
                format!("tcpconnlat --mode {mode} --transport {transport}, no output")
            }
        }
    }
}

/// One storm under `setup`: microseconds per connect, and for tcpconnlat (connects made,
/// events it showed, its CPU share).
fn measure(setup: &Setup, server: &Server) -> (f64, Option<(usize, usize, f64)>) {
    let per_connect = |d: Duration| d.as_secs_f64() * 1e6 / connects() as f64;
    match setup {
        Setup::Nothing => (per_connect(storm(server, connects())), None),
        Setup::Floor(mode) => {
            let _floor = Floor::attach(mode);
            (per_connect(storm(server, connects())), None)
        }
        Setup::Tracer(mode, transport, shown) => {
            // Port 1: nothing connects there, so the final --dport check drops every event.
            let ports = if *shown { server.ports() } else { "1".into() };
            let tracer = Tracer::start(mode, transport, &ports, &[]);
            let took = storm(server, connects());
            (per_connect(took), Some(tracer.finish(connects())))
        }
    }
}

/// Empty programs on a mode's hooks.
struct Floor {
    _links: Vec<Link>,
    _object: libbpf_rs::Object,
}

impl Floor {
    /// On the hooks of `mode` (as compat's tables give them) that the empty object has a
    /// program for: the storm connects over IPv4 only, so tcp_v6_connect's are left out.
    fn attach(mode: &str) -> Floor {
        let mode: tcpconnlat_compat::Mode = mode.parse().expect("a mode name");
        let wanted: Vec<&str> = mode
            .spec()
            .hooks
            .iter()
            .filter_map(|h| empty_program(h.attach))
            .collect();
        let mut open = ObjectBuilder::default()
            .open_memory(probes::bytes(tcpconnlat_compat::ProbeObject::Empty))
            .unwrap();
        for mut prog in open.progs_mut() {
            let name = prog.name().to_string_lossy().into_owned();
            prog.set_autoload(wanted.contains(&name.as_str()));
        }
        let object = open.load().expect("load the empty programs");
        let links = object
            .progs_mut()
            .filter(|p| p.autoload())
            .map(|p| p.attach().expect("attach an empty program"))
            .collect();
        Floor {
            _links: links,
            _object: object,
        }
    }
}

/// The empty object's program on `attach`, if it has one.
fn empty_program(attach: tcpconnlat_compat::Attach) -> Option<&'static str> {
    use tcpconnlat_compat::{Attach::*, Func::TcpV4Connect, Tracepoint::*};
    Some(match attach {
        Fentry(TcpV4Connect) => "empty_fentry_v4_connect",
        Kprobe(TcpV4Connect) => "empty_kprobe_v4_connect",
        Tracepoint(State) => "empty_state",
        RawTracepoint(State) => "empty_raw_state",
        BtfTracepoint(State) => "empty_btf_state",
        Tracepoint(Retransmit) => "empty_retransmit",
        Tracepoint(Reset) => "empty_reset",
        _ => return None,
    })
}

/// tcpconnlat in one mode, its JSON lines counted (only the benchmark server's port).
struct Tracer {
    child: Child,
    /// Its stdout: a file, so that no reader of ours competes with the storm for CPU.
    output: tempfile::NamedTempFile,
    cpu_start: f64,
    started: Instant,
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tracer {
    fn start(mode: &str, transport: &str, ports: &str, extra: &[&str]) -> Tracer {
        let output = tempfile::NamedTempFile::new().expect("a temporary file");
        let mut child = Command::new(BIN)
            .args(["--json", "--mode", mode, "--transport", transport])
            .args(["--dport", ports])
            .args(extra)
            .stdout(output.reopen().expect("reopen the output file"))
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tcpconnlat");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let mut lines = stderr.lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("Tracing") => break,
                Some(Ok(_)) => {}
                _ => panic!("tcpconnlat --mode {mode} did not start"),
            }
        }
        // Loss is counted from the events seen; the rest of what it says is shown.
        thread::spawn(move || {
            lines
                .map_while(Result::ok)
                .filter(|l| !l.starts_with("tcpconnlat: lost "))
                .for_each(|l| eprintln!("  tracer: {l}"))
        });
        let cpu_start = cpu_seconds(child.id());
        Tracer {
            child,
            output,
            cpu_start,
            started: Instant::now(),
        }
    }

    /// (connects made, events seen, CPU share) once it has shown everything and exited.
    fn finish(mut self, made: usize) -> (usize, usize, f64) {
        let cpu = cpu_seconds(self.child.id()) - self.cpu_start;
        let share = cpu / self.started.elapsed().as_secs_f64();
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let _ = self.child.wait();
        let seen = BufReader::new(self.output.reopen().expect("reopen the output file"))
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.contains("\"type\":\"connect\""))
            .count();
        (made, seen, share)
    }
}

/// Kernel accounting of BPF program run time, on while this lives (BPF_ENABLE_STATS: it
/// ends with the descriptor, whatever becomes of this process).
struct BpfStats {
    _on: std::os::fd::OwnedFd,
}

impl BpfStats {
    fn enable() -> BpfStats {
        BpfStats::try_enable()
            .unwrap_or_else(|| panic!("BPF_ENABLE_STATS: {}", std::io::Error::last_os_error()))
    }

    /// None where the kernel cannot (before 5.8).
    fn try_enable() -> Option<BpfStats> {
        use libbpf_rs::libbpf_sys;
        use std::os::fd::FromRawFd;
        // SAFETY: a plain syscall wrapper; a non-negative result is a new descriptor.
        let fd = unsafe { libbpf_sys::bpf_enable_stats(libbpf_sys::BPF_STATS_RUN_TIME) };
        // SAFETY: the descriptor was just created and nothing else owns it.
        (fd >= 0).then(|| BpfStats {
            _on: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Nanoseconds the BPF programs held by `pid` ran per connect of one storm.
    fn per_connect(&self, pid: u32, server: &Server) -> f64 {
        self.by_program(pid, server).iter().map(|p| p.ns).sum()
    }

    /// The same, program by program: what each costs a connect, and how often it runs.
    fn by_program(&self, pid: u32, server: &Server) -> Vec<ProgramRun> {
        let before = prog_runs(pid);
        storm(server, connects());
        let n = connects() as f64;
        let mut runs: Vec<ProgramRun> = prog_runs(pid)
            .into_iter()
            .map(|(id, (name, ns, cnt))| {
                let (ns0, cnt0) = before.get(&id).map_or((0, 0), |(_, ns, cnt)| (*ns, *cnt));
                ProgramRun {
                    name,
                    ns: (ns - ns0) as f64 / n,
                    runs: (cnt - cnt0) as f64 / n,
                }
            })
            .collect();
        runs.sort_by(|a, b| b.ns.total_cmp(&a.ns));
        runs
    }
}

/// One BPF program's share of a storm, per connect.
struct ProgramRun {
    name: String,
    ns: f64,
    runs: f64,
}

/// Every BPF program `pid` holds: id → (name, run_time_ns, run_cnt).
fn prog_runs(pid: u32) -> std::collections::HashMap<u32, (String, u64, u64)> {
    fdinfos(pid)
        .expect("read the fdinfo directory")
        .iter()
        .filter_map(|info| {
            let id = fdinfo_field(info, "prog_id:")? as u32;
            let ns = fdinfo_field(info, "run_time_ns:")?;
            let cnt = fdinfo_field(info, "run_cnt:")?;
            Some((id, (prog_name(id), ns, cnt)))
        })
        .collect()
}

/// A BPF program's name, by id.
fn prog_name(id: u32) -> String {
    use libbpf_rs::libbpf_sys;
    // SAFETY: plain syscall wrappers on a fd we own and close; info is zeroed and sized.
    unsafe {
        let fd = libbpf_sys::bpf_prog_get_fd_by_id(id);
        if fd < 0 {
            return format!("prog {id}");
        }
        let mut info: libbpf_sys::bpf_prog_info = std::mem::zeroed();
        let mut len = std::mem::size_of_val(&info) as u32;
        let rc = libbpf_sys::bpf_prog_get_info_by_fd(fd, &mut info, &mut len);
        libc::close(fd);
        if rc != 0 {
            return format!("prog {id}");
        }
        let name = std::ffi::CStr::from_ptr(info.name.as_ptr());
        name.to_string_lossy().into_owned()
    }
}

/// One counter (e.g. "run_cnt:") of every BPF program `pid` holds a descriptor of, from
/// its fdinfo.
fn prog_fdinfo(pid: u32, field: &str) -> std::io::Result<Vec<u64>> {
    Ok(fdinfos(pid)?
        .iter()
        .filter_map(|info| fdinfo_field(info, field))
        .collect())
}

/// The fdinfo text of every descriptor `pid` holds.
fn fdinfos(pid: u32) -> std::io::Result<Vec<String>> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .collect())
}

/// One numeric field (e.g. "run_cnt:") of an fdinfo text.
fn fdinfo_field(info: &str, field: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// Peak RSS (VmHWM) of `pid` so far, in kB.
fn peak_rss_kb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Milliseconds from exec to attached (-v), and peak RSS in kB.
fn startup(mode: &str) -> (f64, f64) {
    let mut child = Command::new(BIN)
        .args(["-v", "--mode", mode, "-d", "0.5"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tcpconnlat");
    let pid = child.id();
    let mut ms = f64::NAN;
    let mut rss = 0.0;
    for line in BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        if let Some(rest) = line.strip_prefix("tcpconnlat: attached ") {
            ms = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
            rss = peak_rss_kb(pid);
        }
    }
    let _ = child.wait();
    (ms, rss)
}
