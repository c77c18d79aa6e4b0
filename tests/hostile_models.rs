//! Hostile models, configs and size flags: every case is a real model folder (the tiny fixture, copied) with one
//! thing broken or lying, run through the `segq` binary under the hostile-suite harness. Each must be refused with
//! one line naming the file and the key or tensor, within bounded memory; or, where segq accepts the input (NaN
//! weights), warn naming the tensor.

mod hostile_support;

use std::path::{Path, PathBuf};

use hostile_support::*;
use serde_json::{Value, json};

/// `tests/fixtures/models/<name>` copied into a fresh folder for `case`.
fn model_copy(case: &str, name: &str) -> PathBuf {
    let dir = scratch(case).join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixtures().join("models").join(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The tiny fixture with `config.json` changed by `edit`.
fn with_config(case: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> PathBuf {
    let dir = model_copy(case, "tiny_a");
    let path = dir.join("config.json");
    let mut config = read_json(&path);
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, config.to_string()).unwrap();
    dir
}

/// The tiny fixture with `preprocessor_config.json`'s `size` replaced.
fn with_size(case: &str, size: Value) -> PathBuf {
    let dir = model_copy(case, "tiny_a");
    let path = dir.join("preprocessor_config.json");
    let mut pre = read_json(&path);
    pre["size"] = size;
    std::fs::write(&path, pre.to_string()).unwrap();
    dir
}

fn image() -> String {
    fixtures().join("images/small_23x19.png").display().to_string()
}

/// `segq predict --model DIR IMAGE --out <scratch>`.
fn predict(case: &str, dir: &Path) -> Outcome {
    let out = scratch(&format!("{case}-out"));
    segq(
        case,
        &[
            "predict",
            "--model",
            dir.to_str().unwrap(),
            &image(),
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .run()
}

/// The tensors of a safetensors file: (name, dtype, shape, bytes), in file order, and its metadata.
type Tensors = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

fn read_tensors(path: &Path) -> (Tensors, Option<std::collections::HashMap<String, String>>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut tensors: Tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    (tensors, meta.metadata().clone())
}

fn write_tensors(path: &Path, tensors: &Tensors, metadata: Option<std::collections::HashMap<String, String>>) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, metadata).unwrap()).unwrap();
}

/// The tiny fixture with its tensors changed by `edit` (a valid safetensors file with other contents).
fn with_tensors(case: &str, edit: impl FnOnce(&mut Tensors)) -> PathBuf {
    let dir = model_copy(case, "tiny_a");
    let path = dir.join("model.safetensors");
    let (mut tensors, meta) = read_tensors(&path);
    edit(&mut tensors);
    write_tensors(&path, &tensors, meta);
    dir
}

/// The tiny fixture with the raw JSON header of `model.safetensors` changed by `edit` (data unchanged).
fn with_header(case: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> PathBuf {
    let dir = model_copy(case, "tiny_a");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(header.as_object_mut().unwrap());
    let text = header.to_string();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
    dir
}

/// A segq int4 checkpoint of the tiny fixture, written by the library, with its tensors and metadata then
/// changed by `edit`.
fn quantized_with(
    case: &str,
    edit: impl FnOnce(&mut Tensors, &mut std::collections::HashMap<String, String>),
) -> PathBuf {
    let dir = scratch(case).join("int4");
    let loaded = segq::model::load(&segq::model::ModelSource::Local(fixtures().join("models/tiny_a"))).unwrap();
    let recipe = segq::quant::Recipe::level_default(segq::quant::Level::Int4);
    let (quantized, _) = segq::model::quantize(&loaded.model, &recipe).unwrap();
    segq::model::checkpoint::save_quantized(
        &quantized,
        &recipe,
        &loaded.config_json,
        loaded.preprocessor_json.as_deref(),
        &dir,
    )
    .unwrap();
    let path = dir.join("model.safetensors");
    let (mut tensors, meta) = read_tensors(&path);
    let mut meta = meta.unwrap();
    edit(&mut tensors, &mut meta);
    write_tensors(&path, &tensors, Some(meta));
    dir
}

/// Edits one weight's entry of a quantized checkpoint's `quantization_map`.
fn edit_quant_map(
    meta: &mut std::collections::HashMap<String, String>,
    weight: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) {
    let key = segq::quant::MAP_METADATA_KEY;
    let mut map: Value = serde_json::from_str(&meta[key]).unwrap();
    edit(map[weight].as_object_mut().unwrap());
    meta.insert(key.to_string(), map.to_string());
}

const QUERY: &str = "segformer.encoder.block.0.0.attention.self.query";

// ---------------------------------------------------------------------------------------------------------------
// config.json

#[test]
fn depths_of_a_billion_are_refused_before_allocating() {
    let dir = with_config("depths-billion", |c| {
        c.insert("depths".into(), json!([1_000_000_000u64, 1, 1, 1]));
    });
    predict("depths-billion", &dir).refused(&["config.json", "depths"]);
}

#[test]
fn depths_of_two_to_the_62_are_refused() {
    let dir = with_config("depths-2e62", |c| {
        c.insert("depths".into(), json!([1u64 << 62, 1, 1, 1]));
    });
    predict("depths-2e62", &dir).refused(&["config.json", "depths"]);
}

#[test]
fn zero_depth_is_refused() {
    let dir = with_config("depths-zero", |c| {
        c.insert("depths".into(), json!([0, 1, 1, 1]));
    });
    predict("depths-zero", &dir).refused(&["config.json", "depths"]);
}

#[test]
fn negative_depth_is_refused() {
    let dir = with_config("depths-negative", |c| {
        c.insert("depths".into(), json!([-1, 1, 1, 1]));
    });
    predict("depths-negative", &dir).refused(&["config.json", "depths"]);
}

#[test]
fn depths_list_of_the_wrong_length_is_refused() {
    let dir = with_config("depths-length", |c| {
        c.insert("depths".into(), json!([1, 1, 1]));
    });
    predict("depths-length", &dir).refused(&["config.json", "depths"]);
}

#[test]
fn depths_that_lie_about_the_checkpoint_are_refused() {
    let dir = with_config("depths-lie", |c| {
        c.insert("depths".into(), json!([1, 1, 3, 1]));
    });
    predict("depths-lie", &dir).refused(&["config.json", "depths", "stage 2"]);
}

#[test]
fn depths_of_the_wrong_type_are_refused() {
    let dir = with_config("depths-type", |c| {
        c.insert("depths".into(), json!("four"));
    });
    predict("depths-type", &dir).refused(&["config.json", "depths"]);
}

#[test]
fn hidden_size_not_divisible_by_heads_is_refused() {
    let dir = with_config("heads-divisible", |c| {
        c.insert("num_attention_heads".into(), json!([3, 1, 2, 4]));
    });
    predict("heads-divisible", &dir).refused(&["config.json", "num_attention_heads"]);
}

#[test]
fn hidden_sizes_that_lie_about_the_checkpoint_are_refused() {
    let dir = with_config("hidden-lie", |c| {
        c.insert("hidden_sizes".into(), json!([16, 16, 24, 32]));
    });
    predict("hidden-lie", &dir).refused(&["config.json", "hidden_sizes"]);
}

#[test]
fn a_trillion_labels_are_refused() {
    let dir = with_config("labels-huge", |c| {
        c.remove("id2label");
        c.remove("label2id");
        c.insert("num_labels".into(), json!(1_000_000_000_000u64));
    });
    predict("labels-huge", &dir).refused(&["config.json", "num_labels"]);
}

#[test]
fn labels_that_lie_about_the_classifier_are_refused() {
    let dir = with_config("labels-lie", |c| {
        c.remove("id2label");
        c.remove("label2id");
        c.insert("num_labels".into(), json!(10));
    });
    predict("labels-lie", &dir).refused(&["config.json", "num_labels", "classifier"]);
}

#[test]
fn decoder_size_that_lies_is_refused() {
    let dir = with_config("decoder-lie", |c| {
        c.insert("decoder_hidden_size".into(), json!(4096));
    });
    predict("decoder-lie", &dir).refused(&["config.json", "decoder_hidden_size"]);
}

#[test]
fn ratios_and_patch_sizes_that_lie_are_refused() {
    for (key, value) in [
        ("mlp_ratios", json!([4, 4, 64, 4])),
        ("sr_ratios", json!([8, 4, 4, 1])),
        ("patch_sizes", json!([7, 3, 5, 3])),
    ] {
        let case = format!("lie-{key}");
        let dir = with_config(&case, |c| {
            c.insert(key.into(), value);
        });
        predict(&case, &dir).refused(&["config.json", key]);
    }
}

#[test]
fn a_config_larger_than_any_config_is_refused_unread() {
    let dir = model_copy("config-huge", "tiny_a");
    let mut text = vec![b' '; 17 << 20];
    text.extend_from_slice(b"{}");
    std::fs::write(dir.join("config.json"), text).unwrap();
    predict("config-huge", &dir).refused(&["config.json", "MiB"]);
}

// ---------------------------------------------------------------------------------------------------------------
// preprocessor_config.json

#[test]
fn a_processor_size_of_100000_is_refused() {
    let dir = with_size("size-huge", json!({"height": 100_000, "width": 100_000}));
    predict("size-huge", &dir).refused(&["preprocessor_config.json", "size"]);
}

#[test]
fn a_processor_size_of_zero_is_refused() {
    let dir = with_size("size-zero", json!({"height": 0, "width": 64}));
    predict("size-zero", &dir).refused(&["preprocessor_config.json", "size"]);
}

#[test]
fn a_negative_processor_size_is_refused() {
    let dir = with_size("size-negative", json!({"height": -64, "width": 64}));
    predict("size-negative", &dir).refused(&["preprocessor_config.json", "size"]);
}

#[test]
fn a_processor_size_of_the_wrong_type_is_refused() {
    let dir = with_size("size-type", json!("large"));
    predict("size-type", &dir).refused(&["preprocessor_config.json", "size"]);
}

// ---------------------------------------------------------------------------------------------------------------
// safetensors

#[test]
fn a_header_longer_than_the_file_is_refused() {
    let dir = model_copy("header-length", "tiny_a");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    predict("header-length", &dir).refused(&["model.safetensors", "header"]);
}

#[test]
fn a_header_that_lies_about_offsets_is_refused_naming_the_tensor() {
    let weight = format!("{QUERY}.weight");
    let dir = with_header("header-offsets", |h| {
        let offsets = h[&weight]["data_offsets"].as_array().unwrap().clone();
        let end = offsets[1].as_u64().unwrap();
        h[&weight]["data_offsets"] = json!([offsets[0], end + (1 << 30)]);
    });
    predict("header-offsets", &dir).refused(&["model.safetensors", &weight]);
}

#[test]
fn a_dtype_that_does_not_match_the_data_is_refused_naming_the_tensor() {
    let weight = format!("{QUERY}.weight");
    let dir = with_header("header-dtype", |h| {
        h[&weight]["dtype"] = json!("F64");
    });
    predict("header-dtype", &dir).refused(&["model.safetensors", &weight]);
}

#[test]
fn a_missing_tensor_is_refused_naming_it() {
    let bias = format!("{QUERY}.bias");
    let dir = with_tensors("tensor-missing", |t| t.retain(|(n, ..)| *n != bias));
    predict("tensor-missing", &dir).refused(&["model.safetensors", &bias]);
}

#[test]
fn a_missing_key_tensor_is_refused_naming_it() {
    let proj = "segformer.encoder.patch_embeddings.1.proj.weight";
    let dir = with_tensors("key-tensor-missing", |t| t.retain(|(n, ..)| n != proj));
    predict("key-tensor-missing", &dir).refused(&["model.safetensors", proj]);
}

#[test]
fn an_extra_tensor_is_refused_naming_it() {
    let dir = with_tensors("tensor-extra", |t| {
        t.push(("extra.weight".into(), safetensors::Dtype::F32, vec![2], vec![0; 8]));
    });
    predict("tensor-extra", &dir).refused(&["model.safetensors", "extra.weight"]);
}

#[test]
fn a_tensor_of_the_wrong_shape_is_refused_naming_it() {
    let weight = format!("{QUERY}.weight");
    let dir = with_tensors("tensor-shape", |t| {
        let entry = t.iter_mut().find(|(n, ..)| *n == weight).unwrap();
        assert_eq!(entry.2, vec![8, 8]);
        entry.2 = vec![4, 16];
    });
    predict("tensor-shape", &dir).refused(&["model.safetensors", &weight, "[4, 16]"]);
}

#[test]
fn nan_weights_are_loaded_with_a_warning_naming_the_tensor() {
    let weight = format!("{QUERY}.weight");
    let dir = with_tensors("tensor-nan", |t| {
        let entry = t.iter_mut().find(|(n, ..)| *n == weight).unwrap();
        entry.3[..8].copy_from_slice(&[f32::NAN.to_le_bytes(), f32::INFINITY.to_le_bytes()].concat());
    });
    segq("tensor-nan", &["inspect", "--model", dir.to_str().unwrap()])
        .run()
        .succeeded()
        .warns(&[&weight, "2 NaN or infinite"]);
}

#[test]
fn a_truncated_pytorch_checkpoint_is_refused() {
    let dir = model_copy("bin-truncated", "tiny_b_bin");
    let path = dir.join("pytorch_model.bin");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    predict("bin-truncated", &dir).refused(&["pytorch_model.bin"]);
}

#[test]
fn a_shard_index_pointing_outside_its_folder_is_refused() {
    let dir = model_copy("index-escape", "tiny_a");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        json!({"weight_map": {"a": "../../../etc/passwd"}}).to_string(),
    )
    .unwrap();
    predict("index-escape", &dir).refused(&["model.safetensors.index.json", "weight_map"]);
}

// ---------------------------------------------------------------------------------------------------------------
// quantized checkpoints

#[test]
fn a_quantized_checkpoint_lying_about_its_group_size_is_refused() {
    let weight = format!("{QUERY}.weight");
    let dir = quantized_with("quant-group", |_, meta| {
        edit_quant_map(meta, &weight, |m| {
            m.insert("group_size".into(), json!(3));
        });
    });
    predict("quant-group", &dir).refused(&["model.safetensors", &weight]);
}

#[test]
fn a_quantized_checkpoint_lying_about_its_bits_is_refused() {
    let weight = format!("{QUERY}.weight");
    let dir = quantized_with("quant-bits", |_, meta| {
        edit_quant_map(meta, &weight, |m| {
            m.insert("format".into(), json!("int2"));
        });
    });
    predict("quant-bits", &dir).refused(&["model.safetensors", &weight]);
}

#[test]
fn a_quantized_checkpoint_with_scales_of_the_wrong_shape_is_refused() {
    let scale = format!("{QUERY}.weight.scale");
    let dir = quantized_with("quant-scales", |t, _| {
        let entry = t.iter_mut().find(|(n, ..)| *n == scale).unwrap();
        let n: usize = entry.2.iter().product();
        entry.2 = vec![n];
    });
    predict("quant-scales", &dir).refused(&["model.safetensors", &scale]);
}

#[test]
fn nan_quantization_scales_are_loaded_with_a_warning_naming_the_tensor() {
    let scale = format!("{QUERY}.weight.scale");
    let dir = quantized_with("quant-nan", |t, _| {
        let entry = t.iter_mut().find(|(n, ..)| *n == scale).unwrap();
        let nan = match entry.1 {
            safetensors::Dtype::F16 => half::f16::NAN.to_le_bytes().to_vec(),
            _ => f32::NAN.to_le_bytes().to_vec(),
        };
        entry.3[..nan.len()].copy_from_slice(&nan);
    });
    segq("quant-nan", &["inspect", "--model", dir.to_str().unwrap()])
        .run()
        .succeeded()
        .warns(&[&scale, "1 NaN or infinite"]);
}

#[test]
fn quantize_writes_its_checkpoint_readable_by_all_like_every_other_file() {
    let out = scratch("quantize-mode").join("int8");
    segq(
        "quantize-mode",
        &[
            "quantize",
            "--model",
            fixtures().join("models/tiny_a").to_str().unwrap(),
            "--quant",
            "int8",
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .run()
    .succeeded();
    let umask = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022);
    use std::os::unix::fs::PermissionsExt;
    for name in ["model.safetensors", "config.json", "preprocessor_config.json"] {
        let mode = std::fs::metadata(out.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask, "{name} has mode {mode:o}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial") || n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// bench sizes

#[test]
fn bench_refuses_a_30000_pixel_side_at_once() {
    let outcome = segq(
        "bench-size",
        &["bench", "--size", "30000x30000", "--quant", "f32", "--iters", "1"],
    )
    .run();
    outcome.refused(&["--size", "30000x30000", "needs about"]);
}

#[test]
fn bench_refuses_a_batch_of_a_million_at_once() {
    let outcome = segq(
        "bench-batch",
        &["bench", "--batch-size", "1000000", "--quant", "f32", "--iters", "1"],
    )
    .run();
    outcome.refused(&["--batch-size", "needs about"]);
}
