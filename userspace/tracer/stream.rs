//! The probes' output as one `futures::Stream` of typed records, whichever the transport.
//!
//! Wakeups are what tracing costs, so the reader is woken by a timer, not by every event:
//! it drains the buffer every `max_delay` (`--max-delay`, the bound on display delay), and
//! the ring buffer wakes it early only when it fills past a quarter (see
//! probes/common.bpf.h).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::Stream;
use libbpf_rs::{MapCore, MapHandle, RingBuffer, RingBufferBuilder};
use tcpconnlat_compat::Transport;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::{interval, Interval, MissedTickBehavior};

use super::event::Event;
use super::objects::maps;
use super::perfbuf::{BatchedPerfBuffer, Sample};
use super::sweeper::{CounterRead, Counters, Received, SentTally, SweepTimes, Sweeper};
use super::transport::{counts_sent, page_size, record_bytes, WhenFull};
use super::{find_map, find_program_fd, Tracer};

/// What the stream yields: a connect, or word of connects it cannot show.
#[derive(Debug)]
pub enum Traced {
    Connect(Event),
    Shortfall(Shortfall),
}

/// Connects that tracing could not show, said on stderr and counted by every output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shortfall {
    /// Events the kernel could not queue because the buffer (of this transport) was full.
    Lost { count: u64, transport: Transport },
    /// Connects not timed because the pending table (this big) was full.
    Untracked { count: u64, max_pending: u32 },
    /// Connects whose end no probe saw (the kernel skipped it), found stale and removed
    /// where the sweeper cannot ask the kernel about their sockets.
    Missed { count: u64 },
    /// Pending-table updates and deletes the kernel refused (a bucket lock it would not
    /// take where the probe ran): the connects concerned are untracked, or their ends
    /// reported by the sweeper.
    TableErrors { count: u64 },
}

impl Shortfall {
    pub fn count(self) -> u64 {
        match self {
            Shortfall::Lost { count, .. }
            | Shortfall::Untracked { count, .. }
            | Shortfall::Missed { count }
            | Shortfall::TableErrors { count } => count,
        }
    }
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Shortfall::Lost { count, transport } => write!(
                f,
                "lost {count} events: the {} was full (raise --buffer-pages)",
                transport.name()
            ),
            Shortfall::Untracked { count, max_pending } => write!(
                f,
                "{count} connects not traced: more than {max_pending} were waiting for an answer (raise --max-pending)"
            ),
            Shortfall::Missed { count } => write!(
                f,
                "{count} connects not traced to their end: the kernel ran no probe for it, and cannot be asked about the socket (Linux 5.10+ can)"
            ),
            Shortfall::TableErrors { count } => write!(
                f,
                "the kernel refused {count} pending-table updates or deletes (a lock it would not take there): those connects are counted as untracked, or their ends reported by the sweeper"
            ),
        }
    }
}

/// What the buffers' callbacks decoded, waiting to be yielded; and the size of a sample
/// too short to be an event, if one came (never, unless the probe objects and this
/// binary disagree).
#[derive(Default)]
struct Inbox {
    queue: RefCell<VecDeque<Traced>>,
    undecodable: Cell<Option<usize>>,
}

impl Inbox {
    fn take(&self, data: &[u8]) {
        match Event::from_bytes(data) {
            Some(event) => self.queue.borrow_mut().push_back(Traced::Connect(event)),
            None => self.undecodable.set(Some(data.len())),
        }
    }

    /// The perf buffer is a ring per CPU, read one after another: the connects read from
    /// `from` on, put in the order they ended.
    fn in_time_order(&self, from: usize) {
        let mut queue = self.queue.borrow_mut();
        queue.make_contiguous()[from..].sort_by_key(|traced| match traced {
            Traced::Connect(e) => e.ts_ns,
            Traced::Shortfall(_) => u64::MAX,
        });
    }

    /// An error if a sample could not be decoded: better to stop than show wrong events.
    fn check(&self) -> Result<()> {
        match self.undecodable.get() {
            None => Ok(()),
            Some(len) => anyhow::bail!(
                "the probes sent a {len}-byte event, shorter than this binary's {} bytes: \
                 the probe objects and the binary disagree (rebuild them together)",
                std::mem::size_of::<super::objects::RawEvent>()
            ),
        }
    }
}

enum Buffer<'cb> {
    Ring(RingBuffer<'cb>),
    Perf(PerfBuffers<'cb>),
}

/// The perf buffer, watching CPU hotplug. Its events are per CPU, opened for the CPUs
/// online when it was made. A CPU that goes offline takes its ring's events along and
/// tracing goes on with the others; one that comes online again (or for the first time)
/// has no working event (the kernel does not bring one back, and opening one needs the
/// privileges given up after attaching): that ends tracing with a message saying to start
/// again, rather than go on blind to that CPU.
struct PerfBuffers<'cb> {
    buffer: BatchedPerfBuffer<'cb>,
    /// The CPUs online as last seen.
    online: Vec<u32>,
    checked: std::time::Instant,
}

