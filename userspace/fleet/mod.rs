//! Fleet mode (`--serve`): tcpconnlat as a Prometheus exporter. Connects become metrics
//! (metrics.rs) served over HTTP (http.rs) until a signal or `-d`.
//!
//! - `labels`: the label set a connect is counted under;
//! - `budget`: which label sets `--max-series` holds, and when they expire;
//! - `handles`: a cache of series handles by raw destination;
//! - `metrics`: the registry they all feed, and what a scrape encodes;
//! - `http`, `auth`, `web`: serving it, with TLS and basic auth.

mod auth;
mod budget;
mod handles;
mod http;
mod labels;
pub mod metrics;
mod process;
mod web;

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use tokio::net::TcpListener;

use crate::host::cgroup::CgroupPaths;
use crate::pump::{self, Limits, Signals, Sink};
use crate::tracer::event::Event;
use crate::tracer::stream::{EventStream, Shortfall};
pub use labels::{DestLabel, LabelRules};
pub use metrics::{Identity, Metrics};

/// What the user asked of `--serve`, as parsed.
#[derive(Clone, Debug)]
pub struct ServeArgs {
    pub addr: SocketAddr,
    pub dest: DestLabel,
    /// `--label cgroup`.
    pub cgroup_label: bool,
    pub max_series: usize,
    pub ttl: Duration,
    /// Empty for the defaults.
    pub buckets: Vec<f64>,
    /// `--web-config`: TLS and basic auth.
    pub web_config: Option<std::path::PathBuf>,
}

/// `--serve`, checked against the host before anything is loaded.
pub struct Fleet {
    addr: SocketAddr,
    guard: http::Guard,
    metrics: Metrics,
    ttl: Duration,
    cgroups: Option<CgroupPaths>,
}

impl Fleet {
    /// Check the arguments: a bad one is an error before anything is loaded.
    pub fn new(args: ServeArgs) -> Result<Fleet> {
        let buckets = if args.buckets.is_empty() {
            Metrics::default_buckets()
        } else if args.buckets.len() > 100 || !args.buckets.windows(2).all(|w| w[0] < w[1]) {
            bail!("--buckets: give at most 100 bounds, each larger than the one before");
        } else {
            args.buckets
        };
        let rules = LabelRules {
            dest: args.dest,
            cgroup: args.cgroup_label,
            ephemeral: ephemeral_ports(),
            max_series: args.max_series,
            ttl: args.ttl,
        };
        let cgroup_label = rules.cgroup;
        let ttl = rules.ttl;
        // Made now: --max-series must hold their fixed series, or nothing is loaded.
        let metrics = Metrics::new(rules, buckets)?;
        let cgroups = cgroup_label.then(|| {
            let (paths, note) = CgroupPaths::new();
            if let Some(note) = note {
                note!("tcpconnlat: {note}");
            }
            paths
        });
        let guard = match &args.web_config {
            None => http::Guard::default(),
            Some(path) => {
                let config = web::WebConfig::read(path)?;
                http::Guard {
                    tls: config.tls.map(web::Tls::new).transpose()?,
                    auth: config.basic_auth,
                }
            }
        };
        Ok(Fleet {
            addr: args.addr,
            guard,
            metrics,
            ttl,
            cgroups,
        })
    }

    /// Bind the listening socket (before the probes load: a port in use fails at once).
    /// Needs a tokio runtime.
    pub async fn bind(self) -> Result<Server> {
        let listener = http::bind(self.addr).await?;
        Ok(Server {
            fleet: self,
            listener,
        })
    }
}

/// The exporter, bound, ready to serve.
pub struct Server {
    fleet: Fleet,
    listener: TcpListener,
}

impl Server {
    /// Serve metrics of what `stream` yields until a signal (or `duration`).
    pub async fn serve(
        self,
        stream: EventStream<'_>,
        identity: &Identity<'_>,
        duration: Option<Duration>,
        signals: Signals,
    ) -> Result<()> {
        let Fleet {
            mut metrics,
            ttl,
            cgroups,
            guard,
            ..
        } = self.fleet;
        let scheme = if guard.tls.is_some() { "https" } else { "http" };
        metrics.identify(identity);
        let metrics = Arc::new(metrics);
        let address = self.listener.local_addr()?;
        let server = tokio::spawn(http::serve(self.listener, metrics.clone(), Arc::new(guard)));
        note!("tcpconnlat: serving Prometheus metrics at {scheme}://{address}/metrics");
        let mut recorder = Recorder {
            metrics: &metrics,
            cgroups,
        };
        // Idle label sets are dropped as they pass --series-ttl, checked every few seconds.
        let limits = Limits {
            duration,
            count: None,
            interval: Some(ttl.min(Duration::from_secs(10))),
        };
        let result = pump::pump(stream, &mut recorder, limits, signals).await;
        server.abort();
        result
    }
}

/// Feeds tracer records into [`Metrics`]; prints nothing but warnings.
struct Recorder<'m> {
    metrics: &'m Metrics,
    /// Where `--label cgroup` asks for connects' cgroup paths.
    cgroups: Option<CgroupPaths>,
}

impl Sink for Recorder<'_> {
    fn event(&mut self, e: &Event) -> std::io::Result<()> {
        let cgroups = &mut self.cgroups;
        self.metrics
            .observe(e, || cgroups.as_mut().map(|c| c.path(e.cgroup_id)));
        Ok(())
    }

    fn shortfall(&mut self, shortfall: Shortfall) -> std::io::Result<()> {
        self.metrics.shortfall(shortfall);
        note!("tcpconnlat: {shortfall}");
        Ok(())
    }

    /// Every interval: drop idle label sets.
    fn interval(&mut self) -> std::io::Result<()> {
        self.metrics.expire();
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`), or Linux's default.
fn ephemeral_ports() -> RangeInclusive<u16> {
    let text =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut numbers = text
        .split_whitespace()
        .filter_map(|n| n.parse::<u16>().ok());
    match (numbers.next(), numbers.next()) {
        (Some(low), Some(high)) if low <= high => low..=high,
        _ => 32768..=60999,
    }
}
