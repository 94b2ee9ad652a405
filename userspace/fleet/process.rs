//! The process metrics every Prometheus client library exports (`process_*`), read from
//! /proc/self at each scrape: what dashboards and alerts about an exporter expect.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

#[derive(Debug)]
pub struct ProcessCollector;

/// What /proc says of this process now.
#[derive(Debug, Default, PartialEq)]
struct Reading {
    cpu_seconds: f64,
    resident_bytes: f64,
    start_time_seconds: f64,
    open_fds: f64,
    max_fds: f64,
}

impl ProcessCollector {
    fn read() -> Option<Reading> {
        use nix::unistd::{sysconf, SysconfVar};
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let ticks = sysconf(SysconfVar::CLK_TCK).ok()??.max(1) as f64;
        let page = sysconf(SysconfVar::PAGE_SIZE).ok()??.max(1) as f64;
        let boot = boot_time(&std::fs::read_to_string("/proc/stat").ok()?)?;
        let (utime, stime, start, rss) = stat_fields(&stat)?;
        let (soft, _) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
        Some(Reading {
            cpu_seconds: (utime + stime) as f64 / ticks,
            resident_bytes: rss as f64 * page,
            start_time_seconds: boot as f64 + start as f64 / ticks,
            open_fds: std::fs::read_dir("/proc/self/fd").ok()?.count() as f64,
            max_fds: soft as f64,
        })
    }
}

/// utime, stime, starttime (clock ticks) and rss (pages) from /proc/PID/stat text.
fn stat_fields(stat: &str) -> Option<(u64, u64, u64, u64)> {
    // The name between parentheses may hold spaces and parentheses: fields follow the last.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // proc(5) numbers fields from 1, with state as 3: utime 14, stime 15, starttime 22, rss 24.
    let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
    Some((field(14)?, field(15)?, field(22)?, field(24)?))
}

/// The boot time (`btime`, seconds since the epoch) from /proc/stat text.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Unreadable /proc: no process metrics, the rest of the scrape as usual.
        let Some(r) = Self::read() else {
            return Ok(());
        };
        let counter = ConstCounter::new(r.cpu_seconds);
        counter.encode(encoder.encode_descriptor(
            "process_cpu",
            "Total user and system CPU time spent in seconds",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?)?;
        for (name, help, unit, value) in [
            (
                "process_resident_memory",
                "Resident memory size in bytes",
                Some(&Unit::Bytes),
                r.resident_bytes,
            ),
            (
                "process_start_time",
                "Start time of the process since unix epoch in seconds",
                Some(&Unit::Seconds),
                r.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                None,
                r.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                None,
                r.max_fds,
            ),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_are_read_past_names_with_spaces_and_parentheses() {
        let stat = "4242 (tcp conn (x)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    150 30 0 0 20 0 3 0 98765 123456789 2560 18446744073709551615";
        assert_eq!(stat_fields(stat), Some((150, 30, 98765, 2560)));
        assert_eq!(stat_fields("4242 (cut"), None);
        assert_eq!(
            boot_time("cpu 1 2 3\nbtime 1764800000\nprocesses 5\n"),
            Some(1764800000)
        );
    }

    #[test]
    fn this_process_reads_sensibly() {
        let r = ProcessCollector::read().unwrap();
        assert!(r.open_fds >= 3.0 && r.open_fds <= r.max_fds, "{r:?}");
        assert!(r.resident_bytes > 1e6, "{r:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            r.start_time_seconds <= now + 1.0 && r.start_time_seconds > now - 3600.0,
            "{r:?}"
        );
    }
}
