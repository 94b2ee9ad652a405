//! The metrics of fleet mode: connects become Prometheus histograms and counters, with a
//! bounded number of label sets. What a scrape returns is encoded by the
//! `prometheus-client` crate.
//!
//! Cardinality is a promise: a label set is a destination (as coarse as `--dest` says)
//! and, with `--label cgroup`, a cgroup. At most `--max-series` of them exist at once; a
//! connect to one more is counted under `dest="other"` (and in
//! `tcpconnlat_series_folded_total`), and a label set no connect used for `--series-ttl`
//! is dropped, with every series it had.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tcpconnlat_compat::Mode;

use crate::tracer::event::{host_part, Event, Outcome};
use crate::tracer::stream::Shortfall;

/// What the `dest` label holds (`--dest`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DestLabel {
    /// daddr:dport
    IpPort,
    Ip,
    Port,
    /// No dest label value: every destination is one.
    None,
}

/// How label sets are made and bounded.
#[derive(Clone, Debug)]
pub struct LabelRules {
    pub dest: DestLabel,
    /// Also a `cgroup` label (`--label cgroup`).
    pub cgroup: bool,
    /// Destination ports in this range (the kernel's ephemeral ports) are never label
    /// values: they are as many as connections.
    pub ephemeral: RangeInclusive<u16>,
    pub max_series: usize,
    pub ttl: Duration,
}

/// The label set of a destination (and cgroup).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    dest: String,
    cgroup: Option<String>,
}

impl SeriesKey {
    const OTHER: &'static str = "other";

    fn folded(cgroup: bool) -> SeriesKey {
        SeriesKey {
            dest: Self::OTHER.to_owned(),
            cgroup: cgroup.then(|| Self::OTHER.to_owned()),
        }
    }

    fn labels(&self) -> Labels {
        let mut labels = vec![("dest", self.dest.clone())];
        if let Some(cgroup) = &self.cgroup {
            labels.push(("cgroup", cgroup.clone()));
        }
        labels
    }

    fn with_outcome(&self, outcome: Outcome) -> Labels {
        let mut labels = vec![("outcome", outcome.name().to_owned())];
        labels.extend(self.labels());
        labels
    }
}

