//! SegFormer for semantic segmentation, mirroring transformers' `modeling_segformer.py`: the same modules, the same
//! weight names (`segformer.encoder.block.{i}.{j}.attention.self.query`, `decode_head.linear_fuse`, ...), the same
//! arithmetic (LayerNorm/BatchNorm eps 1e-5, bilinear upsampling in the decode head, exact GELU). [`Segformer`] owns
//! the module tree ([`encoder`], [`decode_head`]), its one walk ([`Node`]), the step that decides its kernels
//! ([`Segformer::prepare`]), passes that start part-way from saved activations ([`resume`]) and SmoothQuant's
//! migration of activation range into weights ([`smooth`]).

pub mod decode_head;
pub mod encoder;
pub mod resume;
pub mod smooth;

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;

pub use decode_head::{ComposedHead, DecodeHead};
pub use encoder::Encoder;
pub use resume::{ResumePoint, SavedActivations, Section};
pub use smooth::{SmoothReport, SmoothedNorm, smooth};

use super::config::SegformerConfig;
use super::layers::LayerInfo;
use super::plan::{Activations, AttentionKernel, MatMul};
use super::probe::Probe;
use super::tree::{Leaf, LeafMut, Node, NodeMut, Path, node};
use crate::quant::act::{ActCalib, ActFormat};
use crate::quant::{Level, ModelStats, StatsNeeds};
use crate::{Error, Result};

/// What [`Segformer::for_each_weight_mut`] calls: `(layer path, shape, weight)`.
pub(crate) type WeightVisitor<'v> = dyn FnMut(&Path, &[usize], &mut MatMul) -> Result<()> + 'v;

/// `SegformerForSemanticSegmentation`: encoder + decode head; logits at 1/4 of the input size.
///
/// Built by `model::load` or `model::quantize`, both of which end in [`Segformer::prepare`]; the fields are private
/// so the kernels and the composed decode head cannot fall out of step with the weights.
#[derive(Debug, Clone)]
pub struct Segformer {
    config: SegformerConfig,
    encoder: Encoder,
    decode_head: DecodeHead,
}

node!(Segformer, |s, p| { "segformer.encoder" => encoder, "decode_head" => decode_head });

impl Segformer {
    /// The module tree of `config` with every parameter zero and no plan: `model::load` fills it through the walk,
    /// then prepares it.
    pub(crate) fn new(config: &SegformerConfig) -> Segformer {
        Segformer {
            config: config.clone(),
            encoder: Encoder::new(config),
            decode_head: DecodeHead::new(config),
        }
    }

