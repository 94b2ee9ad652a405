//! packaging/: the systemd unit's capabilities are enough to trace and serve (on this
//! kernel, 5.8+), the Grafana dashboard is well-formed (its queries are run against a
//! real Prometheus in tests/prometheus.rs), and the .deb and .rpm that ci/package.sh
//! builds pass lintian, hold the same files, install into an empty root, run from there
//! and leave nothing behind when removed.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::*;

const UNIT: &str = include_str!("../packaging/tcpconnlat.service");
const DASHBOARD: &str = include_str!("../packaging/grafana-dashboard.json");

/// The value of `key=` in the unit.
fn setting(key: &str) -> String {
    UNIT.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
        .to_owned()
}

#[test]
fn the_unit_runs_the_exporter_hardened() {
    assert!(setting("ExecStart").ends_with("tcpconnlat --serve 127.0.0.1:10436"));
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(setting(key), value, "{key}");
    }
    assert_eq!(
        setting("CapabilityBoundingSet"),
        setting("AmbientCapabilities")
    );
}

/// Run as systemd would with this unit: root, but only the unit's capability bounding
/// set and no new privileges. It must trace and serve.
#[test]
#[ignore = "needs root: loads BPF programs (./ci/test.sh runs it as root)"]
fn the_units_capabilities_are_enough_to_trace_and_serve() {
    let _serial = serial();
    let caps: Vec<String> = setting("CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let server = listen_on_a_service_port();
    let bounding = format!("--bounding-set=-all,{}", caps.join(","));
    let mut child = Command::new("setpriv")
        .args([&bounding, "--no-new-privs", "--"])
        .arg(bin())
        .args(["--serve", "127.0.0.1:0", "-p", &me(), "-d", "20"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut said = String::new();
    let addr = loop {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            panic!("did not start with {bounding}: {said}");
        };
        said.push_str(&line);
        said.push('\n');
        if let Some(addr) = line
            .split("http://")
            .nth(1)
            .and_then(|a| a.strip_suffix("/metrics"))
        {
            break addr.parse().unwrap();
        }
    };
    connect(server);
    let series = format!(
        "tcpconnlat_connect_duration_seconds_count{{outcome=\"established\",dest=\"127.0.0.1:{}\"}}",
        server.port()
    );
    let text = scrape_until(addr, |t| sample(t, &series).is_some());
    assert_eq!(sample(&text, &series), Some(1.0), "{said}{text}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn the_dashboard_has_the_panels_the_readme_promises() {
    let dash: Value = serde_json::from_str(DASHBOARD).unwrap();
    let titles: Vec<&str> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for wanted in [
        "latency",
        "p50",
        "p99",
        "outcome",
        "SYN retransmits",
        "Tracer health",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel about {wanted}: {titles:?}"
        );
    }
    let heatmap = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["type"] == "heatmap")
        .expect("a heatmap");
    assert_eq!(heatmap["targets"][0]["format"], "heatmap");
}

#[test]
fn the_debian_changelog_is_for_this_version() {
    let changelog = include_str!("../packaging/debian/changelog");
    let first = changelog.lines().next().unwrap();
    let version = format!("tcpconnlat ({}-1) ", env!("CARGO_PKG_VERSION"));
    assert!(
        first.starts_with(&version),
        "bump packaging/debian/changelog: {first}"
    );
}

/// The one package of `ext` that ci/package.sh left in target/packages.
fn package(ext: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/packages");
    let found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}: run ./ci/package.sh first", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    assert_eq!(found.len(), 1, "one .{ext} in {}: {found:?}", dir.display());
    found.into_iter().next().unwrap()
}

/// Run a packaging tool; its stdout, or the test fails with what it said.
fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The regular files under `root`, as absolute paths inside it, minus the package
/// manager's own database.
fn files_under(root: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                out.insert(format!("/{}", path.strip_prefix(root).unwrap().display()));
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out.retain(|f| !f.starts_with("/var/lib/"));
    out
}