type Labels = Vec<(&'static str, String)>;

/// Makes each new histogram with the configured buckets.
#[derive(Clone)]
struct MakeHistogram(Arc<Vec<f64>>);

impl MetricConstructor<Histogram> for MakeHistogram {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// A label set in use: when it was last used, and which outcomes have series.
struct Live {
    last: Instant,
    outcomes: Vec<Outcome>,
}

/// The metrics one tracer exports.
pub struct Metrics {
    pub registry: Registry,
    durations: Family<Labels, Histogram, MakeHistogram>,
    retransmits: Family<Labels, Counter>,
    lost: Counter,
    untracked: Counter,
    missed: Counter,
    folded: Counter,
    accept_errors: Counter,
    label_sets: Gauge,
    live: Mutex<HashMap<SeriesKey, Live>>,
    rules: LabelRules,
}

/// What `tcpconnlat_info` says.
pub struct Identity<'a> {
    pub mode: Mode,
    pub transport: &'a str,
    pub kernel: &'a str,
}

impl Metrics {
    /// 50 µs to 210 s (beyond the ~127 s of the kernel's default SYN retries), doubling.
    pub fn default_buckets() -> Vec<f64> {
        prometheus_client::metrics::histogram::exponential_buckets(50e-6, 2.0, 23).collect()
    }

    pub fn new(rules: LabelRules, buckets: Vec<f64>, identity: &Identity<'_>) -> Metrics {
        // No registry prefix: `tcpconnlat_info` is an info metric named `tcpconnlat`.
        let mut registry = Registry::default();
        let metrics = Metrics {
            registry: Registry::default(),
            durations: Family::new_with_constructor(MakeHistogram(Arc::new(buckets))),
            retransmits: Family::default(),
            lost: Counter::default(),
            untracked: Counter::default(),
            missed: Counter::default(),
            folded: Counter::default(),
            accept_errors: Counter::default(),
            label_sets: Gauge::default(),
            live: Mutex::new(HashMap::new()),
            rules,
        };
        registry.register_with_unit(
            "tcpconnlat_connect_duration",
            "TCP handshake time: SYN sent to SYN-ACK or RST processed, or to giving up",
            Unit::Seconds,
            metrics.durations.clone(),
        );
        registry.register(
            "tcpconnlat_syn_retransmits",
            "SYNs sent again before connects ended",
            metrics.retransmits.clone(),
        );
        for (name, help, counter) in [
            (
                "tcpconnlat_lost_events",
                "Connects not reported: the event buffer was full (raise --buffer-pages)",
                &metrics.lost,
            ),
            (
                "tcpconnlat_untracked_connects",
                "Connects not timed: more than --max-pending waited for an answer at once",
                &metrics.untracked,
            ),
            (
                "tcpconnlat_missed_connects",
                "Connects whose end the kernel did not show the probes",
                &metrics.missed,
            ),
            (
                "tcpconnlat_series_folded",
                "Connects counted under dest=\"other\": --max-series label sets were in use",
                &metrics.folded,
            ),
            (
                "tcpconnlat_accept_errors",
                "Scrape connections the exporter failed to accept (out of descriptors or memory)",
                &metrics.accept_errors,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "tcpconnlat_label_sets",
            "Label sets in use (at most --max-series, and the folded one)",
            metrics.label_sets.clone(),
        );
        registry.register(
            "tcpconnlat",
            "How this tracer traces",
            Info::new(vec![
                ("mode", identity.mode.name().to_owned()),
                ("transport", identity.transport.to_owned()),
                ("kernel", identity.kernel.to_owned()),
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ]),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Count one connect.
    pub fn observe(&self, e: &Event, cgroup: Option<String>) {
        let key = self.key_for(e, cgroup);
        let labels = self.claim(key, e.outcome);
        let seconds = e.lat_ns as f64 / 1e9;
        self.durations
            .get_or_create(&labels.with_outcome(e.outcome))
            .observe(seconds);
        if e.syn_retrans > 0 {
            self.retransmits
                .get_or_create(&labels.labels())
                .inc_by(u64::from(e.syn_retrans));
        }
    }

    fn key_for(&self, e: &Event, cgroup: Option<String>) -> SeriesKey {
        let port = if self.rules.ephemeral.contains(&e.dport) {
            "ephemeral".to_owned()
        } else {
            e.dport.to_string()
        };
        let ip = host_part(&e.daddr);
        let dest = match self.rules.dest {
            DestLabel::IpPort => format!("{ip}:{port}"),
            DestLabel::Ip => ip,
            DestLabel::Port => port,
            DestLabel::None => String::new(),
        };
        SeriesKey {
            dest,
            cgroup: self.rules.cgroup.then(|| cgroup.unwrap_or_default()),
        }
    }

    /// The label set a connect is counted under: its own, or, with `--max-series` in use
    /// already, the folded one.
    fn claim(&self, key: SeriesKey, outcome: Outcome) -> SeriesKey {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let key = if live.contains_key(&key) || live.len() < self.rules.max_series {
            key
        } else {
            self.folded.inc();
            SeriesKey::folded(self.rules.cgroup)
        };
        let entry = live.entry(key.clone()).or_insert(Live {
            last: now,
            outcomes: Vec::new(),
        });
        entry.last = now;
        if !entry.outcomes.contains(&outcome) {
            entry.outcomes.push(outcome);
        }
        self.label_sets.set(live.len() as i64);
        key
    }

    /// A scrape connection could not be accepted.
    pub fn accept_failed(&self) {
        self.accept_errors.inc();
    }

    /// Count connects tracing could not show.
    pub fn shortfall(&self, shortfall: Shortfall) {
        let counter = match shortfall {
            Shortfall::Lost { .. } => &self.lost,
            Shortfall::Untracked { .. } => &self.untracked,
            Shortfall::Missed { .. } => &self.missed,
        };
        counter.inc_by(shortfall.count());
    }

    /// Drop the label sets no connect used for `--series-ttl`; how many.
    pub fn expire(&self) -> usize {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let ttl = self.rules.ttl;
        let idle: Vec<SeriesKey> = live
            .iter()
            .filter(|(_, l)| l.last.elapsed() >= ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &idle {
            if let Some(gone) = live.remove(key) {
                for outcome in gone.outcomes {
                    self.durations.remove(&key.with_outcome(outcome));
                }
                self.retransmits.remove(&key.labels());
            }
        }
        self.label_sets.set(live.len() as i64);
        idle.len()
    }

    /// Label sets in use.
    #[cfg(test)]
    fn series(&self) -> usize {
        self.label_sets.get() as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(daddr: &str, dport: u16, outcome: Outcome, lat_ms: u64) -> Event {
        Event {
            lat_ns: lat_ms * 1_000_000,
            daddr: daddr.parse().unwrap(),
            dport,
            outcome,
            syn_retrans: 1,
            ..Event::sample()
        }
    }

    fn metrics(dest: DestLabel, max_series: usize, ttl: Duration) -> Metrics {
        let rules = LabelRules {
            dest,
            cgroup: false,
            ephemeral: 32768..=60999,
            max_series,
            ttl,
        };
        let identity = Identity {
            mode: Mode::Tracepoint,
            transport: "ring buffer",
            kernel: "6.18.0",
        };
        Metrics::new(rules, Metrics::default_buckets(), &identity)
    }

    fn scrape(m: &Metrics) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry).unwrap();
        text
    }

    #[test]
    fn connects_become_histograms_and_counters_by_outcome_and_dest() {
        let m = metrics(DestLabel::IpPort, 10, Duration::from_secs(900));
        m.observe(&event("10.0.0.2", 443, Outcome::Established, 2), None);
        m.observe(&event("10.0.0.2", 443, Outcome::Refused, 1), None);
        m.observe(&event("::1", 50000, Outcome::Timeout, 3000), None);
        let text = scrape(&m);
        for line in [
            r#"tcpconnlat_connect_duration_seconds_count{outcome="established",dest="10.0.0.2:443"} 1"#,
            r#"tcpconnlat_connect_duration_seconds_count{outcome="refused",dest="10.0.0.2:443"} 1"#,
            r#"tcpconnlat_connect_duration_seconds_count{outcome="timeout",dest="[::1]:ephemeral"} 1"#,
            r#"tcpconnlat_syn_retransmits_total{dest="10.0.0.2:443"} 2"#,
            r#"tcpconnlat_info{mode="tracepoint",transport="ring buffer",kernel="6.18.0","#,
        ] {
            assert!(text.contains(line), "no {line} in:\n{text}");
        }
        assert!(
            text.contains(r#"le="5e-5""#) || text.contains(r#"le="0.00005""#),
            "{text}"
        );
    }

    #[test]
    fn label_sets_beyond_the_cap_fold_into_other_and_idle_ones_expire() {
        let m = metrics(DestLabel::IpPort, 2, Duration::ZERO);
        for port in [1, 2, 3, 4] {
            m.observe(&event("10.0.0.2", port, Outcome::Refused, 1), None);
        }
        // Two label sets of their own; the others share "other" (which is one more).
        assert_eq!(m.series(), 3);
        let text = scrape(&m);
        assert!(text.contains(r#"dest="other"} 2"#), "{text}");
        assert!(text.contains("tcpconnlat_series_folded_total 2"), "{text}");
        assert_eq!(m.expire(), 3);
        assert_eq!(m.series(), 0);
        assert!(!scrape(&m).contains(",dest="), "{}", scrape(&m));
    }

    #[test]
    fn coarser_dest_labels() {
        for (dest, want) in [
            (DestLabel::Ip, r#"dest="10.0.0.2""#),
            (DestLabel::Port, r#"dest="443""#),
            (DestLabel::None, r#"dest="""#),
        ] {
            let m = metrics(dest, 10, Duration::from_secs(60));
            m.observe(&event("10.0.0.2", 443, Outcome::Established, 1), None);
            assert!(scrape(&m).contains(want), "{dest:?}: {}", scrape(&m));
        }
    }
}
