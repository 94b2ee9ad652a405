//! Summaries instead of one line per connect: bcc-style log2 latency histograms
//! (`--hist`, optionally per destination or process name) and per-destination counts,
//! failures and percentiles (`--summary`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;

use super::record::{Bucket, DestSummary, FailureCounts, Hist};
use crate::tracer::event::{Event, Outcome};

/// Latency histogram with power-of-two buckets, in microseconds, as bcc prints them.
#[derive(Clone, Debug, Default)]
pub struct Log2Hist {
    /// Bucket i counts values v with floor(log2(v)) + 1 == i (bucket 0: v == 0).
    buckets: Vec<u64>,
}

impl Log2Hist {
    pub fn add(&mut self, value: u64) {
        let slot = (u64::BITS - value.leading_zeros()) as usize;
        if self.buckets.len() <= slot {
            self.buckets.resize(slot + 1, 0);
        }
        self.buckets[slot] += 1;
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// (low, high, count) per bucket up to the highest non-empty one.
    pub fn rows(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.buckets.iter().enumerate().map(|(i, &count)| {
            let high = if i == 0 { 1 } else { (1u64 << i) - 1 };
            let low = if i <= 1 { 0 } else { 1u64 << (i - 1) };
            (low, high, count)
        })
    }

    /// bcc's print_log2_hist layout.
    pub fn render(&self, unit: &str) -> String {
        let max = self.buckets.iter().copied().max().unwrap_or(0);
        let mut out = format!("{:>15} {:<11}: count     distribution\n", unit, "");
        for (low, high, count) in self.rows() {
            let stars = if max == 0 {
                0
            } else {
                (count * 40).div_ceil(max) as usize
            };
            let _ = writeln!(
                out,
                "{low:>20} -> {high:<20}: {count:<8} |{:<40}|",
                "*".repeat(stars.min(40))
            );
        }
        out
    }

    pub fn buckets(&self) -> Vec<Bucket> {
        self.rows()
            .map(|(low, high, count)| Bucket { low, high, count })
            .collect()
    }
}

/// What a histogram is keyed by (`--by`: one per destination or process name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    /// One histogram for every connect (no `--by`).
    #[value(skip)]
    All,
    /// daddr:dport
    Dest,
    Comm,
}

/// Failed connects by outcome.
#[derive(Clone, Debug, Default)]
struct Failures(FailureCounts);

impl Failures {
    fn add(&mut self, outcome: Outcome) {
        *self.0.entry(outcome.name()).or_default() += 1;
    }

    fn total(&self) -> u64 {
        self.0.values().sum()
    }

    fn text(&self) -> String {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k} {v}")).collect();
        parts.join(", ")
    }
}

/// `--hist`: latency of established connects, log2 buckets, per key.
#[derive(Debug)]
pub struct Hists {
    by: By,
    hists: BTreeMap<String, Log2Hist>,
    failures: Failures,
}

impl Hists {
    pub fn new(by: By) -> Hists {
        Hists {
            by,
            hists: BTreeMap::new(),
            failures: Failures::default(),
        }
    }

    pub fn by(&self) -> By {
        self.by
    }

    pub fn add(&mut self, e: &Event) {
        if e.outcome.failed() {
            self.failures.add(e.outcome);
            return;
        }
        let key = match self.by {
            By::All => String::new(),
            By::Dest => e.dest(),
            By::Comm => e.comm.to_string(),
        };
        self.hists.entry(key).or_default().add(e.lat_ns / 1000);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (key, hist) in &self.hists {
            match self.by {
                By::All => {}
                By::Dest => out.push_str(&format!("\ndest = {key}\n")),
                By::Comm => out.push_str(&format!("\ncomm = {key}\n")),
            }
            out.push_str(&hist.render("usecs"));
        }
        if self.hists.is_empty() {
            out.push_str("no established connects\n");
        }
        if self.failures.total() > 0 {
            out.push_str(&format!("failed connects: {}\n", self.failures.text()));
        }
        out
    }

    /// One record per histogram.
    pub fn records(&self) -> Vec<Hist> {
        self.hists
            .iter()
            .map(|(key, hist)| Hist {
                unit: "usecs",
                count: hist.count(),
                buckets: hist.buckets(),
                dest: (self.by == By::Dest).then(|| key.clone()),
                comm: (self.by == By::Comm).then(|| key.clone()),
                failed: self.failures.0.clone(),
            })
            .collect()
    }
}

/// Per destination: counts, failures and latency percentiles of established connects.
#[derive(Debug)]
struct DestStats {
    count: u64,
    failures: Failures,
    /// Microseconds, 3 significant digits.
    latency: Histogram<u64>,
}

#[derive(Debug, Default)]
pub struct Summary {
    dests: BTreeMap<String, DestStats>,
}

impl Summary {
    pub fn add(&mut self, e: &Event) {
        let stats = self.dests.entry(e.dest()).or_insert_with(|| DestStats {
            count: 0,
            failures: Failures::default(),
            // 1 us to 1 h: beyond any connect; values outside saturate rather than fail.
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
        });
        stats.count += 1;
        if e.outcome.failed() {
            stats.failures.add(e.outcome);
        } else {
            stats.latency.saturating_record((e.lat_ns / 1000).max(1));
        }
    }

    fn percentiles(h: &Histogram<u64>) -> Option<[f64; 4]> {
        (!h.is_empty()).then(|| {
            [50.0, 90.0, 99.0]
                .map(|q| h.value_at_quantile(q / 100.0) as f64 / 1e3)
                .into_iter()
                .chain([h.max() as f64 / 1e3])
                .collect::<Vec<_>>()
                .try_into()
                .expect("four values")
        })
    }

