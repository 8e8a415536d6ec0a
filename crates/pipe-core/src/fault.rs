//! Crash points for the kill tests: with `PIPE_FAULT=<point>[:<n>]` in the environment, the
//! process kills itself with SIGKILL the n-th time (default: first) it reaches that point,
//! exactly as `kill -9` would. This is how the tests prove that a kill at any step of a
//! commit leaves a store that resumes.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The named steps a run passes through for one stage.
pub const POINTS: &[&str] = &[
    "attempt-started",       // the stage's work directory is prepared, nothing ran yet
    "commit-objects-stored", // outputs moved into objects/, entry view not built
    "commit-view-built",     // entry view in place, manifest not written
    "commit-manifest-written", // manifest written, the run has not recorded it
    "pull-objects-fetched",  // a pull's objects are in the store, its entry is not
    "push-objects-sent",     // a push's objects are in the remote, its manifest is not
];

pub fn point(name: &str) {
    debug_assert!(POINTS.contains(&name), "unknown fault point {name}");
    static REACHED: AtomicUsize = AtomicUsize::new(0);
    let Ok(spec) = std::env::var("PIPE_FAULT") else {
        return;
    };
    let (point, nth) = match spec.split_once(':') {
        Some((p, n)) => (p.to_string(), n.parse().unwrap_or(1)),
        None => (spec, 1),
    };
    if point == name && REACHED.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        // SAFETY: raise(3) is always safe to call.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
    }
}
