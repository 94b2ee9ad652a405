//! The probes' output as one `futures::Stream` of typed records, whichever the transport.
//!
//! Wakeups are what tracing costs, so the reader is woken by a timer, not by every event:
//! it drains the buffer every `max_delay` (`--max-delay`, the bound on display delay), and
//! the ring buffer wakes it early only when it fills past a quarter (see
//! probes/common.bpf.h).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::Stream;
use libbpf_rs::{MapCore, MapFlags, MapHandle, RingBuffer, RingBufferBuilder};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::{interval, Interval, MissedTickBehavior};

use crate::event::Event;
use crate::loader::{find_map, page_size, Tracer, Transport};
use crate::perfbuf::{BatchedPerfBuffer, Sample};
use crate::probes::{maps, Counter};

#[derive(Debug)]
pub enum Record {
    Event(Event),
    /// Events the kernel could not queue because the buffer was full.
    Lost(u64),
    /// Connects not timed because the pending table was full.
    Untracked(u64),
    /// Connects whose end no probe saw (the kernel skipped it), found stale and removed.
    Missed(u64),
}

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
struct Sweeper {
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

    fn new(map: MapHandle, times: SweepTimes) -> Result<Sweeper> {
        Ok(Sweeper {
            map,
            last: Instant::now(),
            started_ns: monotonic_ns()?,
            seen: HashMap::new(),
            times,
        })
    }

    /// Entries removed, if a sweep was due.
    fn sweep(&mut self) -> Result<u64> {
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
                let Ok(Some(value)) = self.map.lookup(&key, MapFlags::ANY) else {
                    continue; // finished meanwhile
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
struct Counters {
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

    /// Increases since the last read, (dropped, untracked), if one is due or `now`.
    fn read(&mut self, now: bool) -> Result<(u64, u64)> {
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

enum Buffer<'cb> {
    Ring(RingBuffer<'cb>),
    Perf(BatchedPerfBuffer<'cb>),
}

pub struct EventStream<'cb> {
    /// The buffer's epoll fd: readable when it fills past a quarter (the ring buffer's
    /// probes force a wakeup; each perf buffer wakes after a quarter of its samples).
    /// Declared before `buffer` so it is deregistered before the buffer closes the fd.
    wakeup: AsyncFd<RawFd>,
    buffer: Buffer<'cb>,
    tick: Interval,
    queue: Rc<RefCell<VecDeque<Record>>>,
    counters: Counters,
    sweeper: Sweeper,
}

impl<'cb> EventStream<'cb> {
    /// Must be created inside a tokio runtime. Pending entries are swept as `sweep` says
    /// (see Sweeper).
    pub fn new(
        tracer: &Tracer,
        max_delay: Duration,
        sweep: SweepTimes,
    ) -> Result<EventStream<'cb>> {
        let queue = Rc::new(RefCell::new(VecDeque::new()));
        let map = find_map(&tracer.object, tracer.transport.map())?;
        let perf_lost = Rc::new(Cell::new(0));
        let buffer = match tracer.transport {
            Transport::RingBuf => {
                let q = queue.clone();
                let mut builder = RingBufferBuilder::new();
                builder.add(&map, move |data: &[u8]| {
                    if let Some(event) = Event::from_bytes(data) {
                        q.borrow_mut().push_back(Record::Event(event));
                    }
                    0
                })?;
                Buffer::Ring(builder.build().context("setting up the ring buffer")?)
            }
            Transport::PerfBuf => {
                let (q, lost) = (queue.clone(), perf_lost.clone());
                let pages = tracer.sizes.perf_pages();
                // A record is the event, its 4-byte size and the 8-byte header.
                let record = (std::mem::size_of::<crate::probes::RawEvent>() + 12) as u32;
                let batch = pages * page_size() / 4 / record;
                Buffer::Perf(BatchedPerfBuffer::new(
                    &map,
                    pages as usize,
                    batch,
                    move |sample| match sample {
                        Sample::Data(data) => {
                            if let Some(event) = Event::from_bytes(data) {
                                q.borrow_mut().push_back(Record::Event(event));
                            }
                        }
                        Sample::Lost(count) => lost.set(lost.get() + count),
                    },
                )?)
            }
        };
        let epoll_fd = match &buffer {
            Buffer::Ring(ring) => ring.epoll_fd(),
            Buffer::Perf(perf) => perf.epoll_fd(),
        };
        // SAFETY: the fd belongs to `buffer`, which lives in the same EventStream and is
        // dropped after this AsyncFd (field order).
        let wakeup = unsafe { AsyncFd::register_with_interest(epoll_fd, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("watching the event buffer: {e}"))?;
        let counters = Counters {
            map: MapHandle::try_from(&find_map(&tracer.object, maps::COUNTERS)?)?,
            last: None,
            seen: [0; 2],
            perf_lost,
        };
        let pending = MapHandle::try_from(&find_map(&tracer.object, maps::PENDING)?)?;
        let sweeper = Sweeper::new(pending, sweep)?;
        let mut tick = interval(max_delay);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ok(EventStream {
            buffer,
            wakeup,
            tick,
            queue,
            counters,
            sweeper,
        })
    }

    /// Whether the kernel still lets us read the probes' counters (the one bpf() call the
    /// stream makes; buffers are read through shared memory).
    pub fn can_read_counters(&self) -> bool {
        self.counters
            .map
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
            .is_ok()
    }

    /// A record already read and decoded, if one is waiting.
    pub fn next_queued(&mut self) -> Option<Record> {
        self.queue.borrow_mut().pop_front()
    }

    /// Read everything the kernel has queued into our queue, counters included (at exit:
    /// nothing left unsaid).
    pub fn drain(&mut self) -> Result<()> {
        self.read(true)
    }

    fn read(&mut self, counters_now: bool) -> Result<()> {
        match &self.buffer {
            Buffer::Ring(ring) => ring.consume().context("reading the ring buffer")?,
            Buffer::Perf(perf) => perf.consume()?,
        }
        let (dropped, untracked) = self.counters.read(counters_now)?;
        let missed = self.sweeper.sweep()?;
        let mut queue = self.queue.borrow_mut();
        if missed > 0 {
            queue.push_back(Record::Missed(missed));
        }
        if dropped > 0 {
            queue.push_back(Record::Lost(dropped));
        }
        if untracked > 0 {
            queue.push_back(Record::Untracked(untracked));
        }
        Ok(())
    }
}

impl Stream for EventStream<'_> {
    type Item = Result<Record>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(record) = self.queue.borrow_mut().pop_front() {
                return Poll::Ready(Some(Ok(record)));
            }
            let mut due = false;
            match self.wakeup.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) => {
                    guard.clear_ready();
                    due = true;
                }
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Some(Err(e).context("waiting for the event buffer")))
                }
                Poll::Pending => {}
            }
            if self.tick.poll_tick(cx).is_ready() {
                due = true;
            }
            if !due {
                return Poll::Pending;
            }
            if let Err(e) = self.read(false) {
                return Poll::Ready(Some(Err(e)));
            }
        }
    }
}