    pub fn config(&self) -> &SegformerConfig {
        &self.config
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    pub fn decode_head(&self) -> &DecodeHead {
        &self.decode_head
    }

    /// Decides every kernel for `level`, once: with int8 activations (`int8-dyn`, `int4-dyn`, `int8-static`) the
    /// symmetric per-channel integer weights of Linear layers and dense convolutions (int4 codes widened to int8) are
    /// packed for the W8A8 GEMM (quantizing inputs per row at run time, or with each layer's calibrated input
    /// scale), attention runs in int8, and the composed decode head is quantized too; the simulated levels
    /// fake-quantize those inputs before the float GEMM; otherwise weights run through the f32 GEMM (quantized ones
    /// dequantized per call). The composed head is rebuilt from the current weights. Returns how many weights run
    /// on W8A8.
    ///
    /// A static level needs an input scale on every Linear and dense convolution with a quantized weight (see
    /// [`Segformer::set_activation_scales`]); the first one without is an error naming it.
    pub(crate) fn prepare(&mut self, level: Level) -> Result<usize> {
        let activations = Activations::of_level(level);
        if activations.needs_input_scales()
            && let Some(layer) = self.first_layer_without_scale()
        {
            return Err(Error::invalid(
                format!("level {level}"),
                format!(
                    "layer `{layer}` has no input activation scale: {level} quantizes the input of every quantized \
                     Linear and dense convolution with a scale fixed by calibration (calibrate on a calibration set, \
                     or load a checkpoint saved with its scales)"
                ),
            ));
        }
        let mut w8a8 = 0;
        self.visit_mut(&Path::root(), &mut |_, leaf| {
            match leaf {
                LeafMut::Linear(l) => {
                    l.plan(activations);
                    w8a8 += matches!(l.weight(), MatMul::W8A8(_)) as usize;
                }
                LeafMut::Conv2d(c) => {
                    c.plan(activations);
                    w8a8 += matches!(c.weight(), MatMul::W8A8(_)) as usize;
                }
                LeafMut::Attention(kernel) => *kernel = AttentionKernel::for_activations(activations),
                LeafMut::LayerNorm(_) | LeafMut::BatchNorm2d(_) => {}
            }
            Ok(())
        })?;
        self.decode_head.compose(activations)?;
        tracing::debug!(level = %level, w8a8, "execution plan prepared");
        Ok(w8a8)
    }

    /// The first Linear or dense convolution (in checkpoint order) whose weight is quantized but whose input has no
    /// calibrated scale; layers whose input never exists at run time (`linear_fuse`, folded into the composed
    /// head's products) are not asked.
    fn first_layer_without_scale(&self) -> Option<String> {
        let mut missing = None;
        let _ = self.visit(&Path::root(), &mut |path, leaf| {
            let (weight, input, runs) = match leaf {
                Leaf::Linear(l) => (l.weight(), l.input_quant(), true),
                Leaf::Conv2d(c) => (c.weight(), c.input_quant(), c.is_dense()),
                _ => return Ok(()),
            };
            let quantized = !matches!(weight, MatMul::F32(_));
            if missing.is_none()
                && runs
                && quantized
                && input.scale().is_none()
                && path.as_str() != decode_head::FOLDED_LAYER
            {
                missing = Some(path.to_string());
            }
            Ok(())
        });
        missing
    }

    /// Sets the input activation scale of every Linear and Conv2d that `stats` has a histogram for (keyed by layer
    /// path, e.g. `segformer.encoder.block.0.0.attention.self.query`, `decode_head.classifier`): the threshold
    /// `calib` picks for `format` ([`crate::quant::act::AbsHistogram::threshold`]) divided by the format's largest
    /// code. Layers without statistics (depthwise convolutions, `linear_fuse`) keep no scale: float inputs. The
    /// scales take effect at the next `prepare` (`model::quantize` ends with one). Returns how many were set.
    ///
    /// Errors when a layer's statistics hold no histogram (captured without [`crate::quant::StatsNeeds`]'s
    /// `histogram`) or were gathered for another input width.
    pub fn set_activation_scales(&mut self, stats: &ModelStats, calib: ActCalib, format: ActFormat) -> Result<usize> {
        let mut set = 0;
        self.visit_mut(&Path::root(), &mut |path, leaf| {
            // `linear_fuse` is folded into the composed head's products: its input never exists at run time.
            if path.as_str() == decode_head::FOLDED_LAYER {
                return Ok(());
            }
            let Some(layer_stats) = stats.get(path.as_str()) else {
                return Ok(());
            };
            let cols = match &leaf {
                LeafMut::Linear(l) => l.shape()[1],
                LeafMut::Conv2d(c) if c.is_dense() => c.shape()[1..].iter().product(),
                _ => return Ok(()),
            };
            if layer_stats.cols != cols {
                return Err(Error::invalid(
                    path.as_str(),
                    format!(
                        "calibration statistics have {} input columns, the layer {cols}",
                        layer_stats.cols
                    ),
                ));
            }
            let histogram = layer_stats.histogram.as_ref().ok_or_else(|| {
                Error::invalid(
                    path.as_str(),
                    "calibration statistics hold no activation histogram (capture them with histograms for a \
                     static level)",
                )
            })?;
            let scale = format.scale_of(histogram.threshold(calib, format));
            match leaf {
                LeafMut::Linear(l) => l.set_input_scale(Some(scale)),
                LeafMut::Conv2d(c) => c.set_input_scale(Some(scale)),
                _ => {}
            }
            set += 1;
            Ok(())
        })?;
        tracing::debug!(calib = %calib, format = format.name(), layers = set, "activation scales set");
        Ok(set)
    }

    /// Every layer's calibrated input activation scale, by layer path (layers without one are left out).
    pub fn activation_scales(&self) -> std::collections::BTreeMap<String, f32> {
        let mut out = std::collections::BTreeMap::new();
        let _ = self.visit(&Path::root(), &mut |path, leaf| {
            let scale = match leaf {
                Leaf::Linear(l) => l.input_quant().scale(),
                Leaf::Conv2d(c) => c.input_quant().scale(),
                _ => None,
            };
            if let Some(s) = scale {
                out.insert(path.to_string(), s);
            }
            Ok(())
        });
        out
    }

    /// Logits [B, num_labels, H/4, W/4] for normalised pixels [B, 3, H, W].
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let maps = self.encoder.forward_maps(pixels, &mut |_, _| {})?;
        self.decode_head.forward_maps(&maps)
    }

