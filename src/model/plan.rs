//! The execution plan: which kernel each part of the model runs, decided once by `Segformer::prepare` from the
//! quantization level, never re-decided per forward pass.
//!
//! - [`MatMul`]: a Linear or convolution weight *is* its kernel: float32 through the f32 GEMM, weight-only quantized
//!   (dequantized per call into a short-lived buffer, so a quantized model keeps no float copy) through the same
//!   GEMM, or int8 codes packed for the W8A8 GEMM ([`W8A8Weight`]), which quantizes activations per row at run time
//!   or with a calibrated per-tensor scale.
//! - [`AttentionKernel`]: f32 or int8 attention products.
//! - [`InputQuant`]: a layer input's calibrated per-tensor scale, and whether the input is fake-quantized before a
//!   float product (the simulated levels).
//! - [`Activations`]: what the level says about activations, from which the choices above follow.
//!
//! | level                     | Linear, dense conv (patch, `sr`, 1x1)   | depthwise conv | attention | composed head |
//! |---------------------------|-----------------------------------------|----------------|-----------|---------------|
//! | f32                       | `F32`                                   | f32            | f32       | f32           |
//! | f16 .. int2 (weight-only) | `Dequant`                               | dequantized    | f32       | f32           |
//! | int8-dyn                  | `W8A8` (symmetric per-channel int8)     | dequantized    | int8      | int8          |
//! | int8-static               | `W8A8`, static input scale              | dequantized    | int8      | int8, static  |
//! | w8a8-f8, w4a8 (simulated) | `Dequant`, input fake-quantized         | dequantized    | f32       | f32, fake-q   |
//!
//! int8 activations are quantized per row at run time at `int8-dyn`. At `int8-static` the input of every Linear
//! and dense convolution is quantized with the one scale calibration fixed for it ([`InputQuant`]); the composed
//! head's stage `i` uses `linear_c.i.proj`'s scale (the same input), the classifier its own; the attention products
//! stay per row at run time, as at `int8-dyn` (scores and probabilities are no layer's input). The simulated levels
//! quantize and dequantize those same inputs (e4m3 for `w8a8-f8`, int8 for `w4a8`) before the float GEMM. Depthwise
//! convolutions keep float inputs at every level.
//!
//! Weights a recipe keeps in float (`--skip`) stay `F32` at every level, with float inputs.

use std::borrow::Cow;
use std::sync::Arc;

use rayon::prelude::*;

use crate::kernels::{self, ConvShape, I8Panels};
use crate::quant::act::ActFormat;
use crate::quant::{Format, Level, QuantTensor, QuantTensorMeta};
use crate::{Error, Result};

/// What a level does with activations; every kernel choice follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activations {
    /// Float32 activations (f32 and every weight-only level).
    F32,
    /// Activations quantized to int8 per row at run time (`int8-dyn`): int8 GEMMs and int8 attention.
    Int8Dynamic,
    /// The inputs of Linear layers and dense convolutions quantized to int8 with per-tensor scales fixed by
    /// calibration (`int8-static`): int8 GEMMs without an absmax pass; attention as `Int8Dynamic`.
    Int8Static,
    /// Simulated static quantization (`w8a8-f8`, `w4a8`): the same inputs quantized to the format with their
    /// calibrated scales and dequantized, then the float GEMM.
    Simulated(ActFormat),
}

impl Activations {
    pub fn of_level(level: Level) -> Activations {
        match (level.dynamic_activations(), level.static_activations()) {
            (true, _) => Activations::Int8Dynamic,
            (false, Some(_)) if level.int8_gemm() => Activations::Int8Static,
            (false, Some(format)) => Activations::Simulated(format),
            (false, None) => Activations::F32,
        }
    }

    /// True when every quantized Linear and dense convolution needs a calibrated input scale.
    pub fn needs_input_scales(self) -> bool {
        matches!(self, Activations::Int8Static | Activations::Simulated(_))
    }

    /// What the int8 GEMM of a layer with calibrated input scale `scale` runs: `None` for no int8 GEMM (float
    /// activations), `Some(None)` for activations quantized per row at run time, `Some(Some(s))` for scale `s`.
    pub(crate) fn int8_gemm(self, scale: Option<f32>) -> Option<Option<f32>> {
        match self {
            Activations::Int8Dynamic => Some(None),
            Activations::Int8Static => scale.map(Some),
            Activations::F32 | Activations::Simulated(_) => None,
        }
    }
}

