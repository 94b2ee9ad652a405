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
        Prometheus::with_features(target, &[])
    }

    /// With these `--enable-feature` flags.
    fn with_features(target: SocketAddr, features: &[&str]) -> Prometheus {
        Prometheus::run(
            &format!(
                "  - job_name: tcpconnlat\n    static_configs:\n      - targets: ['{target}']\n"
            ),
            features,
        )
    }

    /// Scraping every second with these `scrape_configs` entries (YAML, indented).
    fn with_jobs(jobs: &str) -> Prometheus {
        Prometheus::run(jobs, &[])
    }

    fn run(jobs: &str, features: &[&str]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{jobs}"
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
            .args(features.iter().map(|f| format!("--enable-feature={f}")))
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

/// A Prometheus with native histograms scrapes them (the protobuf exposition) and its
/// `histogram_quantile` agrees with the exact percentiles of the same connects, seen by a
/// JSON tracer beside the exporter, within the native buckets' width: a mix of handshakes
/// answered at once and after one or two lost SYNs.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn native_histograms_give_quantiles_within_their_resolution() {
    let _serial = serial();
    const CONNECTS: usize = 30;
    let net = NetPair::new();
    let server: SocketAddr = format!("{}:8443", net.server_v4()).parse().unwrap();
    let listener = NetPair::within(&net.b, move || TcpListener::bind(server).unwrap());
    net.drop_every_nth_syn(server.port(), 3);
    let (exporter, addr) = serving(&["-p", &me()]);
    let json = Tracer::start(&["--json", "-p", &me()]);
    let prometheus = Prometheus::with_features(addr, &["native-histograms"]);
    NetPair::within(&net.a, move || {
        for _ in 0..CONNECTS {
            TcpStream::connect_timeout(&server, Duration::from_secs(10)).unwrap();
        }
    });
    drop(listener);

    // Ours only: waiting for Prometheus to listen made connects too.
    let ours = |e: &&Value| {
        e["type"] == "connect"
            && e["daddr"] == server.ip().to_string()
            && e["dport"] == server.port()
    };
    let events = json.events_until(Duration::from_secs(10), |ev| {
        ev.iter().filter(ours).count() >= CONNECTS
    });
    let reported: Vec<&Value> = events.iter().filter(ours).collect();
    assert_eq!(reported.len(), CONNECTS, "{events:#?}");
    // Every one established; an end the kernel ran no probe for (it skips them while
    // another BPF program or a bpf() call is running on that CPU: here two tracers and
    // their sweepers) is found by the sweeper, and where its socket was closed by then
    // with no error left, its outcome is unknown: counted in neither histogram.
    let mut exact: Vec<f64> = Vec::new();
    for e in reported {
        if e["outcome"] == "established" && e["end"] == "seen" {
            exact.push(e["lat_us"].as_f64().unwrap() / 1e6);
        } else {
            assert_eq!(
                (&e["end"], &e["outcome"]),
                (&"inferred".into(), &"unknown".into()),
                "{e}"
            );
        }
    }
    let connects = exact.len();
    exact.sort_by(f64::total_cmp);
    let retried = exact.iter().filter(|&&s| s > 0.5).count();
    assert!(
        (1..connects).contains(&retried),
        "not a mix: {retried} of {connects} retried: {exact:?}"
    );

    let series =
        format!("tcpconnlat_connect_duration_seconds{{outcome=\"established\",dest=\"{server}\"}}");
    let count = prometheus.query_until(&format!("histogram_count({series})"), |v| {
        v >= connects as f64
    });
    assert_eq!(count, Some(connects as f64), "the native histogram's count");
    // A native bucket of schema 3 spans a factor of 2^(1/8); the quantile is interpolated
    // within the bucket that holds the value. The exporter and the JSON tracer time each
    // connect with programs of their own, run one after the other on the same state
    // changes, so one connect's two latencies differ by some microseconds (SKEW): the
    // exporter's value may sit in the next bucket when the handshake took microseconds.
    const SKEW: f64 = 10e-6;
    let width = 2f64.powf(1.0 / 8.0) - 1.0;
    for q in [0.25, 0.5, 0.75, 0.9, 0.99] {
        let rank = ((q * connects as f64).ceil() as usize).max(1);
        let truth = exact[rank - 1];
        let native = prometheus
            .query(&format!("histogram_quantile({q}, {series})"))
            .unwrap();
        eprintln!("q {q}: exact {truth:.6} s, native histogram {native:.6} s");
        assert!(
            (native - truth).abs() <= (truth + SKEW) * width + SKEW,
            "q {q}: native {native} s, exact {truth} s: {exact:?}"
        );
    }
    drop(prometheus);
    assert!(json.interrupt().success());
    assert!(exporter.interrupt().success());
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

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir` as PEM:
/// ca.crt, server.crt, server.key, client.crt, client.key; and clients-ca.crt (the CA).
fn certificates(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    write("ca.crt", ca.pem());
    write("clients-ca.crt", ca.pem());
    for (name, names) in [
        ("server", vec!["127.0.0.1".to_owned()]),
        ("client", vec!["prometheus".to_owned()]),
    ] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        write(&format!("{name}.crt"), cert.pem());
        write(&format!("{name}.key"), key.serialize_pem());
    }
}

/// The example web configuration (packaging/web-config.yml: mutual TLS and a password),
/// with certificates made for it: Prometheus scrapes over TLS with the password and a
/// client certificate, and up is 1; with a wrong password, or no client certificate, up
/// is 0. A plain HTTP client on the TLS port is closed, and scrapes go on.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn scrapes_need_tls_a_client_certificate_and_the_password() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let config = dir.path().join("web-config.yml");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/web-config.yml"),
        &config,
    )
    .unwrap();
    let check = Command::new("promtool")
        .args(["check", "web-config"])
        .arg(&config)
        .output()
        .expect("promtool");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let (tracer, addr) = serving(&["-p", &me(), "--web-config", config.to_str().unwrap()]);
    assert!(tracer
        .stderr
        .lock()
        .unwrap()
        .contains(&format!("https://{addr}/metrics")));
    let d = dir.path().display();
    let job = |name: &str, password: &str, client_cert: bool| {
        let cert = if client_cert {
            format!("\n      cert_file: {d}/client.crt\n      key_file: {d}/client.key")
        } else {
            String::new()
        };
        format!(
            "  - job_name: {name}\n    scheme: https\n    tls_config:\n      ca_file: {d}/ca.crt{cert}\n    basic_auth:\n      username: prometheus\n      password: {password}\n    static_configs:\n      - targets: ['{addr}']\n"
        )
    };
    let prometheus = Prometheus::with_jobs(&format!(
        "{}{}{}",
        job("good", "change-me", true),
        job("wrong_password", "guess", true),
        job("no_client_cert", "change-me", false),
    ));
    for (name, want) in [
        ("good", 1.0),
        ("wrong_password", 0.0),
        ("no_client_cert", 0.0),
    ] {
        let up = prometheus.query_until(&format!("up{{job=\"{name}\"}}"), |v| v == want);
        assert_eq!(up, Some(want), "up for {name}");
    }
    // Plain HTTP on the TLS port: closed, nothing served, the scrapes go on.
    let mut plain = TcpStream::connect(addr).unwrap();
    use std::io::{Read, Write};
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("tcpconnlat_"),
        "served in clear"
    );
    let scraped = || prometheus.query("sum(scrape_samples_scraped{job=\"good\"})");
    let before = prometheus.query_until("count_over_time(up{job=\"good\"}[1m])", |_| true);
    std::thread::sleep(Duration::from_secs(3));
    let after = prometheus.query_until("count_over_time(up{job=\"good\"}[1m])", |_| true);
    assert!(after > before, "scrapes stopped: {before:?} {after:?}");
    assert_eq!(prometheus.query("up{job=\"good\"}"), Some(1.0));
    assert!(scraped().is_some_and(|n| n > 10.0));
    drop(prometheus);
    assert!(tracer.interrupt().success());
}

/// A web configuration in `dir`: these lines, written as web-config.yml; its path.
fn web_config(dir: &std::path::Path, lines: &str) -> String {
    let path = dir.join("web-config.yml");
    std::fs::write(&path, lines).unwrap();
    let check = Command::new("promtool")
        .args(["check", "web-config"])
        .arg(&path)
        .output()
        .expect("promtool");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    path.to_str().unwrap().to_owned()
}

/// TLS alone (no client certificate, no password), and mutual TLS alone (no password):
/// each scraped by the real Prometheus, up 1; without the client certificate, up 0.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn tls_alone_and_mutual_tls_alone_are_scraped() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let d = dir.path().display();
    let tls =
        format!("tls_server_config:\n  cert_file: {d}/server.crt\n  key_file: {d}/server.key\n");
    let mutual = format!(
        "{tls}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {d}/clients-ca.crt\n"
    );
    for (name, config) in [("tls", tls), ("mtls", mutual)] {
        let config = web_config(dir.path(), &config);
        let (tracer, addr) = serving(&["-p", &me(), "--web-config", &config]);
        let job = |job: &str, client_cert: bool| {
            let cert = if client_cert {
                format!("\n      cert_file: {d}/client.crt\n      key_file: {d}/client.key")
            } else {
                String::new()
            };
            format!(
                "  - job_name: {job}\n    scheme: https\n    tls_config:\n      ca_file: {d}/ca.crt{cert}\n    static_configs:\n      - targets: ['{addr}']\n"
            )
        };
        let prometheus = Prometheus::with_jobs(&format!(
            "{}{}",
            job("with_cert", true),
            job("without", false)
        ));
        let without = if name == "tls" { 1.0 } else { 0.0 };
        for (job, want) in [("with_cert", 1.0), ("without", without)] {
            let up = prometheus.query_until(&format!("up{{job=\"{job}\"}}"), |v| v == want);
            assert_eq!(up, Some(want), "{name}: up for {job}");
        }
        drop(prometheus);
        assert!(tracer.interrupt().success());
    }
}

/// Four clients send wrong passwords as fast as they can for 10 s (a new one each time,
/// so that none is answered from memory) against a bcrypt cost of 12, while connects are
/// made and the right password scrapes twice a second: every right scrape is answered
/// within a second, every wrong one is a 401 with `WWW-Authenticate`, and every connect
/// is counted.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn wrong_passwords_cost_tracing_and_scrapes_nothing() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("right", 12).unwrap();
    let config = web_config(
        dir.path(),
        &format!("basic_auth_users:\n  prometheus: {hash}\n"),
    );
    let (tracer, addr) = serving(&["-p", &me(), "--web-config", &config]);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let get = |password: &str| {
        use base64::Engine;
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("prometheus:{password}"));
        let started = Instant::now();
        let mut response = agent
            .get(&format!("http://{addr}/metrics"))
            .header("Authorization", &format!("Basic {token}"))
            .call()
            .unwrap();
        let challenge = response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response.body_mut().read_to_string().unwrap_or_default();
        (
            response.status().as_u16(),
            challenge,
            body,
            started.elapsed(),
        )
    };
    // Prometheus scrapes from the start: its password is checked once, then remembered.
    assert_eq!(get("right").0, 200);
    let server = listen_on_a_service_port();
    let stop = AtomicBool::new(false);
    let refused = AtomicUsize::new(0);
    let mut slowest = Duration::ZERO;
    let mut made = 0;
    std::thread::scope(|s| {
        for client in 0..4 {
            let (get, stop, refused) = (&get, &stop, &refused);
            s.spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let (status, challenge, _, _) = get(&format!("guess-{client}-{n}"));
                    assert_eq!(status, 401);
                    assert_eq!(challenge.as_deref(), Some("Basic realm=\"tcpconnlat\""));
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            for _ in 0..10 {
                drop(TcpStream::connect(server).unwrap());
                made += 1;
            }
            let (status, _, body, took) = get("right");
            assert_eq!(status, 200);
            assert!(body.contains("tcpconnlat_series"), "{body}");
            slowest = slowest.max(took);
            std::thread::sleep(Duration::from_millis(500));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let mut counted = 0.0;
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end && counted != made as f64 {
        counted = served_count(&get("right").2, "established", &server.to_string());
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = get("right").2;
    eprintln!(
        "{} wrong passwords refused; {made} connects made, {counted} counted; the slowest right scrape took {slowest:?}",
        refused.load(Ordering::Relaxed)
    );
    assert_eq!(counted, made as f64, "connects not counted");
    assert_eq!(sample(&text, "tcpconnlat_lost_events_total"), Some(0.0));
    assert!(
        slowest < Duration::from_secs(1),
        "a right scrape took {slowest:?}"
    );
    assert!(
        refused.load(Ordering::Relaxed) >= 4,
        "the wrong clients did not run"
    );
    assert!(tracer.interrupt().success());
}
