//! Detection of what a kernel offers, from the files it exposes under a root directory.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::kallsyms::AttachPoints;
use crate::tracefs::{
    self, StateLayout, RESET_TRACEPOINT, RETRANSMIT_TRACEPOINT, STATE_TRACEPOINT,
};

/// `major.minor.patch` of a kernel release such as `6.1.0-47-cloud-amd64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct KernelVersion(pub u32, pub u32, pub u32);

impl KernelVersion {
    pub fn parse(release: &str) -> Option<KernelVersion> {
        let mut numbers = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().ok());
        let major = numbers.next()??;
        let minor = numbers.next()??;
        let patch = numbers.next().flatten().unwrap_or(0);
        Some(KernelVersion(major, minor, patch))
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// What a check found out: the kernel has it (with what was found), it does not (and why),
/// or it could not be told (and why: not tried, not allowed to try, not read yet). As in
/// cilium/ebpf, "not supported" is kept apart from "could not tell".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding<T> {
    Yes(T),
    No(String),
    Unknown(String),
}

impl<T> Finding<T> {
    /// Yes or no, from the outcome of a check that could be made.
    pub fn from_result(result: Result<T, String>) -> Finding<T> {
        match result {
            Ok(found) => Finding::Yes(found),
            Err(why) => Finding::No(why),
        }
    }

    /// What was found, where the answer is yes.
    pub fn yes(&self) -> Option<&T> {
        match self {
            Finding::Yes(found) => Some(found),
            _ => None,
        }
    }

    pub fn is_yes(&self) -> bool {
        matches!(self, Finding::Yes(_))
    }

    pub fn is_unknown(&self) -> bool {
        matches!(self, Finding::Unknown(_))
    }
}

impl<T> Default for Finding<T> {
    fn default() -> Finding<T> {
        Finding::Unknown("not tried".to_owned())
    }
}

/// Everything that can be known by reading files.
#[derive(Clone, Debug)]
pub struct Features {
    pub release: Option<String>,
    pub version: Option<KernelVersion>,
    /// `/sys/kernel/btf/vmlinux` exists: CO-RE can relocate against this kernel.
    pub btf: bool,
    pub tracefs: Option<PathBuf>,
    /// The `kprobe` perf PMU (`/sys/bus/event_source/devices/kprobe`): Linux 4.17, commit
    /// e12f03d7031a "perf/core: Implement the 'perf_kprobe' PMU".
    pub kprobe_pmu: bool,
    /// tracefs `kprobe_events`: kprobes without the PMU.
    pub kprobe_events: bool,
    /// The `sock:inet_sock_set_state` record layout, or why it cannot be used.
    pub state_tracepoint: Result<StateLayout, String>,
    /// `skaddr` offset in `tcp:tcp_retransmit_skb` (SYN retransmit counts), or why not.
    pub retransmit_tracepoint: Result<u16, String>,
    /// `skaddr` offset in `tcp:tcp_receive_reset` (RSTs), or why not.
    pub reset_tracepoint: Result<u16, String>,
    /// Kernel symbols for the kprobe targets, or why they cannot be read; unknown until
    /// [`Features::read_symbols`]: the kernel takes tens of milliseconds to format
    /// /proc/kallsyms, and only the kprobe modes need it.
    pub attach_points: Finding<AttachPoints>,
}

/// What the caller found beyond the files `Features` reads, fed to the plan: capabilities
/// only known by trying (unknown where not tried, e.g. without the privilege to try) and
/// what reading BTF, headers or the kernel itself told.
#[derive(Clone, Debug, Default)]
pub struct Findings {
    /// Loading and attaching a minimal fentry program (Linux 5.5, commit fec56f5890d9
    /// "bpf: Introduce BPF trampoline"; refused by some kernels and sandboxes that have
    /// it). Where the caller did not wait for the attach to end, what the load told.
    pub fentry: Finding<()>,
    /// Creating a BPF ring buffer map (Linux 5.8, commit 457f44363a88).
    pub ringbuf: Finding<()>,
    /// Running a raw tracepoint program on demand (BPF_PROG_TEST_RUN, Linux 5.10+): how
    /// the sweeper asks whether a pending connect's socket is still in SYN_SENT.
    pub on_demand: Finding<()>,
    /// Where legacy mode's struct sock offsets come from (a BTF file, or kernel headers
    /// at build time), or why there are none.
    pub sock_offsets: Finding<String>,
    /// The hooked functions the kernel's BTF describes (what fentry can attach to), or
    /// why it cannot be read.
    pub fentry_targets: Finding<AttachPoints>,
}

