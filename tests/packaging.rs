//! packaging/: the systemd unit's capabilities are enough to trace and serve (on this
//! kernel, 5.8+), and the Grafana dashboard is well-formed (its queries are run against a
//! real Prometheus in tests/prometheus.rs).

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::*;

const UNIT: &str = include_str!("../packaging/tcpconnlat.service");
const DASHBOARD: &str = include_str!("../packaging/grafana-dashboard.json");

/// The value of `key=` in the unit.
fn setting(key: &str) -> String {
    UNIT.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
        .to_owned()
}

#[test]
fn the_unit_runs_the_exporter_hardened() {
    assert!(setting("ExecStart").ends_with("tcpconnlat --serve 127.0.0.1:10436"));
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(setting(key), value, "{key}");
    }
    assert_eq!(
        setting("CapabilityBoundingSet"),
        setting("AmbientCapabilities")
    );
}

/// Run as systemd would with this unit: root, but only the unit's capability bounding
/// set and no new privileges. It must trace and serve.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn the_units_capabilities_are_enough_to_trace_and_serve() {
    let _serial = serial();
    let caps: Vec<String> = setting("CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let server = listen_on_a_service_port();
    let bounding = format!("--bounding-set=-all,{}", caps.join(","));
    let mut child = Command::new("setpriv")
        .args([&bounding, "--no-new-privs", "--"])
        .arg(bin())
        .args(["--serve", "127.0.0.1:0", "-p", &me(), "-d", "20"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut said = String::new();
    let addr = loop {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            panic!("did not start with {bounding}: {said}");
        };
        said.push_str(&line);
        said.push('\n');
        if let Some(addr) = line
            .split("http://")
            .nth(1)
            .and_then(|a| a.strip_suffix("/metrics"))
        {
            break addr.parse().unwrap();
        }
    };
    connect(server);
    let series = format!(
        "tcpconnlat_connect_duration_seconds_count{{outcome=\"established\",dest=\"127.0.0.1:{}\"}}",
        server.port()
    );
    let text = scrape_until(addr, |t| sample(t, &series).is_some());
    assert_eq!(sample(&text, &series), Some(1.0), "{said}{text}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn the_dashboard_has_the_panels_the_readme_promises() {
    let dash: Value = serde_json::from_str(DASHBOARD).unwrap();
    let titles: Vec<&str> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for wanted in [
        "latency",
        "p50",
        "p99",
        "outcome",
        "SYN retransmits",
        "Tracer health",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel about {wanted}: {titles:?}"
        );
    }
    let heatmap = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "heatmap")
        .expect("a heatmap");
    assert_eq!(heatmap["targets"][0]["format"], "heatmap");
}