/// A layer input's static quantization: the per-tensor scale calibration gave it (saved in checkpoints as
/// `<layer>.input_scale`, as optimum-quanto names it; `None` until calibrated, and for layers the levels keep in
/// float such as depthwise convolutions), and at the simulated levels the format the input is quantized to and
/// dequantized before the float product (decided by `Segformer::prepare`).
#[derive(Debug, Clone, Default)]
pub struct InputQuant {
    pub(crate) scale: Option<f32>,
    simulated: Option<ActFormat>,
}

impl InputQuant {
    /// The calibrated per-tensor scale.
    pub fn scale(&self) -> Option<f32> {
        self.scale
    }

    /// The format the input is fake-quantized to before the product, at a simulated level.
    pub fn simulated(&self) -> Option<ActFormat> {
        self.simulated.filter(|_| self.scale.is_some())
    }

    /// Plans the input for `activations` for a layer whose weight is `weight`: simulated levels fake-quantize the
    /// inputs of quantized weights (float ones, kept by `--skip`, keep float inputs as at every level).
    pub(crate) fn plan(&mut self, activations: Activations, weight: &MatMul) {
        self.simulated = match activations {
            Activations::Simulated(format) if !matches!(weight, MatMul::F32(_)) => Some(format),
            _ => None,
        };
    }

    /// `x` as the layer's product reads it: borrowed as it is, or quantized and dequantized with the calibrated
    /// scale at a simulated level.
    pub fn apply<'a>(&self, x: &'a [f32]) -> Cow<'a, [f32]> {
        match (self.simulated(), self.scale) {
            (Some(format), Some(scale)) => Cow::Owned(
                x.par_iter()
                    .with_min_len(4096)
                    .map(|&v| format.fake_quant(v, scale))
                    .collect(),
            ),
            _ => Cow::Borrowed(x),
        }
    }
}

/// The order of a packed weight's input columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Columns {
    /// PyTorch's order (a Linear's inputs).
    Rows,
    /// A square convolution run on channels-last tokens: `[K, K, C_in]`, a token patch's order, instead of PyTorch's
    /// `[C_in, K, K]` (for a 1x1 convolution the two are the same).
    Patch { kernel: usize, in_channels: usize },
}

impl Columns {
    /// The packed column of stored (PyTorch-order) column `c`.
    fn of(self, c: usize) -> usize {
        match self {
            Columns::Rows => c,
            Columns::Patch { kernel, in_channels } => patch_column(c, kernel, in_channels),
        }
    }
}

/// Column `c = (ci * K + ky) * K + kx` of a PyTorch conv weight row, moved to its place `(ky * K + kx) * C_in + ci` in
/// a channels-last patch.
fn patch_column(c: usize, kernel: usize, in_channels: usize) -> usize {
    let (ci, ky, kx) = (c / (kernel * kernel), c / kernel % kernel, c % kernel);
    (ky * kernel + kx) * in_channels + ci
}

/// A symmetric per-channel int8 weight as the W8A8 GEMM reads it: the codes in [`I8Panels`] (same bytes as the
/// codes), the stored tensor's metadata, and the column order. The [`QuantTensor`] is rebuilt from it when the model
/// is saved, so a checkpoint holds exactly the codes it was packed from.
#[derive(Debug, Clone)]
pub struct W8A8Weight {
    panels: I8Panels,
    meta: QuantTensorMeta,
    columns: Columns,
    /// The calibrated per-tensor activation scale (`int8-static`); `None` quantizes activations per row at run time.
    act_scale: Option<f32>,
}

impl W8A8Weight {
    /// Packs `q` when it is int8, symmetric and per channel (one scale per output row) with codes in [-127, 127];
    /// otherwise `None` and the weight stays on the dequantize path. A weight with column scales (AWQ) stays there
    /// too: the int8 GEMM has no per-input-column multiplier.
    pub fn pack(q: &QuantTensor, columns: Columns) -> Option<W8A8Weight> {
        if q.format != Format::Int8
            || !q.symmetric
            || q.group_size < q.cols
            || q.scales.len() != q.rows
            || !q.col_scales.is_empty()
        {
            return None;
        }
        let codes: Vec<i8> = match columns {
            Columns::Rows => q.data.iter().map(|&b| b as i8).collect(),
            Columns::Patch { kernel, in_channels } => {
                if q.cols != kernel * kernel * in_channels {
                    return None;
                }
                let mut codes = vec![0i8; q.rows * q.cols];
                for r in 0..q.rows {
                    for c in 0..q.cols {
                        codes[r * q.cols + columns.of(c)] = q.data[r * q.cols + c] as i8;
                    }
                }
                codes
            }
        };
        let panels = I8Panels::pack(&codes, &q.scales, q.rows, q.cols).ok()?;
        Some(W8A8Weight {
            panels,
            meta: q.meta(),
            columns,
            act_scale: None,
        })
    }

