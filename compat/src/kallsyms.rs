//! Finding the real kernel symbol behind each function we hook.
//!
//! GCC may rename a function it optimised (`tcp_v4_connect.isra.0`,
//! `tcp_v4_connect.constprop.0`); kprobes must use that name. `.cold` and `.part` pieces are
//! split-off fragments, not entry points, and are never chosen.

use serde::Serialize;

/// The kernel functions the CO-RE and legacy modes hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Func {
    TcpV4Connect,
    TcpV6Connect,
    TcpRcvStateProcess,
    /// Legacy mode: where connects finish, as the state tracepoint does elsewhere.
    TcpSetState,
    /// Legacy mode: SYN retransmits.
    TcpRetransmitSkb,
    /// Legacy mode: RSTs received.
    TcpReset,
}

impl Func {
    pub const ALL: [Func; 6] = [
        Func::TcpV4Connect,
        Func::TcpV6Connect,
        Func::TcpRcvStateProcess,
        Func::TcpSetState,
        Func::TcpRetransmitSkb,
        Func::TcpReset,
    ];

    /// The function's name in the kernel source.
    pub fn name(self) -> &'static str {
        match self {
            Func::TcpV4Connect => "tcp_v4_connect",
            Func::TcpV6Connect => "tcp_v6_connect",
            Func::TcpRcvStateProcess => "tcp_rcv_state_process",
            Func::TcpSetState => "tcp_set_state",
            Func::TcpRetransmitSkb => "tcp_retransmit_skb",
            Func::TcpReset => "tcp_reset",
        }
    }
}

/// The symbol found for each [`Func`], `None` where the kernel has none (IPv6 disabled or
/// not loaded, for example).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AttachPoints {
    pub tcp_v4_connect: Option<String>,
    pub tcp_v6_connect: Option<String>,
    pub tcp_rcv_state_process: Option<String>,
    pub tcp_set_state: Option<String>,
    pub tcp_retransmit_skb: Option<String>,
    pub tcp_reset: Option<String>,
}

impl AttachPoints {
    pub fn get(&self, func: Func) -> Option<&str> {
        match func {
            Func::TcpV4Connect => self.tcp_v4_connect.as_deref(),
            Func::TcpV6Connect => self.tcp_v6_connect.as_deref(),
            Func::TcpRcvStateProcess => self.tcp_rcv_state_process.as_deref(),
            Func::TcpSetState => self.tcp_set_state.as_deref(),
            Func::TcpRetransmitSkb => self.tcp_retransmit_skb.as_deref(),
            Func::TcpReset => self.tcp_reset.as_deref(),
        }
    }

    pub(crate) fn slot(&mut self, func: Func) -> &mut Option<String> {
        match func {
            Func::TcpV4Connect => &mut self.tcp_v4_connect,
            Func::TcpV6Connect => &mut self.tcp_v6_connect,
            Func::TcpRcvStateProcess => &mut self.tcp_rcv_state_process,
            Func::TcpSetState => &mut self.tcp_set_state,
            Func::TcpRetransmitSkb => &mut self.tcp_retransmit_skb,
            Func::TcpReset => &mut self.tcp_reset,
        }
    }

    /// The symbol `find` gives for each [`Func`].
    pub fn from_fn(mut find: impl FnMut(Func) -> Option<String>) -> AttachPoints {
        let mut found = AttachPoints::default();
        for func in Func::ALL {
            *found.slot(func) = find(func);
        }
        found
    }

    /// Resolve every [`Func`] from the text of `/proc/kallsyms`.
    pub fn from_kallsyms(kallsyms: &str) -> AttachPoints {
        let mut found = AttachPoints::default();
        kallsyms.lines().for_each(|line| found.add_symbol(line));
        found
    }

