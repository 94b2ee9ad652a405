//! The metrics of fleet mode: connects become Prometheus histograms and counters, with a
//! bounded number of label sets. What a scrape returns is encoded by the
//! `prometheus-client` crate.
//!
//! Cardinality is a promise: a label set is a destination (as coarse as `--dest` says)
//! and, with `--label cgroup`, a cgroup. At most `--max-series` of them exist at once; a
//! connect to one more is counted under `dest="other"` (and in
//! `tcpconnlat_series_folded_total`), and a label set no connect used for `--series-ttl`
//! is dropped, with every series it had.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, NativeHistogramConfig};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tcpconnlat_compat::Mode;

use super::budget::{Claimed, NoRoom, SeriesBudget};
use super::handles::{DestKey, HandleCache, SeriesHandles};
use super::labels::{LabelRules, Labels, SeriesKey};
use crate::tracer::event::{End, Event, Outcome};
use crate::tracer::stream::Shortfall;

/// Makes each new histogram: the configured (classic) buckets, which every scraper reads,
/// and native buckets, which a scraper asking for protobuf reads too.
#[derive(Clone)]
struct MakeHistogram(Arc<Vec<f64>>);

impl MakeHistogram {
    /// Native buckets grow by 2^(1/8) (schema 3): a quantile is within 9 % of the truth,
    /// where four-fold classic buckets leave it anywhere within a factor of 4.
    const NATIVE_SCHEMA: i8 = 3;
    /// Where more would be needed, the resolution halves (Prometheus's own default).
    const NATIVE_MAX_BUCKETS: usize = 160;
}

impl MetricConstructor<Histogram> for MakeHistogram {
    fn new_metric(&self) -> Histogram {
        let native = NativeHistogramConfig::with_schema(Self::NATIVE_SCHEMA)
            .max_buckets(Self::NATIVE_MAX_BUCKETS);
        Histogram::new_classic_and_native(self.0.iter().copied(), native)
    }
}

/// The series Prometheus stores of a scrape: the text format's sample lines, and a native
/// histogram beside each classic one (where a scraper keeps both).
fn stored_series(registry: &Registry) -> usize {
    use prometheus_client::encoding::prometheus_protobuf::{encode, prometheus_data_model};
    let mut text = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    let histogram = prometheus_data_model::MetricType::Histogram as i32;
    let native: usize = encode(registry)
        .unwrap_or_default()
        .iter()
        .filter(|family| family.r#type == histogram)
        .map(|family| family.metric.len())
        .sum();
    samples + native
}

/// The metrics one tracer exports.
pub struct Metrics {
    pub registry: Registry,
    instruments: Instruments,
    /// Series that exist whatever the traffic: every metric without labels.
    fixed: usize,
    state: Mutex<State>,
    rules: LabelRules,
}

/// Every metric but the build's (handles: clones count into the same series).
#[derive(Clone)]
struct Instruments {
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
}

/// The label sets in use, and the handles of their series.
struct State {
    budget: SeriesBudget,
    /// The series of destinations counted lately, for the next connect to them.
    handles: HandleCache,
}

/// What `tcpconnlat_build_info` says of how this host traces.
pub struct Identity<'a> {
    pub mode: Mode,
    pub transport: &'a str,
    pub kernel: &'a str,
}

impl Metrics {
    /// `tcpconnlat_build_info`: one series, registered once the mode is known.
    const BUILD_INFO_SERIES: usize = 1;

    /// 50 µs to 210 s (beyond the ~127 s of the kernel's default SYN retries), each four
    /// times the last: 12 buckets, 15 series a classic histogram (and one native).
    pub fn default_buckets() -> Vec<f64> {
        prometheus_client::metrics::histogram::exponential_buckets(50e-6, 4.0, 12).collect()
    }

    /// The metrics, or why `--max-series` cannot hold them; [`Metrics::identify`] before
    /// they are served.
    pub fn new(rules: LabelRules, buckets: Vec<f64>) -> Result<Metrics, NoRoom> {
        let bucket_count = buckets.len();
        let instruments = Instruments::new(buckets);
        // No registry prefix: `tcpconnlat_build_info` is an info metric named
        // `tcpconnlat_build`.
        let mut registry = Registry::default();
        instruments.register(&mut registry);
        // Every series that exists before any connect is fixed: count them as scraped.
        let fixed = stored_series(&registry) + Self::BUILD_INFO_SERIES;
        let budget = SeriesBudget::new(rules.max_series, fixed, bucket_count, rules.folded())?;
        instruments.series.set(fixed as i64);
        Ok(Metrics {
            registry,
            instruments,
            fixed,
            state: Mutex::new(State {
                budget,
                handles: HandleCache::default(),
            }),
            rules,
        })
    }

