//! Quantized checkpoints: `segq quantize --out DIR` writes a folder that `--model DIR` loads without float
//! weights, whose logits are bit-identical to the model quantized in memory, for every level and method; the folder
//! holds the original configs and the recipe, and is smaller than f32. Every level's logits stay finite, and int8 and
//! f8 stay within a stated relative error of f32.

mod common;
mod eval_support;

use std::path::{Path, PathBuf};

use eval_support::{scratch, segq_ok};
use segq::model::{self, ModelSource};
use segq::preprocess::Protocol;
use segq::quant::{Level, Method, Recipe};
use segq::segmenter::{ModelInput, forward_inputs};

/// Relative logits error (||L_q - L_f32|| / ||L_f32||, worst image) that int8 and float8 e4m3 must stay within.
/// tiny_a is a random-init model with 8..32 channels, so every rounding error weighs heavily; measured here:
/// int8 rtn 1.9e-2, hqq 1.7e-2, f8 5.9e-2 (quanto on the same model, other images: int8 1.3e-2, f8 6.1e-2,
/// docs/quanto-comparison.md). The trained demo model (SegFormer-B0 size) measured int8 2.7e-3 and f8 8.7e-3.
const TINY_INT8_MAX_REL_ERROR: f64 = 3e-2;
const TINY_F8_MAX_REL_ERROR: f64 = 1e-1;
const DEMO_INT8_F8_MAX_REL_ERROR: f64 = 2e-2;

const IMAGES: [&str; 3] = ["odd_37x53.png", "wide_101x45.png", "small_23x19.png"];

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path)
}

fn tiny_a() -> model::LoadedModel {
    model::load(&ModelSource::Local(fixture("models/tiny_a"))).unwrap()
}

/// The fixture images preprocessed as `segq predict` does.
fn inputs(loaded: &model::LoadedModel) -> Vec<ModelInput> {
    IMAGES
        .iter()
        .map(|name| {
            let image = segq::data::decode::read_rgb(&fixture(&format!("images/{name}"))).unwrap();
            ModelInput::new(&image, &loaded.preprocessor, Protocol::Transformers)
        })
        .collect()
}

fn logits(model: &segq::model::segformer::Segformer, input: &ModelInput) -> Vec<f32> {
    forward_inputs(model, &[input]).unwrap().remove(0).logits.data
}

fn relative_error(approx: &[f32], reference: &[f32]) -> f64 {
    let err: f64 = approx
        .iter()
        .zip(reference)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let norm: f64 = reference.iter().map(|a| (*a as f64).powi(2)).sum();
    (err / norm).sqrt()
}

fn recipes() -> Vec<Recipe> {
    let mut out = Vec::new();
    for level in [
        "f16", "bf16", "f8", "f8e5m2", "int8", "int8-dyn", "int4", "int4-dyn", "int2",
    ] {
        let level = Level::parse(level).unwrap();
        // int8-dyn and int4-dyn take rtn only here: their W8A8 kernels need symmetric weights, and hqq's are affine.
        let methods: &[&str] = if level.int_bits().is_some() && !level.dynamic_activations() {
            &["rtn", "hqq"]
        } else {
            &["rtn"]
        };
        for method in methods {
            out.push(Recipe::new(level, Method::parse(method).unwrap(), None, None, Vec::new()).unwrap());
        }
    }
    out
}

