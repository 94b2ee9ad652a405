//! A tracer left running in production: SYN floods, bursts beyond its buffer, signals at
//! any moment, and what it keeps of its privileges. Real probes, real sockets.

mod support;

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn};
use nix::unistd::Pid;
use serde_json::Value;
use support::*;

fn records<'a>(all: &'a [Value], kind: &str) -> Vec<&'a Value> {
    all.iter().filter(|v| v["type"] == kind).collect()
}

fn counted(all: &[Value], kind: &str) -> u64 {
    records(all, kind)
        .iter()
        .map(|v| v["count"].as_u64().unwrap())
        .sum()
}

/// `n` non-blocking connects from namespace `ns` to `server`, all left waiting for an
/// answer, each sending its SYN again `syn_retries` times before it times out (1: about
/// 3 s after it began); the sockets are returned so that the caller decides when they close.
fn flood(ns: &str, server: SocketAddr, n: usize, syn_retries: u8) -> Vec<OwnedFd> {
    assert!(
        n <= flood_size(),
        "RLIMIT_NOFILE does not allow {n} sockets"
    );
    let SocketAddr::V4(v4) = server else {
        unreachable!()
    };
    NetPair::within(ns, move || {
        // A source port for each of them (one destination).
        fs::write("/proc/sys/net/ipv4/ip_local_port_range", "10000 65000").unwrap();
        (0..n)
            .map(|_| {
                let fd = socket::socket(
                    AddressFamily::Inet,
                    SockType::Stream,
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                    None,
                )
                .expect("socket");
                // SYNs sent before giving up, for this socket (the sysctl is not per
                // network namespace before 4.6).
                let retries = libc::c_int::from(syn_retries);
                // SAFETY: a valid socket and an int option.
                let rc = unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::IPPROTO_TCP,
                        libc::TCP_SYNCNT,
                        (&retries as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                assert_eq!(rc, 0, "TCP_SYNCNT: {}", std::io::Error::last_os_error());
                match socket::connect(fd.as_raw_fd(), &SockaddrIn::from(v4)) {
                    Err(nix::errno::Errno::EINPROGRESS) => fd,
                    other => panic!("non-blocking connect: {other:?}"),
                }
            })
            .collect()
    })
}

/// How many IPv4 TCP sockets of namespace `ns` are in each state (/proc/net/tcp codes).
fn tcp_states(ns: &str) -> std::collections::BTreeMap<String, usize> {
    let table = NetPair::within(ns, || {
        fs::read_to_string(format!("/proc/self/task/{}/net/tcp", nix::unistd::gettid())).unwrap()
    });
    let mut states = std::collections::BTreeMap::new();
    for line in table.lines().skip(1) {
        if let Some(state) = line.split_whitespace().nth(3) {
            *states.entry(state.to_owned()).or_insert(0) += 1;
        }
    }
    states
}

/// How many sockets to flood with: 30,000, or as many as this process may open (raising
/// the hard limit needs CAP_SYS_RESOURCE), leaving room for everything else.
fn flood_size() -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    const WANTED: u64 = 30_000;
    if setrlimit(Resource::RLIMIT_NOFILE, WANTED + 1000, WANTED + 1000).is_err() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    (soft.saturating_sub(1000)).min(WANTED) as usize
}