    pub fn panels(&self) -> &I8Panels {
        &self.panels
    }

    /// The static activation scale the GEMM quantizes inputs with; `None` for per-row scales at run time.
    pub fn act_scale(&self) -> Option<f32> {
        self.act_scale
    }

    pub fn columns(&self) -> Columns {
        self.columns
    }

    /// The stored form of the weight (row-major codes, per-row scales), identical to the one it was packed from.
    pub fn to_quant(&self) -> QuantTensor {
        let (rows, cols) = (self.meta.rows, self.meta.cols);
        let mut data = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            data.extend((0..cols).map(|c| self.panels.code(r, self.columns.of(c)) as u8));
        }
        QuantTensor {
            format: self.meta.format,
            symmetric: self.meta.symmetric,
            zero_point: self.meta.zero_point,
            rows,
            cols,
            group_size: self.meta.group_size,
            param_dtype: self.meta.param_dtype,
            data,
            scales: self.panels.scales().to_vec(),
            zeros: Vec::new(),
            col_scales: Vec::new(),
        }
    }

    fn dequantize(&self) -> Vec<f32> {
        let (rows, cols) = (self.meta.rows, self.meta.cols);
        let scales = self.panels.scales();
        let mut out = Vec::with_capacity(rows * cols);
        for (r, &scale) in scales.iter().enumerate().take(rows) {
            out.extend((0..cols).map(|c| self.panels.code(r, self.columns.of(c)) as f32 * scale));
        }
        out
    }
}

/// A Linear or convolution weight together with the kernel that multiplies by it.
#[derive(Debug, Clone)]
pub enum MatMul {
    /// Float32, row-major in PyTorch's layout (`[out, in]`, convolutions `[out, in, kh, kw]`), f32 GEMM.
    F32(Arc<Vec<f32>>),
    /// Weight-only quantized: dequantized into a buffer that lives for the call, then the f32 GEMM.
    Dequant(Arc<QuantTensor>),
    /// Levels `int8-dyn` and `int8-static`: int8 codes packed for the int8 GEMM, activations quantized per row
    /// ([`kernels::gemm_i8_dynamic`]) or with the weight's static activation scale ([`kernels::gemm_i8_static`]).
    W8A8(Arc<W8A8Weight>),
}

