//! A cache of series handles: the series each recent destination was counted under, so
//! that a connect to a known destination costs one lookup by its raw address and a
//! histogram observation, instead of its label text being written and looked up in the
//! metric families.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::labels::{LabelRules, SeriesKey};
use crate::tracer::event::{Event, Outcome};

/// A destination as the probes give it (and its cgroup, where that is a label).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DestKey {
    daddr: IpAddr,
    dport: u16,
    cgroup_id: u64,
}

impl DestKey {
    pub fn of(e: &Event, rules: &LabelRules) -> DestKey {
        DestKey {
            daddr: e.daddr,
            dport: e.dport,
            cgroup_id: if rules.cgroup { e.cgroup_id } else { 0 },
        }
    }
}

/// The label set a destination has of its own, and the handles of its series used so far.
pub struct SeriesHandles {
    pub key: SeriesKey,
    pub last: Instant,
    durations: [Option<Histogram>; Outcome::COUNT],
    retransmits: Option<Counter>,
}

impl SeriesHandles {
    pub fn new(key: SeriesKey) -> SeriesHandles {
        SeriesHandles {
            key,
            last: Instant::now(),
            durations: Default::default(),
            retransmits: None,
        }
    }

    /// Count SYN retransmits on the counter `make` gives for the label set, made when
    /// first needed (a series only then).
    pub fn count_retransmits(&mut self, n: u64, make: impl FnOnce(&SeriesKey) -> Counter) {
        let key = &self.key;
        self.retransmits.get_or_insert_with(|| make(key)).inc_by(n);
    }

    pub fn durations(&self, outcome: Outcome) -> Option<&Histogram> {
        self.durations[outcome as usize].as_ref()
    }

    pub fn set_durations(&mut self, outcome: Outcome, histogram: Histogram) {
        self.durations[outcome as usize] = Some(histogram);
    }
}

/// Destinations with a label set of their own (folded ones are not kept: they are the
/// unbounded tail). Bounded too: several destinations share a set where `--dest` is
/// coarse.
#[derive(Default)]
pub struct HandleCache(HashMap<DestKey, SeriesHandles>);

impl HandleCache {
    const MAX: usize = 8192;

    pub fn get_mut(&mut self, key: &DestKey) -> Option<&mut SeriesHandles> {
        self.0.get_mut(key)
    }

    pub fn has_room_for(&self, key: &DestKey) -> bool {
        self.0.len() < Self::MAX || self.0.contains_key(key)
    }

    /// The entry of `key`, made with `make` if new (check [`HandleCache::has_room_for`]).
    pub fn entry(
        &mut self,
        key: DestKey,
        make: impl FnOnce() -> SeriesHandles,
    ) -> &mut SeriesHandles {
        self.0.entry(key).or_insert_with(make)
    }

    /// When each label set was last used, by the connects counted here.
    pub fn last_uses(&self) -> impl Iterator<Item = (&SeriesKey, Instant)> {
        self.0.values().map(|handles| (&handles.key, handles.last))
    }

    /// Keep only the destinations whose label set `live` says still exists.
    pub fn retain(&mut self, mut live: impl FnMut(&SeriesKey) -> bool) {
        self.0.retain(|_, handles| live(&handles.key));
    }
}
