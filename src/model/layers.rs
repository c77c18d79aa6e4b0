//! The one layer type every SegFormer Linear and Conv2d uses: a weight held in float or in a quantized format,
//! plus its float bias. Forward passes go through here, so a quantized model never keeps a float copy.

use std::sync::Arc;

use candle_core::{DType, Device, Layout, Storage, Tensor};
use rayon::prelude::*;

use crate::kernels::{self, I8Panels};
use crate::quant::{Format, QuantTensor, QuantTensorMeta};
use crate::{Error, Result};

/// A layer's weight: float32, or a packed quantized tensor dequantized per call into a short-lived buffer (so a
/// quantized model holds no float copy of its weights), or (level `int8-dyn`) int8 codes pre-packed for the W8A8
/// GEMM kernel, which quantizes activations per row at run time.
#[derive(Debug, Clone)]
pub enum Weight {
    Float(Tensor),
    Quantized(Arc<QuantTensor>),
    PackedI8(Arc<PackedInt8>),
}

/// A symmetric per-channel int8 weight re-laid out for [`kernels::gemm_i8_dynamic`]. Only the packed panels are
/// kept (same bytes as the codes); the [`QuantTensor`] is rebuilt from them when the model is saved or inspected.
#[derive(Debug, Clone)]
pub struct PackedInt8 {
    pub packed: I8Panels,
    pub meta: QuantTensorMeta,
    /// For a convolution run on channels-last tokens: its square kernel size and input channels. The packed columns
    /// are then in `[K, K, C_in]` order (a token patch's order) instead of PyTorch's `[C_in, K, K]`.
    pub conv_patch: Option<(usize, usize)>,
}

impl PackedInt8 {
    /// Packs `q` when it is int8, symmetric and per channel (one scale per output row) with codes in [-127, 127];
    /// otherwise returns `None` and the weight stays on the dequantize path.
    pub fn try_from_quant(q: &QuantTensor) -> Option<PackedInt8> {
        if q.format != Format::Int8 || !q.symmetric || q.group_size < q.cols || q.scales.len() != q.rows {
            return None;
        }
        let codes: Vec<i8> = q.data.iter().map(|&b| b as i8).collect();
        let packed = I8Panels::pack(&codes, &q.scales, q.rows, q.cols).ok()?;
        Some(PackedInt8 {
            packed,
            meta: q.meta(),
            conv_patch: None,
        })
    }

    /// Like [`Self::try_from_quant`] for a dense square convolution weight `[C_out, C_in, K, K]` that runs on
    /// channels-last tokens ([`kernels::conv2d_nhwc_i8`]): the columns are packed in `[K, K, C_in]` order.
    pub fn try_from_conv(q: &QuantTensor, kernel: usize, in_channels: usize) -> Option<PackedInt8> {
        if q.format != Format::Int8 || !q.symmetric || q.group_size < q.cols || q.scales.len() != q.rows {
            return None;
        }
        if q.cols != kernel * kernel * in_channels {
            return None;
        }
        let mut codes = vec![0i8; q.rows * q.cols];
        for r in 0..q.rows {
            for c in 0..q.cols {
                codes[r * q.cols + patch_column(c, kernel, in_channels)] = q.data[r * q.cols + c] as i8;
            }
        }
        let packed = I8Panels::pack(&codes, &q.scales, q.rows, q.cols).ok()?;
        Some(PackedInt8 {
            packed,
            meta: q.meta(),
            conv_patch: Some((kernel, in_channels)),
        })
    }

    /// The packed column of stored (PyTorch-order) column `c`.
    fn packed_column(&self, c: usize) -> usize {
        match self.conv_patch {
            Some((kernel, in_channels)) => patch_column(c, kernel, in_channels),
            None => c,
        }
    }

    /// The stored form of the weight (row-major codes, per-row scales), identical to the one it was packed from.
    pub fn to_quant(&self) -> QuantTensor {
        let (rows, cols) = (self.meta.rows, self.meta.cols);
        let mut data = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            data.extend((0..cols).map(|c| self.packed.code(r, self.packed_column(c)) as u8));
        }
        QuantTensor {
            format: self.meta.format,
            symmetric: self.meta.symmetric,
            rows,
            cols,
            group_size: self.meta.group_size,
            param_dtype: self.meta.param_dtype,
            data,
            scales: self.packed.scales().to_vec(),
            zeros: Vec::new(),
        }
    }

    fn dequantize(&self) -> Vec<f32> {
        let (rows, cols) = (self.meta.rows, self.meta.cols);
        let scales = self.packed.scales();
        let mut out = Vec::with_capacity(rows * cols);
        for (r, &scale) in scales.iter().enumerate().take(rows) {
            out.extend((0..cols).map(|c| self.packed.code(r, self.packed_column(c)) as f32 * scale));
        }
        out
    }
}

