//! What tcpconnlat may do: whether it can load BPF at all, and giving up every capability
//! it no longer needs once attached.

use anyhow::{Context, Result};

/// CAP_BPF + CAP_PERFMON (Linux 5.8+) or CAP_SYS_ADMIN.
pub fn privileged() -> bool {
    use caps::{has_cap, CapSet, Capability};
    let has = |c| has_cap(None, CapSet::Effective, c).unwrap_or(false);
    has(Capability::CAP_SYS_ADMIN) || (has(Capability::CAP_BPF) && has(Capability::CAP_PERFMON))
}

/// Once attached, the tracer needs almost no privilege: it reads its buffers through shared
/// memory and its maps through descriptors it holds, and removing its tracefs kprobe events
/// on exit needs only root's ownership of the file. Kernels before 6.5 still check
/// CAP_BPF (or CAP_SYS_ADMIN before 5.8) on every bpf() call while unprivileged BPF is off;
/// that one capability is kept only if `works_without` says reading a map fails without it.
pub fn drop_capabilities(works_without: impl Fn() -> bool) -> Result<()> {
    use caps::{CapSet, Capability};
    let context = || "dropping capabilities after attaching";
    let keep = [Capability::CAP_BPF, Capability::CAP_SYS_ADMIN]
        .into_iter()
        .find(|&c| caps::has_cap(None, CapSet::Effective, c).unwrap_or(false));
    for set in [CapSet::Ambient, CapSet::Inheritable] {
        caps::clear(None, set).with_context(context)?;
    }
    let kept: caps::CapsHashSet = keep.into_iter().collect();
    caps::set(None, CapSet::Effective, &caps::CapsHashSet::new()).with_context(context)?;
    if works_without() {
        caps::clear(None, CapSet::Permitted).with_context(context)?;
    } else {
        caps::set(None, CapSet::Permitted, &kept).with_context(context)?;
        caps::set(None, CapSet::Effective, &kept).with_context(context)?;
    }
    Ok(())
}
