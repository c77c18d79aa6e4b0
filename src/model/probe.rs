//! Calibration probes: what records a layer's input while calibration images run through the float model, so that
//! the statistics of every Linear and dense convolution ([`ModelStats`]) come from the model's own forward pass,
//! not from a second implementation of it. [`Segformer::with_probes`](super::Segformer::with_probes) returns a copy
//! of the model with a [`Probe`] on each such layer; its forward pass is the ordinary one (the decode head in its
//! transformers form, so `linear_fuse` and `classifier` see their real inputs).
//!
//! A layer's input is taken as the matrix its weight multiplies: tokens for a Linear, pixels for a 1x1 convolution,
//! im2col patches with columns in PyTorch's weight order `(c_in, ky, kx)` for a strided convolution. Magnitudes and
//! histograms see every row; the Hessian `X^T X` is accumulated over at most `row_cap` rows per image (evenly
//! strided), which bounds its cost on high-resolution maps.

use std::sync::Mutex;

use candle_core::Tensor;

use super::tokens::{Tokens, with_f32};
use crate::kernels::{self, ConvShape};
use crate::quant::{LayerStats, StatsNeeds};
use crate::{Error, Result};

/// The probes of a model by layer path, as [`super::Segformer::with_probes`] installs them.
pub type Probes = Vec<(String, std::sync::Arc<Probe>)>;

/// Records one layer's inputs into its [`LayerStats`].
#[derive(Debug)]
pub struct Probe {
    stats: Mutex<LayerStats>,
    /// Most rows per call that enter the Hessian.
    row_cap: usize,
}

impl Probe {
    pub fn new(cols: usize, needs: StatsNeeds, row_cap: usize) -> Probe {
        Probe {
            stats: Mutex::new(LayerStats::new(cols, needs)),
            row_cap: row_cap.max(1),
        }
    }

