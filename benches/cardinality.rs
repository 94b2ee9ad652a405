//! Fleet mode's memory against many destinations: 100,000 refused connects to 20,000
//! destinations (200 loopback addresses × 100 closed ports) into `tcpconnlat --serve`,
//! with the default `--max-series` (5,000 series) and with room for every destination, side
//! by side. Prints resident memory at start and its peak after, the label sets and series
//! in use (and the series a scrape holds), what was folded and the size of a scrape;
//! asserts nothing. Root (it loads the probes).
//!
//! `TCPCONNLAT_BENCH_CARD_CONNECTS` and `TCPCONNLAT_BENCH_CARD_DESTS` make it smaller.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tcpconnlat");
const PORTS: u16 = 100;
const FIRST_PORT: u16 = 21000;

fn from_env(name: &str, default: usize) -> usize {
    std::env::var(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number"))
    })
}

fn main() {
    let connects = from_env("TCPCONNLAT_BENCH_CARD_CONNECTS", 100_000);
    let dests = from_env("TCPCONNLAT_BENCH_CARD_DESTS", 20_000);
    let targets = destinations(dests);
    println!(
        "cardinality: {connects} refused connects to {} destinations, --serve\n",
        targets.len()
    );
    println!(
        "{:<26} {:>12} {:>12} {:>11} {:>8} {:>8} {:>10} {:>12} {:>9}",
        "--max-series",
        "RSS start",
        "peak after",
        "label sets",
        "series",
        "scraped",
        "folded",
        "scrape",
        "took"
    );
    // Room for all: each destination's refused histogram (15 series) and counter, and more.
    let room = 20 * (dests + 100);
    for max_series in [5000, room] {
        let run = Run::start(max_series);
        let (rss_start, _) = run.memory_kb();
        let started = Instant::now();
        for i in 0..connects {
            let _ = TcpStream::connect(targets[i % targets.len()]);
        }
        let text = run.scraped_when(|t| refused(t) >= connects as f64);
        let took = started.elapsed();
        let (_, peak) = run.memory_kb();
        let label = if max_series == 5000 {
            "5000 (default)".to_owned()
        } else {
            format!("{max_series} (room for all)")
        };
        let scraped = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .count();
        println!(
            "{label:<26} {:>9} kB {:>9} kB {:>11} {:>8} {:>8} {:>10} {:>9} kB {:>8.1}s",
            rss_start,
            peak,
            value(&text, "tcpconnlat_label_sets").unwrap_or(0.0),
            value(&text, "tcpconnlat_series").unwrap_or(0.0),
            scraped,
            value(&text, "tcpconnlat_series_folded_total").unwrap_or(0.0),
            text.len() / 1024,
            took.as_secs_f64()
        );
        if refused(&text) < connects as f64 {
            println!("  (only {} of {connects} connects counted)", refused(&text));
        }
    }
}

/// `n` loopback destinations where nothing listens: a connect is refused at once.
fn destinations(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| {
            let host = (i / usize::from(PORTS)) as u32;
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 1, 0, 1)) + host);
            SocketAddr::from((ip, FIRST_PORT + (i % usize::from(PORTS)) as u16))
        })
        .collect()
}

/// Connects counted as refused, over every destination.
fn refused(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("tcpconnlat_connect_duration_seconds_count{outcome=\"refused\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

struct Run {
    child: Child,
    addr: SocketAddr,
}

impl Run {
    fn start(max_series: usize) -> Run {
        let mut child = Command::new(BIN)
            .args([
                "--serve",
                "127.0.0.1:0",
                "-p",
                &std::process::id().to_string(),
            ])
            .args(["--max-series", &max_series.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tcpconnlat");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let addr = stderr
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                Some(
                    l.split("http://")
                        .nth(1)?
                        .strip_suffix("/metrics")?
                        .to_owned(),
                )
            })
            .expect("tcpconnlat did not serve")
            .parse()
            .unwrap();
        Run { child, addr }
    }

    fn scrape(&self) -> String {
        ureq::get(&format!("http://{}/metrics", self.addr))
            .call()
            .ok()
            .and_then(|mut r| {
                r.body_mut()
                    .with_config()
                    .limit(1 << 30)
                    .read_to_string()
                    .ok()
            })
            .unwrap_or_default()
    }

    fn scraped_when(&self, done: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let text = self.scrape();
            if done(&text) || Instant::now() > end {
                return text;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// (VmRSS, VmHWM) in kB.
    fn memory_kb(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}
