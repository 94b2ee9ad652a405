//! A perf buffer whose kernel side wakes the reader once per batch of samples instead of
//! once per sample (`perf_event_attr.wakeup_events`), through libbpf's raw perf buffer API:
//! libbpf-rs's `PerfBuffer` always asks for a wakeup per sample, and those wakeups cost
//! more than the probes (README, Performance). The reader drains on a timer anyway, so a
//! batch only bounds how full a CPU's buffer gets before it is woken early.

use std::ffi::c_void;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::ptr::NonNull;

use anyhow::{bail, Result};
use libbpf_rs::libbpf_sys as sys;

/// What a CPU's buffer delivered.
pub enum Sample<'a> {
    Data(&'a [u8]),
    /// The kernel had to drop this many samples: the buffer was full.
    Lost(u64),
}

/// Called with the CPU whose buffer delivered the sample.
type Callback<'cb> = Box<dyn FnMut(u32, Sample<'_>) + 'cb>;

pub struct BatchedPerfBuffer<'cb> {
    ptr: NonNull<sys::perf_buffer>,
    /// Handed to libbpf as the callbacks' context; freed after the buffer.
    callback: *mut Callback<'cb>,
}

impl<'cb> BatchedPerfBuffer<'cb> {
    /// Per-CPU buffers of `pages` pages (a power of two) on the perf event array `map`,
    /// waking the reader after every `batch` samples.
    pub fn new(
        map: &impl AsFd,
        pages: usize,
        batch: u32,
        callback: impl FnMut(u32, Sample<'_>) + 'cb,
    ) -> Result<BatchedPerfBuffer<'cb>> {
        if !pages.is_power_of_two() {
            bail!("perf buffer pages must be a power of two");
        }
        // What libbpf's perf_buffer__new asks for, but the wakeup period.
        let mut attr = sys::perf_event_attr {
            type_: sys::PERF_TYPE_SOFTWARE,
            size: std::mem::size_of::<sys::perf_event_attr>() as u32,
            config: u64::from(sys::PERF_COUNT_SW_BPF_OUTPUT),
            sample_type: u64::from(sys::PERF_SAMPLE_RAW),
            ..Default::default()
        };
        attr.__bindgen_anon_1.sample_period = 1;
        attr.__bindgen_anon_2.wakeup_events = batch.max(1);
        let callback: *mut Callback<'cb> = Box::into_raw(Box::new(Box::new(callback)));
        // SAFETY: attr and opts outlive the call (libbpf copies what it keeps); the
        // context pointer stays valid until Drop frees it after perf_buffer__free.
        let ptr = unsafe {
            sys::perf_buffer__new_raw(
                map.as_fd().as_raw_fd(),
                pages as sys::size_t,
                &mut attr,
                Some(on_event),
                callback.cast(),
                std::ptr::null(),
            )
        };
        match NonNull::new(ptr) {
            Some(ptr) => Ok(BatchedPerfBuffer { ptr, callback }),
            None => {
                let error = std::io::Error::last_os_error();
                // SAFETY: libbpf did not keep the context: the call failed.
                drop(unsafe { Box::from_raw(callback) });
                bail!("creating the perf buffer: {error}")
            }
        }
    }

    /// Readable when some CPU's buffer has a batch (or the kernel lost samples).
    pub fn epoll_fd(&self) -> RawFd {
        // SAFETY: self.ptr is a live perf buffer.
        unsafe { sys::perf_buffer__epoll_fd(self.ptr.as_ptr()) }
    }

    /// Hand everything queued on every CPU to the callback.
    pub fn consume(&self) -> Result<()> {
        // SAFETY: self.ptr is a live perf buffer; callbacks run on this thread, now.
        let ret = unsafe { sys::perf_buffer__consume(self.ptr.as_ptr()) };
        if ret < 0 {
            bail!(
                "reading the perf buffer: {}",
                std::io::Error::from_raw_os_error(-ret)
            );
        }
        Ok(())
    }
}

impl Drop for BatchedPerfBuffer<'_> {
    fn drop(&mut self) {
        // SAFETY: the buffer is freed first, so no callback can run with the context after.
        unsafe {
            sys::perf_buffer__free(self.ptr.as_ptr());
            drop(Box::from_raw(self.callback));
        }
    }
}

/// A record as the kernel writes it: the header, then for PERF_SAMPLE_RAW a u32 size and
/// the data; for PERF_RECORD_LOST an id and the count.
unsafe extern "C" fn on_event(
    ctx: *mut c_void,
    cpu: i32,
    header: *mut sys::perf_event_header,
) -> sys::bpf_perf_event_ret {
    // SAFETY: ctx is the Callback this buffer was created with; header points at a whole
    // record of header.size bytes, copied out of the ring by libbpf if it wrapped.
    unsafe {
        let callback = &mut *ctx.cast::<Callback<'_>>();
        let record = std::slice::from_raw_parts(header.cast::<u8>(), (*header).size as usize);
        let body = &record[std::mem::size_of::<sys::perf_event_header>()..];
        match (*header).type_ {
            sys::PERF_RECORD_SAMPLE if body.len() >= 4 => {
                let size = u32::from_ne_bytes(body[..4].try_into().unwrap()) as usize;
                if let Some(data) = body.get(4..4 + size) {
                    callback(cpu as u32, Sample::Data(data));
                }
            }
            sys::PERF_RECORD_LOST if body.len() >= 16 => {
                callback(
                    cpu as u32,
                    Sample::Lost(u64::from_ne_bytes(body[8..16].try_into().unwrap())),
                );
            }
            _ => {}
        }
    }
    sys::LIBBPF_PERF_EVENT_CONT
}
