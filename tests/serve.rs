//! `--serve`: the metrics endpoint counts known connects and bounds its label sets. Runs in
//! every mode of the kernel matrix (the real Prometheus server is tests/prometheus.rs, on
//! the host; the scrape storm and SIGTERM are in tests/hardening.rs).

mod support;

use std::time::Duration;

use support::*;

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
        served_count(t, "established", &dest) >= 3.0
            && served_count(t, "refused", &refused_dest) >= 2.0
    });
    assert_eq!(served_count(&text, "established", &dest), 3.0, "{text}");
    assert_eq!(served_count(&text, "refused", &refused_dest), 2.0, "{text}");
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
    let build = text
        .lines()
        .find(|l| l.starts_with("tcpconnlat_build_info{"))
        .unwrap_or_else(|| panic!("no build info in:\n{text}"));
    assert!(build.contains(&format!("mode=\"{mode}")), "{build}");
    assert!(
        build.contains("revision=\"") && build.ends_with(" 1"),
        "{build}"
    );
    // What client libraries export of any process, there too.
    assert!(
        sample(&text, "process_cpu_seconds_total").is_some(),
        "{text}"
    );
    for series in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            sample(&text, series).is_some_and(|v| v > 0.0),
            "{series} in:\n{text}"
        );
    }
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

/// The series a scrape holds: what Prometheus stores (and pays for).
fn series_in(scrape: &str) -> usize {
    scrape
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

/// `--max-series` bounds what Prometheus pays for: destinations beyond go under
/// dest="other", and no scrape ever holds more series than it allows.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn destinations_beyond_the_series_budget_fold_into_other() {
    let _serial = serial();
    let closed = closed_service_ports(40);
    // Two buckets: a destination of one outcome costs 6 series (5 for its histogram, its
    // retransmit counter), the folded one keeps 26 aside; 120 leaves room for a few.
    let budget = 120.0;
    let (tracer, addr) = serving(&["-p", &me(), "--max-series", "120", "--buckets", "0.001,1"]);
    for &port in &closed {
        let _ = std::net::TcpStream::connect(("127.0.0.1", port));
    }
    // Each refused connect, under its own destination or under "other".
    let own = |t: &str| {
        closed
            .iter()
            .map(|port| served_count(t, "refused", &format!("127.0.0.1:{port}")))
            .sum::<f64>()
    };
    let counted = |t: &str| own(t) + served_count(t, "refused", "other");
    let text = scrape_until(addr, |t| counted(t) >= closed.len() as f64);
    assert_eq!(counted(&text), closed.len() as f64, "{text}");
    assert!(own(&text) >= 1.0, "no destination of its own: {text}");
    let folded = sample(&text, "tcpconnlat_series_folded_total").unwrap();
    assert!(folded >= served_count(&text, "refused", "other"), "{text}");
    let series = sample(&text, "tcpconnlat_series").unwrap();
    assert!(
        series <= budget,
        "{series} series over a budget of {budget}:\n{text}"
    );
    assert!(
        series_in(&text) as f64 <= series,
        "{}: {text}",
        series_in(&text)
    );
    assert!(tracer.interrupt().success());
}
