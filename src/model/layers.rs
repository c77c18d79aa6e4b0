//! The leaf modules every SegFormer part is built from: `Linear` and `Conv2d` (a weight that is its own kernel,
//! [`MatMul`], plus a float bias), `LayerNorm` and `BatchNorm2d`; their parameters as loaders and savers see them
//! ([`Param`], [`ParamMut`]); and what `segq inspect` shows per layer ([`LayerInfo`]). Fields are private: a
//! weight changes only through the crate's loading, quantization and `prepare`, which keep the plan in step.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::plan::{Activations, Columns, InputQuant, MatMul, RunValues};
use super::probe::Probe;
use super::tokens::{Tokens, with_f32};
use crate::kernels;
use crate::{Error, Result};

/// One parameter of a leaf, read-only (saving, inspection).
pub enum Param<'a> {
    /// A Linear or Conv2d weight with its PyTorch shape.
    Weight(&'a MatMul, &'a [usize]),
    /// A float vector: bias, norm weight, BatchNorm statistic.
    Vector(&'a [f32]),
    /// A scalar that only some checkpoints hold (a calibrated `input_scale`): saved as a shape-`[]` tensor when set.
    OptionalScalar(Option<&'a f32>),
    /// In checkpoints but not used by the model (BatchNorm's `num_batches_tracked`): dropped when loading, not saved.
    Unused,
}

/// One parameter of a leaf, to fill or replace (loading, quantization). A vector's length is its shape.
pub(crate) enum ParamMut<'a> {
    Weight(&'a mut MatMul, &'a [usize]),
    Vector(&'a mut Vec<f32>),
    OptionalScalar(&'a mut Option<f32>),
    Unused,
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

fn layer_info(name: &str, kind: &'static str, shape: &[usize], weight: &MatMul, bias: Option<&[f32]>) -> LayerInfo {
    LayerInfo {
        name: name.to_string(),
        kind,
        shape: shape.to_vec(),
        parameters: shape.iter().product::<usize>() + bias.map_or(0, <[f32]>::len),
        format: weight.format_name(),
        bits_per_weight: weight.bits_per_weight(),
        weight_bytes: weight.bytes(),
        bias_bytes: bias.map_or(0, |b| b.len() * DType::F32.size_in_bytes()),
    }
}

fn weight_and_bias<'a>(
    weight: &'a MatMul,
    shape: &'a [usize],
    bias: &'a Option<Vec<f32>>,
    input: &'a InputQuant,
) -> Vec<(&'static str, Param<'a>)> {
    let mut out = vec![("weight", Param::Weight(weight, shape))];
    if let Some(b) = bias {
        out.push(("bias", Param::Vector(b)));
    }
    out.push(("input_scale", Param::OptionalScalar(input.scale.as_ref())));
    out
}

fn weight_and_bias_mut<'a>(
    weight: &'a mut MatMul,
    shape: &'a [usize],
    bias: &'a mut Option<Vec<f32>>,
    input: &'a mut InputQuant,
) -> Vec<(&'static str, ParamMut<'a>)> {
    let mut out = vec![("weight", ParamMut::Weight(weight, shape))];
    if let Some(b) = bias {
        out.push(("bias", ParamMut::Vector(b)));
    }
    out.push(("input_scale", ParamMut::OptionalScalar(&mut input.scale)));
    out
}

/// `nn.Linear`: y = x W^T + b, applied over the last dimension.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: MatMul,
    bias: Option<Vec<f32>>,
    /// `[out, in]`.
    shape: [usize; 2],
    /// Records the inputs during calibration (a calibration copy of the model only).
    probe: Option<Arc<Probe>>,
    /// Static quantization of the input (levels `int8-static`, `w8a8-f8`, `w4a8`).
    input: InputQuant,
}

impl Linear {
    /// A Linear with a bias and no values yet.
    pub(crate) fn new(in_features: usize, out_features: usize) -> Linear {
        Linear {
            weight: MatMul::empty(),
            bias: Some(vec![0.0; out_features]),
            shape: [out_features, in_features],
            probe: None,
            input: InputQuant::default(),
        }
    }

