//! What `--max-series` allows: the label sets in use and the series they have, counted as
//! Prometheus stores them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::labels::SeriesKey;
use crate::tracer::event::Outcome;

/// `--max-series` cannot hold the fixed series, the folded set and one destination.
#[derive(Debug, Error)]
#[error(
    "--max-series {max_series} leaves no room for a destination: with {buckets} buckets, \
     {fixed} fixed series and the folded dest=\"other\", give {least} at least"
)]
pub struct NoRoom {
    max_series: usize,
    buckets: usize,
    fixed: usize,
    least: usize,
}

/// The label sets in use and what they cost. A label set costs its retransmit counter
/// (one series, kept for it from the start) and, for each outcome it has seen, a
/// histogram: a series per bucket, +Inf, `_sum` and `_count`, and one for its native
/// buckets (a scraper that reads them may keep the classic ones too). The folded set
/// (`dest="other"`) has its worst case kept aside, so that folding always fits.
#[derive(Debug)]
pub struct SeriesBudget {
    live: HashMap<SeriesKey, Live>,
    folded: SeriesKey,
    /// For label sets of their own: `--max-series` less the fixed series and the folded
    /// set's reserve.
    own: usize,
    per_histogram: usize,
    /// Series the label sets of their own have now.
    used: usize,
}

/// A label set in use: when it was last used, and which outcomes have series.
#[derive(Debug)]
struct Live {
    last: Instant,
    outcomes: Vec<Outcome>,
}

/// The label set a connect is counted under.
pub enum Claimed {
    Own(SeriesKey),
    /// The folded set: its own would not fit in `--max-series`.
    Folded(SeriesKey),
}

impl SeriesBudget {
    pub fn new(
        max_series: usize,
        fixed: usize,
        buckets: usize,
        folded: SeriesKey,
    ) -> Result<SeriesBudget, NoRoom> {
        let per_histogram = buckets + 4;
        let one_set = 1 + Outcome::COUNT * per_histogram;
        // The folded set's worst case, and room for one destination of one outcome.
        let least = fixed + one_set + 1 + per_histogram;
        if max_series < least {
            return Err(NoRoom {
                max_series,
                buckets,
                fixed,
                least,
            });
        }
        Ok(SeriesBudget {
            live: HashMap::new(),
            folded,
            own: max_series - fixed - one_set,
            per_histogram,
            used: 0,
        })
    }

    /// The set a connect of `outcome` to `key` is counted under: its own where the series
    /// that adds fit, else the folded one. Either is marked used now.
    pub fn claim(&mut self, key: SeriesKey, outcome: Outcome) -> Claimed {
        let cost = match self.live.get(&key) {
            Some(set) if set.outcomes.contains(&outcome) => 0,
            Some(_) => self.per_histogram,
            // Its retransmit counter too.
            None => 1 + self.per_histogram,
        };
        let claimed = if self.used + cost <= self.own {
            self.used += cost;
            Claimed::Own(key)
        } else {
            Claimed::Folded(self.folded.clone())
        };
        let (Claimed::Own(key) | Claimed::Folded(key)) = &claimed;
        let set = self.live.entry(key.clone()).or_insert(Live {
            last: Instant::now(),
            outcomes: Vec::new(),
        });
        set.last = Instant::now();
        if !set.outcomes.contains(&outcome) {
            set.outcomes.push(outcome);
        }
        claimed
    }

    /// `key` was last used at `last` (by a connect counted through a cached handle).
    pub fn used_at(&mut self, key: &SeriesKey, last: Instant) {
        if let Some(set) = self.live.get_mut(key) {
            set.last = set.last.max(last);
        }
    }

    /// Drop the sets unused for `ttl`: each with the outcomes it had series for.
    pub fn expire(&mut self, ttl: Duration) -> Vec<(SeriesKey, Vec<Outcome>)> {
        let idle: Vec<SeriesKey> = self
            .live
            .iter()
            .filter(|(_, set)| set.last.elapsed() >= ttl)
            .map(|(key, _)| key.clone())
            .collect();
        let mut gone = Vec::with_capacity(idle.len());
        for key in idle {
            if let Some(set) = self.live.remove(&key) {
                if key != self.folded {
                    self.used -= self.of(set.outcomes.len());
                }
                gone.push((key, set.outcomes));
            }
        }
        gone
    }

    pub fn contains(&self, key: &SeriesKey) -> bool {
        self.live.contains_key(key)
    }

    /// Label sets in use.
    pub fn sets(&self) -> usize {
        self.live.len()
    }

    /// Series the label sets have now, the folded one included.
    pub fn series(&self) -> usize {
        let other = self
            .live
            .get(&self.folded)
            .map_or(0, |set| self.of(set.outcomes.len()));
        self.used + other
    }

    /// What a label set with these outcomes has.
    fn of(&self, outcomes: usize) -> usize {
        1 + outcomes * self.per_histogram
    }
}
