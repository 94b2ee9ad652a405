//! What only trying can tell: whether the kernel loads and attaches an fentry program,
//! whether it has a BPF ring buffer, whether it runs a program on demand, and whether it
//! takes kprobes on the functions we hook by their own names.

use std::os::fd::OwnedFd;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use libbpf_rs::MapType;
use tcpconnlat_compat::btf::FunctionIds;
use tcpconnlat_compat::{AttachPoints, Features, Finding, Func};

/// A BPF ring buffer map can be created (Linux 5.8+).
pub fn ringbuf() -> Finding<()> {
    match MapType::RingBuf.is_supported() {
        Ok(true) => Finding::Yes(()),
        Ok(false) => Finding::No("no BPF ring buffer (Linux 5.8+)".to_owned()),
        Err(e) => Finding::Unknown(e.to_string()),
    }
}

/// r0 = `value`; exit.
fn return_value(value: i32) -> [libbpf_rs::libbpf_sys::bpf_insn; 2] {
    use libbpf_rs::libbpf_sys as sys;
    [
        sys::bpf_insn {
            code: (sys::BPF_ALU64 | sys::BPF_MOV | sys::BPF_K) as u8,
            imm: value,
            ..Default::default()
        },
        sys::bpf_insn {
            code: (sys::BPF_JMP | sys::BPF_EXIT) as u8,
            ..Default::default()
        },
    ]
}

/// Load a raw tracepoint program (Linux 4.17, commit c4f6699dfcb8 "bpf: introduce
/// BPF_RAW_TRACEPOINT") and run it on demand with one argument (Linux 5.10, commit
/// 1b4d60ec162f "bpf: Enable BPF_PROG_TEST_RUN for raw_tracepoint"): what the sweeper does
/// to ask about a pending connect.
pub fn on_demand() -> Finding<()> {
    use libbpf_rs::libbpf_sys as sys;
    use std::os::fd::{AsRawFd, FromRawFd};
    const ANSWER: u32 = 7;
    let insns = return_value(ANSWER as i32);
    // SAFETY: every pointer is valid for the call; libbpf returns a new fd or -errno.
    let prog = unsafe {
        sys::bpf_prog_load(
            sys::BPF_PROG_TYPE_RAW_TRACEPOINT,
            c"trial_on_demand".as_ptr(),
            c"Dual BSD/GPL".as_ptr(),
            insns.as_ptr(),
            insns.len() as sys::size_t,
            std::ptr::null_mut(),
        )
    };
    if prog < 0 {
        let e = std::io::Error::from_raw_os_error(-prog);
        return Finding::No(format!("no raw tracepoint programs (Linux 4.17+): {e}"));
    }
    // SAFETY: a descriptor just created, owned by nothing else.
    let prog = unsafe { std::os::fd::OwnedFd::from_raw_fd(prog) };
    match crate::tracer::run_on_demand(prog.as_raw_fd(), 0) {
        Ok(ANSWER) => Finding::Yes(()),
        Ok(other) => Finding::No(format!("the trial program returned {other}, not {ANSWER}")),
        Err(e) => Finding::No(format!(
            "the kernel does not run a program on demand (BPF_PROG_TEST_RUN of raw tracepoints, Linux 5.10+): {e}"
        )),
    }
}

/// The fentry trial's attach, made on a thread of its own: on Linux 6.1 the first fentry
/// program attached while the system has none waits for an RCU tasks grace period, far
/// longer while an earlier tcpconnlat's teardown is still in flight: a sleep that the
/// probes' load can go on beside (see [`PATIENCE`]).
pub enum FentryAttach {
    /// Under way: the link, or why the kernel refused it, once made. Dropped before, the
    /// link is dropped once made.
    Pending(Receiver<Result<OwnedFd, String>>),
    /// Attached; the link detaches it when dropped.
    Attached {
        _link: OwnedFd,
    },
    Refused(String),
    /// No trial, or the trials have ended.
    None,
}

/// How long detection waits for the trial's attach before the probes load beside it. With
/// no grace period in flight the attach is quick, and a load running meanwhile would only
/// make it slower (an RCU tasks grace period waits for every runnable task); queued behind
/// an earlier instance's teardown it is slow, and the load hides it.
pub const PATIENCE: Duration = Duration::from_millis(60);

impl FentryAttach {
    /// Wait for the attach: whether the kernel attached the trial's program, or why not.
    pub fn wait(&mut self) -> Result<(), String> {
        self.settle(None)
    }

    /// Wait for the attach `patience` at most: why the kernel refused it, if it did by
    /// then.
    pub fn wait_at_most(&mut self, patience: Duration) -> Result<(), String> {
        self.settle(Some(patience))
    }

    fn settle(&mut self, patience: Option<Duration>) -> Result<(), String> {
        if let FentryAttach::Pending(outcome) = self {
            let outcome = match patience {
                None => outcome.recv().ok(),
                Some(patience) => match outcome.recv_timeout(patience) {
                    Err(RecvTimeoutError::Timeout) => return Ok(()),
                    outcome => outcome.ok(),
                },
            };
            *self = match outcome {
                Some(Ok(link)) => FentryAttach::Attached { _link: link },
                Some(Err(why)) => FentryAttach::Refused(why),
                None => FentryAttach::Refused("the trial's thread gave no answer".to_owned()),
            };
        }
        match self {
            FentryAttach::Attached { .. } | FentryAttach::Pending(_) => Ok(()),
            FentryAttach::Refused(why) => Err(why.clone()),
            FentryAttach::None => Err("no fentry trial was made".to_owned()),
        }
    }
}

