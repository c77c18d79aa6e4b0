//! Segmenting images with a loaded model: the one chain image -> target size -> preprocess -> batch -> forward ->
//! logits -> upsample + argmax that `eval`, `predict`, `quantize --error-report`, the examples and the tests share.
//! [`Segmenter`] holds a model with its preprocessing; [`forward_inputs`] is the batched step the evaluation runner
//! calls per level on inputs preprocessed once.

use std::time::Instant;

use image::RgbImage;

use crate::model::LoadedModel;
use crate::model::segformer::Segformer;
use crate::preprocess::{self, PreprocessorConfig, Protocol};
use crate::{Error, Result};

/// A preprocessed image: normalised pixels `[3, height, width]` at the size the model runs on.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInput {
    pub pixels: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

impl ModelInput {
    /// Resizes and normalises `image` as `preprocessor` and `protocol` say (Pillow-exact resize).
    pub fn new(image: &RgbImage, preprocessor: &PreprocessorConfig, protocol: Protocol) -> ModelInput {
        let (width, height) =
            preprocess::target_size(preprocessor, protocol, image.width() as usize, image.height() as usize);
        ModelInput {
            pixels: preprocess::preprocess(image, preprocessor, protocol),
            height,
            width,
        }
    }
}

/// One image's logits `[classes, height, width]` at the model's output resolution (1/4 of its input).
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    pub data: Vec<f32>,
    pub classes: usize,
    pub height: usize,
    pub width: usize,
}

impl Logits {
    /// The class per pixel at `height x width`: bilinear upsampling (align_corners=False) fused with argmax, as
    /// transformers' post-processing does.
    pub fn mask(&self, height: usize, width: usize) -> Vec<u16> {
        preprocess::upsample_argmax(&self.data, self.classes, self.height, self.width, height, width)
    }

    /// The class per pixel at the logits' own resolution (ties to the lowest class, as torch.argmax).
    pub fn argmax(&self) -> Vec<u16> {
        let plane = self.height * self.width;
        (0..plane)
            .map(|p| {
                (0..self.classes).fold(0, |best, c| {
                    if self.data[c * plane + p] > self.data[best * plane + p] {
                        c
                    } else {
                        best
                    }
                }) as u16
            })
            .collect()
    }
}

/// Logits of one input with the forward time per image of the batch it ran in.
#[derive(Debug, Clone)]
pub struct TimedLogits {
    pub logits: Logits,
    pub forward_ms: f64,
}

/// Runs `model` over `inputs`, one batched forward pass per input size (in first-seen order), and returns each
/// input's logits in input order.
pub fn forward_inputs(model: &Segformer, inputs: &[&ModelInput]) -> Result<Vec<TimedLogits>> {
    let mut out: Vec<Option<TimedLogits>> = vec![None; inputs.len()];
    for group in group_by_size(inputs) {
        let (height, width) = (inputs[group[0]].height, inputs[group[0]].width);
        let mut pixels = Vec::with_capacity(group.iter().map(|&i| inputs[i].pixels.len()).sum());
        for &i in &group {
            pixels.extend_from_slice(&inputs[i].pixels);
        }
        let tensor = candle_core::Tensor::from_vec(pixels, (group.len(), 3, height, width), &candle_core::Device::Cpu)?;
        let start = Instant::now();
        let (mut flat, [_, classes, lh, lw]) = model.forward_flat(&tensor)?;
        let forward_ms = start.elapsed().as_secs_f64() * 1000.0 / group.len() as f64;
        let plane = classes * lh * lw;
        // Split from the back so that the first image keeps the buffer itself (one image: no copy at all).
        for (j, &i) in group.iter().enumerate().rev() {
            out[i] = Some(TimedLogits {
                logits: Logits {
                    data: if j == 0 {
                        std::mem::take(&mut flat)
                    } else {
                        flat.split_off(j * plane)
                    },
                    classes,
                    height: lh,
                    width: lw,
                },
                forward_ms,
            });
        }
    }
    out.into_iter()
        .map(|l| l.ok_or_else(|| Error::internal("an input got no logits")))
        .collect()
}

