//! Joining the I/O threads of a tier or a ring when it is dropped, within a bound: a read of a
//! disk or mount that stops answering never returns, and a drop that waited for it would hang the
//! shutdown of the whole process.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a dropped store or ring waits for its threads to finish the I/O in hand.
pub const DROP_WAIT: Duration = Duration::from_secs(10);

/// Join each of `threads` that finishes within `wait` (all of them together); a thread still
/// running then (blocked in a read) is left to end on its own, with a notice naming `what`.
pub fn join_within(threads: Vec<JoinHandle<()>>, wait: Duration, what: &str) {
    let deadline = Instant::now() + wait;
    let mut left = 0;
    for t in threads {
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            left += 1;
        }
    }
    if left > 0 {
        crate::say!(
            "semoe: {left} {what} thread(s) still in an I/O call after {:.0} s; left to end on their own",
            wait.as_secs_f64()
        );
    }
}
