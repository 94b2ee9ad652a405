//! Attaching kprobes: through the kprobe perf PMU (libbpf) where the kernel has it, or
//! through tracefs `kprobe_events`. The tracefs events are ours alone: in a group named
//! `tcpconnlat_<pid namespace>_<pid>` (pids repeat across containers, which share tracefs),
//! removed when their link goes (every exit path that runs destructors), and, after a
//! kill -9, removed by the next start of any instance (only events no one uses).

use std::cell::OnceCell;
use std::fs::File;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::rc::Rc;

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::{Link, ProgramMut};
use tcpconnlat_compat::Features;

/// How kprobes are attached (`--kprobe-attach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KprobeAttach {
    /// The PMU where the kernel has it, else tracefs.
    Auto,
    Pmu,
    Tracefs,
}

const GROUP_PREFIX: &str = "tcpconnlat_";

/// A kprobe attached one way or the other; dropping it detaches (and removes the tracefs
/// event). Held only to be dropped.
#[allow(dead_code)]
pub enum Kprobe {
    Pmu(Link),
    Tracefs(TracefsKprobe),
}

pub struct TracefsKprobe {
    link: Option<Link>,
    /// `kprobe_events`, held open from the attach on: the event can be removed at exit
    /// even if someone unmounted tracefs meanwhile (and a plain umount fails while it is
    /// open).
    kprobe_events: Rc<File>,
    name: String,
}

impl Drop for TracefsKprobe {
    fn drop(&mut self) {
        // The event is busy until the program is detached from it.
        drop(self.link.take());
        let _ = remove_event(&self.kprobe_events, &self.name);
    }
}

/// One kprobe to attach, at a kernel function's entry: the symbol, and a tag that makes
/// its tracefs event name unique among ours (the program's name).
pub struct KprobeSite<'a> {
    pub symbol: &'a str,
    pub tag: &'a str,
}

/// How this tracer attaches its kprobes: as asked, with what the kernel has.
pub struct KprobeAttacher<'a> {
    how: KprobeAttach,
    pmu: bool,
    tracefs: Option<&'a Path>,
    /// `kprobe_events`, opened at the first tracefs attach and shared by its events.
    kprobe_events: OnceCell<Rc<File>>,
}

