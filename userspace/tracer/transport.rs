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

/// What one event takes in the buffer: the event and the record's header (the ring
/// buffer's 8 bytes; perf's 8-byte header and 4-byte size).
pub fn record_bytes(transport: Transport) -> u32 {
    let header = match transport {
        Transport::RingBuf => 8,
        Transport::PerfBuf => 12,
    };
    std::mem::size_of::<RawEvent>() as u32 + header
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

impl Sizes {
    /// Perf buffer pages per CPU when the user does not say (bcc's default).
    const PERF_PAGES: u32 = 64;

    /// The ring buffer holds, by default, an event for every connect that can be in
    /// flight: when they all fail at once (a SYN flood timing out: the timer wheel fires
    /// thousands in one softirq) no reader could drain it fast enough, and none is lost.
    pub fn ring_bytes(&self) -> u32 {
        let page = page_size();
        match self.buffer_pages {
            Some(pages) => pages * page,
            None => {
                let record = u64::from(record_bytes(Transport::RingBuf));
                let bytes = u64::from(self.max_pending) * record;
                let pages = bytes.div_ceil(u64::from(page)).next_power_of_two();
                // --max-pending is at most 4,194,304: about 512 MiB.
                pages as u32 * page
            }
        }
    }

    /// Perf buffer pages per CPU: the per-CPU cost forbids sizing it by --max-pending.
    pub fn perf_pages(&self) -> u32 {
        self.buffer_pages.unwrap_or(Self::PERF_PAGES)
    }
}

pub fn page_size() -> u32 {
    use nix::unistd::{sysconf, SysconfVar};
    match sysconf(SysconfVar::PAGE_SIZE) {
        Ok(Some(size)) => u32::try_from(size).unwrap_or(4096),
        _ => 4096,
    }
}