/// What an installed package must hold, wherever the distribution wants it.
fn assert_installed(root: &Path, files: &BTreeSet<String>) {
    for wanted in [
        "/usr/sbin/tcpconnlat",
        "/usr/lib/systemd/system/tcpconnlat.service",
        "/usr/share/man/man8/tcpconnlat.8.gz",
        "/usr/share/bash-completion/completions/tcpconnlat",
        "/usr/share/fish/vendor_completions.d/tcpconnlat.fish",
        "/usr/share/doc/tcpconnlat/examples/web-config.yml",
        "/usr/share/doc/tcpconnlat/examples/grafana-dashboard.json",
    ] {
        assert!(files.contains(wanted), "no {wanted} in {files:?}");
    }
    assert!(
        files.iter().any(|f| f.ends_with("/_tcpconnlat")),
        "zsh: {files:?}"
    );
    let bin = root.join("usr/sbin/tcpconnlat");
    let version = tool(bin.to_str().unwrap(), &["--version"]);
    assert_eq!(
        version.trim(),
        format!("tcpconnlat {}", env!("CARGO_PKG_VERSION"))
    );
    // The unit starts the binary where the package put it.
    let exec = setting("ExecStart");
    let path = exec.split_whitespace().next().unwrap();
    assert!(files.contains(path), "ExecStart={exec}");
    let man = tool(
        "zcat",
        &[root
            .join("usr/share/man/man8/tcpconnlat.8.gz")
            .to_str()
            .unwrap()],
    );
    assert!(man.contains(".TH tcpconnlat 8"), "{man}");
}

#[test]
#[ignore = "needs the packages: ./ci/package.sh builds them (./ci/test.sh runs it first)"]
fn the_deb_is_lintian_clean_installs_runs_and_purges_to_nothing() {
    let deb = package("deb");
    let deb = deb.to_str().unwrap();
    tool("lintian", &["--fail-on", "error,warning", deb]);
    let root = tempfile::tempdir().unwrap();
    let db = root.path().join("var/lib/dpkg");
    std::fs::create_dir_all(db.join("info")).unwrap();
    std::fs::create_dir_all(db.join("updates")).unwrap();
    std::fs::write(db.join("status"), "").unwrap();
    let dpkg_root = format!("--root={}", root.path().display());
    tool("dpkg", &[&dpkg_root, "--log=/dev/null", "--install", deb]);
    let files = files_under(root.path());
    assert_installed(root.path(), &files);
    tool(
        "dpkg",
        &[&dpkg_root, "--log=/dev/null", "--purge", "tcpconnlat"],
    );
    assert_eq!(files_under(root.path()), BTreeSet::new());
}

/// What CentOS/RHEL 7's rpm (4.11.3) provides of itself, each with its version: a package
/// requiring anything else (rpmlib(PayloadIsZstd), say) is refused there (rpm-4.11.3's
/// lib/rpmds.c, rpmlibProvides).
const CENTOS7_RPMLIB: [(&str, &str); 16] = [
    ("rpmlib(VersionedDependencies)", "3.0.3-1"),
    ("rpmlib(CompressedFileNames)", "3.0.4-1"),
    ("rpmlib(PayloadIsBzip2)", "3.0.5-1"),
    ("rpmlib(PayloadIsXz)", "5.2-1"),
    ("rpmlib(PayloadIsLzma)", "4.4.2-1"),
    ("rpmlib(PayloadFilesHavePrefix)", "4.0-1"),
    ("rpmlib(ExplicitPackageProvide)", "4.0-1"),
    ("rpmlib(HeaderLoadSortsTags)", "4.0.1-1"),
    ("rpmlib(ScriptletInterpreterArgs)", "4.0.3-1"),
    ("rpmlib(PartialHardlinkSets)", "4.0.4-1"),
    ("rpmlib(ConcurrentAccess)", "4.1-1"),
    ("rpmlib(BuiltinLuaScripts)", "4.2.2-1"),
    ("rpmlib(FileDigests)", "4.6.0-1"),
    ("rpmlib(FileCaps)", "4.6.1-1"),
    ("rpmlib(ScriptletExpansion)", "4.9.0-1"),
    ("rpmlib(TildeInVersions)", "4.10.0-1"),
];