/// Column `c = (ci * K + ky) * K + kx` of a PyTorch conv weight row, moved to its place `(ky * K + kx) * C_in + ci` in a
/// channels-last patch.
fn patch_column(c: usize, kernel: usize, in_channels: usize) -> usize {
    let (ci, ky, kx) = (c / (kernel * kernel), c / kernel % kernel, c % kernel);
    (ky * kernel + kx) * in_channels + ci
}

/// Runs `f` on the tensor's f32 values in row-major order, borrowing them when the tensor is contiguous (a
/// non-contiguous tensor is copied once).
pub fn with_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    f(borrowed_values(&storage, layout, &x)?)
}

/// The f32 values of a contiguous CPU tensor through its storage guard (several tensors can be borrowed at once).
pub(crate) fn borrowed_values<'a>(storage: &'a Storage, layout: &Layout, tensor: &Tensor) -> Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Model(format!("tensor of shape {:?} is not contiguous", tensor.dims())))?;
    match storage {
        Storage::Cpu(cpu) => Ok(&cpu.as_slice::<f32>()?[start..end]),
        _ => Err(Error::Model(format!(
            "tensor of shape {:?} is not on the CPU",
            tensor.dims()
        ))),
    }
}

impl Weight {
    /// Bytes the weight occupies in memory, as stored (packed codes, scales and zero points).
    pub fn bytes(&self) -> usize {
        match self {
            Weight::Float(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quantized(q) => q.weight_bytes(),
            Weight::PackedI8(p) => p.packed.nbytes(),
        }
    }

    /// Format name for inspection ("f32", "int4-g64", ...).
    pub fn format_name(&self) -> String {
        match self {
            Weight::Float(_) => "f32".into(),
            Weight::Quantized(q) => q.format_name(),
            // Packing requires symmetric per-channel int8, so the name follows from the format alone.
            Weight::PackedI8(p) => format!("{}-sym-packed", p.meta.format.name()),
        }
    }

    pub fn bits_per_weight(&self) -> f64 {
        match self {
            Weight::Float(_) => 32.0,
            Weight::Quantized(q) => q.bits_per_weight(),
            Weight::PackedI8(p) => p.packed.nbytes() as f64 * 8.0 / (p.meta.rows * p.meta.cols).max(1) as f64,
        }
    }

    /// The weight as float32 in `shape` (for float weights, no copy; quantized ones are dequantized).
    pub fn to_f32(&self, shape: &[usize]) -> Result<Tensor> {
        match self {
            Weight::Float(t) => Ok(t.clone()),
            Weight::Quantized(q) => Ok(Tensor::from_vec(q.dequantize(), shape, &Device::Cpu)?),
            Weight::PackedI8(p) => Ok(Tensor::from_vec(p.dequantize(), shape, &Device::Cpu)?),
        }
    }

    /// Runs `f` on the weight as float32 values in row-major order (float weights borrowed, quantized ones
    /// dequantized into a buffer that lives for the call).
    pub fn with_values<R>(&self, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        match self {
            Weight::Float(t) => with_f32(t, f),
            Weight::Quantized(q) => f(&q.dequantize()),
            Weight::PackedI8(p) => f(&p.dequantize()),
        }
    }

    /// The weight as float32 flattened to [out, in]: the layout quantization works on.
    pub fn as_rows(&self, shape: &[usize]) -> Result<(Vec<f32>, usize, usize)> {
        let rows = shape[0];
        let cols = shape.iter().product::<usize>() / rows.max(1);
        match self {
            Weight::Float(t) => Ok((t.flatten_all()?.to_vec1::<f32>()?, rows, cols)),
            Weight::Quantized(q) => Ok((q.dequantize(), rows, cols)),
            Weight::PackedI8(p) => Ok((p.dequantize(), rows, cols)),
        }
    }
}

/// What `segq inspect` shows for one layer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerInfo {
    pub name: String,
    pub kind: &'static str,
    pub shape: Vec<usize>,
    pub parameters: usize,
    pub format: String,
    pub bits_per_weight: f64,
    pub weight_bytes: usize,
    pub bias_bytes: usize,
}