    /// Installs the calibration probe that records this layer's inputs.
    pub(crate) fn set_probe(&mut self, probe: Arc<Probe>) {
        self.probe = Some(probe);
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn weight(&self) -> &MatMul {
        &self.weight
    }

    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// The input's calibrated scale and simulated format.
    pub fn input_quant(&self) -> &InputQuant {
        &self.input
    }

    /// Sets the calibrated per-tensor scale of the input (takes effect at the next `prepare`).
    pub(crate) fn set_input_scale(&mut self, scale: Option<f32>) {
        self.input.scale = scale;
    }

    /// Sets the kernel for `activations` (int8 activations: the W8A8 GEMM for a symmetric per-channel int8 weight,
    /// with the calibrated input scale at `int8-static`; simulated levels fake-quantize the input).
    pub(crate) fn plan(&mut self, activations: Activations) {
        let int8 = activations
            .int8_gemm(self.input.scale)
            .map(|scale| (Columns::Rows, scale));
        self.weight = std::mem::replace(&mut self.weight, MatMul::empty()).planned(int8);
        self.input.plan(activations, &self.weight);
    }

    /// Over the tokens' channels.
    pub fn forward(&self, x: &Tokens) -> Result<Tokens> {
        self.forward_with(x, None)
    }

    /// `forward(x) + residual` with the bias and residual added in one pass over the output (SegFormer's
    /// `attention.output.dense` and `mlp.dense2` outputs feed a residual add).
    pub fn forward_residual(&self, x: &Tokens, residual: &Tokens) -> Result<Tokens> {
        self.forward_with(x, Some(residual))
    }

    fn forward_with(&self, x: &Tokens, residual: Option<&Tokens>) -> Result<Tokens> {
        let [out_features, in_features] = self.shape;
        let residual_fits = |r: &Tokens| {
            (r.batch(), r.height(), r.width(), r.channels()) == (x.batch(), x.height(), x.width(), out_features)
        };
        if x.channels() != in_features || residual.is_some_and(|r| !residual_fits(r)) {
            return Err(Error::internal(format!(
                "Linear {:?}: input of {} channels, residual {:?}",
                self.shape,
                x.channels(),
                residual.map(|r| (r.batch(), r.height(), r.width(), r.channels()))
            )));
        }
        if let Some(probe) = &self.probe {
            probe.observe_rows(x.data(), in_features)?;
        }
        let out = self.weight.apply(
            &self.input.apply(x.data()),
            x.rows(),
            in_features,
            out_features,
            self.bias(),
            residual.map(Tokens::data),
        )?;
        x.with_channels(out, out_features)
    }

    /// The packed weight when this layer quantizes its input per row at run time (`int8-dyn`, no calibration
    /// probe): then a producer may hand it the input already quantized ([`Linear::forward_quantized_residual`]).
    pub fn dynamic_int8_panels(&self) -> Option<&kernels::I8Panels> {
        match (&self.probe, self.input.simulated()) {
            (None, None) => self.weight.dynamic_int8_panels(),
            _ => None,
        }
    }

    /// `forward(x) + residual` for an input its producer quantized per row (Mix-FFN's conv + GELU for `dense2`);
    /// the same floats as [`Linear::forward_residual`] on the float input those codes came from. Errors unless
    /// [`Linear::dynamic_int8_panels`] is set.
    pub fn forward_quantized_residual(&self, x: &kernels::QuantizedRows, residual: &Tokens) -> Result<Tokens> {
        let [out_features, in_features] = self.shape;
        let panels = self.dynamic_int8_panels().ok_or_else(|| {
            Error::internal(format!(
                "Linear {:?}: pre-quantized input without a dynamic int8 weight",
                self.shape
            ))
        })?;
        if x.k() != in_features || residual.rows() != x.rows() || residual.channels() != out_features {
            return Err(Error::internal(format!(
                "Linear {:?}: pre-quantized input of {} rows x {} features, residual {} x {}",
                self.shape,
                x.rows(),
                x.k(),
                residual.rows(),
                residual.channels()
            )));
        }
        let out = kernels::gemm_i8_quantized(x, panels, self.bias(), Some(residual.data()))?;
        residual.with_channels(out, out_features)
    }

    pub fn info(&self, name: &str) -> LayerInfo {
        layer_info(name, "Linear", &self.shape, &self.weight, self.bias())
    }

    pub fn params(&self) -> Vec<(&'static str, Param<'_>)> {
        weight_and_bias(&self.weight, &self.shape, &self.bias, &self.input)
    }

    pub(crate) fn params_mut(&mut self) -> Vec<(&'static str, ParamMut<'_>)> {
        weight_and_bias_mut(&mut self.weight, &self.shape, &mut self.bias, &mut self.input)
    }
}

/// `nn.Conv2d` with a square kernel: dense convolutions run on channels-last tokens (patch embeddings, spatial
/// reductions), the depthwise 3x3 of Mix-FFN on tokens too, 1x1 convolutions as GEMMs over channels.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: MatMul,
    bias: Option<Vec<f32>>,
    /// `[out, in/groups, kh, kw]`.
    shape: [usize; 4],
    stride: usize,
    padding: usize,
    groups: usize,
    /// Records the inputs during calibration (a calibration copy of the model only).
    probe: Option<Arc<Probe>>,
    /// Static quantization of the input (levels `int8-static`, `w8a8-f8`, `w4a8`; dense convolutions only).
    input: InputQuant,
}

