//! Offset discovery: struct sock's layout found at start-up, where neither BTF nor built-in
//! headers give it. A kprobe on tcp_set_state (probes/discover.bpf.c) copies struct sock
//! for connects made here, on loopback, to addresses and ports chosen at random; compat's
//! `discover` finds each field where its value is. The object, its kprobe and every socket
//! are gone when this returns.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::libbpf_sys::bpf_object__set_kversion;
use libbpf_rs::{AsRawLibbpf, MapCore, MapFlags, Object, ObjectBuilder};
use socket2::{Domain, Socket, Type};
use tcpconnlat_compat::discover::{self, Found, Sample, SampleFamily};
use tcpconnlat_compat::{Features, Func, ProbeObject};

use crate::tracer::find_map;
use crate::tracer::kprobes::{KprobeAttach, KprobeAttacher, KprobeSite};
use crate::tracer::objects::{
    self, maps, DiscoverConfig, DiscoverMark, SnapshotPhase, SnapshotSize,
};

/// What discovery needs to know of the host.
pub struct DiscoveryHost<'a> {
    pub features: &'a Features,
    pub kprobe_attach: KprobeAttach,
    /// LINUX_VERSION_CODE for the kprobe program (kernels before 5.0 check it).
    pub version_code: Option<u32>,
}

/// What discovery found, and what it cost.
#[derive(Clone, Debug)]
pub struct Discovered {
    pub found: Found,
    /// Connects made (retries included).
    pub connects: usize,
    pub took: Duration,
}

/// The connects discovery makes: enough of each kind for every field (see
/// compat::discover), each with values of its own.
const PLAN: [(SampleFamily, Outcome); 6] = [
    (SampleFamily::V4, Outcome::Established),
    (SampleFamily::V4, Outcome::Refused),
    (SampleFamily::V4, Outcome::Established),
    (SampleFamily::V4, Outcome::Refused),
    (SampleFamily::V6Mapped, Outcome::Established),
    (SampleFamily::V6Mapped, Outcome::Refused),
];

/// A probe the kernel skipped (it would have run nested in another BPF program) leaves a
/// connect without its snapshots: that connect is made again, this many times at most.
const TRIES: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Established,
    Refused,
}

/// Find struct sock's offsets on this kernel.
pub fn discover(host: &DiscoveryHost<'_>) -> Result<Discovered> {
    let started = Instant::now();
    let symbol = host
        .features
        .attach_points
        .yes()
        .and_then(|points| points.get(Func::TcpSetState))
        .ok_or_else(|| anyhow!("kernel function tcp_set_state is not in /proc/kallsyms"))?;
    let object = load(host.version_code)?;
    let thread = ThreadName::unique()?;
    configure(&object, &thread)?;
    let prog = object
        .progs_mut()
        .find(|p| p.name() == "discover_set_state")
        .ok_or_else(|| anyhow!("program discover_set_state missing from the object"))?;
    let site = KprobeSite {
        symbol,
        tag: "discover",
    };
    let kprobe = KprobeAttacher::new(host.kprobe_attach, host.features)
        .attach(&prog, &site)
        .with_context(|| format!("attaching the discovery probe to {symbol}"))?;
    let (samples, connects) = sample_all(&object)?;
    drop(kprobe);
    drop(thread);
    let found = discover::find(&samples)?;
    Ok(Discovered {
        found,
        connects,
        took: started.elapsed(),
    })
}

fn load(version_code: Option<u32>) -> Result<Object> {
    let open = ObjectBuilder::default()
        .open_memory(objects::bytes(ProbeObject::Discover))
        .context("opening the discovery object")?;
    if let Some(code) = version_code {
        // SAFETY: the object is open and not loaded yet.
        unsafe { bpf_object__set_kversion(open.as_libbpf_object().as_ptr(), code) };
    }
    open.load()
        .context("loading the discovery probe (run with -v for the verifier log)")
}

fn configure(object: &Object, thread: &ThreadName) -> Result<()> {
    let mut config = DiscoverConfig::default();
    config.comm[..thread.name.len()].copy_from_slice(thread.name.as_bytes());
    // SAFETY: plain data (objects.rs).
    let bytes = unsafe { plain::as_bytes(&config) };
    find_map(object, maps::DISCOVER_CONFIG)?
        .update(&0u32.to_ne_bytes(), bytes, MapFlags::ANY)
        .context("configuring the discovery probe")
}

