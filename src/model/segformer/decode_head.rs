//! SegFormer's decode head (`SegformerDecodeHead` in transformers) and the composed form segq runs
//! ([`ComposedHead`]): the per-stage MLPs, `linear_fuse` and the BatchNorm multiplied into one matrix per stage,
//! applied at each stage's own resolution. The composition is derived from the weights, so the head keeps it private
//! and rebuilds it whenever the model is prepared.

use candle_core::Tensor;
use rayon::prelude::*;

use super::super::config::{NORM_EPS, SegformerConfig};
use super::super::layers::{BatchNorm2d, Conv2d, Linear};
use super::super::plan::{Activations, InputQuant};
use super::super::tokens::Tokens;
use super::super::tree::node;
use crate::kernels::{self, I8Panels};
use crate::{Error, Result};

/// The layer the composed head folds into its per-stage products: its input is never computed, so no level
/// quantizes it and calibration has no statistics for it.
pub(crate) const FOLDED_LAYER: &str = "decode_head.linear_fuse";

/// `SegformerMLP`: one stage's projection to the decoder size.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub(super) proj: Linear,
}

node!(Mlp, |s, p| { "proj" => proj });

/// `SegformerDecodeHead`: per-stage MLPs to the decoder size, bilinear upsampling to the 1/4 map, concatenation in
/// reverse stage order, `linear_fuse` (1x1 conv, no bias), BatchNorm, ReLU, `classifier` (1x1 conv with bias).
///
/// `forward` computes the same function without materialising the four upsampled, concatenated maps (see
/// [`ComposedHead`]); `forward_reference` is the module as transformers writes it.
#[derive(Debug, Clone)]
pub struct DecodeHead {
    pub(super) linear_c: Vec<Mlp>,
    pub(super) linear_fuse: Conv2d,
    pub(super) batch_norm: BatchNorm2d,
    pub(super) classifier: Conv2d,
    /// Built by [`DecodeHead::compose`] (from `Segformer::prepare`); `None` until then, and `forward` falls back to
    /// `forward_reference`.
    composed: Option<ComposedHead>,
}

node!(DecodeHead, |s, p| {
    "linear_c" => linear_c,
    "linear_fuse" => linear_fuse,
    "batch_norm" => batch_norm,
    "classifier" => classifier,
});

/// The linear part of the decode head rewritten per stage (an exact reformulation). A 1x1 convolution commutes with
/// bilinear upsampling (both are linear, one over channels, the other over pixels, and bilinear weights sum to 1 so
/// a bias passes through), so for stage `i` with input `X_i`:
/// `BN(fuse(cat_j up(linear_c[j](X_j)))) = s * sum_i F_i (W_i up(X_i) + b_i) + t = sum_i up((s F_i W_i) X_i) + bias`
/// where `F_i` is the slice of `linear_fuse`'s input channels that stage `i` feeds (transformers concatenates in
/// reverse stage order, so stage `i` is slice `n-1-i`), `s, t` the folded BatchNorm and
/// `bias = s * sum_i F_i b_i + t`. The products are applied at each stage's own resolution (far fewer pixels),
/// then the decoder-size maps are upsampled and summed in one pass. For quantized levels the matrices are products
/// of the dequantized weights (D x sum(C_i) values, smaller than `linear_c` plus `linear_fuse`).
#[derive(Debug, Clone)]
pub struct ComposedHead {
    products: StageProducts,
    /// Per stage, the static quantization of its input: `linear_c.i.proj`'s, whose input the product multiplies.
    inputs: Vec<InputQuant>,
    /// `[D]`.
    bias: Vec<f32>,
}

/// The composed per-stage matrices in the form the plan runs them.
#[derive(Debug, Clone)]
enum StageProducts {
    /// Per stage, `(s F_i W_i)^T` as row-major `[C_i, D]` in f32, so tokens `[pixels, C_i]` multiply it directly.
    F32(Vec<Vec<f32>>),
    /// Levels `int8-dyn` and `int8-static`: the same matrices quantized per output channel (symmetric int8) for the
    /// W8A8 GEMM, so the head's products run in int8 like the rest of the level; per stage, the static input scale
    /// (`linear_c.i.proj`'s) or `None` for per-row scales at run time.
    Int8(Vec<(I8Panels, Option<f32>)>),
}