    /// The statistics so far.
    pub fn stats(&self) -> LayerStats {
        self.stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Adds the rows of `x [rows, cols]`.
    pub fn observe_rows(&self, x: &[f32], cols: usize) -> Result<()> {
        let mut stats = self
            .stats
            .lock()
            .map_err(|_| Error::internal("calibration probe poisoned"))?;
        if stats.cols != cols || !x.len().is_multiple_of(cols.max(1)) {
            return Err(Error::internal(format!(
                "calibration probe of {} columns given {} values of {cols}",
                stats.cols,
                x.len()
            )));
        }
        stats.observe(x, None);
        if stats.hessian.is_some() {
            let rows = x.len() / cols.max(1);
            let stride = rows.div_ceil(self.row_cap).max(1);
            let picked: Vec<usize> = (0..rows).step_by(stride).collect();
            // X^T [cols, n] times X [n, cols] through the f32 GEMM; the sum is kept in f64.
            let mut xt = vec![0f32; cols * picked.len()];
            let mut xs = Vec::with_capacity(cols * picked.len());
            for (i, &r) in picked.iter().enumerate() {
                let row = &x[r * cols..(r + 1) * cols];
                xs.extend_from_slice(row);
                for (c, &v) in row.iter().enumerate() {
                    xt[c * picked.len() + i] = v;
                }
            }
            let gram = kernels::matmul(&xt, cols, picked.len(), &xs, cols)?;
            stats.add_gram(&gram, picked.len() as u64);
        }
        Ok(())
    }

    /// Adds the im2col patches of a dense convolution over channels-last `x`, columns in PyTorch's weight order.
    pub fn observe_patches(&self, x: &Tokens, shape: ConvShape) -> Result<()> {
        let (k, c) = (shape.kernel, shape.in_channels);
        let (out_h, out_w) = shape.out_size();
        let cols = c * k * k;
        for b in 0..x.batch() {
            let image = x.image(b);
            let mut patches = vec![0f32; out_h * out_w * cols];
            for oy in 0..out_h {
                for ox in 0..out_w {
                    let row = &mut patches[(oy * out_w + ox) * cols..][..cols];
                    for ky in 0..k {
                        let Some(iy) = (oy * shape.stride + ky).checked_sub(shape.padding) else {
                            continue;
                        };
                        if iy >= shape.height {
                            continue;
                        }
                        for kx in 0..k {
                            let Some(ix) = (ox * shape.stride + kx).checked_sub(shape.padding) else {
                                continue;
                            };
                            if ix >= shape.width {
                                continue;
                            }
                            let pixel = &image[(iy * shape.width + ix) * c..][..c];
                            for (ci, &v) in pixel.iter().enumerate() {
                                row[(ci * k + ky) * k + kx] = v;
                            }
                        }
                    }
                }
            }
            self.observe_rows(&patches, cols)?;
        }
        Ok(())
    }

    /// Adds the pixels of an NCHW map as rows of channels (the input of a 1x1 convolution).
    pub fn observe_nchw(&self, x: &Tensor) -> Result<()> {
        let (b, c, h, w) = x.dims4()?;
        let rows = x.permute((0, 2, 3, 1))?.reshape((b * h * w, c))?;
        with_f32(&rows, |values| self.observe_rows(values, c))
    }
}

/// Runs every batch of normalised pixels `[B, 3, H, W]` through a probed copy of `model` and returns the
/// statistics of every Linear and dense convolution's input, by layer path. One streaming pass: memory holds one
/// batch and the accumulators.
pub fn capture(
    model: &super::Segformer,
    needs: StatsNeeds,
    row_cap: usize,
    batches: impl IntoIterator<Item = Result<Tensor>>,
) -> Result<crate::quant::ModelStats> {
    let (probed, probes) = model.with_probes(needs, row_cap)?;
    for pixels in batches {
        probed.forward(&pixels?)?;
    }
    Ok(probes.into_iter().map(|(name, probe)| (name, probe.stats())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_follow_pytorch_column_order_and_padding() {
        // One 3x3 image of 2 channels, a 2x2 kernel, stride 1, padding 1: output 4x4.
        let data: Vec<f32> = (0..18).map(|v| v as f32 + 1.0).collect();
        let x = Tokens::new(data.clone(), 1, 3, 3, 2).unwrap();
        let shape = ConvShape {
            height: 3,
            width: 3,
            in_channels: 2,
            out_channels: 1,
            kernel: 2,
            stride: 1,
            padding: 1,
        };
        let needs = StatsNeeds {
            hessian: true,
            histogram: false,
        };
        let probe = Probe::new(8, needs, 1 << 20);
        probe.observe_patches(&x, shape).unwrap();
        let stats = probe.stats();
        assert_eq!(stats.rows, 16);
        // Column (ci=1, ky=1, kx=1) sees pixel (oy, ox) channel 1 for oy, ox < 3: values 2, 4, ..., 18.
        let col = (2 + 1) * 2 + 1;
        let expected: f64 = (0..9).map(|p| data[p * 2 + 1] as f64).sum();
        assert_eq!(stats.abs_sum[col], expected);
        // Column (ci=0, ky=0, kx=0) sees pixel (oy-1, ox-1) channel 0: rows with oy, ox >= 1.
        let expected: f64 = (0..9).map(|p| data[p * 2] as f64).sum();
        assert_eq!(stats.abs_sum[0], expected);
        let h = stats.hessian.unwrap();
        let sq: f64 = (0..9).map(|p| (data[p * 2] as f64).powi(2)).sum();
        assert!((h[0] - sq).abs() < 1e-3 * sq);
    }

    #[test]
    fn the_hessian_uses_strided_rows_and_counts_them() {
        let needs = StatsNeeds {
            hessian: true,
            histogram: true,
        };
        let probe = Probe::new(2, needs, 2);
        probe
            .observe_rows(&[1.0, 0.0, 5.0, 5.0, 0.0, 2.0, 7.0, 7.0], 2)
            .unwrap();
        let stats = probe.stats();
        assert_eq!(stats.rows, 4);
        assert_eq!(stats.hessian_rows, 2);
        // Rows 0 and 2: [1, 0] and [0, 2].
        assert_eq!(stats.hessian.as_ref().unwrap(), &vec![1.0, 0.0, 0.0, 4.0]);
        assert_eq!(stats.histogram.as_ref().unwrap().count, 8);
        assert!(probe.observe_rows(&[1.0; 3], 2).is_err());
    }
}