/// Every connect of the plan, each made again where a snapshot is missing; and how many
/// connects it took.
fn sample_all(object: &Object) -> Result<(Vec<Sample>, usize)> {
    let mut picker = Picker::default();
    let mut samples = Vec::with_capacity(PLAN.len());
    let mut connects = 0;
    for (family, outcome) in PLAN {
        let mut sample = None;
        for _ in 0..TRIES {
            connects += 1;
            clear_marks(object)?;
            let Some((local, remote)) = connect_once(&mut picker, family, outcome)? else {
                continue; // no IPv6 at all
            };
            if let Some((connecting, leaving)) = snapshots(object)? {
                sample = Some(Sample {
                    family,
                    local,
                    remote,
                    refused: outcome == Outcome::Refused,
                    connecting,
                    leaving,
                });
                break;
            }
        }
        match sample {
            Some(sample) => samples.push(sample),
            None if family == SampleFamily::V6Mapped && !ipv6_available() => {}
            None => {
                bail!("the discovery probe saw no {outcome:?} {family:?} connect in {TRIES} tries")
            }
        }
    }
    Ok((samples, connects))
}

fn ipv6_available() -> bool {
    Socket::new(Domain::IPV6, Type::STREAM, None).is_ok()
}

fn clear_marks(object: &Object) -> Result<()> {
    let marks = find_map(object, maps::DISCOVER_MARKS)?;
    let zero = DiscoverMark::default();
    // SAFETY: plain data (objects.rs).
    let bytes = unsafe { plain::as_bytes(&zero) };
    for phase in 0..SnapshotPhase::PHASES.0 {
        marks
            .update(&phase.to_ne_bytes(), bytes, MapFlags::ANY)
            .context("clearing the discovery marks")?;
    }
    Ok(())
}

/// Both snapshots of the last connect, if the probe took both.
fn snapshots(object: &Object) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
    let marks = find_map(object, maps::DISCOVER_MARKS)?;
    let chunks = find_map(object, maps::DISCOVER_SNAPSHOTS)?;
    let per_phase = SnapshotSize::SNAPSHOT_CHUNKS.0;
    let mut taken = Vec::new();
    for phase in 0..SnapshotPhase::PHASES.0 {
        let mut mark = DiscoverMark::default();
        if let Some(bytes) = marks.lookup(&phase.to_ne_bytes(), MapFlags::ANY)? {
            plain::copy_from_bytes(&mut mark, &bytes)
                .map_err(|_| anyhow!("a discovery mark of the wrong size"))?;
        }
        if mark.taken == 0 {
            return Ok(None);
        }
        let mut snapshot =
            Vec::with_capacity((per_phase * SnapshotSize::SNAPSHOT_CHUNK.0) as usize);
        for chunk in 0..per_phase {
            let key = phase * per_phase + chunk;
            let bytes = chunks
                .lookup(&key.to_ne_bytes(), MapFlags::ANY)?
                .ok_or_else(|| anyhow!("discovery snapshot chunk {key} missing"))?;
            snapshot.extend_from_slice(&bytes);
        }
        taken.push(snapshot);
    }
    let leaving = taken.pop().unwrap_or_default();
    let connecting = taken.pop().unwrap_or_default();
    Ok(Some((connecting, leaving)))
}

