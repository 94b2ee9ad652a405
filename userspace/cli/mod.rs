//! The command line: the flags (flags.rs) and what they become for each concern. Values
//! that name things on the host (users, processes, cgroups) are resolved by the host
//! concern; the rest are taken as parsed.

mod flags;
mod generate;

use std::time::Duration;

use anyhow::Result;
use tcpconnlat_compat::{Finding, Mode, RecordRead};

pub use flags::Cli;
use flags::{ExtraLabel, ModeArg};
pub use generate::{generate, Generate};

use crate::fleet::ServeArgs;
use crate::host::{self, Host};
use crate::output::stats::{By, Hists, Summary};
use crate::output::{Columns, Format, OutputShape, View};
use crate::pump::Limits;
use crate::tracer::{
    choose_transport, Filters, IpVersion, LoadOptions, Outcomes, Sizes, SweepTimes, STALE,
};

impl Cli {
    /// The mode the user forced, if any (`None` is auto).
    pub fn forced_mode(&self) -> Option<Mode> {
        if self.legacy {
            return Some(Mode::Legacy);
        }
        match self.mode {
            ModeArg::Auto => None,
            ModeArg::Fentry => Some(Mode::Fentry),
            ModeArg::Kprobe => Some(Mode::Kprobe),
            ModeArg::Tracepoint => Some(Mode::Tracepoint),
            ModeArg::Legacy => Some(Mode::Legacy),
        }
    }

    /// What the probes are to filter, each value the host resolves checked first.
    pub fn filters(&self) -> Result<Filters> {
        let pids = self
            .pid
            .iter()
            .map(|&pid| host::users::existing_process(pid))
            .collect::<Result<_, _>>()?;
        Ok(Filters {
            min_lat_ns: self.min_ms.map_or(0, |ms| (ms * 1e6) as u64),
            pids,
            uid: self.uid.as_ref().map(host::users::uid).transpose()?,
            cgroup_id: self
                .cgroup
                .as_deref()
                .map(host::cgroup::cgroup_id)
                .transpose()?,
            comm: self.comm.clone(),
            dports: self.dport.clone(),
            outcomes: match (self.established, self.failed) {
                (true, _) => Outcomes::Established,
                (_, true) => Outcomes::Failed,
                _ => Outcomes::All,
            },
            ip_version: match (self.ipv4, self.ipv6) {
                (true, _) => Some(IpVersion::V4),
                (_, true) => Some(IpVersion::V6),
                _ => None,
            },
        })
    }

    /// How to load on `host`, as asked.
    pub fn load_options<'a>(&'a self, host: &'a Host) -> Result<LoadOptions<'a>> {
        Ok(LoadOptions {
            features: &host.features,
            findings: &host.findings,
            core_btf: host.core_btf.as_ref(),
            sock: host,
            transport: choose_transport(self.transport, &host.findings)?,
            kprobe_attach: self.kprobe_attach,
            record: if self.record_offsets {
                RecordRead::AtOffsets
            } else {
                RecordRead::Direct
            },
            sizes: Sizes {
                buffer_pages: self.buffer_pages,
                max_pending: self.max_pending,
            },
            version_code: host.version_code.as_ref().ok().copied(),
            label_cgroup: self.label.contains(&ExtraLabel::Cgroup),
            pin_maps: self.pin_maps.as_deref(),
            on_demand: match &host.findings.on_demand {
                Finding::Yes(()) => Ok(()),
                Finding::No(why) | Finding::Unknown(why) => Err(why),
            },
            fentry_trial: host,
        })
    }

    /// `--max-delay`.
    pub fn max_delay(&self) -> Duration {
        Duration::from_millis(self.max_delay)
    }

    /// When the sweeper looks at and gives up on pending entries.
    pub fn sweep_times(&self) -> SweepTimes {
        SweepTimes {
            look_after: self.sweep_after.map_or(STALE, Duration::from_secs),
            stale: self.stale_after.map_or(STALE, Duration::from_secs),
            ask_after: Duration::from_secs(1),
        }
    }

    /// What the output looks like, as asked.
    pub fn output(&self) -> OutputShape {
        let view = if self.hist {
            View::Hist(Hists::new(self.by.unwrap_or(By::All)))
        } else if self.summary {
            View::Summary(Summary::default())
        } else {
            View::Lines
        };
        OutputShape {
            format: if self.json {
                Format::Json
            } else {
                Format::Text
            },
            view,
            columns: Columns {
                timestamp: self.timestamp,
                lport: self.lport,
            },
        }
    }

    /// What `--serve` asks for, if given.
    pub fn serve_args(&self) -> Option<ServeArgs> {
        Some(ServeArgs {
            addr: self.serve?,
            dest: self.dest,
            cgroup_label: self.label.contains(&ExtraLabel::Cgroup),
            max_series: self.max_series as usize,
            ttl: self.series_ttl,
            buckets: self.buckets.clone(),
            web_config: self.web_config.clone(),
        })
    }

    /// When tracing ends by itself.
    pub fn limits(&self) -> Limits {
        Limits {
            duration: self.duration,
            count: self.count,
            interval: self.interval,
        }
    }
}
