//! Facts about this process and machine for logs and results: peak resident memory, heap bytes in use (with [`CountingAlloc`]), CPU model, core count.

/// Peak resident set size of this process in bytes (`VmHWM` from /proc/self/status; 0 where unavailable).
pub fn peak_rss_bytes() -> u64 {
    read_status_kb("VmHWM:") * 1024
}

/// Current resident set size in bytes (`VmRSS`).
pub fn current_rss_bytes() -> u64 {
    read_status_kb("VmRSS:") * 1024
}

fn read_status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Resets the kernel's peak-RSS mark so each quantization level's peak can be measured on its own (Linux 4.0+).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The CPU's model name from /proc/cpuinfo, or the architecture.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

pub fn logical_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// A global allocator wrapper that counts the bytes in use and their high-water mark, so a benchmark can report
/// the memory inference itself needs (weights + working buffers), independent of how much freed memory the
/// underlying allocator keeps mapped. The binary installs it around its allocator; without it the counters stay 0.
pub struct CountingAlloc<A>(pub A);

static HEAP_IN_USE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static HEAP_PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl<A> CountingAlloc<A> {
    fn grew(by: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = HEAP_IN_USE.fetch_add(by, Relaxed) + by;
        HEAP_PEAK.fetch_max(now, Relaxed);
    }

    fn shrank(by: usize) {
        HEAP_IN_USE.fetch_sub(by, std::sync::atomic::Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the wrapped allocator; the counters have no effect on allocation.
unsafe impl<A: std::alloc::GlobalAlloc> std::alloc::GlobalAlloc for CountingAlloc<A> {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.0.dealloc(ptr, layout) };
        Self::shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            Self::shrank(layout.size());
            Self::grew(new_size);
        }
        p
    }
}

/// Heap bytes in use now (0 unless the binary installed [`CountingAlloc`]).
pub fn heap_bytes() -> usize {
    HEAP_IN_USE.load(std::sync::atomic::Ordering::Relaxed)
}

/// The most heap bytes in use at once since the last [`reset_peak_heap`].
pub fn peak_heap_bytes() -> usize {
    HEAP_PEAK.load(std::sync::atomic::Ordering::Relaxed)
}

/// Starts a new high-water mark at the current use.
pub fn reset_peak_heap() {
    HEAP_PEAK.store(heap_bytes(), std::sync::atomic::Ordering::Relaxed);
}
