//! SegFormer for semantic segmentation, mirroring transformers' `modeling_segformer.py`: the same modules, the same
//! weight names (`segformer.encoder.block.{i}.{j}.attention.self.query`, `decode_head.linear_fuse`, ...), the same
//! arithmetic (LayerNorm/BatchNorm eps 1e-5, bilinear upsampling in the decode head, exact GELU).

use candle_core::{D, Tensor};

use super::checkpoint::TensorStore;
use super::config::{NORM_EPS, SegformerConfig};
use super::layers::{BatchNorm2d, Conv2d, LayerInfo, LayerNorm, Linear, Weight};
use crate::Result;

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
    /// Returns tokens [B, H*W, C] and the new (H, W).
    pub fn forward(&self, pixels: &Tensor) -> Result<(Tensor, usize, usize)> {
        let x = self.proj.forward(pixels)?;
        let (_, _, h, w) = x.dims4()?;
        let tokens = x.flatten_from(2)?.transpose(1, 2)?;
        Ok((self.layer_norm.forward(&tokens)?, h, w))
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
}

impl EfficientSelfAttention {
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        Ok(x.reshape((b, n, self.num_heads, c / self.num_heads))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    pub fn forward(&self, hidden: &Tensor, height: usize, width: usize) -> Result<Tensor> {
        let (b, n, c) = hidden.dims3()?;
        let query = self.split_heads(&self.query.forward(hidden)?)?;
        let kv_input = match &self.sr {
            Some((sr, norm)) => {
                let x = hidden.transpose(1, 2)?.reshape((b, c, height, width))?;
                let x = sr.forward(&x)?;
                let x = x.flatten_from(2)?.transpose(1, 2)?;
                norm.forward(&x)?
            }
            None => hidden.clone(),
        };
        let key = self.split_heads(&self.key.forward(&kv_input)?)?;
        let value = self.split_heads(&self.value.forward(&kv_input)?)?;
        let head_size = (c / self.num_heads) as f64;
        let scores = (query.matmul(&key.t()?)? / head_size.sqrt())?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs.matmul(&value)?;
        Ok(context.transpose(1, 2)?.reshape((b, n, c))?)
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
        let attn = self.attention.output_dense.forward(&attn)?;
        let hidden = (attn + hidden)?;
        let mlp = self.mlp.forward(&self.layer_norm_2.forward(&hidden)?, height, width)?;
        Ok((mlp + hidden)?)
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

impl Encoder {
    /// Returns each stage's feature map as NCHW.
    pub fn forward(&self, pixels: &Tensor) -> Result<Vec<Tensor>> {
        self.forward_timed(pixels, &mut |_, _| {})
    }

    /// Like `forward`, calling `on_stage(i, elapsed)` after each stage (for `segq bench --profile`).
    pub fn forward_timed(
        &self,
        pixels: &Tensor,
        on_stage: &mut dyn FnMut(usize, std::time::Duration),
    ) -> Result<Vec<Tensor>> {
        let mut x = pixels.clone();
        let mut features = Vec::with_capacity(self.block.len());
        let stages = self.block.len();
        for i in 0..stages {
            let start = std::time::Instant::now();
            let (mut hidden, h, w) = self.patch_embeddings[i].forward(&x)?;
            for layer in &self.block[i] {
                hidden = layer.forward(&hidden, h, w)?;
            }
            hidden = self.layer_norm[i].forward(&hidden)?;
            let (b, _, c) = hidden.dims3()?;
            if i != stages - 1 || self.reshape_last_stage {
                hidden = hidden.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()?;
            }
            on_stage(i, start.elapsed());
            features.push(hidden.clone());
            x = hidden;
        }
        Ok(features)
    }
}

/// `SegformerDecodeHead`: per-stage MLPs to the decoder size, bilinear upsampling to the 1/4 map, concatenation in
/// reverse stage order, `linear_fuse` (1x1 conv, no bias), BatchNorm, ReLU, `classifier` (1x1 conv with bias).
#[derive(Debug, Clone)]
pub struct DecodeHead {
    pub linear_c: Vec<Linear>,
    pub linear_fuse: Conv2d,
    pub batch_norm: BatchNorm2d,
    pub classifier: Conv2d,
}

impl DecodeHead {
    pub fn forward(&self, features: &[Tensor]) -> Result<Tensor> {
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
        Ok(Self {
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
            },
        })
    }

    /// Logits [B, num_labels, H/4, W/4] for normalised pixels [B, 3, H, W].
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let features = self.encoder.forward(pixels)?;
        self.decode_head.forward(&features)
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
    pub fn for_each_weight_mut(&mut self, f: &mut dyn FnMut(&str, &[usize], &mut Weight) -> Result<()>) -> Result<()> {
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
        f(&cls.name, &cls.shape, &mut cls.weight)
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
        }
    }
}