impl<'cb> PerfBuffers<'cb> {
    fn new(buffer: BatchedPerfBuffer<'cb>) -> PerfBuffers<'cb> {
        PerfBuffers {
            buffer,
            online: online_cpus(),
            checked: std::time::Instant::now(),
        }
    }

    /// Read what is queued, after looking at the online CPUs (once a second).
    fn consume(&mut self) -> Result<()> {
        self.buffer.consume()?;
        if self.checked.elapsed() >= Duration::from_secs(1) {
            self.checked = std::time::Instant::now();
            self.follow(online_cpus())?;
        }
        Ok(())
    }

    fn follow(&mut self, online: Vec<u32>) -> Result<()> {
        let list = |cpus: &[u32]| {
            cpus.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let gone: Vec<u32> = self
            .online
            .iter()
            .copied()
            .filter(|c| !online.contains(c))
            .collect();
        let came: Vec<u32> = online
            .iter()
            .copied()
            .filter(|c| !self.online.contains(c))
            .collect();
        if !came.is_empty() {
            anyhow::bail!(
                "CPU {} came online: the perf buffer has no working ring for it, and making one \
                 needs the privileges given up after attaching: start tcpconnlat again \
                 (systemd's Restart= does)",
                list(&came)
            );
        }
        if !gone.is_empty() {
            note!(
                "tcpconnlat: CPU {} went offline: tracing goes on with the others",
                list(&gone)
            );
        }
        self.online = online;
        Ok(())
    }
}

/// The CPUs online (/sys/devices/system/cpu/online, e.g. "0-3,6").
fn online_cpus() -> Vec<u32> {
    cpu_list(
        std::fs::read_to_string("/sys/devices/system/cpu/online")
            .unwrap_or_default()
            .trim(),
    )
}

/// The CPUs of a cpulist ("0-3,6"); what is not one is left out.
fn cpu_list(list: &str) -> Vec<u32> {
    list.split(',')
        .filter_map(|part| match part.split_once('-') {
            Some((a, b)) => Some(a.trim().parse().ok()?..=b.trim().parse().ok()?),
            None => {
                let cpu = part.trim().parse().ok()?;
                Some(cpu..=cpu)
            }
        })
        .flatten()
        .collect()
}

pub struct EventStream<'cb> {
    /// The buffer's epoll fd: readable when it fills past a quarter (the ring buffer's
    /// probes force a wakeup; each perf buffer wakes after a quarter of its samples).
    /// Declared before `buffer` so it is deregistered before the buffer closes the fd.
    wakeup: AsyncFd<RawFd>,
    buffer: Buffer<'cb>,
    tick: Interval,
    inbox: Rc<Inbox>,
    counters: Counters,
    sweeper: Sweeper,
    transport: Transport,
    max_pending: u32,
}

impl<'cb> EventStream<'cb> {
    /// Must be created inside a tokio runtime. Pending entries are swept as `sweep` says
    /// (see Sweeper).
    pub fn new(
        tracer: &Tracer,
        max_delay: Duration,
        sweep: SweepTimes,
    ) -> Result<EventStream<'cb>> {
        let inbox = Rc::new(Inbox::default());
        let map = find_map(&tracer.object, tracer.transport.map())?;
        let perf_lost = Rc::new(Cell::new(0));
        // Where the probes count the samples they send, those read are counted too, by
        // CPU (the `sent` map has an entry for each possible one).
        let sent = counts_sent(tracer.transport, tracer.confirm)
            .then(|| -> Result<MapHandle> {
                Ok(MapHandle::try_from(&find_map(&tracer.object, maps::SENT)?)?)
            })
            .transpose()?;
        let cpus = sent.as_ref().map_or(0, |map| map.max_entries());
        let received: Received = Rc::new((0..cpus).map(|_| Cell::new(0)).collect());
        let buffer = match tracer.transport {
            Transport::RingBuf => {
                let inbox = inbox.clone();
                let mut builder = RingBufferBuilder::new();
                builder.add(&map, move |data: &[u8]| {
                    inbox.take(data);
                    0
                })?;
                Buffer::Ring(builder.build().context("setting up the ring buffer")?)
            }
            Transport::PerfBuf => {
                let (inbox, lost, read) = (inbox.clone(), perf_lost.clone(), received.clone());
                let pages = tracer.sizes.perf_pages(WhenFull::given(tracer.confirm));
                let batch = pages * page_size() / 4 / record_bytes(Transport::PerfBuf);
                Buffer::Perf(PerfBuffers::new(BatchedPerfBuffer::new(
                    &map,
                    pages as usize,
                    batch,
                    move |cpu, sample| match sample {
                        Sample::Data(data) => {
                            if let Some(n) = read.get(cpu as usize) {
                                n.set(n.get() + 1);
                            }
                            inbox.take(data)
                        }
                        Sample::Lost(count) => lost.set(lost.get() + count),
                    },
                )?))
            }
        };
        let epoll_fd = match &buffer {
            Buffer::Ring(ring) => ring.epoll_fd(),
            Buffer::Perf(perf) => perf.buffer.epoll_fd(),
        };
        // SAFETY: the fd belongs to `buffer`, which lives in the same EventStream and is
        // dropped after this AsyncFd (field order).
        let wakeup = unsafe { AsyncFd::register_with_interest(epoll_fd, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("watching the event buffer: {e}"))?;
        let sent = sent.map(|map| SentTally::new(map, received));
        let mut counters = Counters::new(
            MapHandle::try_from(&find_map(&tracer.object, maps::COUNTERS)?)?,
            perf_lost,
            sent,
        );
        // What the probes could not do before there was a buffer to read (the perf
        // buffer's rings are made after attaching) is from before tracing began: not said.
        counters.read(CounterRead::Now)?;
        let pending = MapHandle::try_from(&find_map(&tracer.object, maps::PENDING)?)?;
        let confirm = tracer
            .confirm
            .map(|name| find_program_fd(&tracer.object, name))
            .transpose()?;
        let sweeper = Sweeper::new(pending, confirm, sweep)?;
        let mut tick = interval(max_delay);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ok(EventStream {
            buffer,
            wakeup,
            tick,
            inbox,
            counters,
            sweeper,
            transport: tracer.transport,
            max_pending: tracer.sizes.max_pending,
        })
    }

