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

/// What [`recv_unless_stopped`] got.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<T> {
    Value(T),
    /// The deadline passed first.
    TimedOut,
    /// A stop was asked for first.
    Stopped,
    /// The sender is gone without sending (its thread ended or panicked).
    Disconnected,
}

/// Waits for a value from `receiver` (typically a worker thread stuck in a blocking call that cannot poll the stop
/// request itself: a socket read) until `deadline`, noticing a stop request within 50 ms. The worker is not
/// stopped: the caller abandons it, and it ends at its own timeout or with the process.
pub fn recv_unless_stopped<T>(receiver: &std::sync::mpsc::Receiver<T>, deadline: Option<Instant>) -> Received<T> {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        if stop_requested() {
            return Received::Stopped;
        }
        let slice = match deadline {
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    return Received::TimedOut;
                }
                (deadline - now).min(Duration::from_millis(50))
            }
            None => Duration::from_millis(50),
        };
        match receiver.recv_timeout(slice) {
            Ok(value) => return Received::Value(value),
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return Received::Disconnected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The stop flag is process-wide and never cleared, so these tests never set it.
    #[test]
    fn receives_times_out_and_notices_a_dead_sender() {
        let (sender, receiver) = std::sync::mpsc::channel();
        sender.send(7).unwrap();
        assert_eq!(recv_unless_stopped(&receiver, None), Received::Value(7));
        let soon = Instant::now() + Duration::from_millis(120);
        assert_eq!(recv_unless_stopped(&receiver, Some(soon)), Received::TimedOut);
        assert!(Instant::now() >= soon);
        drop(sender);
        assert_eq!(recv_unless_stopped(&receiver, None), Received::Disconnected);
    }
}
