//! Helpers for tests that run the real tracer on the real kernel: spawning it and reading
//! its JSON, network namespaces joined by veth, and peeking at its BPF maps.
#![allow(dead_code)] // each test binary uses a different part

/// The compiled probe objects and their map names, as the binary has them (build.rs).
pub mod probes {
    use tcpconnlat_compat::ProbeObject;
    include!(concat!(env!("OUT_DIR"), "/probe_names.rs"));
}

pub use tcpconnlat_compat::ProbeObject;

/// The structs and constants shared with the probes (probes/tcpconnlat.h), as the binary
/// has them (build.rs).
#[allow(clippy::all)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/types.skel.rs"));
}
#[allow(unused_imports)] // each test binary uses a different part
pub use skel::types::{address_family as Family, counter as Counter, pending as Pending};

// SAFETY: generated from the C header as #[repr(C)] plain integers and byte arrays with
// explicit padding: every bit pattern is a valid value.
unsafe impl plain::Plain for Pending {}

/// A pending-table value as the probes lay it out.
pub fn pending_bytes(entry: &Pending) -> Vec<u8> {
    // SAFETY: Pending is plain data (above).
    unsafe { plain::as_bytes(entry) }.to_vec()
}

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The tracer under test: the one cargo built, or TCPCONNLAT_TEST_BIN (the kernel matrix
/// proves `--btf` with a binary built without any kernel headers).
pub fn bin() -> String {
    std::env::var("TCPCONNLAT_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_tcpconnlat").to_owned())
}

/// Kernel-facing tests run one at a time: every tracer sees every connect on the host,
/// and the map checks must see only their own tracer.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running tcpconnlat with its stdout lines (JSON when started with --json).
pub struct Tracer {
    pub child: Child,
    lines: Receiver<String>,
    pub stderr: std::sync::Arc<Mutex<String>>,
    /// Where its maps are pinned, on kernels that give no map ids (see [`map_ids_work`]).
    pins: Option<PathBuf>,
}

impl Tracer {
    /// Start tcpconnlat and wait until it says it is attached. With TCPCONNLAT_TEST_MODE
    /// set (the kernel matrix runs the suite once per mode), that mode is forced.
    pub fn start(args: &[&str]) -> Tracer {
        Tracer::start_in(&[], args)
    }