    /// The same, line by line from a reader: the file is megabytes, never held.
    pub fn read_kallsyms(mut kallsyms: impl std::io::BufRead) -> std::io::Result<AttachPoints> {
        let (mut found, mut line) = (AttachPoints::default(), String::new());
        while kallsyms.read_line(&mut line)? > 0 {
            found.add_symbol(&line);
            line.clear();
        }
        Ok(found)
    }

    /// One line of `/proc/kallsyms`.
    fn add_symbol(&mut self, line: &str) {
        // "ffffffff820311a0 T tcp_v4_connect" or "... t tcp_v6_connect\t[ipv6]"
        let mut fields = line.split_whitespace();
        let (Some(_addr), Some(kind), Some(symbol)) = (fields.next(), fields.next(), fields.next())
        else {
            return;
        };
        if !matches!(kind, "t" | "T") {
            return;
        }
        for func in Func::ALL {
            let Some(quality) = rank(func.name(), symbol) else {
                continue;
            };
            let slot = self.slot(func);
            let better = match slot.as_deref() {
                None => true,
                Some(current) => quality < rank(func.name(), current).unwrap_or(u8::MAX),
            };
            if better {
                *slot = Some(symbol.to_owned());
            }
        }
    }
}

/// How good `symbol` is as the entry point of `func`: 0 for the exact name, 1 for a
/// GCC-renamed clone of the whole function, `None` if it is not an entry point of it.
fn rank(func: &str, symbol: &str) -> Option<u8> {
    let suffix = symbol.strip_prefix(func)?;
    if suffix.is_empty() {
        return Some(0);
    }
    let suffix = suffix.strip_prefix('.')?;
    // Every dot-separated part must be a whole-function clone marker or its number:
    // "isra.0", "constprop.0.isra.0", "llvm.123456" are entries; "cold", "part.0" are not.
    let mut any_marker = false;
    for part in suffix.split('.') {
        match part {
            "isra" | "constprop" | "llvm" => any_marker = true,
            p if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {}
            _ => return None,
        }
    }
    any_marker.then_some(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_names_win_and_modules_are_seen() {
        let text = "ffffffff820311a0 T tcp_v4_connect\n\
                    ffffffff820311f0 t tcp_v4_connect.cold\n\
                    ffffffffc0a194b0 t tcp_v6_connect\t[ipv6]\n\
                    ffffffff82022bc0 T tcp_rcv_state_process\n";
        let ap = AttachPoints::from_kallsyms(text);
        assert_eq!(ap.get(Func::TcpV4Connect), Some("tcp_v4_connect"));
        assert_eq!(ap.get(Func::TcpV6Connect), Some("tcp_v6_connect"));
        assert_eq!(
            ap.get(Func::TcpRcvStateProcess),
            Some("tcp_rcv_state_process")
        );
    }

    #[test]
    fn clones_are_used_and_fragments_are_not() {
        let text = "0000000000000000 t tcp_v4_connect.part.0\n\
                    0000000000000000 t tcp_v4_connect.cold\n\
                    0000000000000000 t tcp_v4_connect.isra.0\n\
                    0000000000000000 t tcp_rcv_state_process.constprop.0.isra.0\n\
                    0000000000000000 d tcp_v6_connect\n\
                    0000000000000000 t tcp_v6_connect_extra\n";
        let ap = AttachPoints::from_kallsyms(text);
        assert_eq!(ap.get(Func::TcpV4Connect), Some("tcp_v4_connect.isra.0"));
        assert_eq!(
            ap.get(Func::TcpRcvStateProcess),
            Some("tcp_rcv_state_process.constprop.0.isra.0")
        );
        // A data symbol and a longer name are not the function.
        assert_eq!(ap.get(Func::TcpV6Connect), None);
    }

    #[test]
    fn exact_name_beats_an_earlier_clone() {
        let text = "0 t tcp_v4_connect.isra.0\n0 T tcp_v4_connect\n";
        assert_eq!(
            AttachPoints::from_kallsyms(text).get(Func::TcpV4Connect),
            Some("tcp_v4_connect")
        );
    }
}