/// Under QEMU's software emulation (the matrix VMs set TCPCONNLAT_EMULATED) a BPF program
/// runs hundreds of times slower, so fewer connects fit in the test's time.
fn emulated() -> bool {
    std::env::var_os("TCPCONNLAT_EMULATED").is_some()
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn a_syn_flood_is_reported_in_full_as_timeouts_with_flat_memory() {
    let _serial = serial();
    let f = features();
    let modes: Vec<&str> = ["fentry", "kprobe", "tracepoint", "legacy"]
        .into_iter()
        .filter(|m| usable(&f, m))
        .collect();
    assert!(!modes.is_empty(), "no usable mode: {f}");
    for mode in modes {
        syn_flood_in(mode, f["on_demand"] == true);
    }
}

/// Every connect of a SYN flood is in flight at once, and every one is reported as a
/// timeout: seen by a probe, or found ended by the sweeper where the kernel ran no probe
/// for its end (`on_demand`: where it can ask). None is missed but where the kernel
/// cannot be asked and says it skipped our programs (under emulation).
fn syn_flood_in(mode: &str, on_demand: bool) {
    let (n, least) = if emulated() {
        (flood_size().min(5_000), 5_000)
    } else {
        (flood_size(), 10_000)
    };
    assert!(n >= least, "RLIMIT_NOFILE allows only {n} sockets");
    let net = NetPair::new();
    let server: SocketAddr = format!("{}:7", net.server_v4()).parse().unwrap();
    net.drop_syns(server.port(), false);
    let me = me();
    // Where the sweeper cannot ask, entries no probe finished are swept and reported
    // within the test, not after 15 minutes; a connect here ends about 3 s after its SYN.
    let args = [
        "--mode",
        mode,
        "--json",
        "-p",
        &me,
        "--max-pending",
        "32768",
        "--sweep-after",
        "1",
        "--stale-after",
        "30",
    ];
    let tracer = Tracer::start(&args);
    let rss_before = rss_anon_kb(tracer.pid());

    // From one CPU: their timers, and so their ends, are that CPU's, as a flood from one
    // busy process is; where ends that do not fit are lost, one CPU's buffer must hold
    // them all.
    let pinned = PinnedToCpu0::new();
    let started = Instant::now();
    let sockets = flood(&net.a, server, n, 1);
    let made = started.elapsed();
    drop(pinned);
    // Every connect is in flight at once, and the table holds them all (until the first
    // ones time out, 3 s after their SYN: a slow machine may not get them all out by then).
    let all_at_once = made < Duration::from_millis(2500);
    if all_at_once {
        assert_eq!(tracer.map_entries("pending"), n, "{mode}");
    } else {
        eprintln!("{mode}: the flood took {made:?}: not checking that all were in flight at once");
    }

    // The reader stalls (a busy host) while the flood times out: every end waits in the
    // buffer, or is kept where the kernel can be asked.
    let pid = Pid::from_raw(tracer.pid() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let stall = Duration::from_secs(if emulated() { 150 } else { 60 });
    while tcp_states(&net.a).contains_key("02") && started.elapsed() < stall {
        thread::sleep(Duration::from_millis(200));
    }
    kill(pid, Signal::SIGCONT).unwrap();

    // Counted as they come (looking at every event each time would be quadratic).
    let mut answered = 0;
    let wait = Duration::from_secs(if emulated() { 150 } else { 60 });
    let all = tracer.events_until(wait, |ev| {
        answered += match ev.last() {
            Some(e) if e["type"] == "connect" || e["type"] == "lost" => 1,
            Some(e) if e["type"] == "missed" => e["count"].as_u64().unwrap() as usize,
            _ => 0,
        };
        answered >= n
    });
    let events = records(&all, "connect");
    let missed = counted(&all, "missed") as usize;
    let inferred = events.iter().filter(|e| e["end"] != "seen").count();
    let uncounted = events
        .iter()
        .filter(|e| e["syn_retrans"].as_u64() < Some(1))
        .count();
    let skipped = skipped_runs(tracer.pid());
    // The sockets still open by TCP state tell a missed end (none left in SYN_SENT) from a
    // connect the kernel had not yet ended when it was swept (some left there).
    eprintln!(
        "{mode}: {n} connects made in {made:?}; {} reported ({inferred} of them found ended by \
         the sweeper, {uncounted} without their SYN retransmit), {missed} missed, after {:?}; \
         the kernel skipped {skipped} runs of the tracer's programs; sockets in namespace a \
         by TCP state (hex): {:?}",
        events.len(),
        started.elapsed(),
        tcp_states(&net.a)
    );
    assert_eq!(counted(&all, "lost"), 0, "{mode}: events were lost");
    assert_eq!(counted(&all, "untracked"), 0, "{mode}");
    // The kernel runs no probe for some ends (it skips a program that would nest in
    // another on the same CPU; some kernels drop whole batches of timer work): where it
    // can be asked, the sweeper finds each of them ended. Where it cannot (before 5.10),
    // such an end is missed: allowed only under emulation, where programs run hundreds of
    // times slower, and only as far as the kernel counted the runs it skipped.
    if on_demand || !emulated() {
        assert_eq!(
            missed, 0,
            "{mode}: ends were missed (on_demand {on_demand})"
        );
    } else {
        assert!(
            missed as u64 <= skipped,
            "{mode}: {missed} missed, but the kernel skipped only {skipped} runs"
        );
    }
    assert_eq!(
        events.len() + missed,
        n,
        "{mode}: {} still pending in the tracer; sockets in namespace a by TCP state (hex): {:?}; tracer stderr: {}",
        tracer.map_entries("pending"),
        tcp_states(&net.a),
        tracer.stderr.lock().unwrap()
    );
    for e in &events {
        assert_eq!(e["outcome"], "timeout", "{mode}: {e}");
        assert_eq!(e["daddr"], net.server_v4(), "{mode}: {e}");
        if e["end"] != "seen" {
            // The sweeper found it ended: when it was last pending, and by when it ended.
            let (min, lat) = (
                e["lat_min_ms"].as_f64().unwrap(),
                e["lat_ms"].as_f64().unwrap(),
            );
            assert!(min <= lat && lat >= 1000.0, "{mode}: {e}");
        }
    }
    // Asked for one retry; kernels differ in how many SYNs fit before they give up. The
    // kernel skips retransmit probes as it does the others, and nothing finds those again.
    assert!(
        uncounted <= n / 4,
        "{mode}: {uncounted} SYN retransmits not counted"
    );
    // While all are in flight each holds its own port; on a machine too slow for that,
    // ports of connects that already timed out are taken again.
    if all_at_once {
        let ports: HashSet<_> = events.iter().map(|e| e["lport"].as_u64()).collect();
        assert_eq!(
            ports.len(),
            events.len(),
            "{mode}: some connect was reported twice"
        );
    }
    assert_eq!(
        tracer.map_entries("pending"),
        0,
        "{mode}: entries outlived their sockets"
    );
    let rss_after = rss_anon_kb(tracer.pid());
    eprintln!(
        "{mode}: tracer anonymous RSS {rss_before} kB before the flood, {rss_after} kB after"
    );
    assert!(
        rss_after < rss_before + 8 * 1024,
        "{mode}: tracer memory grew from {rss_before} to {rss_after} kB"
    );
    drop(sockets);
    assert!(tracer.interrupt().success());
}

/// A BPF program of the test's own that spins (a bounded loop, Linux 5.3+) whenever a
/// socket moves into SYN_SENT (`sock:inet_sock_set_state`, inside connect(), interrupts
/// on). While it runs, the kernel runs no other kprobe or tracepoint program on that CPU:
/// a timer interrupt landing there runs a batch of timeouts whose ends no probe of the
/// tracer sees, as any slow BPF tool on a host can cause. Raw tracepoint programs (the
/// state machine of fentry and kprobe modes) run all the same. Detached when dropped.
struct Spinner {
    _events: Vec<OwnedFd>,
    _prog: OwnedFd,
}

impl Spinner {
    fn attach() -> Result<Spinner, String> {
        use libbpf_rs::libbpf_sys as sys;
        use std::os::fd::FromRawFd;
        let insn = |code: u32, dst: u8, off: i16, imm: i32| {
            let mut i = sys::bpf_insn {
                code: code as u8,
                off,
                imm,
                ..Default::default()
            };
            i.set_dst_reg(dst);
            i
        };
        let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .into_iter()
            .find(|d| fs::metadata(format!("{d}/events/sock/inet_sock_set_state")).is_ok())
            .ok_or("no sock:inet_sock_set_state tracepoint")?;
        let event = format!("{tracefs}/events/sock/inet_sock_set_state");
        let format = fs::read_to_string(format!("{event}/format")).unwrap();
        let newstate: i16 = format
            .lines()
            .find(|l| l.contains(" newstate;"))
            .and_then(|l| l.split("offset:").nth(1)?.split(';').next()?.parse().ok())
            .ok_or("no newstate in the tracepoint's format")?;
        // if newstate != SYN_SENT goto out; r0 = 0; loop: r0 += 1; if r0 < 200000 goto
        // loop; out: r0 = 0; exit
        let mut load = insn(sys::BPF_LDX | sys::BPF_MEM | sys::BPF_W, 2, newstate, 0);
        load.set_src_reg(1);
        let insns = [
            load,
            insn(sys::BPF_JMP | sys::BPF_JNE | sys::BPF_K, 2, 3, 2),
            insn(sys::BPF_ALU64 | sys::BPF_MOV | sys::BPF_K, 0, 0, 0),
            insn(sys::BPF_ALU64 | sys::BPF_ADD | sys::BPF_K, 0, 0, 1),
            insn(sys::BPF_JMP | sys::BPF_JLT | sys::BPF_K, 0, -2, 200_000),
            insn(sys::BPF_ALU64 | sys::BPF_MOV | sys::BPF_K, 0, 0, 0),
            insn(sys::BPF_JMP | sys::BPF_EXIT, 0, 0, 0),
        ];
        // SAFETY: valid pointers for the call; a new fd or -errno.
        let prog = unsafe {
            sys::bpf_prog_load(
                sys::BPF_PROG_TYPE_TRACEPOINT,
                c"test_spinner".as_ptr(),
                c"GPL".as_ptr(),
                insns.as_ptr(),
                insns.len() as _,
                std::ptr::null_mut(),
            )
        };
        if prog < 0 {
            return Err(format!(
                "loading it: {}",
                std::io::Error::from_raw_os_error(-prog)
            ));
        }
        // SAFETY: just created, owned by nothing else.
        let prog = unsafe { OwnedFd::from_raw_fd(prog) };
        let id = fs::read_to_string(format!("{event}/id")).unwrap();
        let mut attr = sys::perf_event_attr {
            type_: sys::PERF_TYPE_TRACEPOINT,
            size: std::mem::size_of::<sys::perf_event_attr>() as u32,
            config: id.trim().parse().unwrap(),
            ..Default::default()
        };
        attr.__bindgen_anon_1.sample_period = 1;
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        let mut events = Vec::new();
        for cpu in 0..cpus as i32 {
            // SAFETY: perf_event_open with a valid attr; a new fd or -1.
            let fd = unsafe {
                libc::syscall(libc::SYS_perf_event_open, &attr, -1, cpu, -1, 8u64)
                // PERF_FLAG_FD_CLOEXEC
            };
            if fd < 0 {
                return Err(format!(
                    "perf_event_open: {}",
                    std::io::Error::last_os_error()
                ));
            }
            // SAFETY: just created.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            // SAFETY: ioctls on the perf event with the program's fd.
            unsafe {
                libc::ioctl(fd.as_raw_fd(), 0x4004_2408, prog.as_raw_fd()); // PERF_EVENT_IOC_SET_BPF
                libc::ioctl(fd.as_raw_fd(), 0x2400, 0); // PERF_EVENT_IOC_ENABLE
            }
            events.push(fd);
        }
        Ok(Spinner {
            _events: events,
            _prog: prog,
        })
    }

    /// Keep it spinning on every CPU until `until`: threads connect to a closed port on
    /// loopback, again and again.
    fn spin_until(&self, until: Instant) {
        let cpus = thread::available_parallelism().map_or(2, |n| n.get());
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = closed.local_addr().unwrap();
        drop(closed);
        thread::scope(|s| {
            for _ in 0..cpus {
                s.spawn(|| {
                    while Instant::now() < until {
                        let _ = TcpStream::connect(to);
                    }
                });
            }
        });
    }
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn ends_the_kernel_shows_no_probe_are_found_by_the_sweeper() {
    let _serial = serial();
    let features = features();
    let on_demand = features["on_demand"] == true;
    // A mode whose state machine the spinner holds back: not fentry's or kprobe's, on the
    // raw tracepoint.
    let mode = if usable(&features, "tracepoint") {
        "tracepoint"
    } else {
        "legacy"
    };
    let spinner = match Spinner::attach() {
        Ok(spinner) => spinner,
        // Before 5.3 (no bounded loop) ends are not recovered either: the tracer says so.
        Err(why) => {
            assert!(!on_demand, "the test's spinning program: {why}");
            let (status, _, err) = run(&["-d", "1"]);
            assert!(status.success(), "{err}");
            assert!(
                err.contains("reported only after 15 minutes, as missed"),
                "{err}"
            );
            return;
        }
    };
    let n = 2_000;
    let net = NetPair::new();
    let server: SocketAddr = format!("{}:7", net.server_v4()).parse().unwrap();
    net.drop_syns(server.port(), false);
    let me = me();
    // Only the flood's port: the spinning threads connect elsewhere.
    let tracer = Tracer::start(&[
        "--mode",
        mode,
        "--json",
        "-p",
        &me,
        "--dport",
        "7",
        "--sweep-after",
        "1",
        "--stale-after",
        "30",
    ]);
    let started = Instant::now();
    let sockets = flood(&net.a, server, n, 1);
    // They give up 3 s after their SYNs (one retry): spin meanwhile.
    let timeouts = Duration::from_secs(3);
    thread::sleep((timeouts - Duration::from_millis(500)).saturating_sub(started.elapsed()));
    spinner.spin_until(started + timeouts + Duration::from_secs(2));
    drop(spinner);
    let mut answered = 0;
    let wait = Duration::from_secs(if emulated() { 150 } else { 60 });
    let all = tracer.events_until(wait, |ev| {
        answered += match ev.last() {
            Some(e) if e["type"] == "connect" => 1,
            Some(e) if e["type"] == "missed" => e["count"].as_u64().unwrap() as usize,
            _ => 0,
        };
        answered >= n
    });
    let events = records(&all, "connect");
    let found = events.iter().filter(|e| e["end"] != "seen").count();
    let missed = counted(&all, "missed") as usize;
    eprintln!(
        "{} reported ({found} found ended by the sweeper), {missed} missed (on_demand {on_demand})",
        events.len()
    );
    assert_eq!(events.len() + missed, n, "every connect is accounted for");
    // Else the spinning kept no end from a probe, and this proved nothing.
    assert!(found + missed > 0, "the kernel ran a probe for every end");
    if on_demand {
        assert_eq!(missed, 0, "ends were missed though the sweeper can ask");
    } else {
        assert_eq!(found, 0, "ends found by a sweeper that cannot ask");
    }
    for e in &events {
        assert_eq!(e["outcome"], "timeout", "{e}");
        assert_eq!(e["dport"], 7, "{e}");
    }
    assert_eq!(tracer.map_entries("pending"), 0);
    drop(sockets);
    assert!(tracer.interrupt().success());
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn connects_beyond_max_pending_are_counted_not_lost_silently() {
    let _serial = serial();
    let net = NetPair::new();
    let server: SocketAddr = format!("{}:7", net.server_v4()).parse().unwrap();
    net.drop_syns(server.port(), false);
    let (room, n) = (1000, 3000);
    let tracer = Tracer::start(&["--json", "-p", &me(), "--max-pending", &room.to_string()]);
    // Exact by construction: no connect may end while the flood is still being made (an
    // entry freed early would let a later connect be timed), however slow the machine, so
    // none times out for a minute; then closing them all ends the timed ones at once.
    let sockets = flood(&net.a, server, n, 5);
    assert_eq!(tracer.map_entries("pending"), room);
    drop(sockets);
    let mut timed = 0;
    let all = tracer.events_until(Duration::from_secs(30), |ev| {
        timed += usize::from(ev.last().is_some_and(|e| e["type"] == "connect"));
        timed >= room
    });
    // The counter is read as the stream drains: what is left over arrives with the last
    // events or just after.
    let mut all = all;
    all.extend(tracer.events_until(Duration::from_secs(2), |ev| counted(ev, "untracked") > 0));
    assert_eq!(records(&all, "connect").len(), room);
    assert_eq!(counted(&all, "untracked") as usize, n - room);
    // Said on stderr too, as they are found (one line per read of the counter).
    let said = |stderr: &str| -> usize {
        let tail = format!(
            " connects not traced: more than {room} were waiting for an answer (raise --max-pending)"
        );
        stderr
            .lines()
            .filter_map(|l| l.strip_prefix("tcpconnlat: ")?.strip_suffix(&tail))
            .map(|count| count.parse::<usize>().unwrap())
            .sum()
    };
    let stderr = tracer.stderr_until(Duration::from_secs(2), |s| said(s) >= n - room);
    assert_eq!(said(&stderr), n - room, "{stderr}");
    assert!(tracer.interrupt().success());
}

/// A burst the event buffer has no room for: where the sweeper can ask the kernel about a
/// connect (Linux 5.10+), the probes keep each end they could not send in its connect's
/// entry and the sweeper reports it, so none is lost; elsewhere each one lost is counted.
/// Tracing goes on after it either way.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn a_burst_beyond_the_buffer_is_kept_or_counted_and_tracing_goes_on() {
    let _serial = serial();
    let server = listen("127.0.0.1:0");
    let after_server = listen("127.0.0.1:0");
    let (_, features, _) = run(&["--features", "--json"]);
    let features: serde_json::Value = serde_json::from_str(&features).unwrap();
    for transport in ["ringbuf", "perfbuf"] {
        if transport == "ringbuf" && features["ringbuf"] != true {
            // Before Linux 5.8: the user is told to use the perf buffer.
            let (status, _, err) = run(&["--transport", "ringbuf", "-d", "1"]);
            assert_eq!(status.code(), Some(1), "{err}");
            assert_eq!(
                err.trim(),
                "tcpconnlat: this kernel has no BPF ring buffer (Linux 5.8+): use --transport perfbuf"
            );
            continue;
        }
        // One page: a few dozen events, in the ring or in each CPU's perf buffer.
        let tracer = Tracer::start(&[
            "--json",
            "-p",
            &me(),
            "--buffer-pages",
            "1",
            "--transport",
            transport,
        ]);
        let pid = Pid::from_raw(tracer.pid() as i32);
        // On one CPU, so that the burst fills that CPU's buffer alone: kernels before 5.4
        // tell of a perf sample that did not fit only when the next one is written there
        // (the perf LOST record), and none may come: the probes' count of the samples they
        // sent must tell before any does. The connects after the burst then show that
        // tracing goes on.
        let _pinned = PinnedToCpu0::new();
        kill(pid, Signal::SIGSTOP).unwrap();
        let burst = 500;
        // Held open until the events are read: the ports tell the connects apart, and a
        // port the burst had closed could be given again to a later connect of the burst
        // (seen under emulation, where a burst lasts seconds).
        let held: Vec<TcpStream> = (0..burst).map(|_| connect_held(server)).collect();
        kill(pid, Signal::SIGCONT).unwrap();
        let burst_ports: HashSet<u16> = held.iter().map(local_port).collect();
        assert_eq!(
            burst_ports.len(),
            burst,
            "ports of open sockets are distinct"
        );
        let mut all = tracer.events_until(Duration::from_secs(10), |ev| {
            records(ev, "connect").len() + counted(ev, "lost") as usize >= burst
        });
        let accounted = records(&all, "connect").len() + counted(&all, "lost") as usize;
        assert_eq!(
            accounted, burst,
            "{transport}: the burst not all shown or counted before another sample came"
        );
        // To another listener: a port of the burst may be taken again by these.
        let after: Vec<u16> = (0..3)
            .map(|_| {
                thread::sleep(Duration::from_millis(200));
                connect(after_server)
            })
            .collect();
        all.extend(tracer.events_until(Duration::from_secs(10), |ev| {
            let ports: HashSet<u64> = records(ev, "connect")
                .iter()
                .filter_map(|e| e["lport"].as_u64())
                .collect();
            after.iter().all(|p| ports.contains(&u64::from(*p)))
        }));
        let connects = records(&all, "connect");
        let port = |e: &&Value| e["lport"].as_u64().unwrap() as u16;
        let seen = connects
            .iter()
            .filter(|e| e["dport"].as_u64() == Some(server.port().into()))
            .count();
        let lost = counted(&all, "lost") as usize;
        if features["on_demand"] == true {
            let kept = tracer.counter(Counter::COUNTER_KEPT) as usize;
            assert!(kept > 0, "{transport}: nothing kept with one page");
            assert_eq!(lost, 0, "{transport}: {kept} kept, yet some lost");
            assert_eq!(seen, burst, "{transport}: {kept} kept");
            let of_burst: Vec<_> = connects
                .iter()
                .filter(|e| e["dport"].as_u64() == Some(server.port().into()))
                .collect();
            let ports: HashSet<_> = of_burst.iter().map(|e| port(e)).collect();
            let shared: Vec<String> = of_burst
                .iter()
                .filter(|e| of_burst.iter().filter(|o| port(o) == port(e)).count() > 1)
                .map(|e| e.to_string())
                .collect();
            assert_eq!(
                ports.len(),
                burst,
                "{transport}: some reported twice:\n{}",
                shared.join("\n")
            );
            assert_eq!(ports, burst_ports, "{transport}: not the burst's connects");
            for e in of_burst {
                assert_eq!(e["outcome"], "established", "{transport}: {e}");
                assert_eq!(e["end"], "seen", "{transport}: {e}");
            }
        } else {
            assert!(
                lost > 0,
                "{transport}: nothing lost with one page: {seen} seen"
            );
            assert_eq!(
                seen + lost,
                burst,
                "{transport}: every event is shown or counted"
            );
            let said = |s: &str| s.contains(" events: the ");
            assert!(
                said(&tracer.stderr_until(Duration::from_secs(2), said)),
                "{transport}: loss not said on stderr"
            );
        }
        for lport in after {
            assert!(
                connects.iter().any(|e| port(e) == lport),
                "{transport}: tracing stopped after the burst: {all:#?}"
            );
        }
        assert!(tracer.interrupt().success());
    }
}

/// This thread runs on CPU 0 until dropped.
struct PinnedToCpu0(nix::sched::CpuSet);

impl PinnedToCpu0 {
    fn new() -> PinnedToCpu0 {
        use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
        let before = sched_getaffinity(Pid::from_raw(0)).unwrap();
        let mut one = CpuSet::new();
        one.set(0).unwrap();
        sched_setaffinity(Pid::from_raw(0), &one).unwrap();
        PinnedToCpu0(before)
    }
}

impl Drop for PinnedToCpu0 {
    fn drop(&mut self) {
        let _ = nix::sched::sched_setaffinity(Pid::from_raw(0), &self.0);
    }
}

/// A BPF program or map of the kernel: its id and name.
type Object = (u32, String);

/// Programs and maps of the kernel, less those another process holds: a shared CI host
/// loads its own (systemd does for units it starts), and the tracer, once dead, holds none.
fn bpf_objects() -> (Vec<Object>, Vec<Object>) {
    use libbpf_rs::query::{MapInfoIter, ProgInfoIter};
    let (held_progs, mut held_maps) = held_by_others();
    let mut progs = Vec::new();
    for p in ProgInfoIter::default() {
        if held_progs.contains(&p.id) {
            held_maps.extend(&p.map_ids);
        } else {
            progs.push((p.id, p.name.to_string_lossy().into_owned()));
        }
    }
    let maps = MapInfoIter::default()
        .filter(|m| !held_maps.contains(&m.id))
        .map(|m| (m.id, m.name.to_string_lossy().into_owned()))
        .collect();
    (progs, maps)
}

/// Runs of a process's BPF programs that the kernel skipped because another BPF program
/// or a bpf() map call was in progress on that CPU (counted from 5.12 for some program
/// types, from 6.7 for tracepoints and kprobes; 0 before).
fn skipped_runs(pid: u32) -> u64 {
    let mut ids = Held::default();
    ids.add(pid);
    libbpf_rs::query::ProgInfoIter::default()
        .filter(|p| ids.progs.contains(&p.id))
        .map(|p| p.recursion_misses)
        .sum()
}

/// Ids of BPF programs and maps that processes hold descriptors of (their fdinfo names
/// them: `prog_id:` for programs and links, `map_id:` for maps).
#[derive(Default)]
struct Held {
    progs: HashSet<u32>,
    maps: HashSet<u32>,
}

impl Held {
    fn add(&mut self, pid: u32) {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
            return; // gone meanwhile
        };
        let infos = fds
            .flatten()
            .filter_map(|fd| fs::read_to_string(fd.path()).ok());
        for info in infos {
            for line in info.lines() {
                let id = |v: &str| v.trim().parse::<u32>().ok();
                if let Some(id) = line.strip_prefix("prog_id:").and_then(id) {
                    self.progs.insert(id);
                } else if let Some(id) = line.strip_prefix("map_id:").and_then(id) {
                    self.maps.insert(id);
                }
            }
        }
    }
}

/// What every other live process holds.
fn held_by_others() -> (HashSet<u32>, HashSet<u32>) {
    let me = std::process::id();
    let mut held = Held::default();
    let pids = fs::read_dir("/proc").unwrap().flatten();
    for pid in pids.filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()) {
        if pid != me {
            held.add(pid);
        }
    }
    (held.progs, held.maps)
}

/// A small pseudo-random sequence (xorshift), seeded from the clock and printed, so that a
/// failing run can be told apart and its timings reproduced.
struct Moments(u64);

impl Moments {
    fn next_ms(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn signals_at_any_moment_under_load_leave_nothing_behind() {
    let _serial = serial();
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("seed {seed}");
    let mut moments = Moments(seed);
    let server = listen("127.0.0.1:0");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Closed with an RST (linger 0) and paced: an unbounded loop leaves tens of
                // thousands of TIME_WAIT sockets, and once the ephemeral ports run out each
                // connect scans them all in the kernel (a minute-long soft lockup under
                // emulation).
                let stream =
                    std::net::TcpStream::connect_timeout(&server, Duration::from_secs(5)).unwrap();
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                socket::setsockopt(&stream, socket::sockopt::Linger, &linger).unwrap();
                drop(stream);
                thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let (progs_before, maps_before) = bpf_objects();
    let known: HashSet<u32> = progs_before
        .iter()
        .chain(&maps_before)
        .map(|(id, _)| *id)
        .collect();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGKILL] {
        for _ in 0..3 {
            // Anywhere from detecting the kernel through loading to tracing.
            let after = Duration::from_millis(moments.next_ms(600));
            let mut child = std::process::Command::new(bin())
                .args(["--json"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            thread::sleep(after);
            kill(Pid::from_raw(child.id() as i32), signal).unwrap();
            let status = ended_within(&mut child, Duration::from_secs(60))
                .unwrap_or_else(|state| panic!("{signal} after {after:?}: still running: {state}"));
            if signal == Signal::SIGKILL {
                assert!(!status.success());
            } else {
                // Before its handlers are installed the default action ends it; after,
                // it shows what it has and exits 0.
                use std::os::unix::process::ExitStatusExt;
                assert!(
                    status.success() || status.signal() == Some(signal as i32),
                    "{signal} after {after:?}: {status}"
                );
            }
            // The kernel frees what the last descriptor held, after an RCU grace period.
            let end = Instant::now() + Duration::from_secs(5);
            loop {
                let (progs, maps) = bpf_objects();
                let left: Vec<_> = progs
                    .iter()
                    .chain(&maps)
                    .filter(|(id, _)| !known.contains(id))
                    .collect();
                if left.is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < end,
                    "after {signal} {after:?} into its run, these outlived it: {left:?}"
                );
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join().unwrap();
}

/// The child's exit status once it ends within `limit`; else what the kernel says of it
/// (its state, signal masks and, where the kernel shows them, its threads' stacks), and
/// it is killed.
fn ended_within(
    child: &mut std::process::Child,
    limit: Duration,
) -> Result<std::process::ExitStatus, String> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if let Some(status) = child.try_wait().unwrap() {
            return Ok(status);
        }
        thread::sleep(Duration::from_millis(50));
    }
    let proc = format!("/proc/{}", child.id());
    let mut state: Vec<String> = fs::read_to_string(format!("{proc}/status"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("State") || l.starts_with("Sig") || l.starts_with("Shd"))
        .map(str::to_owned)
        .collect();
    for task in fs::read_dir(format!("{proc}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = task.path();
        let read = |f: &str| fs::read_to_string(path.join(f)).unwrap_or_default();
        state.push(format!(
            "task {:?}: wchan {}; stack: {}",
            task.file_name(),
            read("wchan"),
            read("stack").replace('\n', " | ")
        ));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(state.join("; "))
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn once_attached_it_keeps_no_capability_it_does_not_need() {
    let _serial = serial();
    let tracer = Tracer::start(&["--json"]);
    let status = fs::read_to_string(format!("/proc/{}/status", tracer.pid())).unwrap();
    let caps = |name: &str| {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim();
        u64::from_str_radix(hex, 16).unwrap()
    };
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    const CAP_BPF: u64 = 1 << 39;
    // At most the one capability old kernels check on every bpf() call.
    for set in ["CapEff:", "CapPrm:"] {
        let left = caps(set) & !(CAP_BPF | CAP_SYS_ADMIN);
        assert_eq!(left, 0, "{set} {:#x} after attaching", caps(set));
        assert!(caps(set).count_ones() <= 1, "{set} {:#x}", caps(set));
    }
    assert_eq!(caps("CapInh:"), 0);
    assert_eq!(caps("CapAmb:"), 0);
    // And it still works: events flow, and it exits cleanly.
    let server = listen("127.0.0.1:0");
    let lport = connect(server);
    let events = tracer.events_until(Duration::from_secs(5), |ev| {
        ev.iter().any(|e| e["lport"] == lport)
    });
    assert!(events.iter().any(|e| e["lport"] == lport), "{events:#?}");
    assert!(tracer.interrupt().success());
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn an_entry_whose_end_no_probe_saw_is_swept_and_reported() {
    let _serial = serial();
    if features()["on_demand"] == true {
        an_entry_whose_socket_left_syn_sent_is_reported_by_the_sweeper();
    } else {
        an_entry_whose_end_no_probe_saw_is_swept_as_missed();
    }
}

/// An entry whose end no probe saw stays until its socket is freed, and the socket's
/// memory may then go to a connect the filters do not want (another process's), which
/// leaves no entry of its own: when that connect ends, the entry is not its. It is
/// reported as the superseded are (ended by now, its outcome unknown), never with the
/// other connect's end. Planted: an entry for another destination, keyed by the socket of
/// another process's connect, which then ends.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn an_entry_is_never_finished_by_another_connect_on_its_socket() {
    let _serial = serial();
    let net = NetPair::new();
    let server: SocketAddr = format!("{}:7", net.server_v4()).parse().unwrap();
    net.drop_syns(server.port(), false);
    let tracer = Tracer::start(&["--json", "-p", &me()]);
    let mut other = Connector::spawn(&["ip", "netns", "exec", &net.a], server);
    other.go();
    let sk = syn_sent_socket(&net.a, server);
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    let mut entry = Pending {
        start_ns: now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64,
        tgid: std::process::id(),
        family: Family::FAMILY_INET.0 as u16,
        dport: 9,
        ..Pending::default()
    };
    entry.daddr[..4].copy_from_slice(&[192, 0, 2, 9]);
    tracer
        .map("pending")
        .update(&sk.to_ne_bytes(), &pending_bytes(&entry))
        .unwrap();
    // Its connect ends: SYN_SENT to CLOSE as its socket is closed.
    let _ = other.child.kill();
    let _ = other.child.wait();
    let all = tracer.events_until(Duration::from_secs(5), |ev| {
        ev.iter().any(|e| e["type"] == "connect")
    });
    let events = records(&all, "connect");
    assert_eq!(events.len(), 1, "{all:#?}");
    let e = events[0];
    assert_eq!(e["daddr"], "192.0.2.9", "{e}");
    assert_eq!(
        (&e["end"], &e["outcome"]),
        (&"gone".into(), &"unknown".into()),
        "finished by another connect: {e}"
    );
    assert!(tracer.map("pending").lookup(&sk.to_ne_bytes()).is_none());
    assert!(tracer.interrupt().success());
}

/// The kernel address of the socket in namespace `ns` connecting to `to` (in SYN_SENT),
/// from /proc/net/tcp, which shows it to root while kernel.kptr_restrict is 1.
fn syn_sent_socket(ns: &str, to: SocketAddr) -> u64 {
    const KPTR_RESTRICT: &str = "/proc/sys/kernel/kptr_restrict";
    let before = fs::read_to_string(KPTR_RESTRICT).unwrap();
    fs::write(KPTR_RESTRICT, "1").unwrap();
    let SocketAddr::V4(to) = to else {
        unreachable!()
    };
    // As /proc/net/tcp shows an address: the IPv4 address as a native-endian u32.
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(to.ip().octets()),
        to.port()
    );
    let end = Instant::now() + Duration::from_secs(5);
    let sk = loop {
        // This thread's own view (/proc/thread-self is 3.17+).
        let table = NetPair::within(ns, || {
            fs::read_to_string(format!("/proc/self/task/{}/net/tcp", nix::unistd::gettid()))
        });
        let found = table.unwrap().lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&want.as_str()) && fields.get(3) == Some(&"02"))
                .then(|| u64::from_str_radix(fields.get(11)?, 16).ok())
                .flatten()
        });
        if let Some(sk) = found {
            break sk;
        }
        assert!(Instant::now() < end, "no socket in SYN_SENT to {want}");
        thread::sleep(Duration::from_millis(50));
    };
    fs::write(KPTR_RESTRICT, before.trim()).unwrap();
    assert!(sk >> 63 == 1, "not a kernel address: {sk:x}");
    sk
}

/// Where the sweeper can ask: what the kernel leaves when it runs no probe for a
/// connect's end is an entry whose socket is out of SYN_SENT (here: not a socket at all,
/// as after one was freed). The sweeper reports it within seconds, its outcome unknown;
/// a connect really waiting stays.
fn an_entry_whose_socket_left_syn_sent_is_reported_by_the_sweeper() {
    let net = NetPair::new();
    let server: SocketAddr = format!("{}:7", net.server_v4()).parse().unwrap();
    net.drop_syns(server.port(), false);
    let tracer = Tracer::start(&["--json", "-p", &me()]);
    let waiting = flood(&net.a, server, 1, 6);
    let pending = tracer.map("pending");
    assert_eq!(tracer.map_entries("pending"), 1);
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    let now_ns = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
    let mut value = vec![0u8; pending.value_size()];
    value[..8].copy_from_slice(&now_ns.to_ne_bytes());
    let gone = 0xdead_0000_u64.to_ne_bytes();
    pending.update(&gone, &value).unwrap();
    let all = tracer.events_until(Duration::from_secs(10), |ev| {
        ev.iter().any(|e| e["type"] == "connect")
    });
    let events = records(&all, "connect");
    assert_eq!(events.len(), 1, "{all:#?}");
    let e = &events[0];
    assert_eq!(
        (&e["end"], &e["outcome"]),
        (&"gone".into(), &"unknown".into()),
        "{e}"
    );
    let (min, lat) = (
        e["lat_min_ms"].as_f64().unwrap(),
        e["lat_ms"].as_f64().unwrap(),
    );
    assert!(min <= lat && (1000.0..5000.0).contains(&lat), "{e}");
    assert_eq!(counted(&all, "missed"), 0);
    assert!(pending.lookup(&gone).is_none());
    // The real connect is still waiting for its SYN's answer: asked about, and kept.
    assert_eq!(tracer.map_entries("pending"), 1);
    drop(waiting);
    assert!(tracer.interrupt().success());
}

/// Where it cannot ask: entries are looked at once present for a second here (not 15
/// minutes), swept every 5 s; one older than any connect could be is missed.
fn an_entry_whose_end_no_probe_saw_is_swept_as_missed() {
    let tracer = Tracer::start(&["--json", "--sweep-after", "1"]);
    let pending = tracer.map("pending");
    // What the kernel leaves when it skips the probe that would end a connect: an entry
    // nobody removes. One from before this tracer started, one just made (a connect still
    // waiting).
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    let now_ns = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
    let entry = |start_ns: u64| {
        let mut value = vec![0u8; pending.value_size()];
        value[..8].copy_from_slice(&start_ns.to_ne_bytes());
        value
    };
    let (stale, fresh) = (0xdead_0000_u64.to_ne_bytes(), 0xbeef_0000_u64.to_ne_bytes());
    // Started before tracing began: no probe of this tracer can have made it.
    pending.update(&stale, &entry(1)).unwrap();
    pending.update(&fresh, &entry(now_ns)).unwrap();
    let all = tracer.events_until(Duration::from_secs(15), |ev| {
        ev.iter().any(|e| e["type"] == "missed")
    });
    assert_eq!(counted(&all, "missed"), 1, "{all:#?}");
    assert!(pending.lookup(&stale).is_none());
    assert!(pending.lookup(&fresh).is_some());
    let said = |s: &str| s.contains("1 connects not traced to their end: the kernel ran no probe");
    assert!(said(&tracer.stderr_until(Duration::from_secs(2), said)));
    pending.delete(&fresh).unwrap();
    assert!(tracer.interrupt().success());
}

/// Clients that do everything wrong, many at once, while connects go on being counted.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn the_exporter_outlives_a_scrape_storm() {
    let _serial = serial();
    let server = listen_on_a_service_port();
    let dest = format!("127.0.0.1:{}", server.port());
    let (tracer, addr) = serving(&["-p", &me()]);
    let rss_before = rss_anon_kb(tracer.pid());
    let misbehave = move |kind: usize| {
        let Ok(mut s) = TcpStream::connect(addr) else {
            return;
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = match kind % 5 {
            // Slow: half a request, then nothing.
            0 => s.write_all(b"GET /metr"),
            // Half-closed: a request, then no more writing (the answer is still read).
            1 => s
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .and_then(|()| s.shutdown(Shutdown::Write)),
            // Garbage.
            2 => s.write_all(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n"),
            // A request line of a megabyte.
            3 => s.write_all(format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(1 << 20)).as_bytes()),
            // A proper scrape.
            _ => s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        };
        let mut sink = Vec::new();
        let _ = s.take(1 << 22).read_to_end(&mut sink);
    };
    // Fewer under emulation (the matrix VMs), where each costs a hundred times more.
    let (threads, each) = if std::env::var_os("TCPCONNLAT_EMULATED").is_some() {
        (4, 10)
    } else {
        (8, 40)
    };
    let storm: Vec<_> = (0..threads)
        .map(|t| thread::spawn(move || (0..each).for_each(|i| misbehave(t * each + i))))
        .collect();
    // Events keep flowing meanwhile.
    for _ in 0..20 {
        connect(server);
        thread::sleep(Duration::from_millis(20));
    }
    for thread in storm {
        thread.join().unwrap();
    }
    let text = scrape_until(addr, |t| served_count(t, "established", &dest) >= 20.0);
    assert_eq!(served_count(&text, "established", &dest), 20.0, "{text}");
    let rss_after = rss_anon_kb(tracer.pid());
    eprintln!("exporter anonymous RSS {rss_before} kB before the storm, {rss_after} kB after");
    assert!(
        rss_after < rss_before + 8 * 1024,
        "exporter memory grew from {rss_before} to {rss_after} kB"
    );
    assert!(tracer.interrupt().success());
}

/// systemd stops a service with SIGTERM: the exporter exits 0 and leaves no BPF object.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn sigterm_stops_the_exporter_cleanly() {
    let _serial = serial();
    let (mut tracer, addr) = serving(&[]);
    let held = tracer.held_maps();
    assert!(!held.is_empty(), "{held:?}");
    assert!(scrape(addr).contains("tcpconnlat_build_info"));
    kill(
        nix::unistd::Pid::from_raw(tracer.pid() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    assert!(tracer.wait().success());
    assert_eq!(held.left(), Vec::<String>::new(), "outlived the exporter");
    assert!(TcpStream::connect(addr).is_err(), "still listening");
}

/// The lowest descriptor number process `pid` has free: with RLIMIT_NOFILE set to it, the
/// process can open nothing more.
fn lowest_free_fd(pid: u32) -> u64 {
    let open: HashSet<u64> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|fd| !open.contains(fd)).unwrap()
}

/// prlimit(2) on another process: its soft RLIMIT_NOFILE; the one it had.
fn set_soft_nofile(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a null new limit only reads; the pointers are valid for the call.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: as above.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    old.rlim_cur
}

/// CPU time (user and system) process `pid` used so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the ")" that ends the command name: state is field 3; utime, stime 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Out of descriptors, the exporter cannot accept scrapes: it neither spins on the failing
/// accept nor stops, counts the failures, and serves again once it can.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn out_of_descriptors_the_exporter_backs_off_and_recovers() {
    let _serial = serial();
    let (tracer, addr) = serving(&[]);
    assert!(scrape(addr).contains("tcpconnlat_accept_errors_total 0"));
    let pid = tracer.pid();
    let soft = set_soft_nofile(pid, lowest_free_fd(pid));
    // Connected in the kernel's backlog; accepting any needs a descriptor.
    let waiting: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let (before, started) = (cpu_ticks(pid), Instant::now());
    thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    let ticks = started.elapsed().as_secs_f64() * 100.0; // USER_HZ
    eprintln!("exporter CPU out of descriptors: {used} ticks of {ticks:.0}");
    assert!(
        (used as f64) < ticks * 0.25,
        "the exporter spun on accept: {used} ticks of CPU in {ticks:.0}"
    );
    set_soft_nofile(pid, soft);
    drop(waiting);
    let failed = |text: &str| sample(text, "tcpconnlat_accept_errors_total").unwrap_or(0.0);
    let text = scrape_until(addr, |t| failed(t) > 0.0);
    assert!(failed(&text) >= 1.0, "{text}");
    assert!(tracer.interrupt().success());
}
