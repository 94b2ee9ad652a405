//! The command line as clap defines it: every flag, its help and the parser of its value.
//! Value parsers are pure: values are resolved against the host later, by the concern
//! that owns them (cli/mod.rs says which).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::fleet::DestLabel;
use crate::host::users::User;
use crate::host::OffsetsArg;
use crate::output::stats::By;
use crate::tracer::kprobes::KprobeAttach;
use crate::tracer::objects::COMM_LEN;
use crate::tracer::TransportArg;

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
    #[arg(short, long, value_name = "USER")]
    pub uid: Option<User>,

    /// Only these destination ports: repeat or comma-separate (filtered in the kernel)
    #[arg(long, value_name = "PORT", value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..))]
    pub dport: Vec<u16>,

    /// Only processes in this cgroup v2 directory, e.g. /sys/fs/cgroup/system.slice/nginx.service
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,

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
    pub by: Option<By>,

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

    /// Event buffer size in pages (a power of two): in all for the ring buffer (default:
    /// room for --max-pending events), per CPU for the perf buffer (default: 64 where ends
    /// that do not fit are kept, Linux 5.10+; else room for --max-pending events on each
    /// CPU). Raise it if tcpconnlat says it lost events
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
    /// the kernel's own BTF, the offsets built in from kernel headers or discovery
    #[arg(long, value_name = "FILE")]
    pub btf: Option<PathBuf>,

    /// Where legacy mode's struct sock offsets come from: auto takes BTF, then offsets built
    /// in from kernel headers, then finds them at start-up; discover always finds them
    #[arg(long, value_name = "HOW", value_enum, default_value_t = OffsetsArg::Auto,
          conflicts_with = "btf")]
    pub offsets: OffsetsArg,

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

    /// Pin the probes' maps in this bpffs directory while tracing, removed at exit (for
    /// tests: kernels before 4.13 give no other way to reach another process's maps)
    #[arg(long, hide = true, value_name = "DIR")]
    pub pin_maps: Option<PathBuf>,

    /// Write the man page or a shell's completions to stdout, then exit (for packaging)
    #[arg(long, hide = true, value_name = "WHAT", value_enum)]
    pub generate: Option<super::Generate>,

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

    /// Series at most, all counted (what Prometheus pays for): a destination (with its
    /// cgroup) that would take more goes under dest="other"
    #[arg(long, value_name = "N", default_value_t = 5000, requires = "serve",
          value_parser = clap::value_parser!(u32).range(1..=10_000_000),
          help_heading = "Fleet (--serve)")]
    pub max_series: u32,

    /// Drop a label set no connect used for this many seconds
    #[arg(long, value_name = "SECS", default_value = "900", value_parser = parse_duration,
          requires = "serve", help_heading = "Fleet (--serve)")]
    pub series_ttl: Duration,

    /// Histogram bucket bounds in seconds, increasing, comma-separated (default: 50 µs
    /// to 210 s, each four times the last)
    #[arg(long, value_name = "SECS", value_delimiter = ',', value_parser = parse_bucket,
          requires = "serve", help_heading = "Fleet (--serve)")]
    pub buckets: Vec<f64>,

    /// TLS and basic auth for /metrics, from a file in the web configuration format of
    /// Prometheus's exporter-toolkit (tls_server_config, basic_auth_users)
    #[arg(
        long,
        value_name = "FILE",
        requires = "serve",
        help_heading = "Fleet (--serve)"
    )]
    pub web_config: Option<PathBuf>,

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

fn parse_comm(s: &str) -> Result<String, String> {
    // The kernel keeps a name with its NUL in COMM_LEN bytes.
    let most = COMM_LEN - 1;
    if s.is_empty() || s.len() > most || s.contains('\0') {
        return Err(format!(
            "NAME must be 1 to {most} bytes, as the kernel keeps process names"
        ));
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
    use proptest::prelude::*;
    use tcpconnlat_compat::Mode;

    /// Every flag that takes a value, as the user writes it.
    const VALUED: &[&str] = &[
        "-p",
        "-u",
        "--dport",
        "--cgroup",
        "--comm",
        "--interval",
        "--by",
        "-d",
        "-c",
        "--mode",
        "--transport",
        "--buffer-pages",
        "--max-pending",
        "--max-delay",
        "--btf",
        "--offsets",
        "--kprobe-attach",
        "--sweep-after",
        "--stale-after",
        "--serve",
        "--dest",
        "--max-series",
        "--series-ttl",
        "--buckets",
        "--label",
    ];

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        /// Any value for any flag, and any positional: parsed or refused with clap's
        /// error (which main turns into one line), never a panic.
        #[test]
        fn any_value_of_any_flag_parses_or_is_refused(
            flag in proptest::sample::select(VALUED),
            value in prop_oneof![".{0,24}", "-?[0-9]{0,25}(\\.[0-9]{0,5})?(e[0-9]{1,3})?", "[0-9,]{0,20}"],
            positional in proptest::option::of(".{0,12}"),
        ) {
            let mut args = vec![flag, value.as_str()];
            if let Some(p) = positional.as_deref() {
                args.push(p);
            }
            let _ = parse(&args);
            let joined = format!("{flag}={value}");
            let _ = parse(&[joined.as_str()]);
        }
    }

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
    fn lists_and_names_parse() {
        let cli = parse(&[
            "-p", "1,2", "-p", "3", "--dport", "80,443", "-u", "root", "--comm", "curl",
        ])
        .unwrap();
        assert_eq!(cli.pid, [1, 2, 3]);
        assert_eq!(cli.dport, [80, 443]);
        assert_eq!(cli.uid, Some(User::Name("root".into())));
        assert_eq!(cli.comm.as_deref(), Some("curl"));
        assert_eq!(parse(&["-u", "1234"]).unwrap().uid, Some(User::Id(1234)));
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