impl Features {
    /// Read what the kernel under `root` offers. Missing or unreadable files mean the
    /// feature is absent; nothing here fails.
    pub fn detect(root: &Path) -> Features {
        let release = fs::read_to_string(root.join("proc/sys/kernel/osrelease"))
            .ok()
            .map(|s| s.trim().to_owned());
        let version = release.as_deref().and_then(KernelVersion::parse);
        let tracefs = tracefs::find_tracefs(root);
        let read_format = |tracepoint| -> Result<(PathBuf, String), String> {
            let dir = tracefs.as_ref().ok_or_else(|| {
                format!(
                    "tracefs is not mounted (looked in /{} and /{})",
                    tracefs::TRACEFS_DIRS[0],
                    tracefs::TRACEFS_DIRS[1]
                )
            })?;
            let path = tracefs::format_path(dir, tracepoint);
            if !path.parent().is_some_and(Path::exists) {
                let (system, event) = tracepoint;
                return Err(format!(
                    "the kernel has no tracepoint {system}:{event} ({})",
                    tracefs::introduced(tracepoint)
                ));
            }
            fs::read_to_string(&path)
                .map(|text| (path.clone(), text))
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let state_tracepoint = read_format(STATE_TRACEPOINT).and_then(|(path, text)| {
            StateLayout::from_format(&text).map_err(|e| format!("{}: {e}", path.display()))
        });
        let skaddr = |tracepoint| {
            read_format(tracepoint).and_then(|(path, text)| {
                tracefs::skaddr_offset(&text).map_err(|e| format!("{}: {e}", path.display()))
            })
        };
        let retransmit_tracepoint = skaddr(RETRANSMIT_TRACEPOINT);
        let reset_tracepoint = skaddr(RESET_TRACEPOINT);
        Features {
            release,
            version,
            btf: root.join("sys/kernel/btf/vmlinux").is_file(),
            kprobe_pmu: root
                .join("sys/bus/event_source/devices/kprobe/type")
                .is_file(),
            kprobe_events: tracefs
                .as_ref()
                .is_some_and(|dir| dir.join("kprobe_events").exists()),
            tracefs,
            state_tracepoint,
            retransmit_tracepoint,
            reset_tracepoint,
            attach_points: Finding::Unknown("/proc/kallsyms not read".to_owned()),
        }
    }

    /// Whether kprobes can be attached at all (through the PMU or tracefs).
    pub fn kprobes(&self) -> bool {
        self.kprobe_pmu || self.kprobe_events
    }

    /// Resolve the kprobe targets from `/proc/kallsyms` under `root`.
    pub fn read_symbols(&mut self, root: &Path) {
        self.attach_points = Finding::from_result(
            fs::File::open(root.join("proc/kallsyms"))
                .map(|file| std::io::BufReader::with_capacity(64 * 1024, file))
                .and_then(AttachPoints::read_kallsyms)
                .map_err(|e| format!("cannot read /proc/kallsyms: {e}")),
        );
    }

    /// Global data sections (`.rodata`, `.data`, `.bss` maps) arrived in Linux 5.2.
    pub fn global_data(&self) -> Option<bool> {
        self.version.map(|v| v >= KernelVersion(5, 2, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_distribution_releases() {
        assert_eq!(
            KernelVersion::parse("6.1.0-47-cloud-amd64"),
            Some(KernelVersion(6, 1, 0))
        );
        assert_eq!(
            KernelVersion::parse("6.18.44-fc-v669"),
            Some(KernelVersion(6, 18, 44))
        );
        assert_eq!(KernelVersion::parse("5.4"), Some(KernelVersion(5, 4, 0)));
        assert_eq!(KernelVersion::parse("garbage"), None);
    }
}
