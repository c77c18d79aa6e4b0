//! SegFormer's encoder (`SegformerEncoder` in transformers): per stage an overlapping patch embedding, blocks of
//! efficient self-attention and Mix-FFN, and a LayerNorm. Activations stay channels-last [`Tokens`] throughout, where
//! transformers reshapes between token sequences and NCHW maps.

use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::super::config::{NORM_EPS, SegformerConfig};
use super::super::layers::{Conv2d, LayerNorm, Linear};
use super::super::plan::AttentionKernel;
use super::super::tokens::Tokens;
use super::super::tree::{Node, NodeMut, Path, Visitor, VisitorMut, node};
use crate::Result;
use crate::kernels;

/// `SegformerOverlapPatchEmbeddings`: strided conv, flatten to tokens, LayerNorm.
#[derive(Debug, Clone)]
pub struct OverlapPatchEmbeddings {
    pub(super) proj: Conv2d,
    pub(super) layer_norm: LayerNorm,
}

node!(OverlapPatchEmbeddings, |s, p| { "proj" => proj, "layer_norm" => layer_norm });

impl OverlapPatchEmbeddings {
    /// Tokens of a map to tokens of the smaller map. transformers runs the conv on NCHW and then flattens and
    /// transposes; on tokens the conv writes that layout directly.
    pub fn forward(&self, tokens: &Tokens) -> Result<Tokens> {
        self.layer_norm.forward(&self.proj.forward_tokens(tokens)?)
    }
}

/// The spatial reduction of attention's keys and values (sr_ratio > 1): a strided conv and a LayerNorm, which
/// transformers keeps directly in the attention module (`attention.self.sr`, `attention.self.layer_norm`).
#[derive(Debug, Clone)]
pub struct SpatialReduction {
    pub(super) sr: Conv2d,
    pub(super) layer_norm: LayerNorm,
}

node!(SpatialReduction, |s, p| { "sr" => sr, "layer_norm" => layer_norm });

/// `SegformerEfficientSelfAttention`: keys and values from a spatially reduced sequence when sr_ratio > 1.
#[derive(Debug, Clone)]
pub struct EfficientSelfAttention {
    pub(super) num_heads: usize,
    pub(super) query: Linear,
    pub(super) key: Linear,
    pub(super) value: Linear,
    pub(super) reduction: Option<SpatialReduction>,
    /// Set by `Segformer::prepare` from the level.
    pub(super) kernel: AttentionKernel,
}

node!(EfficientSelfAttention, |s, p| {
    "query" => query,
    "key" => key,
    "value" => value,
    "" => reduction,
    "" => kernel,
});

impl EfficientSelfAttention {
    pub fn forward(&self, hidden: &Tokens) -> Result<Tokens> {
        let query = self.query.forward(hidden)?;
        let reduced;
        let kv_input = match &self.reduction {
            // transformers reshapes to NCHW, convolves, flattens back; the conv on tokens gives the same tokens.
            Some(r) => {
                reduced = r.layer_norm.forward(&r.sr.forward_tokens(hidden)?)?;
                &reduced
            }
            None => hidden,
        };
        let key = self.key.forward(kv_input)?;
        let value = self.value.forward(kv_input)?;
        // transformers splits heads, forms softmax(QK^T / sqrt(d)) and multiplies by V per head; the fused kernel
        // computes the same per head on the projections' [tokens, heads * d] layout, without the score matrix.
        let c = hidden.channels();
        let shape = kernels::AttentionShape {
            batch: hidden.batch(),
            queries: hidden.height() * hidden.width(),
            keys: key.height() * key.width(),
            heads: self.num_heads,
            head_dim: c / self.num_heads,
        };
        let mut context = vec![0f32; hidden.data().len()];
        self.kernel
            .run(query.data(), key.data(), value.data(), shape, &mut context)?;
        hidden.with_channels(context, c)
    }
}

/// `SegformerAttention`: self-attention followed by `output.dense`.
#[derive(Debug, Clone)]
pub struct Attention {
    pub(super) self_attention: EfficientSelfAttention,
    pub(super) output_dense: Linear,
}

node!(Attention, |s, p| { "self" => self_attention, "output.dense" => output_dense });

/// `SegformerMixFFN`: dense1, depthwise 3x3 conv, GELU, dense2.
#[derive(Debug, Clone)]
pub struct MixFfn {
    pub(super) dense1: Linear,
    pub(super) dwconv: Conv2d,
    pub(super) dense2: Linear,
}

