//! What only trying can tell: whether the kernel loads and attaches an fentry program,
//! and whether it has a BPF ring buffer.

use std::os::fd::OwnedFd;

use libbpf_rs::MapType;
use tcpconnlat_compat::{Features, Finding};

/// A BPF ring buffer map can be created (Linux 5.8+).
pub fn ringbuf() -> Finding<()> {
    match MapType::RingBuf.is_supported() {
        Ok(true) => Finding::Yes(()),
        Ok(false) => Finding::No("no BPF ring buffer (Linux 5.8+)".to_owned()),
        Err(e) => Finding::Unknown(e.to_string()),
    }
}

/// Load a two-instruction fentry program on `target` (tcp_v4_connect's BTF id) and attach
/// it; the link, which detaches it when dropped.
pub fn fentry(features: &Features, target: Option<u32>) -> Result<OwnedFd, String> {
    use libbpf_rs::libbpf_sys as sys;
    use std::os::fd::{AsRawFd, FromRawFd};
    if !features.btf {
        return Err("no kernel BTF".to_owned());
    }
    let id = target.ok_or("tcp_v4_connect is not in the kernel's BTF")?;
    // r0 = 0; exit.
    let insns = [
        sys::bpf_insn {
            code: (sys::BPF_ALU64 | sys::BPF_MOV | sys::BPF_K) as u8,
            ..Default::default()
        },
        sys::bpf_insn {
            code: (sys::BPF_JMP | sys::BPF_EXIT) as u8,
            ..Default::default()
        },
    ];
    let mut opts = sys::bpf_prog_load_opts {
        sz: std::mem::size_of::<sys::bpf_prog_load_opts>() as sys::size_t,
        expected_attach_type: sys::BPF_TRACE_FENTRY,
        attach_btf_id: id,
        ..Default::default()
    };
    // SAFETY: every pointer is valid for the call; libbpf returns a new fd or -errno.
    let prog = unsafe {
        sys::bpf_prog_load(
            sys::BPF_PROG_TYPE_TRACING,
            c"trial_fentry".as_ptr(),
            c"Dual BSD/GPL".as_ptr(),
            insns.as_ptr(),
            insns.len() as sys::size_t,
            &mut opts,
        )
    };
    if prog < 0 {
        return Err(std::io::Error::from_raw_os_error(-prog).to_string());
    }
    // SAFETY: a descriptor just created, owned by nothing else.
    let prog = unsafe { OwnedFd::from_raw_fd(prog) };
    // SAFETY: as above; a null name attaches a tracing program to its BTF target.
    let link = unsafe { sys::bpf_raw_tracepoint_open(std::ptr::null(), prog.as_raw_fd()) };
    if link < 0 {
        let e = std::io::Error::from_raw_os_error(-link);
        return Err(format!("attach: {e}"));
    }
    // SAFETY: as above; closing it detaches the program.
    Ok(unsafe { OwnedFd::from_raw_fd(link) })
}
