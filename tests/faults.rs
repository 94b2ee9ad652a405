//! Faults while tracing: its kprobe events removed by someone else, tracefs unmounted, the
//! output's disk full or its reader gone, the wall clock jumping, a CPU going offline with
//! the perf buffer in use. Each ends in a clear message and a non-zero exit, or tracing
//! goes on; never a hang, a panic or a silent stop.

mod support;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// Connects of this process to a listener, and the tracer must show them all.
fn shows_connects(tracer: &Tracer, n: usize) {
    let server = listen("127.0.0.1:0");
    for _ in 0..n {
        connect(server);
    }
    let events = tracer.events_until(Duration::from_secs(10), |e| {
        e.iter().filter(|e| e["dport"] == server.port()).count() >= n
    });
    let seen = events
        .iter()
        .filter(|e| e["dport"] == server.port())
        .count();
    assert_eq!(seen, n, "{events:#?}\n{}", tracer.stderr.lock().unwrap());
}

/// tcpconnlat with stdout to `stdout`, showing connects of this process, and a connect
/// every 50 ms until it ends; its exit status, the last line of its stderr (what it ended
/// with: the lines before say what it did at start), and how long it ran.
fn run_into(stdout: Stdio, args: &[&str]) -> (std::process::ExitStatus, String, Duration) {
    let mut child = Command::new(bin())
        .args(args)
        .args(["-p", &me()])
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let server = listen("127.0.0.1:0");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "tcpconnlat went on for 30 s"
        );
        connect(server);
        thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .for_each(|l| err.push_str(&format!("{l}\n")));
    assert!(!err.contains("panicked"), "{err}");
    let last = err.lines().last().unwrap_or_default().to_owned();
    (status, last, started.elapsed())
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn a_full_disk_ends_it_with_one_line() {
    let _serial = serial();
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let (status, err, _) = run_into(Stdio::from(full), &[]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("writing the output") && err.contains("No space left"),
        "{err}"
    );
}

/// A pipe's write end, its read end closed: writes fail with EPIPE.
fn pipe_nobody_reads() -> std::os::fd::OwnedFd {
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    write
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn a_reader_that_goes_away_ends_it_with_one_line() {
    let _serial = serial();
    let (status, last, _) = run_into(Stdio::from(pipe_nobody_reads()), &["-j"]);
    assert_eq!(status.code(), Some(1), "{last}");
    assert!(
        last.starts_with("tcpconnlat: stopped: the output's reader went away"),
        "{last}"
    );
}

/// Its notes' reader gone (`tcpconnlat -v 2>&1 | head -1`): the notes are lost, not the
/// trace; libbpf's log, written from C, must not abort it either.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn a_reader_of_its_notes_that_goes_away_does_not_stop_it() {
    let _serial = serial();
    let child = Command::new(bin())
        .args(["-v", "-j", "-d", "2", "-p", &me()])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(pipe_nobody_reads()))
        .spawn()
        .unwrap();
    traces_and_ends_cleanly(child);
}