    /// Whether the kernel still lets us make the bpf() calls the stream makes (reading
    /// the probes' counters, asking about pending connects; buffers are read through
    /// shared memory).
    pub fn can_make_its_calls(&self) -> bool {
        self.counters.readable() && self.sweeper.can_ask()
    }

    /// How many times one read goes back to the sweeper after reading a buffer it filled.
    const SWEEP_ROUNDS: usize = 64;

    /// Take what the event buffer holds into our queue.
    fn read_buffer(&mut self) -> Result<()> {
        match &mut self.buffer {
            Buffer::Ring(ring) => ring.consume().context("reading the ring buffer")?,
            Buffer::Perf(perf) => {
                let queued = self.inbox.queue.borrow().len();
                perf.consume()?;
                self.inbox.in_time_order(queued);
            }
        }
        self.inbox.check()
    }

    /// A record already read and decoded, if one is waiting.
    pub fn next_queued(&mut self) -> Option<Traced> {
        self.inbox.queue.borrow_mut().pop_front()
    }

    /// Read everything the kernel has queued into our queue, counters included (at exit:
    /// nothing left unsaid). Twice: the second read finds what the probes said they sent
    /// before the first was over, and tells what of it never came (see SentTally).
    pub fn drain(&mut self) -> Result<()> {
        self.read(CounterRead::Now)?;
        self.read(CounterRead::Now)
    }

    fn read(&mut self, counters: CounterRead) -> Result<()> {
        self.read_buffer()?;
        let counted = self.counters.read(counters)?;
        let mut missed = 0;
        // Ends the sweeper finds may not fit in the buffer at once: it stops, the buffer
        // is read, and it goes on (within bounds: what is left waits for the next read).
        for _ in 0..Self::SWEEP_ROUNDS {
            let swept = self.sweeper.sweep()?;
            missed += swept.missed;
            if !swept.buffer_full {
                break;
            }
            self.read_buffer()?;
        }
        let shortfalls = [
            Shortfall::Missed { count: missed },
            Shortfall::Lost {
                count: counted.dropped,
                transport: self.transport,
            },
            Shortfall::Untracked {
                count: counted.untracked,
                max_pending: self.max_pending,
            },
            Shortfall::TableErrors {
                count: counted.table_errors,
            },
        ];
        let mut queue = self.inbox.queue.borrow_mut();
        for shortfall in shortfalls.into_iter().filter(|s| s.count() > 0) {
            queue.push_back(Traced::Shortfall(shortfall));
        }
        Ok(())
    }
}

impl Stream for EventStream<'_> {
    type Item = Result<Traced>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(record) = self.inbox.queue.borrow_mut().pop_front() {
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
            if let Err(e) = self.read(CounterRead::IfDue) {
                return Poll::Ready(Some(Err(e)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{cpu_list, Event, Inbox, Shortfall, Traced};

    #[test]
    fn a_read_from_the_perf_buffer_is_put_in_time_order() {
        let inbox = Inbox::default();
        let ended = |ts_ns| {
            Traced::Connect(Event {
                ts_ns,
                ..Event::sample()
            })
        };
        let earlier = Traced::Shortfall(Shortfall::Missed { count: 1 });
        inbox
            .queue
            .borrow_mut()
            .extend([earlier, ended(9), ended(3), ended(5)]);
        inbox.in_time_order(1);
        let order: Vec<Option<u64>> = inbox
            .queue
            .borrow()
            .iter()
            .map(|t| match t {
                Traced::Connect(e) => Some(e.ts_ns),
                Traced::Shortfall(_) => None,
            })
            .collect();
        assert_eq!(order, [None, Some(3), Some(5), Some(9)]);
    }

    #[test]
    fn cpu_lists_read_as_the_kernel_writes_them() {
        assert_eq!(cpu_list("0-3,6"), [0, 1, 2, 3, 6]);
        assert_eq!(cpu_list("0"), [0]);
        assert_eq!(cpu_list(""), Vec::<u32>::new());
        assert_eq!(cpu_list("1-x,2"), [2]);
    }
}
