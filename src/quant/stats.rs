//! Calibration statistics of one layer's input, accumulated over a calibration set in one streaming pass (bounded
//! memory: sums and a histogram, never the activations themselves) and merged by addition: what the calibrated
//! methods (`gptq`, `awq`) and the static activation levels read.
//!
//! A layer's input is the matrix `X [rows, cols]` its weight multiplies: a Linear's tokens, a dense convolution's
//! im2col patches with columns in PyTorch's weight order `(c_in, ky, kx)`, so column `j` of `X` meets column `j` of
//! the stored `[out, in * kh * kw]` weight.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::act::AbsHistogram;

/// What to accumulate: the Hessian costs `rows * cols^2` per image, so it is computed only when a method needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StatsNeeds {
    /// `X^T X` (GPTQ, AWQ's output-error search).
    pub hessian: bool,
    /// A histogram of `|x|` over the whole tensor (static activation scales).
    pub histogram: bool,
}

impl StatsNeeds {
    /// The union of two needs.
    pub fn union(self, other: StatsNeeds) -> StatsNeeds {
        StatsNeeds {
            hessian: self.hessian || other.hessian,
            histogram: self.histogram || other.histogram,
        }
    }

    /// True when this covers `other`.
    pub fn covers(self, other: StatsNeeds) -> bool {
        (self.hessian || !other.hessian) && (self.histogram || !other.histogram)
    }
}

/// The statistics of one layer's input `X [rows, cols]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerStats {
    pub cols: usize,
    /// Rows of `X` seen (tokens, or output pixels of a convolution).
    pub rows: u64,
    /// Rows that entered the Hessian (a subsample of `rows` on large maps).
    pub hessian_rows: u64,
    /// `sum X^T X`, row-major `[cols, cols]` (symmetric), when [`StatsNeeds::hessian`].
    pub hessian: Option<Vec<f64>>,
    /// Per column, `sum |x|` (AWQ's activation magnitude is `abs_sum / rows`).
    pub abs_sum: Vec<f64>,
    /// Per column, `max |x|` (SmoothQuant).
    pub abs_max: Vec<f32>,
    /// `|x|` over the whole tensor, when [`StatsNeeds::histogram`].
    pub histogram: Option<AbsHistogram>,
}

impl LayerStats {
    /// Empty statistics for inputs of `cols` columns.
    pub fn new(cols: usize, needs: StatsNeeds) -> LayerStats {
        LayerStats {
            cols,
            rows: 0,
            hessian_rows: 0,
            hessian: needs.hessian.then(|| vec![0.0; cols * cols]),
            abs_sum: vec![0.0; cols],
            abs_max: vec![0.0; cols],
            histogram: needs.histogram.then(AbsHistogram::new),
        }
    }

    /// Adds the rows of `x [rows, cols]` (row-major). `gram` is `x^T x` for these rows when the caller computed it
    /// with a fast GEMM; it is added to the Hessian.
    pub fn observe(&mut self, x: &[f32], gram: Option<&[f32]>) {
        let cols = self.cols.max(1);
        for row in x.chunks_exact(cols) {
            for ((s, m), &v) in self.abs_sum.iter_mut().zip(self.abs_max.iter_mut()).zip(row) {
                *s += v.abs() as f64;
                *m = m.max(v.abs());
            }
        }
        let rows = (x.len() / cols) as u64;
        self.rows += rows;
        if let Some(g) = gram {
            self.add_gram(g, rows);
        }
        if let Some(hist) = self.histogram.as_mut() {
            hist.observe(x);
        }
    }

    /// Adds `X_s^T X_s` of `rows` rows (all of an observation's rows, or a subsample of them) to the Hessian.
    pub fn add_gram(&mut self, gram: &[f32], rows: u64) {
        if let Some(h) = self.hessian.as_mut() {
            h.iter_mut().zip(gram).for_each(|(h, &g)| *h += g as f64);
            self.hessian_rows += rows;
        }
    }

    /// Adds another accumulator of the same layer (shards of the calibration set).
    pub fn merge(&mut self, other: &LayerStats) {
        self.rows += other.rows;
        self.hessian_rows += other.hessian_rows;
        self.abs_sum.iter_mut().zip(&other.abs_sum).for_each(|(a, b)| *a += b);
        self.abs_max
            .iter_mut()
            .zip(&other.abs_max)
            .for_each(|(a, b)| *a = a.max(*b));
        if let (Some(h), Some(o)) = (self.hessian.as_mut(), other.hessian.as_ref()) {
            h.iter_mut().zip(o).for_each(|(a, b)| *a += b);
        }
        if let (Some(h), Some(o)) = (self.histogram.as_mut(), other.histogram.as_ref()) {
            h.merge(o);
        }
    }

    /// Per column, the mean `|x|` (AWQ's activation magnitude); zeros before any row.
    pub fn mean_abs(&self) -> Vec<f32> {
        let n = self.rows.max(1) as f64;
        self.abs_sum.iter().map(|s| (s / n) as f32).collect()
    }

    /// The Hessian of the layer's squared output error, `H = 2 X^T X / n` over the `n` rows that entered it (GPTQ's
    /// normalisation), when kept.
    pub fn hessian_mean(&self) -> Option<Vec<f64>> {
        let n = self.hessian_rows.max(1) as f64;
        self.hessian.as_ref().map(|h| h.iter().map(|v| 2.0 * v / n).collect())
    }
}

/// Every quantizable layer's input statistics, by layer path (`segformer.encoder.block.0.0.attention.self.query`).
pub type ModelStats = BTreeMap<String, LayerStats>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observe_and_merge_add_up() {
        let needs = StatsNeeds {
            hessian: true,
            histogram: false,
        };
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let gram = [10.0f32, -0.5, -0.5, 4.25];
        let mut a = LayerStats::new(2, needs);
        a.observe(&x, Some(&gram));
        let mut b = LayerStats::new(2, needs);
        b.observe(&x[..2], Some(&[1.0, -2.0, -2.0, 4.0]));
        b.observe(&x[2..], Some(&[9.0, 1.5, 1.5, 0.25]));
        let mut merged = LayerStats::new(2, needs);
        merged.merge(&b);
        assert_eq!(a, merged);
        assert_eq!(a.mean_abs(), vec![2.0, 1.25]);
        assert_eq!(a.abs_max, vec![3.0, 2.0]);
        assert_eq!(a.hessian_mean().unwrap(), vec![10.0, -0.5, -0.5, 4.25]);
    }
}
