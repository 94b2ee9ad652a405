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
        served_count(t, "refused", "other") + 2.0 >= closed.len() as f64
    });
    // Two of their own and "other" (where this test's own scrapes land too).
    assert_eq!(sample(&text, "tcpconnlat_label_sets"), Some(3.0), "{text}");
    let folded = sample(&text, "tcpconnlat_series_folded_total").unwrap();
    assert!(folded >= closed.len() as f64 - 2.0, "{text}");
    assert_eq!(
        served_count(&text, "refused", "other"),
        closed.len() as f64 - 2.0,
        "{text}"
    );
    assert!(tracer.interrupt().success());
}
