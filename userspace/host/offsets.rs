//! Where the probes without CO-RE get struct sock's offsets, in order: a BTF file the user
//! gave or the kernel's own BTF, offsets built in from kernel headers for this release,
//! and, where neither has them, discovery at start-up (discovery.rs). Discovery runs
//! once, and only when legacy mode is about to load (or `--offsets discover` asks).

use std::cell::OnceCell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tcpconnlat_compat::btf::{self, BtfError, BtfFacts, SockOffsets};
use tcpconnlat_compat::{Features, Finding, OffsetNeed};

use super::discovery::{self, DiscoveryHost};
use crate::timing;
use crate::tracer::kprobes::KprobeAttach;
use crate::tracer::{objects, SockOffsetsSource};

/// `--offsets`: where struct sock's offsets may come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OffsetsArg {
    /// BTF, then built-in headers, then discovery.
    Auto,
    /// Discovery only, whatever else is there.
    Discover,
}

/// Where known offsets came from.
#[derive(Clone, Debug, PartialEq)]
pub enum OffsetSource {
    Btf(PathBuf),
    Headers(String),
    Discovered { connects: usize, took: Duration },
}

impl fmt::Display for OffsetSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OffsetSource::Btf(path) => write!(f, "BTF {}", path.display()),
            OffsetSource::Headers(release) => {
                write!(f, "kernel headers for {release}, built in")
            }
            OffsetSource::Discovered { connects, took } => write!(
                f,
                "discovery at start-up ({connects} connects, {:.1} ms)",
                took.as_secs_f64() * 1e3
            ),
        }
    }
}

/// struct sock offsets, where they came from, and what the user should know of fields
/// that could not be had.
#[derive(Clone, Debug)]
pub struct KnownOffsets {
    pub offsets: SockOffsets,
    pub source: OffsetSource,
    pub notes: Vec<String>,
}

/// What discovery needs, kept for when it is wanted.
pub struct Discovery {
    pub kprobe_attach: KprobeAttach,
    pub version_code: Option<u32>,
    pub privileged: bool,
}

/// Where offsets may be had before discovery.
pub struct Sources<'a> {
    /// The kernel's own BTF, read.
    pub kernel_btf: Option<Result<BtfFacts, BtfError>>,
    /// The kernel release, for the offsets built in from headers.
    pub release: Option<&'a str>,
    /// `--btf`.
    pub btf_file: Option<&'a Path>,
    /// `--offsets`.
    pub arg: OffsetsArg,
}

/// The offsets, as far as they are known, and discovery for when they are needed.
pub struct Offsets {
    /// From BTF or headers, or why not (which is also why discovery would run).
    given: Result<KnownOffsets, String>,
    discovery: Discovery,
    discovered: OnceCell<Result<KnownOffsets, String>>,
}

impl Offsets {
    /// In order: the BTF file the user gave, the kernel's own BTF (already parsed), offsets
    /// built in from kernel headers for this release; none with `--offsets discover`.
    pub fn new(sources: Sources<'_>, discovery: Discovery) -> Offsets {
        let given = match sources.arg {
            OffsetsArg::Discover => Err("--offsets discover".to_owned()),
            OffsetsArg::Auto => given(sources.kernel_btf, sources.release, sources.btf_file),
        };
        Offsets {
            given,
            discovery,
            discovered: OnceCell::new(),
        }
    }

    /// What the plan is told: whether legacy mode will have offsets.
    pub fn finding(&self, features: &Features) -> Finding<String> {
        match &self.given {
            Ok(known) => Finding::Yes(known.source.to_string()),
            Err(why) => match self.discoverable(features) {
                Err(cannot) => Finding::No(format!("{why}, and {cannot}")),
                Ok(()) if !self.discovery.privileged => Finding::Unknown(format!(
                    "{why}: found at start-up by discovery, which needs root"
                )),
                Ok(()) => Finding::Yes(format!("{why}: found at start-up by discovery")),
            },
        }
    }

