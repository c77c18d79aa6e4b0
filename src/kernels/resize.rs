//! Bilinear upsampling of channels-last maps summed into one output (SegFormer's decode head after the per-stage
//! 1x1 convolutions are moved before the upsampling): `out[y, x, c] = bias[c] + sum_i up_i(y, x, c)`, optionally
//! followed by ReLU, in one pass over the output. Sampling follows PyTorch's `interpolate(mode="bilinear",
//! align_corners=False)` with an output size: `src = (dst + 0.5) * in / out - 0.5`, clamped below at 0.
//!
//! The loops run over contiguous channels, which the compiler vectorises; there is no separate SIMD version, so the
//! tests compare against a direct per-pixel formula instead.

use rayon::prelude::*;

use crate::{Error, Result};

/// One channels-last input map `[height, width, channels]`.
#[derive(Debug, Clone, Copy)]
pub struct MapNhwc<'a> {
    pub data: &'a [f32],
    pub height: usize,
    pub width: usize,
}

/// Sampling positions along one axis: for each output index, the two source indices and their weights.
#[derive(Debug, Clone)]
struct Axis {
    i0: Vec<usize>,
    i1: Vec<usize>,
    l0: Vec<f32>,
    l1: Vec<f32>,
}

impl Axis {
    /// PyTorch's `area_pixel_compute_source_index` (align_corners=False, size given) and its neighbour rule.
    fn new(input: usize, output: usize) -> Axis {
        let scale = input as f32 / output as f32;
        let mut axis = Axis {
            i0: Vec::with_capacity(output),
            i1: Vec::with_capacity(output),
            l0: Vec::with_capacity(output),
            l1: Vec::with_capacity(output),
        };
        for d in 0..output {
            let src = (scale * (d as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let i1 = if i0 + 1 < input { i0 + 1 } else { i0 };
            let l1 = src - i0 as f32;
            axis.i0.push(i0);
            axis.i1.push(i1);
            axis.l0.push(1.0 - l1);
            axis.l1.push(l1);
        }
        axis
    }
}

/// `bias + sum_i bilinear(inputs[i])` at an output size, computable a band of output rows at a time (so a caller
/// can keep each band in cache while it works on it). Built once per output; checks the shapes.
#[derive(Debug, Clone)]
pub struct UpsampleSum<'a> {
    inputs: Vec<MapNhwc<'a>>,
    axes: Vec<(Axis, Axis)>,
    channels: usize,
    out_h: usize,
    out_w: usize,
    bias: &'a [f32],
}

impl<'a> UpsampleSum<'a> {
    pub fn new(inputs: &[MapNhwc<'a>], channels: usize, out_h: usize, out_w: usize, bias: &'a [f32]) -> Result<Self> {
        if bias.len() != channels {
            return Err(Error::invalid(
                "upsample_sum_nhwc",
                format!("bias has {} values for {channels} channels", bias.len()),
            ));
        }
        for (i, m) in inputs.iter().enumerate() {
            if m.height == 0 || m.width == 0 || m.data.len() != m.height * m.width * channels {
                return Err(Error::invalid(
                    "upsample_sum_nhwc",
                    format!(
                        "input {i} has {} values for {}x{}x{channels}",
                        m.data.len(),
                        m.height,
                        m.width
                    ),
                ));
            }
        }
        let axes = inputs
            .iter()
            .map(|m| (Axis::new(m.height, out_h), Axis::new(m.width, out_w)))
            .collect();
        Ok(Self {
            inputs: inputs.to_vec(),
            axes,
            channels,
            out_h,
            out_w,
            bias,
        })
    }

    /// Values in one output row.
    pub fn row_len(&self) -> usize {
        self.out_w * self.channels
    }

    /// Writes output rows `y0 .. y0 + out.len() / row_len()` into `out` (channels last).
    pub fn rows(&self, y0: usize, out: &mut [f32]) {
        let c = self.channels;
        for (dy, row) in out.chunks_exact_mut(self.row_len().max(1)).enumerate() {
            let y = y0 + dy;
            for px in row.chunks_exact_mut(c) {
                px.copy_from_slice(self.bias);
            }
            for (m, (ay, ax)) in self.inputs.iter().zip(&self.axes) {
                if m.height == self.out_h && m.width == self.out_w {
                    // Scale 1: PyTorch's sampling reduces to the identity.
                    let src = &m.data[y * self.row_len()..(y + 1) * self.row_len()];
                    row.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                    continue;
                }
                let (r0, r1, h0, h1) = (ay.i0[y], ay.i1[y], ay.l0[y], ay.l1[y]);
                let top = &m.data[r0 * m.width * c..(r0 + 1) * m.width * c];
                let bottom = &m.data[r1 * m.width * c..(r1 + 1) * m.width * c];
                for (x, px) in row.chunks_exact_mut(c).enumerate() {
                    let (c0, c1, w0, w1) = (ax.i0[x] * c, ax.i1[x] * c, ax.l0[x], ax.l1[x]);
                    let (a, b) = (&top[c0..c0 + c], &top[c1..c1 + c]);
                    let (p, q) = (&bottom[c0..c0 + c], &bottom[c1..c1 + c]);
                    for k in 0..c {
                        px[k] += h0 * (w0 * a[k] + w1 * b[k]) + h1 * (w0 * p[k] + w1 * q[k]);
                    }
                }
            }
        }
    }
}

/// `out [out_h, out_w, channels] = relu?(bias + sum_i bilinear(inputs[i]))`. Parallel over output rows.
pub fn upsample_sum_nhwc(
    inputs: &[MapNhwc<'_>],
    channels: usize,
    out_h: usize,
    out_w: usize,
    bias: &[f32],
    relu: bool,
    out: &mut [f32],
) -> Result<()> {
    let sum = UpsampleSum::new(inputs, channels, out_h, out_w, bias)?;
    if out.len() != out_h * out_w * channels {
        return Err(Error::invalid(
            "upsample_sum_nhwc",
            format!("output has {} values for {out_h}x{out_w}x{channels}", out.len()),
        ));
    }
    if out.is_empty() {
        return Ok(());
    }
    out.par_chunks_mut(sum.row_len()).enumerate().for_each(|(y, row)| {
        sum.rows(y, row);
        if relu {
            row.iter_mut().for_each(|v| *v = v.max(0.0));
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::random_vec;

    /// PyTorch's bilinear formula evaluated independently per output value, in f64.
    fn reference(m: &MapNhwc<'_>, c: usize, out_h: usize, out_w: usize, y: usize, x: usize, k: usize) -> f64 {
        let coord = |d: usize, input: usize, output: usize| {
            let src = ((d as f64 + 0.5) * input as f64 / output as f64 - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(input - 1);
            let i1 = (i0 + 1).min(input - 1);
            (i0, i1, src - i0 as f64)
        };
        let (y0, y1, ly) = coord(y, m.height, out_h);
        let (x0, x1, lx) = coord(x, m.width, out_w);
        let v = |yy: usize, xx: usize| m.data[(yy * m.width + xx) * c + k] as f64;
        (1.0 - ly) * ((1.0 - lx) * v(y0, x0) + lx * v(y0, x1)) + ly * ((1.0 - lx) * v(y1, x0) + lx * v(y1, x1))
    }

    #[test]
    fn matches_the_bilinear_formula_on_awkward_sizes() {
        let c = 5;
        let (out_h, out_w) = (13, 11);
        let sizes = [(13, 11), (7, 6), (4, 3), (1, 2), (5, 11)];
        let datas: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, (h, w))| random_vec(h * w * c, 3 + i as u64, 2.0))
            .collect();
        let maps: Vec<MapNhwc<'_>> = sizes
            .iter()
            .zip(&datas)
            .map(|(&(height, width), data)| MapNhwc { data, height, width })
            .collect();
        let bias = random_vec(c, 99, 1.0);
        for relu in [false, true] {
            let mut out = vec![0f32; out_h * out_w * c];
            upsample_sum_nhwc(&maps, c, out_h, out_w, &bias, relu, &mut out).unwrap();
            for y in 0..out_h {
                for x in 0..out_w {
                    for k in 0..c {
                        let mut want = bias[k] as f64;
                        for m in &maps {
                            want += reference(m, c, out_h, out_w, y, x, k);
                        }
                        if relu {
                            want = want.max(0.0);
                        }
                        let got = out[(y * out_w + x) * c + k] as f64;
                        assert!((got - want).abs() < 1e-5, "y={y} x={x} k={k}: {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let data = vec![0f32; 10];
        let m = MapNhwc {
            data: &data,
            height: 2,
            width: 2,
        };
        let mut out = vec![0f32; 4 * 3];
        let err = upsample_sum_nhwc(&[m], 3, 2, 2, &[0.0; 3], false, &mut out).unwrap_err();
        assert!(err.to_string().contains("input 0"), "{err}");
    }
}
