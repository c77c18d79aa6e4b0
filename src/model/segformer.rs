//! SegFormer for semantic segmentation, mirroring transformers' `modeling_segformer.py`: the same modules, the same
//! weight names (`segformer.encoder.block.{i}.{j}.attention.self.query`, `decode_head.linear_fuse`, ...), the same
//! arithmetic (LayerNorm/BatchNorm eps 1e-5, bilinear upsampling in the decode head, exact GELU).

use candle_core::{D, Tensor};

use super::checkpoint::TensorStore;
use super::config::{NORM_EPS, SegformerConfig};
use super::layers::{BatchNorm2d, Conv2d, LayerInfo, LayerNorm, Linear, Weight, borrowed_values, with_f32};
use crate::Result;
use crate::kernels;

fn linear(store: &mut TensorStore, name: &str, in_f: usize, out_f: usize) -> Result<Linear> {
    let weight = store.weight(&format!("{name}.weight"), &[out_f, in_f])?;
    let bias = Some(store.take(&format!("{name}.bias"), &[out_f])?);
    Ok(Linear {
        name: name.to_string(),
        weight,
        bias,
        shape: vec![out_f, in_f],
    })
}

#[allow(clippy::too_many_arguments)]
fn conv2d(
    store: &mut TensorStore,
    name: &str,
    in_c: usize,
    out_c: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    groups: usize,
    with_bias: bool,
) -> Result<Conv2d> {
    let shape = vec![out_c, in_c / groups, kernel, kernel];
    let weight = store.weight(&format!("{name}.weight"), &shape)?;
    let bias = if with_bias {
        Some(store.take(&format!("{name}.bias"), &[out_c])?)
    } else {
        None
    };
    Ok(Conv2d {
        name: name.to_string(),
        weight,
        bias,
        shape,
        stride,
        padding,
        groups,
    })
}

fn layer_norm(store: &mut TensorStore, name: &str, dim: usize) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: store.take(&format!("{name}.weight"), &[dim])?,
        bias: store.take(&format!("{name}.bias"), &[dim])?,
        eps: NORM_EPS,
    })
}

/// `SegformerOverlapPatchEmbeddings`: strided conv, flatten to tokens, LayerNorm.
#[derive(Debug, Clone)]
pub struct OverlapPatchEmbeddings {
    pub proj: Conv2d,
    pub layer_norm: LayerNorm,
}

impl OverlapPatchEmbeddings {
    /// Channels-last tokens `[B, H*W, C_in]` of an `height x width` map to tokens [B, H'*W', C] and the new (H', W').
    /// transformers runs the conv on NCHW and then flattens and transposes; on tokens the conv writes that layout
    /// directly.
    pub fn forward(&self, tokens: &Tensor, height: usize, width: usize) -> Result<(Tensor, usize, usize)> {
        let (x, h, w) = self.proj.forward_tokens(tokens, height, width)?;
        Ok((self.layer_norm.forward(&x)?, h, w))
    }
}

/// `SegformerEfficientSelfAttention`: keys and values from a spatially reduced sequence when sr_ratio > 1.
#[derive(Debug, Clone)]
pub struct EfficientSelfAttention {
    pub num_heads: usize,
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub sr: Option<(Conv2d, LayerNorm)>,
    /// Level `int8-dyn`: both attention products in int8 with activations quantized at run time
    /// ([`kernels::attention_i8`]), like the level's Linear layers. Set by [`Segformer::pack_dynamic_int8`].
    pub int8_activations: bool,
}

impl EfficientSelfAttention {
    pub fn forward(&self, hidden: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        let (b, n, c) = hidden.dims3()?;
        let query = self.query.forward(hidden)?;
        let kv_input = match &self.sr {
            // transformers reshapes to NCHW, convolves, flattens back; the conv on tokens gives the same tokens.
            Some((sr, norm)) => norm.forward(&sr.forward_tokens(hidden, height, width)?.0)?,
            None => hidden.clone(),
        };
        let key = self.key.forward(&kv_input)?;
        let value = self.value.forward(&kv_input)?;
        // transformers splits heads, forms softmax(QK^T / sqrt(d)) and multiplies by V per head; the fused kernel
        // computes the same per head on the projections' [tokens, heads * d] layout, without the score matrix.
        let shape = kernels::AttentionShape {
            batch: b,
            queries: n,
            keys: key.dim(1)?,
            heads: self.num_heads,
            head_dim: c / self.num_heads,
        };
        let mut context = vec![0f32; b * n * c];
        with_f32(&query, |q| {
            with_f32(&key, |k| {
                with_f32(&value, |v| {
                    if self.int8_activations {
                        kernels::attention_i8(q, k, v, shape, &mut context)
                    } else {
                        kernels::attention(q, k, v, shape, &mut context)
                    }
                })
            })
        })?;
        Ok(Tensor::from_vec(context, (b, n, c), &candle_core::Device::Cpu)?)
    }
}

/// `SegformerAttention`: self-attention followed by `output.dense`.
#[derive(Debug, Clone)]
pub struct Attention {
    pub self_attention: EfficientSelfAttention,
    pub output_dense: Linear,
}

