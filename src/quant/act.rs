//! Static activation quantization: a streaming histogram of `|x|` with bounded memory ([`AbsHistogram`]), the
//! calibration methods that pick a per-tensor clipping threshold from it ([`ActCalib`]: min/max, percentile, MSE,
//! entropy), and the activation formats those thresholds become scales of ([`ActFormat`]: int8, float8 e4m3).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How a static activation threshold is chosen from a layer input's `|x|` histogram (`--act-calib`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ActCalib {
    /// The largest `|x|` seen: nothing clipped, the widest steps (the default, as ONNX Runtime's).
    #[default]
    MinMax,
    /// The `|x|` below which this percentage of values lie (ONNX Runtime's default 99.999).
    Percentile(f64),
    /// The threshold minimising the expected squared error of quantizing (rounding plus clipping) the histogram.
    Mse,
    /// The threshold minimising the KL divergence between the clipped distribution and its quantized form
    /// (TensorRT's entropy calibration, as ONNX Runtime's `CalibrationMethod.Entropy`).
    Entropy,
}

/// The percentile [`ActCalib::parse`] gives plain `percentile` (ONNX Runtime's default).
pub const DEFAULT_PERCENTILE: f64 = 99.999;

impl ActCalib {
    /// Parses `minmax`, `percentile` (99.999), `percentile:P` (0 < P <= 100), `mse` or `entropy` (`kl` too).
    pub fn parse(text: &str) -> Result<ActCalib> {
        let text = text.trim().to_ascii_lowercase();
        let bad = |why: String| Error::config("act-calib", format!("activation calibration '{text}': {why}"));
        match text.split_once(':') {
            Some(("percentile", value)) => {
                let p: f64 = value
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("'{}' is not a number", value.trim())))?;
                if !(p > 0.0 && p <= 100.0) {
                    return Err(bad("the percentile must lie in (0, 100]".into()));
                }
                Ok(ActCalib::Percentile(p))
            }
            Some(_) => Err(bad("only percentile takes a value (percentile:99.99)".into())),
            None => match text.as_str() {
                "minmax" | "min-max" | "max" => Ok(ActCalib::MinMax),
                "percentile" => Ok(ActCalib::Percentile(DEFAULT_PERCENTILE)),
                "mse" => Ok(ActCalib::Mse),
                "entropy" | "kl" => Ok(ActCalib::Entropy),
                _ => Err(bad(
                    "expected minmax, percentile, percentile:P (e.g. percentile:99.99), mse or entropy".into(),
                )),
            },
        }
    }

    /// The canonical name, the one [`ActCalib::parse`] reads back: `minmax`, `percentile:99.999`, `mse`, `entropy`.
    pub fn name(self) -> String {
        match self {
            ActCalib::MinMax => "minmax".into(),
            ActCalib::Percentile(p) => format!("percentile:{p}"),
            ActCalib::Mse => "mse".into(),
            ActCalib::Entropy => "entropy".into(),
        }
    }
}

impl TryFrom<String> for ActCalib {
    type Error = Error;
    fn try_from(text: String) -> Result<ActCalib> {
        ActCalib::parse(&text)
    }
}

impl From<ActCalib> for String {
    fn from(calib: ActCalib) -> String {
        calib.name()
    }
}

impl std::str::FromStr for ActCalib {
    type Err = Error;
    fn from_str(text: &str) -> Result<ActCalib> {
        ActCalib::parse(text)
    }
}

impl std::fmt::Display for ActCalib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// The format a static level quantizes activations to, with one scale per tensor: `x ~ q(x / scale) * scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ActFormat {
    /// Symmetric int8, codes in [-127, 127] (`int8-static`, `w4a8`).
    #[serde(rename = "int8")]
    Int8,
    /// OCP float8 e4m3fn, saturating at +-448 (`w8a8-f8`).
    #[serde(rename = "f8e4m3fn")]
    F8E4m3,
}

impl ActFormat {
    /// The largest code magnitude: a threshold `t` becomes the scale `t / qmax`.
    pub fn qmax(self) -> f32 {
        match self {
            ActFormat::Int8 => 127.0,
            ActFormat::F8E4m3 => 448.0,
        }
    }

