//! How connects end, and the filters: real connects that succeed, are refused, time out,
//! are unreachable or need a SYN retransmit, each asserted field by field.

mod support;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;
use support::*;

fn by_dport(events: &[Value], dport: u16) -> Vec<&Value> {
    events.iter().filter(|e| e["dport"] == dport).collect()
}

/// Can this run know a socket's errno? CO-RE modes always can (they need BTF); the others
/// need the offset of sk_err, from BTF or from kernel headers built in.
fn errno_known() -> bool {
    let (_, out, _) = run_as_tested(&["--features", "--json"]);
    let f: Value = serde_json::from_str(&out).unwrap();
    !f["sock_offsets"].is_null()
}

fn assert_errno(e: &Value, name: &str) {
    if errno_known() {
        assert_eq!(e["errno"], name, "{e}");
    } else {
        assert!(e["errno"].is_null() || e["errno"] == name, "{e}");
    }
}

/// A failed connect's socket has released its port by the time it moves to CLOSE: the
/// event's source port must come from what the socket still says of itself (inet_sport),
/// not from its bind (inet_num, 0 by then).
fn assert_source_port_kept(e: &Value) {
    assert!(e["lport"].as_u64().is_some_and(|p| p > 0), "{e}");
}

fn one_event(tracer: &Tracer, dport: u16) -> Value {
    let events = tracer.events_until(Duration::from_secs(15), |ev| {
        !by_dport(ev, dport).is_empty()
    });
    let mut more = events.clone();
    more.extend(
        tracer
            .lines_for(Duration::from_millis(300))
            .iter()
            .map(|l| serde_json::from_str(l).unwrap()),
    );
    let matching = by_dport(&more, dport);
    assert_eq!(matching.len(), 1, "{more:#?}");
    matching[0].clone()
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn a_refused_connect_is_reported_as_refused() {
    let _serial = serial();
    let tracer = Tracer::start(&["--json", "-p", &me()]);
    let closed = closed_port();
    let err = TcpStream::connect(closed).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let e = one_event(&tracer, closed.port());
    assert_eq!(e["outcome"], "refused", "{e}");
    assert_errno(&e, "ECONNREFUSED");
    assert_eq!(e["syn_retrans"], 0);
    assert_eq!(e["saddr"], "127.0.0.1");
    assert_source_port_kept(&e);
    let lat = e["lat_ms"].as_f64().unwrap();
    assert!(lat > 0.0 && lat < 1000.0, "{e}");
    assert!(tracer.interrupt().success());
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn an_unanswered_connect_is_a_timeout_with_its_retransmits() {
    let _serial = serial();
    let net = NetPair::new();
    let server: SocketAddr = format!("{}:7", net.server_v4()).parse().unwrap();
    net.drop_syns(server.port(), false);
    let tracer = Tracer::start(&["--json", "-p", &me()]);
    // The SYN is retransmitted after the 1 s initial RTO; the caller gives up at 1.6 s.
    let (gave_up, took) = NetPair::within(&net.a, move || {
        timed(|| TcpStream::connect_timeout(&server, Duration::from_millis(1600)).is_err())
    });
    assert!(gave_up);
    let e = one_event(&tracer, server.port());
    assert_eq!(e["outcome"], "timeout", "{e}");
    assert_eq!(e["syn_retrans"], 1, "{e}");
    assert_latency(&e, took, 1600.0);
    assert_eq!(e["daddr"], net.server_v4());
    assert_source_port_kept(&e);
    assert!(tracer.interrupt().success());
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn a_dropped_first_syn_shows_one_retransmit_and_a_second_of_latency() {
    let _serial = serial();
    let net = NetPair::new();
    let s4 = net.server_v4();
    let server = NetPair::within(&net.b, move || listen(&format!("{s4}:0")));
    net.drop_syns(server.port(), true);
    let tracer = Tracer::start(&["--json", "-p", &me()]);
    let (_, took) = NetPair::within(&net.a, move || timed(|| connect(server)));
    let e = one_event(&tracer, server.port());
    assert_eq!(e["outcome"], "established", "{e}");
    assert_eq!(e["syn_retrans"], 1, "{e}");
    assert!(e["errno"].is_null(), "{e}");
    // One initial RTO (1 s, RFC 6298).
    assert_latency(&e, took, 1000.0);
    assert!(tracer.interrupt().success());
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn an_icmp_host_unreachable_is_reported_as_unreachable() {
    let _serial = serial();
    let net = NetPair::new();
    let server: SocketAddr = format!("{}:8", net.server_v4()).parse().unwrap();
    net.reject_syns(server.port());
    let tracer = Tracer::start(&["--json", "-p", &me()]);
    // An ICMP that comes back while connect() still holds the socket is kept as a soft
    // error and the SYN is sent again; the next one (after the 1 s RTO) ends it. Where the
    // first arrives after connect() let go of the socket (RHEL 7's 3.10 does so at times),
    // it ends the connect at once. The rule's counter says which.
    let (err, took) = NetPair::within(&net.a, move || {
        timed(|| TcpStream::connect(server).unwrap_err().raw_os_error())
    });
    assert_eq!(err, Some(113), "EHOSTUNREACH expected");
    let e = one_event(&tracer, server.port());
    let retransmits = net.rejected_syns() - 1;
    assert_eq!(e["syn_retrans"], retransmits, "{e}");
    assert_latency(&e, took, if retransmits > 0 { 1000.0 } else { 0.0 });
    if errno_known() {
        assert_eq!(e["outcome"], "unreachable", "{e}");
        assert_eq!(e["errno"], "EHOSTUNREACH", "{e}");
    } else {
        // Without sk_err only RSTs are told apart: an ICMP error looks like no answer.
        assert_eq!(e["outcome"], "timeout", "{e}");
    }
    assert!(tracer.interrupt().success());
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn failed_and_established_flags_split_the_outcomes() {
    let _serial = serial();
    for (flag, shown) in [("--failed", "refused"), ("--established", "established")] {
        let tracer = Tracer::start(&["--json", "-p", &me(), flag]);
        let (server, closed) = (listen("127.0.0.1:0"), closed_port());
        let _ = TcpStream::connect(closed);
        connect(server);
        // A last connect of the kind the flag shows: once it is seen, so is all before it.
        let last = if shown == "refused" {
            closed_port()
        } else {
            listen("127.0.0.1:0")
        };
        let _ = TcpStream::connect(last);
        let events = tracer.events_until(Duration::from_secs(10), |ev| {
            !by_dport(ev, last.port()).is_empty()
        });
        let kept = if shown == "refused" { closed } else { server };
        let hidden = if shown == "refused" { server } else { closed };
        assert_eq!(
            by_dport(&events, kept.port()).len(),
            1,
            "{flag}: {events:#?}"
        );
        assert!(
            by_dport(&events, hidden.port()).is_empty(),
            "{flag}: {events:#?}"
        );
        assert!(
            events.iter().all(|e| e["outcome"] == shown),
            "{flag}: {events:#?}"
        );
        assert!(tracer.interrupt().success());
    }
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn dport_filter_keeps_only_those_ports() {
    let _serial = serial();
    let (a, b, c) = (
        listen("127.0.0.1:0"),
        listen("127.0.0.1:0"),
        listen("127.0.0.1:0"),
    );
    let ports = format!("{},{}", a.port(), c.port());
    let tracer = Tracer::start(&["--json", "-p", &me(), "--dport", &ports]);
    connect(b);
    connect(a);
    connect(c);
    let events = tracer.events_until(Duration::from_secs(10), |ev| {
        !by_dport(ev, c.port()).is_empty()
    });
    let events: Vec<_> = events
        .into_iter()
        .chain(
            tracer
                .lines_for(Duration::from_millis(200))
                .iter()
                .map(|l| serde_json::from_str(l).unwrap()),
        )
        .collect();
    assert_eq!(by_dport(&events, a.port()).len(), 1, "{events:#?}");
    assert_eq!(by_dport(&events, c.port()).len(), 1, "{events:#?}");
    assert!(by_dport(&events, b.port()).is_empty(), "{events:#?}");
    assert!(tracer.interrupt().success());
}

/// Run `tracer_args`, make the connector and this process connect, and return the events:
/// the connector's connect must be the only one shown.
fn only_the_connector(tracer_args: &[&str], mut connector: Connector, server: SocketAddr) -> Value {
    let tracer = Tracer::start(tracer_args);
    let own = connect(server);
    connector.go();
    let pid = connector.pid();
    let events = tracer.events_until(Duration::from_secs(10), |ev| {
        ev.iter().any(|e| e["pid"] == pid)
    });
    let theirs: Vec<_> = events.iter().filter(|e| e["pid"] == pid).collect();
    assert_eq!(theirs.len(), 1, "{events:#?}");
    assert!(
        !events.iter().any(|e| e["lport"] == own),
        "own connect shown: {events:#?}"
    );
    assert!(events.iter().all(|e| e["pid"] == pid), "{events:#?}");
    let e = theirs[0].clone();
    assert!(tracer.interrupt().success());
    e
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn comm_filter_keeps_only_that_process_name() {
    let _serial = serial();
    let server = listen("127.0.0.1:0");
    let connector = Connector::spawn(&[], server);
    let e = only_the_connector(
        &[
            "--json",
            "--comm",
            "bash",
            "--dport",
            &server.port().to_string(),
        ],
        connector,
        server,
    );
    assert_eq!(e["comm"], "bash");
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn uid_filter_keeps_only_that_user() {
    let _serial = serial();
    let server = listen("127.0.0.1:0");
    let connector = Connector::spawn(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        server,
    );
    let e = only_the_connector(
        &[
            "--json",
            "-u",
            "65534",
            "--dport",
            &server.port().to_string(),
        ],
        connector,
        server,
    );
    assert_eq!(e["uid"], 65534);
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn several_pids_can_be_traced_at_once() {
    let _serial = serial();
    let server = listen("127.0.0.1:0");
    let mut a = Connector::spawn(&[], server);
    let mut b = Connector::spawn(&[], server);
    let other = Connector::spawn(&[], server);
    let pids = format!("{},{}", a.pid(), b.pid());
    let tracer = Tracer::start(&["--json", "-p", &pids]);
    let mut other = other;
    other.go();
    a.go();
    b.go();
    let (pa, pb) = (a.pid(), b.pid());
    let events = tracer.events_until(Duration::from_secs(10), |ev| {
        ev.iter().any(|e| e["pid"] == pa) && ev.iter().any(|e| e["pid"] == pb)
    });
    let events: Vec<_> = events
        .into_iter()
        .chain(
            tracer
                .lines_for(Duration::from_millis(300))
                .iter()
                .map(|l| serde_json::from_str(l).unwrap()),
        )
        .collect();
    assert_eq!(events.len(), 2, "{events:#?}");
    assert!(!events.iter().any(|e| e["pid"] == other.pid()));
    assert!(tracer.interrupt().success());
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn cgroup_filter_keeps_only_processes_in_it() {
    let _serial = serial();
    let server = listen("127.0.0.1:0");
    if !TestCgroup::supported() {
        // No cgroup v2 (before 4.5): any directory is refused, checked before a mode is.
        let (status, _, err) = run_as_tested(&["--cgroup", "/tmp", "-d", "1"]);
        assert_eq!(status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("is not in a cgroup v2 hierarchy"), "{err}");
        return;
    }
    let cgroup = TestCgroup::new();
    let connector = Connector::spawn(&[], server);
    cgroup.adopt(connector.pid());
    let path = cgroup.dir.to_str().unwrap().to_owned();
    if !cgroup_ids_known(&cgroup.dir) {
        // Checked with the other filters, before any mode is chosen.
        let (status, _, err) = run_as_tested(&["--cgroup", &path, "-d", "1"]);
        assert_eq!(status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("CONFIG_FHANDLE"), "{err}");
        return;
    }
    if test_mode().as_deref() == Some("legacy") {
        // Legacy mode does without the helper (Linux 4.18+): the user is told so.
        let (status, _, err) = run_as_tested(&["--legacy", "--cgroup", &path, "-d", "1"]);
        assert_eq!(status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("--cgroup needs a helper legacy mode does without"),
            "{err}"
        );
        return;
    }
    let e = only_the_connector(&["--json", "--cgroup", &path], connector, server);
    assert_eq!(e["comm"], "bash");
}

/// Whether userspace can learn the id the kernel gives a cgroup: the inode number from
/// Linux 5.5; before, only through a file handle (kernels built without CONFIG_FHANDLE,
/// as the matrix's 4.14 and 5.4 are, have none).
fn cgroup_ids_known(dir: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>());
    let (major, minor) = (
        numbers.next().unwrap().unwrap(),
        numbers.next().unwrap().unwrap(),
    );
    if (major, minor) >= (5, 5) {
        return true;
    }
    #[repr(C)]
    struct Handle {
        bytes: libc::c_uint,
        kind: libc::c_int,
        id: [u8; 8],
    }
    let mut handle = Handle {
        bytes: 8,
        kind: 0,
        id: [0; 8],
    };
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    let mut mount_id = 0;
    // SAFETY: a struct file_handle with room for the 8 bytes it says.
    unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            path.as_ptr(),
            (&raw mut handle).cast(),
            &mut mount_id,
            0,
        ) == 0
    }
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn a_path_that_is_not_a_cgroup_is_refused() {
    for path in ["/proc", "/nonexistent/cgroup"] {
        let (status, _, err) = run(&["--cgroup", path]);
        assert_eq!(status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with(&format!("tcpconnlat: --cgroup {path}")),
            "{err}"
        );
    }
}

/// Run the tracer with `args` until `connects` are made and it exits by -d; its stdout.
fn report_of(args: &[&str], connects: impl FnOnce()) -> String {
    let mut tracer = Tracer::start(args);
    connects();
    assert!(tracer.wait().success());
    tracer.lines_for(Duration::from_millis(200)).join("\n")
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn hist_counts_every_connect_in_log2_buckets() {
    let _serial = serial();
    let server = listen("127.0.0.1:0");
    let closed = closed_port();
    let out = report_of(&["--hist", "--by", "dest", "-d", "2", "-p", &me()], || {
        for _ in 0..5 {
            connect(server);
        }
        let _ = TcpStream::connect(closed);
    });
    assert!(
        out.contains(&format!("dest = 127.0.0.1:{}", server.port())),
        "{out}"
    );
    assert!(out.contains("usecs"), "{out}");
    // Five established connects in the buckets, the refused one counted apart.
    let counted: u64 = out
        .lines()
        .filter(|l| l.contains(" -> ") && l.contains('|'))
        .map(|l| {
            l.split(':')
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(counted, 5, "{out}");
    assert!(out.contains("failed connects: refused 1"), "{out}");
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn summary_gives_per_destination_counts_failures_and_percentiles() {
    let _serial = serial();
    let (a, b) = (listen("127.0.0.1:0"), listen("[::1]:0"));
    let closed = closed_port();
    let out = report_of(&["--summary", "--json", "-d", "2", "-p", &me()], || {
        for _ in 0..4 {
            connect(a);
        }
        connect(b);
        let _ = TcpStream::connect(closed);
    });
    let records: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(records.iter().all(|r| r["type"] == "summary"), "{out}");
    let find = |dest: String| {
        records
            .iter()
            .find(|r| r["dest"] == dest.as_str())
            .cloned()
            .unwrap()
    };
    let ra = find(format!("127.0.0.1:{}", a.port()));
    assert_eq!(
        (ra["count"].as_u64(), ra["failed"].as_u64()),
        (Some(4), Some(0)),
        "{ra}"
    );
    let (p50, p99, max) = (
        ra["p50_ms"].as_f64().unwrap(),
        ra["p99_ms"].as_f64().unwrap(),
        ra["max_ms"].as_f64().unwrap(),
    );
    assert!(
        0.0 < p50 && p50 <= p99 && p99 <= max && max < 1000.0,
        "{ra}"
    );
    assert_eq!(find(format!("[::1]:{}", b.port()))["count"], 1);
    let rc = find(format!("127.0.0.1:{}", closed.port()));
    assert_eq!(
        (rc["count"].as_u64(), rc["failed"].as_u64()),
        (Some(1), Some(1)),
        "{rc}"
    );
    assert_eq!(rc["failures"]["refused"], 1);
    assert!(rc["p50_ms"].is_null());
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn interval_prints_a_summary_every_period() {
    let _serial = serial();
    let server = listen("127.0.0.1:0");
    let out = report_of(
        &["--summary", "--interval", "0.5", "-d", "1.8", "-p", &me()],
        || {
            connect(server);
        },
    );
    // Three intervals and the final one, each with its header.
    let headers = out.lines().filter(|l| l.starts_with("DEST")).count();
    assert!((3..=4).contains(&headers), "{out}");
    // The connect is in exactly one of them: each period starts afresh.
    let rows = out
        .lines()
        .filter(|l| l.starts_with(&format!("127.0.0.1:{}", server.port())))
        .count();
    assert_eq!(rows, 1, "{out}");
}
