//! What the user sees when something is wrong, and what --features claims: every error is
//! one line that says what to do, with a non-zero exit and no backtrace.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::*;

fn assert_one_line_error(code: i32, status: std::process::ExitStatus, err: &str, needle: &str) {
    assert_eq!(status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("tcpconnlat: "), "{err:?}");
    assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err:?}"
    );
}

#[test]
fn bad_arguments_get_one_line_and_exit_2() {
    for (args, needle) in [
        (&["abc"][..], "MIN_MS must be a number"),
        (&["--", "-3"], "MIN_MS must be between"),
        (&["NaN"], "MIN_MS must be between"),
        (&["1e12"], "MIN_MS must be between"),
        (&["-p", "0"], "PID must be a positive"),
        (&["-p", "12abc"], "PID must be a positive"),
        (&["-p", "; rm -rf /"], "PID must be a positive"),
        (&["--duration=-1"], "SECS must be more than 0"),
        (&["-d", "soon"], "SECS must be a number"),
        (&["-c", "0"], "--count"),
        (&["--mode", "ebpf"], "--mode"),
        (&["-4", "-6"], "cannot be used with"),
        (&["--legacy", "--mode", "kprobe"], "cannot be used with"),
        (&["--no-such-flag"], "unexpected argument"),
    ] {
        let (status, _, err) = run(args);
        assert_one_line_error(2, status, &err, needle);
        assert!(err.contains("--help"), "{err:?}");
    }
}

