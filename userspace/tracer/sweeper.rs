//! What keeps the probes' tables honest while tracing: the sweeper, which finds the
//! connects whose end no probe saw, and the loss counters the probes keep.

use std::cell::Cell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};

use super::objects::{Answer, Counter, RawPending};

/// How old a pending entry must be to be removed as one whose end no probe saw, and how
/// long its key must have been there before the sweeper looks (by default), where the
/// sweeper cannot ask the kernel about its socket.
pub const STALE: Duration = Duration::from_secs(15 * 60);

/// When the sweeper looks at pending entries.
#[derive(Clone, Copy, Debug)]
pub struct SweepTimes {
    /// Without the question: when it looks inside an entry (once its key has been there
    /// this long) and when it takes the entry for one no probe will finish (this old).
    /// Both are [`STALE`] but in tests (the hidden `--sweep-after`, `--stale-after`).
    pub look_after: Duration,
    pub stale: Duration,
    /// With the question: how long a connect is pending before the sweeper asks about
    /// its socket (and again at every sweep after).
    pub ask_after: Duration,
}

/// The pending table's entries are removed by the probe that sees the socket leave
/// SYN_SENT. But the kernel runs no probe at all for some of those changes, and says
/// nothing: it skips a tracing program that would run nested in another on the same CPU
/// or inside a map operation some process makes through bpf(), and on some kernels
/// batches of timer work ending many connects at once reach no BPF program. Their
/// entries would stay, and those connects would never be reported.
///
/// So the sweeper lists the table's keys every second (BPF_MAP_GET_NEXT_KEY keeps the
/// probes running, unlike a lookup) and, for each connect pending for `ask_after`, asks
/// the kernel whether its socket is still in SYN_SENT: a program run on demand
/// (`confirm_pending`, Linux 5.10+) that reports a connect whose socket has left it, with
/// its latency bounded, and removes it. Where the kernel cannot run it, the sweeper
/// looks inside an entry only once its key has been there for `look_after`, and removes
/// it as missed if it is older than any SYN retry schedule with default settings (about
/// 2 minutes) could keep a connect waiting, with a wide margin (`stale`).
///
/// Where it can ask, the probes also leave it the ends the event buffer had no room for,
/// kept in the table under keys of their own (`is_kept_key`): the question reports them.
pub struct Sweeper {
    map: MapHandle,
    /// The question's program, where the kernel runs it.
    confirm: Option<OwnedFd>,
    last: Instant,
    /// CLOCK_MONOTONIC when tracing began.
    started_ns: u64,
    /// Keys present at the last sweep, with when they were first seen.
    seen: HashMap<u64, Instant>,
    /// A sweep cut short, to go on with.
    pass: Option<Pass>,
    times: SweepTimes,
}

/// Whether a pending table key holds an end a probe kept for the sweeper (the buffer had no
/// room for it) rather than a connect: odd, in the lower half (`is_kept_key` in
/// probes/common.bpf.h). Asked about at once: it has ended.
fn is_kept_key(key: u64) -> bool {
    key & 1 == 1 && key >> 63 == 0
}

/// A map key or value's first 8 bytes: the pending table's key (the socket), a counter.
fn leading_u64(bytes: &[u8]) -> Option<u64> {
    bytes.get(..8)?.try_into().ok().map(u64::from_ne_bytes)
}

fn monotonic_ns() -> Result<u64> {
    // Entries hold bpf_ktime_get_ns() start times: CLOCK_MONOTONIC.
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .context("reading the monotonic clock")?;
    Ok(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}

/// What became of the entry the sweeper looked at.
enum Looked {
    /// Still pending: keep it, first seen then.
    Pending(Instant),
    /// Finished meanwhile, or reported by a probe that could not remove it.
    Gone,
    /// Removed as one no probe will finish.
    Missed,
    /// Ended, but the event buffer had no room to report it: still there.
    NoRoom,
}

/// A sweep under way.
struct Pass {
    started: Instant,
    /// CLOCK_MONOTONIC then.
    started_ns: u64,
    /// Keys still to look at.
    keys: Vec<u64>,
    /// Keys found pending so far, with when each was first seen.
    pending: HashMap<u64, Instant>,
}

/// What a sweep did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Swept {
    /// Entries removed as missed.
    pub missed: u64,
    /// Cut short: an end found had no room in the event buffer. Read it, then sweep on.
    pub buffer_full: bool,
}

impl Sweeper {
    pub fn new(map: MapHandle, confirm: Option<OwnedFd>, times: SweepTimes) -> Result<Sweeper> {
        Ok(Sweeper {
            map,
            confirm,
            last: Instant::now(),
            started_ns: monotonic_ns()?,
            seen: HashMap::new(),
            pass: None,
            times,
        })
    }

    /// Whether the kernel lets us ask about a pending connect (true where there is no
    /// question to ask).
    pub fn can_ask(&self) -> bool {
        self.confirm
            .as_ref()
            .is_none_or(|prog| run_on_demand(prog.as_raw_fd(), 0).is_ok())
    }