node!(MixFfn, |s, p| { "dense1" => dense1, "dwconv.dwconv" => dwconv, "dense2" => dense2 });

impl MixFfn {
    /// `forward(hidden) + residual`, the residual added in dense2's bias pass.
    pub fn forward_residual(&self, hidden: &Tokens, residual: &Tokens) -> Result<Tokens> {
        let x = self.dense1.forward(hidden)?;
        // transformers reshapes the tokens to NCHW for the conv; the channels-last kernel computes the same values
        // without the two transposes. GELU (exact erf, as nn.GELU()) is fused into it, and so is dense2's per-row
        // input quantization at int8-dyn (the same codes; the float map is never stored).
        if self.dense2.dynamic_int8_panels().is_some() {
            let codes = self.dwconv.depthwise3x3_gelu_tokens_i8(&x)?;
            return self.dense2.forward_quantized_residual(&codes, residual);
        }
        let x = self.dwconv.depthwise3x3_tokens(&x, true)?;
        self.dense2.forward_residual(&x, residual)
    }
}

/// `SegformerLayer`: pre-norm attention and Mix-FFN blocks with residuals.
#[derive(Debug, Clone)]
pub struct Layer {
    pub(super) layer_norm_1: LayerNorm,
    pub(super) attention: Attention,
    pub(super) layer_norm_2: LayerNorm,
    pub(super) mlp: MixFfn,
}

node!(Layer, |s, p| {
    "layer_norm_1" => layer_norm_1,
    "attention" => attention,
    "layer_norm_2" => layer_norm_2,
    "mlp" => mlp,
});

impl Layer {
    pub fn forward(&self, hidden: &Tokens) -> Result<Tokens> {
        let normed = self.layer_norm_1.forward(hidden)?;
        let attn = self.attention.self_attention.forward(&normed)?;
        // Residual adds fused into the output projections' bias pass (same sums, one pass fewer each).
        let hidden = self.attention.output_dense.forward_residual(&attn, hidden)?;
        let mlp_in = self.layer_norm_2.forward(&hidden)?;
        self.mlp.forward_residual(&mlp_in, &hidden)
    }
}

/// One encoder stage. transformers keeps the stages' parts in three lists (`patch_embeddings.{i}`, `block.{i}`,
/// `layer_norm.{i}`); segq groups them per stage, so the walk meets them in checkpoint order (stage by stage).
#[derive(Debug, Clone)]
pub struct Stage {
    pub(super) index: usize,
    pub(super) patch_embeddings: OverlapPatchEmbeddings,
    pub(super) block: Vec<Layer>,
    pub(super) layer_norm: LayerNorm,
}

node!(Stage, |s, p| {
    format!("patch_embeddings.{}", s.index) => patch_embeddings,
    format!("block.{}", s.index) => block,
    format!("layer_norm.{}", s.index) => layer_norm,
});

/// `SegformerEncoder`: four stages of patch embedding, blocks and a final LayerNorm.
#[derive(Debug, Clone)]
pub struct Encoder {
    pub(super) stages: Vec<Stage>,
    pub(super) reshape_last_stage: bool,
}

/// The stages sit side by side under the encoder's path (each names its own index).
impl Node for Encoder {
    fn visit<'a>(&'a self, path: &Path, v: &mut Visitor<'a, '_>) -> Result<()> {
        self.stages.iter().try_for_each(|s| s.visit(path, v))
    }
}

impl NodeMut for Encoder {
    fn visit_mut(&mut self, path: &Path, v: &mut VisitorMut<'_>) -> Result<()> {
        self.stages.iter_mut().try_for_each(|s| s.visit_mut(path, v))
    }
}

