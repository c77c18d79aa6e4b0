//! The one layer type every SegFormer Linear and Conv2d uses: a weight held in float or in a quantized format,
//! plus its float bias. Forward passes go through here, so a quantized model never keeps a float copy.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::Result;
use crate::kernels;
use crate::quant::QuantTensor;

/// A layer's weight: float32, or a packed quantized tensor dequantized per call into a short-lived buffer (so a
/// quantized model holds no float copy of its weights).
#[derive(Debug, Clone)]
pub enum Weight {
    Float(Tensor),
    Quantized(Arc<QuantTensor>),
}

impl Weight {
    /// Bytes the weight occupies in memory, as stored (packed codes, scales and zero points).
    pub fn bytes(&self) -> usize {
        match self {
            Weight::Float(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quantized(q) => q.weight_bytes(),
        }
    }

    /// Format name for inspection ("f32", "int4-g64", ...).
    pub fn format_name(&self) -> String {
        match self {
            Weight::Float(_) => "f32".into(),
            Weight::Quantized(q) => q.format_name(),
        }
    }

    pub fn bits_per_weight(&self) -> f64 {
        match self {
            Weight::Float(_) => 32.0,
            Weight::Quantized(q) => q.bits_per_weight(),
        }
    }

    /// The weight as float32 in `shape` (for float weights, no copy; quantized ones are dequantized).
    pub fn to_f32(&self, shape: &[usize]) -> Result<Tensor> {
        match self {
            Weight::Float(t) => Ok(t.clone()),
            Weight::Quantized(q) => Ok(Tensor::from_vec(q.dequantize(), shape, &Device::Cpu)?),
        }
    }

    /// The weight as float32 flattened to [out, in]: the layout quantization works on.
    pub fn as_rows(&self, shape: &[usize]) -> Result<(Vec<f32>, usize, usize)> {
        let rows = shape[0];
        let cols = shape.iter().product::<usize>() / rows.max(1);
        match self {
            Weight::Float(t) => Ok((t.flatten_all()?.to_vec1::<f32>()?, rows, cols)),
            Weight::Quantized(q) => Ok((q.dequantize(), rows, cols)),
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
        let x2 = x.reshape((rows, in_features))?;
        let w = self.weight.to_f32(&self.shape)?;
        let mut y = x2.matmul(&w.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.shape[0];
        Ok(y.reshape(out_dims)?)
    }

    pub fn info(&self) -> LayerInfo {
        layer_info(&self.name, "Linear", &self.shape, &self.weight, self.bias.as_ref())
    }
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
        let w = self.weight.to_f32(&self.shape)?;
        let y = if kh == 1 && kw == 1 && self.stride == 1 && self.padding == 0 && self.groups == 1 {
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
        let input = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; input.len()];
        for i in 0..batch {
            kernel(
                &input[i * plane..(i + 1) * plane],
                &weight,
                &bias,
                &mut out[i * plane..(i + 1) * plane],
            )?;
        }
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
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(candle_nn::ops::layer_norm(
            &x,
            &self.weight,
            &self.bias,
            self.eps as f32,
        )?)
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
