//! Showing events: bcc's table (with columns that widen instead of breaking alignment),
//! one JSON object per line, or instead of either, histograms or per-destination summaries
//! printed on exit and every interval.

use std::io::{self, Write};

use tcpconnlat_compat::Mode;
use unicode_width::UnicodeWidthStr;

use crate::event::{AddrText, Event, Outcome};
use crate::record::{Connect, Count, Record};
use crate::stats::{Hists, Summary};

/// Where the event loop sends what the probes report: the printer, or the exporter.
pub trait Sink {
    fn event(&mut self, e: &Event) -> io::Result<()>;
    /// Events the kernel could not queue.
    fn lost(&mut self, count: u64, buffer: &str) -> io::Result<()>;
    /// Connects the probes could not time.
    fn untracked(&mut self, count: u64, max_pending: u32) -> io::Result<()>;
    /// Connects whose end the kernel did not show the probes.
    fn missed(&mut self, count: u64) -> io::Result<()>;
    /// What is due every interval (and, for the printer, at the end).
    fn report(&mut self) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
}

/// How records are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// bcc's table, histograms and summaries as text.
    Text,
    /// One JSON record per line (see record.rs).
    Json,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Columns {
    pub timestamp: bool,
    pub lport: bool,
}

/// What is shown.
pub enum View {
    /// One line (or JSON object) per connect.
    Lines,
    Hist(Hists),
    Summary(Summary),
}

pub struct Printer<W: Write> {
    out: W,
    format: Format,
    view: View,
    columns: Columns,
    mode: Mode,
    first_ts_ns: Option<u64>,
    /// Current address column width; grows (and the header is shown again) when an
    /// address does not fit, so every line stays under a header it lines up with.
    addr_width: usize,
    header_due: bool,
    /// The line being built, reused: showing an event allocates nothing.
    line: Line,
}

const MIN_ADDR_WIDTH: usize = 16;
const COMM_WIDTH: usize = 16;

impl<W: Write> Printer<W> {
    pub fn new(out: W, format: Format, view: View, columns: Columns, mode: Mode) -> Printer<W> {
        let header_due = format == Format::Text && matches!(view, View::Lines);
        Printer {
            out,
            format,
            view,
            columns,
            mode,
            first_ts_ns: None,
            addr_width: MIN_ADDR_WIDTH,
            header_due,
            line: Line(Vec::with_capacity(256)),
        }
    }

    /// Something missing from the output: said on stderr, and in the JSON stream.
    fn shortfall(&mut self, record: Record<'_>, message: &str) -> io::Result<()> {
        eprintln!("tcpconnlat: {message}");
        match self.format {
            Format::Json => write_json(&mut self.out, &record),
            Format::Text => Ok(()),
        }
    }

    fn line(&mut self, e: &Event) -> io::Result<()> {
        if self.format == Format::Json {
            return write_json(&mut self.out, &Record::Connect(Connect::new(e, self.mode)));
        }
        let (saddr, daddr) = (AddrText::new(&e.saddr), AddrText::new(&e.daddr));
        let needed = saddr.len().max(daddr.len()) + 1;
        if needed > self.addr_width {
            self.addr_width = needed;
            self.header_due = true;
        }
        if self.header_due {
            self.header()?;
        }
        let w = self.addr_width;
        let line = &mut self.line;
        line.clear();
        if self.columns.timestamp {
            let first = *self.first_ts_ns.get_or_insert(e.ts_ns);
            let secs = e.ts_ns.saturating_sub(first) as f64 / 1e9;
            write!(line, "{secs:<9.3} ")?;
        }
        line.number(e.pid, 7);
        line.text(&e.comm, COMM_WIDTH);
        line.number(e.ip_version(), 2);
        line.address(&saddr, w);
        if self.columns.lport {
            line.number(e.lport, 5);
        }
        line.address(&daddr, w);
        line.number(e.dport, 5);
        line.milliseconds(e.lat_ns);
        // Successful connects look exactly as in bcc; anything else is marked after LAT.
        if e.outcome.failed() {
            write!(line, " {}", e.outcome.name().to_uppercase())?;
            if let (Outcome::Error | Outcome::Unreachable, Some(name)) = (e.outcome, e.errno_name())
            {
                write!(line, " ({name})")?;
            }
        }
        if e.syn_retrans > 0 {
            let s = if e.syn_retrans == 1 { "" } else { "s" };
            write!(line, " [{} SYN retransmit{s}]", e.syn_retrans)?;
        }
        line.0.push(b'\n');
        self.out.write_all(&line.0)
    }