    /// The per-tensor scale that maps `threshold` to the largest code (0 for a threshold of 0: an input that was
    /// always zero quantizes to zero codes).
    pub fn scale_of(self, threshold: f32) -> f32 {
        if threshold.is_finite() && threshold > 0.0 {
            threshold / self.qmax()
        } else {
            0.0
        }
    }

    /// `v` (already divided by the scale) rounded to the format and saturated: round half to even and clamp to
    /// [-127, 127] for int8; for e4m3, 3 mantissa bits (subnormals below 2^-6) and +-448, as
    /// [`super::f8::E4M3FN`] encodes (a NaN stays NaN).
    #[inline]
    pub fn round(self, v: f32) -> f32 {
        match self {
            ActFormat::Int8 => v.round_ties_even().clamp(-127.0, 127.0),
            ActFormat::F8E4m3 => round_e4m3(v),
        }
    }

    /// `x` quantized with `scale` and dequantized (fake quantization); a zero scale gives zero.
    #[inline]
    pub fn fake_quant(self, x: f32, scale: f32) -> f32 {
        if scale > 0.0 {
            self.round(x / scale) * scale
        } else {
            0.0
        }
    }

    /// The format's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            ActFormat::Int8 => "int8",
            ActFormat::F8E4m3 => "f8e4m3fn",
        }
    }
}

/// Rounds to the nearest e4m3fn value (ties to even), saturating at +-448: the exponent is read from the bits, so
/// this is as fast as int8's rounding and equal to encoding then decoding with [`super::f8::E4M3FN`].
#[inline]
fn round_e4m3(v: f32) -> f32 {
    if v.is_nan() {
        return v;
    }
    let magnitude = v.abs();
    if magnitude >= 448.0 {
        return 448f32.copysign(v);
    }
    // Below the smallest normal (2^-6) the spacing is that of the subnormals, 2^-9.
    let exponent = (((magnitude.to_bits() >> 23) & 0xFF) as i32 - 127).max(-6);
    let quantum = f32::from_bits(((exponent - 3 + 127) as u32) << 23);
    ((magnitude / quantum).round_ties_even() * quantum)
        .min(448.0)
        .copysign(v)
}

/// Bins of [`AbsHistogram`].
pub const HISTOGRAM_BINS: usize = 2048;

/// Thresholds the MSE and entropy searches try per histogram.
const MAX_CANDIDATES: usize = 512;

/// Values per used bin the entropy method wants on average before it trusts the histogram's full resolution.
const ENTROPY_MIN_MEAN_COUNT: f64 = 16.0;

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

impl AbsHistogram {
    /// The clipping threshold `calib` picks for quantizing this tensor to `format` (0 when nothing non-zero was
    /// seen). Never above [`AbsHistogram::max`].
    pub fn threshold(&self, calib: ActCalib, format: ActFormat) -> f32 {
        if self.count == 0 || self.max <= 0.0 || self.range <= 0.0 {
            return 0.0;
        }
        let t = match calib {
            ActCalib::MinMax => self.max,
            ActCalib::Percentile(p) => self.percentile(p),
            ActCalib::Mse => self.mse_threshold(format),
            ActCalib::Entropy => self.entropy_threshold(format),
        };
        t.min(self.max)
    }

    /// Bins up to and including the last non-empty one.
    fn used_bins(&self) -> usize {
        self.bins.iter().rposition(|&n| n > 0).map_or(0, |i| i + 1)
    }

    /// The `|x|` below which `p` percent of the values lie, interpolated linearly within its bin.
    fn percentile(&self, p: f64) -> f32 {
        let target = self.count as f64 * (p / 100.0).clamp(0.0, 1.0);
        let width = self.bin_width() as f64;
        let mut below = 0f64;
        for (i, &n) in self.bins.iter().enumerate() {
            if n > 0 && below + n as f64 >= target {
                let within = ((target - below) / n as f64).clamp(0.0, 1.0);
                return ((i as f64 + within) * width) as f32;
            }
            below += n as f64;
        }
        self.max
    }

    /// This histogram's candidate thresholds from bin `first` on ([`candidates`]).
    fn candidates(&self, first: usize) -> Vec<(usize, f32)> {
        candidates(self.used_bins(), self.bin_width(), self.max, first)
    }

