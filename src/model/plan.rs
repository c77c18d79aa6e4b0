//! The execution plan: which kernel each part of the model runs, decided once by `Segformer::prepare` from the
//! quantization level, never re-decided per forward pass.
//!
//! - [`MatMul`]: a Linear or convolution weight *is* its kernel: float32 through the f32 GEMM, weight-only quantized
//!   (dequantized per call into a short-lived buffer, so a quantized model keeps no float copy) through the same
//!   GEMM, or int8 codes (int4 codes unpacked to int8 at `int4-dyn`) packed for the W8A8 GEMM ([`W8A8Weight`]),
//!   which quantizes activations per row at run time or with a calibrated per-tensor scale.
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
//! | int4-dyn                  | `W8A8` (int4 codes unpacked to int8)    | dequantized    | int8      | int8          |
//! | int8-static               | `W8A8`, static input scale              | dequantized    | int8      | int8, static  |
//! | w8a8-f8, w4a8 (simulated) | `Dequant`, input fake-quantized         | dequantized    | f32       | f32, fake-q   |
//!
//! int8 activations are quantized per row at run time at `int8-dyn` and `int4-dyn`. At `int8-static` the input of every Linear
//! and dense convolution is quantized with the one scale calibration fixed for it ([`InputQuant`]); the composed
//! head's stage `i` uses `linear_c.i.proj`'s scale (the same input), the classifier its own; the attention products
//! stay per row at run time, as at `int8-dyn` (scores and probabilities are no layer's input). The simulated levels
//! quantize and dequantize those same inputs (e4m3 for `w8a8-f8`, int8 for `w4a8`) before the float GEMM. Depthwise
//! convolutions keep float inputs at every level.
//!
//! Weights a recipe keeps in float (`--skip`) stay `F32` at every level, with float inputs.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};

use rayon::prelude::*;

use crate::kernels::{self, ConvShape, I8Panels};
use crate::quant::act::ActFormat;
use crate::quant::{Format, Level, QuantTensor, QuantTensorMeta, int};
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

/// A symmetric per-channel int8 or int4 weight as the W8A8 GEMM reads it: the codes in [`I8Panels`] (int8 codes as
/// they are, int4 codes sign-extended to int8 once, when the plan packs them), the stored tensor's metadata, and the
/// column order. The [`QuantTensor`] is rebuilt from it when the model is saved (int4 codes packed two per byte
/// again), so a checkpoint holds exactly the codes it was packed from.
#[derive(Debug, Clone)]
pub struct W8A8Weight {
    panels: I8Panels,
    meta: QuantTensorMeta,
    columns: Columns,
    /// The calibrated per-tensor activation scale (`int8-static`); `None` quantizes activations per row at run time.
    act_scale: Option<f32>,
}