/// One connect of ours, on loopback: the local and remote addresses it used, or `None`
/// for an IPv6 connect on a kernel without IPv6.
fn connect_once(
    picker: &mut Picker,
    family: SampleFamily,
    outcome: Outcome,
) -> Result<Option<(SocketAddrV4, SocketAddrV4)>> {
    let (server, remote) = picker.bound_server()?;
    if outcome == Outcome::Established {
        server.listen(4).context("discovery: listen on loopback")?;
    }
    let (client, local) = match picker.bound_client(family)? {
        Some(bound) => bound,
        None => return Ok(None),
    };
    let to: SocketAddr = match family {
        SampleFamily::V4 => remote.into(),
        SampleFamily::V6Mapped => {
            SocketAddrV6::new(remote.ip().to_ipv6_mapped(), remote.port(), 0, 0).into()
        }
    };
    let result = client.connect_timeout(&to.into(), Duration::from_secs(2));
    match (outcome, result) {
        (Outcome::Established, Ok(())) => {}
        (Outcome::Refused, Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        (_, Err(e)) => bail!(
            "discovery: connect to {remote} on loopback: {e} (is loopback up and unfiltered?)"
        ),
        (Outcome::Refused, Ok(())) => {
            bail!("discovery: a connect to {remote}, where nothing listens, was accepted")
        }
    }
    Ok(Some((local, remote)))
}

/// Random loopback addresses and ports, none used twice: every connect's values are its
/// own, so a field cannot match by chance in every snapshot.
#[derive(Default)]
struct Picker {
    ports: Vec<u16>,
}

impl Picker {
    /// 127.a.b.c, no byte 0 or 255.
    fn address(&self) -> Ipv4Addr {
        Ipv4Addr::new(
            127,
            fastrand::u8(1..255),
            fastrand::u8(1..255),
            fastrand::u8(1..255),
        )
    }

    /// A port not used before whose two bytes differ (so host and network order differ).
    fn port(&mut self) -> u16 {
        loop {
            let port = fastrand::u16(10_000..60_000);
            if port >> 8 != port & 0xff && !self.ports.contains(&port) {
                self.ports.push(port);
                return port;
            }
        }
    }

    /// A socket bound where the connect goes: it listens for an established connect, and
    /// for a refused one it only holds the address (a connect there gets an RST).
    fn bound_server(&mut self) -> Result<(Socket, SocketAddrV4)> {
        self.bind(Domain::IPV4, SocketAddr::from)?
            .ok_or_else(|| anyhow!("discovery: this kernel has no IPv4 sockets"))
    }

    fn bound_client(&mut self, family: SampleFamily) -> Result<Option<(Socket, SocketAddrV4)>> {
        match family {
            SampleFamily::V4 => self.bind(Domain::IPV4, SocketAddr::from),
            SampleFamily::V6Mapped => self.bind(Domain::IPV6, |v4: SocketAddrV4| {
                SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0).into()
            }),
        }
    }

    /// A socket of `domain` bound to a fresh address and port (as `at` writes them); `None`
    /// where the kernel has no such sockets.
    fn bind(
        &mut self,
        domain: Domain,
        at: impl Fn(SocketAddrV4) -> SocketAddr,
    ) -> Result<Option<(Socket, SocketAddrV4)>> {
        let socket = match Socket::new(domain, Type::STREAM, None) {
            Ok(socket) => socket,
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => return Ok(None),
            Err(e) => return Err(e).context("discovery: creating a socket"),
        };
        if domain == Domain::IPV6 {
            // net.ipv6.bindv6only may make v6-only the default: mapped addresses need both.
            socket
                .set_only_v6(false)
                .context("discovery: IPV6_V6ONLY")?;
        }
        for _ in 0..16 {
            let v4 = SocketAddrV4::new(self.address(), self.port());
            match socket.bind(&at(v4).into()) {
                Ok(()) => return Ok(Some((socket, v4))),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e).with_context(|| format!("discovery: bind {v4}")),
            }
        }
        bail!("discovery: no free loopback address and port in 16 tries")
    }
}

/// This thread under a name of its own while discovery runs: the probe knows our connects
/// by it (a pid would not do inside a PID namespace). The old name comes back on drop.
struct ThreadName {
    name: String,
    old: std::ffi::CString,
}

impl ThreadName {
    fn unique() -> Result<ThreadName> {
        let old = nix::sys::prctl::get_name().context("reading this thread's name")?;
        // 15 bytes: the kernel's comm and its NUL.
        let name = format!("tcpconnlat-{:04x}", fastrand::u16(..));
        let c_name = std::ffi::CString::new(name.as_str())?;
        nix::sys::prctl::set_name(&c_name).context("naming the discovery thread")?;
        Ok(ThreadName { name, old })
    }
}

impl Drop for ThreadName {
    fn drop(&mut self) {
        let _ = nix::sys::prctl::set_name(&self.old);
    }
}
