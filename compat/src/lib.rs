//! What the running kernel can do, and which tracing mode to use on it.
//!
//! Everything here is pure logic over a root directory (normally `/`), so tests feed it
//! fixture trees captured from real kernels. The few capabilities that can only be known by
//! trying (loading an fentry program) are tried by the caller and handed in as [`Findings`].

pub mod btf;
pub mod discover;
pub mod features;
#[cfg(feature = "fixtures")]
pub mod fixtures;
pub mod hooks;
pub mod kallsyms;
pub mod kversion;
pub mod plan;
pub mod tracefs;

pub use features::{Features, Finding, Findings, KernelVersion};
pub use hooks::{
    plan_hooks, Attach, HookChoice, HookPlan, ModeSpec, OffsetNeed, ProbeObject, RecordRead,
    Tracepoint, Transport,
};
pub use kallsyms::{AttachPoints, Func};
pub use plan::{Mode, Plan, Step, Unsupported};
pub use tracefs::StateLayout;