/// Where no thread can be made (its cgroup at pids.max), what it does on threads of its
/// own (the fentry trial's attach, closing the trials) is done in place: it traces, and
/// ends cleanly.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn at_its_cgroups_pids_limit_it_still_traces() {
    let _serial = serial();
    if !TestCgroup::supported() {
        return;
    }
    let cgroup = TestCgroup::new();
    let root = cgroup.dir.parent().unwrap();
    if !fs::read_to_string(root.join("cgroup.controllers")).is_ok_and(|c| c.contains("pids")) {
        // The pids controller is cgroup v1's here (a hybrid host): Linux 4.5+ has it in v2.
        return;
    }
    fs::write(root.join("cgroup.subtree_control"), "+pids").unwrap();
    fs::write(cgroup.dir.join("pids.max"), "1").unwrap();
    // The shell moves itself in, then becomes tcpconnlat: one task, no room for a thread.
    let child = Command::new("sh")
        .args([
            "-c",
            "echo $$ > \"$1/cgroup.procs\" && exec \"$2\" -j -d 2 -p \"$3\"",
        ])
        .args(["sh", cgroup.dir.to_str().unwrap(), &bin(), &me()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    traces_and_ends_cleanly(child);
}

/// `child` (tcpconnlat `-j -d 2 -p <this process>`, stdout piped) shows one of this
/// process's connects, made until it shows one (10 s at most), and exits 0.
fn traces_and_ends_cleanly(mut child: std::process::Child) {
    let server = listen("127.0.0.1:0");
    let stdout = child.stdout.take().unwrap();
    let (first_line, first) = std::sync::mpsc::channel();
    // Read to the end: a reader gone would end it (a_reader_that_goes_away_...).
    let reader = thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        // The first line out is the first event: tracing began.
        let _ = first_line.send(lines.next());
        lines.for_each(drop);
    });
    let started = Instant::now();
    let first = loop {
        connect(server);
        match first.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => break line,
            Err(_) if started.elapsed() < Duration::from_secs(10) => continue,
            Err(_) => break None,
        }
    };
    let output = child.wait_with_output().unwrap();
    reader.join().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{}: {err}", output.status);
    let first = first.expect("no event: it did not trace").unwrap();
    let event: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(event["dport"], server.port(), "{err}");
}

/// Someone writes `-:<event>` (or truncates kprobe_events) while tcpconnlat traces through
/// tracefs: the kernel refuses while the events are in use, and tracing goes on.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn removing_its_kprobe_events_from_under_it_is_refused() {
    let _serial = serial();
    let f = features();
    if !legacy_through_tracefs(&f) {
        return;
    }
    let tracer = Tracer::start(&[
        "--json",
        "--legacy",
        "--kprobe-attach",
        "tracefs",
        "-p",
        &me(),
    ]);
    let events = Path::new(f["tracefs"].as_str().unwrap()).join("kprobe_events");
    let ours: Vec<String> = fs::read_to_string(&events)
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!("_{}/", tracer.pid())))
        .map(str::to_owned)
        .collect();
    assert!(!ours.is_empty());
    for line in &ours {
        let name = line
            .split_whitespace()
            .next()
            .unwrap()
            .split_once(':')
            .unwrap()
            .1;
        let mut file = fs::OpenOptions::new().append(true).open(&events).unwrap();
        let removed = file.write_all(format!("-:{name}\n").as_bytes());
        let errno = removed
            .expect_err("an event in use was removed")
            .raw_os_error();
        assert_eq!(errno, Some(libc::EBUSY), "{name}");
    }
    // Clearing them all (O_TRUNC) is refused too.
    assert!(fs::File::create(&events).is_err());
    shows_connects(&tracer, 3);
    assert!(tracer.interrupt().success());
}

/// The mount that holds tracefs (tracefs itself, or before Linux 4.1 debugfs, as on RHEL
/// 7): its mount point and type, mounted there again when dropped.
struct Unmounted {
    dir: PathBuf,
    fstype: String,
}

impl Unmounted {
    /// The innermost mount that `path` is in, from /proc/self/mounts.
    fn holding(path: &Path) -> Unmounted {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
        let (dir, fstype) = mounts
            .lines()
            .filter_map(|l| {
                let mut fields = l.split_whitespace().skip(1);
                Some((PathBuf::from(fields.next()?), fields.next()?.to_owned()))
            })
            .filter(|(dir, _)| path.starts_with(dir))
            .max_by_key(|(dir, _)| dir.components().count())
            .unwrap();
        Unmounted { dir, fstype }
    }
}

impl Drop for Unmounted {
    fn drop(&mut self) {
        let _ = Command::new("mount")
            .args(["-t", &self.fstype, &self.fstype])
            .arg(&self.dir)
            .status();
    }
}

