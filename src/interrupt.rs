//! The process-wide stop request: set once by the binary's signal handler (SIGINT, SIGTERM), read by everything that
//! can wait long (the evaluation loop between batches, W&B uploads and their retries, downloads), so that a stop is
//! honoured within about a second wherever segq is waiting.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static STOP: AtomicBool = AtomicBool::new(false);

/// Asks every long wait to stop; returns whether a stop had already been asked for.
pub fn request_stop() -> bool {
    STOP.swap(true, Ordering::SeqCst)
}

/// Whether a stop has been asked for.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Sleeps for `duration` in short slices; returns `false` (early) when a stop is asked for meanwhile.
pub fn sleep_unless_stopped(duration: Duration) -> bool {
    let deadline = Instant::now() + duration;
    loop {
        if stop_requested() {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
    }
}