impl Conv2d {
    /// A convolution with no values yet.
    pub(crate) fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        groups: usize,
        with_bias: bool,
    ) -> Conv2d {
        Conv2d {
            weight: MatMul::empty(),
            bias: with_bias.then(|| vec![0.0; out_channels]),
            shape: [out_channels, in_channels / groups, kernel, kernel],
            stride,
            padding,
            groups,
            probe: None,
            input: InputQuant::default(),
        }
    }

    /// Installs the calibration probe that records this layer's inputs; `false` (nothing installed) for a
    /// convolution whose input is not one matrix (depthwise, grouped).
    pub(crate) fn set_probe(&mut self, probe: Arc<Probe>) -> bool {
        let dense = self.is_dense();
        if dense {
            self.probe = Some(probe);
        }
        dense
    }

    /// Columns of the matrix the weight multiplies (`in * kh * kw`).
    pub fn input_columns(&self) -> usize {
        self.shape[1] * self.shape[2] * self.shape[3]
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn weight(&self) -> &MatMul {
        &self.weight
    }

    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// True for a 1x1 convolution with stride 1, no padding and no groups: a GEMM over channels.
    pub fn is_pointwise(&self) -> bool {
        self.shape[2] == 1 && self.shape[3] == 1 && self.stride == 1 && self.padding == 0 && self.groups == 1
    }

    /// True for a convolution the im2col GEMM runs (groups = 1, square kernel): the convolutions whose input a
    /// static level quantizes (depthwise ones keep float inputs).
    pub fn is_dense(&self) -> bool {
        self.groups == 1 && self.shape[2] == self.shape[3]
    }

    /// Sets the kernel for `activations`: with int8 activations a dense convolution's symmetric per-channel int8
    /// weight is packed in patch order for the int8 im2col GEMM; depthwise convolutions keep the dequantize path.
    pub(crate) fn plan(&mut self, activations: Activations) {
        let columns = Columns::Patch {
            kernel: self.shape[2],
            in_channels: self.shape[1],
        };
        let int8 = match self.is_dense() {
            true => activations.int8_gemm(self.input.scale).map(|scale| (columns, scale)),
            false => None,
        };
        self.weight = std::mem::replace(&mut self.weight, MatMul::empty()).planned(int8);
        if self.is_dense() {
            self.input.plan(activations, &self.weight);
        } else {
            self.input.plan(Activations::F32, &self.weight);
        }
    }

    /// The input's calibrated scale and simulated format.
    pub fn input_quant(&self) -> &InputQuant {
        &self.input
    }

    /// Sets the calibrated per-tensor scale of the input (takes effect at the next `prepare`).
    pub(crate) fn set_input_scale(&mut self, scale: Option<f32>) {
        self.input.scale = scale;
    }

    /// `x` as the product reads it (fake-quantized at a simulated level), for the composed decode head.
    pub(crate) fn quantize_input<'a>(&self, x: &'a [f32]) -> Cow<'a, [f32]> {
        self.input.apply(x)
    }

    /// NCHW in and out, as transformers runs it (the decode head's reference forward): 1x1 convolutions with int8
    /// weights through the W8A8 GEMM on channels-last pixels, every other through candle.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out_c = self.shape[0];
        if let Some(probe) = &self.probe {
            if !self.is_pointwise() {
                return Err(Error::internal(format!(
                    "Conv2d {:?}: calibration records NCHW inputs of 1x1 convolutions only",
                    self.shape
                )));
            }
            probe.observe_nchw(x)?;
        }
        if self.is_pointwise() && matches!(self.weight, MatMul::W8A8(_)) {
            let (b, c, h, wd) = x.dims4()?;
            let tokens = x.permute((0, 2, 3, 1))?.reshape((b * h * wd, c))?;
            let out = with_f32(&tokens, |xs| {
                self.weight
                    .apply(&self.input.apply(xs), b * h * wd, c, out_c, self.bias(), None)
            })?;
            let y = Tensor::from_vec(out, (b, h, wd, out_c), &Device::Cpu)?;
            return Ok(y.permute((0, 3, 1, 2))?);
        }
        let w = Tensor::from_slice(&self.weight.values(), self.shape.as_slice(), &Device::Cpu)?;
        let y = if self.is_pointwise() {
            let (b, c, h, wd) = x.dims4()?;
            let w2 = w.reshape((out_c, c))?;
            let x2 = x.reshape((b, c, h * wd))?;
            w2.broadcast_matmul(&x2)?.reshape((b, out_c, h, wd))?
        } else {
            x.conv2d(&w, self.padding, self.stride, 1, self.groups)?
        };
        match self.bias() {
            Some(bias) => Ok(y.broadcast_add(&Tensor::from_slice(bias, (1, out_c, 1, 1), &Device::Cpu)?)?),
            None => Ok(y),
        }
    }

    /// A dense convolution on channels-last tokens, giving tokens of the output map: im2col + GEMM per block of
    /// output pixels, no NCHW transposes (SegFormer's patch embeddings and spatial reductions).
    pub fn forward_tokens(&self, x: &Tokens) -> Result<Tokens> {
        let (out_c, in_c, k) = (self.shape[0], self.shape[1], self.shape[2]);
        if !self.is_dense() || x.channels() != in_c {
            return Err(Error::internal(format!(
                "Conv2d: forward_tokens needs a dense square convolution over {} channels; the weight is {:?} with \
                 {} groups",
                x.channels(),
                self.shape,
                self.groups
            )));
        }
        let shape = kernels::ConvShape {
            height: x.height(),
            width: x.width(),
            in_channels: in_c,
            out_channels: out_c,
            kernel: k,
            stride: self.stride,
            padding: self.padding,
        };
        if let Some(probe) = &self.probe {
            probe.observe_patches(x, shape)?;
        }
        let (out_h, out_w) = shape.out_size();
        let out = self
            .weight
            .conv_tokens(&self.input.apply(x.data()), x.batch(), shape, self.bias())?;
        Tokens::new(out, x.batch(), out_h, out_w, out_c)
    }

    /// The depthwise kernels' float weight `[C, 9]` for this call (weight-only levels dequantized into a reused
    /// buffer) and bias (zeros when the layer has none).
    fn depthwise_params(&self) -> (RunValues<'_>, Cow<'_, [f32]>) {
        let bias = match self.bias() {
            Some(b) => Cow::Borrowed(b),
            None => Cow::Owned(vec![0.0; self.shape[0]]),
        };
        (self.weight.run_values(), bias)
    }

    /// Depthwise 3x3 (stride 1, padding 1) on channels-last tokens (Mix-FFN's layout), so no transpose is
    /// materialised; the result has the same layout. Optionally fused with exact GELU.
    pub fn depthwise3x3_tokens(&self, x: &Tokens, fuse_gelu: bool) -> Result<Tokens> {
        let c = x.channels();
        let plane = x.height() * x.width() * c;
        let (weight, bias) = self.depthwise_params();
        let mut out = vec![0f32; x.data().len()];
        for (input, dst) in x.data().chunks_exact(plane).zip(out.chunks_exact_mut(plane)) {
            kernels::dwconv3x3_nhwc(input, c, x.height(), x.width(), &weight, &bias, fuse_gelu, dst)?;
        }
        x.with_channels(out, c)
    }

    /// Depthwise 3x3 + exact GELU on channels-last tokens, quantized per token for a `dense2` that quantizes its
    /// input at run time ([`kernels::dwconv3x3_gelu_nhwc_i8`]): the codes [`Conv2d::depthwise3x3_tokens`] followed
    /// by the GEMM's quantizer would give, without the float map.
    pub fn depthwise3x3_gelu_tokens_i8(&self, x: &Tokens) -> Result<kernels::QuantizedRows> {
        let (weight, bias) = self.depthwise_params();
        let (b, h, w, c) = (x.batch(), x.height(), x.width(), x.channels());
        kernels::dwconv3x3_gelu_nhwc_i8(x.data(), b, c, h, w, &weight, &bias)
    }

    pub fn info(&self, name: &str) -> LayerInfo {
        layer_info(name, "Conv2d", &self.shape, &self.weight, self.bias())
    }

    pub fn params(&self) -> Vec<(&'static str, Param<'_>)> {
        weight_and_bias(&self.weight, &self.shape, &self.bias, &self.input)
    }

    pub(crate) fn params_mut(&mut self) -> Vec<(&'static str, ParamMut<'_>)> {
        weight_and_bias_mut(&mut self.weight, &self.shape, &mut self.bias, &mut self.input)
    }
}