    /// Minimises the expected squared error of fake-quantizing the histogram with each candidate threshold: every
    /// bin stands for its count of values at its centre, which rounds (inside the threshold) or clips (beyond it),
    /// as NVIDIA's pytorch-quantization MSE calibrator estimates it.
    fn mse_threshold(&self, format: ActFormat) -> f32 {
        let width = self.bin_width();
        let used = self.used_bins();
        let centres: Vec<(f32, f64)> = (0..used)
            .filter(|&i| self.bins[i] > 0)
            .map(|i| ((i as f32 + 0.5) * width, self.bins[i] as f64))
            .collect();
        let mut best = (f64::INFINITY, self.max);
        // Thresholds below an eighth of the range would clip nearly everything; skip them as the calibrators do.
        for (_, t) in self.candidates(HISTOGRAM_BINS / 16) {
            let scale = format.scale_of(t);
            let error: f64 = centres
                .iter()
                .map(|&(c, n)| {
                    let c = c.min(self.max);
                    n * ((format.fake_quant(c, scale) - c) as f64).powi(2)
                })
                .sum();
            if error < best.0 {
                best = (error, t);
            }
        }
        best.1
    }

    /// TensorRT's entropy calibration: for each candidate threshold, `P` is the histogram up to it with the clipped
    /// tail added to its last bin, `Q` the same bins grouped by the quantization code their centre rounds to, each
    /// group's total spread evenly over its non-empty bins; the threshold with the smallest KL(P || Q) wins. For
    /// int8 the groups are TensorRT's 128 equal runs of bins; for e4m3 they follow its non-uniform grid.
    fn entropy_threshold(&self, format: ActFormat) -> f32 {
        // A histogram with a handful of values per bin (a small calibration set) makes the divergence of every
        // candidate mostly sampling noise; pairs of bins merge until the used ones hold ENTROPY_MIN_MEAN_COUNT
        // values on average, or only 256 of them remain (so the deepest clip is then half the range).
        let mut factor = 1;
        let used = self.used_bins();
        while used / (2 * factor) >= 256 && (self.count as f64) < ENTROPY_MIN_MEAN_COUNT * used.div_ceil(factor) as f64
        {
            factor *= 2;
        }
        let mut bins: Vec<u64> = self.bins[..used].chunks(factor).map(|c| c.iter().sum()).collect();
        let used = bins.len();
        if used <= 128 {
            // The whole range fits in the smallest candidate: nothing to gain by clipping.
            return self.max;
        }
        let width = self.bin_width() * factor as f32;
        // The first bin holds the exact zeros of ReLU outputs and convolution padding, a spike that no threshold
        // represents better than another but that would dominate the divergence: it counts as its neighbour, as
        // NVIDIA's pytorch-quantization entropy calibrator does.
        bins[0] = bins[1];
        let bins = &bins;
        let mut best = (f64::INFINITY, self.max);
        let mut p = Vec::with_capacity(used);
        let mut q = Vec::with_capacity(used);
        for (i, t) in candidates(used, width, self.max, 128) {
            let scale = format.scale_of(t);
            p.clear();
            p.extend(bins[..i].iter().map(|&n| n as f64));
            let outliers: u64 = bins[i..].iter().sum();
            *p.last_mut().unwrap_or(&mut 0.0) += outliers as f64;
            // Group bins by the code of their centre.
            q.clear();
            q.resize(i, 0.0);
            let mut start = 0;
            while start < i {
                let code = format.round(((start as f32 + 0.5) * width) / scale);
                let mut end = start + 1;
                while end < i && format.round(((end as f32 + 0.5) * width) / scale) == code {
                    end += 1;
                }
                // The group's count before clipping, spread over the bins P holds mass in (the last one included
                // when the clipped tail landed there), as TensorRT and ONNX Runtime build Q.
                let total: f64 = bins[start..end].iter().map(|&n| n as f64).sum();
                let filled = p[start..end].iter().filter(|&&n| n > 0.0).count();
                if filled > 0 {
                    for j in start..end {
                        if p[j] > 0.0 {
                            q[j] = total / filled as f64;
                        }
                    }
                }
                start = end;
            }
            let divergence = kl_divergence(&p, &q);
            if divergence < best.0 {
                best = (divergence, t);
            }
        }
        best.1
    }
}

