//! What keeps the probes' tables honest while tracing: the sweeper, which removes pending
//! entries whose end no probe saw, and the loss counters the probes keep.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use super::objects::Counter;

/// How old a pending entry must be to be removed as one whose end no probe saw, and how
/// long its key must have been there before the sweeper looks (by default).
pub const STALE: Duration = Duration::from_secs(15 * 60);

/// When the sweeper looks inside a pending entry (once its key has been there this long)
/// and when it takes the entry for one no probe will finish (this old). Both are
/// [`STALE`] but in tests (the hidden `--sweep-after`, `--stale-after`).
#[derive(Clone, Copy, Debug)]
pub struct SweepTimes {
    pub look_after: Duration,
    pub stale: Duration,
}

/// The pending table's entries are removed by the probe that sees the socket leave
/// SYN_SENT. The kernel skips a tracing program that would run nested in another one on
/// the same CPU, or inside a map lookup, update or delete that userspace makes through
/// bpf() (ours included): a timer softirq landing there, expiring a batch of connects,
/// runs none of their probes, and their entries would stay. So the sweeper does not look
/// inside the table while connects come and go: it lists keys only (BPF_MAP_GET_NEXT_KEY
/// is not such a window) and reads an entry only once its key has been there at every
/// sweep for `look_after`; the entry is removed if it is older than any SYN retry
/// schedule with default settings (about 2 minutes) could keep a connect waiting, with a
/// wide margin, or if it claims to predate tracing.
pub struct Sweeper {
    map: MapHandle,
    last: Instant,
    /// CLOCK_MONOTONIC when tracing began.
    started_ns: u64,
    /// Keys present at the last sweep, with when they were first seen.
    seen: HashMap<u64, Instant>,
    times: SweepTimes,
}

/// A map key or value's first 8 bytes: the pending table's key (the socket), the start
/// time that leads its value, a counter.
fn leading_u64(bytes: &[u8]) -> Option<u64> {
    bytes.get(..8)?.try_into().ok().map(u64::from_ne_bytes)
}

fn monotonic_ns() -> Result<u64> {
    // Entries hold bpf_ktime_get_ns() start times: CLOCK_MONOTONIC.
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .context("reading the monotonic clock")?;
    Ok(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}

impl Sweeper {
    const EVERY: Duration = Duration::from_secs(5);

    pub fn new(map: MapHandle, times: SweepTimes) -> Result<Sweeper> {
        Ok(Sweeper {
            map,
            last: Instant::now(),
            started_ns: monotonic_ns()?,
            seen: HashMap::new(),
            times,
        })
    }

    /// Entries removed, if a sweep was due.
    pub fn sweep(&mut self) -> Result<u64> {
        if self.last.elapsed() < Self::EVERY {
            return Ok(0);
        }
        let now = Instant::now();
        self.last = now;
        let now_ns = monotonic_ns()?;
        let mut removed = 0;
        let mut seen = HashMap::with_capacity(self.seen.len());
        let keys: Vec<Vec<u8>> = self.map.keys().collect();
        for key in keys {
            let Some(id) = leading_u64(&key) else {
                continue;
            };
            let mut first = self.seen.get(&id).copied().unwrap_or(now);
            if now.duration_since(first) >= self.times.look_after {
                let value = match self.map.lookup(&key, MapFlags::ANY) {
                    Ok(Some(value)) => value,
                    Ok(None) => continue, // finished meanwhile
                    Err(e) => return Err(e).context("reading the pending table"),
                };
                let start_ns = leading_u64(&value).unwrap_or(0);
                let age = Duration::from_nanos(now_ns.saturating_sub(start_ns));
                if age > self.times.stale || start_ns < self.started_ns {
                    if self.map.delete(&key).is_ok() {
                        removed += 1;
                    }
                    continue;
                }
                // A later connect on a reused socket address: as old as it says.
                first = now.checked_sub(age).unwrap_or(now);
            }
            seen.insert(id, first);
        }
        self.seen = seen;
        Ok(removed)
    }
}

/// The probes' `counters` map (enum counter in probes/tcpconnlat.h) and what was last
/// read from it, so that only increases are reported. Read once a second, not at every
/// drain: each lookup is a moment in which the kernel would skip our probes (see Sweeper).
pub struct Counters {
    map: MapHandle,
    last: Option<Instant>,
    seen: [u64; Counter::COUNTERS.0 as usize],
    /// Samples the perf buffer reported lost. They are the ones the probes counted too
    /// (on kernels that tell them), but arrive only once the next sample fits: the larger
    /// of the two totals is what was lost.
    perf_lost: Rc<Cell<u64>>,
}

impl Counters {
    const EVERY: Duration = Duration::from_secs(1);

    pub fn new(map: MapHandle, perf_lost: Rc<Cell<u64>>) -> Counters {
        Counters {
            map,
            last: None,
            seen: [0; Counter::COUNTERS.0 as usize],
            perf_lost,
        }
    }

    /// Whether the kernel lets us read the counters (see `EventStream::can_read_counters`).
    pub fn readable(&self) -> bool {
        self.map.lookup(&0u32.to_ne_bytes(), MapFlags::ANY).is_ok()
    }

    /// Increases since the last read, (dropped, untracked), if one is due or `now`.
    pub fn read(&mut self, now: bool) -> Result<(u64, u64)> {
        if !now && self.last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            return Ok((0, 0));
        }
        self.last = Some(Instant::now());
        let mut delta = [0; Counter::COUNTERS.0 as usize];
        for counter in [Counter::COUNTER_DROPPED, Counter::COUNTER_UNTRACKED] {
            let total = self
                .map
                .lookup(&counter.0.to_ne_bytes(), MapFlags::ANY)
                .context("reading the probes' counters")?
                .and_then(|v| leading_u64(&v))
                .unwrap_or(0);
            let total = if counter == Counter::COUNTER_DROPPED {
                total.max(self.perf_lost.get())
            } else {
                total
            };
            let i = counter.0 as usize;
            delta[i] = total.saturating_sub(self.seen[i]);
            self.seen[i] = total.max(self.seen[i]);
        }
        let (dropped, untracked) = (Counter::COUNTER_DROPPED, Counter::COUNTER_UNTRACKED);
        Ok((delta[dropped.0 as usize], delta[untracked.0 as usize]))
    }
}
