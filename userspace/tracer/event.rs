//! Events as userspace sees them: decoded from the probes' `struct event`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::objects::{AddressFamily, RawEnd, RawEvent, RawOutcome, COMM_LEN};

/// How a connect ended (enum outcome in probes/tcpconnlat.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Established,
    /// An RST answered the SYN.
    Refused,
    /// No answer: the socket left SYN_SENT by timer or close.
    Timeout,
    /// An ICMP error: host or network unreachable.
    Unreachable,
    /// Another socket error.
    Error,
    /// No probe saw the end, and the socket was gone when the sweeper looked (`End::Gone`).
    Unknown,
}

impl Outcome {
    /// How many outcomes there are (the last one's index, plus one).
    pub const COUNT: usize = Outcome::Unknown as usize + 1;

    fn from_raw(raw: u8) -> Outcome {
        match RawOutcome(raw.into()) {
            RawOutcome::OUTCOME_ESTABLISHED => Outcome::Established,
            RawOutcome::OUTCOME_REFUSED => Outcome::Refused,
            RawOutcome::OUTCOME_TIMEOUT => Outcome::Timeout,
            RawOutcome::OUTCOME_UNREACHABLE => Outcome::Unreachable,
            RawOutcome::OUTCOME_UNKNOWN => Outcome::Unknown,
            _ => Outcome::Error,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Established => "established",
            Outcome::Refused => "refused",
            Outcome::Timeout => "timeout",
            Outcome::Unreachable => "unreachable",
            Outcome::Error => "error",
            Outcome::Unknown => "unknown",
        }
    }

    pub fn failed(self) -> bool {
        self != Outcome::Established
    }
}

/// How a connect's end became known (enum end_kind in probes/tcpconnlat.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum End {
    /// A probe saw the socket leave SYN_SENT: the latency is measured.
    Seen,
    /// No probe ran for it (the kernel skipped them); the sweeper found the socket out of
    /// SYN_SENT: the latency is a bound.
    Inferred,
    /// Likewise, but the socket had been closed or reused: the outcome is unknown.
    Gone,
}

impl End {
    fn from_raw(raw: u8) -> End {
        match RawEnd(raw.into()) {
            RawEnd::END_INFERRED => End::Inferred,
            RawEnd::END_GONE => End::Gone,
            _ => End::Seen,
        }
    }
}

/// One finished active connect.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// CLOCK_MONOTONIC nanoseconds when the answer to the SYN was processed (or, for an
    /// end not seen, when it was found).
    pub ts_ns: u64,
    /// The latency; for an end not seen, the time by which it had ended.
    pub lat_ns: u64,
    /// How the end became known.
    pub end: End,
    /// For an end not seen: how long after the start the connect was last found pending.
    pub lat_min_ns: Option<u64>,
    pub pid: u32,
    pub comm: Comm,
    pub saddr: IpAddr,
    pub lport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    pub outcome: Outcome,
    /// The socket's errno at the end (ECONNREFUSED, ETIMEDOUT, ...), where known.
    pub errno: Option<i32>,
    pub syn_retrans: u32,
    pub uid: u32,
    /// The connecting process's cgroup v2 id, where asked for (`--label cgroup`); else 0.
    pub cgroup_id: u64,
}

impl Event {
    /// The errno's symbolic name, e.g. "ECONNREFUSED".
    pub fn errno_name(&self) -> Option<String> {
        self.errno
            .map(|e| format!("{:?}", nix::errno::Errno::from_raw(e)))
    }

    /// 4 or 6, as in bcc's IP column (the socket's family).
    pub fn ip_version(&self) -> u8 {
        match self.daddr {
            IpAddr::V4(_) => 4,
            IpAddr::V6(_) => 6,
        }
    }

    /// "daddr:dport", as the summaries and the `dest` label write it.
    pub fn dest(&self) -> String {
        format!("{}:{}", host_part(&self.daddr), self.dport)
    }

    pub fn lat_ms(&self) -> f64 {
        self.lat_ns as f64 / 1e6
    }