#[test]
fn every_level_and_method_reloads_bit_identical() {
    let loaded = tiny_a();
    let inputs = inputs(&loaded);
    let float: Vec<Vec<f32>> = inputs.iter().map(|x| logits(&loaded.model, x)).collect();
    let f32_bytes = loaded.weight_bytes() as u64;
    let dir = scratch("checkpoints");
    let mut table = Vec::new();
    let mut errors = Vec::new();
    let mut disk_by_label = std::collections::HashMap::new();
    for recipe in recipes() {
        let label = recipe.label();
        let (quantized, report) = model::quantize(&loaded.model, &recipe).unwrap();
        let out = dir.join(&label);
        let disk = segq::model::checkpoint::save_quantized(
            &quantized,
            &recipe,
            &loaded.config_json,
            loaded.preprocessor_json.as_deref(),
            &out,
        )
        .unwrap();
        let reloaded = model::load(&ModelSource::Local(out.clone())).unwrap();
        assert_eq!(
            reloaded.recipe.as_ref().map(|h| &h.recipe),
            Some(&recipe),
            "{label}: recipe read back"
        );
        let memory_bytes: usize = quantized.layers().iter().map(|l| l.weight_bytes + l.bias_bytes).sum();
        assert_eq!(reloaded.weight_bytes(), memory_bytes, "{label}: bytes in memory");
        assert!(
            disk < f32_bytes,
            "{label}: {disk} bytes on disk, f32 weights are {f32_bytes}"
        );
        let mut worst = 0f64;
        for (i, x) in inputs.iter().enumerate() {
            let memory = logits(&quantized, x);
            let disk_logits = logits(&reloaded.model, x);
            assert!(memory.iter().all(|v| v.is_finite()), "{label}: non-finite logits");
            let same = memory.iter().zip(&disk_logits).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{label} on {}: reloaded logits differ from the in-memory model",
                IMAGES[i]
            );
            worst = worst.max(relative_error(&memory, &float[i]));
        }
        table.push(format!(
            "{label:<16} {:>5.2} bits/weight, {disk:>7} B on disk, logits rel. error {worst:.2e}",
            report.bits_per_weight
        ));
        disk_by_label.insert(label.clone(), disk);
        errors.push((recipe.level.name(), label, worst));
    }
    // int4-dyn stores its codes two per byte (unpacked to int8 only in memory): a smaller checkpoint than int8-dyn.
    assert!(
        disk_by_label["int4-dyn-rtn"] < disk_by_label["int8-dyn-rtn"],
        "int4-dyn {} B on disk, int8-dyn {} B",
        disk_by_label["int4-dyn-rtn"],
        disk_by_label["int8-dyn-rtn"]
    );
    eprintln!("tiny_a, f32 weights {f32_bytes} B:\n{}", table.join("\n"));
    for (level, label, error) in errors {
        let bound = match level {
            "int8" | "int8-dyn" => TINY_INT8_MAX_REL_ERROR,
            "f8" => TINY_F8_MAX_REL_ERROR,
            "f16" | "bf16" => 1e-2,
            _ => continue,
        };
        assert!(
            error < bound,
            "{label}: logits relative error {error:.3e} above {bound:.0e}"
        );
    }
}

#[test]
fn int8_and_f8_stay_close_to_f32_on_the_demo_model() {
    let loaded = model::load(&ModelSource::Embedded).unwrap();
    let (image, _) = eval_support::demo_example(1);
    let image = image::load_from_memory(&image).unwrap().to_rgb8();
    let input = ModelInput::new(&image, &loaded.preprocessor, Protocol::Transformers);
    let float = logits(&loaded.model, &input);
    for level in ["int8", "f8"] {
        let recipe = Recipe::level_default(Level::parse(level).unwrap());
        let (quantized, _) = model::quantize(&loaded.model, &recipe).unwrap();
        let q = logits(&quantized, &input);
        assert!(q.iter().all(|v| v.is_finite()), "{level}: non-finite logits");
        let error = relative_error(&q, &float);
        eprintln!("demo model, {level}: logits relative error {error:.3e}");
        assert!(
            error < DEMO_INT8_F8_MAX_REL_ERROR,
            "{level}: logits relative error {error:.3e} above {DEMO_INT8_F8_MAX_REL_ERROR:.0e}"
        );
    }
}