    /// Why discovery cannot run here, if it cannot.
    fn discoverable(&self, features: &Features) -> Result<(), String> {
        if !features.kprobes() {
            return Err("discovery needs kprobes".to_owned());
        }
        Ok(())
    }

    /// The offsets known now (given, or already discovered), without discovering.
    pub fn known(&self) -> Result<&KnownOffsets, &str> {
        match (&self.given, self.discovered.get()) {
            (Ok(known), _) => Ok(known),
            (_, Some(found)) => found.as_ref().map_err(String::as_str),
            (Err(why), None) => Err(why),
        }
    }

    /// Why the offsets are not known now, if they are not: discovery failed, cannot run
    /// here, or has not run.
    pub fn why_unknown(&self, features: &Features) -> Option<String> {
        let why = match (&self.given, self.discovered.get()) {
            (Ok(_), _) | (_, Some(Ok(_))) => return None,
            (_, Some(Err(failed))) => return Some(failed.clone()),
            (Err(why), None) => why,
        };
        Some(match self.discoverable(features) {
            Err(cannot) => format!("{why}, and {cannot}"),
            Ok(()) => format!("{why}: to be found at start-up by discovery"),
        })
    }

    /// The offsets, discovering them first where that is needed and possible.
    fn get(&self, features: &Features) -> Result<&KnownOffsets, String> {
        if let Ok(known) = &self.given {
            return Ok(known);
        }
        let found = self.discovered.get_or_init(|| {
            let why_not = self.given.as_ref().err().cloned().unwrap_or_default();
            self.discoverable(features)
                .map_err(|e| format!("{why_not}, and {e}"))?;
            let host = DiscoveryHost {
                features,
                kprobe_attach: self.discovery.kprobe_attach,
                version_code: self.discovery.version_code,
            };
            let discovered = timing::step("offset discovery", || discovery::discover(&host))
                .map_err(|e| format!("discovering struct sock offsets: {e:#}"))?;
            Ok(KnownOffsets {
                offsets: discovered.found.offsets,
                source: OffsetSource::Discovered {
                    connects: discovered.connects,
                    took: discovered.took,
                },
                notes: discovered.found.notes,
            })
        });
        found.as_ref().map_err(Clone::clone)
    }
}

/// The host's offsets, for the tracer: discovered only where they are required.
impl SockOffsetsSource for super::Host {
    fn sock_offsets(&self, need: OffsetNeed) -> Result<(&SockOffsets, &[String]), String> {
        let known = match need {
            OffsetNeed::Required => self.offsets.get(&self.features)?,
            OffsetNeed::IfKnown => self.offsets.known().map_err(str::to_owned)?,
        };
        Ok((&known.offsets, &known.notes))
    }
}

fn given(
    kernel_btf: Option<Result<BtfFacts, BtfError>>,
    release: Option<&str>,
    btf_file: Option<&Path>,
) -> Result<KnownOffsets, String> {
    let from_btf = |path: &Path, offsets: Result<SockOffsets, BtfError>| {
        offsets
            .map(|offsets| KnownOffsets {
                offsets,
                source: OffsetSource::Btf(path.to_owned()),
                notes: Vec::new(),
            })
            .map_err(|e| e.to_string())
    };
    if let Some(path) = btf_file {
        return from_btf(path, btf::sock_offsets(path));
    }
    if let Some(facts) = kernel_btf {
        return from_btf(Path::new(btf::VMLINUX), facts.and_then(|f| f.sock));
    }
    let release = release.unwrap_or("unknown");
    objects::header_offsets(release)
        .map(|offsets| KnownOffsets {
            offsets,
            source: OffsetSource::Headers(release.to_owned()),
            notes: Vec::new(),
        })
        .ok_or_else(|| format!("no BTF and no struct offsets built in for kernel {release}"))
}
