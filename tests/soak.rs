//! The soak: three tracers (the exporter with a cgroup label, JSON lines, bcc's text lines)
//! left running under a steady mix of connects (established, refused, timed out by the
//! application, to destinations that churn past `--max-series`, from cgroups made and
//! removed all along) and a scrape every second. Each sampling period it records what
//! could leak: memory, descriptors, BPF maps and programs, tracefs kprobe events, the
//! pending table. After the first third (warm-up), memory may grow by no more than 50
//! bytes a connect, and nothing else at all. CI runs a few minutes
//! (TCPCONNLAT_SOAK_MINUTES, default 3); `ci/soak.sh MINUTES` runs it long and prints the
//! samples as a table.

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

/// The load: until `stop`, connects of each kind, counted, ten a second each, and one a
/// second from a cgroup made for it and removed after.
fn load(stop: Arc<AtomicBool>, made: Arc<AtomicU64>) -> Vec<thread::JoinHandle<()>> {
    let server = listen_on_a_service_port();
    let churn = {
        let (stop, made) = (stop.clone(), made.clone());
        thread::spawn(move || {
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let cgroup =
                    TestCgroup::named(&format!("tcpconnlat-soak-{}-{i}", std::process::id()));
                let mut connector = Connector::spawn(&[], server);
                cgroup.adopt(connector.pid());
                connector.go();
                made.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(200));
                drop(connector);
                // The process is gone: the cgroup can go too.
                drop(cgroup);
                thread::sleep(Duration::from_millis(800));
            }
        })
    };
    let closed = closed_service_ports(400);
    let pair = Arc::new(NetPair::new());
    let dropped = 7; // a port whose SYNs the server namespace drops
    pair.drop_syns(dropped, false);
    let kinds: Vec<Box<dyn Fn(usize) + Send>> = vec![
        Box::new(move |_| {
            connect(server);
        }),
        // Refused, to a destination of its own each time: 400 destinations, more than
        // --max-series 400 has room for (about 17 label sets of one outcome).
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
    let mut workers: Vec<thread::JoinHandle<()>> = kinds
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
        .collect();
    workers.push(churn);
    workers
}

/// Memory a connect may leave behind at most.
const BYTES_PER_CONNECT: u64 = 50;

/// Whether `later` grew past `first`, `connects` connects later: memory by more than
/// [`BYTES_PER_CONNECT`] each (and a page), any count by anything, the pending table past
/// what the connects in flight explain.
fn grew(first: &Sample, later: &Sample, connects: u64) -> Option<String> {
    let checks = [
        (
            "RSS kB",
            first.rss_kb + 4 + BYTES_PER_CONNECT * connects / 1024,
            later.rss_kb,
        ),
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
    let (exporter, addr) = serving(&["--max-series", "400", "--label", "cgroup"]);
    let json = Tracer::start(&["--json"]);
    let text = Tracer::start(&[]);
    let (stop, made) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let workers = load(stop.clone(), made.clone());
    let started = Instant::now();
    let tracers = [("exporter", &exporter), ("json", &json), ("text", &text)];
    // Per sample: minutes, each tracer's sample, connects made by then.
    let mut samples: Vec<(f64, Vec<Sample>, u64)> = Vec::new();
    let mut next = every;
    let (mut shown_json, mut shown_text) = (0usize, 0usize);
    // A cgroup's series lives until --series-ttl after its one connect, and the budget is
    // full of refused destinations soon after: a long run's last scrape may hold none.
    let mut cgroup_labelled = false;
    while started.elapsed() < total {
        cgroup_labelled |= scrape(addr).contains("cgroup=\"tcpconnlat-soak-");
        shown_json += json.lines_for(Duration::from_millis(1)).len();
        shown_text += text.lines_for(Duration::from_millis(1)).len();
        thread::sleep(Duration::from_secs(1));
        if started.elapsed() >= next {
            next += every;
            let minute = started.elapsed().as_secs_f64() / 60.0;
            let row: Vec<Sample> = tracers.iter().map(|(_, t)| sample(t)).collect();
            let connects = made.load(Ordering::Relaxed);
            println!(
                "soak {minute:6.1} min  connects {connects:>8}  exporter {:?}  json {:?}  text {:?}",
                row[0], row[1], row[2]
            );
            samples.push((minute, row, connects));
        }
    }
    stop.store(true, Ordering::Relaxed);
    workers.into_iter().for_each(|w| w.join().unwrap());
    assert!(samples.len() >= 6, "{samples:?}");
    assert!(shown_json > 0, "the JSON tracer showed no connect");
    assert!(shown_text > 0, "the text tracer showed no connect");
    let scraped = scrape(addr);
    assert!(
        scraped.contains("tcpconnlat_series_folded_total"),
        "{scraped}"
    );
    assert!(cgroup_labelled, "no scrape had a cgroup label: {scraped}");
    // After warm-up (the first third), nothing may grow but by what connects explain.
    let warm = samples.len() / 3;
    let (_, first, first_connects) = samples[warm].clone();
    for (minute, row, connects) in &samples[warm + 1..] {
        for (i, (name, _)) in tracers.iter().enumerate() {
            if let Some(why) = grew(&first[i], &row[i], connects - first_connects) {
                panic!(
                    "the {name} tracer grew by minute {minute:.1}, {} connects after warm-up: {why}",
                    connects - first_connects
                );
            }
        }
    }
    let (_, last, last_connects) = samples.last().unwrap();
    for (i, (name, _)) in tracers.iter().enumerate() {
        let bytes = last[i].rss_kb.saturating_sub(first[i].rss_kb) * 1024;
        println!(
            "soak: the {name} tracer grew {bytes} bytes over {} connects after warm-up",
            last_connects - first_connects
        );
    }
    for mut tracer in [exporter, json, text] {
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