    /// [`Segformer::forward`] as a flat NCHW vector and its dims `[B, num_labels, H/4, W/4]`, without copying the
    /// logits out of a tensor.
    pub fn forward_flat(&self, pixels: &Tensor) -> Result<(Vec<f32>, [usize; 4])> {
        let maps = self.encoder.forward_maps(pixels, &mut |_, _| {})?;
        self.decode_head.forward_maps_flat(&maps)
    }

    /// [`Segformer::forward`], calling `on_part(i, elapsed)` after encoder stage `i` and then after the decode head
    /// (`i` = number of stages) (`segq bench --profile`). Stage 0's time includes turning the pixels into tokens.
    pub fn forward_profiled(&self, pixels: &Tensor, on_part: &mut dyn FnMut(usize, Duration)) -> Result<Tensor> {
        let maps = self.encoder.forward_maps(pixels, on_part)?;
        let head = Instant::now();
        let logits = self.decode_head.forward_maps(&maps)?;
        on_part(maps.len(), head.elapsed());
        Ok(logits)
    }

    /// Bytes of all Linear/Conv2d weights and biases as currently stored (float, quantized or packed).
    pub fn weight_bytes(&self) -> usize {
        self.layers().iter().map(|l| l.weight_bytes + l.bias_bytes).sum()
    }

    /// Stored bits per Linear/Conv2d weight as the model is (scales and zero points included; float weights count 32).
    pub fn bits_per_weight(&self) -> f64 {
        let (bits, count) = self.layers().iter().fold((0.0, 0usize), |(bits, count), l| {
            let n: usize = l.shape.iter().product();
            (bits + l.bits_per_weight * n as f64, count + n)
        });
        bits / count.max(1) as f64
    }

    /// Every quantizable layer (Linear and Conv2d) with its weight-name prefix, in checkpoint order.
    pub fn layers(&self) -> Vec<LayerInfo> {
        let mut out = Vec::new();
        // The visitor cannot fail.
        let _ = self.visit(&Path::root(), &mut |path, leaf| {
            match leaf {
                Leaf::Linear(l) => out.push(l.info(path.as_str())),
                Leaf::Conv2d(c) => out.push(c.info(path.as_str())),
                Leaf::LayerNorm(_) | Leaf::BatchNorm2d(_) | Leaf::Attention(_) => {}
            }
            Ok(())
        });
        out
    }

    /// A copy of this model that records the inputs of every Linear and dense convolution while it runs, with the
    /// probes by layer path (see [`super::probe`]). The decode head runs in transformers' form, so its 1x1
    /// convolutions see their real inputs. Only for calibration: the copy is slower than the prepared model.
    pub fn with_probes(&self, needs: StatsNeeds, row_cap: usize) -> Result<(Segformer, super::probe::Probes)> {
        let mut copy = self.clone();
        let mut probes = Vec::new();
        copy.visit_mut(&Path::root(), &mut |path, leaf| {
            match leaf {
                LeafMut::Linear(l) => {
                    let probe = Arc::new(Probe::new(l.shape()[1], needs, row_cap));
                    l.set_probe(probe.clone());
                    probes.push((path.to_string(), probe));
                }
                LeafMut::Conv2d(c) => {
                    let probe = Arc::new(Probe::new(c.input_columns(), needs, row_cap));
                    if c.set_probe(probe.clone()) {
                        probes.push((path.to_string(), probe));
                    }
                }
                LeafMut::LayerNorm(_) | LeafMut::BatchNorm2d(_) | LeafMut::Attention(_) => {}
            }
            Ok(())
        })?;
        copy.decode_head.decompose();
        Ok((copy, probes))
    }

