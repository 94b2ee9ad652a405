//! What the probes are told before anything is attached: the filters the user asked for
//! and the layouts the host gave, written into the `config_map`, `pids` and `dports` maps.

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, Object};
use tcpconnlat_compat::Transport;

use super::objects::{self, maps, AddressFamily, Config, RawStateLayout, Report};
use super::transport::{counts_sent, WhenFull};
use super::{find_map, LoadOptions, Loadout};

/// Which connects to report, by how they ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcomes {
    All,
    /// `--established`: bcc's behaviour.
    Established,
    /// `--failed`.
    Failed,
}

/// `-4` / `-6`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpVersion {
    V4,
    V6,
}

/// What the user asked the probes to filter (all applied in the kernel).
#[derive(Clone, Debug)]
pub struct Filters {
    pub min_lat_ns: u64,
    /// Empty: every process.
    pub pids: Vec<u32>,
    pub ip_version: Option<IpVersion>,
    pub uid: Option<u32>,
    /// cgroup v2 id (the cgroup directory's inode number).
    pub cgroup_id: Option<u64>,
    pub comm: Option<String>,
    /// Empty: every destination port.
    pub dports: Vec<u16>,
    pub outcomes: Outcomes,
}

impl Default for Filters {
    fn default() -> Filters {
        Filters {
            min_lat_ns: 0,
            pids: Vec::new(),
            ip_version: None,
            uid: None,
            cgroup_id: None,
            comm: None,
            dports: Vec::new(),
            outcomes: Outcomes::All,
        }
    }
}

/// Write the configuration and the filter sets, before anything is attached.
pub(super) fn configure(
    object: &Object,
    filters: &Filters,
    options: &LoadOptions<'_>,
    loadout: &Loadout<'_>,
) -> Result<()> {
    let ring_bytes =
        find_map(object, Transport::RingBuf.map()).map_or(0, |m| u64::from(m.max_entries()));
    let config = probe_config(filters, options, loadout, ring_bytes);
    write_config(object, &config)?;
    write_set(
        object,
        maps::PIDS,
        filters.pids.iter().map(|p| p.to_ne_bytes().to_vec()),
    )?;
    write_set(
        object,
        maps::DPORTS,
        filters.dports.iter().map(|p| p.to_ne_bytes().to_vec()),
    )
}

/// The probes' `struct config` for these filters on this host.
fn probe_config(
    filters: &Filters,
    options: &LoadOptions<'_>,
    loadout: &Loadout<'_>,
    ring_bytes: u64,
) -> Config {
    let features = options.features;
    let mut comm = [0u8; objects::COMM_LEN];
    if let Some(name) = &filters.comm {
        // The CLI allows at most COMM_LEN - 1 bytes: the kernel's comm with its NUL.
        comm[..name.len()].copy_from_slice(name.as_bytes());
    }
    let report = match filters.outcomes {
        Outcomes::All => Report::REPORT_ANY.0,
        Outcomes::Established => Report::REPORT_ESTABLISHED.0,
        Outcomes::Failed => Report::REPORT_FAILED.0,
    };
    let family = match filters.ip_version {
        Some(IpVersion::V4) => AddressFamily::FAMILY_INET.0,
        Some(IpVersion::V6) => AddressFamily::FAMILY_INET6.0,
        None => 0,
    };
    Config {
        min_lat_ns: filters.min_lat_ns,
        // A quarter of the ring: early enough that a burst never fills it while the
        // reader sleeps, rare enough that steady traffic never wakes it.
        wakeup_bytes: ring_bytes / 4,
        cgroup_id: filters.cgroup_id.unwrap_or(0),
        uid: filters.uid.unwrap_or(0),
        family: family as u16,
        filter_uid: filters.uid.is_some().into(),
        filter_pids: (!filters.pids.is_empty()).into(),
        filter_dports: (!filters.dports.is_empty()).into(),
        filter_comm: filters.comm.is_some().into(),
        report: report as u8,
        label_cgroup: options.label_cgroup.into(),
        retransmit_skaddr: *features.retransmit_tracepoint.as_ref().unwrap_or(&0),
        reset_skaddr: *features.reset_tracepoint.as_ref().unwrap_or(&0),
        comm,
        tp: features
            .state_tracepoint
            .as_ref()
            .map(objects::state_layout)
            .unwrap_or_else(|_| RawStateLayout::default()),
        sk: loadout.sock.map(objects::sock_layout).unwrap_or_default(),
        keep_unsent: (WhenFull::given(loadout.confirm) == WhenFull::Kept).into(),
        count_sent: counts_sent(loadout.transport, loadout.confirm).into(),
        ..Default::default()
    }
}

fn write_config(object: &Object, config: &Config) -> Result<()> {
    let map = find_map(object, maps::CONFIG_MAP)?;
    // SAFETY: Config is plain data (see objects.rs).
    let bytes = unsafe { plain::as_bytes(config) };
    map.update(&0u32.to_ne_bytes(), bytes, MapFlags::ANY)
        .context("writing the probe configuration")
}

/// Fill a filter set map (keys only; the value is a present flag).
fn write_set(object: &Object, name: &str, keys: impl Iterator<Item = Vec<u8>>) -> Result<()> {
    let map = find_map(object, name)?;
    for key in keys {
        map.update(&key, &[1], MapFlags::ANY)
            .with_context(|| format!("filling the {name} filter"))?;
    }
    Ok(())
}
