//! The event pump: moves what the tracer's stream yields into a [`Sink`] (the printer or
//! the exporter) until a signal, a limit or the stream ends it.

use std::io;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::{interval_at, sleep, Instant as TokioInstant, MissedTickBehavior};

use crate::tracer::event::Event;
use crate::tracer::stream::{EventStream, Shortfall, Traced};

/// Where the pump sends what the probes report: the printer, or the exporter.
pub trait Sink {
    fn event(&mut self, e: &Event) -> io::Result<()>;
    /// Connects tracing could not show (lost, untracked, missed).
    fn shortfall(&mut self, shortfall: Shortfall) -> io::Result<()>;
    /// What is due every `--interval`: the printer prints its aggregates and starts over,
    /// the exporter drops idle label sets.
    fn interval(&mut self) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
}

/// What a sink's error is about: its output (stdout, a pipe, a full disk).
pub const WRITING: &str = "writing the output";

/// When tracing stops by itself, and how often the sink's interval comes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    /// `-d`: stop after this long.
    pub duration: Option<Duration>,
    /// `-c`: stop after this many connects shown.
    pub count: Option<u64>,
    /// `--interval` (or the exporter's expiry period).
    pub interval: Option<Duration>,
}

/// SIGINT and SIGTERM: both end tracing cleanly.
pub struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    /// Handlers first, before loading: a signal that arrives meanwhile must still end us
    /// cleanly. Needs a tokio runtime.
    pub fn new() -> Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("handling SIGINT")?,
            term: signal(SignalKind::terminate()).context("handling SIGTERM")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// Move records from the stream to the sink until a signal, `limits` or the stream ends
/// it; then show what is already queued.
pub async fn pump(
    mut stream: EventStream<'_>,
    sink: &mut dyn Sink,
    limits: Limits,
    mut signals: Signals,
) -> Result<()> {
    const FOREVER: Duration = Duration::from_secs(86400 * 365);
    let deadline = sleep(limits.duration.unwrap_or(FOREVER));
    tokio::pin!(deadline);
    let mut interval = limits.interval.map(|every| {
        let mut ticks = interval_at(TokioInstant::now() + every, every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticks
    });
    let mut shown = Shown::new(limits.count);
    loop {
        let traced = tokio::select! {
            // In this order: a signal ends it even while events keep coming.
            biased;
            _ = signals.recv() => break,
            _ = &mut deadline => break,
            _ = async { interval.as_mut().unwrap().tick().await }, if interval.is_some() => {
                sink.interval().context(WRITING)?;
                continue
            }
            traced = stream.next() => match traced {
                Some(traced) => traced?,
                None => return Ok(()),
            },
        };
        // With the rest of what the last read queued, without a round of the select each.
        let queued = std::iter::from_fn(|| stream.next_queued());
        for traced in std::iter::once(traced).chain(queued) {
            if shown.show(sink, traced)? {
                return Ok(());
            }
        }
        sink.flush().context(WRITING)?;
    }
    // Ending: show what the buffer holds now, then stop. Not what comes after: where
    // connects end faster than they are shown, reading on would never end.
    stream.drain()?;
    while let Some(traced) = stream.next_queued() {
        if shown.show(sink, traced)? {
            break;
        }
    }
    Ok(())
}

/// Connects handed on so far, against `--count`.
struct Shown {
    count: u64,
    limit: Option<u64>,
}

impl Shown {
    fn new(limit: Option<u64>) -> Shown {
        Shown { count: 0, limit }
    }

    /// Hand one record on; whether `--count` is now reached.
    fn show(&mut self, sink: &mut dyn Sink, traced: Traced) -> Result<bool> {
        match traced {
            Traced::Connect(event) => {
                sink.event(&event).context(WRITING)?;
                self.count += 1;
                Ok(self.limit.is_some_and(|n| self.count >= n))
            }
            Traced::Shortfall(shortfall) => {
                sink.shortfall(shortfall).context(WRITING)?;
                Ok(false)
            }
        }
    }
}