/// Candidate thresholds over a histogram of `used` bins of `width`: the upper edges of bins `first..used` (the last
/// one replaced by the exact `max`), as (bins below the threshold, threshold). At most [`MAX_CANDIDATES`] of them,
/// evenly spaced, always ending with the max, so a layer's search costs a bounded time whatever the histogram.
fn candidates(used: usize, width: f32, max: f32, first: usize) -> Vec<(usize, f32)> {
    let first = first.clamp(1, used.max(1));
    let step = (used - first).div_ceil(MAX_CANDIDATES).max(1);
    let mut out: Vec<usize> = (first..used).step_by(step).collect();
    out.push(used);
    out.into_iter()
        .map(|i| (i, if i == used { max } else { i as f32 * width }))
        .collect()
}

/// KL(P || Q) of two unnormalised histograms; a bin where P has mass and Q none (a group whose only mass is the
/// clipped tail) costs as if Q held a tiny epsilon there, as TensorRT smooths it.
fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq) = (p.iter().sum::<f64>(), q.iter().sum::<f64>());
    if sp <= 0.0 || sq <= 0.0 {
        return f64::INFINITY;
    }
    const EPSILON: f64 = 1e-4;
    p.iter()
        .zip(q)
        .filter(|(p, _)| **p > 0.0)
        .map(|(&p, &q)| {
            let (p, q) = (p / sp, (q / sq).max(EPSILON / sq));
            p * (p / q).ln()
        })
        .sum()
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

    fn histogram_of(values: &[f32]) -> AbsHistogram {
        let mut h = AbsHistogram::new();
        h.observe(values);
        h
    }

    /// Deterministic standard normal samples (Box-Muller over an xorshift).
    fn normal(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut uniform = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| ((-2.0 * uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * uniform()).cos()) as f32)
            .collect()
    }

    #[test]
    fn calibration_methods_parse_and_print_back() {
        assert_eq!(ActCalib::parse("minmax").unwrap(), ActCalib::MinMax);
        assert_eq!(ActCalib::parse(" Percentile ").unwrap(), ActCalib::Percentile(99.999));
        assert_eq!(ActCalib::parse("percentile:99.9").unwrap(), ActCalib::Percentile(99.9));
        assert_eq!(ActCalib::parse("mse").unwrap(), ActCalib::Mse);
        assert_eq!(ActCalib::parse("entropy").unwrap(), ActCalib::Entropy);
        for calib in [
            ActCalib::MinMax,
            ActCalib::Percentile(99.99),
            ActCalib::Mse,
            ActCalib::Entropy,
        ] {
            assert_eq!(ActCalib::parse(&calib.name()).unwrap(), calib);
            let json = serde_json::to_string(&calib).unwrap();
            assert_eq!(json, format!("\"{}\"", calib.name()));
            assert_eq!(serde_json::from_str::<ActCalib>(&json).unwrap(), calib);
        }
        for bad in ["percentile:0", "percentile:101", "percentile:x", "mse:3", "kmeans", ""] {
            let e = ActCalib::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("act-calib") || e.contains("activation calibration"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn e4m3_rounding_equals_the_codec() {
        let spec = crate::quant::f8::E4M3FN;
        let mut v = -500f32;
        while v < 500.0 {
            for x in [v, v * 1e-3, v * 1e-5] {
                let want = spec.decode_exact(spec.encode(x));
                assert_eq!(ActFormat::F8E4m3.round(x), want, "{x}");
            }
            v += 0.37;
        }
        assert_eq!(ActFormat::F8E4m3.round(1e9), 448.0);
        assert_eq!(ActFormat::Int8.round(-300.0), -127.0);
        assert_eq!(ActFormat::Int8.fake_quant(1.0, 0.0), 0.0);
    }

    #[test]
    fn minmax_and_percentile_match_hand_computed_values() {
        // 1, 2, ..., 1000: the range is 1024 in 2048 bins of 0.5, so value v sits alone in bin 2v.
        let values: Vec<f32> = (1..=1000).map(|v| v as f32).collect();
        let h = histogram_of(&values);
        assert_eq!(h.range, 1024.0);
        assert_eq!(h.threshold(ActCalib::MinMax, ActFormat::Int8), 1000.0);
        // 99% = 990 values below: the 990th value's bin [990, 990.5) fills completely.
        assert_eq!(h.threshold(ActCalib::Percentile(99.0), ActFormat::Int8), 990.5);
        // 50.05% = 500.5 values below: 1..=500, then half of value 501's bin [501, 501.5).
        assert_eq!(h.threshold(ActCalib::Percentile(50.05), ActFormat::Int8), 501.25);
        assert_eq!(h.threshold(ActCalib::Percentile(100.0), ActFormat::Int8), 1000.0);
        // Signs do not matter: |x|.
        let signed: Vec<f32> = values
            .iter()
            .enumerate()
            .map(|(i, v)| if i % 2 == 0 { -v } else { *v })
            .collect();
        assert_eq!(
            histogram_of(&signed).threshold(ActCalib::Percentile(99.0), ActFormat::Int8),
            990.5
        );
    }

    #[test]
    fn mse_and_entropy_clip_heavy_tails_and_keep_uniform_ranges() {
        // Gaussian bulk with a few huge outliers: for int8, clipping them costs less than coarse steps for everything.
        let mut heavy = normal(1_000_000, 3);
        heavy.extend([60.0, -80.0, 100.0]);
        let h = histogram_of(&heavy);
        for calib in [ActCalib::Mse, ActCalib::Entropy] {
            let t = h.threshold(calib, ActFormat::Int8);
            assert!(t > 2.0 && t < 0.5 * h.max, "{calib} int8: {t} (max {})", h.max);
            // Float8's steps are relative, so large thresholds cost it little; it never goes past the max.
            let t = h.threshold(calib, ActFormat::F8E4m3);
            assert!(t > 2.0 && t <= h.max, "{calib} f8: {t} (max {})", h.max);
        }
        let p = h.threshold(ActCalib::Percentile(99.99), ActFormat::Int8);
        assert!(p > 3.0 && p < 5.0, "{p}");
        // A small sample (a few values per bin): entropy does not read sampling noise as a reason to clip deep.
        let sparse = histogram_of(&normal(2_000, 5));
        let t = sparse.threshold(ActCalib::Entropy, ActFormat::Int8);
        assert!(t >= 0.5 * sparse.max, "sparse entropy: {t} (max {})", sparse.max);
        // Uniform values: nothing to clip, the threshold stays within 2% of the max.
        let uniform: Vec<f32> = (0..100_000).map(|i| (i as f32 / 100_000.0) * 2.0 - 1.0).collect();
        let h = histogram_of(&uniform);
        for calib in [ActCalib::Mse, ActCalib::Entropy] {
            let t = h.threshold(calib, ActFormat::Int8);
            assert!(t >= 0.98 * h.max && t <= h.max, "{calib}: {t} (max {})", h.max);
        }
        // MSE's pick has no larger estimated error than the max's on the heavy-tailed data (measured directly).
        let mse = |t: f32| {
            let s = ActFormat::Int8.scale_of(t);
            heavy
                .iter()
                .map(|&x| ((ActFormat::Int8.fake_quant(x, s) - x) as f64).powi(2))
                .sum::<f64>()
        };
        let h = histogram_of(&heavy);
        assert!(mse(h.threshold(ActCalib::Mse, ActFormat::Int8)) < 0.5 * mse(h.max));
    }

    #[test]
    fn degenerate_histograms_give_finite_thresholds() {
        let all = [
            ActCalib::MinMax,
            ActCalib::Percentile(99.999),
            ActCalib::Mse,
            ActCalib::Entropy,
        ];
        for format in [ActFormat::Int8, ActFormat::F8E4m3] {
            for calib in all {
                assert_eq!(AbsHistogram::new().threshold(calib, format), 0.0);
                assert_eq!(histogram_of(&[0.0; 100]).threshold(calib, format), 0.0);
                // One value repeated: any method returns it, up to a bin's width.
                let h = histogram_of(&[-3.0; 1000]);
                let t = h.threshold(calib, format);
                assert!(t <= 3.0 && t >= 3.0 - h.bin_width(), "{calib} {format:?}: {t}");
                // Non-finite values are skipped.
                let t = histogram_of(&[f32::NAN, 2.0, f32::INFINITY]).threshold(calib, format);
                assert!(t.is_finite() && t <= 2.0 && t > 1.99, "{calib}: {t}");
            }
            assert_eq!(format.scale_of(0.0), 0.0);
        }
        assert_eq!(ActFormat::Int8.scale_of(127.0), 1.0);
        assert_eq!(ActFormat::F8E4m3.scale_of(448.0), 1.0);
    }
}