/// A BTF header that promises more than the file holds.
fn truncated_btf(dir: &Path) -> std::path::PathBuf {
    let mut bytes = Vec::new();
    bytes.extend(0xeb9f_u16.to_le_bytes()); // magic
    bytes.extend([1, 0]); // version, flags
    for field in [24u32, 0, 4096, 4096, 100] {
        // hdr_len, type_off, type_len, str_off, str_len
        bytes.extend(field.to_le_bytes());
    }
    bytes.extend([0u8; 50]);
    let path = dir.join("truncated.btf");
    fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn malformed_huge_and_injection_looking_values_get_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.btf");
    fs::write(&garbage, b"$(reboot)\n\x00\xff not BTF at all").unwrap();
    let truncated = truncated_btf(dir.path());
    let (garbage, truncated) = (garbage.to_str().unwrap(), truncated.to_str().unwrap());
    let web = |name: &str, text: &str| {
        let path = dir.path().join(name);
        fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let unknown_key = web("unknown.yml", "tls_server_config:\n  cipher_suites: [x]\n");
    let not_yaml = web("garbage.yml", "{{{ $(reboot)\n");
    let no_cert = web(
        "missing.yml",
        "tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: x.key\n",
    );
    let plain_password = web("plain.yml", "basic_auth_users:\n  prom: hunter2\n");
    for (args, code, needle) in [
        (&["-u", "root; reboot"][..], 2, "no user named"),
        (&["--uid=-1"], 2, "no user named"),
        (&["--dport", "99999999999999999999"], 2, "--dport"),
        (&["-c", "184467440737095516160"], 2, "--count"),
        (
            &["-d", "1e300"],
            2,
            "SECS must be more than 0 and at most a year",
        ),
        (
            &["--interval=-0.5", "--hist"],
            2,
            "SECS must be more than 0",
        ),
        (&["--buffer-pages", "3"], 2, "PAGES must be a power of two"),
        (
            &["--buffer-pages", "1e9"],
            2,
            "PAGES must be a power of two",
        ),
        (&["--max-pending=-1"], 2, "--max-pending"),
        (&["--max-pending", "4294967296"], 2, "--max-pending"),
        (&["--max-delay", "0.5"], 2, "--max-delay"),
        (&["--kprobe-attach", "`id`"], 2, "--kprobe-attach"),
        (&["--transport", "shm"], 2, "--transport"),
        (
            &["--comm", "0123456789abcdefgh"],
            2,
            "NAME must be 1 to 15 bytes",
        ),
        (&["--btf", "/nonexistent/vmlinux.btf"], 1, "--btf"),
        (&["--btf", "/"], 1, "--btf"),
        (&["--btf", garbage], 1, "--btf"),
        (&["--btf", truncated], 1, "--btf"),
        (&["--cgroup", "/etc/passwd"], 1, "--cgroup"),
        (&["--cgroup", "$(reboot)"], 1, "--cgroup"),
        (
            &["--serve", "nope"],
            2,
            "ADDR must be an IP address and port",
        ),
        (
            &["--serve", "localhost:80"],
            2,
            "ADDR must be an IP address and port",
        ),
        (
            &["--serve", "127.0.0.1:99999"],
            2,
            "ADDR must be an IP address and port",
        ),
        (&["--serve", "--json"], 2, "cannot be used with"),
        (&["--max-series", "10"], 2, "--serve"),
        (&["--serve", "--max-series", "0"], 2, "--max-series"),
        (&["--serve", "--dest", "$(id)"], 2, "--dest"),
        (
            &["--serve", "--buckets", "0.1,-1"],
            2,
            "bucket bounds must be seconds",
        ),
        (&["--serve", "--buckets", "1,0.5"], 1, "--buckets"),
        (
            &["--serve", "--series-ttl", "0"],
            2,
            "SECS must be more than 0",
        ),
        (&["--serve", "--label", "pod"], 2, "--label"),
        (&["--web-config", &unknown_key], 2, "--serve"),
        (
            &["--serve", "--web-config", &unknown_key],
            1,
            "cipher_suites",
        ),
        (&["--serve", "--web-config", &not_yaml], 1, "--web-config"),
        (
            &["--serve", "--web-config", &no_cert],
            1,
            "cert_file /nonexistent.crt",
        ),
        (
            &["--serve", "--web-config", &plain_password],
            1,
            "prom: not a bcrypt hash",
        ),
        (
            &["--serve", "--web-config", "/nonexistent.yml"],
            1,
            "--web-config",
        ),
    ] {
        let (status, _, err) = run(args);
        assert_one_line_error(code, status, &err, needle);
    }
}

#[test]
fn help_lists_every_flag() {
    let (status, out, _) = run(&["--help"]);
    assert!(status.success());
    for flag in [
        "MIN_MS",
        "--timestamp",
        "--lport",
        "--pid",
        "--ipv4",
        "--ipv6",
        "--verbose",
        "--json",
        "--duration",
        "--count",
        "--mode",
        "--legacy",
        "--features",
        "--buffer-pages",
        "--max-pending",
        "--max-delay",
        "--btf",
        "--kprobe-attach",
    ] {
        assert!(out.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn an_unknown_pid_is_refused() {
    // PIDs stop well below this (pid_max is at most 2^22).
    let (status, _, err) = run(&["-p", "2147483646"]);
    assert_one_line_error(1, status, &err, "no process with PID 2147483646");
}

/// tcpconnlat run as nobody, with no capability.
fn unprivileged(args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .arg(bin())
        .args(args)
        .output()
        .expect("setpriv (util-linux)")
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn without_privileges_it_says_to_use_root() {
    let out = unprivileged(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_one_line_error(
        1,
        out.status,
        &err,
        "needs root (or CAP_BPF and CAP_PERFMON)",
    );
    // What could not be tried is not said to be missing.
    let out = unprivileged(&["--transport", "ringbuf"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_one_line_error(1, out.status, &err, "without root");
    assert!(!err.contains("has no BPF ring buffer"), "{err}");
}

#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn features_tell_the_truth() {
    let _serial = serial();
    let f = features();
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(f["kernel"]["release"], release.trim());
    assert_eq!(f["btf"], Path::new("/sys/kernel/btf/vmlinux").exists());
    assert_eq!(
        f["kprobe_pmu"],
        Path::new("/sys/bus/event_source/devices/kprobe").exists()
    );
    let tracefs = f["tracefs"].as_str().expect("tracefs found or mounted");
    assert!(Path::new(tracefs).join("events").is_dir());
    assert_eq!(
        f["kprobe_events"],
        Path::new(tracefs).join("kprobe_events").exists()
    );
    let format = Path::new(tracefs).join("events/sock/inet_sock_set_state/format");
    assert_eq!(f["tracepoint"], format.exists());
    if let Ok(text) = fs::read_to_string(&format) {
        // The offsets claimed are the ones in the format file.
        for field in [
            "skaddr", "oldstate", "newstate", "sport", "dport", "family", "saddr_v6",
        ] {
            let line = text
                .lines()
                .find(|l| l.contains(&format!(" {field};")) || l.contains(&format!(" {field}[")))
                .unwrap();
            let offset = line
                .split("offset:")
                .nth(1)
                .unwrap()
                .split(';')
                .next()
                .unwrap();
            assert_eq!(f["tracepoint_layout"][field].to_string(), offset, "{field}");
        }
    }
    // Symbols are resolved where kprobes can use them, and every one claimed, like every
    // fentry target the BTF claims, is a function in kallsyms.
    let kprobes = f["kprobe_pmu"] == true || f["kprobe_events"] == true;
    assert_eq!(f["symbols"].is_object(), kprobes, "{}", f["symbols"]);
    assert_eq!(f["fentry_targets"].is_object(), f["btf"] == true);
    let kallsyms = fs::read_to_string("/proc/kallsyms").unwrap();
    let claimed = [&f["symbols"], &f["fentry_targets"]]
        .into_iter()
        .filter_map(|s| s.as_object())
        .flatten()
        .filter_map(|(func, symbol)| Some((func, symbol.as_str()?)));
    for (func, symbol) in claimed {
        assert!(symbol.starts_with(func.as_str()));
        assert!(
            kallsyms.lines().any(|l| {
                let mut w = l.split_whitespace().skip(1);
                matches!(w.next(), Some("t" | "T")) && w.next() == Some(symbol)
            }),
            "{symbol} is not a kernel function"
        );
    }
    let version: Vec<u32> = f["kernel"]["version"]
        .as_str()
        .unwrap()
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(f["ringbuf"], version[..2] >= [5, 8][..]);
    // The plan and the report agree.
    let plan = f["plan"].as_array().unwrap();
    let first_usable = plan
        .iter()
        .find(|s| s["usable"] == true)
        .map(|s| s["mode"].clone());
    assert_eq!(f["auto"], first_usable.unwrap_or(Value::Null));
    // What CI knows about the kernel it runs on (ci/ sets these per kernel).
    if let Ok(expected) = std::env::var("TCPCONNLAT_EXPECT_AUTO") {
        assert_eq!(f["auto"], expected.as_str());
    }
}

/// A forced mode works exactly when --features says it can, and otherwise fails with the
/// reason --features gave.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn forced_modes_work_or_fail_as_features_say() {
    let _serial = serial();
    let f = features();
    let refused: Vec<String> = std::env::var("TCPCONNLAT_EXPECT_REFUSED")
        .map(|v| {
            v.split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    for step in f["plan"].as_array().unwrap() {
        let mode = step["mode"].as_str().unwrap();
        if refused.iter().any(|m| m == mode) {
            assert_eq!(
                step["usable"], false,
                "CI expects {mode} to be refused here: {step}"
            );
        }
        if step["usable"] == true {
            let tracer = Tracer::start(&["--json", "--mode", mode]);
            assert!(tracer.interrupt().success(), "{mode}");
        } else {
            let reason = step["reason"].as_str().unwrap();
            let (status, _, err) = run(&["--mode", mode, "-d", "1"]);
            assert_one_line_error(1, status, &err, &format!("cannot trace in {mode} mode"));
            assert!(err.contains(reason), "{mode}: {err:?} lacks {reason:?}");
            assert!(err.contains("--features"), "{err:?}");
        }
    }
}

/// A forced mode does only the work its mode needs, as `-v` names the steps of start-up:
/// the fentry trial for fentry mode alone, the ring buffer trial for the modes that have
/// one, and the kprobe targets for the kprobe modes alone, found by their own names where
/// the kprobe PMU takes them so, without reading /proc/kallsyms.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn a_forced_mode_does_only_what_it_needs() {
    let _serial = serial();
    let f = features();
    // Every target of a mode's kprobes under its own name (what the kprobe PMU's trial
    // then finds).
    let exact = |mode: &str| {
        let mode: tcpconnlat_compat::Mode = mode.parse().unwrap();
        mode.spec()
            .kprobe_funcs()
            .all(|func| f["symbols"][func.name()] == func.name())
    };
    let mut tried = 0;
    for step in f["plan"].as_array().unwrap() {
        let mode = step["mode"].as_str().unwrap();
        if step["usable"] != true {
            continue;
        }
        let (status, _, err) = run(&["--mode", mode, "-v", "-d", "0.1"]);
        assert!(status.success(), "{mode}: {err}");
        let steps = err
            .lines()
            .find_map(|l| l.strip_prefix("tcpconnlat: start-up steps: "))
            .unwrap_or_else(|| panic!("{mode}: no start-up steps in {err}"));
        let has = |name: &str| {
            steps
                .split(", ")
                .any(|s| s.starts_with(&format!("{name} ")))
        };
        assert_eq!(has("fentry trial"), mode == "fentry", "{mode}: {steps}");
        assert_eq!(has("ringbuf trial"), mode != "legacy", "{mode}: {steps}");
        let kprobes = matches!(mode, "kprobe" | "legacy");
        let (by_name, kallsyms) = match (kprobes, f["kprobe_pmu"] == true) {
            (false, _) => (false, false),
            (true, true) => (true, !exact(mode)),
            (true, false) => (false, true),
        };
        assert_eq!(has("kprobe targets"), by_name, "{mode}: {steps}");
        assert_eq!(has("kernel symbols"), kallsyms, "{mode}: {steps}");
        tried += 1;
    }
    assert!(tried > 0, "no usable mode: {f}");
}

/// Without --mode, tracing starts in the mode --features says auto picks (kernel symbols,
/// read only for the kprobe modes, are then read only where those may be used), and names
/// the better modes it could not use, and only those.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn auto_traces_in_the_mode_features_picks() {
    let _serial = serial();
    let f = features();
    let auto = f["auto"].as_str().expect("no usable mode here");
    let tracer = Tracer::start(&["--json"]);
    let err = tracer.stderr.lock().unwrap().clone();
    assert!(
        err.contains(&format!("Tracing TCP connects in {auto} mode")),
        "{err}"
    );
    let modes = f["plan"].as_array().unwrap().iter();
    let mut before = true;
    for mode in modes.filter_map(|s| s["mode"].as_str()) {
        if mode == auto {
            before = false;
            continue;
        }
        assert_eq!(err.contains(&format!("{mode}: ")), before, "{mode}: {err}");
    }
    assert!(tracer.interrupt().success());
}

/// One binary for every host: no ELF interpreter to find and no shared library to load,
/// so it starts on any x86-64 Linux userspace (glibc 2.17 distributions included).
#[test]
fn the_tracer_is_one_static_executable() {
    use object::elf::{DT_NEEDED, PT_DYNAMIC, PT_INTERP};
    use object::read::elf::{Dyn, ElfFile64, ProgramHeader};
    use object::Endianness;

    let data = fs::read(bin()).unwrap();
    let elf = ElfFile64::<Endianness>::parse(&*data).unwrap();
    let endian = elf.endian();
    let mut needed = 0;
    for header in elf.elf_program_headers() {
        assert_ne!(
            header.p_type(endian),
            PT_INTERP,
            "{} asks for an ELF interpreter",
            bin()
        );
        if header.p_type(endian) == PT_DYNAMIC {
            let entries = header.dynamic(endian, &*data).unwrap().unwrap_or_default();
            needed += entries
                .iter()
                .filter(|d| d.d_tag(endian) == u64::from(DT_NEEDED))
                .count();
        }
    }
    assert_eq!(needed, 0, "{} needs shared libraries", bin());
    // And it runs, here, as it is.
    let out = Command::new(bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
}
