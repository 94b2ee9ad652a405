//! Command line: bcc-compatible flags plus mode selection and machine-readable output.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, ValueEnum};
use tcpconnlat_compat::Mode;

use crate::cgroup::{cgroup_id, CgroupPaths};
use crate::exporter::{ephemeral_ports, DestLabel, LabelRules, Metrics};
use crate::host::Host;
use crate::kprobes::KprobeAttach;
use crate::loader::{Filters, Setup, Sizes, Transport};
use crate::output::{Columns, Format, View};
use crate::stats::{By, Hists, Summary};
use crate::stream::{SweepTimes, STALE};

const EXAMPLES: &str = "\
Examples:
  tcpconnlat              trace every active TCP connect
  tcpconnlat 1            only connects slower than 1 ms
  tcpconnlat -tL          with timestamps and local ports
  tcpconnlat -p 181       only process 181
  tcpconnlat -j -c 10     10 connects as JSON lines, then exit
  tcpconnlat --features   what this kernel supports and which mode auto picks
  tcpconnlat --serve      Prometheus metrics at http://127.0.0.1:10436/metrics";

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Trace TCP connect latency: for every active connect, the time from SYN sent \
             to the SYN-ACK (or RST) being processed.",
    after_help = EXAMPLES
)]
pub struct Cli {
    /// Only show connects slower than this many milliseconds (filtered in the kernel)
    #[arg(value_name = "MIN_MS", value_parser = parse_min_ms)]
    pub min_ms: Option<f64>,

    /// Add a TIME(s) column: seconds since the first event
    #[arg(short, long)]
    pub timestamp: bool,

    /// Add an LPORT column
    #[arg(short = 'L', long)]
    pub lport: bool,

    /// Only these processes: repeat or comma-separate (filtered in the kernel)
    #[arg(short, long, value_name = "PID", value_delimiter = ',', value_parser = parse_pid)]
    pub pid: Vec<u32>,

    /// Only this user: a name or a numeric uid (filtered in the kernel)
    #[arg(short, long, value_name = "USER", value_parser = parse_uid)]
    pub uid: Option<u32>,

    /// Only these destination ports: repeat or comma-separate (filtered in the kernel)
    #[arg(long, value_name = "PORT", value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..))]
    pub dport: Vec<u16>,

    /// Only processes in this cgroup v2 directory, e.g. /sys/fs/cgroup/system.slice/nginx.service
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<std::path::PathBuf>,

    /// Only processes with this name (as in COMM; at most 15 bytes)
    #[arg(long, value_name = "NAME", value_parser = parse_comm)]
    pub comm: Option<String>,

    /// Only failed connects: refused, timed out, unreachable
    #[arg(long, conflicts_with = "established")]
    pub failed: bool,

    /// Only established connects (bcc's behaviour)
    #[arg(long)]
    pub established: bool,

    /// Instead of one line per connect, a log2 latency histogram on exit (and every --interval)
    #[arg(long)]
    pub hist: bool,

    /// Instead of one line per connect, per-destination counts, failures and latency
    /// percentiles on exit (and every --interval)
    #[arg(long, conflicts_with = "hist")]
    pub summary: bool,

    /// With --hist or --summary: also print every this many seconds
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub interval: Option<Duration>,

    /// With --hist: one histogram per destination (daddr:dport) or per process name
    #[arg(long, value_name = "KEY", value_enum, requires = "hist")]
    pub by: Option<HistBy>,

    /// Only IPv4 connects
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,

    /// Only IPv6 connects
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,

    /// Print libbpf's log, the mode decision and how long each start-up step took
    #[arg(short, long)]
    pub verbose: bool,

    /// One JSON record per line instead of a table: connect, or with --hist/--summary hist
    /// and summary; lost, untracked and missed when something could not be traced
    #[arg(short, long)]
    pub json: bool,

    /// Exit after this many seconds
    #[arg(short, long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Exit after this many connects
    #[arg(short, long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// How to hook the kernel; auto picks the best this kernel can do
    #[arg(long, value_name = "MODE", value_enum, default_value_t = ModeArg::Auto)]
    pub mode: ModeArg,

    /// How events reach userspace: auto uses the ring buffer where the kernel has one
    #[arg(long, value_name = "KIND", value_enum, default_value_t = TransportArg::Auto)]
    pub transport: TransportArg,

    /// Event buffer size in pages (a power of two): per CPU for the perf buffer (default
    /// 64), in all for the ring buffer (default: room for --max-pending events). Raise it
    /// if tcpconnlat says it lost events
    #[arg(long, value_name = "PAGES", value_parser = parse_pages)]
    pub buffer_pages: Option<u32>,

