//! Cgroups: the id the kernel gives a cgroup (what bpf_get_current_cgroup_id() returns),
//! for `--cgroup PATH`, and the path of an id, for the `cgroup` label of `--serve`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

/// The id of a cgroup v2 directory, as bpf_get_current_cgroup_id() gives it.
pub fn cgroup_id(path: &std::path::Path) -> Result<u64> {
    use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let fs = statfs(path).map_err(|e| anyhow!("--cgroup {shown}: {}", e.desc()))?;
    if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
        bail!(
            "--cgroup {shown} is not in a cgroup v2 hierarchy (usually mounted at /sys/fs/cgroup)"
        );
    }
    let meta = std::fs::metadata(path).map_err(|e| anyhow!("--cgroup {shown}: {e}"))?;
    if !meta.is_dir() {
        bail!("--cgroup {shown} is not a cgroup directory");
    }
    match kernfs_id(path) {
        Ok(id) => Ok(id),
        // From 5.5 the id is the inode number.
        Err(_) if !kernel_before(5, 5) => Ok(meta.ino()),
        Err(e) => bail!(
            "--cgroup: before Linux 5.5 a cgroup's id holds a generation that only \
             name_to_handle_at(2) shows, and it fails here ({}; a kernel built without \
             CONFIG_FHANDLE): filter with -p or --comm instead",
            e.desc()
        ),
    }
}

/// Whether the running kernel is older than `major.minor`.
fn kernel_before(major: u32, minor: u32) -> bool {
    use tcpconnlat_compat::KernelVersion;
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    KernelVersion::parse(&release).is_some_and(|v| v < KernelVersion(major, minor, 0))
}

/// The id the kernel gives a cgroup (bpf_get_current_cgroup_id), from the file handle of
/// its directory. From Linux 5.5 it is the inode number; before, the generation is in its
/// upper 32 bits, which stat does not show.
fn kernfs_id(path: &std::path::Path) -> nix::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    #[repr(C)]
    struct Handle {
        bytes: libc::c_uint,
        kind: libc::c_int,
        id: [u8; 8],
    }
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| nix::errno::Errno::EINVAL)?;
    let mut handle = Handle {
        bytes: 8,
        kind: 0,
        id: [0; 8],
    };
    let mut mount_id = 0;
    // SAFETY: `handle` is a struct file_handle with room for the 8 bytes it says.
    let rc = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            path.as_ptr(),
            (&raw mut handle).cast(),
            &mut mount_id,
            0,
        )
    };
    nix::errno::Errno::result(rc)?;
    if handle.bytes != 8 {
        return Err(nix::errno::Errno::EOVERFLOW);
    }
    Ok(u64::from_ne_bytes(handle.id))
}

/// Where the cgroup v2 hierarchy is mounted, from mounts(5) text (`/proc/self/mounts`).
fn cgroup2_root(mounts: &str) -> Option<PathBuf> {
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .map(|f| PathBuf::from(unescape_mount_path(f[1])))
}