/// `nn.LayerNorm` over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f64,
}

impl LayerNorm {
    /// A LayerNorm over `dim` features with no values yet.
    pub(crate) fn new(dim: usize, eps: f64) -> LayerNorm {
        LayerNorm {
            weight: vec![0.0; dim],
            bias: vec![0.0; dim],
            eps,
        }
    }

    /// Over the tokens' channels, through [`kernels::layer_norm`] (two-pass statistics, AVX2, parallel over rows).
    pub fn forward(&self, x: &Tokens) -> Result<Tokens> {
        let out = kernels::layer_norm_vec(
            x.data(),
            x.rows(),
            x.channels(),
            &self.weight,
            &self.bias,
            self.eps as f32,
        )?;
        x.with_channels(out, x.channels())
    }

    pub fn params(&self) -> Vec<(&'static str, Param<'_>)> {
        vec![
            ("weight", Param::Vector(&self.weight)),
            ("bias", Param::Vector(&self.bias)),
        ]
    }

    pub(crate) fn params_mut(&mut self) -> Vec<(&'static str, ParamMut<'_>)> {
        vec![
            ("weight", ParamMut::Vector(&mut self.weight)),
            ("bias", ParamMut::Vector(&mut self.bias)),
        ]
    }
}

/// `nn.BatchNorm2d` in eval mode: the checkpoint's statistics, folded into a per-channel scale and shift when used.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Vec<f32>,
    bias: Vec<f32>,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    eps: f64,
}

