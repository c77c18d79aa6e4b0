//! Starting a forward pass part-way: the points where SegFormer's forward pass can resume ([`ResumePoint`]: a
//! stage's patch embedding, an encoder block, the decode head), the float activations saved at those points by one
//! full pass ([`SavedActivations`]), and which layers each part of the module tree holds ([`Section`]). A model that
//! differs from another only from some point on gives the same activations before it, so a pass of the changed
//! model can start there from the other's saved activations (`segq sensitivity` runs each one-layer variant this
//! way). The stages are still run by the one loop, `Encoder::run_stages`.

use std::cmp::Ordering;
use std::fmt;
use std::time::Instant;

use candle_core::Tensor;

use super::Segformer;
use crate::model::tokens::Tokens;
use crate::model::tree::{Leaf, Node, Path};
use crate::{Error, Result};

/// A place in the forward pass where it can start from saved activations, in forward order (`Ord`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResumePoint {
    /// Stage `stage`'s patch embedding, from the previous stage's output (the pixels for stage 0).
    Stage { stage: usize },
    /// Encoder block `block` of stage `stage`, from its input.
    Block { stage: usize, block: usize },
    /// The decode head, from the four stage outputs.
    Head,
}

impl ResumePoint {
    /// (stage, position in the stage), the head after every stage.
    fn key(self) -> (usize, usize) {
        match self {
            ResumePoint::Stage { stage } => (stage, 0),
            ResumePoint::Block { stage, block } => (stage, block + 1),
            ResumePoint::Head => (usize::MAX, 0),
        }
    }
}

impl Ord for ResumePoint {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

impl PartialOrd for ResumePoint {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for ResumePoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResumePoint::Stage { stage } => write!(f, "stage {stage} patch embedding"),
            ResumePoint::Block { stage, block } => write!(f, "block {stage}.{block}"),
            ResumePoint::Head => write!(f, "decode head"),
        }
    }
}

/// The activations of one batch at every [`ResumePoint`]: the pixels as tokens, the input of every encoder block
/// and the output of every stage (the head's inputs). Saved by [`Segformer::forward_saving`].
#[derive(Debug, Clone)]
pub struct SavedActivations {
    pub(super) pixels: Tokens,
    /// `[stage][block]`.
    pub(super) block_inputs: Vec<Vec<Tokens>>,
    pub(super) stage_outputs: Vec<Tokens>,
}

impl SavedActivations {
    /// Bytes held (f32 values).
    pub fn bytes(&self) -> usize {
        let values = self.pixels.data().len()
            + self
                .block_inputs
                .iter()
                .flatten()
                .map(|t| t.data().len())
                .sum::<usize>()
            + self.stage_outputs.iter().map(|t| t.data().len()).sum::<usize>();
        values * std::mem::size_of::<f32>()
    }

    /// Images in the batch.
    pub fn batch(&self) -> usize {
        self.pixels.batch()
    }
}

/// A part of the module tree that a forward pass can start at, with the Linear and Conv2d layers it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub start: ResumePoint,
    /// Its weight-name prefix (`segformer.encoder.block.0.1`, `segformer.encoder.patch_embeddings.2`, `decode_head`).
    pub path: String,
    /// Layer paths (weight names without `.weight`), in checkpoint order.
    pub layers: Vec<String>,
}

impl Segformer {
    /// [`Segformer::forward`], keeping the activations at every [`ResumePoint`] (the logits are the same, bit for
    /// bit: the same loop computes them).
    pub fn forward_saving(&self, pixels: &Tensor) -> Result<(Tensor, SavedActivations)> {
        let start = Instant::now();
        let tokens = Tokens::from_nchw(pixels)?;
        let stages = self.encoder.stages.len();
        let mut saved = SavedActivations {
            pixels: Tokens::new(Vec::new(), 0, 0, 0, 0)?,
            block_inputs: vec![Vec::new(); stages],
            stage_outputs: Vec::with_capacity(stages),
        };
        let maps = self
            .encoder
            .run_stages(Some(&tokens), Vec::new(), None, Some(&mut saved), start, &mut |_, _| {})?;
        saved.pixels = tokens;
        Ok((self.decode_head.forward_maps(&maps)?, saved))
    }