/// `SegformerMixFFN`: dense1, depthwise 3x3 conv, GELU, dense2.
#[derive(Debug, Clone)]
pub struct MixFfn {
    pub dense1: Linear,
    pub dwconv: Conv2d,
    pub dense2: Linear,
}

impl MixFfn {
    pub fn forward(&self, hidden: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        let x = self.dense1.forward(hidden)?;
        // transformers reshapes the tokens to NCHW for the conv; the channels-last kernel computes the same values
        // without the two transposes. GELU (exact erf, as nn.GELU()) is fused into it.
        let x = self.dwconv.depthwise3x3_tokens(&x, height, width, true)?;
        self.dense2.forward(&x)
    }

    /// `forward(hidden) + residual`, the residual added in dense2's bias pass.
    pub fn forward_residual(&self, hidden: &Tensor, height: usize, width: usize, residual: &Tensor) -> Result<Tensor> {
        let x = self.dense1.forward(hidden)?;
        let x = self.dwconv.depthwise3x3_tokens(&x, height, width, true)?;
        self.dense2.forward_residual(&x, residual)
    }
}

/// `SegformerLayer`: pre-norm attention and Mix-FFN blocks with residuals.
#[derive(Debug, Clone)]
pub struct Layer {
    pub layer_norm_1: LayerNorm,
    pub attention: Attention,
    pub layer_norm_2: LayerNorm,
    pub mlp: MixFfn,
}

impl Layer {
    pub fn forward(&self, hidden: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        let normed = self.layer_norm_1.forward(hidden)?;
        let attn = self.attention.self_attention.forward(&normed, height, width)?;
        // Residual adds fused into the output projections' bias pass (same sums, one pass fewer each).
        let hidden = self.attention.output_dense.forward_residual(&attn, hidden)?;
        let mlp_in = self.layer_norm_2.forward(&hidden)?;
        self.mlp.forward_residual(&mlp_in, height, width, &hidden)
    }
}

/// `SegformerEncoder`: four stages of patch embedding, blocks and a final LayerNorm.
#[derive(Debug, Clone)]
pub struct Encoder {
    pub patch_embeddings: Vec<OverlapPatchEmbeddings>,
    pub block: Vec<Vec<Layer>>,
    pub layer_norm: Vec<LayerNorm>,
    pub reshape_last_stage: bool,
}

/// One encoder stage's output as channels-last tokens `[B, height*width, C]`: the layout the encoder and the
/// decode head work in (transformers hands NCHW maps between them; [`StageMap::to_nchw`] gives those).
#[derive(Debug, Clone)]
pub struct StageMap {
    pub tokens: Tensor,
    pub height: usize,
    pub width: usize,
}

impl StageMap {
    /// `[B, C, height, width]`, transformers' layout of a stage's hidden state.
    pub fn to_nchw(&self) -> Result<Tensor> {
        let (b, _, c) = self.tokens.dims3()?;
        Ok(self
            .tokens
            .reshape((b, self.height, self.width, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()?)
    }

    /// From `[B, C, H, W]`.
    pub fn from_nchw(x: &Tensor) -> Result<Self> {
        let (b, c, height, width) = x.dims4()?;
        let tokens = x
            .flatten_from(2)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, height * width, c))?;
        Ok(Self { tokens, height, width })
    }
}

impl Encoder {
    /// Returns each stage's feature map as NCHW (the last one as tokens `[B, N, C]` when `reshape_last_stage` is
    /// off, as transformers does).
    pub fn forward(&self, pixels: &Tensor) -> Result<Vec<Tensor>> {
        let maps = self.forward_maps(pixels, &mut |_, _| {})?;
        let last = maps.len().saturating_sub(1);
        maps.iter()
            .enumerate()
            .map(|(i, m)| {
                if i != last || self.reshape_last_stage {
                    m.to_nchw()
                } else {
                    Ok(m.tokens.clone())
                }
            })
            .collect()
    }

    /// Each stage's output as tokens, calling `on_stage(i, elapsed)` after each stage (for `segq bench --profile`).
    pub fn forward_maps(
        &self,
        pixels: &Tensor,
        on_stage: &mut dyn FnMut(usize, std::time::Duration),
    ) -> Result<Vec<StageMap>> {
        // Stage 1's time includes turning the pixels into tokens.
        let mut stage_start = std::time::Instant::now();
        let mut current = StageMap::from_nchw(pixels)?;
        let mut maps = Vec::with_capacity(self.block.len());
        for i in 0..self.block.len() {
            let (mut hidden, h, w) =
                self.patch_embeddings[i].forward(&current.tokens, current.height, current.width)?;
            for layer in &self.block[i] {
                hidden = layer.forward(&hidden, h, w)?;
            }
            current = StageMap {
                tokens: self.layer_norm[i].forward(&hidden)?,
                height: h,
                width: w,
            };
            maps.push(current.clone());
            on_stage(i, stage_start.elapsed());
            stage_start = std::time::Instant::now();
        }
        Ok(maps)
    }
}

