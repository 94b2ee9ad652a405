//! The probes' output as one `futures::Stream` of typed records, whichever the transport.
//!
//! Wakeups are what tracing costs, so the reader is woken by a timer, not by every event:
//! it drains the buffer every [`DRAIN_INTERVAL`] (the bound on display delay), and the ring
//! buffer wakes it early only when it fills past a quarter (see probes/common.bpf.h).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use futures::Stream;
use libbpf_rs::{
    MapCore, MapFlags, MapHandle, PerfBuffer, PerfBufferBuilder, RingBuffer, RingBufferBuilder,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::{interval, Interval, MissedTickBehavior};

use crate::event::Event;
use crate::loader::{find_map, Tracer, Transport};

/// The longest an event waits in the buffer before it is shown.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(20);

/// Perf buffer pages per CPU (must be a power of two).
const PERF_PAGES: usize = 64;

#[derive(Debug)]
pub enum Record {
    Event(Event),
    /// Events the kernel could not queue because the buffer was full.
    Lost(u64),
}

enum Buffer<'cb> {
    Ring(RingBuffer<'cb>),
    Perf(PerfBuffer<'cb>),
}

pub struct EventStream<'cb> {
    /// The ring buffer's epoll fd: readable when the probes force a wakeup. Declared
    /// before `buffer` so it is deregistered before the buffer closes the fd.
    wakeup: Option<AsyncFd<RawFd>>,
    buffer: Buffer<'cb>,
    tick: Interval,
    queue: Rc<RefCell<VecDeque<Record>>>,
    /// Ring buffer drops, counted by the probes.
    dropped: Option<(MapHandle, u64)>,
}

impl<'cb> EventStream<'cb> {
    /// Must be created inside a tokio runtime.
    pub fn new(tracer: &Tracer) -> Result<EventStream<'cb>> {
        let queue = Rc::new(RefCell::new(VecDeque::new()));
        let map = find_map(&tracer.object, tracer.transport.map())?;
        let (buffer, wakeup, dropped) = match tracer.transport {
            Transport::RingBuf => {
                let q = queue.clone();
                let mut builder = RingBufferBuilder::new();
                builder.add(&map, move |data: &[u8]| {
                    if let Some(event) = Event::from_bytes(data) {
                        q.borrow_mut().push_back(Record::Event(event));
                    }
                    0
                })?;
                let ring = builder.build().context("setting up the ring buffer")?;
                // SAFETY: the fd belongs to `ring`, which lives in the same EventStream and
                // is dropped after this AsyncFd (field order).
                let wakeup =
                    unsafe { AsyncFd::register_with_interest(ring.epoll_fd(), Interest::READABLE) }
                        .map_err(|e| anyhow::anyhow!("watching the ring buffer: {e}"))?;
                let dropped = MapHandle::try_from(&find_map(&tracer.object, "dropped")?)?;
                (Buffer::Ring(ring), Some(wakeup), Some((dropped, 0)))
            }
            Transport::PerfBuf => {
                let (q, lost_q) = (queue.clone(), queue.clone());
                let perf = PerfBufferBuilder::new(&map)
                    .pages(PERF_PAGES)
                    .sample_cb(move |_cpu: i32, data: &[u8]| {
                        if let Some(event) = Event::from_bytes(data) {
                            q.borrow_mut().push_back(Record::Event(event));
                        }
                    })
                    .lost_cb(move |_cpu: i32, count: u64| {
                        lost_q.borrow_mut().push_back(Record::Lost(count));
                    })
                    .build()
                    .context("setting up the perf buffer")?;
                (Buffer::Perf(perf), None, None)
            }
        };
        let mut tick = interval(DRAIN_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ok(EventStream {
            buffer,
            wakeup,
            tick,
            queue,
            dropped,
        })
    }

    /// Nothing decoded is waiting: a good moment to flush output.
    pub fn is_idle(&self) -> bool {
        self.queue.borrow().is_empty()
    }

    /// Read everything the kernel has queued into our queue.
    pub fn drain(&mut self) -> Result<()> {
        match &self.buffer {
            Buffer::Ring(ring) => ring.consume().context("reading the ring buffer")?,
            Buffer::Perf(perf) => perf.consume().context("reading the perf buffer")?,
        }
        if let Some((map, seen)) = &mut self.dropped {
            let total = map
                .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
                .context("reading the drop counter")?
                .and_then(|v| v.try_into().ok().map(u64::from_ne_bytes))
                .unwrap_or(0);
            if total > *seen {
                self.queue
                    .borrow_mut()
                    .push_back(Record::Lost(total - *seen));
                *seen = total;
            }
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
            if let Some(wakeup) = &self.wakeup {
                match wakeup.poll_read_ready(cx) {
                    Poll::Ready(Ok(mut guard)) => {
                        guard.clear_ready();
                        due = true;
                    }
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Some(Err(e).context("waiting for the ring buffer")))
                    }
                    Poll::Pending => {}
                }
            }
            if self.tick.poll_tick(cx).is_ready() {
                due = true;
            }
            if !due {
                return Poll::Pending;
            }
            if let Err(e) = self.drain() {
                return Poll::Ready(Some(Err(e)));
            }
        }
    }
}