    /// The logits of a pass that starts at `start` from `saved` (activations of this model's architecture saved by
    /// [`Segformer::forward_saving`], of this or another model). Equal to [`Segformer::forward`] on the same pixels
    /// whenever this model's layers before `start` are those of the model that saved them.
    pub fn forward_from(&self, start: ResumePoint, saved: &SavedActivations) -> Result<Tensor> {
        let stages = self.encoder.stages.len();
        let mismatch = || {
            Error::invalid(
                "saved activations",
                format!("they do not fit this model ({stages} stages) at {start}"),
            )
        };
        if saved.stage_outputs.len() != stages || saved.block_inputs.len() != stages {
            return Err(mismatch());
        }
        let clock = Instant::now();
        let maps = match start {
            ResumePoint::Head => return self.decode_head.forward_maps(&saved.stage_outputs),
            ResumePoint::Stage { stage } if stage < stages => self.encoder.run_stages(
                Some(&saved.pixels),
                saved.stage_outputs[..stage].to_vec(),
                None,
                None,
                clock,
                &mut |_, _| {},
            )?,
            ResumePoint::Block { stage, block } if stage < stages => {
                let input = saved.block_inputs[stage].get(block).ok_or_else(mismatch)?;
                self.encoder.run_stages(
                    None,
                    saved.stage_outputs[..stage].to_vec(),
                    Some((block, input.clone())),
                    None,
                    clock,
                    &mut |_, _| {},
                )?
            }
            _ => return Err(mismatch()),
        };
        self.decode_head.forward_maps(&maps)
    }

