//! What `--max-series` allows: the series label sets may make, counted as Prometheus
//! stores them.

use crate::tracer::event::Outcome;

/// The series the label sets may make, and those they have. A label set costs its
/// retransmit counter (one series, kept for it from the start) and, for each outcome it
/// has seen, a histogram: a series per bucket, +Inf, `_sum` and `_count`. The folded set
/// `dest="other"` has its worst case kept aside, so that folding always fits.
#[derive(Debug)]
pub struct SeriesBudget {
    /// For label sets of their own: `--max-series` less the fixed series and the folded
    /// set's reserve.
    pub own: usize,
    pub per_histogram: usize,
    /// Series the label sets of their own have now.
    pub used: usize,
}

impl SeriesBudget {
    pub fn new(max_series: usize, fixed: usize, buckets: usize) -> Result<SeriesBudget, String> {
        let per_histogram = buckets + 3;
        let one_set = 1 + Outcome::COUNT * per_histogram;
        // The folded set's worst case, and room for one destination of one outcome.
        let least = fixed + one_set + 1 + per_histogram;
        if max_series < least {
            return Err(format!(
                "--max-series {max_series} leaves no room for a destination: with {buckets} \
                 buckets, {fixed} fixed series and the folded dest=\"other\", give {least} at least"
            ));
        }
        Ok(SeriesBudget {
            own: max_series - fixed - one_set,
            per_histogram,
            used: 0,
        })
    }

    /// What counting `outcome` under a label set costs (new: not in use yet).
    pub fn cost(&self, new: bool, outcome_new: bool) -> usize {
        usize::from(new) + if outcome_new { self.per_histogram } else { 0 }
    }

    /// What a label set with these outcomes has.
    pub fn of(&self, outcomes: usize) -> usize {
        1 + outcomes * self.per_histogram
    }
}
