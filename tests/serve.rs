//! `--serve`: the metrics endpoint counts known connects, bounds its label sets, outlives
//! misbehaving scrapers and stops cleanly on SIGTERM. Runs in every mode of the kernel
//! matrix (the real Prometheus server is tests/prometheus.rs, on the host).

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

fn count(text: &str, outcome: &str, dest: &str) -> f64 {
    let series = format!(
        "tcpconnlat_connect_duration_seconds_count{{outcome=\"{outcome}\",dest=\"{dest}\"}}"
    );
    sample(text, &series).unwrap_or(0.0)
}

/// Scrape until `done` says the counts are in (the stream drains every 20 ms).
fn scrape_until(addr: SocketAddr, done: impl Fn(&str) -> bool) -> String {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(addr);
        if done(&text) || Instant::now() > end {
            return text;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn served_metrics_count_known_connects_by_outcome_and_dest() {
    let _serial = serial();
    let server = listen_on_a_service_port();
    let closed = closed_service_ports(1)[0];
    let (tracer, addr) = serving(&["-p", &me()]);
    for _ in 0..3 {
        connect(server);
    }
    for _ in 0..2 {
        let refused = std::net::TcpStream::connect(("127.0.0.1", closed));
        assert!(refused.is_err(), "port {closed} answered");
    }
    let dest = format!("127.0.0.1:{}", server.port());
    let refused_dest = format!("127.0.0.1:{closed}");
    let text = scrape_until(addr, |t| {
        count(t, "established", &dest) >= 3.0 && count(t, "refused", &refused_dest) >= 2.0
    });
    assert_eq!(count(&text, "established", &dest), 3.0, "{text}");
    assert_eq!(count(&text, "refused", &refused_dest), 2.0, "{text}");
    // Latencies land in the buckets: every one is within the last (+Inf) and the sum is
    // a loopback handshake's, far below a second each.
    let inf = format!(
        "tcpconnlat_connect_duration_seconds_bucket{{outcome=\"established\",dest=\"{dest}\",le=\"+Inf\"}}"
    );
    assert_eq!(sample(&text, &inf), Some(3.0), "{text}");
    let sum = format!(
        "tcpconnlat_connect_duration_seconds_sum{{outcome=\"established\",dest=\"{dest}\"}}"
    );
    assert!(sample(&text, &sum).unwrap() < 3.0, "{text}");
    let mode = test_mode().unwrap_or_default();
    assert!(
        text.contains(&format!("tcpconnlat_info{{mode=\"{mode}")) || mode.is_empty(),
        "{text}"
    );
    assert_eq!(sample(&text, "tcpconnlat_lost_events_total"), Some(0.0));
    // OpenMetrics, for a scraper that asks for it.
    let mut response = ureq::get(&format!("http://{addr}/metrics"))
        .header("Accept", "application/openmetrics-text; version=1.0.0")
        .call()
        .unwrap();
    let kind = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    let open = response.body_mut().read_to_string().unwrap();
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(
        open.contains("# UNIT tcpconnlat_connect_duration_seconds seconds"),
        "{open}"
    );
    // Nothing but start-up on stderr, nothing at all on stdout.
    assert!(tracer.lines_for(Duration::from_millis(100)).is_empty());
    assert!(tracer.interrupt().success());
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn label_sets_beyond_max_series_fold_into_other() {
    let _serial = serial();
    let closed = closed_service_ports(5);
    let (tracer, addr) = serving(&["-p", &me(), "--max-series", "2"]);
    for &port in &closed {
        let _ = std::net::TcpStream::connect(("127.0.0.1", port));
    }
    let text = scrape_until(addr, |t| {
        count(t, "refused", "other") + 2.0 >= closed.len() as f64
    });
    // Two of their own and "other" (where this test's own scrapes land too).
    assert_eq!(sample(&text, "tcpconnlat_label_sets"), Some(3.0), "{text}");
    let folded = sample(&text, "tcpconnlat_series_folded_total").unwrap();
    assert!(folded >= closed.len() as f64 - 2.0, "{text}");
    assert_eq!(
        count(&text, "refused", "other"),
        closed.len() as f64 - 2.0,
        "{text}"
    );
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
    let rss_before = vm_rss_kb(tracer.pid());
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
    let text = scrape_until(addr, |t| count(t, "established", &dest) >= 20.0);
    assert_eq!(count(&text, "established", &dest), 20.0, "{text}");
    let rss_after = vm_rss_kb(tracer.pid());
    eprintln!("exporter RSS {rss_before} kB before the storm, {rss_after} kB after");
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
    use nix::sys::signal::{kill, Signal};
    let _serial = serial();
    let (mut tracer, addr) = serving(&[]);
    let ids = tracer.map_ids();
    assert!(ids.len() >= 3, "{ids:?}");
    assert!(scrape(addr).contains("tcpconnlat_info"));
    kill(
        nix::unistd::Pid::from_raw(tracer.pid() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    assert!(tracer.wait().success());
    thread::sleep(Duration::from_millis(500));
    for id in ids {
        assert!(
            libbpf_rs::MapHandle::from_map_id(id).is_err(),
            "map {id} outlived the exporter"
        );
    }
    assert!(TcpStream::connect(addr).is_err(), "still listening");
}