impl BatchNorm2d {
    /// A BatchNorm over `channels` with no values yet.
    pub(crate) fn new(channels: usize, eps: f64) -> BatchNorm2d {
        BatchNorm2d {
            weight: vec![0.0; channels],
            bias: vec![0.0; channels],
            running_mean: vec![0.0; channels],
            running_var: vec![0.0; channels],
            eps,
        }
    }

    /// `(scale, shift)` as `[C]` tensors: y = (x - mean) / sqrt(var + eps) * weight + bias, computed as PyTorch does
    /// in eval mode.
    pub fn fold(&self) -> Result<(Tensor, Tensor)> {
        let t = |v: &[f32]| Tensor::from_slice(v, v.len(), &Device::Cpu);
        let (weight, bias, mean, var) = (
            t(&self.weight)?,
            t(&self.bias)?,
            t(&self.running_mean)?,
            t(&self.running_var)?,
        );
        let inv_std = (var + self.eps)?.sqrt()?.recip()?;
        let scale = (weight * &inv_std)?;
        let shift = (bias - (mean * &scale)?)?;
        Ok((scale, shift))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (scale, shift) = self.fold()?;
        let c = scale.elem_count();
        let y = x.broadcast_mul(&scale.reshape((1, c, 1, 1))?)?;
        Ok(y.broadcast_add(&shift.reshape((1, c, 1, 1))?)?)
    }

    pub fn params(&self) -> Vec<(&'static str, Param<'_>)> {
        vec![
            ("weight", Param::Vector(&self.weight)),
            ("bias", Param::Vector(&self.bias)),
            ("running_mean", Param::Vector(&self.running_mean)),
            ("running_var", Param::Vector(&self.running_var)),
            ("num_batches_tracked", Param::Unused),
        ]
    }

    pub(crate) fn params_mut(&mut self) -> Vec<(&'static str, ParamMut<'_>)> {
        vec![
            ("weight", ParamMut::Vector(&mut self.weight)),
            ("bias", ParamMut::Vector(&mut self.bias)),
            ("running_mean", ParamMut::Vector(&mut self.running_mean)),
            ("running_var", ParamMut::Vector(&mut self.running_var)),
            ("num_batches_tracked", ParamMut::Unused),
        ]
    }
}