    /// Decode the bytes of one `struct event`; `None` if it is too short.
    pub fn from_bytes(data: &[u8]) -> Option<Event> {
        let mut raw = RawEvent::default();
        plain::copy_from_bytes(&mut raw, data).ok()?;
        Some(Event::from(&raw))
    }
}

impl From<&RawEvent> for Event {
    fn from(raw: &RawEvent) -> Event {
        let addr = |bytes: &[u8; 16]| -> IpAddr {
            if u32::from(raw.af) == AddressFamily::FAMILY_INET.0 {
                IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
            } else {
                IpAddr::V6(Ipv6Addr::from(*bytes))
            }
        };
        Event {
            ts_ns: raw.ts_ns,
            lat_ns: raw.delta_ns,
            end: End::from_raw(raw.end),
            lat_min_ns: (raw.end != RawEnd::END_SEEN.0 as u8).then_some(raw.delta_min_ns),
            pid: raw.tgid,
            comm: Comm::new(&raw.comm),
            saddr: addr(&raw.saddr),
            lport: raw.lport,
            daddr: addr(&raw.daddr),
            dport: raw.dport,
            outcome: Outcome::from_raw(raw.outcome),
            errno: (raw.error != 0).then_some(i32::from(raw.error)),
            syn_retrans: u32::from(raw.syn_retrans),
            uid: raw.uid,
            cgroup_id: raw.cgroup_id,
        }
    }
}

#[cfg(test)]
impl Event {
    /// A connect for tests: curl (pid 7, uid 0) from 10.0.0.1:43210 to 10.0.0.2:80,
    /// established in 25.29 ms, 2 s after boot. Tests change what they are about with
    /// struct update syntax.
    pub fn sample() -> Event {
        Event {
            ts_ns: 2_000_000_000,
            lat_ns: 25_290_000,
            end: End::Seen,
            lat_min_ns: None,
            pid: 7,
            comm: "curl".into(),
            saddr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            lport: 43210,
            daddr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            dport: 80,
            outcome: Outcome::Established,
            errno: None,
            syn_retrans: 0,
            uid: 0,
            cgroup_id: 0,
        }
    }
}

/// An address as it goes before a port: IPv6 in brackets, as in "[::1]:443".
pub fn host_part(addr: &IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// A task's comm, held inline (decoding an event allocates nothing) and always valid
/// UTF-8. The kernel cuts names at 15 bytes, possibly inside a UTF-8 character: such a
/// dangling partial character is dropped rather than shown as garbage; other invalid
/// bytes (rare) become U+FFFD, which may need more room than the inline bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Comm {
    Inline { bytes: [u8; COMM_LEN], len: u8 },
    Lossy(Box<str>),
}

impl Comm {
    pub fn new(comm: &[u8]) -> Comm {
        let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
        let bytes = &comm[..end.min(COMM_LEN)];
        let valid = match std::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) if e.error_len().is_none() => {
                std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default()
            }
            Err(_) => return Comm::Lossy(String::from_utf8_lossy(bytes).into()),
        };
        let mut inline = [0; COMM_LEN];
        inline[..valid.len()].copy_from_slice(valid.as_bytes());
        Comm::Inline {
            bytes: inline,
            len: valid.len() as u8,
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            // Checked in new(): a slice of valid UTF-8 cut at a character boundary.
            Comm::Inline { bytes, len } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            Comm::Lossy(s) => s,
        }
    }
}

impl From<&str> for Comm {
    fn from(s: &str) -> Comm {
        Comm::new(s.as_bytes())
    }
}

