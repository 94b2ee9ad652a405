//! Showing events: bcc's table (with columns that widen instead of breaking alignment),
//! one JSON object per line, or instead of either, histograms or per-destination summaries
//! printed on exit and every interval.

mod line;
pub mod record;
pub mod stats;

use std::io::{self, Write};

use tcpconnlat_compat::Mode;

use crate::pump::Sink;
use crate::tracer::event::{AddrText, Event, Outcome};
use crate::tracer::stream::Shortfall;
use line::Line;
use record::{Connect, Count, Record};
use stats::{Hists, Summary};

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

/// What the output looks like (`--json`, `--hist`/`--summary`, the optional columns).
pub struct OutputShape {
    pub format: Format,
    pub view: View,
    pub columns: Columns,
}

// The text columns' widths, for the lines and their header alike.
const TIME_WIDTH: usize = 9;
const PID_WIDTH: usize = 7;
const COMM_WIDTH: usize = 16;
const IP_WIDTH: usize = 2;
const MIN_ADDR_WIDTH: usize = 16;
const PORT_WIDTH: usize = 5;

impl<W: Write> Printer<W> {
    pub fn new(out: W, shape: OutputShape, mode: Mode) -> Printer<W> {
        let OutputShape {
            format,
            view,
            columns,
        } = shape;
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
            write!(line, "{secs:<TIME_WIDTH$.3} ")?;
        }
        line.number(e.pid, PID_WIDTH);
        line.text(&e.comm, COMM_WIDTH);
        line.number(e.ip_version(), IP_WIDTH);
        line.address(&saddr, w);
        if self.columns.lport {
            line.number(e.lport, PORT_WIDTH);
        }
        line.address(&daddr, w);
        line.number(e.dport, PORT_WIDTH);
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
        // No probe saw the end: LAT is when the sweeper found it ended.
        if let Some(min) = e.lat_min_ns {
            line.0.extend_from_slice(b" [end not seen: after ");
            line.milliseconds(min);
            line.0.extend_from_slice(b" ms, by ");
            line.milliseconds(e.lat_ns);
            line.0.extend_from_slice(b" ms]");
        }
        line.0.push(b'\n');
        self.out.write_all(&line.0)
    }

    fn header(&mut self) -> io::Result<()> {
        self.header_due = false;
        let w = self.addr_width;
        if self.columns.timestamp {
            write!(self.out, "{:<TIME_WIDTH$} ", "TIME(s)")?;
        }
        write!(
            self.out,
            "{:<PID_WIDTH$} {:<COMM_WIDTH$} {:<IP_WIDTH$} {:<w$} ",
            "PID", "COMM", "IP", "SADDR"
        )?;
        if self.columns.lport {
            write!(self.out, "{:<PORT_WIDTH$} ", "LPORT")?;
        }
        writeln!(self.out, "{:<w$} {:<PORT_WIDTH$} LAT(ms)", "DADDR", "DPORT")
    }

    /// The end: the aggregates gathered since the last interval, everything written.
    pub fn finish(&mut self) -> io::Result<()> {
        self.interval()?;
        self.flush()
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
    fn interval(&mut self) -> io::Result<()> {
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

    /// Said on stderr, and in the JSON stream.
    fn shortfall(&mut self, shortfall: Shortfall) -> io::Result<()> {
        note!("tcpconnlat: {shortfall}");
        let count = Count {
            count: shortfall.count(),
        };
        let record = match shortfall {
            Shortfall::Lost { .. } => Record::Lost(count),
            Shortfall::Untracked { .. } => Record::Untracked(count),
            Shortfall::Missed { .. } => Record::Missed(count),
            Shortfall::TableErrors { .. } => Record::TableErrors(count),
        };
        match self.format {
            Format::Json => write_json(&mut self.out, &record),
            Format::Text => Ok(()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;
    use unicode_width::UnicodeWidthStr;

    fn event(saddr: &str, daddr: &str, comm: &str) -> Event {
        Event {
            pid: 222564,
            comm: comm.into(),
            saddr: saddr.parse::<IpAddr>().unwrap(),
            daddr: daddr.parse::<IpAddr>().unwrap(),
            uid: 1000,
            ..Event::sample()
        }
    }

    fn render(json: bool, columns: Columns, events: &[Event]) -> String {
        let format = if json { Format::Json } else { Format::Text };
        let shape = OutputShape {
            format,
            view: View::Lines,
            columns,
        };
        let mut p = Printer::new(Vec::new(), shape, Mode::Tracepoint);
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
