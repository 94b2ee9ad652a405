//! How events reach userspace (ring buffer or perf buffer), and how big the kernel-side
//! tables are.

use anyhow::{bail, Result};
use tcpconnlat_compat::{Findings, Transport};

use super::objects::RawEvent;

/// `--transport`: what the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportArg {
    /// The ring buffer where the kernel has one.
    Auto,
    Ringbuf,
    Perfbuf,
}

/// The ring buffer where the kernel has one, unless the user asked otherwise.
pub fn choose_transport(requested: TransportArg, findings: &Findings) -> Result<Transport> {
    let ring = &findings.ringbuf;
    match requested {
        TransportArg::Ringbuf if ring.is_unknown() => {
            bail!("cannot tell whether this kernel has a BPF ring buffer without root: run it as root")
        }
        TransportArg::Ringbuf if !ring.is_yes() => {
            bail!("this kernel has no BPF ring buffer (Linux 5.8+): use --transport perfbuf")
        }
        TransportArg::Ringbuf => Ok(Transport::RingBuf),
        TransportArg::Perfbuf => Ok(Transport::PerfBuf),
        TransportArg::Auto if ring.is_yes() => Ok(Transport::RingBuf),
        TransportArg::Auto => Ok(Transport::PerfBuf),
    }
}

/// What one event takes in the buffer: the record's header (the ring buffer's 8 bytes;
/// perf's 8-byte header and 4-byte size) and the event, padded to 8 bytes as both pad it.
pub fn record_bytes(transport: Transport) -> u32 {
    let event = std::mem::size_of::<RawEvent>() as u32;
    match transport {
        Transport::RingBuf => 8 + event.next_multiple_of(8),
        Transport::PerfBuf => 8 + (4 + event).next_multiple_of(8),
    }
}

/// How big the kernel-side tables are (`--buffer-pages`, `--max-pending`).
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Pages of event buffer, per CPU for the perf buffer, in all for the ring buffer;
    /// `None` for the defaults below.
    pub buffer_pages: Option<u32>,
    /// Connects that can be in flight at once and still be timed.
    pub max_pending: u32,
}

/// What becomes of an end the event buffer has no room for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenFull {
    /// The probe keeps it in the pending table for the sweeper's question (Linux 5.10+).
    Kept,
    /// Nothing can keep it: it is lost, and counted.
    Lost,
}

impl WhenFull {
    /// Kept where there is a sweeper's question (`Tracer::confirm`) to report it; else
    /// nothing would.
    pub fn given(question: Option<&str>) -> WhenFull {
        match question {
            Some(_) => WhenFull::Kept,
            None => WhenFull::Lost,
        }
    }
}

/// Whether the probes count the perf samples they send, by CPU (`sent`): where an end that
/// does not fit is lost, and the helper may not say it was (before Linux 5.4), so that
/// what never arrives is counted as lost even when no later sample carries perf's count.
pub fn counts_sent(transport: Transport, question: Option<&str>) -> bool {
    transport == Transport::PerfBuf && WhenFull::given(question) == WhenFull::Lost
}

impl Sizes {
    /// Perf buffer pages per CPU when the user does not say and ends that do not fit are
    /// kept (bcc's default).
    const PERF_PAGES: u32 = 64;

    /// The ring buffer holds, by default, an event for every connect that can be in
    /// flight: when they all fail at once (a SYN flood timing out: the timer wheel fires
    /// thousands in one softirq) no reader could drain it fast enough, and none is lost.
    pub fn ring_bytes(&self) -> u32 {
        let pages = self
            .buffer_pages
            .unwrap_or_else(|| self.pages_for_every_pending(Transport::RingBuf));
        pages * page_size()
    }

    /// Perf buffer pages per CPU. Where an end that does not fit is kept, bcc's default;
    /// where it would be lost, room for an event for every connect that can be in flight,
    /// on each CPU: a flood's timeouts all end on the CPU whose timers they were.
    pub fn perf_pages(&self, when_full: WhenFull) -> u32 {
        match (self.buffer_pages, when_full) {
            (Some(pages), _) => pages,
            (None, WhenFull::Kept) => Self::PERF_PAGES,
            (None, WhenFull::Lost) => self
                .pages_for_every_pending(Transport::PerfBuf)
                .max(Self::PERF_PAGES),
        }
    }

    /// Pages (a power of two) that hold an event for each of --max-pending connects: for
    /// its most, 4,194,304, about 512 MiB.
    fn pages_for_every_pending(&self, transport: Transport) -> u32 {
        // One more: a perf buffer is full one byte short of its size.
        let bytes = (u64::from(self.max_pending) + 1) * u64::from(record_bytes(transport));
        bytes.div_ceil(u64::from(page_size())).next_power_of_two() as u32
    }
}

pub fn page_size() -> u32 {
    use nix::unistd::{sysconf, SysconfVar};
    match sysconf(SysconfVar::PAGE_SIZE) {
        Ok(Some(size)) => u32::try_from(size).unwrap_or(4096),
        _ => 4096,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(max_pending: u32) -> Sizes {
        Sizes {
            buffer_pages: None,
            max_pending,
        }
    }

    /// Bytes a buffer of `pages` can fill: a perf buffer is full one byte short.
    fn room(pages: u32, transport: Transport) -> u64 {
        let bytes = u64::from(pages) * u64::from(page_size());
        match transport {
            Transport::RingBuf => bytes,
            Transport::PerfBuf => bytes - 1,
        }
    }

    #[test]
    fn by_default_a_buffer_holds_an_event_for_every_pending_connect() {
        for max_pending in [1, 100, 4095, 4096, 4097, 32768, 4_194_304] {
            let s = sizes(max_pending);
            let every = |transport| u64::from(max_pending) * u64::from(record_bytes(transport));
            let ring_pages = s.ring_bytes() / page_size();
            assert!(ring_pages.is_power_of_two());
            assert!(room(ring_pages, Transport::RingBuf) >= every(Transport::RingBuf));
            let perf_pages = s.perf_pages(WhenFull::Lost);
            assert!(perf_pages.is_power_of_two() && perf_pages >= Sizes::PERF_PAGES);
            assert!(
                room(perf_pages, Transport::PerfBuf) >= every(Transport::PerfBuf),
                "{max_pending}: {perf_pages} pages"
            );
            assert_eq!(s.perf_pages(WhenFull::Kept), Sizes::PERF_PAGES);
        }
    }

    #[test]
    fn pages_asked_for_are_pages_given() {
        let s = Sizes {
            buffer_pages: Some(2),
            max_pending: 32768,
        };
        assert_eq!(s.perf_pages(WhenFull::Lost), 2);
        assert_eq!(s.perf_pages(WhenFull::Kept), 2);
        assert_eq!(s.ring_bytes(), 2 * page_size());
    }
}