    /// Connects in flight at once that can be timed (SYN sent, no answer yet); more are
    /// counted and reported as not traced
    #[arg(long, value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=4_194_304))]
    pub max_pending: u32,

    /// Show each event at most this many milliseconds after it happened (events are read
    /// in batches: shorter means more wakeups)
    #[arg(long, value_name = "MS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub max_delay: u64,

    /// Legacy mode: read struct offsets from this BTF file (e.g. from BTFHub) instead of
    /// the kernel's own BTF or the offsets built in from kernel headers
    #[arg(long, value_name = "FILE")]
    pub btf: Option<std::path::PathBuf>,

    /// How to attach kprobes: auto uses the kprobe PMU where the kernel has it
    #[arg(long, value_name = "HOW", value_enum, default_value_t = KprobeAttach::Auto)]
    pub kprobe_attach: KprobeAttach,

    /// Read the sock:inet_sock_set_state record at its format file's offsets even where
    /// its layout is the known one (for tests: the path other kernels take)
    #[arg(long, hide = true)]
    pub record_offsets: bool,

    /// Look inside a pending entry once its key has been there this many seconds (default:
    /// 15 minutes; for tests)
    #[arg(long, hide = true, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub sweep_after: Option<u64>,

    /// Take a pending entry this many seconds old for one no probe will finish (default:
    /// 15 minutes; for tests)
    #[arg(long, hide = true, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub stale_after: Option<u64>,

    /// Same as --mode legacy: kprobes without BTF, for old kernels
    #[arg(long, conflicts_with = "mode")]
    pub legacy: bool,

    /// Print what this kernel supports and the mode auto would pick, then exit
    #[arg(long)]
    pub features: bool,

    /// Run as a daemon serving Prometheus metrics at http://ADDR/metrics instead of
    /// printing connects (ADDR defaults to 127.0.0.1:10436; 0.0.0.0:PORT exposes it)
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = DEFAULT_SERVE,
          value_parser = parse_serve,
          conflicts_with_all = ["json", "hist", "summary", "count", "timestamp", "lport", "interval"],
          help_heading = "Fleet (--serve)")]
    pub serve: Option<SocketAddr>,

    /// What the dest label holds: daddr:dport, daddr, dport or nothing (destination ports
    /// in the kernel's ephemeral range are shown as "ephemeral")
    #[arg(long, value_name = "KIND", value_enum, default_value_t = DestLabel::IpPort,
          requires = "serve", help_heading = "Fleet (--serve)")]
    pub dest: DestLabel,

    /// Label sets (dest, and cgroup with --label cgroup) at most; connects beyond go under
    /// dest="other"
    #[arg(long, value_name = "N", default_value_t = 1000, requires = "serve",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000),
          help_heading = "Fleet (--serve)")]
    pub max_series: u32,

    /// Drop a label set no connect used for this many seconds
    #[arg(long, value_name = "SECS", default_value = "900", value_parser = parse_duration,
          requires = "serve", help_heading = "Fleet (--serve)")]
    pub series_ttl: Duration,

    /// Histogram bucket bounds in seconds, increasing, comma-separated (default: 50 µs
    /// doubling to 210 s)
    #[arg(long, value_name = "SECS", value_delimiter = ',', value_parser = parse_bucket,
          requires = "serve", help_heading = "Fleet (--serve)")]
    pub buckets: Vec<f64>,

    /// Also label by the connecting process's cgroup v2 path (e.g. system.slice/nginx.service)
    #[arg(
        long,
        value_name = "LABEL",
        value_enum,
        requires = "serve",
        help_heading = "Fleet (--serve)"
    )]
    pub label: Vec<ExtraLabel>,
}

/// `--serve` without an address: loopback, on a port no well-known exporter uses (the
/// 9100-9999 registry is full; node_exporter is 9100, ebpf_exporter 9435, Rezolus 4242).
pub const DEFAULT_SERVE: &str = "127.0.0.1:10436";

/// `--label`: extra labels on every series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExtraLabel {
    Cgroup,
}

/// `--mode`: auto, or one mode only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Auto,
    Fentry,
    Kprobe,
    Tracepoint,
    Legacy,
}

/// `--transport`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// The ring buffer where the kernel has one.
    Auto,
    Ringbuf,
    Perfbuf,
}