/// `nn.Linear`: y = x W^T + b, applied over the last dimension.
#[derive(Debug, Clone)]
pub struct Linear {
    pub name: String,
    pub weight: Weight,
    pub bias: Option<Tensor>,
    pub shape: Vec<usize>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_features = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / in_features.max(1);
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.shape[0];
        if let Weight::PackedI8(p) = &self.weight {
            let out = gemm_i8_rows(x, rows, in_features, p, self.bias.as_ref())?;
            return Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?);
        }
        let out = self.linear_f32(x, rows, in_features, None)?;
        Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?)
    }

    fn linear_f32(&self, x: &Tensor, rows: usize, in_features: usize, residual: Option<&Tensor>) -> Result<Vec<f32>> {
        float_linear(
            x,
            rows,
            in_features,
            &self.weight,
            self.shape[0],
            self.bias.as_ref(),
            residual,
        )
    }

    /// `forward(x) + residual` with the bias and residual added in one pass over the output (SegFormer's
    /// `attention.output.dense` and `mlp.dense2` outputs feed a residual add).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_features = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / in_features.max(1);
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.shape[0];
        if residual.dims() != out_dims.as_slice() {
            return Err(Error::Model(format!(
                "{}: residual of shape {:?} for an output of shape {out_dims:?}",
                self.name,
                residual.dims()
            )));
        }
        if let Weight::PackedI8(p) = &self.weight {
            let mut out = gemm_i8_rows(x, rows, in_features, p, self.bias.as_ref())?;
            with_f32(residual, |r| {
                out.par_iter_mut()
                    .zip(r.par_iter())
                    .with_min_len(4096)
                    .for_each(|(o, r)| *o += r);
                Ok(())
            })?;
            return Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?);
        }
        let out = self.linear_f32(x, rows, in_features, Some(residual))?;
        Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?)
    }

    pub fn info(&self) -> LayerInfo {
        layer_info(&self.name, "Linear", &self.shape, &self.weight, self.bias.as_ref())
    }
}

