//! Resource limits: the one place that says how large a number read from a file or a flag may be before segq
//! allocates for it, and how much memory the machine can give. Every size that comes from outside (image headers,
//! processor and model configs, batch sizes, thread counts, downloads) is checked here first, so hostile or mistaken
//! input gets one clear line instead of an abort, a hang or a machine brought down.

use crate::{Error, Result};

/// Images larger than this are refused before decoding, as Pillow refuses them (`DecompressionBombError` above twice
/// `Image.MAX_IMAGE_PIXELS` = 89,478,485): every image Python opens, segq opens. Raised with `--max-image-pixels`.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

/// The most compute threads or decoding workers segq starts; larger requests are clamped with a warning. Beyond a few
/// hundred, threads only cost memory (each has its own stack) and start-up time.
pub const MAX_THREADS: usize = 256;

/// Largest side of a model input (processor `size`, `bench --size`): 16384 is 4x Cityscapes' width.
pub const MAX_INPUT_SIDE: usize = 16384;

/// Largest batch size accepted from a flag or a config.
pub const MAX_BATCH_SIZE: usize = 4096;

/// Default cap on one downloaded file (a model's weights): SegFormer-B5 is 340 MB, so 20 GiB leaves room for any
/// SegFormer while an endless body is stopped. Raised with `SEGQ_MAX_DOWNLOAD_BYTES`.
pub const DEFAULT_MAX_DOWNLOAD_BYTES: u64 = 20 << 30;

/// Clamps a requested thread or worker count (`what` names the flag or key) to [`MAX_THREADS`], warning when it does.
/// 0 stays 0 (the callers read it as "one per core").
pub fn clamp_threads(requested: usize, what: &str) -> usize {
    if requested > MAX_THREADS {
        tracing::warn!("{what} = {requested} is more than segq starts; using {MAX_THREADS}");
        MAX_THREADS
    } else {
        requested
    }
}

/// Memory the system can give this process now: the smaller of `MemAvailable` and what is left under the cgroup's
/// `memory.max`. `None` where neither can be read (not Linux): checks against it then pass.
pub fn available_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        text.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    let cgroup = (|| {
        let max = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok()?;
        let max: u64 = max.trim().parse().ok()?; // "max" (no limit) does not parse
        let current: u64 = std::fs::read_to_string("/sys/fs/cgroup/memory.current")
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(max.saturating_sub(current))
    })();
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Refuses an allocation of `bytes` for `what` (names the file, key or flag) when it exceeds the memory available.
/// `hint` says how to make it smaller or raise the limit.
pub fn check_fits_in_memory(what: &str, bytes: u64, hint: &str) -> Result<()> {
    let Some(available) = available_memory_bytes() else {
        return Ok(());
    };
    if bytes > available {
        return Err(Error::unsupported(
            what,
            format!(
                "needs about {} of memory, more than the {} available{}",
                human_bytes(bytes),
                human_bytes(available),
                if hint.is_empty() {
                    String::new()
                } else {
                    format!("; {hint}")
                }
            ),
        ));
    }
    Ok(())
}

/// Product of sizes read from input, or an error naming `what` when it overflows `u64`.
pub fn checked_product(what: &str, factors: &[u64]) -> Result<u64> {
    factors
        .iter()
        .try_fold(1u64, |acc, &f| acc.checked_mul(f))
        .ok_or_else(|| Error::unsupported(what, format!("sizes {factors:?} overflow")))
}

/// Reads a small text file (a config, a list, a results file) of at most `max_bytes`, refusing a larger one (it is
/// not the file it claims to be) before reading it, so a mistaken path to a multi-gigabyte file costs nothing.
pub fn read_text_capped(path: &std::path::Path, max_bytes: u64) -> Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > max_bytes {
        return Err(Error::unsupported(
            path.display().to_string(),
            format!(
                "file is {}, more than the {} segq reads for this kind of file",
                human_bytes(len),
                human_bytes(max_bytes)
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // `take`: a file that grows while being read still stops at the cap.
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max_bytes {
        return Err(Error::unsupported(
            path.display().to_string(),
            format!("file grew past {}", human_bytes(max_bytes)),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        Error::invalid(
            path.display().to_string(),
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// Bytes as a person reads them: "3.2 GiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamps_only_above_the_maximum() {
        assert_eq!(clamp_threads(0, "--threads"), 0);
        assert_eq!(clamp_threads(8, "--threads"), 8);
        assert_eq!(clamp_threads(100_000, "--threads"), MAX_THREADS);
    }

    #[test]
    fn refuses_more_than_the_machine_has() {
        if available_memory_bytes().is_some() {
            let err = check_fits_in_memory("--batch-size", u64::MAX / 2, "use a smaller batch").unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("--batch-size") && text.contains("use a smaller batch"),
                "{text}"
            );
        }
        check_fits_in_memory("small", 1024, "").unwrap();
    }

    #[test]
    fn products_that_overflow_are_errors() {
        assert_eq!(checked_product("x", &[2, 3, 4]).unwrap(), 24);
        assert!(checked_product("config.json depths", &[1 << 62, 1 << 4]).is_err());
    }

    #[test]
    fn bytes_read_as_a_person_reads_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
