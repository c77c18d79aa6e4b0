//! How far one model's per-pixel class distribution is from a reference model's: the Kullback-Leibler divergence
//! `KL(p_ref || p) = sum_c p_ref(c) (log p_ref(c) - log p(c))` of the softmax over classes, averaged over pixels
//! (what llama.cpp's `--kl-divergence` reports per token for language models). Works on plain logits
//! `[classes, pixels]` (class-planar, as the model writes them); knows nothing of models.

use crate::{Error, Result};

/// The reference distribution of one image: log-probabilities and probabilities, class-planar `[classes, pixels]`,
/// in f64 so that the divergence of small differences is not lost to rounding.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftmaxReference {
    classes: usize,
    pixels: usize,
    log_probs: Vec<f64>,
    probs: Vec<f64>,
}

/// `log softmax` over the classes of every pixel of class-planar `logits`, into `out` (same layout).
fn log_softmax(logits: &[f32], classes: usize, pixels: usize, out: &mut Vec<f64>) {
    out.clear();
    out.resize(classes * pixels, 0.0);
    for p in 0..pixels {
        let max = (0..classes).fold(f64::NEG_INFINITY, |m, c| m.max(f64::from(logits[c * pixels + p])));
        let sum: f64 = (0..classes)
            .map(|c| (f64::from(logits[c * pixels + p]) - max).exp())
            .sum();
        let log_sum = sum.ln();
        for c in 0..classes {
            out[c * pixels + p] = f64::from(logits[c * pixels + p]) - max - log_sum;
        }
    }
}

fn check_len(what: &str, logits: &[f32], classes: usize, pixels: usize) -> Result<()> {
    if classes == 0 || logits.len() != classes * pixels {
        return Err(Error::shape_mismatch(what, &[classes, pixels], &[logits.len()]));
    }
    Ok(())
}

impl SoftmaxReference {
    /// The reference of class-planar `logits` with `classes` classes.
    pub fn new(logits: &[f32], classes: usize) -> Result<SoftmaxReference> {
        let pixels = logits.len() / classes.max(1);
        check_len("reference logits", logits, classes, pixels)?;
        let mut log_probs = Vec::new();
        log_softmax(logits, classes, pixels, &mut log_probs);
        let probs = log_probs.iter().map(|l| l.exp()).collect();
        Ok(SoftmaxReference {
            classes,
            pixels,
            log_probs,
            probs,
        })
    }

    pub fn pixels(&self) -> usize {
        self.pixels
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        (self.log_probs.len() + self.probs.len()) * std::mem::size_of::<f64>()
    }
}

/// Accumulates `KL(p_ref || p)` over pixels, image by image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KlDivergence {
    sum: f64,
    pixels: u64,
    /// Reused per image.
    scratch: Vec<f64>,
}

impl KlDivergence {
    pub fn new() -> KlDivergence {
        KlDivergence::default()
    }

    /// Adds one image: `logits` are class-planar like the reference's, for the same pixels. Exactly zero when they
    /// are the logits the reference was made from (both sides go through the same arithmetic).
    pub fn add(&mut self, reference: &SoftmaxReference, logits: &[f32]) -> Result<()> {
        check_len(
            "logits (pixels of the reference)",
            logits,
            reference.classes,
            reference.pixels,
        )?;
        let (classes, pixels) = (reference.classes, reference.pixels);
        log_softmax(logits, classes, pixels, &mut self.scratch);
        let mut image = 0.0;
        for p in 0..pixels {
            for c in 0..classes {
                let i = c * pixels + p;
                let prob = reference.probs[i];
                if prob > 0.0 {
                    image += prob * (reference.log_probs[i] - self.scratch[i]);
                }
            }
        }
        self.sum += image;
        self.pixels += pixels as u64;
        Ok(())
    }

    /// Mean over the pixels added, in nats; NaN before any pixel.
    pub fn mean(&self) -> f64 {
        if self.pixels == 0 {
            f64::NAN
        } else {
            self.sum / self.pixels as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_logits_diverge_by_exactly_zero() {
        let logits: Vec<f32> = (0..3 * 5).map(|i| ((i * 7) % 11) as f32 * 0.37 - 1.5).collect();
        let reference = SoftmaxReference::new(&logits, 3).unwrap();
        let mut kl = KlDivergence::new();
        kl.add(&reference, &logits).unwrap();
        assert_eq!(kl.mean(), 0.0);
    }

    #[test]
    fn divergence_of_two_known_distributions() {
        // One pixel, two classes: p = softmax(0, 0) = (1/2, 1/2), q = softmax(0, ln 3) = (1/4, 3/4).
        let reference = SoftmaxReference::new(&[0.0, 0.0], 2).unwrap();
        let mut kl = KlDivergence::new();
        kl.add(&reference, &[0.0, 3f32.ln()]).unwrap();
        let expected = 0.5 * (0.5f64 / 0.25).ln() + 0.5 * (0.5f64 / 0.75).ln();
        assert!((kl.mean() - expected).abs() < 1e-7, "{} vs {expected}", kl.mean());
        // A second, identical pixel halves the mean.
        kl.add(&reference, &[0.0, 0.0]).unwrap();
        assert!((kl.mean() - expected / 2.0).abs() < 1e-7);
    }

    #[test]
    fn a_shift_of_all_logits_changes_nothing_and_a_wrong_size_is_refused() {
        let logits = [1.0f32, -2.0, 0.5, 3.0, 0.0, 0.25];
        let reference = SoftmaxReference::new(&logits, 2).unwrap();
        let shifted: Vec<f32> = logits.iter().map(|v| v + 4.0).collect();
        let mut kl = KlDivergence::new();
        kl.add(&reference, &shifted).unwrap();
        assert!(kl.mean().abs() < 1e-6);
        assert!(kl.add(&reference, &logits[..4]).is_err());
    }
}