    /// [`Tracer::start`], run through `wrapper` (e.g. `unshare --pid --fork`).
    pub fn start_in(wrapper: &[&str], args: &[&str]) -> Tracer {
        let mut forced: Vec<String> = match test_mode() {
            Some(mode) if !args.contains(&"--mode") => vec!["--mode".into(), mode],
            _ => Vec::new(),
        };
        forced.extend(test_args());
        let pins = (!map_ids_work()).then(pin_dir);
        if let Some(dir) = &pins {
            forced.extend(["--pin-maps".to_owned(), dir.display().to_string()]);
        }
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let mut child = command
            .args(&forced)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tcpconnlat");
        let (tx, lines) = channel();
        let stdout = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready) = channel();
        let err_buf = stderr.clone();
        let err = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let ready = line.starts_with("Tracing TCP connects");
                {
                    let mut buf = err_buf.lock().unwrap();
                    buf.push_str(&line);
                    buf.push('\n');
                }
                // Only once the line is in the buffer: tests read it right after.
                if ready {
                    let _ = ready_tx.send(());
                }
            }
        });
        if ready.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tcpconnlat {args:?} did not attach:\n{}",
                stderr.lock().unwrap()
            );
        }
        Tracer {
            child,
            lines,
            stderr,
            pins,
        }
    }

    /// JSON events until `done` says enough or `timeout` passes.
    pub fn events_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Value]) -> bool,
    ) -> Vec<Value> {
        let end = Instant::now() + timeout;
        let mut events = Vec::new();
        while !done(&events) {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => events.push(
                    serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {line}")),
                ),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        events
    }

    /// Every line printed from now until `quiet` passes with nothing new.
    pub fn lines_for(&self, quiet: Duration) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(quiet) {
            lines.push(line);
        }
        lines
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its stderr so far, once `done` says it holds what is awaited or `timeout` passes
    /// (stderr is read apart from stdout: a line can come a moment after the JSON).
    pub fn stderr_until(&self, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + timeout;
        loop {
            let text = self.stderr.lock().unwrap().clone();
            if done(&text) || Instant::now() > end {
                return text;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT, then the exit status (it must exit by itself within 10 s).
    pub fn interrupt(mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        self.wait()
    }

    pub fn wait(&mut self) -> ExitStatus {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!("tcpconnlat did not exit:\n{}", self.stderr.lock().unwrap());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// IDs of the BPF maps this tracer holds. Its fdinfo names them from Linux 4.15 on;
    /// before, it shows each map's type and sizes only, and the maps are those of the
    /// system with the same (the VMs that run such kernels have no other BPF user). Empty
    /// where the kernel gives no map ids (before 4.13: see [`Tracer::maps`]).
    pub fn map_ids(&self) -> Vec<u32> {
        let dir = format!("/proc/{}/fdinfo", self.pid());
        let mut ids = Vec::new();
        let mut shapes = Vec::new();
        for entry in fs::read_dir(dir).unwrap().flatten() {
            let Ok(info) = fs::read_to_string(entry.path()) else {
                continue;
            };
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name)?.trim().parse::<u32>().ok())
            };
            if let Some(id) = field("map_id:") {
                ids.push(id);
            } else if let Some(kind) = field("map_type:") {
                let sizes = (
                    field("key_size:"),
                    field("value_size:"),
                    field("max_entries:"),
                );
                shapes.push((kind, sizes.0, sizes.1, sizes.2));
            }
        }
        if ids.is_empty() && map_ids_work() {
            ids = libbpf_rs::query::MapInfoIter::default()
                .filter(|m| {
                    let shape = (
                        m.ty as u32,
                        Some(m.key_size),
                        Some(m.value_size),
                        Some(m.max_entries),
                    );
                    shapes.contains(&shape)
                })
                .map(|m| m.id)
                .collect();
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The tracer's map named `name`: by its id, or where it is pinned on kernels without
    /// map ids.
    pub fn map(&self, name: &str) -> TestMap {
        use libbpf_rs::MapHandle;
        use std::os::fd::FromRawFd;
        let fd = match &self.pins {
            Some(dir) => {
                let path = std::ffi::CString::new(dir.join(name).to_str().unwrap()).unwrap();
                // SAFETY: a valid path; a new descriptor or -errno.
                let fd = unsafe { libbpf_rs::libbpf_sys::bpf_obj_get(path.as_ptr()) };
                assert!(fd >= 0, "tracer {} pinned no map {name}: {fd}", self.pid());
                // SAFETY: just made, owned by nothing else.
                unsafe { OwnedFd::from_raw_fd(fd) }
            }
            None => self
                .map_ids()
                .into_iter()
                .map(|id| MapHandle::from_map_id(id).unwrap())
                .find(|m| map_is(m, name))
                .unwrap_or_else(|| panic!("tracer {} has no map {name}", self.pid()))
                .as_fd()
                .try_clone_to_owned()
                .unwrap(),
        };
        TestMap::new(fd, name)
    }

    /// The probes' counter `counter` (enum counter) right now.
    pub fn counter(&self, counter: Counter) -> u64 {
        let value = self
            .map("counters")
            .lookup(&counter.0.to_ne_bytes())
            .expect("the counters map holds every counter");
        u64::from_ne_bytes(value[..8].try_into().unwrap())
    }

    /// How many entries the tracer's map named `name` holds right now.
    pub fn map_entries(&self, name: &str) -> usize {
        self.map(name).key_count()
    }

    /// What this tracer holds of the kernel's BPF maps, to check after it exits that none
    /// is left.
    pub fn held_maps(&self) -> HeldMaps {
        match &self.pins {
            Some(dir) => HeldMaps::Pinned(dir.clone()),
            None => HeldMaps::Ids(self.map_ids()),
        }
    }
}

/// The key and value sizes of the probes' map `name`, as probes/tcpconnlat.h declares its
/// types (read from the BTF of the object that holds them all).
fn declared_sizes(name: &str) -> (usize, usize) {
    use libbpf_rs::btf::HasSize;
    let object = probes::bytes(ProbeObject::Types);
    let btf = libbpf_rs::btf::Btf::from_raw("types", object)
        .unwrap()
        .unwrap();
    let size = |ty: &str| {
        btf.type_by_name::<libbpf_rs::btf::types::Struct<'_>>(ty)
            .unwrap_or_else(|| panic!("no struct {ty} in the probes' types"))
            .size()
    };
    match name {
        "pending" => (std::mem::size_of::<u64>(), size("pending")),
        other => panic!("the probes' map {other}: its sizes are not known here"),
    }
}

/// One of a tracer's maps, through raw bpf() calls every kernel has (libbpf's map handles
/// ask for map info, which is 4.13+).
pub struct TestMap {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl TestMap {
    /// Map `name` of the probes, behind `fd`: its key and value sizes from its fdinfo, or,
    /// where the kernel's fdinfo does not say them (4.4), from the probes' own types.
    fn new(fd: OwnedFd, name: &str) -> TestMap {
        use std::os::fd::AsRawFd;
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
        let field = |field: &str| -> Option<usize> {
            info.lines()
                .find_map(|l| l.strip_prefix(field)?.trim().parse().ok())
        };
        let (key_size, value_size) = match (field("key_size:"), field("value_size:")) {
            (Some(key), Some(value)) => (key, value),
            _ => declared_sizes(name),
        };
        TestMap {
            key_size,
            value_size,
            fd,
        }
    }

    pub fn value_size(&self) -> usize {
        self.value_size
    }

    fn raw(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }

    pub fn key_count(&self) -> usize {
        let (mut key, mut next) = (vec![0u8; self.key_size], vec![0u8; self.key_size]);
        let mut first = true;
        let mut n = 0;
        loop {
            let prev = if first {
                std::ptr::null()
            } else {
                key.as_ptr().cast()
            };
            // SAFETY: buffers of the map's key size.
            let rc = unsafe {
                libbpf_rs::libbpf_sys::bpf_map_get_next_key(
                    self.raw(),
                    prev,
                    next.as_mut_ptr().cast(),
                )
            };
            if rc != 0 {
                return n;
            }
            n += 1;
            first = false;
            std::mem::swap(&mut key, &mut next);
        }
    }

    pub fn update(&self, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        assert_eq!((key.len(), value.len()), (self.key_size, self.value_size));
        // SAFETY: buffers of the map's sizes.
        let rc = unsafe {
            libbpf_rs::libbpf_sys::bpf_map_update_elem(
                self.raw(),
                key.as_ptr().cast(),
                value.as_ptr().cast(),
                0,
            )
        };
        check(rc)
    }

    pub fn lookup(&self, key: &[u8]) -> Option<Vec<u8>> {
        let mut value = vec![0u8; self.value_size];
        // SAFETY: buffers of the map's sizes.
        let rc = unsafe {
            libbpf_rs::libbpf_sys::bpf_map_lookup_elem(
                self.raw(),
                key.as_ptr().cast(),
                value.as_mut_ptr().cast(),
            )
        };
        (rc == 0).then_some(value)
    }

    pub fn delete(&self, key: &[u8]) -> std::io::Result<()> {
        // SAFETY: a buffer of the map's key size.
        let rc =
            unsafe { libbpf_rs::libbpf_sys::bpf_map_delete_elem(self.raw(), key.as_ptr().cast()) };
        check(rc)
    }
}

fn check(rc: i32) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(-rc))
    }
}

/// A tracer's BPF maps, as they can be known on this kernel.
#[derive(Debug)]
pub enum HeldMaps {
    Ids(Vec<u32>),
    /// Before 4.13 (no map ids): pinned here by `--pin-maps`; a map outlives the tracer
    /// only through its pin, which the tracer must remove.
    Pinned(PathBuf),
}

impl HeldMaps {
    /// Whether there were any to check.
    pub fn is_empty(&self) -> bool {
        match self {
            HeldMaps::Ids(ids) => ids.is_empty(),
            HeldMaps::Pinned(dir) => fs::read_dir(dir).map_or(true, |d| d.count() == 0),
        }
    }

    /// What is still there, waiting a moment for the kernel (which frees a map a little
    /// after its last descriptor closes).
    pub fn left(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left: Vec<String> = match self {
                HeldMaps::Ids(ids) => ids
                    .iter()
                    .filter(|&&id| libbpf_rs::MapHandle::from_map_id(id).is_ok())
                    .map(|id| format!("map {id}"))
                    .collect(),
                HeldMaps::Pinned(dir) => fs::read_dir(dir)
                    .map(|d| {
                        d.flatten()
                            .map(|e| format!("pin {}", e.path().display()))
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Whether this kernel gives BPF map ids (BPF_MAP_GET_NEXT_ID, Linux 4.13+).
pub fn map_ids_work() -> bool {
    static WORK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORK.get_or_init(|| {
        let mut next = 0u32;
        // SAFETY: a valid out-pointer; -EINVAL where the command does not exist.
        let rc = unsafe { libbpf_rs::libbpf_sys::bpf_map_get_next_id(0, &mut next) };
        rc != -libc::EINVAL
    })
}

/// A fresh directory in a bpffs (mounted at /sys/fs/bpf if nothing is), for one tracer's
/// pins.
fn pin_dir() -> PathBuf {
    static MOUNT: std::sync::Once = std::sync::Once::new();
    let root = Path::new("/sys/fs/bpf");
    MOUNT.call_once(|| {
        let mounted = fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"));
        if !mounted {
            let status = Command::new("mount")
                .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
                .status()
                .expect("mount");
            assert!(status.success(), "mounting bpffs at /sys/fs/bpf");
        }
    });
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = root.join(format!("tcpconnlat-test-{}-{n}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether `map` is the probes' map `name`: by its name, or on kernels before 4.15, which
/// keep no map names, by the type and sizes of the map of that name in the probe objects.
pub fn map_is(map: &impl libbpf_rs::MapCore, name: &str) -> bool {
    if !map.name().is_empty() {
        return map.name().to_str() == Some(name);
    }
    let object = libbpf_rs::ObjectBuilder::default()
        .open_memory(probes::bytes(ProbeObject::Legacy))
        .unwrap();
    let same = object
        .maps()
        .find(|m| m.name().to_str() == Some(name))
        .is_some_and(|ours| {
            (ours.map_type(), ours.key_size(), ours.value_size())
                == (map.map_type(), map.key_size(), map.value_size())
        });
    same
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // A tracer killed with -9 leaves its pins: the test made them, it removes them.
        if let Some(dir) = &self.pins {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// The mode the suite is asked to prove (TCPCONNLAT_TEST_MODE), if any.
pub fn test_mode() -> Option<String> {
    std::env::var("TCPCONNLAT_TEST_MODE")
        .ok()
        .filter(|m| !m.is_empty())
}

/// The matrix proves variants of a mode, e.g. "--kprobe-attach tracefs" or "--btf FILE"
/// (TCPCONNLAT_TEST_ARGS).
pub fn test_args() -> Vec<String> {
    std::env::var("TCPCONNLAT_TEST_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// [`run`] with the variant's arguments ([`test_args`]) first.
pub fn run_as_tested(args: &[&str]) -> (ExitStatus, String, String) {
    let extra = test_args();
    let all: Vec<&str> = extra
        .iter()
        .map(String::as_str)
        .chain(args.iter().copied())
        .collect();
    run(&all)
}

/// Run tcpconnlat to completion; (exit status, stdout, stderr).
pub fn run(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("run tcpconnlat");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// This thread's comm, as the kernel reports it for events it causes.
pub fn own_comm() -> String {
    // Not /proc/thread-self, which came with Linux 3.17.
    fs::read_to_string(format!("/proc/self/task/{}/comm", nix::unistd::gettid()))
        .unwrap()
        .trim_end()
        .to_owned()
}

/// Connect and close at once; the local port used.
pub fn connect(addr: SocketAddr) -> u16 {
    local_port(&connect_held(addr))
}

/// Connect, and keep the connection open (its port is not given to another connect).
pub fn connect_held(addr: SocketAddr) -> std::net::TcpStream {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

/// The local port of a connection.
pub fn local_port(s: &std::net::TcpStream) -> u16 {
    s.local_addr().unwrap().port()
}

/// `f`'s result and how long it took, as the application sees it.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let result = f();
    (result, start.elapsed())
}

/// A connect's traced latency against the time the application itself saw it take: no
/// more (the tracer's clock starts inside connect() and stops before it returns, or at the
/// close that ends it), and no less than that minus what the syscalls around it cost.
/// Both are the kernel's CLOCK_MONOTONIC, so an emulated machine whose timers drift
/// against it (a 1 s RTO measured at 962 ms under QEMU TCG) cannot part them. `at_least_ms`
/// is what the connect must have waited for (an RTO), allowing that drift.
pub fn assert_latency(e: &Value, app: Duration, at_least_ms: f64) {
    let lat = e["lat_ms"].as_f64().expect("lat_ms");
    let app = app.as_secs_f64() * 1e3;
    assert!(
        lat <= app + 0.5,
        "traced {lat} ms, but the application saw {app:.3} ms: {e}"
    );
    assert!(
        lat >= app - (20.0 + app * 0.05),
        "traced {lat} ms, far below the {app:.3} ms the application saw: {e}"
    );
    assert!(
        lat >= at_least_ms * 0.9,
        "traced {lat} ms, expected about {at_least_ms} ms: {e}"
    );
}

/// A listener that accepts (and drops) connections in the background.
pub fn listen(addr: &str) -> SocketAddr {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let local = l.local_addr().unwrap();
    thread::spawn(move || for _ in l.incoming() {});
    local
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two network namespaces joined by a veth pair, removed on drop:
/// client `a` (10.231.N.1, fd00:231:N::1) and server `b` (10.231.N.2, fd00:231:N::2).
pub struct NetPair {
    pub a: String,
    pub b: String,
    pub n: u32,
}

impl NetPair {
    pub fn new() -> NetPair {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("tcl{}x{n}", std::process::id());
        let pair = NetPair {
            a: format!("{tag}a"),
            b: format!("{tag}b"),
            n,
        };
        for ns in [&pair.a, &pair.b] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let (va, vb) = (format!("{tag}va"), format!("{tag}vb"));
        ip(&[
            "link", "add", &va, "netns", &pair.a, "type", "veth", "peer", "name", &vb, "netns",
            &pair.b,
        ]);
        for (ns, dev, host) in [(&pair.a, &va, 1), (&pair.b, &vb, 2)] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.231.{n}.{host}/24"),
                "dev",
                dev,
            ]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("fd00:231:{n}::{host}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        pair
    }

    pub fn server_v4(&self) -> String {
        format!("10.231.{}.2", self.n)
    }

    pub fn client_v4(&self) -> String {
        format!("10.231.{}.1", self.n)
    }

    pub fn server_v6(&self) -> String {
        format!("fd00:231:{}::2", self.n)
    }

    pub fn client_v6(&self) -> String {
        format!("fd00:231:{}::1", self.n)
    }

    /// Run `f` on a thread inside namespace `ns` (the process stays where it is).
    pub fn within<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{ns}");
        thread::spawn(move || {
            let file = fs::File::open(&path).unwrap();
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    /// In the server namespace, drop incoming SYNs to `port`: all of them, or only the
    /// first of each source (so a connect takes one SYN retransmit, about 1 s).
    pub fn drop_syns(&self, port: u16, only_first: bool) {
        if only_first {
            self.syn_rule(
                port,
                &[
                    "-m", "recent", "--name", "tclfirst", "--rcheck", "-j", "ACCEPT",
                ],
            );
            self.syn_rule(
                port,
                &["-m", "recent", "--name", "tclfirst", "--set", "-j", "DROP"],
            );
        } else {
            self.syn_rule(port, &["-j", "DROP"]);
        }
    }

    /// In the server namespace, drop every `n`th incoming SYN to `port` (retransmits
    /// counted too): a mix of connects answered at once and after one or more SYN
    /// retransmits (about 1 s, 3 s).
    pub fn drop_every_nth_syn(&self, port: u16, n: u32) {
        let n = n.to_string();
        let nth = [
            "-m",
            "statistic",
            "--mode",
            "nth",
            "--every",
            &n,
            "--packet",
            "0",
        ];
        self.syn_rule(port, &[&nth[..], &["-j", "DROP"]].concat());
    }

    /// Append an iptables rule for incoming SYNs to `port` in the server namespace.
    fn syn_rule(&self, port: u16, rule: &[&str]) {
        let port = port.to_string();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.b, "iptables-legacy", "-A", "INPUT"])
            .args(["-p", "tcp", "--syn", "--dport", &port])
            .args(rule)
            .output()
            .expect("run iptables");
        assert!(
            out.status.success(),
            "iptables: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // Deleting the namespaces deletes the veth pair and the iptables rules with them.
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A bash that connects to an address when told to (through its /dev/tcp), optionally
/// started through a wrapper such as setpriv. Host and port are arguments, never part of
/// the script.
pub struct Connector {
    pub child: Child,
    stdin: Option<std::process::ChildStdin>,
}

impl Connector {
    pub fn spawn(wrapper: &[&str], addr: SocketAddr) -> Connector {
        let script = "read -r _; exec 3<>\"/dev/tcp/$1/$2\"; read -r _";
        let (program, args) = match wrapper.split_first() {
            Some((first, rest)) => (*first, rest.to_vec()),
            None => ("bash", Vec::new()),
        };
        let mut cmd = Command::new(program);
        cmd.args(args);
        if !wrapper.is_empty() {
            cmd.arg("bash");
        }
        let mut child = cmd
            .args([
                "-c",
                script,
                "bash",
                &addr.ip().to_string(),
                &addr.port().to_string(),
            ])
            .stdin(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn bash");
        let stdin = child.stdin.take();
        Connector { child, stdin }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Connect now.
    pub fn go(&mut self) {
        use std::io::Write;
        writeln!(self.stdin.as_mut().unwrap()).unwrap();
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port on 127.0.0.1 with nothing listening: connects to it are refused.
pub fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

impl NetPair {
    /// In the server namespace, answer SYNs to `port` with an ICMP host-unreachable.
    pub fn reject_syns(&self, port: u16) {
        let port = port.to_string();
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.b,
                "iptables-legacy",
                "-A",
                "INPUT",
                "-p",
                "tcp",
                "--syn",
            ])
            .args([
                "--dport",
                &port,
                "-j",
                "REJECT",
                "--reject-with",
                "icmp-host-unreachable",
            ])
            .output()
            .expect("run iptables");
        assert!(
            out.status.success(),
            "iptables: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// How many SYNs the rule of [`NetPair::reject_syns`] has rejected: the kernel's own
    /// count of a connect's first SYN and its retransmits.
    pub fn rejected_syns(&self) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.b, "iptables-legacy"])
            .args(["-L", "INPUT", "-v", "-n", "-x"])
            .output()
            .expect("run iptables");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("REJECT"))
            .unwrap_or_else(|| panic!("no REJECT rule in: {text}"));
        line.split_whitespace().next().unwrap().parse().unwrap()
    }
}

/// This process's pid, as an argument.
pub fn me() -> String {
    std::process::id().to_string()
}

/// A process's anonymous resident memory (its heap and stacks: not the pages of its
/// binary, which fault in as code paths first run, nor shared buffers), kB.
pub fn rss_anon_kb(pid: u32) -> u64 {
    proc_status_field_kb(pid, "RssAnon:").unwrap_or_else(|| {
        // Before 4.5 status has no RssAnon: resident less shared pages, from statm.
        let statm = fs::read_to_string(format!("/proc/{pid}/statm")).unwrap();
        let pages: Vec<u64> = statm
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        (pages[1] - pages[2]) * 4
    })
}

fn proc_status_field_kb(pid: u32, field: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// A tracer started with `--serve 127.0.0.1:0`, and the address it serves on.
pub fn serving(args: &[&str]) -> (Tracer, SocketAddr) {
    let mut all = vec!["--serve", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let tracer = Tracer::start(&all);
    let said = |s: &str| s.contains("serving Prometheus metrics at http");
    let stderr = tracer.stderr_until(Duration::from_secs(10), said);
    let addr = stderr
        .lines()
        .find_map(|l| l.split("://").nth(1)?.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no address in: {stderr}"))
        .parse()
        .unwrap();
    (tracer, addr)
}

/// GET /metrics, as Prometheus would (the text format).
pub fn scrape(addr: SocketAddr) -> String {
    ureq::get(&format!("http://{addr}/metrics"))
        .call()
        .unwrap_or_else(|e| panic!("scraping {addr}: {e}"))
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// The value of the sample `series` (name and labels, as printed) in a scrape, if any.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// Ports below the kernel's ephemeral range (those are never label values) where nothing
/// listens: a connect there is refused.
pub fn closed_service_ports(n: usize) -> Vec<u16> {
    (29000..30000)
        .filter(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        .take(n)
        .collect()
}

/// A listener on a port below the kernel's ephemeral range.
pub fn listen_on_a_service_port() -> SocketAddr {
    (20000..29000)
        .find_map(|port| TcpListener::bind(("127.0.0.1", port)).ok())
        .map(|l| {
            let local = l.local_addr().unwrap();
            thread::spawn(move || for _ in l.incoming() {});
            local
        })
        .expect("a free port between 20000 and 29000")
}

/// How many connects with `outcome` to `dest` a scrape counts.
pub fn served_count(text: &str, outcome: &str, dest: &str) -> f64 {
    let series = format!(
        "tcpconnlat_connect_duration_seconds_count{{outcome=\"{outcome}\",dest=\"{dest}\"}}"
    );
    sample(text, &series).unwrap_or(0.0)
}

/// Scrape until `done` says the counts are in (the stream drains every 20 ms).
pub fn scrape_until(addr: SocketAddr, done: impl Fn(&str) -> bool) -> String {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(addr);
        if done(&text) || Instant::now() > end {
            return text;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// What `--features --json` says of this kernel.
pub fn features() -> Value {
    let (status, out, err) = run(&["--features", "--json"]);
    assert!(status.success(), "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Whether `--features` calls `mode` usable.
pub fn usable(f: &Value, mode: &str) -> bool {
    f["plan"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["mode"] == mode && s["usable"] == true)
}

/// Whether legacy mode can trace through tracefs kprobes here; where it cannot, asking for
/// it must be one clear error, which this asserts.
pub fn legacy_through_tracefs(f: &Value) -> bool {
    if usable(f, "legacy") && f["kprobe_events"] == true {
        return true;
    }
    let (status, _, err) = run(&["--legacy", "--kprobe-attach", "tracefs", "-d", "1"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("tcpconnlat: cannot trace in legacy mode"),
        "{err}"
    );
    false
}

/// A cgroup v2 directory of our own, with a process in it; removed on drop.
pub struct TestCgroup {
    pub dir: std::path::PathBuf,
    mounted: Option<tempfile::TempDir>,
}

impl TestCgroup {
    pub fn new() -> TestCgroup {
        TestCgroup::named(&format!("tcpconnlat-test-{}", std::process::id()))
    }

    /// Whether the kernel has cgroup v2 at all (Linux 4.5+).
    pub fn supported() -> bool {
        fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("\tcgroup2\n"))
    }

    /// One named `name` under the cgroup v2 root (mounted for the while if it is not).
    pub fn named(name: &str) -> TestCgroup {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let existing = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(2) == Some(&"cgroup2"))
            .map(|f| std::path::PathBuf::from(f[1]));
        let (root, mounted) = match existing {
            Some(root) => (root, None),
            None => {
                let dir = tempfile::tempdir().unwrap();
                let status = std::process::Command::new("mount")
                    .args(["-t", "cgroup2", "none"])
                    .arg(dir.path())
                    .status()
                    .unwrap();
                assert!(status.success(), "mounting cgroup2");
                (dir.path().to_owned(), Some(dir))
            }
        };
        let dir = root.join(name);
        std::fs::create_dir(&dir).unwrap();
        TestCgroup { dir, mounted }
    }

    pub fn adopt(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(dir) = &self.mounted {
            let _ = std::process::Command::new("umount")
                .arg(dir.path())
                .status();
        }
    }
}