    /// `tcpconnlat_build_info`: which tcpconnlat this is and how it traces here.
    pub fn identify(&mut self, identity: &Identity<'_>) {
        self.registry.register(
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
            self.instruments.inferred.inc();
        }
        let dest = DestKey::of(e, &self.rules);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let handles = match state.handles.get_mut(&dest) {
            Some(handles) if handles.durations(e.outcome).is_some() => handles,
            _ => {
                let key = self.rules.key_for(e, cgroup());
                let key = match self.claim(&mut state, key, e.outcome) {
                    Claimed::Own(key) if state.handles.has_room_for(&dest) => key,
                    Claimed::Own(key) | Claimed::Folded(key) => {
                        return self.count(&key, e, seconds)
                    }
                };
                let durations = self
                    .instruments
                    .durations
                    .get_or_create_owned(&key.with_outcome(e.outcome));
                let handles = state.handles.entry(dest, || SeriesHandles::new(key));
                handles.set_durations(e.outcome, durations);
                handles
            }
        };
        handles.last = Instant::now();
        if let Some(durations) = handles.durations(e.outcome) {
            durations.observe(seconds);
        }
        if e.syn_retrans > 0 {
            handles.count_retransmits(u64::from(e.syn_retrans), |key| {
                self.instruments
                    .retransmits
                    .get_or_create_owned(&key.labels())
            });
        }
    }

    /// Count a connect under `key` through the metric families (no cached series).
    fn count(&self, key: &SeriesKey, e: &Event, seconds: f64) {
        self.instruments
            .durations
            .get_or_create(&key.with_outcome(e.outcome))
            .observe(seconds);
        if e.syn_retrans > 0 {
            self.instruments
                .retransmits
                .get_or_create(&key.labels())
                .inc_by(u64::from(e.syn_retrans));
        }
    }

    /// The label set a connect is counted under: its own, or, where the series it would
    /// add do not fit in `--max-series`, the folded one.
    fn claim(&self, state: &mut State, key: SeriesKey, outcome: Outcome) -> Claimed {
        let claimed = state.budget.claim(key, outcome);
        if let Claimed::Folded(_) = claimed {
            self.instruments.folded.inc();
        }
        self.count_series(state);
        claimed
    }

    /// The gauges of what is in use.
    fn count_series(&self, state: &State) {
        self.instruments.label_sets.set(state.budget.sets() as i64);
        self.instruments
            .series
            .set((self.fixed + state.budget.series()) as i64);
    }

    /// A scrape connection could not be accepted.
    pub fn accept_failed(&self) {
        self.instruments.accept_errors.inc();
    }

    /// Count connects tracing could not show.
    pub fn shortfall(&self, shortfall: Shortfall) {
        let counter = match shortfall {
            Shortfall::Lost { .. } => &self.instruments.lost,
            Shortfall::Untracked { .. } => &self.instruments.untracked,
            Shortfall::Missed { .. } => &self.instruments.missed,
            Shortfall::TableErrors { .. } => &self.instruments.table_errors,
        };
        counter.inc_by(shortfall.count());
    }

    /// Drop the label sets no connect used for `--series-ttl`; how many.
    pub fn expire(&self) -> usize {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let State { budget, handles } = &mut *state;
        for (key, last) in handles.last_uses() {
            budget.used_at(key, last);
        }
        let gone = budget.expire(self.rules.ttl);
        for (key, outcomes) in &gone {
            for &outcome in outcomes {
                self.instruments
                    .durations
                    .remove(&key.with_outcome(outcome));
            }
            self.instruments.retransmits.remove(&key.labels());
        }
        // Their series are gone from the families: the handles cached would count nowhere.
        handles.retain(|key| budget.contains(key));
        self.count_series(&state);
        gone.len()
    }

    /// Label sets in use.
    #[cfg(test)]
    fn label_sets(&self) -> usize {
        self.instruments.label_sets.get() as usize
    }
}

impl Instruments {
    fn new(buckets: Vec<f64>) -> Instruments {
        Instruments {
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
        }
    }

    /// Every metric but the build's into the registry, with its help.
    fn register(&self, registry: &mut Registry) {
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
        registry.register_collector(Box::new(super::process::ProcessCollector));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::labels::DestLabel;
    use std::time::Duration;

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
        let per_histogram = Metrics::default_buckets().len() + 4;
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
        let mut metrics = Metrics::new(rules, Metrics::default_buckets()).unwrap();
        metrics.identify(&Identity {
            mode: Mode::Tracepoint,
            transport: "ring buffer",
            kernel: "6.18.0",
        });
        metrics
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
        let series = m.instruments.series.get() as usize;
        assert_eq!(series, stored_series(&m.registry), "{text}");
        assert!(series <= max, "{series} series, budget {max}");
        // A second outcome of a destination of its own does not fit: it is folded too.
        m.observe(&event("10.0.0.2", 1, Outcome::Timeout, 1), || None);
        assert!(scrape(&m).contains("tcpconnlat_series_folded_total 3"));
        assert!(m.instruments.series.get() as usize <= max);
        assert_eq!(m.expire(), 3);
        assert_eq!(m.label_sets(), 0);
        assert_eq!(m.instruments.series.get() as usize, m.fixed);
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
        let err = Metrics::new(rules, Metrics::default_buckets())
            .err()
            .unwrap()
            .to_string();
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