    fn header(&mut self) -> io::Result<()> {
        self.header_due = false;
        let w = self.addr_width;
        if self.columns.timestamp {
            write!(self.out, "{:<9} ", "TIME(s)")?;
        }
        write!(
            self.out,
            "{:<7} {:<COMM_WIDTH$} {:<2} {:<w$} ",
            "PID", "COMM", "IP", "SADDR"
        )?;
        if self.columns.lport {
            write!(self.out, "{:<5} ", "LPORT")?;
        }
        writeln!(self.out, "{:<w$} {:<5} LAT(ms)", "DADDR", "DPORT")
    }

    /// Show the header now even before any event, as bcc does.
    pub fn start(&mut self) -> io::Result<()> {
        if self.header_due {
            self.header()?;
        }
        self.out.flush()
    }
}

impl<W: Write> Sink for Printer<W> {
    fn event(&mut self, e: &Event) -> io::Result<()> {
        match &mut self.view {
            View::Lines => self.line(e),
            View::Hist(h) => {
                h.add(e);
                Ok(())
            }
            View::Summary(s) => {
                s.add(e);
                Ok(())
            }
        }
    }

    /// Print the histograms or summary gathered so far and start over (every interval
    /// and at the end); nothing for the line view.
    fn report(&mut self) -> io::Result<()> {
        let (text, records): (String, Vec<Record<'_>>) = match &mut self.view {
            View::Lines => return Ok(()),
            View::Hist(h) => {
                let out = (
                    h.render(),
                    h.records().into_iter().map(Record::Hist).collect(),
                );
                *h = Hists::new(h.by());
                out
            }
            View::Summary(s) => {
                let out = (
                    s.render(),
                    s.records().into_iter().map(Record::Summary).collect(),
                );
                *s = Summary::default();
                out
            }
        };
        match self.format {
            Format::Json => {
                for record in records {
                    write_json(&mut self.out, &record)?;
                }
            }
            Format::Text => writeln!(self.out, "{text}")?,
        }
        self.flush()
    }

    fn lost(&mut self, count: u64, buffer: &str) -> io::Result<()> {
        let message = format!("lost {count} events: the {buffer} was full (raise --buffer-pages)");
        self.shortfall(Record::Lost(Count { count }), &message)
    }

    fn untracked(&mut self, count: u64, max_pending: u32) -> io::Result<()> {
        let message = format!(
            "{count} connects not traced: more than {max_pending} were waiting for an answer (raise --max-pending)"
        );
        self.shortfall(Record::Untracked(Count { count }), &message)
    }

