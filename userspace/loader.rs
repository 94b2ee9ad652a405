//! Loading and attaching the probes for one [`Mode`]. Modes differ only in the data of
//! their [`ModeSpec`]: which object, which programs, and how each one attaches.

use anyhow::{anyhow, bail, Context, Result};
use libbpf_rs::{Link, MapCore, MapFlags, Object, ObjectBuilder};
use tcpconnlat_compat::{Features, Func, Mode, StateLayout, Trials};

use crate::probes::{self, Config, RawStateLayout};

/// How events reach userspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// BPF ring buffer (Linux 5.8+): one buffer for all CPUs, batched wakeups.
    RingBuf,
    /// Perf event array: every kernel.
    PerfBuf,
}

impl Transport {
    /// The ring buffer where the kernel has one, unless the user asked otherwise.
    pub fn choose(requested: &str, trials: &Trials) -> Result<Transport> {
        let ring = trials.ringbuf == Some(true);
        match requested {
            "ringbuf" if !ring => {
                bail!("this kernel has no BPF ring buffer (Linux 5.8+): use --transport perfbuf")
            }
            "ringbuf" => Ok(Transport::RingBuf),
            "perfbuf" => Ok(Transport::PerfBuf),
            _ if ring => Ok(Transport::RingBuf),
            _ => Ok(Transport::PerfBuf),
        }
    }

