//! tracefs: where it is mounted, and the layout of the `sock:inet_sock_set_state` record
//! read from its `format` file.

use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

/// Where tracefs may be, relative to the root: its own mount, or inside debugfs.
pub const TRACEFS_DIRS: [&str; 2] = ["sys/kernel/tracing", "sys/kernel/debug/tracing"];

/// The tracepoint every mode finishes connects with.
pub const STATE_TRACEPOINT: (&str, &str) = ("sock", "inet_sock_set_state");
/// SYN retransmits.
pub const RETRANSMIT_TRACEPOINT: (&str, &str) = ("tcp", "tcp_retransmit_skb");
/// RSTs received: refused connects where sk_err cannot be read.
pub const RESET_TRACEPOINT: (&str, &str) = ("tcp", "tcp_receive_reset");

/// The kernel that brought one of the tracepoints above, and the change, for the sentence
/// an older kernel gets.
pub fn introduced((system, event): (&str, &str)) -> &'static str {
    match (system, event) {
        ("sock", "inet_sock_set_state") => {
            "Linux 4.16: \"net: tracepoint: replace tcp_set_state tracepoint with inet_sock_set_state tracepoint\""
        }
        ("tcp", "tcp_retransmit_skb") => "Linux 4.15: \"tcp: add tracepoint trace_tcp_retransmit_skb()\"",
        ("tcp", "tcp_receive_reset") => "Linux 4.16: \"tcp: add tracepoint trace_tcp_receive_reset\"",
        _ => "a newer kernel",
    }
}

/// The `format` file of a tracepoint under a tracefs directory.
pub fn format_path(tracefs: &Path, (system, event): (&str, &str)) -> PathBuf {
    tracefs
        .join("events")
        .join(system)
        .join(event)
        .join("format")
}

/// The offset of the `skaddr` field of a record, which is all the probes read from the
/// retransmit and reset tracepoints.
pub fn skaddr_offset(text: &str) -> Result<u16, FormatError> {
    let fields = parse_format(text)?;
    let field = fields
        .iter()
        .find(|f| f.name == "skaddr")
        .ok_or(FormatError::MissingField("skaddr"))?;
    if field.size != 8 {
        return Err(FormatError::BadSize {
            name: "skaddr",
            found: field.size,
            expected: 8,
        });
    }
    u16::try_from(field.offset).map_err(|_| FormatError::TooFar("skaddr"))
}

/// The first of [`TRACEFS_DIRS`] under `root` that is a mounted tracefs (has `events/`).
pub fn find_tracefs(root: &Path) -> Option<PathBuf> {
    TRACEFS_DIRS
        .iter()
        .map(|dir| root.join(dir))
        .find(|dir| dir.join("events").is_dir())
}

/// One `field:` line of a format file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: usize,
    pub size: usize,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("line {line}: cannot parse field description {text:?}")]
    BadLine { line: usize, text: String },
    #[error("no field `{0}`")]
    MissingField(&'static str),
    #[error("field `{name}` is {found} bytes, expected {expected}")]
    BadSize {
        name: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("field `{0}` lies beyond the first 64 KiB of the record")]
    TooFar(&'static str),
}

/// Parse every `field:` line of a tracepoint format file.
pub fn parse_format(text: &str) -> Result<Vec<Field>, FormatError> {
    let mut fields = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let bad = || FormatError::BadLine {
            line: index + 1,
            text: line.to_owned(),
        };
        // "const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;"
        let mut parts = rest.split(';').map(str::trim);
        let decl = parts.next().ok_or_else(bad)?;
        let mut offset = None;
        let mut size = None;
        for part in parts {
            if let Some(v) = part.strip_prefix("offset:") {
                offset = Some(v.parse().map_err(|_| bad())?);
            } else if let Some(v) = part.strip_prefix("size:") {
                size = Some(v.parse().map_err(|_| bad())?);
            }
        }
        // The name is the declaration's last word, without any array suffix.
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .and_then(|word| word.split('[').next())
            .filter(|name| !name.is_empty())
            .ok_or_else(bad)?;
        fields.push(Field {
            name: name.to_owned(),
            offset: offset.ok_or_else(bad)?,
            size: size.ok_or_else(bad)?,
        });
    }
    Ok(fields)
}

/// Byte offsets of the `sock:inet_sock_set_state` fields the probes read. Mirrors
/// `struct state_layout` in `probes/tcpconnlat.h`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StateLayout {
    pub skaddr: u16,
    pub oldstate: u16,
    pub newstate: u16,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    /// Absent where the tracepoint is TCP-only.
    pub protocol: Option<u16>,
    /// 1 before Linux 5.6 (a `__u8`; `sk_protocol` grew to 16 bits for MPTCP), then 2.
    pub protocol_size: u16,
    pub saddr: u16,
    pub daddr: u16,
    pub saddr_v6: u16,
    pub daddr_v6: u16,
}

impl StateLayout {
    /// Read the layout from the tracepoint's format file, checking every size the probes
    /// rely on. Only `protocol` may be missing (the probes then take every record for TCP)
    /// or of either size; a missing or resized field the probes read is an error.
    pub fn from_format(text: &str) -> Result<StateLayout, FormatError> {
        let fields = parse_format(text)?;
        let find = |name: &'static str, sizes: &[usize]| -> Result<Option<Field>, FormatError> {
            let Some(field) = fields.iter().find(|f| f.name == name) else {
                return Ok(None);
            };
            if !sizes.contains(&field.size) {
                return Err(FormatError::BadSize {
                    name,
                    found: field.size,
                    expected: sizes[sizes.len() - 1],
                });
            }
            if field.offset + field.size > usize::from(u16::MAX) {
                return Err(FormatError::TooFar(name));
            }
            Ok(Some(field.clone()))
        };
        let need = |name: &'static str, size: usize| {
            find(name, &[size])?
                .map(|f| f.offset as u16)
                .ok_or(FormatError::MissingField(name))
        };
        let protocol = find("protocol", &[1, 2])?;
        Ok(StateLayout {
            skaddr: need("skaddr", 8)?,
            oldstate: need("oldstate", 4)?,
            newstate: need("newstate", 4)?,
            sport: need("sport", 2)?,
            dport: need("dport", 2)?,
            family: need("family", 2)?,
            protocol: protocol.as_ref().map(|f| f.offset as u16),
            protocol_size: protocol.map_or(0, |f| f.size as u16),
            saddr: need("saddr", 4)?,
            daddr: need("daddr", 4)?,
            saddr_v6: need("saddr_v6", 16)?,
            daddr_v6: need("daddr_v6", 16)?,
        })
    }
}