impl W8A8Weight {
    /// Packs `q` when it is int8 or int4 (`int4-dyn`), symmetric and per channel (one scale per output row), with
    /// int8 codes in [-127, 127] (every int4 code fits); otherwise `None` and the weight stays on the dequantize
    /// path. A weight with column scales (AWQ) stays there too: the int8 GEMM has no per-input-column multiplier.
    pub fn pack(q: &QuantTensor, columns: Columns) -> Option<W8A8Weight> {
        if !matches!(q.format, Format::Int8 | Format::Int4)
            || !q.symmetric
            || q.group_size < q.cols
            || q.scales.len() != q.rows
            || !q.col_scales.is_empty()
        {
            return None;
        }
        let stored: Vec<i8> = match q.format {
            Format::Int4 => unpack_int4_codes(&q.data, q.rows, q.cols)?,
            _ => q.data.iter().map(|&b| b as i8).collect(),
        };
        let codes = match columns {
            Columns::Rows => stored,
            Columns::Patch { kernel, in_channels } => {
                if q.cols != kernel * kernel * in_channels {
                    return None;
                }
                let mut codes = vec![0i8; q.rows * q.cols];
                permute_to_patch_order(&stored, kernel, in_channels, &mut codes);
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

    /// The stored form of the weight (row-major codes, packed two per byte for int4, and per-row scales),
    /// identical to the one it was packed from.
    pub fn to_quant(&self) -> QuantTensor {
        let (rows, cols) = (self.meta.rows, self.meta.cols);
        let mut data = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            data.extend((0..cols).map(|c| self.panels.code(r, self.columns.of(c)) as u8));
        }
        if self.meta.format == Format::Int4 {
            data = int::pack(&data, rows, cols, 4);
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

/// PyTorch's conv weight rows `[C_out, C_in, K, K]` into `dst` as `[C_out, K, K, C_in]` (value `(ci, ky, kx)` of a
/// row to [`patch_column`]'s place): each destination pixel's channels gathered in one pass, rows in parallel.
fn permute_to_patch_order<T: Copy + Send + Sync>(w: &[T], kernel: usize, in_channels: usize, dst: &mut [T]) {
    let taps = kernel * kernel;
    let patch = taps * in_channels;
    if patch == 0 {
        return;
    }
    dst.par_chunks_mut(patch)
        .zip(w.par_chunks(patch))
        .with_min_len(16)
        .for_each(|(dst, row)| {
            for (tap, channels) in dst.chunks_exact_mut(in_channels).enumerate() {
                for (ci, d) in channels.iter_mut().enumerate() {
                    *d = row[ci * taps + tap];
                }
            }
        });
}

/// Row-major packed int4 codes (two per byte, low nibble first, each row starting on a byte) sign-extended to one
/// int8 code per weight; `None` when `packed` is not `rows` rows of `cols` codes.
fn unpack_int4_codes(packed: &[u8], rows: usize, cols: usize) -> Option<Vec<i8>> {
    if packed.len() != rows * int::row_bytes(cols, 4) {
        return None;
    }
    let codes = int::unpack(packed, rows, cols, 4);
    Some(codes.into_iter().map(|c| int::sign_extend(c, 4)).collect())
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
    /// A float weight (borrowed), or a weight-only quantized one dequantized into a reused buffer.
    Float(RunValues<'a>),
    W8A8(&'a W8A8Weight),
}

/// A weight's float values for one forward pass ([`MatMul::run_values`]).
pub enum RunValues<'a> {
    Borrowed(&'a [f32]),
    Scratch(ScratchWeights),
    Owned(Vec<f32>),
}

impl std::ops::Deref for RunValues<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            RunValues::Borrowed(v) => v,
            RunValues::Scratch(v) => v,
            RunValues::Owned(v) => v,
        }
    }
}

/// Float buffers that weight-only levels dequantize into on every call, kept between calls: a fresh allocation of a
/// layer's size costs a zero-fill and, above the allocator's mmap threshold, page faults on pages the kernel zeroes
/// too, on every weight of every forward pass. At most [`SCRATCH_BUFFERS`] are kept, each as large as the largest
/// weight it has held (a few MB for a B0-sized model), so memory stays bounded.
static SCRATCH: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// How many dequantization buffers are kept between calls (more are allocated when more weights are resolved at
/// once, and freed when returned to a full pool).
const SCRATCH_BUFFERS: usize = 8;

/// `len` floats of a reused buffer; contents are whatever the last user left (every user overwrites them all).
pub struct ScratchWeights {
    buf: Vec<f32>,
    len: usize,
}

impl ScratchWeights {
    /// The smallest kept buffer of at least `len` floats, else the largest grown to `len`, else a new one.
    fn take(len: usize) -> ScratchWeights {
        let mut pool = SCRATCH.lock().unwrap_or_else(PoisonError::into_inner);
        let fitting = (pool.iter().enumerate())
            .filter(|(_, b)| b.len() >= len)
            .min_by_key(|(_, b)| b.len())
            .or_else(|| pool.iter().enumerate().max_by_key(|(_, b)| b.len()))
            .map(|(i, _)| i);
        let mut buf = fitting.map(|i| pool.swap_remove(i)).unwrap_or_default();
        drop(pool);
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        ScratchWeights { buf, len }
    }

    /// `q` dequantized (row-major, PyTorch's layout), as [`QuantTensor::dequantize`] gives it.
    fn dequantized(q: &QuantTensor) -> ScratchWeights {
        let mut out = ScratchWeights::take(q.len());
        // Only inconsistent column scales fail (loading refuses them); `dequantize` leaves zeros then, and so here.
        if q.dequantize_rows_into(0, &mut out).is_err() {
            out.fill(0.0);
        }
        out
    }
}

impl std::ops::Deref for ScratchWeights {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for ScratchWeights {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

impl Drop for ScratchWeights {
    fn drop(&mut self) {
        let mut pool = SCRATCH.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.len() < SCRATCH_BUFFERS {
            pool.push(std::mem::take(&mut self.buf));
        }
    }
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
            // Packing requires symmetric per-channel int8 or int4, so the name follows from the format alone.
            MatMul::W8A8(p) => format!("{}-sym-packed", p.meta.format.name()),
        }
    }

    /// Bits per weight: as stored for float and weight-only weights; as held in memory for int8 W8A8 weights
    /// (codes, f32 scales and the GEMM's column sums), and as stored for int4 ones (`int4-dyn`'s point is the
    /// 4-bit checkpoint; in memory its codes take a byte each, as [`MatMul::bytes`] says).
    pub fn bits_per_weight(&self) -> f64 {
        match self {
            MatMul::F32(_) => 32.0,
            MatMul::Dequant(q) => q.bits_per_weight(),
            MatMul::W8A8(p) if p.meta.format == Format::Int4 => {
                let stored = int::row_bytes(p.meta.cols, 4) * p.meta.rows + p.meta.rows * p.meta.param_dtype.bytes();
                stored as f64 * 8.0 / (p.meta.rows * p.meta.cols).max(1) as f64
            }
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

    /// The weight as float32 values for a float kernel on every forward pass (the depthwise convolutions): float
    /// weights borrowed, weight-only ones dequantized into a reused buffer ([`ScratchWeights`]), int8 ones
    /// dequantized.
    pub fn run_values(&self) -> RunValues<'_> {
        match self {
            MatMul::F32(v) => RunValues::Borrowed(v.as_slice()),
            MatMul::Dequant(q) => RunValues::Scratch(ScratchWeights::dequantized(q)),
            MatMul::W8A8(p) => RunValues::Owned(p.dequantize()),
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

    /// Dequantizes a weight-only quantized weight once (into a reused buffer), for several
    /// [`ResolvedMatMul::apply`] calls.
    pub fn resolve(&self) -> ResolvedMatMul<'_> {
        match self {
            MatMul::W8A8(p) => ResolvedMatMul::W8A8(p),
            float => ResolvedMatMul::Float(float.run_values()),
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
                // tokens; once per call, for every image, into a reused buffer (the permutation writes every value).
                let w = other.run_values();
                let (k, c) = (shape.kernel, shape.in_channels);
                let mut permuted = ScratchWeights::take(w.len());
                permute_to_patch_order(&w, k, c, &mut permuted);
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
            ResolvedMatMul::Float(w) => kernels::linear_f32(x, rows, k, w, n, bias, residual),
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

    /// Scalar reference of the int4 unpacking: each stored code read with [`int::unpack`] and sign-extended.
    fn int4_codes_scalar(q: &QuantTensor) -> Vec<i8> {
        int::unpack(&q.data, q.rows, q.cols, 4)
            .into_iter()
            .map(|c| int::sign_extend(c, 4))
            .collect()
    }

    #[test]
    fn int4_dyn_layers_run_the_int8_gemm_on_their_unpacked_codes() {
        // Odd columns (a half-used last byte per row), rows not a multiple of the GEMM's panel width.
        for (rows, cols, m) in [(13, 37, 5), (8, 64, 3), (1, 1, 1), (33, 147, 17)] {
            let w = crate::quant::testing::trained_like(rows, cols, 7 + cols as u64);
            let q = quantize_weight("w", &w, rows, cols, &Recipe::level_default(Level::Int4Dyn)).unwrap();
            assert_eq!((q.format, q.symmetric, q.group_size), (Format::Int4, true, cols));
            assert_eq!(q.data.len(), rows * cols.div_ceil(2), "two codes per byte");
            let codes = int4_codes_scalar(&q);
            assert!(codes.iter().all(|c| (-7..=7).contains(c)), "symmetric int4 codes");
            let planned = MatMul::Dequant(Arc::new(q.clone())).planned(Some((Columns::Rows, None)));
            let MatMul::W8A8(packed) = &planned else {
                panic!("int4-dyn weight {rows}x{cols} not packed for the int8 GEMM");
            };
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(packed.panels().code(r, c), codes[r * cols + c], "code ({r}, {c})");
                }
            }
            let reference = I8Panels::pack(&codes, &q.scales, rows, cols).unwrap();
            let x = crate::kernels::test_util::random_vec(m * cols, 3, 1.0);
            let bias: Vec<f32> = (0..rows).map(|i| i as f32 * 0.01).collect();
            let got = planned.apply(&x, m, cols, rows, Some(&bias), None).unwrap();
            let mut want = vec![0f32; m * rows];
            kernels::gemm_i8_dynamic(&x, m, cols, &reference, Some(&bias), &mut want).unwrap();
            assert_eq!(got, want, "{rows}x{cols}: the same GEMM on the same codes");
            let mut scalar = vec![0f32; m * rows];
            kernels::gemm_i8_dynamic_scalar(&x, m, cols, &reference, Some(&bias), &mut scalar).unwrap();
            for (i, (a, b)) in got.iter().zip(&scalar).enumerate() {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-6), "[{i}] {a} vs scalar {b}");
            }
            // Saved back exactly as quantized; 4 bits per code plus one f16 scale per row.
            let Stored::Quantized(stored) = planned.stored() else {
                panic!("int4-dyn weight stored as float");
            };
            assert_eq!(stored.as_ref(), &q);
            assert_eq!(planned.format_name(), "int4-sym-packed");
            let stored_bits = (rows * cols.div_ceil(2) + 2 * rows) as f64 * 8.0 / (rows * cols) as f64;
            assert_eq!(planned.bits_per_weight(), stored_bits);
            assert_eq!(planned.values().as_ref(), q.dequantize().as_slice());
        }
    }

    #[test]
    fn patch_order_permutation_moves_each_value_to_its_patch_column() {
        for (rows, kernel, in_channels) in [(3, 3, 5), (2, 7, 3), (4, 1, 9), (1, 2, 1)] {
            let patch = kernel * kernel * in_channels;
            let w: Vec<f32> = (0..rows * patch).map(|i| i as f32).collect();
            let mut fast = vec![f32::NAN; w.len()];
            permute_to_patch_order(&w, kernel, in_channels, &mut fast);
            let mut reference = vec![f32::NAN; w.len()];
            for (row, dst) in w.chunks_exact(patch).zip(reference.chunks_exact_mut(patch)) {
                for (col, &v) in row.iter().enumerate() {
                    dst[patch_column(col, kernel, in_channels)] = v;
                }
            }
            assert_eq!(fast, reference, "{rows}x{in_channels}x{kernel}x{kernel}");
        }
    }

    #[test]
    fn scratch_buffers_are_reused_and_bounded() {
        let q = quantize_weight(
            "w",
            &crate::quant::testing::trained_like(5, 70, 1),
            5,
            70,
            &Recipe::level_default(Level::Int4),
        )
        .unwrap();
        let weight = MatMul::Dequant(Arc::new(q.clone()));
        // A buffer left dirty by a larger weight gives the same values as a fresh dequantization.
        {
            let mut big = ScratchWeights::take(10_000);
            big.fill(f32::NAN);
        }
        for _ in 0..3 {
            assert_eq!(weight.values().as_ref(), q.dequantize().as_slice());
            let ResolvedMatMul::Float(RunValues::Scratch(w)) = weight.resolve() else {
                panic!("a weight-only weight resolves to a dequantized buffer");
            };
            assert_eq!(&w[..], q.dequantize().as_slice());
        }
        let held: Vec<ScratchWeights> = (0..SCRATCH_BUFFERS + 3).map(|_| ScratchWeights::take(16)).collect();
        drop(held);
        assert!(SCRATCH.lock().unwrap().len() <= SCRATCH_BUFFERS);
    }

    #[test]
    fn int4_dyn_convolutions_pack_in_patch_order() {
        // A 3x3 convolution with 5 input channels: 45 columns, permuted to the channels-last patch order.
        let (rows, kernel, in_channels) = (6, 3, 5);
        let cols = kernel * kernel * in_channels;
        let w = crate::quant::testing::trained_like(rows, cols, 21);
        let q = quantize_weight("c", &w, rows, cols, &Recipe::level_default(Level::Int4Dyn)).unwrap();
        let columns = Columns::Patch { kernel, in_channels };
        let packed = W8A8Weight::pack(&q, columns).unwrap();
        let codes = int4_codes_scalar(&q);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(packed.panels().code(r, columns.of(c)), codes[r * cols + c]);
            }
        }
        assert_eq!(packed.to_quant(), q);
        // Grouped or affine int4 stays weight-only.
        let grouped = quantize_weight("c", &w, rows, cols, &Recipe::level_default(Level::Int4)).unwrap();
        assert!(W8A8Weight::pack(&grouped, columns).is_none());
    }

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