/// `--by`: what each histogram of `--hist` is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HistBy {
    Dest,
    Comm,
}

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

    /// What the probes are to filter, each value checked against the system first.
    pub fn filters(&self) -> Result<Filters> {
        for pid in &self.pid {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                bail!("no process with PID {pid} (check it with: ps -p {pid})");
            }
        }
        Ok(Filters {
            min_lat_ns: self.min_ms.map_or(0, |ms| (ms * 1e6) as u64),
            pids: self.pid.clone(),
            uid: self.uid,
            cgroup_id: self.cgroup.as_deref().map(cgroup_id).transpose()?,
            comm: self.comm.clone(),
            dports: self.dport.clone(),
            established: !self.failed,
            failed: !self.established,
            ip_version: match (self.ipv4, self.ipv6) {
                (true, _) => Some(4),
                (_, true) => Some(6),
                _ => None,
            },
        })
    }

    /// How to load on `host`, as asked.
    pub fn setup<'h>(&self, host: &'h Host) -> Result<Setup<'h>> {
        Ok(Setup {
            features: &host.features,
            fentry_targets: host.trials.fentry_targets.yes(),
            sock: host.sock_offsets.as_ref().ok().map(|o| &o.offsets),
            transport: Transport::choose(self.transport, &host.trials)?,
            kprobe_attach: self.kprobe_attach,
            record_offsets: self.record_offsets,
            sizes: Sizes {
                buffer_pages: self.buffer_pages,
                max_pending: self.max_pending,
            },
            version_code: host.version_code.as_ref().ok().copied(),
            label_cgroup: self.label.contains(&ExtraLabel::Cgroup),
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
        }
    }

    /// What is shown, and how.
    pub fn view(&self) -> View {
        if self.hist {
            View::Hist(Hists::new(match self.by {
                Some(HistBy::Dest) => By::Dest,
                Some(HistBy::Comm) => By::Comm,
                None => By::All,
            }))
        } else if self.summary {
            View::Summary(Summary::default())
        } else {
            View::Lines
        }
    }

    pub fn format(&self) -> Format {
        if self.json {
            Format::Json
        } else {
            Format::Text
        }
    }

    pub fn columns(&self) -> Columns {
        Columns {
            timestamp: self.timestamp,
            lport: self.lport,
        }
    }

    /// What `--serve` asks for, checked before anything is loaded.
    pub fn fleet(&self) -> Result<Option<Fleet>> {
        let Some(addr) = self.serve else {
            return Ok(None);
        };
        let buckets = if self.buckets.is_empty() {
            Metrics::default_buckets()
        } else if self.buckets.len() > 100 || !self.buckets.windows(2).all(|w| w[0] < w[1]) {
            bail!("--buckets: give at most 100 bounds, each larger than the one before");
        } else {
            self.buckets.clone()
        };
        let rules = LabelRules {
            dest: self.dest,
            cgroup: self.label.contains(&ExtraLabel::Cgroup),
            ephemeral: ephemeral_ports(),
            max_series: self.max_series as usize,
            ttl: self.series_ttl,
        };
        let cgroups = rules.cgroup.then(CgroupPaths::new).transpose()?;
        Ok(Some(Fleet {
            addr,
            rules,
            buckets,
            cgroups,
        }))
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

/// `--serve` and how it labels.
pub struct Fleet {
    pub addr: SocketAddr,
    pub rules: LabelRules,
    pub buckets: Vec<f64>,
    /// With `--label cgroup`.
    pub cgroups: Option<CgroupPaths>,
}

/// When tracing stops by itself, and when aggregates are printed along the way.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    /// `-d`: stop after this long.
    pub duration: Option<Duration>,
    /// `-c`: stop after this many connects shown.
    pub count: Option<u64>,
    /// `--interval`: print (and restart) `--hist`/`--summary` this often.
    pub interval: Option<Duration>,
}

fn parse_min_ms(s: &str) -> Result<f64, String> {
    let ms: f64 = s
        .parse()
        .map_err(|_| "MIN_MS must be a number of milliseconds, like 1 or 0.5".to_owned())?;
    // Ten minutes is far beyond any SYN retry schedule: anything above is a typo.
    if !ms.is_finite() || !(0.0..=600_000.0).contains(&ms) {
        return Err("MIN_MS must be between 0 and 600000 milliseconds".to_owned());
    }
    Ok(ms)
}

fn parse_pid(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(pid) if pid > 0 && pid <= i32::MAX as u32 => Ok(pid),
        _ => Err("PID must be a positive process id".to_owned()),
    }
}

fn parse_uid(s: &str) -> Result<u32, String> {
    if let Ok(uid) = s.parse::<u32>() {
        return Ok(uid);
    }
    let passwd = std::fs::read_to_string(PASSWD).unwrap_or_default();
    uid_in_passwd(&passwd, s).ok_or_else(|| {
        format!("no user named {s:?} in {PASSWD}: give a user name or a numeric uid")
    })
}

/// Users are looked up in the file itself: the static binary cannot load the host's NSS
/// modules (a glibc linked in cannot use another glibc's), so directory users (LDAP, sssd)
/// are given by uid.
const PASSWD: &str = "/etc/passwd";