impl<'a> KprobeAttacher<'a> {
    pub fn new(how: KprobeAttach, features: &'a Features) -> KprobeAttacher<'a> {
        KprobeAttacher {
            how,
            pmu: features.kprobe_pmu,
            tracefs: features.tracefs.as_deref(),
            kprobe_events: OnceCell::new(),
        }
    }

    /// Attach `prog` at `site`.
    pub fn attach(&self, prog: &ProgramMut<'_>, site: &KprobeSite<'_>) -> Result<Kprobe> {
        let use_pmu = match self.how {
            KprobeAttach::Pmu if !self.pmu => {
                bail!("the kernel has no kprobe PMU: use --kprobe-attach tracefs")
            }
            KprobeAttach::Pmu => true,
            KprobeAttach::Tracefs => false,
            KprobeAttach::Auto => self.pmu,
        };
        let mut pmu_error = None;
        if use_pmu {
            match prog.attach_kprobe(false, site.symbol) {
                Ok(link) => return Ok(Kprobe::Pmu(link)),
                // Older PMUs refuse some names that kprobe_events takes (GCC's clones, such
                // as tcp_v4_connect.isra.0): try there, as cilium/ebpf does.
                Err(e) if self.how == KprobeAttach::Auto && self.has_kprobe_events() => {
                    pmu_error = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let tracefs = self
            .tracefs
            .ok_or_else(|| anyhow!("tracefs is not mounted: kprobe_events needs it"))?;
        self.events_file(tracefs)
            .and_then(|events| attach_tracefs(prog, site, tracefs, events))
            .map(Kprobe::Tracefs)
            .map_err(|e| match pmu_error {
                // Both ways failed: say both.
                Some(pmu) => e.context(format!("the kprobe PMU refused it too ({pmu})")),
                None => e,
            })
    }

    fn events_file(&self, tracefs: &Path) -> Result<Rc<File>> {
        if let Some(file) = self.kprobe_events.get() {
            return Ok(file.clone());
        }
        let path = tracefs.join("kprobe_events");
        // Append: writing without O_APPEND would clear every other kprobe event.
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(self.kprobe_events.get_or_init(|| Rc::new(file)).clone())
    }

    fn has_kprobe_events(&self) -> bool {
        self.tracefs
            .is_some_and(|t| t.join("kprobe_events").exists())
    }
}

/// Attach through a tracefs kprobe event of our own, removed again when dropped.
fn attach_tracefs(
    prog: &ProgramMut<'_>,
    site: &KprobeSite<'_>,
    tracefs: &Path,
    kprobe_events: Rc<File>,
) -> Result<TracefsKprobe> {
    // Event names allow [A-Za-z0-9_]: symbols like tcp_v4_connect.isra.0 need cleaning.
    let clean: String = site
        .symbol
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    // 'p': a probe at the function's entry.
    let name = format!("{}/p_{clean}_{}", Group::ours().name(), site.tag);
    let line = format!("p:{name} {}", site.symbol);
    let adding = || {
        format!(
            "adding kprobe event {name} in {}/kprobe_events",
            tracefs.display()
        )
    };
    add_event(&kprobe_events, &line).with_context(adding)?;
    // From here on the event exists: the guard removes it whatever happens next.
    let mut probe = TracefsKprobe {
        link: None,
        kprobe_events: kprobe_events.clone(),
        name: name.clone(),
    };
    let id_path = tracefs.join("events").join(&name).join("id");
    let fd = open_event(&kprobe_events, &line, &id_path).with_context(adding)?;
    let link = attach_owned(fd, |fd| Ok(prog.attach_perf_event(fd)?))?;
    probe.link = Some(link);
    Ok(probe)
}

/// Attach through the perf event `fd`. Attached, libbpf owns the fd and closes it with
/// the link; refused, it is ours to close (dropped here), or the event would stay busy and
/// could not be removed.
fn attach_owned<L>(fd: OwnedFd, attach: impl FnOnce(RawFd) -> Result<L>) -> Result<L> {
    let link = attach(fd.as_raw_fd())?;
    let _owned_by_libbpf = fd.into_raw_fd();
    Ok(link)
}

/// A perf event on the kprobe event just added. Another instance in another PID
/// namespace, cleaning up as it starts, cannot tell an event not opened yet from a stale
/// one, and removes it: between the add and the id read (the id file is gone), or between
/// the id read and the open (the id names no event). Either way the event is added again,
/// a few times at most: once opened, it is in use and the kernel keeps it.
/// An event file removed under us: ENOENT, or ENODEV where the file was open in
/// debugfs while its event went (tracing before tracefs, Linux 4.1: RHEL 7's 3.10).
fn is_gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV)
}

fn open_event(kprobe_events: &File, line: &str, id_path: &Path) -> Result<OwnedFd> {
    const TRIES: usize = 5;
    let mut last = None;
    for attempt in 0..TRIES {
        if attempt > 0 {
            add_event(kprobe_events, line)?;
        }
        let id = match read_id(id_path) {
            Ok(id) => id,
            Err(e) if is_gone(&e) => {
                last = Some(anyhow!("{} is gone: {e}", id_path.display()));
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", id_path.display())),
        };
        match perf_event_open_tracepoint(id) {
            // Still ours once open (not an id the kernel gave another event meanwhile).
            Ok(fd) if read_id(id_path).is_ok_and(|now| now == id) => return Ok(fd),
            Ok(_) => last = Some(anyhow!("{} changed while it was opened", id_path.display())),
            // The event behind the id was removed.
            Err(e) if !id_path.exists() => last = Some(e),
            Err(e) => return Err(e).context("perf_event_open for the kprobe event"),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no event")).context(format!(
        "the event was removed {TRIES} times before it could be opened"
    )))
}

fn read_id(path: &Path) -> std::io::Result<u64> {
    fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// A tracefs group of ours: the pid namespace (the inode of /proc/self/ns/pid) and the pid
/// in it of the instance that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Group {
    /// 0 where unknown (and in names older tcpconnlat versions made).
    namespace: u64,
    pid: u32,
}

impl Group {
    fn ours() -> Group {
        let namespace = fs::read_link("/proc/self/ns/pid")
            .ok()
            .and_then(|link| {
                // "pid:[4026531836]"
                let text = link.to_string_lossy().into_owned();
                text.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
            })
            .unwrap_or(0);
        Group {
            namespace,
            pid: std::process::id(),
        }
    }

    fn name(&self) -> String {
        format!("{GROUP_PREFIX}{}_{}", self.namespace, self.pid)
    }

    /// The group of an event name ("tcpconnlat_4026531836_1234/p_tcp_set_state_x", or
    /// an older version's "tcpconnlat_1234/..."), if it is one of ours.
    fn of_event(name: &str) -> Option<Group> {
        let group = name.split('/').next()?.strip_prefix(GROUP_PREFIX)?;
        let (namespace, pid) = group.split_once('_').unwrap_or(("0", group));
        Some(Group {
            namespace: namespace.parse().ok()?,
            pid: pid.parse().ok()?,
        })
    }

    /// Whether the instance that made this group is known to be alive: only from our own
    /// PID namespace can its pid be looked up. Asked before we add any event, so a group
    /// named as ours is a dead instance's: one that had our pid in a namespace that has
    /// died since, whose inode the kernel gave to ours (pid 1 of a restarted container).
    fn known_alive(&self, ours: &Group) -> bool {
        self.namespace == ours.namespace
            && self.pid != ours.pid
            && Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// One command to `kprobe_events`, in one write (the kernel parses what each write holds).
fn add_event(kprobe_events: &File, line: &str) -> std::io::Result<()> {
    (&*kprobe_events).write_all(format!("{line}\n").as_bytes())
}

fn remove_event(kprobe_events: &File, name: &str) -> std::io::Result<()> {
    add_event(kprobe_events, &format!("-:{name}"))
}

/// Remove kprobe events that a tcpconnlat which is gone left behind (killed with -9).
/// Returns how many. An event in use is never removed: the kernel refuses (EBUSY) while a
/// perf event is open on it, which is how an instance alive in another PID namespace,
/// whose pid means nothing here, keeps its events.
pub fn remove_stale(tracefs: &Path) -> usize {
    let path = tracefs.join("kprobe_events");
    let (Ok(text), Ok(kprobe_events)) = (
        fs::read_to_string(&path),
        OpenOptions::new().append(true).open(&path),
    ) else {
        return 0;
    };
    let ours = Group::ours();
    let mut removed = 0;
    for line in text.lines() {
        // "p:tcpconnlat_4026531836_1234/p_tcp_set_state_legacy_set_state tcp_set_state"
        let Some(name) = line
            .split_whitespace()
            .next()
            .and_then(|w| w.split_once(':'))
            .map(|(_, n)| n)
        else {
            continue;
        };
        let Some(group) = Group::of_event(name) else {
            continue;
        };
        if !group.known_alive(&ours) && remove_event(&kprobe_events, name).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// perf_event_open(2) on a tracepoint-type event (a tracefs kprobe), all CPUs' worth:
/// kprobes fire on every CPU whatever the event's CPU.
fn perf_event_open_tracepoint(id: u64) -> Result<OwnedFd> {
    let mut attr: libbpf_rs::libbpf_sys::perf_event_attr = unsafe { std::mem::zeroed() };
    attr.type_ = libbpf_rs::libbpf_sys::PERF_TYPE_TRACEPOINT;
    attr.size = std::mem::size_of_val(&attr) as u32;
    attr.config = id;
    // SAFETY: a valid attr, pid -1 with cpu 0 (system-wide), no group, CLOEXEC.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const _,
            -1 as libc::pid_t,
            0 as libc::c_int,
            -1 as libc::c_int,
            libbpf_rs::libbpf_sys::PERF_FLAG_FD_CLOEXEC as libc::c_ulong,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only asks whether the descriptor is open.
        unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
    }

    /// A refused attach closes the perf event's descriptor (else the tracefs event stays
    /// busy and cannot be removed); an attach that succeeds leaves it to its owner.
    #[test]
    fn a_refused_attach_closes_the_event_and_an_accepted_one_hands_it_over() {
        let (read, _write) = nix::unistd::pipe().unwrap();
        let raw = read.as_raw_fd();
        let refused = attach_owned(read, |_| -> Result<()> { bail!("EINVAL") });
        assert!(refused.is_err());
        assert!(!is_open(raw), "the descriptor leaked");
        let (read, _write) = nix::unistd::pipe().unwrap();
        let raw = read.as_raw_fd();
        let owner = attach_owned(read, Ok).unwrap();
        assert!(is_open(owner), "closed though handed over");
        // SAFETY: handed over to us, as libbpf's link would own it.
        drop(unsafe { OwnedFd::from_raw_fd(raw) });
    }

    #[test]
    fn groups_name_their_pid_namespace_and_older_names_still_parse() {
        let g = Group {
            namespace: 4026531836,
            pid: 1,
        };
        assert_eq!(g.name(), "tcpconnlat_4026531836_1");
        assert_eq!(
            Group::of_event("tcpconnlat_4026531836_1/p_tcp_set_state_x"),
            Some(g)
        );
        assert_eq!(
            Group::of_event("tcpconnlat_1234/p_tcp_v4_connect_0"),
            Some(Group {
                namespace: 0,
                pid: 1234
            })
        );
        assert_eq!(Group::of_event("other_1/p_x"), None);
        assert_eq!(Group::of_event("tcpconnlat_x_1/p_x"), None);
    }

    /// The same pid in another namespace is another instance, whose liveness cannot be
    /// told from here (the kernel's EBUSY keeps its events if it is alive); our own group,
    /// before we made anything, is a dead instance's.
    #[test]
    fn only_our_own_namespace_tells_who_is_alive() {
        let ours = Group::ours();
        assert!(!ours.known_alive(&ours));
        let parent = Group {
            pid: std::os::unix::process::parent_id(),
            ..ours
        };
        assert!(parent.known_alive(&ours));
        let elsewhere = Group {
            namespace: ours.namespace + 1,
            ..ours
        };
        assert!(!elsewhere.known_alive(&ours));
        let gone = Group {
            pid: i32::MAX as u32,
            ..ours
        };
        assert!(!gone.known_alive(&ours));
    }
}
