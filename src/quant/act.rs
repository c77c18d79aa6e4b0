//! Activation statistics for static quantization: a streaming histogram of `|x|` with bounded memory
//! ([`AbsHistogram`]), from which a calibration method picks the clipping threshold of a per-tensor scale.

use serde::{Deserialize, Serialize};

/// Bins of [`AbsHistogram`].
pub const HISTOGRAM_BINS: usize = 2048;

/// A histogram of `|x|` over `[0, range]` in [`HISTOGRAM_BINS`] equal bins. When a value beyond the range arrives,
/// the range doubles and pairs of bins merge, so memory stays fixed and no count is lost; `max` is the exact
/// largest `|x|` seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbsHistogram {
    pub bins: Vec<u64>,
    /// Upper edge of the last bin (0 before the first non-zero value).
    pub range: f32,
    /// Largest `|x|` seen.
    pub max: f32,
    /// Values seen (non-finite ones are not counted; they are reported by the caller).
    pub count: u64,
}

impl Default for AbsHistogram {
    fn default() -> Self {
        AbsHistogram::new()
    }
}

impl AbsHistogram {
    pub fn new() -> AbsHistogram {
        AbsHistogram {
            bins: vec![0; HISTOGRAM_BINS],
            range: 0.0,
            max: 0.0,
            count: 0,
        }
    }

    /// Width of one bin.
    pub fn bin_width(&self) -> f32 {
        self.range / HISTOGRAM_BINS as f32
    }

    /// Grows the range (doubling, merging bin pairs) until it covers `value`.
    fn cover(&mut self, value: f32) {
        if self.range == 0.0 {
            // The first range: the next power of two above the first value, so later doublings stay exact.
            self.range = 2f32.powi(value.log2().ceil() as i32).max(f32::MIN_POSITIVE);
            if self.range < value {
                self.range *= 2.0;
            }
            return;
        }
        while self.range < value {
            for i in 0..HISTOGRAM_BINS / 2 {
                self.bins[i] = self.bins[2 * i] + self.bins[2 * i + 1];
            }
            self.bins[HISTOGRAM_BINS / 2..].iter_mut().for_each(|b| *b = 0);
            self.range *= 2.0;
        }
    }

    /// Adds the values of `x` (their absolute values; non-finite ones are skipped).
    pub fn observe(&mut self, x: &[f32]) {
        let batch_max = x.iter().filter(|v| v.is_finite()).fold(0f32, |m, v| m.max(v.abs()));
        if batch_max > 0.0 {
            self.cover(batch_max);
            self.max = self.max.max(batch_max);
        }
        let scale = if self.range > 0.0 {
            HISTOGRAM_BINS as f32 / self.range
        } else {
            0.0
        };
        for v in x.iter().filter(|v| v.is_finite()) {
            let bin = ((v.abs() * scale) as usize).min(HISTOGRAM_BINS - 1);
            self.bins[bin] += 1;
            self.count += 1;
        }
    }

    /// Adds another histogram (the wider range wins; the narrower one's bins are merged into it).
    pub fn merge(&mut self, other: &AbsHistogram) {
        if other.count == 0 {
            return;
        }
        let mut other = other.clone();
        if self.range < other.range {
            std::mem::swap(self, &mut other);
        }
        // Both ranges are powers of two times the same base only if they started alike; rebin by bin centre.
        let ratio = other.range / self.range.max(f32::MIN_POSITIVE);
        for (i, &n) in other.bins.iter().enumerate() {
            if n > 0 {
                let centre = (i as f32 + 0.5) * ratio;
                let bin = (centre as usize).min(HISTOGRAM_BINS - 1);
                self.bins[bin] += n;
            }
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_keeps_every_count_while_growing() {
        let mut h = AbsHistogram::new();
        h.observe(&[0.1, -0.2, 0.3]);
        h.observe(&[5.0, -7.5]);
        assert_eq!(h.count, 5);
        assert_eq!(h.bins.iter().sum::<u64>(), 5);
        assert_eq!(h.max, 7.5);
        assert!(h.range >= 7.5);
        let mut other = AbsHistogram::new();
        other.observe(&[100.0]);
        h.merge(&other);
        assert_eq!(h.count, 6);
        assert_eq!(h.max, 100.0);
        assert_eq!(h.bins.iter().sum::<u64>(), 6);
    }
}