/// tracefs unmounted while tracing (lazily: a plain umount is refused while tcpconnlat
/// holds kprobe_events open): tracing goes on, and at exit the tracefs events are still
/// removed.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn tracefs_unmounted_while_tracing_changes_nothing() {
    let _serial = serial();
    let f = features();
    let tracefs = PathBuf::from(f["tracefs"].as_str().unwrap());
    let through_tracefs = usable(&f, "legacy") && f["kprobe_events"] == true;
    let args: &[&str] = if through_tracefs {
        &["--json", "--legacy", "--kprobe-attach", "tracefs"]
    } else {
        &["--json"] // the tracepoint needs tracefs only to attach
    };
    let mut all = args.to_vec();
    let me = me();
    all.extend(["-p", &me]);
    let tracer = Tracer::start(&all);
    let pid = tracer.pid();
    // Mounted again when dropped, whatever happens.
    let remount = Unmounted::holding(&tracefs);
    assert!(
        ["tracefs", "debugfs"].contains(&remount.fstype.as_str()),
        "{} is on {}",
        tracefs.display(),
        remount.fstype
    );
    let status = Command::new("umount")
        .arg("-l")
        .arg(&remount.dir)
        .status()
        .unwrap();
    assert!(status.success(), "umount -l {}", remount.dir.display());
    shows_connects(&tracer, 3);
    assert!(tracer.interrupt().success());
    drop(remount);
    let left = fs::read_to_string(tracefs.join("kprobe_events")).unwrap_or_default();
    assert!(!left.contains(&format!("_{pid}/")), "left behind:\n{left}");
}

/// The wall clock jumps an hour (NTP, an operator): latencies and the stream are on the
/// monotonic clock, and nothing changes.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn the_wall_clock_jumping_changes_nothing() {
    use nix::time::{clock_gettime, clock_settime, ClockId};
    let _serial = serial();
    let tracer = Tracer::start(&["--json", "-p", &me()]);
    let jump = |seconds: i64| {
        let now = clock_gettime(ClockId::CLOCK_REALTIME).unwrap();
        let then = nix::sys::time::TimeSpec::new(now.tv_sec() + seconds, now.tv_nsec());
        clock_settime(ClockId::CLOCK_REALTIME, then).unwrap();
    };
    jump(3600);
    shows_connects(&tracer, 3);
    jump(-7200);
    shows_connects(&tracer, 3);
    jump(3600);
    let events = tracer.lines_for(Duration::from_millis(200));
    assert!(events.is_empty(), "{events:?}");
    assert!(tracer.interrupt().success());
}

/// A CPU goes offline while the perf buffer (one ring per CPU) is in use: tracing goes on
/// with the others, and says so. It comes back: its ring takes no events any more (the
/// kernel does not revive it, and making one needs privileges given up after attaching),
/// so tracing ends with one line saying to start again (systemd's Restart= does), exit 1.
/// Only in the matrix's VMs: taking a CPU of the machine that runs the tests away is not
/// a test's to do.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn a_cpu_going_offline_and_back_under_the_perf_buffer() {
    let _serial = serial();
    let online = Path::new("/sys/devices/system/cpu/cpu1/online");
    if std::env::var_os("TCPCONNLAT_EMULATED").is_none() || !online.exists() {
        eprintln!("runs in the matrix VMs (2 vCPUs), not on the host");
        return;
    }
    let mut tracer = Tracer::start(&["--json", "--transport", "perfbuf", "-p", &me()]);
    fs::write(online, "0").unwrap();
    let back = scopeguard(|| {
        let _ = fs::write(online, "1");
    });
    let said = |s: &str| s.contains("CPU 1 went offline: tracing goes on");
    assert!(said(&tracer.stderr_until(Duration::from_secs(10), said)));
    shows_connects(&tracer, 5);
    drop(back);
    assert_eq!(fs::read_to_string(online).unwrap().trim(), "1");
    let status = tracer.wait();
    assert_eq!(status.code(), Some(1));
    let stderr = tracer.stderr.lock().unwrap().clone();
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("tcpconnlat: CPU 1 came online"),
        "{stderr}"
    );
    assert!(last.contains("start tcpconnlat again"), "{stderr}");
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