/// Where the fentry trial attaches: a function no mode hooks with fentry, so that loading
/// the probes does not wait for the trial's attach (the verifier takes the target's
/// trampoline lock, which an attach holds while it sleeps), and one that connects do not
/// go through; tcp_v4_connect where the kernel's BTF lacks it.
pub fn fentry_target(ids: &FunctionIds) -> Option<u32> {
    ids.get(Func::TcpReset)
        .or_else(|| ids.get(Func::TcpV4Connect))
}

/// Load a two-instruction fentry program on `target` (see [`fentry_target`]) and start
/// attaching it (see [`FentryAttach`]).
pub fn fentry(features: &Features, target: Option<u32>) -> Result<FentryAttach, String> {
    use libbpf_rs::libbpf_sys as sys;
    use std::os::fd::FromRawFd;
    if !features.btf {
        return Err("no kernel BTF".to_owned());
    }
    let id = target.ok_or("neither tcp_reset nor tcp_v4_connect is in the kernel's BTF")?;
    let insns = return_value(0);
    let mut opts = sys::bpf_prog_load_opts {
        sz: std::mem::size_of::<sys::bpf_prog_load_opts>() as sys::size_t,
        expected_attach_type: sys::BPF_TRACE_FENTRY,
        attach_btf_id: id,
        ..Default::default()
    };
    // SAFETY: every pointer is valid for the call; libbpf returns a new fd or -errno.
    let prog = unsafe {
        sys::bpf_prog_load(
            sys::BPF_PROG_TYPE_TRACING,
            c"trial_fentry".as_ptr(),
            c"Dual BSD/GPL".as_ptr(),
            insns.as_ptr(),
            insns.len() as sys::size_t,
            &mut opts,
        )
    };
    if prog < 0 {
        return Err(std::io::Error::from_raw_os_error(-prog).to_string());
    }
    // SAFETY: a descriptor just created, owned by nothing else.
    let prog = unsafe { OwnedFd::from_raw_fd(prog) };
    let (answer, outcome) = mpsc::channel();
    super::in_background(move || drop(answer.send(attach_tracing(&prog))));
    Ok(FentryAttach::Pending(outcome))
}

/// Attach a loaded tracing program to its BTF target; the link, which detaches it when
/// dropped.
fn attach_tracing(prog: &OwnedFd) -> Result<OwnedFd, String> {
    use libbpf_rs::libbpf_sys as sys;
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: a null name attaches a tracing program to its BTF target; a new fd or
    // -errno.
    let link = unsafe { sys::bpf_raw_tracepoint_open(std::ptr::null(), prog.as_raw_fd()) };
    if link < 0 {
        let e = std::io::Error::from_raw_os_error(-link);
        return Err(format!("attach: {e}"));
    }
    // SAFETY: a descriptor just created, owned by nothing else; closing it detaches.
    Ok(unsafe { OwnedFd::from_raw_fd(link) })
}

/// The kprobe targets of `funcs` by their exact names, where the kernel takes a kprobe on
/// each (a
/// kprobe PMU event opened disabled: Linux 4.17+, commit e12f03d7031a "perf/core:
/// Implement the 'perf_kprobe' PMU"), with those events, to be closed once tracing (see
/// `Host::end_trials`). Far cheaper than reading /proc/kallsyms, which is only needed
/// where a name is missing (a GCC clone such as `tcp_v4_connect.isra.0`, or IPv6 not
/// loaded): `None` then.
pub fn exact_kprobe_targets(
    features: &Features,
    funcs: &[Func],
) -> Option<(AttachPoints, Vec<OwnedFd>)> {
    if !features.kprobe_pmu {
        return None;
    }
    let pmu: u32 = std::fs::read_to_string("/sys/bus/event_source/devices/kprobe/type")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let mut events = Vec::new();
    let points = AttachPoints::from_fn(|func| {
        if !funcs.contains(&func) {
            return None;
        }
        let event = kprobe_on(pmu, func.name())?;
        events.push(event);
        Some(func.name().to_owned())
    });
    if funcs.iter().all(|&func| points.get(func).is_some()) {
        return Some((points, events));
    }
    // Closing them waits for RCU grace periods: not on the way to tracing.
    super::in_background(move || drop(events));
    None
}

/// A disabled kprobe event of the kprobe PMU of type `pmu` on `symbol`, if it takes one.
fn kprobe_on(pmu: u32, symbol: &str) -> Option<OwnedFd> {
    use libbpf_rs::libbpf_sys as sys;
    use std::os::fd::FromRawFd;
    let name = std::ffi::CString::new(symbol).ok()?;
    let mut attr = sys::perf_event_attr {
        type_: pmu,
        size: std::mem::size_of::<sys::perf_event_attr>() as u32,
        ..Default::default()
    };
    attr.__bindgen_anon_3.kprobe_func = name.as_ptr() as u64;
    attr.set_disabled(1);
    // SAFETY: attr and the name it points at outlive the call; a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const sys::perf_event_attr,
            -1,
            0,
            -1,
            sys::PERF_FLAG_FD_CLOEXEC,
        )
    };
    // SAFETY: a descriptor just made, owned by nothing else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