#[test]
fn quantize_command_writes_a_checkpoint_that_predict_and_inspect_load() {
    let dir = scratch("quantize-cli");
    let checkpoint = dir.join("tiny_a-int4-hqq");
    segq_ok(&[
        "quantize",
        "--model",
        fixture("models/tiny_a").to_str().unwrap(),
        "--quant",
        "int4",
        "--method",
        "hqq",
        "--out",
        checkpoint.to_str().unwrap(),
    ]);

    // The folder: the original configs and a safetensors file whose metadata holds the recipe.
    for name in ["config.json", "preprocessor_config.json"] {
        assert_eq!(
            std::fs::read_to_string(checkpoint.join(name)).unwrap(),
            std::fs::read_to_string(fixture("models/tiny_a").join(name)).unwrap(),
            "{name} is copied unchanged"
        );
    }
    let bytes = std::fs::read(checkpoint.join("model.safetensors")).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = metadata.metadata().clone().expect("safetensors metadata");
    let recipe: serde_json::Value = serde_json::from_str(&metadata[segq::quant::RECIPE_METADATA_KEY]).unwrap();
    assert_eq!(recipe["label"], "int4-hqq-g64");
    assert_eq!(recipe["recipe"]["level"], "int4");
    assert_eq!(recipe["recipe"]["method"], "hqq");
    let f32_disk = std::fs::metadata(fixture("models/tiny_a/model.safetensors"))
        .unwrap()
        .len();
    assert!(
        (bytes.len() as u64) < f32_disk,
        "quantized file {} B, f32 file {f32_disk} B",
        bytes.len()
    );

    // `segq predict --model DIR --save-logits` gives the logits of the model quantized in memory, bit for bit.
    let predictions = dir.join("predict");
    let image = fixture("images/odd_37x53.png");
    segq_ok(&[
        "predict",
        "--model",
        checkpoint.to_str().unwrap(),
        "--save-logits",
        "--out",
        predictions.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    let npy = common::Npy::read(&predictions.join("odd_37x53.logits.npy")).f32s();
    let loaded = tiny_a();
    let recipe = Recipe::new(Level::parse("int4").unwrap(), Method::Hqq, None, None, Vec::new()).unwrap();
    let (quantized, _) = model::quantize(&loaded.model, &recipe).unwrap();
    let expected = logits(&quantized, &inputs(&loaded)[0]);
    assert_eq!(npy.len(), expected.len());
    assert!(
        npy.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()),
        "predict on the checkpoint differs from the in-memory int4-hqq model"
    );
    assert!(predictions.join("odd_37x53.mask.png").is_file());

    // `segq inspect --model DIR` lists the int4 formats, and the total is below f32's.
    let shown = segq_ok(&["inspect", "--model", checkpoint.to_str().unwrap(), "--json"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let layers = shown["layers"].as_array().unwrap();
    let int4 = layers
        .iter()
        .filter(|l| l["format"].as_str().is_some_and(|f| f.starts_with("int4")))
        .count();
    assert_eq!(int4, layers.len(), "every Linear/Conv layer is int4: {layers:?}");
    let table = segq_ok(&["inspect", "--model", checkpoint.to_str().unwrap()]);
    assert!(
        table.contains("int4-g64-affine") || table.contains("int4-affine"),
        "{table}"
    );
    // Evaluated as a model, its baseline row says what it is.
    let evaluated = dir.join("eval");
    segq_ok(&[
        "eval",
        "--model",
        checkpoint.to_str().unwrap(),
        "--quant",
        "f32",
        "--limit",
        "1",
        "--out",
        evaluated.to_str().unwrap(),
    ]);
    let results = segq::eval::results::EvalResults::read(&evaluated.join("results.json")).unwrap();
    let row = &results.levels[0];
    assert_eq!(row.method.to_string(), "as loaded (int4-hqq-g64)");
    assert_eq!(
        row.label, "int4-hqq-g64",
        "the reference row is labelled with the checkpoint's recipe, not f32"
    );
    assert_eq!(row.level, Level::Int4);
    assert!(
        row.agreement.is_none(),
        "the reference row is what the others agree with"
    );
    assert!(
        (row.ratio_to_f32 - 0.15).abs() < 0.1,
        "ratio to the float model's size: {}",
        row.ratio_to_f32
    );
    assert!(
        row.bits_per_weight > 4.0 && row.bits_per_weight < 8.0,
        "{}",
        row.bits_per_weight
    );
    assert!(row.metrics().is_some());

    quantized_checkpoint_rows(&checkpoint, &dir);

    let original = segq_ok(&[
        "inspect",
        "--model",
        fixture("models/tiny_a").to_str().unwrap(),
        "--json",
    ]);
    let original: serde_json::Value = serde_json::from_str(&original).unwrap();
    assert!(
        shown["total_weight_bytes"].as_u64().unwrap() * 3 < original["total_weight_bytes"].as_u64().unwrap(),
        "int4 weights are well under a third of f32"
    );
}

/// A quantized checkpoint evaluates as loaded, alone, by default; other levels asked for are refused (they would
/// round rounded weights) unless `--requantize`, whose rows say where they came from.
fn quantized_checkpoint_rows(checkpoint: &Path, dir: &Path) {
    let model = checkpoint.to_str().unwrap();
    let out = dir.join("eval-default");
    segq_ok(&["eval", "--model", model, "--limit", "1", "--out", out.to_str().unwrap()]);
    let results = segq::eval::results::EvalResults::read(&out.join("results.json")).unwrap();
    let labels: Vec<&str> = results.levels.iter().map(|l| l.label.as_str()).collect();
    assert_eq!(
        labels,
        ["int4-hqq-g64"],
        "the default level list shrinks to the checkpoint as loaded"
    );

    let refused = eval_support::segq_fails(&["eval", "--model", model, "--quant", "f32,int8", "--limit", "1"]);
    assert!(
        refused.contains("quantized checkpoint (int4-hqq-g64)")
            && refused.contains("int8-rtn")
            && refused.contains("--requantize"),
        "{refused}"
    );

    let out = dir.join("eval-requantize");
    segq_ok(&[
        "eval",
        "--model",
        model,
        "--quant",
        "f32,int8",
        "--method",
        "rtn",
        "--requantize",
        "--limit",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    let results = segq::eval::results::EvalResults::read(&out.join("results.json")).unwrap();
    let rows: Vec<(String, String)> = results
        .levels
        .iter()
        .map(|l| (l.label.clone(), l.method.to_string()))
        .collect();
    assert_eq!(
        rows,
        [
            ("int4-hqq-g64".to_string(), "as loaded (int4-hqq-g64)".to_string()),
            (
                "int8-rtn-requant".to_string(),
                "rtn, requantized from int4-hqq-g64".to_string()
            ),
        ]
    );
    assert!(
        results.levels[1].agreement.is_some(),
        "agreement with the checkpoint as loaded"
    );
    assert!(results.levels[1].bits_per_weight < 9.0);
}

#[test]
fn predict_quantizes_on_the_fly_like_a_checkpoint() {
    let dir = scratch("predict-quant");
    let image = fixture("images/odd_37x53.png");
    let model = fixture("models/tiny_a");
    let on_the_fly = dir.join("on-the-fly");
    segq_ok(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        "--quant",
        "int4",
        "--method",
        "hqq",
        "--group-size",
        "32",
        "--save-logits",
        "--out",
        on_the_fly.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    let checkpoint = dir.join("int4-hqq-g32");
    segq_ok(&[
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--quant",
        "int4",
        "--method",
        "hqq",
        "--group-size",
        "32",
        "--out",
        checkpoint.to_str().unwrap(),
    ]);
    let from_checkpoint = dir.join("from-checkpoint");
    segq_ok(&[
        "predict",
        "--model",
        checkpoint.to_str().unwrap(),
        "--save-logits",
        "--out",
        from_checkpoint.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    let float = dir.join("float");
    segq_ok(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        "--save-logits",
        "--out",
        float.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    let read = |d: &Path| common::Npy::read(&d.join("odd_37x53.logits.npy")).f32s();
    let (a, b, f) = (read(&on_the_fly), read(&from_checkpoint), read(&float));
    assert!(
        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
        "predict --quant int4 --method hqq differs from predict on the int4-hqq checkpoint"
    );
    assert!(a.iter().zip(&f).any(|(x, y)| x != y), "--quant changed nothing");

    let refused = eval_support::segq_fails(&[
        "predict",
        "--model",
        checkpoint.to_str().unwrap(),
        "--quant",
        "int8",
        "--out",
        dir.join("refused").to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    assert!(
        refused.contains("quantized checkpoint") && refused.contains("--requantize"),
        "{refused}"
    );
    let unknown = eval_support::segq_fails(&["predict", "--quant", "int3", image.to_str().unwrap()]);
    assert!(unknown.contains("int3"), "{unknown}");
}