/// Indices of inputs grouped by (height, width), in first-seen order, so each group is one batched forward pass.
fn group_by_size(inputs: &[&ModelInput]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let same = |g: &&mut Vec<usize>| (inputs[g[0]].height, inputs[g[0]].width) == (input.height, input.width);
        match groups.iter_mut().find(same) {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    groups
}

/// A segmentation of one image: the logits and the mask at the image's own size (row-major, `width x height`).
#[derive(Debug, Clone)]
pub struct Prediction {
    pub logits: Logits,
    pub mask: Vec<u16>,
    pub width: usize,
    pub height: usize,
    pub forward_ms: f64,
}

/// A model with the preprocessing it was trained with: images in, predictions out.
pub struct Segmenter {
    model: Segformer,
    preprocessor: PreprocessorConfig,
    protocol: Protocol,
}

impl Segmenter {
    pub fn new(model: Segformer, preprocessor: PreprocessorConfig, protocol: Protocol) -> Segmenter {
        Segmenter {
            model,
            preprocessor,
            protocol,
        }
    }

    /// The loaded model (float, or quantized as its checkpoint is) with its own preprocessor configuration.
    pub fn from_loaded(loaded: LoadedModel, protocol: Protocol) -> Segmenter {
        Segmenter::new(loaded.model, loaded.preprocessor, protocol)
    }

    /// The loaded model quantized to `recipe` on the fly, as `segq eval` builds a level (an f32 recipe keeps it as
    /// loaded), with what quantizing it did. A quantized checkpoint is not quantized again unless `requantize`:
    /// its weights are already rounded, and the result would not be the level asked for.
    pub fn quantized(
        loaded: LoadedModel,
        recipe: &crate::quant::Recipe,
        requantize: bool,
        protocol: Protocol,
    ) -> Result<(Segmenter, Option<crate::model::QuantizeReport>)> {
        if recipe.is_float_baseline() {
            return Ok((Segmenter::from_loaded(loaded, protocol), None));
        }
        if let Some(header) = &loaded.recipe
            && !requantize
        {
            return Err(crate::Error::config(
                "--quant",
                format!(
                    "{} is a quantized checkpoint ({}); quantizing it to {} would round already-rounded weights. \
                     Pass the float model, or --requantize to do it anyway",
                    loaded.source,
                    header.label,
                    recipe.label()
                ),
            ));
        }
        let (model, report) = crate::model::quantize(&loaded.model, recipe)?;
        Ok((Segmenter::new(model, loaded.preprocessor, protocol), Some(report)))
    }

    pub fn model(&self) -> &Segformer {
        &self.model
    }

    pub fn preprocessor(&self) -> &PreprocessorConfig {
        &self.preprocessor
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The model input of `image`.
    pub fn prepare(&self, image: &RgbImage) -> ModelInput {
        ModelInput::new(image, &self.preprocessor, self.protocol)
    }

    /// Segments one image.
    pub fn predict(&self, image: &RgbImage) -> Result<Prediction> {
        Ok(self.predict_batch(std::slice::from_ref(image))?.remove(0))
    }

    /// Segments several images; images that resize to the same input size share a forward pass.
    pub fn predict_batch(&self, images: &[RgbImage]) -> Result<Vec<Prediction>> {
        let inputs: Vec<ModelInput> = images.iter().map(|image| self.prepare(image)).collect();
        let logits = forward_inputs(&self.model, &inputs.iter().collect::<Vec<_>>())?;
        Ok(images
            .iter()
            .zip(logits)
            .map(|(image, timed)| {
                let (width, height) = (image.width() as usize, image.height() as usize);
                Prediction {
                    mask: timed.logits.mask(height, width),
                    logits: timed.logits,
                    width,
                    height,
                    forward_ms: timed.forward_ms,
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(height: usize, width: usize) -> ModelInput {
        ModelInput {
            pixels: Vec::new(),
            height,
            width,
        }
    }

    #[test]
    fn inputs_group_by_size_in_first_seen_order() {
        let inputs = [input(4, 5), input(8, 8), input(4, 5), input(8, 8), input(2, 2)];
        let refs: Vec<&ModelInput> = inputs.iter().collect();
        assert_eq!(group_by_size(&refs), vec![vec![0, 2], vec![1, 3], vec![4]]);
    }

    #[test]
    fn argmax_takes_the_lowest_class_on_ties() {
        let logits = Logits {
            // 3 classes over 2 pixels: pixel 0 ties classes 1 and 2, pixel 1 is class 0.
            data: vec![0.0, 5.0, 1.0, 2.0, 1.0, 2.0],
            classes: 3,
            height: 1,
            width: 2,
        };
        assert_eq!(logits.argmax(), vec![1, 0]);
    }

    #[test]
    fn predict_batch_equals_predict_one_by_one() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let loaded = crate::model::load(&crate::model::ModelSource::Local(dir.join("models/tiny_a"))).unwrap();
        let segmenter = Segmenter::from_loaded(loaded, Protocol::Transformers);
        let images: Vec<RgbImage> = ["small_23x19.png", "wide_101x45.png", "small_23x19.png"]
            .iter()
            .map(|name| crate::data::decode::read_rgb(&dir.join("images").join(name)).unwrap())
            .collect();
        let batch = segmenter.predict_batch(&images).unwrap();
        for (image, batched) in images.iter().zip(&batch) {
            let one = segmenter.predict(image).unwrap();
            assert_eq!(
                (one.width, one.height),
                (image.width() as usize, image.height() as usize)
            );
            assert_eq!(one.mask, batched.mask);
            assert_eq!(one.logits.data.len(), batched.logits.data.len());
        }
    }
}