    /// How often it sweeps: every second where it can ask (the latency of an end it finds
    /// is bounded by that), else every 5 s.
    fn every(&self) -> Duration {
        if self.confirm.is_some() {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        }
    }

    /// Sweep if a sweep is due or one was cut short. Entries removed as missed are
    /// counted; the ends the question finds go through the event buffer, and where that
    /// is full the sweep stops until it is read (`Swept::buffer_full`).
    pub fn sweep(&mut self) -> Result<Swept> {
        let mut pass = match self.pass.take() {
            Some(pass) => pass,
            None if self.last.elapsed() < self.every() => return Ok(Swept::default()),
            None => self.begin()?,
        };
        let mut swept = Swept::default();
        while let Some(id) = pass.keys.pop() {
            let first = self.seen.get(&id).copied().unwrap_or(pass.started);
            let looked = match &self.confirm {
                Some(_)
                    if !is_kept_key(id)
                        && pass.started.duration_since(first) < self.times.ask_after =>
                {
                    Looked::Pending(first)
                }
                Some(confirm) => match run_on_demand(confirm.as_raw_fd(), id) {
                    Ok(answer) if answer == Answer::ANSWER_DONE.0 => Looked::Gone,
                    Ok(answer) if answer == Answer::ANSWER_NO_ROOM.0 => Looked::NoRoom,
                    Ok(_) => Looked::Pending(first),
                    Err(e) => return Err(e).context("asking the kernel about a pending connect"),
                },
                None => self.look(id, first, &pass)?,
            };
            match looked {
                Looked::Pending(first) => {
                    pass.pending.insert(id, first);
                }
                Looked::Gone => {}
                Looked::Missed => swept.missed += 1,
                Looked::NoRoom => {
                    pass.keys.push(id);
                    self.pass = Some(pass);
                    swept.buffer_full = true;
                    return Ok(swept);
                }
            }
        }
        self.seen = pass.pending;
        Ok(swept)
    }

    /// A new sweep: the table's keys now.
    fn begin(&mut self) -> Result<Pass> {
        let started = Instant::now();
        self.last = started;
        Ok(Pass {
            started,
            started_ns: monotonic_ns()?,
            keys: self.map.keys().filter_map(|k| leading_u64(&k)).collect(),
            pending: HashMap::with_capacity(self.seen.len()),
        })
    }

    /// Without the question: look inside an entry whose key has been there for
    /// `look_after`, and remove it if it is stale.
    fn look(&self, id: u64, first: Instant, pass: &Pass) -> Result<Looked> {
        let (now, now_ns) = (pass.started, pass.started_ns);
        if now.duration_since(first) < self.times.look_after {
            return Ok(Looked::Pending(first));
        }
        let key = id.to_ne_bytes();
        let value = match self.map.lookup(&key, MapFlags::ANY) {
            Ok(Some(value)) => value,
            Ok(None) => return Ok(Looked::Gone),
            Err(e) => return Err(e).context("reading the pending table"),
        };
        let mut entry = RawPending::default();
        plain::copy_from_bytes(&mut entry, &value)
            .map_err(|_| anyhow::anyhow!("a pending entry shorter than struct pending"))?;
        let age = Duration::from_nanos(now_ns.saturating_sub(entry.start_ns));
        let stale = age > self.times.stale || entry.start_ns < self.started_ns;
        if entry.reported == 0 && !stale {
            // A later connect on a reused socket address: as old as it says.
            return Ok(Looked::Pending(now.checked_sub(age).unwrap_or(now)));
        }
        if self.map.delete(&key).is_err() {
            return Ok(Looked::Pending(first));
        }
        Ok(if entry.reported == 0 {
            Looked::Missed
        } else {
            Looked::Gone
        })
    }
}

/// The probes' `counters` map (enum counter in probes/tcpconnlat.h) and what was last
/// read from it, so that only increases are reported. Read once a second, not at every
/// drain: each lookup is a moment in which the kernel would skip our probes (see Sweeper).
pub struct Counters {
    map: MapHandle,
    last: Option<Instant>,
    seen: [u64; Counter::COUNTERS.0 as usize],
    /// Samples the perf buffer reported lost. Where the kernel tells the probes (5.4+),
    /// each is one they counted too, as dropped, as kept for the sweeper or as retried by
    /// it; but perf's count arrives only once the next sample fits. So what was lost is
    /// the largest of the probes' dropped, perf's count less the kept and retried, and
    /// (where the probes count them) the samples sent and never read.
    perf_lost: Rc<Cell<u64>>,
    /// Where the probes count the samples they send (`counts_sent`).
    sent: Option<SentTally>,
}

/// Perf samples read so far, by CPU (counted by the perf buffer's callback).
pub type Received = Rc<Vec<Cell<u64>>>;

/// The perf samples the probes sent, by CPU (their `sent` map), against those read: a
/// sample counted before a read of the buffer began and not read by it was lost. Where
/// the helper does not say it had no room (before 5.4) perf says so only once a later
/// sample fits on that CPU, and none may come.
pub struct SentTally {
    map: MapHandle,
    received: Received,
    /// `sent` as read at the last counters' read, before the buffer was read since.
    before: Option<Vec<u64>>,
}

