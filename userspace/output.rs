//! Showing events: bcc's table (with columns that widen instead of breaking alignment) or
//! one JSON object per line.

use std::io::{self, Write};

use serde::Serialize;
use tcpconnlat_compat::Mode;
use unicode_width::UnicodeWidthStr;

use crate::event::Event;

#[derive(Clone, Copy, Debug, Default)]
pub struct Columns {
    pub timestamp: bool,
    pub lport: bool,
}

pub struct Printer<W: Write> {
    out: W,
    json: bool,
    columns: Columns,
    mode: Mode,
    first_ts_ns: Option<u64>,
    /// Current address column width; grows (and the header is shown again) when an
    /// address does not fit, so every line stays under a header it lines up with.
    addr_width: usize,
    header_due: bool,
}

const MIN_ADDR_WIDTH: usize = 16;
const COMM_WIDTH: usize = 16;

#[derive(Serialize)]
struct JsonEvent<'a> {
    ts_us: u64,
    pid: u32,
    comm: &'a str,
    af: u8,
    saddr: String,
    lport: u16,
    daddr: String,
    dport: u16,
    lat_us: f64,
    lat_ms: f64,
    mode: Mode,
}

impl<W: Write> Printer<W> {
    pub fn new(out: W, json: bool, columns: Columns, mode: Mode) -> Printer<W> {
        Printer {
            out,
            json,
            columns,
            mode,
            first_ts_ns: None,
            addr_width: MIN_ADDR_WIDTH,
            header_due: !json,
        }
    }

    pub fn event(&mut self, e: &Event) -> io::Result<()> {
        if self.json {
            let record = JsonEvent {
                ts_us: e.ts_ns / 1000,
                pid: e.pid,
                comm: &e.comm,
                af: e.ip_version(),
                saddr: e.saddr.to_string(),
                lport: e.lport,
                daddr: e.daddr.to_string(),
                dport: e.dport,
                lat_us: e.lat_ns as f64 / 1e3,
                lat_ms: e.lat_ms(),
                mode: self.mode,
            };
            serde_json::to_writer(&mut self.out, &record)?;
            return writeln!(self.out);
        }
        let (saddr, daddr) = (e.saddr.to_string(), e.daddr.to_string());
        let needed = saddr.len().max(daddr.len()) + 1;
        if needed > self.addr_width {
            self.addr_width = needed;
            self.header_due = true;
        }
        if self.header_due {
            self.header()?;
        }
        let w = self.addr_width;
        if self.columns.timestamp {
            let first = *self.first_ts_ns.get_or_insert(e.ts_ns);
            let secs = e.ts_ns.saturating_sub(first) as f64 / 1e9;
            write!(self.out, "{secs:<9.3} ")?;
        }
        let comm = pad(&e.comm, COMM_WIDTH);
        write!(
            self.out,
            "{:<7} {comm} {:<2} {saddr:<w$} ",
            e.pid,
            e.ip_version()
        )?;
        if self.columns.lport {
            write!(self.out, "{:<5} ", e.lport)?;
        }
        writeln!(self.out, "{daddr:<w$} {:<5} {:.2}", e.dport, e.lat_ms())
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
        self.flush()
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Left-align by display width (a CJK character takes two columns).
fn pad(s: &str, width: usize) -> String {
    let fill = width.saturating_sub(s.width());
    format!("{s}{}", " ".repeat(fill))
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
            comm: comm.to_owned(),
            saddr: saddr.parse::<IpAddr>().unwrap(),
            lport: 43210,
            daddr: daddr.parse::<IpAddr>().unwrap(),
            dport: 80,
        }
    }

    fn render(json: bool, columns: Columns, events: &[Event]) -> String {
        let mut p = Printer::new(Vec::new(), json, columns, Mode::Tracepoint);
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
}