    fn missed(&mut self, count: u64) -> io::Result<()> {
        let message = format!(
            "{count} connects not traced to their end: the kernel skipped the probe (it would have run inside another BPF program)"
        );
        self.shortfall(Record::Missed(Count { count }), &message)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// One record, one line.
fn write_json(out: &mut impl Write, record: &Record<'_>) -> io::Result<()> {
    serde_json::to_writer(&mut *out, record)?;
    writeln!(out)
}

/// Left-align by display width (a CJK character takes two columns).
/// One line of bcc's table, built column by column: each column is its text, left-aligned
/// and padded to its width, then a space. Numbers are written without `fmt` machinery:
/// this runs for every connect.
struct Line(Vec<u8>);

impl Line {
    fn clear(&mut self) {
        self.0.clear();
    }

    fn text(&mut self, s: &str, width: usize) {
        self.0.extend_from_slice(s.as_bytes());
        let shown = if s.is_ascii() { s.len() } else { s.width() };
        self.pad(shown, width);
    }

    fn address(&mut self, addr: &AddrText, width: usize) {
        self.0.extend_from_slice(addr.as_bytes());
        self.pad(addr.len(), width);
    }

    fn number(&mut self, n: impl itoa::Integer, width: usize) {
        let mut digits = itoa::Buffer::new();
        let s = digits.format(n);
        self.0.extend_from_slice(s.as_bytes());
        self.pad(s.len(), width);
    }

    fn pad(&mut self, shown: usize, width: usize) {
        let fill = width.saturating_sub(shown) + 1;
        self.0.resize(self.0.len() + fill, b' ');
    }

    /// Nanoseconds as milliseconds with two places, rounded half up: "0.25", "12.30".
    fn milliseconds(&mut self, ns: u64) {
        let n = ns / 10_000 + u64::from(ns % 10_000 >= 5_000);
        let mut digits = itoa::Buffer::new();
        self.0.extend_from_slice(digits.format(n / 100).as_bytes());
        let frac = (n % 100) as u8;
        self.0
            .extend_from_slice(&[b'.', b'0' + frac / 10, b'0' + frac % 10]);
    }
}

impl io::Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn event(saddr: &str, daddr: &str, comm: &str) -> Event {
        Event {
            ts_ns: 2_000_000_000,
            lat_ns: 25_290_000,
            pid: 222564,
            comm: comm.into(),
            saddr: saddr.parse::<IpAddr>().unwrap(),
            lport: 43210,
            daddr: daddr.parse::<IpAddr>().unwrap(),
            dport: 80,
            outcome: Outcome::Established,
            errno: None,
            syn_retrans: 0,
            uid: 1000,
            cgroup_id: 0,
        }
    }

    fn render(json: bool, columns: Columns, events: &[Event]) -> String {
        let format = if json { Format::Json } else { Format::Text };
        let mut p = Printer::new(Vec::new(), format, View::Lines, columns, Mode::Tracepoint);
        p.start().unwrap();
        for e in events {
            p.event(e).unwrap();
        }
        String::from_utf8(p.out).unwrap()
    }

    #[test]
    fn table_matches_bcc_columns() {
        let out = render(
            false,
            Columns::default(),
            &[event("192.168.88.15", "110.242.68.3", "wget")],
        );
        let lines: Vec<_> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        let header: Vec<_> = lines[0].split_whitespace().collect();
        assert_eq!(
            header,
            ["PID", "COMM", "IP", "SADDR", "DADDR", "DPORT", "LAT(ms)"]
        );
        let row: Vec<_> = lines[1].split_whitespace().collect();
        assert_eq!(
            row,
            [
                "222564",
                "wget",
                "4",
                "192.168.88.15",
                "110.242.68.3",
                "80",
                "25.29"
            ]
        );
        // Every column starts where its header does.
        for name in ["SADDR", "DADDR", "DPORT"] {
            let col = lines[0].find(name).unwrap();
            assert_ne!(&lines[1][col..col + 1], " ", "{name} misaligned:\n{out}");
            assert_eq!(&lines[1][col - 1..col], " ");
        }
    }

    #[test]
    fn long_ipv6_widens_and_repeats_the_header() {
        let out = render(
            false,
            Columns {
                timestamp: true,
                lport: true,
            },
            &[
                event("10.0.0.1", "10.0.0.2", "a"),
                event("2001:db8:85a3::8a2e:370:7334", "2001:db8::1", "b"),
                event("10.0.0.1", "10.0.0.2", "c"),
            ],
        );
        let lines: Vec<_> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert!(lines[2].starts_with("TIME(s)"));
        let col = lines[2].find("DADDR").unwrap();
        for row in &lines[3..] {
            assert_eq!(&row[col - 1..col], " ");
            assert_ne!(&row[col..col + 1], " ", "misaligned:\n{out}");
        }
        assert!(lines[4].contains("43210"));
    }

    #[test]
    fn json_has_every_field() {
        let out = render(true, Columns::default(), &[event("::1", "::1", "curl")]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["type"], "connect");
        assert_eq!(v["pid"], 222564);
        assert_eq!(v["comm"], "curl");
        assert_eq!(v["af"], 6);
        assert_eq!(v["saddr"], "::1");
        assert_eq!(v["daddr"], "::1");
        assert_eq!(v["lport"], 43210);
        assert_eq!(v["dport"], 80);
        assert_eq!(v["ts_us"], 2_000_000);
        assert_eq!(v["lat_us"], 25290.0);
        assert_eq!(v["lat_ms"], 25.29);
        assert_eq!(v["mode"], "tracepoint");
        assert_eq!(v["outcome"], "established");
        assert_eq!(v["errno"], serde_json::Value::Null);
        assert_eq!(v["syn_retrans"], 0);
        assert_eq!(v["uid"], 1000);
    }

    #[test]
    fn failures_are_marked_after_the_latency() {
        let mut refused = event("10.0.0.1", "10.0.0.2", "a");
        refused.outcome = Outcome::Refused;
        refused.errno = Some(111);
        let mut unreachable = event("10.0.0.1", "10.0.0.2", "b");
        unreachable.outcome = Outcome::Unreachable;
        unreachable.errno = Some(113);
        let mut slow = event("10.0.0.1", "10.0.0.2", "c");
        slow.syn_retrans = 1;
        let out = render(
            false,
            Columns::default(),
            &[refused.clone(), unreachable, slow],
        );
        let lines: Vec<_> = out.lines().collect();
        assert!(lines[1].ends_with(" 25.29 REFUSED"), "{out}");
        assert!(
            lines[2].ends_with(" 25.29 UNREACHABLE (EHOSTUNREACH)"),
            "{out}"
        );
        assert!(lines[3].ends_with(" 25.29 [1 SYN retransmit]"), "{out}");
        let json = render(true, Columns::default(), &[refused]);
        let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(
            (v["outcome"].as_str(), v["errno"].as_str()),
            (Some("refused"), Some("ECONNREFUSED"))
        );
    }

    #[test]
    fn wide_comm_keeps_alignment() {
        let out = render(
            false,
            Columns::default(),
            &[event("10.0.0.1", "10.0.0.2", "数据库连接")],
        );
        let lines: Vec<_> = out.lines().collect();
        let header_col = lines[0].find("IP").unwrap();
        let ip_col = lines[1].find(" 4 ").unwrap() + 1;
        assert_eq!(lines[1][..ip_col].width(), header_col);
    }

    /// The hand-written number and address text is what std would write.
    #[test]
    fn hand_written_text_is_stds() {
        for octets in [
            [0, 9, 10, 99],
            [100, 199, 200, 255],
            [1, 2, 3, 4],
            [127, 0, 0, 1],
        ] {
            let ip = IpAddr::from(octets);
            let text = AddrText::new(&ip);
            assert_eq!(text.as_bytes(), ip.to_string().as_bytes());
            assert_eq!(text.len(), ip.to_string().len());
        }
        for v6 in [
            "2001:db8::ffff:1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:1.2.3.4",
        ] {
            let v6: IpAddr = v6.parse().unwrap();
            assert_eq!(AddrText::new(&v6).as_bytes(), v6.to_string().as_bytes());
        }
        for lat_ns in [
            0u64,
            4_999,
            5_001,
            25_290_000,
            1_234_567,
            999_994_999,
            3_000_000_000,
        ] {
            let mut line = Line(Vec::new());
            line.milliseconds(lat_ns);
            let std = format!("{:.2}", lat_ns as f64 / 1e6);
            assert_eq!(String::from_utf8(line.0).unwrap(), std, "{lat_ns} ns");
        }
    }
}
