//! The compiled probe objects (built from `probes/` by build.rs), the structs and
//! constants shared with them (generated from `probes/tcpconnlat.h` through BTF), the names
//! of their maps (generated from the objects), and the struct sock offsets built in from
//! kernel headers.

// Generated code: not ours to lint.
#[allow(clippy::all)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/types.skel.rs"));
}

pub use skel::types::{
    address_family as AddressFamily, answer as Answer, config as Config, counter as Counter,
    discover_config as DiscoverConfig, discover_mark as DiscoverMark, end_kind as RawEnd,
    event as RawEvent, outcome as RawOutcome, pending as RawPending, report as Report,
    snapshot_phase as SnapshotPhase, snapshot_size as SnapshotSize, sock_layout as RawSockLayout,
    state_layout as RawStateLayout, state_record as RawStateRecord,
};

/// The kernel's TASK_COMM_LEN: a process name with its NUL.
pub const COMM_LEN: usize = skel::types::limits::COMM_LEN.0 as usize;

// SAFETY: all are #[repr(C)] plain integers and byte arrays, with explicit padding
// fields, generated from the C header: every bit pattern is a valid value.
unsafe impl plain::Plain for RawEvent {}
unsafe impl plain::Plain for RawPending {}
unsafe impl plain::Plain for Config {}
unsafe impl plain::Plain for RawSockLayout {}
unsafe impl plain::Plain for DiscoverConfig {}
unsafe impl plain::Plain for DiscoverMark {}

mod generated {
    use tcpconnlat_compat::ProbeObject;
    include!(concat!(env!("OUT_DIR"), "/probe_names.rs"));
}

/// Each compiled probe object (build.rs), and the names of their maps as constants
/// generated from the objects: a map renamed in C alone fails the build.
pub use generated::{bytes, maps};

use tcpconnlat_compat::btf::SockOffsets;
use tcpconnlat_compat::StateLayout;

mod built_in {
    include!(concat!(env!("OUT_DIR"), "/header_offsets.rs"));
}

/// struct sock offsets compiled in from kernel headers (KERNEL_HEADERS at build time).
pub fn header_offsets(release: &str) -> Option<SockOffsets> {
    let (_, values) = built_in::HEADER_OFFSETS
        .iter()
        .find(|(r, _)| *r == release)?;
    Some(SockOffsets(*values))
}

/// The probes' `struct sock_layout`: the offsets in the same order (sock_fields.h), which
/// a test holds to the struct's BTF.
pub fn sock_layout(offsets: &SockOffsets) -> RawSockLayout {
    let mut layout = RawSockLayout::default();
    // SAFETY: RawSockLayout is plain data: SOCK_FIELDS u16s, no padding.
    let bytes = unsafe { plain::as_mut_bytes(&mut layout) };
    for (chunk, offset) in bytes.chunks_exact_mut(2).zip(offsets.0) {
        chunk.copy_from_slice(&offset.to_ne_bytes());
    }
    layout
}

/// Applies `$then` to the fields that compat's `StateLayout` (what the kernel's format
/// file says), the probes' `struct state_layout` (those offsets, handed to the probes) and
/// `struct state_record` (the record as kernels from 5.6 lay it out) all have: the one
/// list of them on this side.
macro_rules! state_record_fields {
    ($then:ident) => {
        $then!(skaddr, oldstate, newstate, sport, dport, family, saddr, daddr, saddr_v6, daddr_v6)
    };
}

/// The probes' `struct state_layout`: where the kernel's sock:inet_sock_set_state record
/// keeps each field.
pub fn state_layout(layout: &StateLayout) -> RawStateLayout {
    macro_rules! copy {
        ($($field:ident),*) => {
            RawStateLayout {
                $($field: layout.$field,)*
                protocol: layout.protocol.unwrap_or(0),
                protocol_size: layout.protocol_size,
            }
        };
    }
    state_record_fields!(copy)
}

/// Whether the kernel's state tracepoint record is laid out as `struct state_record`,
/// which the probes then read directly instead of field by field through bpf_probe_read.
pub fn is_state_record(layout: &StateLayout) -> bool {
    use std::mem::{offset_of, size_of};
    macro_rules! same {
        ($($field:ident),*) => {
            $(usize::from(layout.$field) == offset_of!(RawStateRecord, $field))&&*
        };
    }
    state_record_fields!(same)
        && layout.protocol.map(usize::from) == Some(offset_of!(RawStateRecord, protocol))
        && usize::from(layout.protocol_size) == size_of::<u16>()
}

#[cfg(test)]
mod tests {
    use libbpf_rs::btf::types::{Composite, MemberAttr};
    use libbpf_rs::btf::Btf;
    use tcpconnlat_compat::btf::sock_fields;

    /// The probes' struct sock_layout, as compiled (its BTF), is sock_fields.h's list: the
    /// same names in the same order, 16 bits each, so `sock_layout` may copy in order.
    #[test]
    fn sock_layout_is_the_sock_fields_list() {
        let object = super::bytes(tcpconnlat_compat::ProbeObject::Types);
        let btf = Btf::from_raw("types", object).unwrap().unwrap();
        let layout = btf.type_by_name::<Composite<'_>>("sock_layout").unwrap();
        let members: Vec<(String, u32)> = layout
            .iter()
            .map(|m| {
                let MemberAttr::Normal { offset } = m.attr else {
                    panic!("bitfield in sock_layout")
                };
                (m.name.unwrap().to_string_lossy().into_owned(), offset)
            })
            .collect();
        let expected: Vec<(String, u32)> = sock_fields()
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.to_owned(), i as u32 * 16))
            .collect();
        assert_eq!(members, expected);
        assert_eq!(
            std::mem::size_of::<super::RawSockLayout>(),
            2 * sock_fields().len()
        );
    }
}
