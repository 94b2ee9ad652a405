//! The real tracer on the real kernel: real sockets on loopback and across a veth pair
//! between two network namespaces, checked field by field from --json output.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use serde_json::Value;
use support::*;

/// The mode events must name: the one under test, or else the one auto picks here, from
/// the tracer's own report (checked against the kernel's files in `features_tell_the_truth`).
fn auto_mode() -> String {
    if let Some(mode) = test_mode() {
        return mode;
    }
    let (status, out, err) = run(&["--features", "--json"]);
    assert!(status.success(), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["auto"].as_str().expect("auto picks a mode").to_owned()
}

/// The single event for the connect from local port `lport` to `dport`.
fn only_event(events: &[Value], lport: u16, dport: u16) -> &Value {
    let matching: Vec<_> = events
        .iter()
        .filter(|e| e["lport"] == lport && e["dport"] == dport)
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "connect :{lport} -> :{dport} in {events:#?}"
    );
    matching[0]
}

fn has_connect(events: &[Value], lport: u16, dport: u16) -> bool {
    events
        .iter()
        .any(|e| e["lport"] == lport && e["dport"] == dport)
}

fn assert_event(e: &Value, pid: u32, comm: &str, af: u8, saddr: &str, daddr: &str, mode: &str) {
    assert_eq!(e["pid"], pid, "{e}");
    assert_eq!(e["comm"], comm, "{e}");
    assert_eq!(e["af"], af, "{e}");
    assert_eq!(e["saddr"], saddr, "{e}");
    assert_eq!(e["daddr"], daddr, "{e}");
    assert_eq!(e["mode"], mode, "{e}");
    let lat_us = e["lat_us"].as_f64().unwrap();
    // A fresh veth may lose the first SYN (one ~1 s retransmit); accuracy itself is
    // checked where the delay is known (min_ms_keeps_only_connects_slower_than_it).
    assert!(lat_us > 0.0 && lat_us < 10e6, "{e}");
    assert!(
        (e["lat_ms"].as_f64().unwrap() * 1e3 - lat_us).abs() < 1e-6,
        "{e}"
    );
    assert!(e["ts_us"].as_u64().unwrap() > 0, "{e}");
}

/// Events until every (lport, dport) was seen, plus a moment to catch duplicates.
fn collect(tracer: &Tracer, wanted: &[(u16, u16)]) -> Vec<Value> {
    let mut events = tracer.events_until(Duration::from_secs(10), |ev| {
        wanted.iter().all(|&(l, d)| has_connect(ev, l, d))
    });
    events.extend(
        tracer
            .lines_for(Duration::from_millis(300))
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()),
    );
    events
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn loopback_connects_ipv4_and_ipv6_are_each_reported_once() {
    loopback_connects_are_each_reported_once(&[]);
}

/// Kernels whose state tracepoint record is not `struct state_record` have it read field
/// by field at its format file's offsets: that path, forced here, gives the same events.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn the_record_read_at_its_offsets_gives_the_same_events() {
    loopback_connects_are_each_reported_once(&["--record-offsets"]);
}