/// A [`MatMul`] ready to be applied several times in a row (a quantized weight dequantized once, not per call).
pub enum ResolvedMatMul<'a> {
    F32(Cow<'a, [f32]>),
    W8A8(&'a W8A8Weight),
}

impl MatMul {
    /// A weight with no values yet (a module tree built from a config, before its checkpoint is read).
    pub(crate) fn empty() -> MatMul {
        MatMul::F32(Arc::new(Vec::new()))
    }

    /// This weight with the kernel for `int8`: `Some((columns, act_scale))` packs a symmetric per-channel int8
    /// weight for the W8A8 GEMM in that column order, with activations quantized per row at run time (`None`) or
    /// by that static scale; `None` (float activations, or a layer with no int8 kernel) keeps or returns it to the
    /// float kernels. Other weights are returned as they are.
    pub(crate) fn planned(self, int8: Option<(Columns, Option<f32>)>) -> MatMul {
        match (self, int8) {
            (MatMul::W8A8(p), Some((columns, act_scale))) if p.columns == columns => {
                if p.act_scale == act_scale {
                    MatMul::W8A8(p)
                } else {
                    MatMul::W8A8(Arc::new(W8A8Weight {
                        act_scale,
                        ..(*p).clone()
                    }))
                }
            }
            (MatMul::W8A8(p), int8) => MatMul::Dequant(Arc::new(p.to_quant())).planned(int8),
            (MatMul::Dequant(q), Some((columns, act_scale))) => match W8A8Weight::pack(&q, columns) {
                Some(p) => MatMul::W8A8(Arc::new(W8A8Weight { act_scale, ..p })),
                None => MatMul::Dequant(q),
            },
            (weight, _) => weight,
        }
    }

    /// Bytes the weight occupies in memory, as stored (packed codes, scales and zero points).
    pub fn bytes(&self) -> usize {
        match self {
            MatMul::F32(v) => v.len() * std::mem::size_of::<f32>(),
            MatMul::Dequant(q) => q.weight_bytes(),
            MatMul::W8A8(p) => p.panels.nbytes(),
        }
    }

    /// Format name for inspection ("f32", "int4-g64", "int8-sym-packed", ...).
    pub fn format_name(&self) -> String {
        match self {
            MatMul::F32(_) => "f32".into(),
            MatMul::Dequant(q) => q.format_name(),
            // Packing requires symmetric per-channel int8, so the name follows from the format alone.
            MatMul::W8A8(p) => format!("{}-sym-packed", p.meta.format.name()),
        }
    }

    pub fn bits_per_weight(&self) -> f64 {
        match self {
            MatMul::F32(_) => 32.0,
            MatMul::Dequant(q) => q.bits_per_weight(),
            MatMul::W8A8(p) => p.panels.nbytes() as f64 * 8.0 / (p.meta.rows * p.meta.cols).max(1) as f64,
        }
    }

    /// The weight as float32 values in PyTorch's row-major layout (float weights borrowed, others dequantized).
    pub fn values(&self) -> Cow<'_, [f32]> {
        match self {
            MatMul::F32(v) => Cow::Borrowed(v.as_slice()),
            MatMul::Dequant(q) => Cow::Owned(q.dequantize()),
            MatMul::W8A8(p) => Cow::Owned(p.dequantize()),
        }
    }

    /// What a checkpoint stores for this weight: float values, or the quantized tensor (rebuilt from packed codes).
    pub fn stored(&self) -> Stored<'_> {
        match self {
            MatMul::F32(v) => Stored::F32(v.as_slice()),
            MatMul::Dequant(q) => Stored::Quantized(Cow::Borrowed(q.as_ref())),
            MatMul::W8A8(p) => Stored::Quantized(Cow::Owned(p.to_quant())),
        }
    }

    /// The packed int8 weight when activations are quantized per row at run time (`int8-dyn`): callers that already
    /// hold the input quantized ([`kernels::QuantizedRows`]) run [`kernels::gemm_i8_quantized`] on it.
    pub fn dynamic_int8_panels(&self) -> Option<&kernels::I8Panels> {
        match self {
            MatMul::W8A8(p) if p.act_scale.is_none() => Some(&p.panels),
            _ => None,
        }
    }

    /// Dequantizes a weight-only quantized weight once, for several [`ResolvedMatMul::apply`] calls.
    pub fn resolve(&self) -> ResolvedMatMul<'_> {
        match self {
            MatMul::W8A8(p) => ResolvedMatMul::W8A8(p),
            other => ResolvedMatMul::F32(other.values()),
        }
    }

    /// `x [rows, k] * W^T + bias (+ residual)` for `W [n, k]`: `[rows, n]`.
    pub fn apply(
        &self,
        x: &[f32],
        rows: usize,
        k: usize,
        n: usize,
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        self.resolve().apply(x, rows, k, n, bias, residual)
    }

    /// A dense square convolution on `batch` channels-last images `x [batch, H, W, C_in]`: tokens
    /// `[batch, H' * W', C_out]` (im2col + GEMM per block of output pixels).
    pub fn conv_tokens(&self, x: &[f32], batch: usize, shape: ConvShape, bias: Option<&[f32]>) -> Result<Vec<f32>> {
        let image = shape.height * shape.width * shape.in_channels;
        if x.len() != batch * image {
            return Err(Error::internal(format!(
                "convolution {shape:?}: {} input values for {batch} images",
                x.len()
            )));
        }
        let images = match self {
            MatMul::W8A8(p) => {
                let want = Columns::Patch {
                    kernel: shape.kernel,
                    in_channels: shape.in_channels,
                };
                if p.columns != want {
                    return Err(Error::internal(format!(
                        "convolution {shape:?}: int8 weight packed in {:?} column order, not {want:?}",
                        p.columns
                    )));
                }
                // Patches quantized per row at run time, or with the static scale; W8A8 GEMM.
                x.chunks_exact(image)
                    .map(|image| match p.act_scale {
                        None => kernels::conv2d_nhwc_i8(image, shape, &p.panels, bias),
                        Some(scale) => kernels::conv2d_nhwc_i8_static(image, shape, &p.panels, scale, bias),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            other => {
                // PyTorch's [C_out, C_in, K, K] -> [C_out, K, K, C_in], so that a patch row is contiguous in the
                // tokens; once per call, for every image.
                let w = other.values();
                let (k, c) = (shape.kernel, shape.in_channels);
                let patch = c * k * k;
                let mut permuted = vec![0f32; w.len()];
                for (row, dst) in w.chunks_exact(patch).zip(permuted.chunks_exact_mut(patch)) {
                    for (col, &v) in row.iter().enumerate() {
                        dst[patch_column(col, k, c)] = v;
                    }
                }
                x.chunks_exact(image)
                    .map(|image| kernels::conv2d_nhwc(image, shape, &permuted, bias))
                    .collect::<Result<Vec<_>>>()?
            }
        };
        Ok(if images.len() == 1 {
            images.into_iter().next().unwrap_or_default()
        } else {
            images.concat()
        })
    }
}

impl ResolvedMatMul<'_> {
    /// [`MatMul::apply`]: the bias and residual are written first and the f32 GEMM accumulates onto them; the int8
    /// GEMM adds the bias in its epilogue and the residual after.
    pub fn apply(
        &self,
        x: &[f32],
        rows: usize,
        k: usize,
        n: usize,
        bias: Option<&[f32]>,
        residual: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        match self {
            ResolvedMatMul::F32(w) => kernels::linear_f32(x, rows, k, w, n, bias, residual),
            ResolvedMatMul::W8A8(p) => {
                if p.panels.n() != n {
                    return Err(Error::internal(format!(
                        "int8 weight has {} outputs, the layer {n}",
                        p.panels.n()
                    )));
                }
                // Written without a zeroing pass, the residual added per finished block.
                match p.act_scale {
                    None => kernels::gemm_i8_dynamic_vec(x, rows, k, &p.panels, bias, residual),
                    Some(scale) => kernels::gemm_i8_static_vec(x, rows, k, &p.panels, scale, bias, residual),
                }
            }
        }
    }
}

/// A weight as a checkpoint stores it ([`MatMul::stored`]).
pub enum Stored<'a> {
    F32(&'a [f32]),
    Quantized(Cow<'a, QuantTensor>),
}

/// Which attention products run: chosen with the rest of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernel {
    /// [`kernels::attention`].
    F32,
    /// [`kernels::attention_i8`]: both products in int8 with activations quantized at run time, like `int8-dyn`'s
    /// Linear layers (at `int8-static` too: scores and probabilities have no layer input to calibrate).
    Int8,
}

impl AttentionKernel {
    pub fn for_activations(activations: Activations) -> AttentionKernel {
        match activations {
            Activations::F32 | Activations::Simulated(_) => AttentionKernel::F32,
            Activations::Int8Dynamic | Activations::Int8Static => AttentionKernel::Int8,
        }
    }

    pub fn run(self, q: &[f32], k: &[f32], v: &[f32], shape: kernels::AttentionShape, out: &mut [f32]) -> Result<()> {
        match self {
            AttentionKernel::F32 => kernels::attention(q, k, v, shape, out),
            AttentionKernel::Int8 => kernels::attention_i8(q, k, v, shape, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{Level, Recipe, quantize_weight};

    #[test]
    fn weights_with_column_scales_stay_off_the_int8_gemm() {
        let (rows, cols) = (4, 32);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 17) as f32 - 8.0) / 10.0).collect();
        let mut q = quantize_weight("w", &w, rows, cols, &Recipe::level_default(Level::Int8Dyn)).unwrap();
        assert!(W8A8Weight::pack(&q, Columns::Rows).is_some());
        q.col_scales = vec![0.5; cols];
        assert!(W8A8Weight::pack(&q, Columns::Rows).is_none());
        let planned = MatMul::Dequant(Arc::new(q)).planned(Some((Columns::Rows, None)));
        assert!(matches!(planned, MatMul::Dequant(_)));
    }
}
