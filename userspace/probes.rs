//! The compiled probe objects (built from `probes/` by build.rs) and the structs shared
//! with them, generated from `probes/tcpconnlat.h` through BTF.

// Generated code: not ours to lint.
#[allow(clippy::all)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/types.skel.rs"));
}

pub use skel::types::{config as Config, event as RawEvent, state_layout as RawStateLayout};

// SAFETY: both are #[repr(C)] plain integers and byte arrays, with explicit padding
// fields, generated from the C header: every bit pattern is a valid value.
unsafe impl plain::Plain for RawEvent {}
unsafe impl plain::Plain for Config {}

/// fentry and kprobe programs (CO-RE) plus the tracepoint that forgets failed connects.
pub const CORE_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tcpconnlat.bpf.o"));
/// Tracepoint mode: no CO-RE relocation, loads without BTF.
pub const TRACEPOINT_OBJECT: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tcpconnlat_tp.bpf.o"));
/// One fentry program, loaded once to learn whether the kernel allows fentry.
pub const TRIAL_FENTRY_OBJECT: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/trial_fentry.bpf.o"));