/// `SegformerDecodeHead`: per-stage MLPs to the decoder size, bilinear upsampling to the 1/4 map, concatenation in
/// reverse stage order, `linear_fuse` (1x1 conv, no bias), BatchNorm, ReLU, `classifier` (1x1 conv with bias).
///
/// `forward` computes the same function without materialising the four upsampled, concatenated maps (see
/// [`ComposedHead`]); `forward_reference` is the module as transformers writes it.
#[derive(Debug, Clone)]
pub struct DecodeHead {
    pub linear_c: Vec<Linear>,
    pub linear_fuse: Conv2d,
    pub batch_norm: BatchNorm2d,
    pub classifier: Conv2d,
    /// `linear_c`, `linear_fuse` and the BatchNorm composed per stage; rebuilt whenever the weights change
    /// ([`Segformer::for_each_weight_mut`]). `None` falls back to `forward_reference`.
    pub composed: Option<ComposedHead>,
}

/// The linear part of the decode head rewritten per stage (an exact reformulation). A 1x1 convolution commutes with
/// bilinear upsampling (both are linear, one over channels, the other over pixels, and bilinear weights sum to 1 so
/// a bias passes through), so for stage `i` with input `X_i`:
/// `BN(fuse(cat_j up(linear_c[j](X_j)))) = s * sum_i F_i (W_i up(X_i) + b_i) + t = sum_i up((s F_i W_i) X_i) + bias`
/// where `F_i` is the slice of `linear_fuse`'s input channels that stage `i` feeds (transformers concatenates in
/// reverse stage order, so stage `i` is slice `n-1-i`), `s, t` the folded BatchNorm and
/// `bias = s * sum_i F_i b_i + t`. The products are applied at each stage's own resolution (far fewer pixels),
/// then the decoder-size maps are upsampled and summed in one pass. For quantized levels the matrices are products
/// of the dequantized weights, kept in f32 (D x sum(C_i) values, smaller than `linear_c` plus `linear_fuse`).
#[derive(Debug, Clone)]
pub struct ComposedHead {
    /// Per stage, `(s F_i W_i)^T` as `[C_i, D]`, so tokens `[pixels, C_i]` multiply it directly.
    pub weights: Vec<Tensor>,
    /// `[D]`.
    pub bias: Vec<f32>,
    /// Level `int8-dyn`: the same matrices quantized per output channel (symmetric int8) for the W8A8 GEMM, so the
    /// head's products run in int8 like the rest of the level. Set by [`Segformer::pack_dynamic_int8`].
    pub int8: Option<Vec<kernels::I8Panels>>,
}

impl ComposedHead {
    /// Quantizes every stage matrix per output channel and packs it for [`kernels::gemm_i8_dynamic`].
    fn pack_int8(&self) -> Result<Vec<kernels::I8Panels>> {
        self.weights
            .iter()
            .map(|w| {
                let (c, d) = w.dims2()?;
                let rows = w.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?; // [D, C_i]
                let (codes, scales) = kernels::quantize_rows_i8(&rows, d, c)?;
                kernels::I8Panels::pack(&codes, &scales, d, c)
            })
            .collect()
    }
}

impl DecodeHead {
    /// Composes the per-stage matrices from the current (dequantized) weights.
    pub fn compose(&self) -> Result<ComposedHead> {
        let n = self.linear_c.len();
        let (d, fuse_in) = (self.linear_fuse.shape[0], self.linear_fuse.shape[1]);
        if fuse_in != d * n || self.linear_c.iter().any(|l| l.shape[0] != d) {
            return Err(crate::Error::Model(format!(
                "decode_head.linear_fuse: input channels {fuse_in} are not {n} stages x decoder size {d}"
            )));
        }
        let fuse = self
            .linear_fuse
            .weight
            .to_f32(&self.linear_fuse.shape)?
            .reshape((d, fuse_in))?;
        let scale = self.batch_norm.scale.reshape((d, 1))?;
        let mut bias = self.batch_norm.shift.clone();
        let mut weights = Vec::with_capacity(n);
        for (i, mlp) in self.linear_c.iter().enumerate() {
            let slice = n - 1 - i;
            let f_i = fuse.narrow(1, slice * d, d)?.broadcast_mul(&scale)?;
            let w_i = mlp.weight.to_f32(&mlp.shape)?;
            weights.push(f_i.matmul(&w_i)?.t()?.contiguous()?);
            if let Some(b) = &mlp.bias {
                bias = (bias + f_i.matmul(&b.reshape((d, 1))?)?.flatten_all()?)?;
            }
        }
        Ok(ComposedHead {
            weights,
            bias: bias.to_vec1::<f32>()?,
            int8: None,
        })
    }

    /// From NCHW stage maps, as transformers' module takes them.
    pub fn forward(&self, features: &[Tensor]) -> Result<Tensor> {
        match &self.composed {
            Some(c) => {
                let maps = features.iter().map(StageMap::from_nchw).collect::<Result<Vec<_>>>()?;
                self.forward_composed(c, &maps)
            }
            None => self.forward_reference(features),
        }
    }

