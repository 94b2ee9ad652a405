//! Start-up steps, timed for `-v`: where the time to attached goes (the benchmark shows it).

use std::cell::RefCell;
use std::time::{Duration, Instant};

thread_local! {
    static STEPS: RefCell<Vec<(&'static str, Duration)>> = const { RefCell::new(Vec::new()) };
}

/// Run one named step of start-up, timing it.
pub fn step<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let result = f();
    let took = started.elapsed();
    STEPS.with(|steps| steps.borrow_mut().push((name, took)));
    result
}

/// The steps timed so far, e.g. "kernel BTF 41.2 ms, load 80.3 ms".
pub fn summary() -> String {
    STEPS.with(|steps| {
        steps
            .borrow()
            .iter()
            .map(|(name, took)| format!("{name} {:.1} ms", took.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    })
}