    /// Calls `f(layer path, shape, weight)` for every Linear and Conv2d weight. The kernels and the composed head
    /// are stale afterwards: the caller must [`Segformer::prepare`] the model again.
    pub(crate) fn for_each_weight_mut(&mut self, f: &mut WeightVisitor<'_>) -> Result<()> {
        self.visit_mut(&Path::root(), &mut |path, leaf| {
            for (_, param) in leaf.params_mut() {
                if let super::layers::ParamMut::Weight(weight, shape) = param {
                    f(path, shape, weight)?;
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::plan::Columns;
    use crate::model::save::{StateTensor, state_dict};
    use crate::model::{self, ModelSource};
    use crate::quant::{Level, Recipe};
    use candle_core::Device;

    /// A fixture model from tests/fixtures/models (the resume tests load theirs here too).
    pub(super) fn fixture(name: &str) -> Segformer {
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
        let stage = &dynamic.encoder.stages[0];
        let a = &stage.block[0].attention.self_attention;
        assert!(matches!(a.query.weight(), MatMul::W8A8(_)), "query packed for the GEMM");
        assert_eq!(a.kernel, AttentionKernel::Int8);
        assert!(matches!(dynamic.decode_head.classifier.weight(), MatMul::W8A8(_)));
        assert!(matches!(stage.block[0].mlp.dwconv.weight(), MatMul::Dequant(_)));
        let proj = &stage.patch_embeddings.proj;
        let (k, in_c) = (proj.shape()[2], proj.shape()[1]);
        assert!(
            matches!(proj.weight(), MatMul::W8A8(p) if p.columns() == Columns::Patch { kernel: k, in_channels: in_c }),
            "patch embedding packed in patch order for the int8 im2col GEMM"
        );
        let wo = &weight_only.encoder.stages[0].block[0].attention.self_attention;
        assert!(matches!(wo.query.weight(), MatMul::Dequant(_)));
        assert_eq!(wo.kernel, AttentionKernel::F32);
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
            state_dict(m)
                .into_iter()
                .filter_map(|(k, t)| match t {
                    StateTensor::Quantized(q) => Some((k, q.data.clone(), q.scales.clone())),
                    StateTensor::Float { .. } => None,
                })
                .collect()
        };
        let (a, b) = (stored(&weight_only), stored(&dynamic));
        assert!(!a.is_empty());
        assert_eq!(a, b, "int8-dyn saves exactly the int8 codes and scales");
    }

    /// Re-preparing a prepared model for another level changes only its kernels, and back again restores them.
    #[test]
    fn prepare_switches_kernels_both_ways() {
        let m = fixture("tiny_a");
        let input = pixels(40, 36);
        let (mut q, _) = model::quantize(&m, &Recipe::level_default(Level::Int8Dyn)).unwrap();
        let dyn_logits = values(&q.forward(&input).unwrap());
        let dyn_layers = q.layers();
        assert_eq!(q.prepare(Level::Int8).unwrap(), 0, "weight-only: nothing on W8A8");
        let (weight_only, _) = model::quantize(&m, &Recipe::level_default(Level::Int8)).unwrap();
        assert_eq!(
            values(&q.forward(&input).unwrap()),
            values(&weight_only.forward(&input).unwrap())
        );
        assert!(q.prepare(Level::Int8Dyn).unwrap() > 0);
        assert_eq!(values(&q.forward(&input).unwrap()), dyn_logits);
        let formats = |l: &[LayerInfo]| l.iter().map(|l| l.format.clone()).collect::<Vec<_>>();
        assert_eq!(formats(&q.layers()), formats(&dyn_layers));
    }

    /// Histograms of the fixture's layer inputs on two synthetic images other than the ones the tests evaluate.
    fn calibration_stats(m: &Segformer) -> crate::quant::ModelStats {
        let needs = crate::quant::StatsNeeds {
            hessian: false,
            histogram: true,
        };
        let batches = [pixels(48, 56), pixels(40, 64)].map(Ok);
        crate::model::probe::capture(m, needs, usize::MAX, batches).unwrap()
    }

    #[test]
    fn observed_histograms_cover_the_layers_a_static_level_quantizes() {
        let m = fixture("tiny_a");
        let stats = calibration_stats(&m);
        for layer in [
            "segformer.encoder.patch_embeddings.0.proj",
            "segformer.encoder.block.0.0.attention.self.query",
            "segformer.encoder.block.0.0.mlp.dense2",
            "decode_head.linear_c.0.proj",
            "decode_head.linear_c.1.proj",
            "decode_head.classifier",
        ] {
            let s = stats.get(layer).unwrap_or_else(|| panic!("no statistics for {layer}"));
            let h = s.histogram.as_ref().unwrap();
            assert!(h.count > 0 && h.max > 0.0 && s.rows > 0, "{layer}: {h:?}");
            if !layer.contains("proj") || layer.contains("linear_c") {
                // A Linear's (or 1x1 conv's) histogram is of exactly its input matrix.
                assert_eq!(h.count, s.rows * s.cols as u64, "{layer}");
            }
        }
        use crate::quant::act::{ActCalib, ActFormat};
        for (layer, s) in &stats {
            let h = s.histogram.as_ref().unwrap();
            let t: Vec<String> = [ActCalib::Percentile(99.99), ActCalib::Mse, ActCalib::Entropy]
                .iter()
                .map(|&c| format!("{c} {:.3}", h.threshold(c, ActFormat::Int8)))
                .collect();
            eprintln!("{layer}: max {:.3}, {}", h.max, t.join(", "));
        }
        assert!(!stats.contains_key("segformer.encoder.block.0.0.mlp.dwconv.dwconv"));
        // `linear_fuse` is recorded (GPTQ needs it) but gets no scale: its input is folded away at run time.
        assert!(stats.contains_key(decode_head::FOLDED_LAYER));
        // The classifier reads the ReLU output: non-negative, so its histogram is of the values themselves.
        assert!(stats.keys().all(|k| !k.contains("layer_norm")));
    }

    #[test]
    fn int8_static_runs_the_int8_gemm_with_calibrated_scales_close_to_f32_and_int8_dyn() {
        use crate::quant::act::ActCalib;
        let m = fixture("tiny_a");
        let stats = calibration_stats(&m);
        let input = pixels(64, 64);
        let f32_logits = values(&m.forward(&input).unwrap());
        let (dynamic, _) = model::quantize(&m, &Recipe::level_default(Level::Int8Dyn)).unwrap();
        let dyn_logits = values(&dynamic.forward(&input).unwrap());
        let recipe = Recipe::level_default(Level::Int8Static);
        for calib in [
            ActCalib::MinMax,
            ActCalib::Percentile(99.99),
            ActCalib::Mse,
            ActCalib::Entropy,
        ] {
            let (q, report) = model::quantize_static(&m, &recipe, &stats, calib).unwrap();
            assert_eq!(report.label, "int8-static-rtn");
            let stage = &q.encoder.stages[0];
            let a = &stage.block[0].attention.self_attention;
            let query_scale = a.query.input_quant().scale().unwrap();
            assert!(
                matches!(a.query.weight(), MatMul::W8A8(p) if p.act_scale() == Some(query_scale)),
                "{calib}: query on the int8 GEMM with its static scale"
            );
            assert_eq!(
                a.kernel,
                AttentionKernel::Int8,
                "attention products per row, as int8-dyn"
            );
            let proj = &stage.patch_embeddings.proj;
            assert!(matches!(proj.weight(), MatMul::W8A8(p) if p.act_scale().is_some()));
            let classifier = &q.decode_head.classifier;
            assert!(matches!(classifier.weight(), MatMul::W8A8(p) if p.act_scale().is_some()));
            assert!(matches!(stage.block[0].mlp.dwconv.weight(), MatMul::Dequant(_)));
            assert!(stage.block[0].mlp.dwconv.input_quant().scale().is_none());
            let logits = values(&q.forward(&input).unwrap());
            let (vs_f32, vs_dyn) = (rel_diff(&logits, &f32_logits), rel_diff(&logits, &dyn_logits));
            eprintln!("int8-static {calib}: vs f32 {vs_f32:.4}, vs int8-dyn {vs_dyn:.4}");
            assert!(vs_dyn > 0.0, "{calib}: the static scales changed nothing");
            assert!(
                vs_f32 < 0.08 && vs_dyn < 0.08,
                "{calib}: vs f32 {vs_f32}, vs int8-dyn {vs_dyn}"
            );
            // The composed head runs each stage at linear_c.i.proj's scale: the reference head agrees closely.
            let features = q.encoder.forward(&input).unwrap();
            let composed = values(&q.decode_head.forward(&features).unwrap());
            let reference = values(&q.decode_head.forward_reference(&features).unwrap());
            let head = rel_diff(&composed, &reference);
            assert!(head < 0.08, "{calib}: composed static head vs reference {head}");
        }
        // The same codes with per-row scales: re-preparing for int8-dyn gives int8-dyn's logits exactly.
        let (mut q, _) = model::quantize_static(&m, &recipe, &stats, ActCalib::MinMax).unwrap();
        let static_logits = values(&q.forward(&input).unwrap());
        q.prepare(Level::Int8Dyn).unwrap();
        assert_eq!(values(&q.forward(&input).unwrap()), dyn_logits);
        q.prepare(Level::Int8Static).unwrap();
        assert_eq!(values(&q.forward(&input).unwrap()), static_logits);
    }

    #[test]
    fn a_static_level_without_scales_names_the_first_layer_missing_one() {
        let m = fixture("tiny_a");
        for level in [Level::Int8Static, Level::W8A8F8, Level::W4A8] {
            let e = model::quantize(&m, &Recipe::level_default(level))
                .unwrap_err()
                .to_string();
            // Without calibration: one line saying what to pass.
            assert!(
                e.contains("fixes activation scales from calibration") && e.contains("--calib"),
                "{level}: {e}"
            );
        }
        // Statistics of one layer only: the next quantized one is named.
        let mut stats = calibration_stats(&m);
        stats.retain(|k, _| k == "segformer.encoder.patch_embeddings.0.proj");
        let e = model::quantize_static(
            &m,
            &Recipe::level_default(Level::Int8Static),
            &stats,
            crate::quant::act::ActCalib::MinMax,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`segformer.encoder.block.0.0.attention.self.query` has no input"),
            "{e}"
        );
        // Statistics without histograms, or of another width, are refused by name.
        let mut stats = calibration_stats(&m);
        stats.get_mut("decode_head.classifier").unwrap().histogram = None;
        let mut m2 = m.clone();
        let fmt = crate::quant::act::ActFormat::Int8;
        let e = m2
            .set_activation_scales(&stats, crate::quant::act::ActCalib::MinMax, fmt)
            .unwrap_err()
            .to_string();
        assert!(e.contains("decode_head.classifier") && e.contains("histogram"), "{e}");
        let mut stats = calibration_stats(&m);
        stats.get_mut("decode_head.classifier").unwrap().cols = 3;
        let e = m2
            .set_activation_scales(&stats, crate::quant::act::ActCalib::MinMax, fmt)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("decode_head.classifier") && e.contains("3 input columns"),
            "{e}"
        );
        // Weight-only levels need none; the f32 baseline neither.
        assert!(model::quantize(&m, &Recipe::level_default(Level::Int8)).is_ok());
    }

    #[test]
    fn simulated_levels_fake_quantize_inputs_before_the_float_gemm() {
        use crate::quant::act::{ActCalib, ActFormat};
        let m = fixture("tiny_a");
        let stats = calibration_stats(&m);
        let input = pixels(64, 64);
        let f32_logits = values(&m.forward(&input).unwrap());
        for (level, weights_only, format) in [
            (Level::W8A8F8, Level::F8E4m3, ActFormat::F8E4m3),
            (Level::W4A8, Level::Int4, ActFormat::Int8),
        ] {
            let recipe = Recipe::level_default(level);
            let (q, _) = model::quantize_static(&m, &recipe, &stats, ActCalib::Percentile(99.99)).unwrap();
            let (wo, _) = model::quantize(&m, &Recipe::level_default(weights_only)).unwrap();
            let a = &q.encoder.stages[0].block[0].attention.self_attention;
            assert!(matches!(a.query.weight(), MatMul::Dequant(_)), "{level}: float GEMM");
            assert_eq!(a.query.input_quant().simulated(), Some(format));
            assert_eq!(a.kernel, AttentionKernel::F32);
            assert_eq!(q.decode_head.classifier.input_quant().simulated(), Some(format));
            // Same weights as the weight-only level; only the simulated activations differ.
            let formats = |l: &[LayerInfo]| l.iter().map(|l| l.format.clone()).collect::<Vec<_>>();
            assert_eq!(formats(&q.layers()), formats(&wo.layers()));
            let logits = values(&q.forward(&input).unwrap());
            let wo_logits = values(&wo.forward(&input).unwrap());
            let (vs_wo, vs_f32) = (rel_diff(&logits, &wo_logits), rel_diff(&logits, &f32_logits));
            eprintln!("{level}: vs {weights_only} {vs_wo:.4}, vs f32 {vs_f32:.4}");
            assert!(vs_wo > 0.0, "{level}: activations were not quantized");
            assert!(vs_wo < 0.1, "{level} vs {weights_only}: {vs_wo}");
        }
    }

    #[test]
    fn int8_static_checkpoint_reloads_bit_identical_without_calibration_data() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny_a");
        let loaded = model::load(&ModelSource::Local(dir)).unwrap();
        let stats = calibration_stats(&loaded.model);
        let input = pixels(64, 64);
        for (level, calib) in [
            (Level::Int8Static, crate::quant::act::ActCalib::Entropy),
            (Level::W8A8F8, crate::quant::act::ActCalib::Mse),
            (Level::W4A8, crate::quant::act::ActCalib::MinMax),
        ] {
            let recipe = Recipe::level_default(level);
            let (q, _) = model::quantize_static(&loaded.model, &recipe, &stats, calib).unwrap();
            let scales = q.activation_scales();
            assert!(scales.contains_key("decode_head.classifier") && !scales.contains_key(decode_head::FOLDED_LAYER));
            let names: Vec<String> = state_dict(&q).into_iter().map(|(k, _)| k).collect();
            for layer in scales.keys() {
                assert!(
                    names.contains(&format!("{layer}.input_scale")),
                    "{level}: {layer}.input_scale saved"
                );
            }
            let out = std::env::temp_dir().join(format!("segq-static-{}-{}", level, std::process::id()));
            let _ = std::fs::remove_dir_all(&out);
            model::checkpoint::save_quantized(
                &q,
                &recipe,
                &loaded.config_json,
                loaded.preprocessor_json.as_deref(),
                &out,
            )
            .unwrap();
            let reloaded = model::load(&ModelSource::Local(out.clone())).unwrap();
            assert_eq!(reloaded.recipe.as_ref().map(|h| h.recipe.level), Some(level));
            assert_eq!(reloaded.model.activation_scales(), scales, "{level}");
            let a = values(&q.forward(&input).unwrap());
            let b = values(&reloaded.model.forward(&input).unwrap());
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{level}: reloaded logits differ"
            );
            let _ = std::fs::remove_dir_all(&out);
        }
    }

    /// The walk names every tensor a transformers checkpoint holds, and nothing else.
    #[test]
    fn the_walk_names_the_checkpoint_tensors() {
        let keys = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny_a_keys.txt"),
        )
        .unwrap();
        let mut expected: Vec<&str> = keys.lines().filter_map(|l| l.split('\t').next()).collect();
        expected.retain(|k| !k.ends_with("num_batches_tracked"));
        expected.sort();
        let m = fixture("tiny_a");
        let mut names: Vec<String> = state_dict(&m).into_iter().map(|(k, _)| k).collect();
        names.sort();
        assert_eq!(names, expected);
    }
}