impl SentTally {
    pub fn new(map: MapHandle, received: Received) -> SentTally {
        SentTally {
            map,
            received,
            before: None,
        }
    }

    /// Samples sent before the buffer was last read and not read, then `sent` again for
    /// the next time (the probe counts a sample once it is written: any it counted by now
    /// is in the buffer for the next read to find, or lost).
    fn unreceived(&mut self) -> Result<u64> {
        let lost = self.before.as_ref().map_or(0, |sent| {
            sent.iter()
                .zip(self.received.iter())
                .map(|(sent, received)| sent.saturating_sub(received.get()))
                .sum()
        });
        let mut now = Vec::with_capacity(self.received.len());
        for cpu in 0..self.received.len() as u32 {
            let value = self
                .map
                .lookup(&cpu.to_ne_bytes(), MapFlags::ANY)
                .context("reading the probes' count of samples sent")?;
            now.push(value.as_deref().and_then(leading_u64).unwrap_or(0));
        }
        self.before = Some(now);
        Ok(lost)
    }
}

impl Counters {
    const EVERY: Duration = Duration::from_secs(1);

    pub fn new(map: MapHandle, perf_lost: Rc<Cell<u64>>, sent: Option<SentTally>) -> Counters {
        Counters {
            map,
            last: None,
            seen: [0; Counter::COUNTERS.0 as usize],
            perf_lost,
            sent,
        }
    }

    /// Whether the kernel lets us read the counters (see `EventStream::can_read_counters`).
    pub fn readable(&self) -> bool {
        self.map.lookup(&0u32.to_ne_bytes(), MapFlags::ANY).is_ok()
    }

    /// Increases since the last read (none where `when` waits for a read to be due).
    pub fn read(&mut self, when: CounterRead) -> Result<CounterIncreases> {
        let due = self.last.is_none_or(|t| t.elapsed() >= Self::EVERY);
        if when == CounterRead::IfDue && !due {
            return Ok(CounterIncreases::default());
        }
        self.last = Some(Instant::now());
        // Perf's count first: every sample in it was counted by a probe before.
        let perf_lost = self.perf_lost.get();
        let unreceived = match &mut self.sent {
            Some(tally) => tally.unreceived()?,
            None => 0,
        };
        let mut totals = [0; Counter::COUNTERS.0 as usize];
        for (i, total) in totals.iter_mut().enumerate() {
            *total = self
                .map
                .lookup(&(i as u32).to_ne_bytes(), MapFlags::ANY)
                .context("reading the probes' counters")?
                .and_then(|v| leading_u64(&v))
                .unwrap_or(0);
        }
        let dropped = Counter::COUNTER_DROPPED.0 as usize;
        let not_lost =
            totals[Counter::COUNTER_KEPT.0 as usize] + totals[Counter::COUNTER_RETRIED.0 as usize];
        totals[dropped] = totals[dropped]
            .max(perf_lost.saturating_sub(not_lost))
            .max(unreceived);
        let mut delta = [0; Counter::COUNTERS.0 as usize];
        for (i, delta) in delta.iter_mut().enumerate() {
            *delta = totals[i].saturating_sub(self.seen[i]);
            self.seen[i] = totals[i].max(self.seen[i]);
        }
        let of = |counter: Counter| delta[counter.0 as usize];
        Ok(CounterIncreases {
            dropped: of(Counter::COUNTER_DROPPED),
            untracked: of(Counter::COUNTER_UNTRACKED),
            table_errors: of(Counter::COUNTER_TABLE_ERRORS),
        })
    }
}

/// When the probes' counters are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterRead {
    /// Now: at start and at exit, where nothing may go unsaid.
    Now,
    /// Where a second has passed since the last read: they cost a syscall each.
    IfDue,
}

/// What the probes' counters rose by (enum counter).
#[derive(Clone, Copy, Debug, Default)]
pub struct CounterIncreases {
    pub dropped: u64,
    pub untracked: u64,
    pub table_errors: u64,
}

/// Run the raw tracepoint program `prog` once, here, with `arg` as its one argument;
/// what it returned.
pub fn run_on_demand(prog: RawFd, arg: u64) -> std::io::Result<u32> {
    use libbpf_rs::libbpf_sys as sys;
    let args = [arg];
    let mut opts = sys::bpf_test_run_opts {
        sz: std::mem::size_of::<sys::bpf_test_run_opts>() as sys::size_t,
        ctx_in: args.as_ptr().cast(),
        ctx_size_in: std::mem::size_of_val(&args) as u32,
        ..Default::default()
    };
    // SAFETY: `opts` points at `args`, which outlives the call.
    let rc = unsafe { sys::bpf_prog_test_run_opts(prog, &mut opts) };
    if rc < 0 {
        return Err(std::io::Error::from_raw_os_error(-rc));
    }
    Ok(opts.retval)
}