/// `x [rows, k] * W^T + bias (+ residual)` for a float or weight-only quantized `W [n, k]` (dequantized for the
/// call): the bias and residual are written first and the f32 GEMM accumulates onto them.
fn float_linear(
    x: &Tensor,
    rows: usize,
    k: usize,
    weight: &Weight,
    n: usize,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Vec<f32>> {
    let bias = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
    with_f32(x, |xs| {
        weight.with_values(|w| {
            let run = |r: Option<&[f32]>| kernels::linear_f32(xs, rows, k, w, n, bias.as_deref(), r);
            match residual {
                Some(res) => with_f32(res, |r| run(Some(r))),
                None => run(None),
            }
        })
    })
}

/// `x [rows, k] * W^T + bias` through the W8A8 dynamic GEMM (activations quantized per row at run time).
pub fn gemm_i8_rows(x: &Tensor, rows: usize, k: usize, w: &PackedInt8, bias: Option<&Tensor>) -> Result<Vec<f32>> {
    let mut out = vec![0f32; rows * w.packed.n()];
    with_f32(x, |xs| match bias {
        Some(b) => with_f32(b, |bs| {
            kernels::gemm_i8_dynamic(xs, rows, k, &w.packed, Some(bs), &mut out)
        }),
        None => kernels::gemm_i8_dynamic(xs, rows, k, &w.packed, None, &mut out),
    })?;
    Ok(out)
}

/// `nn.Conv2d` (NCHW), including the depthwise case (groups = channels) that Mix-FFN uses.
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub name: String,
    pub weight: Weight,
    pub bias: Option<Tensor>,
    /// [out, in/groups, kh, kw]
    pub shape: Vec<usize>,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

impl Conv2d {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out_c, in_per_group, kh, kw) = (self.shape[0], self.shape[1], self.shape[2], self.shape[3]);
        if self.groups > 1
            && self.groups == out_c
            && in_per_group == 1
            && kh == 3
            && kw == 3
            && self.stride == 1
            && self.padding == 1
        {
            return self.depthwise3x3(x, false);
        }
        if self.is_pointwise() && matches!(self.weight, Weight::PackedI8(_)) {
            // The int8 GEMM wants channels last: [B, C, H, W] -> [B*H*W, C] and back.
            let (b, c, h, wd) = x.dims4()?;
            let tokens = x.permute((0, 2, 3, 1))?.reshape((b * h * wd, c))?;
            let y = self.forward_channels_last(&tokens)?;
            return Ok(y.reshape((b, h, wd, out_c))?.permute((0, 3, 1, 2))?);
        }
        let w = self.weight.to_f32(&self.shape)?;
        let y = if self.is_pointwise() {
            // A 1x1 convolution is a GEMM over channels.
            let (b, c, h, wd) = x.dims4()?;
            let w2 = w.reshape((out_c, c))?;
            let x2 = x.reshape((b, c, h * wd))?;
            w2.broadcast_matmul(&x2)?.reshape((b, out_c, h, wd))?
        } else {
            x.conv2d(&w, self.padding, self.stride, 1, self.groups)?
        };
        match &self.bias {
            Some(bias) => Ok(y.broadcast_add(&bias.reshape((1, out_c, 1, 1))?)?),
            None => Ok(y),
        }
    }

    /// True for a 1x1 convolution with stride 1, no padding and no groups: a GEMM over channels.
    pub fn is_pointwise(&self) -> bool {
        self.shape[2] == 1 && self.shape[3] == 1 && self.stride == 1 && self.padding == 0 && self.groups == 1
    }

    /// A 1x1 convolution applied to channels-last pixels `[rows, C_in]`, giving `[rows, C_out]` (bias added); int8-dyn
    /// weights go through the W8A8 GEMM.
    pub fn forward_channels_last(&self, x: &Tensor) -> Result<Tensor> {
        if !self.is_pointwise() {
            return Err(Error::Model(format!(
                "{}: forward_channels_last needs a 1x1 convolution, the weight is {:?}",
                self.name, self.shape
            )));
        }
        let (rows, c) = x.dims2()?;
        let out_c = self.shape[0];
        if let Weight::PackedI8(p) = &self.weight {
            let out = gemm_i8_rows(x, rows, c, p, self.bias.as_ref())?;
            return Ok(Tensor::from_vec(out, (rows, out_c), &Device::Cpu)?);
        }
        let out = float_linear(x, rows, c, &self.weight, out_c, self.bias.as_ref(), None)?;
        Ok(Tensor::from_vec(out, (rows, out_c), &Device::Cpu)?)
    }

    /// A dense convolution (groups = 1) on channels-last tokens `[B, H*W, C_in]`, giving tokens `[B, H'*W', C_out]`
    /// and `(H', W')`: im2col + GEMM per block of output pixels, no NCHW transposes (SegFormer's patch embeddings and
    /// spatial reductions).
    pub fn forward_tokens(&self, x: &Tensor, height: usize, width: usize) -> Result<(Tensor, usize, usize)> {
        let (b, n, c) = x.dims3()?;
        let (out_c, in_c, k) = (self.shape[0], self.shape[1], self.shape[2]);
        if self.groups != 1 || c != in_c || n != height * width || self.shape[3] != k {
            return Err(Error::Model(format!(
                "{}: forward_tokens needs a dense square convolution over {c} channels and {height}x{width} tokens; \
                 the weight is {:?} with {} groups, the input {:?}",
                self.name,
                self.shape,
                self.groups,
                x.dims()
            )));
        }
        let shape = kernels::ConvShape {
            height,
            width,
            in_channels: c,
            out_channels: out_c,
            kernel: k,
            stride: self.stride,
            padding: self.padding,
        };
        let (out_h, out_w) = shape.out_size();
        let bias = self.bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
        let to_tokens = |images: Vec<Vec<f32>>| -> Result<(Tensor, usize, usize)> {
            let out = if images.len() == 1 {
                images.into_iter().next().unwrap_or_default()
            } else {
                images.concat()
            };
            Ok((
                Tensor::from_vec(out, (b, out_h * out_w, out_c), &Device::Cpu)?,
                out_h,
                out_w,
            ))
        };
        if let Weight::PackedI8(p) = &self.weight
            && p.conv_patch == Some((k, c))
        {
            // int8-dyn: patches quantized per row at run time, W8A8 GEMM.
            let images = with_f32(x, |xs| {
                xs.chunks_exact(n * c)
                    .map(|image| kernels::conv2d_nhwc_i8(image, shape, &p.packed, bias.as_deref()))
                    .collect::<Result<Vec<_>>>()
            })?;
            return to_tokens(images);
        }
        // PyTorch's [C_out, C_in, K, K] -> [C_out, K, K, C_in], so that a patch row is contiguous in the tokens.
        let weight = self.weight.with_values(|w| {
            let patch = c * k * k;
            let mut permuted = vec![0f32; w.len()];
            for (row, dst) in w.chunks_exact(patch).zip(permuted.chunks_exact_mut(patch)) {
                for (col, &v) in row.iter().enumerate() {
                    dst[patch_column(col, k, c)] = v;
                }
            }
            Ok(permuted)
        })?;
        let images = with_f32(x, |xs| {
            xs.chunks_exact(n * c)
                .map(|image| kernels::conv2d_nhwc(image, shape, &weight, bias.as_deref()))
                .collect::<Result<Vec<_>>>()
        })?;
        to_tokens(images)
    }

    /// Depthwise 3x3 (stride 1, padding 1) on NCHW maps through the direct kernel, optionally fused with exact GELU.
    pub fn depthwise3x3(&self, x: &Tensor, fuse_gelu: bool) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let out = self.depthwise_planes(x, b, c * h * w, |input, weight, bias, out| {
            kernels::dwconv3x3(input, c, h, w, weight, bias, fuse_gelu, out)
        })?;
        Ok(Tensor::from_vec(out, (b, c, h, w), &Device::Cpu)?)
    }

    /// Depthwise 3x3 on channels-last tokens [B, H*W, C] (Mix-FFN's layout), so no transpose is materialised;
    /// the result has the same layout. Optionally fused with exact GELU.
    pub fn depthwise3x3_tokens(&self, x: &Tensor, height: usize, width: usize, fuse_gelu: bool) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let out = self.depthwise_planes(x, b, n * c, |input, weight, bias, out| {
            kernels::dwconv3x3_nhwc(input, c, height, width, weight, bias, fuse_gelu, out)
        })?;
        Ok(Tensor::from_vec(out, (b, n, c), &Device::Cpu)?)
    }

    fn depthwise_planes(
        &self,
        x: &Tensor,
        batch: usize,
        plane: usize,
        kernel: impl Fn(&[f32], &[f32], &[f32], &mut [f32]) -> Result<()>,
    ) -> Result<Vec<f32>> {
        let (weight, _, _) = self.weight.as_rows(&self.shape)?;
        let bias = match &self.bias {
            Some(t) => t.to_vec1::<f32>()?,
            None => vec![0.0; self.shape[0]],
        };
        let mut out = vec![0f32; x.elem_count()];
        with_f32(x, |input| {
            for i in 0..batch {
                kernel(
                    &input[i * plane..(i + 1) * plane],
                    &weight,
                    &bias,
                    &mut out[i * plane..(i + 1) * plane],
                )?;
            }
            Ok(())
        })?;
        Ok(out)
    }

    pub fn info(&self) -> LayerInfo {
        layer_info(&self.name, "Conv2d", &self.shape, &self.weight, self.bias.as_ref())
    }
}

