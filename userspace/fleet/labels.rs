//! The label sets connects are counted under: a destination (as coarse as `--dest` says)
//! and, with `--label cgroup`, a cgroup.

use std::ops::RangeInclusive;
use std::time::Duration;

use crate::tracer::event::{host_part, Event, Outcome};

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

impl LabelRules {
    /// The label set of connect `e` (`cgroup`: its cgroup's path, where known).
    pub fn key_for(&self, e: &Event, cgroup: Option<String>) -> SeriesKey {
        let port = if self.ephemeral.contains(&e.dport) {
            "ephemeral".to_owned()
        } else {
            e.dport.to_string()
        };
        let ip = host_part(&e.daddr);
        let dest = match self.dest {
            DestLabel::IpPort => format!("{ip}:{port}"),
            DestLabel::Ip => ip,
            DestLabel::Port => port,
            DestLabel::None => String::new(),
        };
        SeriesKey {
            dest,
            cgroup: self.cgroup.then(|| cgroup.unwrap_or_default()),
        }
    }

    /// The set connects are folded into when theirs would not fit: `dest="other"` (and
    /// `cgroup="other"`).
    pub fn folded(&self) -> SeriesKey {
        SeriesKey {
            dest: SeriesKey::OTHER.to_owned(),
            cgroup: self.cgroup.then(|| SeriesKey::OTHER.to_owned()),
        }
    }
}

/// The label set of a destination (and cgroup).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    dest: String,
    cgroup: Option<String>,
}

impl SeriesKey {
    const OTHER: &'static str = "other";

    /// The set's labels (the retransmit counter's).
    pub fn labels(&self) -> Labels {
        let mut labels = vec![("dest", self.dest.clone())];
        if let Some(cgroup) = &self.cgroup {
            labels.push(("cgroup", cgroup.clone()));
        }
        labels
    }

    /// The set's labels with an outcome (a duration histogram's).
    pub fn with_outcome(&self, outcome: Outcome) -> Labels {
        let mut labels = vec![("outcome", outcome.name().to_owned())];
        labels.extend(self.labels());
        labels
    }
}

pub type Labels = Vec<(&'static str, String)>;
