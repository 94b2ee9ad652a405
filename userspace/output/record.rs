//! The JSON lines tcpconnlat prints (`--json`): a public interface, defined here once. Each
//! line is one [`Record`], tagged by `type`; README's "JSON records" table lists the same
//! fields, and a test holds the two together.

use std::collections::BTreeMap;

use serde::Serialize;
use tcpconnlat_compat::Mode;

use crate::tracer::event::{AddrText, End, Event, Outcome};

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Record<'a> {
    /// One finished connect.
    Connect(Connect<'a>),
    /// `--hist`: one latency histogram of established connects.
    Hist(Hist),
    /// `--summary`: one destination.
    Summary(DestSummary),
    /// Events the buffer had no room for.
    Lost(Count),
    /// Connects not timed: more than --max-pending were waiting for an answer.
    Untracked(Count),
    /// Connects whose end the kernel did not show the probes.
    Missed(Count),
    /// Pending-table operations the kernel refused (see enum counter).
    #[serde(rename = "table_errors")]
    TableErrors(Count),
}

#[derive(Debug, Serialize)]
pub struct Connect<'a> {
    /// CLOCK_MONOTONIC microseconds when it finished.
    pub ts_us: u64,
    pub pid: u32,
    pub comm: &'a str,
    /// 4 or 6.
    pub af: u8,
    pub saddr: AddrText,
    pub lport: u16,
    pub daddr: AddrText,
    pub dport: u16,
    pub lat_us: f64,
    pub lat_ms: f64,
    /// How the end became known: seen by a probe, or inferred by the sweeper (then
    /// `lat_*` is when it was found ended, and `lat_min_ms` when it was last found pending).
    pub end: End,
    pub lat_min_ms: Option<f64>,
    pub outcome: Outcome,
    /// The errno's name, e.g. "ECONNREFUSED", where known.
    pub errno: Option<String>,
    pub syn_retrans: u32,
    pub uid: u32,
    pub mode: Mode,
}

impl<'a> Connect<'a> {
    pub fn new(e: &'a Event, mode: Mode) -> Connect<'a> {
        Connect {
            ts_us: e.ts_ns / 1000,
            pid: e.pid,
            comm: &e.comm,
            af: e.ip_version(),
            saddr: AddrText::new(&e.saddr),
            lport: e.lport,
            daddr: AddrText::new(&e.daddr),
            dport: e.dport,
            lat_us: e.lat_ns as f64 / 1e3,
            lat_ms: e.lat_ms(),
            end: e.end,
            lat_min_ms: e.lat_min_ns.map(|ns| ns as f64 / 1e6),
            outcome: e.outcome,
            errno: e.errno_name(),
            syn_retrans: e.syn_retrans,
            uid: e.uid,
            mode,
        }
    }
}

/// Failed connects by outcome name.
pub type FailureCounts = BTreeMap<&'static str, u64>;

#[derive(Debug, Serialize)]
pub struct Hist {
    pub unit: &'static str,
    /// Established connects in it.
    pub count: u64,
    pub buckets: Vec<Bucket>,
    /// With `--by dest`: daddr:dport.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dest: Option<String>,
    /// With `--by comm`: the process name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// Failed connects (not in the histogram), by outcome, all keys.
    pub failed: FailureCounts,
}

/// A log2 bucket: `low` to `high` microseconds.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Bucket {
    pub low: u64,
    pub high: u64,
    pub count: u64,
}