    /// From the encoder's token maps (no NCHW round trip when the head is composed).
    pub fn forward_maps(&self, maps: &[StageMap]) -> Result<Tensor> {
        match &self.composed {
            Some(c) => self.forward_composed(c, maps),
            None => self.forward_reference(&maps.iter().map(StageMap::to_nchw).collect::<Result<Vec<_>>>()?),
        }
    }

    /// The head through [`ComposedHead`], one band of output rows per task so the decoder-size map never leaves
    /// the cache: stages below the output resolution are multiplied by their composed matrix at their own
    /// resolution first; then each band is their upsampled sum plus the bias, the full-resolution stage's product is
    /// accumulated onto it, ReLU, and the classifier turns it into logits.
    fn forward_composed(&self, composed: &ComposedHead, features: &[StageMap]) -> Result<Tensor> {
        let (batch, h0, w0) = (features[0].tokens.dim(0)?, features[0].height, features[0].width);
        let d = composed.bias.len();
        let (labels, pixels) = (self.classifier.shape[0], h0 * w0);
        let classifier_bias = self.classifier.bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
        // Float and weight-only classifiers are dequantized once per call, not once per band.
        let classifier_weight = match &self.classifier.weight {
            Weight::PackedI8(_) => None,
            w => Some(w.with_values(|v| Ok(v.to_vec()))?),
        };
        let classify = |x: &[f32], rows: usize| -> Result<Vec<f32>> {
            match (&self.classifier.weight, &classifier_weight) {
                (Weight::PackedI8(p), _) => {
                    let mut out = vec![0f32; rows * labels];
                    kernels::gemm_i8_dynamic(x, rows, d, &p.packed, classifier_bias.as_deref(), &mut out)?;
                    Ok(out)
                }
                (_, Some(w)) => kernels::linear_f32(x, rows, d, w, labels, classifier_bias.as_deref(), None),
                _ => Err(crate::Error::Model("decode_head.classifier: no weight".into())),
            }
        };
        // About 256 pixels of the decoder-size map per band (256 KiB at D = 256).
        let band_rows = (256 / w0.max(1)).clamp(1, h0.max(1));
        let mut logits = vec![0f32; batch * labels * pixels];
        for b in 0..batch {
            let mut low_maps = Vec::new();
            let mut full_res = Vec::new();
            for (i, (state, weight)) in features.iter().zip(&composed.weights).enumerate() {
                let tokens = state.tokens.get(b)?;
                let int8 = composed.int8.as_ref().map(|p| &p[i]);
                if (state.height, state.width) == (h0, w0) {
                    full_res.push((tokens, weight, int8));
                    continue;
                }
                let map = match int8 {
                    Some(p) => {
                        let (hw, c) = tokens.dims2()?;
                        let mut out = vec![0f32; hw * d];
                        with_f32(&tokens, |x| kernels::gemm_i8_dynamic(x, hw, c, p, None, &mut out))?;
                        Tensor::from_vec(out, (hw, d), &candle_core::Device::Cpu)?
                    }
                    None => tokens.matmul(weight)?,
                };
                low_maps.push((map, state.height, state.width));
            }
            // Borrow every map's values at once (the bands read them in parallel).
            let low_guards: Vec<_> = low_maps.iter().map(|(t, _, _)| t.storage_and_layout()).collect();
            let inputs = low_guards
                .iter()
                .zip(&low_maps)
                .map(|((storage, layout), (t, h, w))| {
                    Ok(kernels::MapNhwc {
                        data: borrowed_values(storage, layout, t)?,
                        height: *h,
                        width: *w,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampled = kernels::UpsampleSum::new(&inputs, d, h0, w0, &composed.bias)?;
            let full_guards: Vec<_> = full_res
                .iter()
                .map(|(t, w, _)| (t.storage_and_layout(), w.storage_and_layout()))
                .collect();
            let full_res = full_guards
                .iter()
                .zip(&full_res)
                .map(|(((ts, tl), (ws, wl)), (t, w, int8))| {
                    Ok((
                        borrowed_values(ts, tl, t)?,
                        borrowed_values(ws, wl, w)?,
                        w.dim(0)?,
                        *int8,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            use rayon::prelude::*;
            let bands = (0..h0.div_ceil(band_rows))
                .into_par_iter()
                .map_init(
                    || (Vec::new(), Vec::new()),
                    |(fused, product): &mut (Vec<f32>, Vec<f32>), band| {
                        let y0 = band * band_rows;
                        let rows = band_rows.min(h0 - y0) * w0;
                        fused.resize(rows * d, 0.0);
                        upsampled.rows(y0, fused);
                        for &(tokens, weight, c, int8) in &full_res {
                            let x = &tokens[y0 * w0 * c..(y0 * w0 + rows) * c];
                            match int8 {
                                Some(p) => {
                                    product.resize(rows * d, 0.0);
                                    kernels::gemm_i8_dynamic(x, rows, c, p, None, product)?;
                                    fused.iter_mut().zip(product.iter()).for_each(|(f, v)| *f += v);
                                }
                                None => kernels::matmul_accumulate(x, rows, c, weight, d, fused)?,
                            }
                        }
                        fused.iter_mut().for_each(|v| *v = v.max(0.0));
                        Ok((y0 * w0, classify(fused, rows)?))
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
        Ok(Tensor::from_vec(
            logits,
            (batch, labels, h0, w0),
            &candle_core::Device::Cpu,
        )?)
    }

    /// The head exactly as transformers writes it: materialises the four upsampled maps and their concatenation.
    pub fn forward_reference(&self, features: &[Tensor]) -> Result<Tensor> {
        let (_, _, h0, w0) = features[0].dims4()?;
        let mut upsampled = Vec::with_capacity(features.len());
        for (state, mlp) in features.iter().zip(&self.linear_c) {
            let (b, c, h, w) = state.dims4()?;
            let tokens = state.flatten_from(2)?.transpose(1, 2)?;
            let x = mlp.forward(&tokens.reshape((b, h * w, c))?)?;
            let d = x.dim(D::Minus1)?;
            let x = x.transpose(1, 2)?.reshape((b, d, h, w))?;
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

/// What [`Segformer::for_each_weight_mut`] calls: `(name, shape, weight)`.
pub type WeightVisitor<'a> = dyn FnMut(&str, &[usize], &mut Weight) -> Result<()> + 'a;

/// `SegformerForSemanticSegmentation`: encoder + decode head; logits at 1/4 of the input size.
#[derive(Debug, Clone)]
pub struct Segformer {
    pub config: SegformerConfig,
    pub encoder: Encoder,
    pub decode_head: DecodeHead,
}

impl Segformer {
    /// Builds the model from a checkpoint's tensors, checking every name and shape; leftover tensors are errors.
    pub fn load(config: &SegformerConfig, store: &mut TensorStore) -> Result<Self> {
        let n = config.num_encoder_blocks;
        let mut patch_embeddings = Vec::with_capacity(n);
        let mut block = Vec::with_capacity(n);
        let mut norms = Vec::with_capacity(n);
        for i in 0..n {
            let in_c = if i == 0 {
                config.num_channels
            } else {
                config.hidden_sizes[i - 1]
            };
            let hidden = config.hidden_sizes[i];
            let patch = config.patch_sizes[i];
            let prefix = format!("segformer.encoder.patch_embeddings.{i}");
            patch_embeddings.push(OverlapPatchEmbeddings {
                proj: conv2d(
                    store,
                    &format!("{prefix}.proj"),
                    in_c,
                    hidden,
                    patch,
                    config.strides[i],
                    patch / 2,
                    1,
                    true,
                )?,
                layer_norm: layer_norm(store, &format!("{prefix}.layer_norm"), hidden)?,
            });
            let mut layers = Vec::with_capacity(config.depths[i]);
            for j in 0..config.depths[i] {
                let p = format!("segformer.encoder.block.{i}.{j}");
                let sr_ratio = config.sr_ratios[i];
                let sr = if sr_ratio > 1 {
                    Some((
                        conv2d(
                            store,
                            &format!("{p}.attention.self.sr"),
                            hidden,
                            hidden,
                            sr_ratio,
                            sr_ratio,
                            0,
                            1,
                            true,
                        )?,
                        layer_norm(store, &format!("{p}.attention.self.layer_norm"), hidden)?,
                    ))
                } else {
                    None
                };
                let mlp_hidden = hidden * config.mlp_ratios[i];
                layers.push(Layer {
                    layer_norm_1: layer_norm(store, &format!("{p}.layer_norm_1"), hidden)?,
                    attention: Attention {
                        self_attention: EfficientSelfAttention {
                            num_heads: config.num_attention_heads[i],
                            query: linear(store, &format!("{p}.attention.self.query"), hidden, hidden)?,
                            key: linear(store, &format!("{p}.attention.self.key"), hidden, hidden)?,
                            value: linear(store, &format!("{p}.attention.self.value"), hidden, hidden)?,
                            sr,
                            int8_activations: false,
                        },
                        output_dense: linear(store, &format!("{p}.attention.output.dense"), hidden, hidden)?,
                    },
                    layer_norm_2: layer_norm(store, &format!("{p}.layer_norm_2"), hidden)?,
                    mlp: MixFfn {
                        dense1: linear(store, &format!("{p}.mlp.dense1"), hidden, mlp_hidden)?,
                        dwconv: conv2d(
                            store,
                            &format!("{p}.mlp.dwconv.dwconv"),
                            mlp_hidden,
                            mlp_hidden,
                            3,
                            1,
                            1,
                            mlp_hidden,
                            true,
                        )?,
                        dense2: linear(store, &format!("{p}.mlp.dense2"), mlp_hidden, hidden)?,
                    },
                });
            }
            block.push(layers);
            norms.push(layer_norm(store, &format!("segformer.encoder.layer_norm.{i}"), hidden)?);
        }
        let d = config.decoder_hidden_size;
        let linear_c = (0..n)
            .map(|i| {
                linear(
                    store,
                    &format!("decode_head.linear_c.{i}.proj"),
                    config.hidden_sizes[i],
                    d,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let linear_fuse = conv2d(store, "decode_head.linear_fuse", d * n, d, 1, 1, 0, 1, false)?;
        let bn = |store: &mut TensorStore, key: &str| store.take(&format!("decode_head.batch_norm.{key}"), &[d]);
        let batch_norm = BatchNorm2d::new(
            &bn(store, "weight")?,
            &bn(store, "bias")?,
            &bn(store, "running_mean")?,
            &bn(store, "running_var")?,
            NORM_EPS,
        )?;
        store.discard("decode_head.batch_norm.num_batches_tracked");
        let classifier = conv2d(
            store,
            "decode_head.classifier",
            d,
            config.num_labels(),
            1,
            1,
            0,
            1,
            true,
        )?;
        store.finish()?;
        let mut model = Self {
            config: config.clone(),
            encoder: Encoder {
                patch_embeddings,
                block,
                layer_norm: norms,
                reshape_last_stage: config.reshape_last_stage,
            },
            decode_head: DecodeHead {
                linear_c,
                linear_fuse,
                batch_norm,
                classifier,
                composed: None,
            },
        };
        model.decode_head.composed = Some(model.decode_head.compose()?);
        Ok(model)
    }

    /// Re-lays out every int8 symmetric per-channel weight of a Linear, 1x1 convolution, patch embedding or spatial
    /// reduction for the W8A8 dynamic GEMM (level `int8-dyn`), and switches attention to int8; the depthwise
    /// convolutions keep the dequantize path. Returns how many weights were packed.
    pub fn pack_dynamic_int8(&mut self) -> Result<usize> {
        let mut packed = 0;
        let mut pack = |w: &mut Weight| {
            if let Weight::Quantized(q) = w
                && let Some(p) = super::layers::PackedInt8::try_from_quant(q)
            {
                *w = Weight::PackedI8(std::sync::Arc::new(p));
                packed += 1;
            }
        };
        // Patch embeddings and spatial reductions run on tokens: pack their columns in patch order.
        let mut packed_convs = 0;
        let mut pack_conv = |conv: &mut Conv2d| {
            let (k, in_c) = (conv.shape[2], conv.shape[1]);
            if conv.groups == 1
                && conv.shape[3] == k
                && let Weight::Quantized(q) = &conv.weight
                && let Some(p) = super::layers::PackedInt8::try_from_conv(q, k, in_c)
            {
                conv.weight = Weight::PackedI8(std::sync::Arc::new(p));
                packed_convs += 1;
            }
        };
        for embedding in &mut self.encoder.patch_embeddings {
            pack_conv(&mut embedding.proj);
        }
        for stage in &mut self.encoder.block {
            for layer in stage {
                let a = &mut layer.attention.self_attention;
                a.int8_activations = true;
                for l in [
                    &mut a.query,
                    &mut a.key,
                    &mut a.value,
                    &mut layer.attention.output_dense,
                ] {
                    pack(&mut l.weight);
                }
                pack(&mut layer.mlp.dense1.weight);
                pack(&mut layer.mlp.dense2.weight);
                if let Some((sr, _)) = &mut a.sr {
                    pack_conv(sr);
                }
            }
        }
        let head = &mut self.decode_head;
        for l in &mut head.linear_c {
            pack(&mut l.weight);
        }
        for conv in [&mut head.linear_fuse, &mut head.classifier] {
            if conv.is_pointwise() {
                pack(&mut conv.weight);
            }
        }
        if let Some(composed) = &mut self.decode_head.composed {
            composed.int8 = Some(composed.pack_int8()?);
        }
        let packed = packed + packed_convs;
        tracing::debug!(packed, "int8-dyn weights packed for the W8A8 GEMM");
        Ok(packed)
    }

    /// Logits [B, num_labels, H/4, W/4] for normalised pixels [B, 3, H, W].
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let maps = self.encoder.forward_maps(pixels, &mut |_, _| {})?;
        self.decode_head.forward_maps(&maps)
    }

    /// Bytes of all Linear/Conv2d weights and biases as currently stored (float, quantized or packed).
    pub fn weight_bytes(&self) -> usize {
        self.layers().iter().map(|l| l.weight_bytes + l.bias_bytes).sum()
    }

    /// Every quantizable layer (Linear and Conv2d) with its weight-name prefix, in checkpoint order.
    pub fn layers(&self) -> Vec<LayerInfo> {
        let mut out = Vec::new();
        self.visit_layers(&mut |layer| out.push(layer));
        out
    }

    fn visit_layers(&self, f: &mut dyn FnMut(LayerInfo)) {
        for (i, stage) in self.encoder.block.iter().enumerate() {
            f(self.encoder.patch_embeddings[i].proj.info());
            for layer in stage {
                let a = &layer.attention.self_attention;
                for l in [&a.query, &a.key, &a.value] {
                    f(l.info());
                }
                if let Some((sr, _)) = &a.sr {
                    f(sr.info());
                }
                f(layer.attention.output_dense.info());
                f(layer.mlp.dense1.info());
                f(layer.mlp.dwconv.info());
                f(layer.mlp.dense2.info());
            }
        }
        for l in &self.decode_head.linear_c {
            f(l.info());
        }
        f(self.decode_head.linear_fuse.info());
        f(self.decode_head.classifier.info());
    }

    /// Calls `f(name, weight)` for every Linear and Conv2d weight, to quantize or inspect it in place.
    pub fn for_each_weight_mut(&mut self, f: &mut WeightVisitor<'_>) -> Result<()> {
        for (i, stage) in self.encoder.block.iter_mut().enumerate() {
            let proj = &mut self.encoder.patch_embeddings[i].proj;
            f(&proj.name, &proj.shape, &mut proj.weight)?;
            for layer in stage {
                let a = &mut layer.attention.self_attention;
                for l in [&mut a.query, &mut a.key, &mut a.value] {
                    f(&l.name, &l.shape, &mut l.weight)?;
                }
                if let Some((sr, _)) = &mut a.sr {
                    f(&sr.name, &sr.shape, &mut sr.weight)?;
                }
                let o = &mut layer.attention.output_dense;
                f(&o.name, &o.shape, &mut o.weight)?;
                let m = &mut layer.mlp;
                f(&m.dense1.name, &m.dense1.shape, &mut m.dense1.weight)?;
                f(&m.dwconv.name, &m.dwconv.shape, &mut m.dwconv.weight)?;
                f(&m.dense2.name, &m.dense2.shape, &mut m.dense2.weight)?;
            }
        }
        for l in &mut self.decode_head.linear_c {
            f(&l.name, &l.shape, &mut l.weight)?;
        }
        let fuse = &mut self.decode_head.linear_fuse;
        f(&fuse.name, &fuse.shape, &mut fuse.weight)?;
        let cls = &mut self.decode_head.classifier;
        f(&cls.name, &cls.shape, &mut cls.weight)?;
        // The composed head is derived from these weights: keep it in step with them.
        self.decode_head.composed = Some(self.decode_head.compose()?);
        Ok(())
    }

    /// Every tensor of the model under its checkpoint name, in checkpoint order: what a saved checkpoint holds.
    pub fn state_dict(&self) -> Vec<(String, StateTensor)> {
        let mut out = Vec::new();
        let linear = |out: &mut Vec<(String, StateTensor)>, name: &str, w: &Weight, b: &Option<Tensor>| {
            out.push((format!("{name}.weight"), StateTensor::from(w)));
            if let Some(b) = b {
                out.push((format!("{name}.bias"), StateTensor::Float(b.clone())));
            }
        };
        let norm = |out: &mut Vec<(String, StateTensor)>, name: &str, n: &LayerNorm| {
            out.push((format!("{name}.weight"), StateTensor::Float(n.weight.clone())));
            out.push((format!("{name}.bias"), StateTensor::Float(n.bias.clone())));
        };
        for (i, stage) in self.encoder.block.iter().enumerate() {
            let pe = &self.encoder.patch_embeddings[i];
            linear(&mut out, &pe.proj.name, &pe.proj.weight, &pe.proj.bias);
            norm(
                &mut out,
                &format!("segformer.encoder.patch_embeddings.{i}.layer_norm"),
                &pe.layer_norm,
            );
            for (j, layer) in stage.iter().enumerate() {
                let p = format!("segformer.encoder.block.{i}.{j}");
                norm(&mut out, &format!("{p}.layer_norm_1"), &layer.layer_norm_1);
                let a = &layer.attention.self_attention;
                for l in [&a.query, &a.key, &a.value] {
                    linear(&mut out, &l.name, &l.weight, &l.bias);
                }
                if let Some((sr, sr_norm)) = &a.sr {
                    linear(&mut out, &sr.name, &sr.weight, &sr.bias);
                    norm(&mut out, &format!("{p}.attention.self.layer_norm"), sr_norm);
                }
                let o = &layer.attention.output_dense;
                linear(&mut out, &o.name, &o.weight, &o.bias);
                norm(&mut out, &format!("{p}.layer_norm_2"), &layer.layer_norm_2);
                let m = &layer.mlp;
                linear(&mut out, &m.dense1.name, &m.dense1.weight, &m.dense1.bias);
                linear(&mut out, &m.dwconv.name, &m.dwconv.weight, &m.dwconv.bias);
                linear(&mut out, &m.dense2.name, &m.dense2.weight, &m.dense2.bias);
            }
            norm(
                &mut out,
                &format!("segformer.encoder.layer_norm.{i}"),
                &self.encoder.layer_norm[i],
            );
        }
        for l in &self.decode_head.linear_c {
            linear(&mut out, &l.name, &l.weight, &l.bias);
        }
        let f = &self.decode_head.linear_fuse;
        linear(&mut out, &f.name, &f.weight, &f.bias);
        for (key, t) in ["weight", "bias", "running_mean", "running_var"]
            .iter()
            .zip(&self.decode_head.batch_norm.stored)
        {
            out.push((format!("decode_head.batch_norm.{key}"), StateTensor::Float(t.clone())));
        }
        let c = &self.decode_head.classifier;
        linear(&mut out, &c.name, &c.weight, &c.bias);
        out
    }
}

/// One entry of [`Segformer::state_dict`].
pub enum StateTensor {
    Float(Tensor),
    Quantized(std::sync::Arc<crate::quant::QuantTensor>),
}

impl From<&Weight> for StateTensor {
    fn from(w: &Weight) -> Self {
        match w {
            Weight::Float(t) => StateTensor::Float(t.clone()),
            Weight::Quantized(q) => StateTensor::Quantized(q.clone()),
            Weight::PackedI8(p) => StateTensor::Quantized(std::sync::Arc::new(p.to_quant())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{self, ModelSource};
    use crate::quant::{Level, Recipe};
    use candle_core::Device;

    fn fixture(name: &str) -> Segformer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models")
            .join(name);
        model::load(&ModelSource::Local(dir)).unwrap().model
    }

    /// Smooth image-like pixels with some noise, at an awkward size.
    fn pixels(h: usize, w: usize) -> Tensor {
        let noise = crate::kernels::test_util::random_vec(3 * h * w, 7, 0.3);
        let v: Vec<f32> = (0..3 * h * w)
            .map(|i| ((i % w) as f32 / w as f32 - 0.5) * 2.0 + ((i / w) % h) as f32 / h as f32 - 0.5 + noise[i])
            .collect();
        Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// max |a - b| / max |b|.
    fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let max_ref = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / max_ref
    }

    #[test]
    fn composed_decode_head_matches_the_reference_head() {
        for name in ["tiny_a", "tiny_b_bin", "tiny_c"] {
            let m = fixture(name);
            assert!(m.decode_head.composed.is_some(), "{name}: composed head built at load");
            let features = m.encoder.forward(&pixels(61, 47)).unwrap();
            let fast = m.decode_head.forward(&features).unwrap();
            let reference = m.decode_head.forward_reference(&features).unwrap();
            assert_eq!(fast.dims(), reference.dims(), "{name}");
            let d = rel_diff(&values(&fast), &values(&reference));
            assert!(
                d < 1e-5,
                "{name}: composed head differs from the reference by {d} (relative)"
            );
        }
    }

    #[test]
    fn composed_head_follows_quantized_weights() {
        let m = fixture("tiny_a");
        let (q, _) = model::quantize(&m, &Recipe::level_default(Level::Int4)).unwrap();
        let features = q.encoder.forward(&pixels(40, 36)).unwrap();
        let fast = values(&q.decode_head.forward(&features).unwrap());
        let reference = values(&q.decode_head.forward_reference(&features).unwrap());
        let d = rel_diff(&fast, &reference);
        assert!(d < 1e-5, "int4: composed head differs from the reference by {d}");
    }

    #[test]
    fn int8_dyn_runs_the_int8_gemm_and_stays_close_to_f32() {
        let m = fixture("tiny_a");
        let input = pixels(64, 64);
        let f32_logits = values(&m.forward(&input).unwrap());
        let (dynamic, _) = model::quantize(&m, &Recipe::level_default(Level::Int8Dyn)).unwrap();
        let (weight_only, _) = model::quantize(&m, &Recipe::level_default(Level::Int8)).unwrap();
        let a = &dynamic.encoder.block[0][0].attention.self_attention;
        assert!(
            matches!(a.query.weight, Weight::PackedI8(_)),
            "query packed for the GEMM"
        );
        assert!(matches!(dynamic.decode_head.classifier.weight, Weight::PackedI8(_)));
        let proj = &dynamic.encoder.patch_embeddings[0].proj;
        let (k, in_c) = (proj.shape[2], proj.shape[1]);
        assert!(
            matches!(&proj.weight, Weight::PackedI8(p) if p.conv_patch == Some((k, in_c))),
            "patch embedding packed in patch order for the int8 im2col GEMM"
        );
        // Same int8 codes either way: only the run-time activation quantization differs.
        let dyn_logits = values(&dynamic.forward(&input).unwrap());
        let wo_logits = values(&weight_only.forward(&input).unwrap());
        let vs_weight_only = rel_diff(&dyn_logits, &wo_logits);
        assert!(
            vs_weight_only > 0.0,
            "int8-dyn gave the weight-only logits: the GEMM path did not run"
        );
        assert!(vs_weight_only < 0.03, "int8-dyn vs int8 weight-only: {vs_weight_only}");
        let vs_f32 = rel_diff(&dyn_logits, &f32_logits);
        assert!(vs_f32 < 0.05, "int8-dyn vs f32: {vs_f32}");
    }

    #[test]
    fn packed_weights_save_as_the_codes_they_came_from() {
        let m = fixture("tiny_a");
        let (weight_only, _) = model::quantize(&m, &Recipe::level_default(Level::Int8)).unwrap();
        let (dynamic, _) = model::quantize(&m, &Recipe::level_default(Level::Int8Dyn)).unwrap();
        let stored = |m: &Segformer| -> Vec<(String, Vec<u8>, Vec<f32>)> {
            m.state_dict()
                .into_iter()
                .filter_map(|(k, t)| match t {
                    StateTensor::Quantized(q) => Some((k, q.data.clone(), q.scales.clone())),
                    StateTensor::Float(_) => None,
                })
                .collect()
        };
        let (a, b) = (stored(&weight_only), stored(&dynamic));
        assert!(!a.is_empty());
        assert_eq!(a, b, "int8-dyn saves exactly the int8 codes and scales");
    }
}