fn loopback_connects_are_each_reported_once(args: &[&str]) {
    let _serial = serial();
    let mode = auto_mode();
    let me = std::process::id();
    let me_arg = me.to_string();
    let tracer = Tracer::start(&[&["--json", "-p", &me_arg], args].concat());
    let comm = own_comm();
    let (v4, v6) = (listen("127.0.0.1:0"), listen("[::1]:0"));
    let connects: Vec<(u16, SocketAddr)> =
        [v4, v4, v6, v6].iter().map(|&a| (connect(a), a)).collect();
    let wanted: Vec<_> = connects.iter().map(|(l, a)| (*l, a.port())).collect();
    let events = collect(&tracer, &wanted);
    for (lport, addr) in &connects {
        let e = only_event(&events, *lport, addr.port());
        let (af, ip) = if addr.is_ipv4() {
            (4, "127.0.0.1")
        } else {
            (6, "::1")
        };
        assert_event(e, me, &comm, af, ip, ip, &mode);
    }
    assert!(tracer.interrupt().success());
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn the_perf_buffer_transport_delivers_the_same_events() {
    let _serial = serial();
    let mode = auto_mode();
    let me = std::process::id();
    let tracer = Tracer::start(&["--json", "--transport", "perfbuf", "-p", &me.to_string()]);
    assert!(tracer.stderr.lock().unwrap().contains("(perf buffer)"));
    let comm = own_comm();
    let server = listen("127.0.0.1:0");
    let lports: Vec<u16> = (0..3).map(|_| connect(server)).collect();
    let wanted: Vec<_> = lports.iter().map(|&l| (l, server.port())).collect();
    let events = collect(&tracer, &wanted);
    for lport in lports {
        let e = only_event(&events, lport, server.port());
        assert_event(e, me, &comm, 4, "127.0.0.1", "127.0.0.1", &mode);
    }
    assert!(tracer.interrupt().success());
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn an_ipv4_mapped_connect_on_an_ipv6_socket_is_reported_once() {
    let _serial = serial();
    let mode = auto_mode();
    let me = std::process::id();
    let tracer = Tracer::start(&["--json", "-p", &me.to_string()]);
    let comm = own_comm();
    // A dual-stack listener, reached through an IPv6 socket with an IPv4-mapped address:
    // the kernel goes through tcp_v6_connect and then tcp_v4_connect.
    let server = listen("[::]:0");
    let mapped: SocketAddr = format!("[::ffff:127.0.0.1]:{}", server.port())
        .parse()
        .unwrap();
    let lport = connect(mapped);
    let events = collect(&tracer, &[(lport, server.port())]);
    let e = only_event(&events, lport, server.port());
    assert_event(
        e,
        me,
        &comm,
        6,
        "::ffff:127.0.0.1",
        "::ffff:127.0.0.1",
        &mode,
    );
    assert!(tracer.interrupt().success());
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn connects_across_a_veth_pair_carry_the_namespace_addresses() {
    let _serial = serial();
    let mode = auto_mode();
    let net = NetPair::new();
    let me = std::process::id();
    let tracer = Tracer::start(&["--json", "-p", &me.to_string()]);
    let (s4, s6) = (net.server_v4(), net.server_v6());
    let servers = NetPair::within(&net.b, move || {
        (listen(&format!("{s4}:0")), listen(&format!("[{s6}]:0")))
    });
    let mut seen = Vec::new();
    for server in [servers.0, servers.1] {
        let (lport, comm) = NetPair::within(&net.a, move || (connect(server), own_comm()));
        seen.push((lport, server, comm));
    }
    let wanted: Vec<_> = seen.iter().map(|(l, a, _)| (*l, a.port())).collect();
    let events = collect(&tracer, &wanted);
    for (lport, server, comm) in &seen {
        let e = only_event(&events, *lport, server.port());
        if server.is_ipv4() {
            assert_event(e, me, comm, 4, &net.client_v4(), &net.server_v4(), &mode);
        } else {
            assert_event(e, me, comm, 6, &net.client_v6(), &net.server_v6(), &mode);
        }
    }
    assert!(tracer.interrupt().success());
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn ipv4_and_ipv6_flags_filter_by_family() {
    let _serial = serial();
    let me = std::process::id().to_string();
    let (v4, v6) = (listen("127.0.0.1:0"), listen("[::1]:0"));
    for (flag, kept, dropped) in [("-4", v4, v6), ("-6", v6, v4)] {
        let tracer = Tracer::start(&["--json", "-p", &me, flag]);
        let gone = connect(dropped);
        let kept_port = connect(kept);
        let events = collect(&tracer, &[(kept_port, kept.port())]);
        only_event(&events, kept_port, kept.port());
        assert!(
            !has_connect(&events, gone, dropped.port()),
            "{flag} let through {events:#?}"
        );
        assert!(tracer.interrupt().success());
    }
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn count_ends_the_trace_after_n_events() {
    let _serial = serial();
    let me = std::process::id();
    let mut tracer = Tracer::start(&["--json", "-c", "2", "-p", &me.to_string()]);
    let server = listen("127.0.0.1:0");
    for _ in 0..3 {
        connect(server);
    }
    assert!(tracer.wait().success());
    let events = tracer.events_until(Duration::from_secs(2), |_| false);
    assert_eq!(events.len(), 2, "{events:#?}");
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn duration_ends_the_trace() {
    let _serial = serial();
    let started = std::time::Instant::now();
    let mut tracer = Tracer::start(&["--json", "-d", "1"]);
    assert!(tracer.wait().success());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(8),
        "{took:?}"
    );
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn min_ms_keeps_only_connects_slower_than_it() {
    let _serial = serial();
    let net = NetPair::new();
    let me = std::process::id();
    let s4 = net.server_v4();
    let slow_server = NetPair::within(&net.b, move || listen(&format!("{s4}:0")));
    // The first SYN is dropped: the connect completes on the retransmit, ~1 s later.
    net.drop_syns(slow_server.port(), true);
    let tracer = Tracer::start(&["--json", "-p", &me.to_string(), "500"]);
    let fast_server = listen("127.0.0.1:0");
    let fast = connect(fast_server);
    let (slow, took) = NetPair::within(&net.a, move || timed(|| connect(slow_server)));
    let events = collect(&tracer, &[(slow, slow_server.port())]);
    let e = only_event(&events, slow, slow_server.port());
    // Accuracy: the SYN-ACK comes one initial RTO (1 s, RFC 6298) after the first SYN,
    // plus a round trip across the veth.
    assert_latency(e, took, 1000.0);
    assert!(
        !has_connect(&events, fast, fast_server.port()),
        "fast connect shown: {events:#?}"
    );
    assert!(tracer.interrupt().success());
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn pid_filter_shows_only_that_process() {
    let _serial = serial();
    let server = listen("127.0.0.1:0");
    // A bash that connects when told to, through its /dev/tcp; the port is an argument,
    // never part of the script.
    let mut child = Command::new("bash")
        .args([
            "-c",
            "read -r _; exec 3<>/dev/tcp/127.0.0.1/\"$1\"; read -r _",
            "bash",
        ])
        .arg(server.port().to_string())
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn bash");
    let pid = child.id();
    let tracer = Tracer::start(&["--json", "-p", &pid.to_string()]);
    let mine = connect(server);
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin).unwrap();
    let events = tracer.events_until(Duration::from_secs(10), |ev| {
        ev.iter().any(|e| e["pid"] == pid)
    });
    drop(stdin);
    let _ = child.wait();
    let theirs: Vec<_> = events.iter().filter(|e| e["pid"] == pid).collect();
    assert_eq!(theirs.len(), 1, "{events:#?}");
    assert_eq!(theirs[0]["comm"], "bash");
    assert_eq!(theirs[0]["dport"], server.port());
    assert!(
        !has_connect(&events, mine, server.port()),
        "own connect shown: {events:#?}"
    );
    assert!(events.iter().all(|e| e["pid"] == pid), "{events:#?}");
    assert!(tracer.interrupt().success());
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn a_connect_that_never_completes_leaves_no_map_entry() {
    let _serial = serial();
    let net = NetPair::new();
    let me = std::process::id();
    let server: SocketAddr = format!("{}:9", net.server_v4()).parse().unwrap();
    net.drop_syns(server.port(), false);
    let tracer = Tracer::start(&["--json", "-p", &me.to_string()]);
    assert_eq!(tracer.map_entries("pending"), 0);
    let a = net.a.clone();
    let attempt = thread::spawn(move || {
        NetPair::within(&a, move || {
            std::net::TcpStream::connect_timeout(&server, Duration::from_millis(1500)).is_err()
        })
    });
    thread::sleep(Duration::from_millis(500));
    // While the SYN goes unanswered the connect is pending: the check below can fail.
    assert_eq!(tracer.map_entries("pending"), 1);
    assert!(attempt.join().unwrap(), "the SYN was answered");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        tracer.map_entries("pending"),
        0,
        "entry leaked after the socket closed"
    );
    // It is reported once, as what it was.
    let events = tracer.events_until(Duration::from_secs(2), |ev| !ev.is_empty());
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["outcome"], "timeout", "{events:#?}");
    assert!(tracer.interrupt().success());
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn exiting_releases_every_bpf_object() {
    let _serial = serial();
    let tracer = Tracer::start(&["--json"]);
    let held = tracer.held_maps();
    assert!(!held.is_empty(), "{held:?}");
    assert!(tracer.interrupt().success());
    assert_eq!(held.left(), Vec::<String>::new(), "outlived the tracer");
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn a_connect_that_fails_before_its_syn_leaves_nothing() {
    let _serial = serial();
    let net = NetPair::new();
    let tracer = Tracer::start(&["--json", "-p", &std::process::id().to_string()]);
    // Namespace a has no route to TEST-NET-1: connect() fails before any packet is sent.
    let nowhere: SocketAddr = "192.0.2.1:80".parse().unwrap();
    let err = NetPair::within(&net.a, move || {
        std::net::TcpStream::connect_timeout(&nowhere, Duration::from_secs(2))
            .unwrap_err()
            .raw_os_error()
    });
    assert_eq!(err, Some(101), "ENETUNREACH expected");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(tracer.map_entries("pending"), 0, "entry leaked");
    let events = tracer.lines_for(Duration::from_millis(300));
    assert!(events.is_empty(), "{events:#?}");
    assert!(tracer.interrupt().success());
}