#[derive(Debug, Serialize)]
pub struct DestSummary {
    /// daddr:dport.
    pub dest: String,
    pub count: u64,
    pub failed: u64,
    pub failures: FailureCounts,
    /// Percentiles of established connects; null where there were none.
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Count {
    pub count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            outcome: Outcome::Refused,
            errno: Some(111),
            syn_retrans: 1,
            ..Event::sample()
        }
    }

    /// One of every record, as printed.
    fn every_record(e: &Event) -> Vec<Record<'_>> {
        vec![
            Record::Connect(Connect::new(e, Mode::Legacy)),
            Record::Hist(Hist {
                unit: "usecs",
                count: 1,
                buckets: vec![Bucket {
                    low: 16,
                    high: 31,
                    count: 1,
                }],
                dest: Some("10.0.0.2:80".into()),
                comm: None,
                failed: FailureCounts::new(),
            }),
            Record::Summary(DestSummary {
                dest: "10.0.0.2:80".into(),
                count: 1,
                failed: 1,
                failures: [("refused", 1)].into(),
                p50_ms: None,
                p90_ms: None,
                p99_ms: None,
                max_ms: None,
            }),
            Record::Lost(Count { count: 3 }),
            Record::Untracked(Count { count: 4 }),
            Record::Missed(Count { count: 5 }),
            Record::TableErrors(Count { count: 6 }),
        ]
    }

    fn keys(record: &Record<'_>) -> (String, Vec<String>) {
        let value = serde_json::to_value(record).unwrap();
        let object = value.as_object().unwrap();
        let kind = object["type"].as_str().unwrap().to_owned();
        (
            kind,
            object.keys().filter(|k| *k != "type").cloned().collect(),
        )
    }

    #[test]
    fn every_record_has_its_shape() {
        let e = event();
        let shapes: Vec<_> = every_record(&e).iter().map(keys).collect();
        let sorted = |names: &[&str]| {
            let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            v.sort();
            v
        };
        assert_eq!(
            shapes,
            [
                (
                    "connect".into(),
                    sorted(&[
                        "ts_us",
                        "pid",
                        "comm",
                        "af",
                        "saddr",
                        "lport",
                        "daddr",
                        "dport",
                        "lat_us",
                        "lat_ms",
                        "end",
                        "lat_min_ms",
                        "outcome",
                        "errno",
                        "syn_retrans",
                        "uid",
                        "mode"
                    ])
                ),
                (
                    "hist".into(),
                    sorted(&["unit", "count", "buckets", "dest", "failed"])
                ),
                (
                    "summary".into(),
                    sorted(&[
                        "dest", "count", "failed", "failures", "p50_ms", "p90_ms", "p99_ms",
                        "max_ms"
                    ])
                ),
                ("lost".into(), sorted(&["count"])),
                ("untracked".into(), sorted(&["count"])),
                ("missed".into(), sorted(&["count"])),
                ("table_errors".into(), sorted(&["count"])),
            ]
        );
        let connect = serde_json::to_value(&every_record(&e)[0]).unwrap();
        assert_eq!(connect["errno"], "ECONNREFUSED");
        assert_eq!(connect["outcome"], "refused");
        assert_eq!(connect["mode"], "legacy");
        assert_eq!(connect["end"], "seen");
        assert!(connect["lat_min_ms"].is_null());
        let inferred = Event {
            end: End::Inferred,
            lat_ns: 3_001_000_000,
            lat_min_ns: Some(2_000_500_000),
            outcome: Outcome::Timeout,
            ..event()
        };
        let inferred = serde_json::to_value(Record::Connect(Connect::new(&inferred, Mode::Legacy)));
        let inferred = inferred.unwrap();
        assert_eq!(inferred["end"], "inferred");
        assert_eq!(inferred["lat_min_ms"], 2000.5);
        assert_eq!(inferred["lat_ms"], 3001.0);
    }

    /// README's "JSON records" table names exactly the fields each record has.
    #[test]
    fn the_readme_lists_every_field_of_every_record() {
        let readme = include_str!("../../README.md");
        let table: Vec<&str> = readme
            .lines()
            .skip_while(|l| !l.starts_with("| `type` | fields"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .collect();
        let e = event();
        let records = every_record(&e);
        assert_eq!(table.len(), records.len(), "{table:#?}");
        for (line, record) in table.iter().zip(&records) {
            let (kind, mut fields) = keys(record);
            if kind == "hist" {
                fields.push("comm".into()); // with --by comm, instead of dest
                fields.sort();
            }
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let ticked = |cell: &str| -> Vec<String> {
                cell.split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_owned)
                    .collect()
            };
            assert_eq!(ticked(cells[1]), std::slice::from_ref(&kind), "{line}");
            let mut listed = ticked(cells[2]);
            listed.sort();
            assert_eq!(listed, fields, "README's fields of {kind}");
        }
    }
}