#[test]
#[ignore = "needs the packages: ./ci/package.sh builds them (./ci/test.sh runs it first)"]
fn the_rpm_holds_what_the_deb_does_installs_runs_and_erases_to_nothing() {
    let rpm = package("rpm");
    let rpm = rpm.to_str().unwrap();
    // Readable by CentOS 7's rpm: gzip, no zstd; and static, so it requires nothing.
    assert_eq!(
        tool("rpm", &["-qp", "--qf", "%{PAYLOADCOMPRESSOR}", rpm]),
        "gzip"
    );
    let requires = tool("rpm", &["-qp", "--requires", rpm]);
    for line in requires.lines() {
        let feature = line.split(" <= ").collect::<Vec<_>>();
        assert!(
            CENTOS7_RPMLIB.contains(&(feature[0], feature.get(1).copied().unwrap_or(""))),
            "the .rpm requires {line}, which CentOS 7's rpm 4.11 does not provide"
        );
    }
    let root = tempfile::tempdir().unwrap();
    let rpm_root = [
        "--root",
        root.path().to_str().unwrap(),
        "--dbpath",
        "/var/lib/rpm",
    ];
    tool("rpm", &[&rpm_root[..], &["--initdb"]].concat());
    tool("rpm", &[&rpm_root[..], &["--install", rpm]].concat());
    let files = files_under(root.path());
    assert_installed(root.path(), &files);
    // The same files as the .deb, but for Debian's own (copyright, changelog, lintian)
    // and where each distribution keeps zsh completions.
    let deb: BTreeSet<String> = tool(
        "dpkg-deb",
        &["--contents", package("deb").to_str().unwrap()],
    )
    .lines()
    .filter(|l| l.starts_with('-'))
    .map(|l| {
        l.rsplit(' ')
            .next()
            .unwrap()
            .trim_start_matches('.')
            .to_owned()
    })
    .filter(|f| {
        !f.contains("/lintian/") && !f.ends_with("/copyright") && !f.contains("changelog.Debian")
    })
    .map(|f| f.replace("/zsh/vendor-completions/", "/zsh/site-functions/"))
    .collect();
    assert_eq!(files, deb);
    tool("rpm", &[&rpm_root[..], &["--erase", "tcpconnlat"]].concat());
    assert_eq!(files_under(root.path()), BTreeSet::new());
}

const DAEMONSET: &str = include_str!("../packaging/kubernetes/daemonset.yaml");

/// The DaemonSet gives the pod what the unit gives the service, and what a pod lacks
/// besides: the host's PID and network namespaces, cgroup tree and tracefs.
#[test]
fn the_daemonset_asks_for_what_the_unit_does_and_the_hosts_views() {
    let ds: Value = serde_saphyr::from_str(DAEMONSET).unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["hostNetwork"], true);
    let container = &pod["containers"][0];
    let caps = &container["securityContext"]["capabilities"];
    assert_eq!(caps["drop"], serde_json::json!(["ALL"]));
    let added: Vec<String> = caps["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("CAP_{}", c.as_str().unwrap()))
        .collect();
    assert_eq!(added.join(" "), setting("CapabilityBoundingSet"));
    // Each host path is mounted where it is on the host, and tracefs where tcpconnlat
    // looks for it.
    let mounts = container["volumeMounts"].as_array().unwrap();
    let host_path = |name: &str| {
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name);
        volume.unwrap()["hostPath"]["path"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    for wanted in ["/sys/fs/cgroup", "/sys/kernel/tracing"] {
        let mount = mounts
            .iter()
            .find(|m| m["mountPath"] == wanted)
            .expect(wanted);
        assert_eq!(host_path(mount["name"].as_str().unwrap()), wanted);
    }
    assert!(tcpconnlat_compat::tracefs::TRACEFS_DIRS.contains(&"sys/kernel/tracing"));
    // Every flag it passes is one tcpconnlat has, and the web config is in the mounted
    // Secret.
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let (_, help, _) = run(&["--help"]);
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag), "tcpconnlat has no {flag}");
    }
    let config = args[args.iter().position(|a| *a == "--web-config").unwrap() + 1];
    let secret = mounts.iter().find(|m| m["name"] == "web-config").unwrap();
    assert!(
        config.starts_with(secret["mountPath"].as_str().unwrap()),
        "{config}"
    );
}