    /// The map the probes write to; the other transport's map is never created.
    pub fn map(self) -> &'static str {
        match self {
            Transport::RingBuf => "events_rb",
            Transport::PerfBuf => "events_pb",
        }
    }

    /// Emitting programs exist once per transport, named `<hook>_<suffix>`.
    fn suffix(self) -> &'static str {
        match self {
            Transport::RingBuf => "rb",
            Transport::PerfBuf => "pb",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Transport::RingBuf => "ring buffer",
            Transport::PerfBuf => "perf buffer",
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Attach {
    /// By BTF name, as the program's section says.
    Fentry(Func),
    /// By the symbol kallsyms gave for the function.
    Kprobe(Func),
    /// `sock:inet_sock_set_state`, as the section says.
    StateTracepoint,
}

#[derive(Clone, Copy, Debug)]
struct Hook {
    prog: &'static str,
    attach: Attach,
    /// Built once per transport (the program name gets the transport's suffix).
    emits: bool,
}

const fn hook(prog: &'static str, attach: Attach, emits: bool) -> Hook {
    Hook {
        prog,
        attach,
        emits,
    }
}

struct ModeSpec {
    object: &'static [u8],
    hooks: &'static [Hook],
}

mod hooks {
    use super::{hook, Attach::*, Hook};
    use tcpconnlat_compat::Func::*;

    const FORGET: Hook = hook("tp_forget", StateTracepoint, false);
    pub const FENTRY: &[Hook] = &[
        hook("fentry_v4_connect", Fentry(TcpV4Connect), false),
        hook("fentry_v6_connect", Fentry(TcpV6Connect), false),
        hook("fentry_rcv_state", Fentry(TcpRcvStateProcess), true),
        FORGET,
    ];
    pub const KPROBE: &[Hook] = &[
        hook("kprobe_v4_connect", Kprobe(TcpV4Connect), false),
        hook("kprobe_v6_connect", Kprobe(TcpV6Connect), false),
        hook("kprobe_rcv_state", Kprobe(TcpRcvStateProcess), true),
        FORGET,
    ];
    pub const TRACEPOINT: &[Hook] = &[hook("tp_state", StateTracepoint, true)];
}

fn spec(mode: Mode) -> Option<ModeSpec> {
    let (object, hooks) = match mode {
        Mode::Fentry => (probes::CORE_OBJECT, hooks::FENTRY),
        Mode::Kprobe => (probes::CORE_OBJECT, hooks::KPROBE),
        Mode::Tracepoint => (probes::TRACEPOINT_OBJECT, hooks::TRACEPOINT),
        Mode::Legacy => return None,
    };
    Some(ModeSpec { object, hooks })
}

/// What the user asked the probes to filter.
#[derive(Clone, Debug, Default)]
pub struct Filters {
    pub min_lat_ns: u64,
    pub pid: Option<u32>,
    /// 4 or 6.
    pub ip_version: Option<u8>,
}

/// Probes loaded and attached; dropping it detaches everything.
pub struct Tracer {
    pub mode: Mode,
    pub transport: Transport,
    pub object: Object,
    /// Things the user should know about what is and is not traced.
    pub notes: Vec<String>,
    _links: Vec<Link>,
}

/// A program to load, with its final name and, for kprobes, the symbol to attach to.
struct Planned {
    hook: Hook,
    name: String,
    symbol: Option<String>,
}

/// Load and attach `mode`'s probes.
pub fn start(
    mode: Mode,
    features: &Features,
    transport: Transport,
    filters: &Filters,
) -> Result<Tracer> {
    let spec = spec(mode).ok_or_else(|| anyhow!("{mode} mode is not built yet"))?;
    let layout = features
        .state_tracepoint
        .as_ref()
        .map_err(|why| anyhow!("{why}"))?;
    let mut notes = Vec::new();
    let mut planned = Vec::new();
    for hook in spec.hooks {
        let symbol = match hook.attach {
            Attach::Fentry(func) | Attach::Kprobe(func) => {
                let points = features
                    .attach_points
                    .as_ref()
                    .map_err(|why| anyhow!("{why}"))?;
                match points.get(func) {
                    Some(symbol) => Some(symbol.to_owned()),
                    None if func == Func::TcpV6Connect => {
                        notes.push("IPv6 connects are not traced: the kernel has no tcp_v6_connect (IPv6 disabled or not loaded)".to_owned());
                        continue;
                    }
                    None => bail!("kernel function {} is not in /proc/kallsyms", func.name()),
                }
            }
            Attach::StateTracepoint => None,
        };
        let name = if hook.emits {
            format!("{}_{}", hook.prog, transport.suffix())
        } else {
            hook.prog.to_owned()
        };
        planned.push(Planned {
            hook: *hook,
            name,
            symbol,
        });
    }

    let mut open = ObjectBuilder::default()
        .open_memory(spec.object)
        .context("opening the probe object")?;
    for mut prog in open.progs_mut() {
        let wanted = planned.iter().any(|p| prog.name() == p.name.as_str());
        prog.set_autoload(wanted);
    }
    for mut map in open.maps_mut() {
        let name = map.name().to_string_lossy();
        if (name == "events_rb" || name == "events_pb") && name != transport.map() {
            map.set_autocreate(false)
                .with_context(|| format!("leaving out map {name}"))?;
        }
    }
    let object = open
        .load()
        .with_context(|| format!("loading the {mode} probes (run with -v for the verifier log)"))?;

    let ring_bytes = u64::from(find_map(&object, Transport::RingBuf.map())?.max_entries());
    write_config(&object, &config(filters, layout, ring_bytes))?;

    let mut links = Vec::new();
    for p in &planned {
        let prog = object
            .progs_mut()
            .find(|prog| prog.name() == p.name.as_str())
            .ok_or_else(|| anyhow!("program {} missing from the probe object", p.name))?;
        let link = match (p.hook.attach, &p.symbol) {
            (Attach::Kprobe(_), Some(symbol)) => prog.attach_kprobe(false, symbol),
            _ => prog.attach(),
        };
        let target = match (&p.symbol, p.hook.attach) {
            (Some(symbol), _) => symbol.clone(),
            (None, _) => "sock:inet_sock_set_state".to_owned(),
        };
        links.push(link.with_context(|| format!("attaching {} to {target}", p.name))?);
    }
    Ok(Tracer {
        mode,
        transport,
        object,
        notes,
        _links: links,
    })
}

fn config(filters: &Filters, layout: &StateLayout, ring_bytes: u64) -> Config {
    const AF_INET: u16 = 2;
    const AF_INET6: u16 = 10;
    Config {
        min_lat_ns: filters.min_lat_ns,
        // A quarter of the ring: early enough that a burst never fills it while the
        // reader sleeps, rare enough that steady traffic never wakes it.
        wakeup_bytes: ring_bytes / 4,
        target_tgid: filters.pid.unwrap_or(0),
        target_family: match filters.ip_version {
            Some(4) => AF_INET,
            Some(6) => AF_INET6,
            _ => 0,
        },
        tp: RawStateLayout {
            skaddr: layout.skaddr,
            oldstate: layout.oldstate,
            newstate: layout.newstate,
            sport: layout.sport,
            dport: layout.dport,
            family: layout.family,
            protocol: layout.protocol.unwrap_or(0),
            saddr: layout.saddr,
            daddr: layout.daddr,
            saddr_v6: layout.saddr_v6,
            daddr_v6: layout.daddr_v6,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn write_config(object: &Object, config: &Config) -> Result<()> {
    let map = find_map(object, "config_map")?;
    // SAFETY: Config is plain data (see probes.rs).
    let bytes = unsafe { plain::as_bytes(config) };
    map.update(&0u32.to_ne_bytes(), bytes, MapFlags::ANY)
        .context("writing the probe configuration")
}

pub fn find_map<'a>(object: &'a Object, name: &str) -> Result<libbpf_rs::Map<'a>> {
    object
        .maps()
        .find(|m| m.name() == name)
        .ok_or_else(|| anyhow!("map {name} missing from the probe object"))
}