impl std::ops::Deref for Comm {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

impl std::fmt::Display for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

/// An address as text, on the stack, for every event shown: IPv4 (the common case) is
/// written by hand (it runs for every line; std's `Display` is far costlier), IPv6 by std.
#[derive(Debug)]
pub struct AddrText {
    /// The longest IPv6 text, "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", is 45 bytes.
    text: [u8; 45],
    len: usize,
}

impl AddrText {
    pub fn new(addr: &IpAddr) -> AddrText {
        let mut out = AddrText {
            text: [0; 45],
            len: 0,
        };
        match addr {
            IpAddr::V4(v4) => {
                for (i, n) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    if n >= 100 {
                        out.push(b'0' + n / 100);
                    }
                    if n >= 10 {
                        out.push(b'0' + n / 10 % 10);
                    }
                    out.push(b'0' + n % 10);
                }
            }
            IpAddr::V6(v6) => {
                let mut cursor = std::io::Cursor::new(&mut out.text[..]);
                let _ = std::io::Write::write_fmt(&mut cursor, format_args!("{v6}"));
                out.len = cursor.position() as usize;
            }
        }
        out
    }

    fn push(&mut self, byte: u8) {
        self.text[self.len] = byte;
        self.len += 1;
    }

    /// ASCII only.
    pub fn as_bytes(&self) -> &[u8] {
        &self.text[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl serde::Serialize for AddrText {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(std::str::from_utf8(self.as_bytes()).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(af: u16) -> RawEvent {
        let mut raw = RawEvent {
            ts_ns: 5,
            delta_ns: 1_234_567,
            tgid: 42,
            af,
            lport: 40000,
            dport: 80,
            ..Default::default()
        };
        raw.comm[..4].copy_from_slice(b"curl");
        raw
    }

    #[test]
    fn ipv4_event_decodes() {
        let mut r = raw(2);
        r.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        r.daddr[..4].copy_from_slice(&[10, 1, 2, 3]);
        let e = Event::from(&r);
        assert_eq!(e.saddr.to_string(), "127.0.0.1");
        assert_eq!(e.daddr.to_string(), "10.1.2.3");
        assert_eq!((e.pid, e.comm.as_str(), e.ip_version()), (42, "curl", 4));
        assert!((e.lat_ms() - 1.234567).abs() < 1e-9);
    }

    #[test]
    fn ipv6_addresses_are_canonical() {
        let mut r = raw(10);
        r.saddr[15] = 1;
        r.daddr = "2001:db8::0:1".parse::<Ipv6Addr>().unwrap().octets();
        let e = Event::from(&r);
        assert_eq!(e.saddr.to_string(), "::1");
        assert_eq!(e.daddr.to_string(), "2001:db8::1");
        assert_eq!(e.ip_version(), 6);
        let mapped = "::ffff:127.0.0.1".parse::<Ipv6Addr>().unwrap().octets();
        r.daddr = mapped;
        assert_eq!(Event::from(&r).daddr.to_string(), "::ffff:127.0.0.1");
    }

    #[test]
    fn comm_never_ends_mid_character() {
        // 18 bytes: the kernel keeps 15, which ends inside the first "ö" of "töö".
        let name = "Größenwahn-töö".as_bytes();
        let mut comm = [0u8; COMM_LEN];
        comm[..15].copy_from_slice(&name[..15]);
        let s = Comm::new(&comm);
        assert!(name.starts_with(s.as_bytes()));
        assert_eq!(s.as_str(), "Größenwahn-t");
        assert_eq!(Comm::new(b"ok\0garbage").as_str(), "ok");
        assert_eq!(Comm::new(b"a\xffb\0").as_str(), "a\u{fffd}b");
        let full = Comm::new(b"sixteen-bytes-ok");
        assert_eq!(full.as_str(), "sixteen-bytes-ok");
    }

    #[test]
    fn outcomes_and_errnos_decode() {
        let mut r = raw(2);
        r.outcome = 1;
        r.error = 111;
        r.syn_retrans = 2;
        let e = Event::from(&r);
        assert_eq!(e.outcome, Outcome::Refused);
        assert_eq!(e.errno_name().as_deref(), Some("ECONNREFUSED"));
        assert_eq!(e.syn_retrans, 2);
        let ok = Event::from(&raw(2));
        assert_eq!((ok.outcome, ok.errno), (Outcome::Established, None));
    }

    #[test]
    fn short_buffers_are_rejected() {
        assert!(Event::from_bytes(&[0u8; 8]).is_none());
    }
}
