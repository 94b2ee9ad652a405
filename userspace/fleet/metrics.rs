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

use super::budget::SeriesBudget;
use super::hot::{Hot, HotKey, HotSets};
use crate::tracer::event::{host_part, End, Event, Outcome};
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
    /// Series at most, everything counted (what Prometheus pays for).
    pub max_series: usize,
    pub ttl: Duration,
}

/// The label set of a destination (and cgroup).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct SeriesKey {
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

/// The sample lines of a scrape: the series Prometheus stores.
fn scrape_samples(registry: &Registry) -> usize {
    let mut text = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count()
}

/// The metrics one tracer exports.
pub struct Metrics {
    pub registry: Registry,
    durations: Family<Labels, Histogram, MakeHistogram>,
    retransmits: Family<Labels, Counter>,
    lost: Counter,
    untracked: Counter,
    missed: Counter,
    inferred: Counter,
    table_errors: Counter,
    folded: Counter,
    accept_errors: Counter,
    label_sets: Gauge,
    series: Gauge,
    /// Series that exist whatever the traffic: every metric without labels.
    fixed: usize,
    state: Mutex<State>,
    rules: LabelRules,
}

/// The label sets in use, and the series they may have.
struct State {
    live: HashMap<SeriesKey, Live>,
    budget: SeriesBudget,
    /// The series of destinations counted lately, for the next connect to them.
    hot: HotSets,
}

/// The label set a connect is counted under.
enum Claimed {
    Own(SeriesKey),
    /// `dest="other"`: its own would not fit in `--max-series`.
    Folded(SeriesKey),
}

/// What `tcpconnlat_build_info` says of how this host traces.
pub struct Identity<'a> {
    pub mode: Mode,
    pub transport: &'a str,
    pub kernel: &'a str,
}

impl Metrics {
    /// 50 µs to 210 s (beyond the ~127 s of the kernel's default SYN retries), each four
    /// times the last: 12 buckets, 15 series a histogram.
    pub fn default_buckets() -> Vec<f64> {
        prometheus_client::metrics::histogram::exponential_buckets(50e-6, 4.0, 12).collect()
    }

    /// The metrics, or why `--max-series` cannot hold them.
    pub fn new(
        rules: LabelRules,
        buckets: Vec<f64>,
        identity: &Identity<'_>,
    ) -> Result<Metrics, String> {
        let bucket_count = buckets.len();
        // No registry prefix: `tcpconnlat_build_info` is an info metric named
        // `tcpconnlat_build`.
        let mut registry = Registry::default();
        let metrics = Metrics {
            registry: Registry::default(),
            durations: Family::new_with_constructor(MakeHistogram(Arc::new(buckets))),
            retransmits: Family::default(),
            lost: Counter::default(),
            untracked: Counter::default(),
            missed: Counter::default(),
            inferred: Counter::default(),
            table_errors: Counter::default(),
            folded: Counter::default(),
            accept_errors: Counter::default(),
            label_sets: Gauge::default(),
            series: Gauge::default(),
            fixed: 0,
            state: Mutex::new(State {
                live: HashMap::new(),
                budget: SeriesBudget {
                    own: 0,
                    per_histogram: 0,
                    used: 0,
                },
                hot: HotSets::default(),
            }),
            rules,
        };
        metrics.register(&mut registry, identity);
        registry.register_collector(Box::new(super::process::ProcessCollector));
        // Every series that exists before any connect is fixed: count them as scraped.
        let fixed = scrape_samples(&registry);
        let budget = SeriesBudget::new(metrics.rules.max_series, fixed, bucket_count)?;
        metrics.series.set(fixed as i64);
        Ok(Metrics {
            registry,
            fixed,
            state: Mutex::new(State {
                live: HashMap::new(),
                budget,
                hot: HotSets::default(),
            }),
            ..metrics
        })
    }

