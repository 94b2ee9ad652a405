//! The compiled probe objects (built from `probes/` by build.rs) and the structs shared
//! with them, generated from `probes/tcpconnlat.h` through BTF.

// Generated code: not ours to lint.
#[allow(clippy::all)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/types.skel.rs"));
}

pub use skel::types::{
    config as Config, event as RawEvent, sock_layout as RawSockLayout,
    state_layout as RawStateLayout, state_record as RawStateRecord,
};

// SAFETY: both are #[repr(C)] plain integers and byte arrays, with explicit padding
// fields, generated from the C header: every bit pattern is a valid value.
unsafe impl plain::Plain for RawEvent {}
unsafe impl plain::Plain for Config {}

/// fentry and kprobe programs (CO-RE) plus the tracepoint that forgets failed connects.
pub const CORE_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tcpconnlat.bpf.o"));
/// Tracepoint mode: no CO-RE relocation, loads without BTF.
pub const TRACEPOINT_OBJECT: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tcpconnlat_tp.bpf.o"));
/// Legacy mode: kprobes, no CO-RE, no global data, perf buffer; loads without BTF.
pub const LEGACY_OBJECT: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tcpconnlat_legacy.bpf.o"));
/// One fentry program, loaded once to learn whether the kernel allows fentry.
pub const TRIAL_FENTRY_OBJECT: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/trial_fentry.bpf.o"));

mod built_in {
    include!(concat!(env!("OUT_DIR"), "/header_offsets.rs"));
}

/// struct sock offsets compiled in from kernel headers (KERNEL_HEADERS at build time).
pub fn header_offsets(release: &str) -> Option<tcpconnlat_compat::btf::SockOffsets> {
    use tcpconnlat_compat::btf::SockOffsets;
    let (_, values) = built_in::HEADER_OFFSETS
        .iter()
        .find(|(r, _)| *r == release)?;
    let names = SockOffsets::FIELDS.iter().map(|(name, _)| *name);
    SockOffsets::from_pairs(names.zip(values.iter().copied())).ok()
}
