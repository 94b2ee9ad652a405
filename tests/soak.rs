//! The soak: two tracers (the exporter and JSON lines) left running under a steady mix of
//! connects (established, refused, timed out by the application, to destinations that
//! churn past `--max-series`) and a scrape every second. Each sampling period it records
//! what could leak: memory, descriptors, BPF maps and programs, tracefs kprobe events, the
//! pending table. Anything that grows after the first period fails it. CI runs a few
//! minutes (TCPCONNLAT_SOAK_MINUTES, default 3); `ci/soak.sh MINUTES` runs it long and
//! prints the samples as a table.

mod support;

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// What one sample of one tracer holds.
#[derive(Clone, Debug, Default, PartialEq)]
struct Sample {
    rss_kb: u64,
    fds: usize,
    maps: usize,
    progs: usize,
    kprobe_events: usize,
    pending: usize,
}

/// The BPF objects a process holds, by the kind its fdinfo names ("map_id:", "prog_id:").
fn bpf_fds(pid: u32, field: &str) -> usize {
    fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .map(|dir| {
            dir.flatten()
                .filter(|e| {
                    fs::read_to_string(e.path())
                        .is_ok_and(|info| info.lines().any(|l| l.starts_with(field)))
                })
                .count()
        })
        .unwrap_or(0)
}

fn kprobe_events() -> usize {
    [
        "/sys/kernel/tracing/kprobe_events",
        "/sys/kernel/debug/tracing/kprobe_events",
    ]
    .iter()
    .find_map(|p| fs::read_to_string(p).ok())
    .map_or(0, |text| {
        text.lines().filter(|l| l.contains(":tcpconnlat_")).count()
    })
}

fn sample(tracer: &Tracer) -> Sample {
    let pid = tracer.pid();
    Sample {
        rss_kb: rss_anon_kb(pid),
        fds: fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count(),
        maps: bpf_fds(pid, "map_id:"),
        progs: bpf_fds(pid, "prog_id:"),
        kprobe_events: kprobe_events(),
        pending: tracer.map_entries("pending"),
    }
}

fn minutes() -> f64 {
    std::env::var("TCPCONNLAT_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(3.0)
}

/// The load: until `stop`, a few connects a second of each kind, counted.
fn load(stop: Arc<AtomicBool>, made: Arc<AtomicU64>) -> Vec<thread::JoinHandle<()>> {
    let server = listen_on_a_service_port();
    let closed = closed_service_ports(400);
    let pair = Arc::new(NetPair::new());
    let dropped = 7; // a port whose SYNs the server namespace drops
    pair.drop_syns(dropped, false);
    let kinds: Vec<Box<dyn Fn(usize) + Send>> = vec![
        Box::new(move |_| {
            connect(server);
        }),
        // Refused, to a destination of its own each time: 400 destinations, more than
        // --max-series 400 has room for (about 19 label sets of one outcome).
        Box::new(move |i| {
            let _ = TcpStream::connect(("127.0.0.1", closed[i % closed.len()]));
        }),
        // Timed out: the application gives up after 200 ms.
        Box::new(move |_| {
            let to: SocketAddr = format!("{}:{dropped}", pair.server_v4()).parse().unwrap();
            let ns = pair.a.clone();
            NetPair::within(&ns, move || {
                let _ = TcpStream::connect_timeout(&to, Duration::from_millis(200));
            });
        }),
    ];
    kinds
        .into_iter()
        .map(|kind| {
            let (stop, made) = (stop.clone(), made.clone());
            thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    kind(i);
                    made.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect()
}

/// Whether `later` grew past `first`: memory by more than 2 MB (allocator noise), any
/// count by anything, the pending table past what the connects in flight explain.
fn grew(first: &Sample, later: &Sample) -> Option<String> {
    let checks = [
        ("RSS kB", first.rss_kb + 2048, later.rss_kb),
        ("fds", first.fds as u64, later.fds as u64),
        ("BPF maps", first.maps as u64, later.maps as u64),
        ("BPF programs", first.progs as u64, later.progs as u64),
        (
            "kprobe events",
            first.kprobe_events as u64,
            later.kprobe_events as u64,
        ),
        (
            "pending entries",
            first.pending.max(16) as u64,
            later.pending as u64,
        ),
    ];
    checks
        .iter()
        .find(|(_, bound, now)| now > bound)
        .map(|(what, bound, now)| format!("{what}: {now} > {bound}"))
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn nothing_grows_over_time() {
    let _serial = serial();
    let total = Duration::from_secs_f64(minutes() * 60.0);
    // A sample a minute in long runs, six at least in short ones.
    let every = (total / 6).min(Duration::from_secs(60));
    let (exporter, addr) = serving(&["--max-series", "400"]);
    let lines = Tracer::start(&["--json"]);
    let (stop, made) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let workers = load(stop.clone(), made.clone());
    let started = Instant::now();
    let mut samples: Vec<(f64, Sample, Sample, u64)> = Vec::new();
    let mut next = every;
    let mut shown = 0usize;
    while started.elapsed() < total {
        let _ = scrape(addr);
        shown += lines.lines_for(Duration::from_millis(1)).len();
        thread::sleep(Duration::from_secs(1));
        if started.elapsed() >= next {
            next += every;
            let row = (
                started.elapsed().as_secs_f64() / 60.0,
                sample(&exporter),
                sample(&lines),
                made.load(Ordering::Relaxed),
            );
            println!(
                "soak {:6.1} min  connects {:>8}  exporter {:?}  lines {:?}",
                row.0, row.3, row.1, row.2
            );
            samples.push(row);
        }
    }
    stop.store(true, Ordering::Relaxed);
    workers.into_iter().for_each(|w| w.join().unwrap());
    assert!(samples.len() >= 3, "{samples:?}");
    assert!(shown > 0, "the JSON tracer showed no connect");
    let text = scrape(addr);
    assert!(text.contains("tcpconnlat_series_folded_total"), "{text}");
    let (_, first_exporter, first_lines, _) = samples[0].clone();
    for (minute, exporter, lines, _) in &samples[1..] {
        for (name, first, now) in [
            ("exporter", &first_exporter, exporter),
            ("lines", &first_lines, lines),
        ] {
            if let Some(why) = grew(first, now) {
                panic!("the {name} tracer grew by minute {minute:.1}: {why}");
            }
        }
    }
    for mut tracer in [exporter, lines] {
        let held = tracer.held_maps();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(tracer.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        assert!(tracer.wait().success());
        assert_eq!(held.left(), Vec::<String>::new(), "left after SIGTERM");
    }
}