    pub fn render(&self) -> String {
        let width = self
            .dests
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(0)
            .max(21);
        let mut out = format!(
            "{:<width$} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9}  FAILURES\n",
            "DEST", "COUNT", "FAILED", "P50(ms)", "P90(ms)", "P99(ms)", "MAX(ms)"
        );
        for (dest, s) in &self.dests {
            let _ = write!(
                out,
                "{dest:<width$} {:>7} {:>7}",
                s.count,
                s.failures.total()
            );
            match Self::percentiles(&s.latency) {
                Some(p) => {
                    for v in p {
                        let _ = write!(out, " {v:>9.3}");
                    }
                }
                None => out.push_str(&format!(" {:>9} {:>9} {:>9} {:>9}", "-", "-", "-", "-")),
            }
            let failures = s.failures.text();
            if failures.is_empty() {
                out.push('\n');
            } else {
                let _ = writeln!(out, "  {failures}");
            }
        }
        out
    }

    /// One record per destination.
    pub fn records(&self) -> Vec<DestSummary> {
        self.dests
            .iter()
            .map(|(dest, s)| {
                let p = Self::percentiles(&s.latency);
                DestSummary {
                    dest: dest.clone(),
                    count: s.count,
                    failed: s.failures.total(),
                    failures: s.failures.0.clone(),
                    p50_ms: p.map(|p| p[0]),
                    p90_ms: p.map(|p| p[1]),
                    p99_ms: p.map(|p| p[2]),
                    max_ms: p.map(|p| p[3]),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn event(daddr: &str, dport: u16, lat_us: u64, outcome: Outcome) -> Event {
        Event {
            lat_ns: lat_us * 1000,
            daddr: daddr.parse::<IpAddr>().unwrap(),
            dport,
            outcome,
            ..Event::sample()
        }
    }

    #[test]
    fn log2_buckets_match_bcc() {
        let mut h = Log2Hist::default();
        for v in [0, 1, 2, 3, 4, 7, 8, 1000, 1023, 1024] {
            h.add(v);
        }
        let rows: Vec<_> = h.rows().collect();
        assert_eq!(rows[0], (0, 1, 1)); // 0
        assert_eq!(rows[1], (0, 1, 1)); // 1
        assert_eq!(rows[2], (2, 3, 2));
        assert_eq!(rows[3], (4, 7, 2));
        assert_eq!(rows[4], (8, 15, 1));
        assert_eq!(rows[10], (512, 1023, 2));
        assert_eq!(rows[11], (1024, 2047, 1));
        assert_eq!(rows.len(), 12);
        assert_eq!(h.count(), 10);
        let text = h.render("usecs");
        assert!(text.lines().next().unwrap().contains("usecs"));
        // The fullest bucket gets the full bar.
        let full = text
            .lines()
            .find(|l| l.contains("|****************************************|"));
        assert!(full.is_some(), "{text}");
    }

    #[test]
    fn hist_by_destination_counts_failures_apart() {
        let mut h = Hists::new(By::Dest);
        h.add(&event("10.0.0.2", 80, 100, Outcome::Established));
        h.add(&event("10.0.0.2", 80, 120, Outcome::Established));
        h.add(&event("::1", 443, 5, Outcome::Established));
        h.add(&event("10.0.0.2", 80, 3, Outcome::Refused));
        let text = h.render();
        assert!(text.contains("dest = 10.0.0.2:80"));
        assert!(text.contains("dest = [::1]:443"));
        assert!(text.contains("failed connects: refused 1"));
        let records = h.records();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].dest.as_deref(), Some("10.0.0.2:80"));
        assert_eq!(records[0].count, 2);
        assert_eq!(records[0].failed["refused"], 1);
        // 100 and 120 us both fall in 64..127.
        let bucket = records[0].buckets.iter().find(|b| b.low == 64).unwrap();
        assert_eq!(bucket.count, 2);
    }

    #[test]
    fn summary_percentiles_are_exact_enough() {
        let mut s = Summary::default();
        // 1..=1000 ms: p50 = 500, p90 = 900, p99 = 990, max = 1000 (3 significant digits).
        for ms in 1..=1000u64 {
            s.add(&event("10.0.0.2", 5432, ms * 1000, Outcome::Established));
        }
        s.add(&event("10.0.0.2", 5432, 1_000_000, Outcome::Timeout));
        s.add(&event("10.0.0.3", 5432, 10, Outcome::Refused));
        let records = s.records();
        let db = &records[0];
        assert_eq!(
            (db.dest.as_str(), db.count, db.failed),
            ("10.0.0.2:5432", 1001, 1)
        );
        for (key, got, want) in [
            ("p50_ms", db.p50_ms, 500.0),
            ("p90_ms", db.p90_ms, 900.0),
            ("p99_ms", db.p99_ms, 990.0),
            ("max_ms", db.max_ms, 1000.0),
        ] {
            let got = got.unwrap();
            assert!((got - want).abs() <= want * 0.002, "{key}: {got} vs {want}");
        }
        assert_eq!(records[1].p50_ms, None);
        assert_eq!(records[1].failures["refused"], 1);
        let text = s.render();
        assert!(text.starts_with("DEST"));
        assert!(text.contains("10.0.0.3:5432"));
        assert!(text.contains("timeout 1"));
    }
}