fn layer_info(name: &str, kind: &'static str, shape: &[usize], weight: &Weight, bias: Option<&Tensor>) -> LayerInfo {
    LayerInfo {
        name: name.to_string(),
        kind,
        shape: shape.to_vec(),
        parameters: shape.iter().product::<usize>() + bias.map_or(0, |b| b.elem_count()),
        format: weight.format_name(),
        bits_per_weight: weight.bits_per_weight(),
        weight_bytes: weight.bytes(),
        bias_bytes: bias.map_or(0, |b| b.elem_count() * DType::F32.size_in_bytes()),
    }
}

/// `nn.LayerNorm` over the last dimension (eps 1e-5, as transformers' SegFormer uses).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// Through [`kernels::layer_norm`] (two-pass statistics, AVX2, parallel over rows).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let cols = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / cols.max(1);
        let mut out = vec![0f32; x.elem_count()];
        with_f32(x, |xs| {
            with_f32(&self.weight, |g| {
                with_f32(&self.bias, |b| {
                    kernels::layer_norm(xs, rows, cols, g, b, self.eps as f32, &mut out)
                })
            })
        })?;
        Ok(Tensor::from_vec(out, dims, &Device::Cpu)?)
    }
}

/// `nn.BatchNorm2d` in eval mode, folded into a per-channel scale and shift at load time.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    pub scale: Tensor,
    pub shift: Tensor,
    /// The checkpoint's tensors (weight, bias, running_mean, running_var), kept to save the model again.
    pub stored: [Tensor; 4],
}

impl BatchNorm2d {
    pub fn new(weight: &Tensor, bias: &Tensor, mean: &Tensor, var: &Tensor, eps: f64) -> Result<Self> {
        // y = (x - mean) / sqrt(var + eps) * weight + bias, computed as PyTorch does in eval mode.
        let inv_std = (var + eps)?.sqrt()?.recip()?;
        let scale = (weight * &inv_std)?;
        let shift = (bias - (mean * &scale)?)?;
        Ok(Self {
            scale,
            shift,
            stored: [weight.clone(), bias.clone(), mean.clone(), var.clone()],
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.scale.elem_count();
        let y = x.broadcast_mul(&self.scale.reshape((1, c, 1, 1))?)?;
        Ok(y.broadcast_add(&self.shift.reshape((1, c, 1, 1))?)?)
    }
}