    /// The parts a pass can start at, in forward order, with the layers each holds (a stage's final LayerNorm,
    /// which has no Linear/Conv2d layer, belongs to none). Found by walking each part alone and matching its leaves
    /// to the one walk of the whole model, so the names are the walk's own.
    pub fn sections(&self) -> Result<Vec<Section>> {
        let mut parts: Vec<(Option<ResumePoint>, &dyn Node)> = Vec::new();
        for (stage, s) in self.encoder.stages.iter().enumerate() {
            parts.push((Some(ResumePoint::Stage { stage }), &s.patch_embeddings));
            for (block, layer) in s.block.iter().enumerate() {
                parts.push((Some(ResumePoint::Block { stage, block }), layer));
            }
            parts.push((None, &s.layer_norm));
        }
        parts.push((Some(ResumePoint::Head), &self.decode_head));
        let leaves = |node: &dyn Node| -> Result<Vec<(String, bool)>> {
            let mut out = Vec::new();
            node.visit(&Path::root(), &mut |path, leaf| {
                out.push((
                    path.as_str().to_string(),
                    matches!(leaf, Leaf::Linear(_) | Leaf::Conv2d(_)),
                ));
                Ok(())
            })?;
            Ok(out)
        };
        let mut whole = leaves(self)?.into_iter();
        let mut sections = Vec::new();
        for (start, node) in parts {
            let mut section = Section {
                start: start.unwrap_or(ResumePoint::Head),
                path: String::new(),
                layers: Vec::new(),
            };
            for (i, (relative, is_layer)) in leaves(node)?.into_iter().enumerate() {
                let (full, _) = whole
                    .next()
                    .ok_or_else(|| Error::internal("the model walk ended before its parts"))?;
                let prefix = full
                    .strip_suffix(&relative)
                    .filter(|p| relative.is_empty() || p.is_empty() || p.ends_with('.'))
                    .ok_or_else(|| Error::internal(format!("walk leaf `{full}` is not part leaf `{relative}`")))?;
                if i == 0 {
                    section.path = prefix.trim_end_matches('.').to_string();
                }
                if is_layer {
                    section.layers.push(full);
                }
            }
            if start.is_some() {
                sections.push(section);
            }
        }
        if whole.next().is_some() {
            return Err(Error::internal("the model walk has leaves outside its parts"));
        }
        Ok(sections)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::fixture;
    use super::*;
    use crate::model;
    use crate::quant::{LayerRule, Level, Recipe};
    use candle_core::Device;

    /// Two noisy image-like inputs of `h x w`.
    fn pixels(h: usize, w: usize) -> Tensor {
        let noise = crate::kernels::test_util::random_vec(2 * 3 * h * w, 5, 0.3);
        let v: Vec<f32> = (0..2 * 3 * h * w)
            .map(|i| ((i % w) as f32 / w as f32 - 0.5) * 2.0 + noise[i])
            .collect();
        Tensor::from_vec(v, (2, 3, h, w), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn the_saving_pass_and_every_resumed_pass_give_forwards_logits() {
        for name in ["tiny_a", "tiny_c"] {
            let m = fixture(name);
            let input = pixels(45, 38);
            let expected = values(&m.forward(&input).unwrap());
            let (logits, saved) = m.forward_saving(&input).unwrap();
            assert_eq!(values(&logits), expected, "{name}: forward_saving");
            assert_eq!(saved.batch(), 2);
            assert!(saved.bytes() > 0);
            for section in m.sections().unwrap() {
                let resumed = values(&m.forward_from(section.start, &saved).unwrap());
                assert_eq!(resumed, expected, "{name}: from {}", section.start);
            }
        }
    }

    #[test]
    fn sections_hold_every_layer_once_in_checkpoint_order() {
        let m = fixture("tiny_a");
        let sections = m.sections().unwrap();
        let layers: Vec<String> = sections.iter().flat_map(|s| s.layers.clone()).collect();
        let expected: Vec<String> = m.layers().into_iter().map(|l| l.name).collect();
        assert_eq!(layers, expected);
        assert_eq!(sections[0].path, "segformer.encoder.patch_embeddings.0");
        assert_eq!(sections[0].start, ResumePoint::Stage { stage: 0 });
        assert_eq!(sections[1].path, "segformer.encoder.block.0.0");
        assert_eq!(sections.last().unwrap().path, "decode_head");
        assert!(sections.windows(2).all(|w| w[0].start < w[1].start), "forward order");
        assert!(ResumePoint::Block { stage: 0, block: 5 } < ResumePoint::Stage { stage: 1 });
        assert!(ResumePoint::Stage { stage: 3 } < ResumePoint::Head);
    }

    /// A model whose only quantized layer is in block `b` (or the head) computes, from the float model's saved
    /// activations at that block, exactly the logits of its own full pass.
    #[test]
    fn a_model_changed_from_a_point_on_resumes_there_bit_for_bit() {
        let float = fixture("tiny_a");
        let input = pixels(40, 44);
        let float_logits = values(&float.forward(&input).unwrap());
        let (_, saved) = float.forward_saving(&input).unwrap();
        let sections = float.sections().unwrap();
        for section in [&sections[1], &sections[sections.len() / 2], sections.last().unwrap()] {
            let layer = section.layers.last().unwrap();
            let mut recipe = Recipe::level_default(Level::F32);
            recipe.rules = vec![LayerRule::new(format!("{layer}.weight"), Level::Int2)];
            let (quantized, _) = model::quantize(&float, &recipe).unwrap();
            let full = values(&quantized.forward(&input).unwrap());
            assert_ne!(full, float_logits, "{layer}: int2 changes the logits");
            let resumed = values(&quantized.forward_from(section.start, &saved).unwrap());
            assert_eq!(resumed, full, "{layer} from {}", section.start);
        }
    }
}