/// The uid of `name` in passwd(5) text.
fn uid_in_passwd(passwd: &str, name: &str) -> Option<u32> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

fn parse_comm(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 15 || s.contains('\0') {
        return Err("NAME must be 1 to 15 bytes, as the kernel keeps process names".to_owned());
    }
    Ok(s.to_owned())
}

fn parse_serve(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("ADDR must be an IP address and port, like {DEFAULT_SERVE} or [::1]:10436")
    })
}

fn parse_bucket(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err("bucket bounds must be seconds above 0, like 0.001,0.01,0.1,1".to_owned()),
    }
}

fn parse_pages(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n.is_power_of_two() && n <= 65536 => Ok(n),
        _ => Err("PAGES must be a power of two from 1 to 65536, like 64".to_owned()),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| "SECS must be a number of seconds, like 10 or 0.5".to_owned())?;
    if !secs.is_finite() || secs <= 0.0 || secs > 31_536_000.0 {
        return Err("SECS must be more than 0 and at most a year".to_owned());
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tcpconnlat").chain(args.iter().copied()))
    }

    #[test]
    fn bcc_style_flags_parse() {
        let cli = parse(&["-tL", "-p", "42", "-4", "2.5"]).unwrap();
        assert!(cli.timestamp && cli.lport && cli.ipv4);
        assert_eq!(cli.pid, [42]);
        assert_eq!(cli.min_ms, Some(2.5));
        assert_eq!(cli.forced_mode(), None);
    }

    /// --help names every JSON record type (record.rs; README's table lists their fields).
    #[test]
    fn help_names_every_json_record() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        let json = help
            .split("--json")
            .nth(1)
            .and_then(|rest| rest.split("\n  -").next())
            .unwrap();
        for kind in ["connect", "hist", "summary", "lost", "untracked", "missed"] {
            assert!(json.contains(kind), "--json help lacks {kind}: {json}");
        }
    }

    #[test]
    fn users_come_from_passwd_lines() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\n\
                      # not a user\n\
                      web:x:33:33::/var/www:/usr/sbin/nologin\n\
                      broken:x:notanumber:1::/:/bin/false\n";
        assert_eq!(uid_in_passwd(passwd, "root"), Some(0));
        assert_eq!(uid_in_passwd(passwd, "web"), Some(33));
        assert_eq!(uid_in_passwd(passwd, "broken"), None);
        assert_eq!(uid_in_passwd(passwd, "ro"), None);
        assert_eq!(uid_in_passwd(passwd, "x"), None);
        assert_eq!(uid_in_passwd("", "root"), None);
    }

    #[test]
    fn lists_and_names_parse() {
        let cli = parse(&[
            "-p", "1,2", "-p", "3", "--dport", "80,443", "-u", "root", "--comm", "curl",
        ])
        .unwrap();
        assert_eq!(cli.pid, [1, 2, 3]);
        assert_eq!(cli.dport, [80, 443]);
        assert_eq!(cli.uid, Some(0));
        assert_eq!(cli.comm.as_deref(), Some("curl"));
        assert_eq!(parse(&["-u", "1234"]).unwrap().uid, Some(1234));
    }

    #[test]
    fn modes_parse() {
        assert_eq!(
            parse(&["--mode", "tracepoint"]).unwrap().forced_mode(),
            Some(Mode::Tracepoint)
        );
        assert_eq!(
            parse(&["--legacy"]).unwrap().forced_mode(),
            Some(Mode::Legacy)
        );
        assert_eq!(parse(&["--mode", "auto"]).unwrap().forced_mode(), None);
        assert!(parse(&["--mode", "bogus"]).is_err());
        assert!(parse(&["--mode", "kprobe", "--legacy"]).is_err());
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            &["-1"][..],
            &["nan"],
            &["inf"],
            &["1e9"],
            &["-p", "0"],
            &["-p", "-5"],
            &["-p", "99999999999"],
            &["-d", "0"],
            &["-c", "0"],
            &["-4", "-6"],
            &["--dport", "0"],
            &["--dport", "65536"],
            &["--dport", "80,x"],
            &["-u", "no-such-user-here"],
            &["--comm", "a-name-longer-than-15"],
            &["--comm", ""],
            &["--failed", "--established"],
            &["--by", "dest"],
            &["--hist", "--summary"],
            &["--hist", "--by", "pid"],
            &["--interval", "0"],
            &["--buffer-pages", "0"],
            &["--buffer-pages", "48"],
            &["--buffer-pages", "131072"],
            &["--max-pending", "0"],
            &["--max-pending", "99999999"],
            &["--max-delay", "0"],
            &["--max-delay", "-5"],
        ] {
            assert!(parse(args).is_err(), "{args:?} was accepted");
        }
    }
}
