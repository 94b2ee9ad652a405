//! How a mode's programs read the state tracepoint's record on this kernel. The hook
//! tables and the planning from them are compat's (`tcpconnlat_compat::hooks`).

use tcpconnlat_compat::{RecordRead, StateLayout};

use super::objects::is_state_record;

/// Direct where the kernel's record is `struct state_record` and `preferred` allows it
/// (the hidden `--record-offsets` prefers the path other kernels take, for tests).
pub fn record_read(layout: Option<&StateLayout>, preferred: RecordRead) -> RecordRead {
    if preferred == RecordRead::Direct && layout.is_some_and(is_state_record) {
        RecordRead::Direct
    } else {
        RecordRead::AtOffsets
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracer::objects::{self, maps};
    use libbpf_rs::ObjectBuilder;
    use tcpconnlat_compat::Mode;

    /// Every map the loader and the event stream open by name is in the object of each
    /// mode (build.rs holds the programs to compat's tables; the map constants come from
    /// the objects, but from all of them together).
    #[test]
    fn every_map_userspace_opens_is_in_each_modes_object() {
        for mode in Mode::ALL {
            let spec = mode.spec();
            let open = ObjectBuilder::default()
                .open_memory(objects::bytes(spec.object))
                .unwrap();
            let map_names: Vec<String> = open
                .maps()
                .map(|m| m.name().to_string_lossy().into_owned())
                .collect();
            let used = [
                maps::CONFIG_MAP,
                maps::PENDING,
                maps::PIDS,
                maps::DPORTS,
                maps::COUNTERS,
            ];
            let buffers = spec.transports().iter().map(|t| t.map());
            for name in used.into_iter().chain(buffers) {
                assert!(map_names.iter().any(|m| m == name), "{mode}: no map {name}");
            }
        }
    }

    /// The record layout of every kernel we captured from 5.6 on (a 16-bit protocol) is
    /// the one the probes read directly; older ones, and any other layout, are read at
    /// their offsets.
    #[test]
    fn known_records_are_read_directly_and_others_at_their_offsets() {
        use tcpconnlat_compat::KernelVersion;
        let fixtures = tcpconnlat_compat::fixtures::root("");
        let mut seen = 0;
        for kernel in std::fs::read_dir(fixtures).unwrap() {
            let root = kernel.unwrap().path();
            let format = root.join("sys/kernel/tracing/events/sock/inet_sock_set_state/format");
            let Ok(text) = std::fs::read_to_string(&format) else {
                continue;
            };
            let release = std::fs::read_to_string(root.join("proc/sys/kernel/osrelease")).unwrap();
            let modern = KernelVersion::parse(&release).unwrap() >= KernelVersion(5, 6, 0);
            let layout = StateLayout::from_format(&text).unwrap();
            assert_eq!(is_state_record(&layout), modern, "{}", format.display());
            seen += 1;
            if !modern {
                continue;
            }

            let mut older = layout.clone();
            older.protocol = None;
            assert!(!is_state_record(&older));
            let mut moved = layout;
            moved.daddr_v6 += 8;
            assert!(!is_state_record(&moved));
        }
        assert!(seen >= 6, "{seen} fixtures");
    }
}