/// A mount point as mounts(5) writes it: space, tab, newline and backslash as octal
/// escapes (`\040`).
fn unescape_mount_path(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                let value = d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
                out.push(value as u8); // at most 0o777: the low byte, as the kernel wrote it
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Cgroup v2 paths by id, for the `cgroup` label: relative to the hierarchy's root, e.g.
/// `system.slice/nginx.service`, as Prometheus users group by them.
pub struct CgroupPaths {
    /// Where cgroup v2 is mounted; `None` where it is not (every path is then unknown).
    root: Option<PathBuf>,
    known: HashMap<u64, String>,
    walked: Option<Instant>,
}

impl CgroupPaths {
    /// A cgroup made after a walk is found by the next, at most this often.
    const WALK_EVERY: Duration = Duration::from_secs(1);

    /// Where cgroup v2 is mounted (`/proc/self/mounts`), and what the user should know
    /// if it is not: every path is then "unknown" (a host with cgroup v1 only, as CentOS 7,
    /// still runs a fleet-wide configuration).
    pub fn new() -> (CgroupPaths, Option<String>) {
        let mounts = std::fs::read_to_string("/proc/self/mounts");
        let root = mounts.as_deref().ok().and_then(cgroup2_root);
        let note = root.is_none().then(|| match &mounts {
            Err(e) => format!("the cgroup label reads \"unknown\": cannot read /proc/self/mounts: {e}"),
            Ok(_) => "the cgroup label reads \"unknown\": no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup)".to_owned(),
        });
        let paths = CgroupPaths {
            root,
            known: HashMap::new(),
            walked: None,
        };
        (paths, note)
    }

    /// The path of cgroup `id`, or "unknown" (gone, or made since the last walk).
    pub fn path(&mut self, id: u64) -> String {
        if !self.known.contains_key(&id)
            && self.walked.is_none_or(|t| t.elapsed() >= Self::WALK_EVERY)
        {
            self.walk();
        }
        self.known
            .get(&id)
            .cloned()
            .unwrap_or_else(|| "unknown".to_owned())
    }

    /// Map the hierarchy as it is now. The map is made afresh: cgroups that are gone are
    /// forgotten (with pods coming and going, the old ones would pile up forever).
    fn walk(&mut self) {
        self.walked = Some(Instant::now());
        let Some(root) = self.root.clone() else {
            return;
        };
        let mut known = HashMap::with_capacity(self.known.len());
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let id = kernfs_id(&dir).unwrap_or(std::os::unix::fs::MetadataExt::ino(&meta));
            let relative = dir.strip_prefix(&root).unwrap_or(&dir);
            let name = match relative.to_string_lossy() {
                name if name.is_empty() => "/".to_owned(),
                name => name.into_owned(),
            };
            known.insert(id, name);
            if let Ok(entries) = std::fs::read_dir(&dir) {
                dirs.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        self.known = known;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_cgroup2_mount_is_found_and_unescaped() {
        let mounts = "proc /proc proc rw 0 0\n\
                      cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        assert_eq!(cgroup2_root(mounts), Some(PathBuf::from("/sys/fs/cgroup")));
        let spaced = "none /mnt/my\\040cgroups\\134x cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_root(spaced),
            Some(PathBuf::from("/mnt/my cgroups\\x"))
        );
        assert_eq!(
            cgroup2_root("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0"),
            None
        );
        assert_eq!(unescape_mount_path("a\\04"), "a\\04");
    }

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn mounts_text_never_panics(text in "(([a-z0-9/\\\\ ]{0,12} ){0,6}\n){0,8}") {
            let _ = cgroup2_root(&text);
        }
    }

    /// A mount point as mounts(5) writes it.
    fn escape_mount_path(path: &str) -> String {
        path.chars()
            .map(|c| match c {
                ' ' | '\t' | '\n' | '\\' => format!("\\{:03o}", c as u32),
                c => c.to_string(),
            })
            .collect()
    }

    /// Mount tables of any shape whose cgroup2 mount points hold spaces, tabs, newlines
    /// and backslashes (written as mounts(5) escapes them): the first cgroup2 line's
    /// mount point comes back as it was. Most cases decode an escape (counted).
    #[test]
    fn cgroup2_mount_points_come_back_as_they_were() {
        let line = (
            "[a-z]{1,8}",
            "/[a-z \t\n\\\\/]{0,16}",
            prop_oneof![Just("cgroup2"), Just("cgroup"), Just("proc"), Just("tmpfs")],
            "[a-z,=]{0,12}",
        );
        // One cgroup2 line at least, its mount point mostly holding what must be escaped.
        let point = prop_oneof![
            6 => "/[a-z]{0,4}[ \t\n\\\\][a-z \t\n\\\\/]{0,10}",
            1 => "/[a-z/]{0,12}",
        ];
        let cgroup2 = ("[a-z]{1,8}", point, Just("cgroup2"), "[a-z,=]{0,12}");
        let strategy = (
            proptest::collection::vec(line, 0..8),
            cgroup2,
            any::<prop::sample::Index>(),
            "[ -~]{0,20}",
        )
            .prop_map(|(mut lines, cgroup2, at, junk)| {
                lines.insert(at.index(lines.len() + 1), cgroup2);
                (lines, junk)
            });
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        let counts = std::cell::Cell::new((0u32, 0u32));
        runner
            .run(&strategy, |(lines, junk)| {
                let table: String = lines
                    .iter()
                    .map(|(dev, point, kind, opts)| {
                        format!("{dev} {} {kind} {opts} 0 0\n", escape_mount_path(point))
                    })
                    .chain([junk])
                    .collect();
                let first = lines.iter().find(|l| l.2 == "cgroup2");
                prop_assert_eq!(cgroup2_root(&table), first.map(|l| PathBuf::from(&l.1)));
                let (cases, decoded) = counts.get();
                let escaped = first.is_some_and(|l| l.1.contains([' ', '\t', '\n', '\\']));
                counts.set((cases + 1, decoded + u32::from(escaped)));
                Ok(())
            })
            .unwrap();
        let (cases, decoded) = counts.get();
        eprintln!("mount tables: escapes decoded in {decoded} of {cases} cases");
        assert!(
            decoded * 2 > cases,
            "escapes decoded in {decoded} of {cases} cases"
        );
    }

    fn id(path: &std::path::Path) -> u64 {
        let meta = std::fs::metadata(path).unwrap();
        kernfs_id(path).unwrap_or(std::os::unix::fs::MetadataExt::ino(&meta))
    }

    /// A cgroup that is gone is forgotten at the next walk: the map holds what exists.
    #[test]
    fn paths_of_cgroups_that_are_gone_are_forgotten() {
        let root = tempfile::tempdir().unwrap();
        let mut paths = CgroupPaths {
            root: Some(root.path().to_owned()),
            known: HashMap::new(),
            walked: None,
        };
        let mut unmounted = CgroupPaths {
            root: None,
            ..CgroupPaths::new().0
        };
        assert_eq!(unmounted.path(1), "unknown");
        let mut ids = Vec::new();
        for pod in 0..50 {
            let dir = root.path().join(format!("kubepods/pod{pod}"));
            std::fs::create_dir_all(&dir).unwrap();
            ids.push(id(&dir));
        }
        assert_eq!(paths.path(ids[7]), "kubepods/pod7");
        assert_eq!(paths.known.len(), 52); // the root, kubepods and 50 pods
        for pod in 0..49 {
            std::fs::remove_dir(root.path().join(format!("kubepods/pod{pod}"))).unwrap();
        }
        let new = root.path().join("kubepods/pod50");
        std::fs::create_dir(&new).unwrap();
        paths.walked = None; // as if WALK_EVERY had passed: a new id makes it walk again
        assert_eq!(paths.path(id(&new)), "kubepods/pod50");
        assert_eq!(paths.path(ids[49]), "kubepods/pod49");
        assert_eq!(paths.known.len(), 4);
    }
}
