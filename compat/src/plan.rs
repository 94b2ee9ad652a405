//! The mode plan: every mode in order of preference, each either a candidate or rejected
//! with the reason. `auto` tries the candidates in order; a forced mode is the only step.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use thiserror::Error;

use crate::features::{Features, Finding, Findings};
use crate::hooks::{required_hooks, OffsetNeed};

/// How tcpconnlat hooks the kernel. One value drives loading, attaching and reporting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// CO-RE fentry programs: lowest overhead; needs BTF and a kernel that allows fentry.
    Fentry,
    /// CO-RE kprobes: needs BTF and kprobes.
    Kprobe,
    /// `sock:inet_sock_set_state` alone: needs neither kprobes, fentry nor BTF.
    Tracepoint,
    /// kprobes without BTF, for old kernels.
    Legacy,
}

impl Mode {
    /// In order of preference.
    pub const ALL: [Mode; 4] = [Mode::Fentry, Mode::Kprobe, Mode::Tracepoint, Mode::Legacy];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Fentry => "fentry",
            Mode::Kprobe => "kprobe",
            Mode::Tracepoint => "tracepoint",
            Mode::Legacy => "legacy",
        }
    }

    /// Whether this kernel can run the mode, as far as can be known before loading it:
    /// BTF for a CO-RE object, every hook the mode cannot do without (hooks.rs), and
    /// struct sock's offsets where the mode reads the socket at them.
    pub fn check(self, features: &Features, findings: &Findings) -> Result<(), Unsupported> {
        let spec = self.spec();
        if spec.core && !features.btf {
            return Err(Unsupported::NoBtf);
        }
        required_hooks(self, features, findings)?;
        if spec.offsets == OffsetNeed::Required {
            match &findings.sock_offsets {
                Finding::Unknown(_) => {
                    return Err(Unsupported::NotTried("looking for struct sock offsets"))
                }
                Finding::No(why) => return Err(Unsupported::NoOffsets(why.clone())),
                Finding::Yes(_) => {}
            }
        }
        Ok(())
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Mode, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown mode {s:?}"))
    }
}

/// Why a mode cannot run on this kernel.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum Unsupported {
    #[error("the kernel has no BTF (/sys/kernel/btf/vmlinux), which CO-RE probes need")]
    NoBtf,
    #[error("the kernel refuses fentry programs ({0})")]
    FentryRefused(String),
    #[error("not known without {0}: run as root (CAP_BPF)")]
    NotTried(&'static str),
    #[error("the kernel has no kprobes (no kprobe PMU, no tracefs kprobe_events)")]
    NoKprobes,
    #[error("{0}")]
    NoKallsyms(String),
    #[error("kernel function {0} is not in /proc/kallsyms")]
    MissingSymbol(&'static str),
    /// Not an answer about the kernel: auto had a better mode and skipped reading.
    #[error("/proc/kallsyms not read (an earlier mode was usable)")]
    SymbolsNotRead,
    #[error("{0}")]
    NoBtfFunctions(String),
    #[error("kernel function {0} is not in the kernel's BTF")]
    MissingFunction(&'static str),
    #[error("{0}")]
    NoTracepoint(String),
    #[error("{0}")]
    NoOffsets(String),
    /// The mode passed every check but loading or attaching it failed.
    #[error("{0}")]
    Failed(String),
}

/// One mode and whether it can be used.
#[derive(Clone, Debug)]
pub struct Step {
    pub mode: Mode,
    pub verdict: Result<(), Unsupported>,
}

/// The ordered modes to try.
#[derive(Clone, Debug)]
pub struct Plan {
    pub steps: Vec<Step>,
}

impl Plan {
    /// Every mode for `auto`, or only the `forced` one.
    pub fn new(features: &Features, findings: &Findings, forced: Option<Mode>) -> Plan {
        let modes = match forced {
            Some(mode) => vec![mode],
            None => Mode::ALL.to_vec(),
        };
        Plan {
            steps: modes
                .into_iter()
                .map(|mode| Step {
                    mode,
                    verdict: mode.check(features, findings),
                })
                .collect(),
        }
    }

    /// The modes worth trying, best first.
    pub fn candidates(&self) -> impl Iterator<Item = Mode> + '_ {
        self.steps
            .iter()
            .filter(|s| s.verdict.is_ok())
            .map(|s| s.mode)
    }

    /// What auto would pick if loading never failed.
    pub fn first(&self) -> Option<Mode> {
        self.candidates().next()
    }

    /// Record that `mode` failed to load or attach.
    pub fn fail(&mut self, mode: Mode, why: String) {
        if let Some(step) = self.steps.iter_mut().find(|s| s.mode == mode) {
            step.verdict = Err(Unsupported::Failed(why));
        }
    }
}