    /// Every metric into `registry`, with its help.
    fn register(&self, registry: &mut Registry, identity: &Identity<'_>) {
        registry.register_with_unit(
            "tcpconnlat_connect_duration",
            "TCP handshake time: SYN sent to SYN-ACK or RST processed, or to giving up",
            Unit::Seconds,
            self.durations.clone(),
        );
        registry.register(
            "tcpconnlat_syn_retransmits",
            "SYNs sent again before connects ended",
            self.retransmits.clone(),
        );
        for (name, help, counter) in [
            (
                "tcpconnlat_lost_events",
                "Connects not reported: the event buffer was full (raise --buffer-pages)",
                &self.lost,
            ),
            (
                "tcpconnlat_untracked_connects",
                "Connects not timed: more than --max-pending waited for an answer at once",
                &self.untracked,
            ),
            (
                "tcpconnlat_missed_connects",
                "Connects whose end the kernel did not show the probes",
                &self.missed,
            ),
            (
                "tcpconnlat_inferred_connects",
                "Connects whose end no probe saw, found ended by the sweeper (their durations are bounds)",
                &self.inferred,
            ),
            (
                "tcpconnlat_table_errors",
                "Pending-table updates and deletes the kernel refused (a lock it would not take there)",
                &self.table_errors,
            ),
            (
                "tcpconnlat_series_folded",
                "Connects counted under dest=\"other\": --max-series label sets were in use",
                &self.folded,
            ),
            (
                "tcpconnlat_accept_errors",
                "Scrape connections the exporter failed to accept (out of descriptors or memory)",
                &self.accept_errors,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "tcpconnlat_label_sets",
            "Label sets in use (destinations, and the folded one)",
            self.label_sets.clone(),
        );
        registry.register(
            "tcpconnlat_series",
            "Series this exporter has or keeps room for (at most --max-series)",
            self.series.clone(),
        );
        registry.register(
            "tcpconnlat_build",
            "Which tcpconnlat this is and how it traces here",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_owned()),
                ("revision", env!("TCPCONNLAT_REVISION").to_owned()),
                ("mode", identity.mode.name().to_owned()),
                ("transport", identity.transport.to_owned()),
                ("kernel", identity.kernel.to_owned()),
            ]),
        );
    }

    /// Count one connect (`cgroup`: its cgroup path, asked for only when first seen).
    pub fn observe(&self, e: &Event, cgroup: impl FnOnce() -> Option<String>) {
        let seconds = e.lat_ns as f64 / 1e9;
        if e.end != End::Seen {
            self.inferred.inc();
        }
        let hot_key = HotKey::of(e, self.rules.cgroup);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let hot = match state.hot.get_mut(&hot_key) {
            Some(hot) if hot.durations(e.outcome).is_some() => hot,
            _ => {
                let key = self.key_for(e, cgroup());
                let key = match self.claim(&mut state, key, e.outcome) {
                    Claimed::Own(key) if state.hot.has_room_for(&hot_key) => key,
                    Claimed::Own(key) | Claimed::Folded(key) => {
                        return self.count(&key, e, seconds)
                    }
                };
                let durations = self
                    .durations
                    .get_or_create_owned(&key.with_outcome(e.outcome));
                let hot = state.hot.entry(hot_key, || Hot::new(key));
                hot.set_durations(e.outcome, durations);
                hot
            }
        };
        hot.last = Instant::now();
        if let Some(durations) = hot.durations(e.outcome) {
            durations.observe(seconds);
        }
        if e.syn_retrans > 0 {
            hot.count_retransmits(u64::from(e.syn_retrans), |key| {
                self.retransmits.get_or_create_owned(&key.labels())
            });
        }
    }

    /// Count a connect under `key` through the metric families (no cached series).
    fn count(&self, key: &SeriesKey, e: &Event, seconds: f64) {
        self.durations
            .get_or_create(&key.with_outcome(e.outcome))
            .observe(seconds);
        if e.syn_retrans > 0 {
            self.retransmits
                .get_or_create(&key.labels())
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

    /// The label set a connect is counted under: its own, or, where the series it would
    /// add do not fit in `--max-series`, the folded one.
    fn claim(&self, state: &mut State, key: SeriesKey, outcome: Outcome) -> Claimed {
        let State { live, budget, .. } = state;
        let cost = match live.get(&key) {
            Some(set) => budget.cost(false, !set.outcomes.contains(&outcome)),
            None => budget.cost(true, true),
        };
        let claimed = if budget.used + cost <= budget.own {
            budget.used += cost;
            Claimed::Own(key)
        } else {
            self.folded.inc();
            Claimed::Folded(SeriesKey::folded(self.rules.cgroup))
        };
        let (Claimed::Own(key) | Claimed::Folded(key)) = &claimed;
        let entry = live.entry(key.clone()).or_insert(Live {
            last: Instant::now(),
            outcomes: Vec::new(),
        });
        entry.last = Instant::now();
        if !entry.outcomes.contains(&outcome) {
            entry.outcomes.push(outcome);
        }
        self.count_series(state);
        claimed
    }

    /// The gauges of what is in use.
    fn count_series(&self, state: &State) {
        let folded = SeriesKey::folded(self.rules.cgroup);
        let other = state
            .live
            .get(&folded)
            .map_or(0, |set| state.budget.of(set.outcomes.len()));
        self.label_sets.set(state.live.len() as i64);
        self.series
            .set((self.fixed + state.budget.used + other) as i64);
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
            Shortfall::TableErrors { .. } => &self.table_errors,
        };
        counter.inc_by(shortfall.count());
    }

    /// Drop the label sets no connect used for `--series-ttl`; how many.
    pub fn expire(&self) -> usize {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let State { live, budget, hot } = &mut *state;
        for (key, last) in hot.last_uses() {
            if let Some(set) = live.get_mut(key) {
                set.last = set.last.max(last);
            }
        }
        let folded = SeriesKey::folded(self.rules.cgroup);
        let ttl = self.rules.ttl;
        let idle: Vec<SeriesKey> = live
            .iter()
            .filter(|(_, l)| l.last.elapsed() >= ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &idle {
            if let Some(gone) = live.remove(key) {
                if *key != folded {
                    budget.used -= budget.of(gone.outcomes.len());
                }
                for outcome in gone.outcomes {
                    self.durations.remove(&key.with_outcome(outcome));
                }
                self.retransmits.remove(&key.labels());
            }
        }
        // Their series are gone from the families: the handles cached would count nowhere.
        hot.retain(|key| live.contains_key(key));
        self.count_series(&state);
        idle.len()
    }

    /// Label sets in use.
    #[cfg(test)]
    fn label_sets(&self) -> usize {
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

    /// Room for `sets` destinations of one outcome each (beyond the fixed series and the
    /// folded set's reserve), with the default buckets.
    fn room_for(sets: usize) -> usize {
        let per_histogram = Metrics::default_buckets().len() + 3;
        metrics(DestLabel::IpPort, 100_000, Duration::ZERO).fixed
            + (1 + Outcome::COUNT * per_histogram)
            + sets * (1 + per_histogram)
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
        Metrics::new(rules, Metrics::default_buckets(), &identity).unwrap()
    }

    fn scrape(m: &Metrics) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry).unwrap();
        text
    }

    #[test]
    fn connects_become_histograms_and_counters_by_outcome_and_dest() {
        let m = metrics(DestLabel::IpPort, room_for(3), Duration::from_secs(900));
        m.observe(&event("10.0.0.2", 443, Outcome::Established, 2), || None);
        m.observe(&event("10.0.0.2", 443, Outcome::Refused, 1), || None);
        m.observe(&event("::1", 50000, Outcome::Timeout, 3000), || None);
        let text = scrape(&m);
        for line in [
            r#"tcpconnlat_connect_duration_seconds_count{outcome="established",dest="10.0.0.2:443"} 1"#,
            r#"tcpconnlat_connect_duration_seconds_count{outcome="refused",dest="10.0.0.2:443"} 1"#,
            r#"tcpconnlat_connect_duration_seconds_count{outcome="timeout",dest="[::1]:ephemeral"} 1"#,
            r#"tcpconnlat_syn_retransmits_total{dest="10.0.0.2:443"} 2"#,
            r#"tcpconnlat_build_info{version=""#,
        ] {
            assert!(text.contains(line), "no {line} in:\n{text}");
        }
        assert!(
            text.contains(r#"le="5e-5""#) || text.contains(r#"le="0.00005""#),
            "{text}"
        );
    }

    #[test]
    fn destinations_beyond_the_series_budget_fold_into_other_and_idle_ones_expire() {
        let max = room_for(2);
        let m = metrics(DestLabel::IpPort, max, Duration::ZERO);
        for port in [1, 2, 3, 4] {
            m.observe(&event("10.0.0.2", port, Outcome::Refused, 1), || None);
        }
        // Two label sets of their own; the others share "other" (which is one more).
        assert_eq!(m.label_sets(), 3);
        let text = scrape(&m);
        assert!(text.contains(r#"dest="other"} 2"#), "{text}");
        assert!(text.contains("tcpconnlat_series_folded_total 2"), "{text}");
        // The gauge is what a scrape holds, and the budget holds.
        let series = m.series.get() as usize;
        assert_eq!(series, scrape_samples(&m.registry), "{text}");
        assert!(series <= max, "{series} series, budget {max}");
        // A second outcome of a destination of its own does not fit: it is folded too.
        m.observe(&event("10.0.0.2", 1, Outcome::Timeout, 1), || None);
        assert!(scrape(&m).contains("tcpconnlat_series_folded_total 3"));
        assert!(m.series.get() as usize <= max);
        assert_eq!(m.expire(), 3);
        assert_eq!(m.label_sets(), 0);
        assert_eq!(m.series.get() as usize, m.fixed);
        assert!(!scrape(&m).contains(",dest="), "{}", scrape(&m));
        // A destination seen again after its set expired has its series again (the
        // handles kept for it went with the set), counted from zero.
        m.observe(&event("10.0.0.2", 1, Outcome::Refused, 1), || None);
        m.observe(&event("10.0.0.2", 1, Outcome::Refused, 1), || None);
        let text = scrape(&m);
        assert!(
            text.contains(r#"_count{outcome="refused",dest="10.0.0.2:1"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn a_set_in_use_through_the_cache_does_not_expire() {
        let m = metrics(DestLabel::IpPort, room_for(2), Duration::from_millis(300));
        m.observe(&event("10.0.0.2", 1, Outcome::Refused, 1), || None);
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(150));
            m.observe(&event("10.0.0.2", 1, Outcome::Refused, 1), || None);
            assert_eq!(m.expire(), 0);
        }
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(m.expire(), 1);
    }

    #[test]
    fn a_budget_without_room_for_one_destination_is_refused() {
        let rules = LabelRules {
            dest: DestLabel::IpPort,
            cgroup: false,
            ephemeral: 32768..=60999,
            max_series: 50,
            ttl: Duration::ZERO,
        };
        let identity = Identity {
            mode: Mode::Tracepoint,
            transport: "",
            kernel: "",
        };
        let err = Metrics::new(rules, Metrics::default_buckets(), &identity)
            .err()
            .unwrap();
        assert!(err.starts_with("--max-series 50 leaves no room"), "{err}");
    }

    #[test]
    fn coarser_dest_labels() {
        for (dest, want) in [
            (DestLabel::Ip, r#"dest="10.0.0.2""#),
            (DestLabel::Port, r#"dest="443""#),
            (DestLabel::None, r#"dest="""#),
        ] {
            let m = metrics(dest, room_for(1), Duration::from_secs(60));
            m.observe(&event("10.0.0.2", 443, Outcome::Established, 1), || None);
            assert!(scrape(&m).contains(want), "{dest:?}: {}", scrape(&m));
        }
    }
}