impl Encoder {
    /// The encoder of `config` with every parameter zero.
    pub(super) fn new(config: &SegformerConfig) -> Encoder {
        let stages = (0..config.num_encoder_blocks)
            .map(|i| {
                let in_c = if i == 0 {
                    config.num_channels
                } else {
                    config.hidden_sizes[i - 1]
                };
                let hidden = config.hidden_sizes[i];
                let patch = config.patch_sizes[i];
                let sr_ratio = config.sr_ratios[i];
                let mlp_hidden = hidden * config.mlp_ratios[i];
                let layer = || Layer {
                    layer_norm_1: LayerNorm::new(hidden, NORM_EPS),
                    attention: Attention {
                        self_attention: EfficientSelfAttention {
                            num_heads: config.num_attention_heads[i],
                            query: Linear::new(hidden, hidden),
                            key: Linear::new(hidden, hidden),
                            value: Linear::new(hidden, hidden),
                            reduction: (sr_ratio > 1).then(|| SpatialReduction {
                                sr: Conv2d::new(hidden, hidden, sr_ratio, sr_ratio, 0, 1, true),
                                layer_norm: LayerNorm::new(hidden, NORM_EPS),
                            }),
                            kernel: AttentionKernel::F32,
                        },
                        output_dense: Linear::new(hidden, hidden),
                    },
                    layer_norm_2: LayerNorm::new(hidden, NORM_EPS),
                    mlp: MixFfn {
                        dense1: Linear::new(hidden, mlp_hidden),
                        dwconv: Conv2d::new(mlp_hidden, mlp_hidden, 3, 1, 1, mlp_hidden, true),
                        dense2: Linear::new(mlp_hidden, hidden),
                    },
                };
                Stage {
                    index: i,
                    patch_embeddings: OverlapPatchEmbeddings {
                        proj: Conv2d::new(in_c, hidden, patch, config.strides[i], patch / 2, 1, true),
                        layer_norm: LayerNorm::new(hidden, NORM_EPS),
                    },
                    block: (0..config.depths[i]).map(|_| layer()).collect(),
                    layer_norm: LayerNorm::new(hidden, NORM_EPS),
                }
            })
            .collect();
        Encoder {
            stages,
            reshape_last_stage: config.reshape_last_stage,
        }
    }

    /// Returns each stage's feature map as NCHW (the last one as tokens `[B, N, C]` when `reshape_last_stage` is
    /// off), as transformers does.
    pub fn forward(&self, pixels: &Tensor) -> Result<Vec<Tensor>> {
        let maps = self.forward_maps(pixels, &mut |_, _| {})?;
        let last = maps.len().saturating_sub(1);
        maps.iter()
            .enumerate()
            .map(|(i, m)| {
                if i != last || self.reshape_last_stage {
                    m.to_nchw()
                } else {
                    m.to_tensor()
                }
            })
            .collect()
    }

    /// Each stage's output for NCHW pixels, calling `on_stage(i, elapsed)` after each stage (stage 0's time includes
    /// turning the pixels into tokens).
    pub fn forward_maps(&self, pixels: &Tensor, on_stage: &mut dyn FnMut(usize, Duration)) -> Result<Vec<Tokens>> {
        let start = Instant::now();
        let pixels = Tokens::from_nchw(pixels)?;
        self.run_stages(Some(&pixels), Vec::new(), None, None, start, on_stage)
    }

    /// The stages from `maps.len()` on: `maps` holds the outputs of the stages before (the next stage's input is the
    /// last of them, or `pixels` for stage 0). `resume = Some((block, hidden))` starts that first stage at `block`
    /// from its input `hidden` instead of at its patch embedding. `record` receives every block input and stage
    /// output computed (the boundaries a later pass can start from). Returns every stage's output. This is the one
    /// loop over the stages: [`Encoder::forward_maps`] is it from the pixels.
    pub(super) fn run_stages(
        &self,
        pixels: Option<&Tokens>,
        mut maps: Vec<Tokens>,
        mut resume: Option<(usize, Tokens)>,
        mut record: Option<&mut super::resume::SavedActivations>,
        mut stage_start: Instant,
        on_stage: &mut dyn FnMut(usize, Duration),
    ) -> Result<Vec<Tokens>> {
        let first = maps.len();
        for (i, stage) in self.stages.iter().enumerate().skip(first) {
            let (first_block, mut hidden) = match resume.take() {
                Some((block, hidden)) => (block, hidden),
                None => {
                    let input = maps
                        .last()
                        .or(pixels)
                        .ok_or_else(|| crate::Error::internal("stage 0 needs the pixels"))?;
                    (0, stage.patch_embeddings.forward(input)?)
                }
            };
            for layer in stage.block.iter().skip(first_block) {
                if let Some(saved) = record.as_deref_mut() {
                    saved.block_inputs[i].push(hidden.clone());
                }
                hidden = layer.forward(&hidden)?;
            }
            let output = stage.layer_norm.forward(&hidden)?;
            if let Some(saved) = record.as_deref_mut() {
                saved.stage_outputs.push(output.clone());
            }
            maps.push(output);
            on_stage(i, stage_start.elapsed());
            stage_start = Instant::now();
        }
        Ok(maps)
    }
}