impl DecodeHead {
    /// The head of `config` with every parameter zero.
    pub(super) fn new(config: &SegformerConfig) -> DecodeHead {
        let (n, d) = (config.num_encoder_blocks, config.decoder_hidden_size);
        DecodeHead {
            linear_c: (0..n)
                .map(|i| Mlp {
                    proj: Linear::new(config.hidden_sizes[i], d),
                })
                .collect(),
            linear_fuse: Conv2d::new(d * n, d, 1, 1, 0, 1, false),
            batch_norm: BatchNorm2d::new(d, NORM_EPS),
            classifier: Conv2d::new(d, config.num_labels(), 1, 1, 0, 1, true),
            composed: None,
        }
    }

    /// Composes the per-stage matrices from the current (dequantized) weights, in the form `activations` runs.
    pub(super) fn compose(&mut self, activations: Activations) -> Result<()> {
        let n = self.linear_c.len();
        let (d, fuse_in) = (self.linear_fuse.shape()[0], self.linear_fuse.shape()[1]);
        if fuse_in != d * n || self.linear_c.iter().any(|l| l.proj.shape()[0] != d) {
            return Err(Error::invalid(
                "decode_head.linear_fuse",
                format!("input channels {fuse_in} are not {n} stages x decoder size {d}"),
            ));
        }
        let cpu = &candle_core::Device::Cpu;
        let fuse = Tensor::from_slice(&self.linear_fuse.weight().values(), (d, fuse_in), cpu)?;
        let (scale, shift) = self.batch_norm.fold()?;
        let scale = scale.reshape((d, 1))?;
        let mut bias = shift;
        let mut weights = Vec::with_capacity(n);
        for (i, mlp) in self.linear_c.iter().enumerate() {
            let slice = n - 1 - i;
            let f_i = fuse.narrow(1, slice * d, d)?.broadcast_mul(&scale)?;
            let w_i = Tensor::from_slice(&mlp.proj.weight().values(), mlp.proj.shape(), cpu)?;
            weights.push(f_i.matmul(&w_i)?.t()?.contiguous()?);
            if let Some(b) = mlp.proj.bias() {
                let b = Tensor::from_slice(b, (d, 1), cpu)?;
                bias = (bias + f_i.matmul(&b)?.flatten_all()?)?;
            }
        }
        let inputs: Vec<InputQuant> = self.linear_c.iter().map(|l| l.proj.input_quant().clone()).collect();
        let products = match activations {
            Activations::F32 | Activations::Simulated(_) => StageProducts::F32(
                weights
                    .iter()
                    .map(|w| Ok(w.flatten_all()?.to_vec1::<f32>()?))
                    .collect::<Result<Vec<_>>>()?,
            ),
            // Every stage matrix quantized per output channel and packed for the W8A8 GEMM; at int8-static a stage's
            // input is quantized with the scale calibrated on that same input, `linear_c.i.proj`'s (`prepare` made
            // sure it has one when its weight is quantized; a float one keeps per-row scales).
            Activations::Int8Dynamic | Activations::Int8Static => StageProducts::Int8(
                weights
                    .iter()
                    .zip(&inputs)
                    .map(|(w, input)| {
                        let (c, d) = w.dims2()?;
                        let rows = w.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?; // [D, C_i]
                        let (codes, scales) = kernels::quantize_rows_i8(&rows, d, c)?;
                        let scale = match activations {
                            Activations::Int8Static => input.scale(),
                            _ => None,
                        };
                        Ok((I8Panels::pack(&codes, &scales, d, c)?, scale))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
        };
        self.composed = Some(ComposedHead {
            products,
            inputs,
            bias: bias.to_vec1::<f32>()?,
        });
        Ok(())
    }

    /// Drops the composed form: `forward` then runs the head as transformers writes it (calibration, whose probes
    /// must see `linear_fuse`'s and `classifier`'s real inputs).
    pub(super) fn decompose(&mut self) {
        self.composed = None;
    }

    /// From NCHW stage maps, as transformers' module takes them.
    pub fn forward(&self, features: &[Tensor]) -> Result<Tensor> {
        match &self.composed {
            Some(c) => {
                let maps = features.iter().map(Tokens::from_nchw).collect::<Result<Vec<_>>>()?;
                logits_tensor(self.forward_composed(c, &maps)?)
            }
            None => self.forward_reference(features),
        }
    }

    /// From the encoder's stage outputs (no NCHW round trip when the head is composed).
    pub fn forward_maps(&self, maps: &[Tokens]) -> Result<Tensor> {
        match &self.composed {
            Some(c) => logits_tensor(self.forward_composed(c, maps)?),
            None => self.forward_reference(&maps.iter().map(Tokens::to_nchw).collect::<Result<Vec<_>>>()?),
        }
    }

    /// [`DecodeHead::forward_maps`] as a flat NCHW vector and its dims: callers that want the numbers themselves get
    /// the head's own buffer (a candle tensor can only be copied out).
    pub fn forward_maps_flat(&self, maps: &[Tokens]) -> Result<(Vec<f32>, [usize; 4])> {
        match &self.composed {
            Some(c) => self.forward_composed(c, maps),
            None => {
                let logits = self.forward_maps(maps)?;
                let (b, c, h, w) = logits.dims4()?;
                Ok((logits.flatten_all()?.to_vec1::<f32>()?, [b, c, h, w]))
            }
        }
    }

    /// The head through [`ComposedHead`], one band of output rows per task so the decoder-size map never leaves
    /// the cache: stages below the output resolution are multiplied by their composed matrix at their own
    /// resolution first; then each band is their upsampled sum plus the bias, the full-resolution stage's product is
    /// accumulated onto it, ReLU, and the classifier turns it into logits.
    fn forward_composed(&self, composed: &ComposedHead, features: &[Tokens]) -> Result<(Vec<f32>, [usize; 4])> {
        let (batch, h0, w0) = (features[0].batch(), features[0].height(), features[0].width());
        let d = composed.bias.len();
        let (labels, pixels) = (self.classifier.shape()[0], h0 * w0);
        let classifier_bias = self.classifier.bias();
        // A weight-only classifier is dequantized once per call, not once per band.
        let classifier = self.classifier.weight().resolve();
        // About 256 pixels of the decoder-size map per band (256 KiB at D = 256).
        let band_rows = (256 / w0.max(1)).clamp(1, h0.max(1));
        let mut logits = vec![0f32; batch * labels * pixels];
        for b in 0..batch {
            let mut low_maps = Vec::new();
            let mut full_res = Vec::new();
            // Simulated levels: each stage's input fake-quantized as its `linear_c.i.proj` would quantize it.
            let stage_inputs: Vec<std::borrow::Cow<'_, [f32]>> = features
                .iter()
                .zip(&composed.inputs)
                .map(|(stage, input)| input.apply(stage.image(b)))
                .collect();
            for (i, stage) in features.iter().enumerate() {
                let (x, hw, c) = (&stage_inputs[i][..], stage.height() * stage.width(), stage.channels());
                let product = match &composed.products {
                    StageProducts::F32(weights) => StageProduct::F32(&weights[i]),
                    StageProducts::Int8(panels) => StageProduct::Int8(&panels[i].0, panels[i].1),
                };
                if (stage.height(), stage.width()) == (h0, w0) {
                    full_res.push((x, c, product));
                    continue;
                }
                let map = match product {
                    StageProduct::F32(w) => kernels::matmul(x, hw, c, w, d)?,
                    StageProduct::Int8(p, scale) => {
                        let mut out = vec![0f32; hw * d];
                        stage_gemm_i8(x, hw, c, p, scale, &mut out)?;
                        out
                    }
                };
                low_maps.push((map, stage.height(), stage.width()));
            }
            let inputs: Vec<kernels::MapNhwc<'_>> = low_maps
                .iter()
                .map(|(data, height, width)| kernels::MapNhwc {
                    data,
                    height: *height,
                    width: *width,
                })
                .collect();
            let upsampled = kernels::UpsampleSum::new(&inputs, d, h0, w0, &composed.bias)?;
            let bands = (0..h0.div_ceil(band_rows))
                .into_par_iter()
                .map_init(
                    || (Vec::new(), Vec::new()),
                    |(fused, product): &mut (Vec<f32>, Vec<f32>), band| {
                        let y0 = band * band_rows;
                        let rows = band_rows.min(h0 - y0) * w0;
                        fused.resize(rows * d, 0.0);
                        upsampled.rows(y0, fused);
                        for &(tokens, c, stage) in &full_res {
                            let x = &tokens[y0 * w0 * c..(y0 * w0 + rows) * c];
                            match stage {
                                StageProduct::Int8(p, scale) => {
                                    product.resize(rows * d, 0.0);
                                    stage_gemm_i8(x, rows, c, p, scale, product)?;
                                    fused.iter_mut().zip(product.iter()).for_each(|(f, v)| *f += v);
                                }
                                StageProduct::F32(weight) => kernels::matmul_accumulate(x, rows, c, weight, d, fused)?,
                            }
                        }
                        fused.iter_mut().for_each(|v| *v = v.max(0.0));
                        let fused = self.classifier.quantize_input(fused);
                        Ok((
                            y0 * w0,
                            classifier.apply(&fused, rows, d, labels, classifier_bias, None)?,
                        ))
                    },
                )
                .collect::<Result<Vec<_>>>()?;
            // [pixels, labels] bands into the NCHW logits.
            let image = &mut logits[b * labels * pixels..(b + 1) * labels * pixels];
            for (p0, band) in bands {
                for (i, px) in band.chunks_exact(labels).enumerate() {
                    for (l, &v) in px.iter().enumerate() {
                        image[l * pixels + p0 + i] = v;
                    }
                }
            }
        }
        Ok((logits, [batch, labels, h0, w0]))
    }

    /// The head exactly as transformers writes it: materialises the four upsampled maps and their concatenation.
    pub fn forward_reference(&self, features: &[Tensor]) -> Result<Tensor> {
        let (_, _, h0, w0) = features[0].dims4()?;
        let mut upsampled = Vec::with_capacity(features.len());
        for (state, mlp) in features.iter().zip(&self.linear_c) {
            let x = mlp.proj.forward(&Tokens::from_nchw(state)?)?.to_nchw()?;
            let (h, w) = (x.dim(2)?, x.dim(3)?);
            let x = if (h, w) == (h0, w0) {
                x
            } else {
                x.upsample_bilinear2d(h0, w0, false)?
            };
            upsampled.push(x);
        }
        upsampled.reverse();
        let fused = Tensor::cat(&upsampled, 1)?;
        let x = self.linear_fuse.forward(&fused)?;
        let x = self.batch_norm.forward(&x)?.relu()?;
        self.classifier.forward(&x)
    }
}

/// One stage's composed product, borrowed for the call.
#[derive(Clone, Copy)]
enum StageProduct<'a> {
    F32(&'a [f32]),
    /// Int8 panels with the stage's static input scale (`None`: per row at run time).
    Int8(&'a I8Panels, Option<f32>),
}

/// A stage's int8 product: with its static input scale when it has one, else per-row scales.
fn stage_gemm_i8(x: &[f32], rows: usize, c: usize, p: &I8Panels, scale: Option<f32>, out: &mut [f32]) -> Result<()> {
    match scale {
        Some(s) => kernels::gemm_i8_static(x, rows, c, p, s, None, out),
        None => kernels::gemm_i8_dynamic(x, rows, c, p, None, out),
    }
}

/// The composed head's flat NCHW logits as the tensor [`DecodeHead::forward`] returns.
fn logits_tensor((logits, dims): (Vec<f32>, [usize; 4])) -> Result<Tensor> {
    Ok(Tensor::from_vec(logits, dims.to_vec(), &candle_core::Device::Cpu)?)
}
