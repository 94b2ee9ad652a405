//! A real Prometheus server (Debian's `prometheus`) scrapes `tcpconnlat --serve` every
//! second while known connects are made; its query API must then give the numbers.
//! `promtool check metrics` must find nothing to say about a scrape. Host only: the VMs
//! have no Prometheus (tests/serve.rs proves --serve there).

mod support;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// A Prometheus server on loopback scraping `target` every second, stopped when dropped.
struct Prometheus {
    child: Child,
    api: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: tcpconnlat\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let api = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={api}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run prometheus (Debian package prometheus; ci/deps.sh installs it)");
        let prometheus = Prometheus {
            child,
            api,
            _dir: dir,
        };
        let up = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(api).is_err() {
            assert!(Instant::now() < up, "prometheus did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    /// The value of an instant query with one result, if it has one.
    fn query(&self, promql: &str) -> Option<f64> {
        let body = ureq::get(&format!("http://{}/api/v1/query", self.api))
            .query("query", promql)
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }

    /// Whether Prometheus accepts `promql` and answers it with at least one series.
    fn answers(&self, promql: &str) -> Result<usize, String> {
        let response = ureq::get(&format!("http://{}/api/v1/query", self.api))
            .query("query", promql)
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .map_err(|e| e.to_string())?;
        let body = response
            .into_body()
            .read_to_string()
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        if v["status"] != "success" {
            return Err(body);
        }
        Ok(v["data"]["result"].as_array().map_or(0, Vec::len))
    }

    /// Query until `want` holds of the answer (scrapes come every second), then the answer.
    fn query_until(&self, promql: &str, want: impl Fn(f64) -> bool) -> Option<f64> {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.query(promql);
            if got.is_some_and(&want) || Instant::now() > end {
                return got;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn a_real_prometheus_scrapes_and_answers_queries() {
    let _serial = serial();
    let net = NetPair::new();
    let silent: SocketAddr = format!("{}:7", net.server_v4()).parse().unwrap();
    net.drop_syns(silent.port(), false);
    let server = listen_on_a_service_port();
    let closed = closed_service_ports(1)[0];
    let (tracer, addr) = serving(&["-p", &me()]);
    let prometheus = Prometheus::start(addr);

    for _ in 0..4 {
        connect(server);
    }
    for _ in 0..3 {
        assert!(TcpStream::connect(("127.0.0.1", closed)).is_err());
    }
    // No answer: one SYN sent again after the 1 s RTO, then the caller gives up.
    let gave_up = NetPair::within(&net.a, move || {
        TcpStream::connect_timeout(&silent, Duration::from_millis(1500)).is_err()
    });
    assert!(gave_up);

    let count = |outcome: &str, dest: String| {
        format!(
            "tcpconnlat_connect_duration_seconds_count{{outcome=\"{outcome}\",dest=\"{dest}\"}}"
        )
    };
    let refused = count("refused", format!("127.0.0.1:{closed}"));
    assert_eq!(prometheus.query_until(&refused, |v| v >= 3.0), Some(3.0));
    let established = count("established", format!("127.0.0.1:{}", server.port()));
    assert_eq!(
        prometheus.query_until(&established, |v| v >= 4.0),
        Some(4.0)
    );
    assert_eq!(
        prometheus.query_until(&count("timeout", silent.to_string()), |v| v >= 1.0),
        Some(1.0)
    );
    let retransmits = format!("tcpconnlat_syn_retransmits_total{{dest=\"{silent}\"}}");
    assert_eq!(
        prometheus.query_until(&retransmits, |v| v >= 1.0),
        Some(1.0)
    );
    // The median loopback handshake: above zero, far below the first bucket past a
    // millisecond-scale handshake.
    let median = format!(
        "histogram_quantile(0.5, sum by (le) (tcpconnlat_connect_duration_seconds_bucket{{outcome=\"established\",dest=\"127.0.0.1:{}\"}}))",
        server.port()
    );
    let p50 = prometheus.query_until(&median, |v| v > 0.0).unwrap();
    assert!(p50 > 0.0 && p50 < 0.05, "median handshake {p50} s");
    // And the timeout's latency: about 1.5 s, which its buckets hold.
    let timeout_sum =
        format!("tcpconnlat_connect_duration_seconds_sum{{outcome=\"timeout\",dest=\"{silent}\"}}");
    let took = prometheus.query_until(&timeout_sum, |v| v > 0.0).unwrap();
    assert!((1.3..3.0).contains(&took), "timeout took {took} s");
    assert_eq!(prometheus.query("up{job=\"tcpconnlat\"}"), Some(1.0));
    drop(prometheus);
    assert!(tracer.interrupt().success());
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn promtool_finds_nothing_to_say_about_a_scrape() {
    let _serial = serial();
    let server = listen_on_a_service_port();
    let closed = closed_service_ports(1)[0];
    let (tracer, addr) = serving(&["-p", &me(), "--label", "cgroup"]);
    connect(server);
    let _ = TcpStream::connect(("127.0.0.1", closed));
    let text = scrape_until(addr, |t| t.contains("outcome=\"refused\""));
    assert!(text.contains(",cgroup=\""), "{text}");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (Debian package prometheus)");
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}\n{text}"
    );
    assert!(tracer.interrupt().success());
}

/// Every query of packaging/grafana-dashboard.json is PromQL this Prometheus accepts, and
/// answers with data once a few connects were scraped.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn every_dashboard_query_runs_on_a_real_prometheus() {
    let _serial = serial();
    let dashboard: Value =
        serde_json::from_str(include_str!("../packaging/grafana-dashboard.json")).unwrap();
    let server = listen_on_a_service_port();
    let closed = closed_service_ports(1)[0];
    let (tracer, addr) = serving(&["-p", &me()]);
    let prometheus = Prometheus::start(addr);
    // Two scrapes apart, so that rates have two points.
    for round in 0..2 {
        connect(server);
        let _ = TcpStream::connect(("127.0.0.1", closed));
        let scraped = format!(
            "tcpconnlat_connect_duration_seconds_count{{outcome=\"refused\",dest=\"127.0.0.1:{closed}\"}}"
        );
        prometheus.query_until(&scraped, |v| v >= f64::from(round + 1));
    }
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let promql = target["expr"]
                .as_str()
                .unwrap()
                .replace("$instance", ".*")
                .replace("$__rate_interval", "1m");
            let series = prometheus.answers(&promql);
            assert!(series.is_ok(), "{}: {promql}: {series:?}", panel["title"]);
            checked += 1;
        }
    }
    assert!(checked >= 10, "{checked} queries");
    // The ones that need no failure to have data have it.
    for promql in [
        "tcpconnlat_build_info",
        "sum(tcpconnlat_series)",
        "sum by (outcome) (rate(tcpconnlat_connect_duration_seconds_count{outcome!=\"established\"}[1m]))",
    ] {
        let end = Instant::now() + Duration::from_secs(20);
        while prometheus.answers(promql) == Ok(0) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(500));
        }
        assert_eq!(prometheus.answers(promql), Ok(1), "{promql}");
    }
    drop(prometheus);
    assert!(tracer.interrupt().success());
}
