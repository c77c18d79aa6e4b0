//! Property tests of the parsers that read untrusted bytes: `config.json`, `preprocessor_config.json`, safetensors
//! headers (with segq's quantized-checkpoint metadata), `results.json` (what `segq merge` reads), `segq.toml` and list
//! files. Each gets arbitrary bytes and structured mutations of a valid input (numbers replaced by huge, zero,
//! negative or fractional ones, values by other types, lists truncated), and must never panic; every error must be
//! one line. 256 cases per property keep the suite fast.

use std::collections::HashMap;
use std::path::PathBuf;

use proptest::prelude::*;
use serde_json::{Value, json};

use segq::config::Config;
use segq::eval::results::EvalResults;
use segq::model::checkpoint::{StoredWeight, TensorStore};
use segq::model::config::SegformerConfig;
use segq::preprocess::PreprocessorConfig;
use segq::quant::{self, Level, Recipe};

fn cases() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// An error as a user sees it must be one line.
fn one_line(error: &segq::Error) -> std::result::Result<(), TestCaseError> {
    let text = error.to_string();
    prop_assert!(!text.contains(['\n', '\r']), "error is not one line: {text:?}");
    prop_assert!(!text.is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// JSON mutations

/// A value that a hostile or broken file might hold where a valid one expects something else.
fn hostile_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1)),
        Just(json!(2)),
        Just(json!(3)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1u64 << 62)),
        Just(json!(1u64 << 32)),
        Just(json!(1_000_000_000u64)),
        Just(json!(100_000)),
        Just(json!(1e300)),
        Just(json!(-1e300)),
        Just(json!(0.5)),
        any::<u64>().prop_map(|v| json!(v)),
        any::<i64>().prop_map(|v| json!(v)),
        (0u64..70).prop_map(|v| json!(v)),
        Just(json!(null)),
        Just(json!("x")),
        Just(json!("a\nb\rc")),
        Just(json!(true)),
        Just(json!([])),
        Just(json!([0])),
        Just(json!({})),
        Just(json!({"height": 0, "width": -5})),
    ]
}

/// Paths to every node of `value` (object keys and array indices), root excluded.
fn paths(value: &Value, prefix: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                prefix.push(PathStep::Key(k.clone()));
                out.push(prefix.clone());
                paths(v, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                prefix.push(PathStep::Index(i));
                out.push(prefix.clone());
                paths(v, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn node_mut<'a>(value: &'a mut Value, path: &[PathStep]) -> Option<&'a mut Value> {
    let mut node = value;
    for step in path {
        node = match step {
            PathStep::Key(k) => node.get_mut(k.as_str())?,
            PathStep::Index(i) => node.get_mut(*i)?,
        };
    }
    Some(node)
}

/// How one node is changed.
#[derive(Clone, Debug)]
enum Edit {
    Replace(Value),
    /// Arrays lose their tail; objects lose a key.
    Shrink,
    /// Arrays gain copies of their last entry.
    Grow(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        6 => hostile_value().prop_map(Edit::Replace),
        1 => Just(Edit::Shrink),
        1 => (1usize..6).prop_map(Edit::Grow),
    ]
}

/// Applies each `(node selector, edit)` to `base`: the selector picks a node among the current paths.
fn mutate(base: &Value, edits: &[(prop::sample::Index, Edit)]) -> Value {
    let mut value = base.clone();
    for (selector, edit) in edits {
        let mut all = Vec::new();
        paths(&value, &mut Vec::new(), &mut all);
        if all.is_empty() {
            value = match edit {
                Edit::Replace(v) => v.clone(),
                _ => value,
            };
            continue;
        }
        let path = &all[selector.index(all.len())];
        if let Some(node) = node_mut(&mut value, path) {
            match edit {
                Edit::Replace(v) => *node = v.clone(),
                Edit::Shrink => match node {
                    Value::Array(items) => {
                        items.pop();
                    }
                    Value::Object(map) => {
                        let first = map.keys().next().cloned();
                        if let Some(k) = first {
                            map.remove(&k);
                        }
                    }
                    _ => *node = Value::Null,
                },
                Edit::Grow(n) => {
                    if let Value::Array(items) = node
                        && let Some(last) = items.last().cloned()
                    {
                        items.extend(std::iter::repeat_n(last, *n));
                    }
                }
            }
        }
    }
    value
}

fn edits() -> impl Strategy<Value = Vec<(prop::sample::Index, Edit)>> {
    prop::collection::vec((any::<prop::sample::Index>(), edit()), 1..4)
}

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn demo_config() -> Value {
    serde_json::from_str(segq::model::embedded::CONFIG).unwrap()
}

fn demo_preprocessor() -> Value {
    serde_json::from_str(segq::model::embedded::PREPROCESSOR).unwrap()
}

/// A parsed config is usable: the memory estimate and its check run on any size without panicking.
fn exercise_config(config: &SegformerConfig, h: usize, w: usize, b: usize) -> std::result::Result<(), TestCaseError> {
    let _ = config.forward_bytes(h, w, b);
    if let Err(e) = segq::model::check_forward_memory(config, h, w, b, "--batch-size") {
        one_line(&e)?;
    }
    let _ = config.class_names();
    Ok(())
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn model_config_from_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Err(e) = SegformerConfig::from_json(&String::from_utf8_lossy(&bytes)) {
            one_line(&e)?;
        }
    }

    #[test]
    fn model_config_mutated(
        edits in edits(),
        h in 0usize..100_000,
        w in 0usize..100_000,
        b in 0usize..10_000,
    ) {
        let value = mutate(&demo_config(), &edits);
        match SegformerConfig::from_json(&value.to_string()) {
            Ok(config) => exercise_config(&config, h, w, b)?,
            Err(e) => one_line(&e)?,
        }
    }

    #[test]
    fn preprocessor_config_from_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Err(e) = PreprocessorConfig::from_json(&String::from_utf8_lossy(&bytes)) {
            one_line(&e)?;
        }
    }

    #[test]
    fn preprocessor_config_mutated(edits in edits()) {
        let value = mutate(&demo_preprocessor(), &edits);
        match PreprocessorConfig::from_json(&value.to_string()) {
            Ok(c) => {
                prop_assert!(c.size.height >= 1 && c.size.height <= segq::limits::MAX_INPUT_SIDE);
                prop_assert!(c.size.width >= 1 && c.size.width <= segq::limits::MAX_INPUT_SIDE);
            }
            Err(e) => one_line(&e)?,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// safetensors and quantized-checkpoint metadata

/// A small valid checkpoint: two float tensors and one int4-quantized weight `w` ([8, 64]) with segq's metadata.
fn base_safetensors() -> Vec<u8> {
    let recipe = Recipe::level_default(Level::Int4);
    let data: Vec<f32> = (0..8 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0).collect();
    let q = quant::quantize_weight("w", &data, 8, 64, &recipe).unwrap();
    let mut stored = q.to_tensors("w");
    let a: Vec<u8> = [1.0f32, -2.0, 3.5, 0.0, 7.0, 8.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    stored.push(("a".into(), safetensors::Dtype::F32, vec![2, 3], a));
    let b: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    stored.push(("b".into(), safetensors::Dtype::F16, vec![4], b));
    let metadata = quant::checkpoint_metadata(&recipe, &recipe.label(), [("w", &q)]).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = stored
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, Some(metadata)).unwrap()
}

/// Splits a safetensors file into its header (as JSON, the metadata's JSON strings parsed too) and its data.
fn split_safetensors(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    if let Some(Value::Object(meta)) = header.get_mut("__metadata__") {
        for v in meta.values_mut() {
            if let Value::String(s) = v {
                *v = serde_json::from_str(s).unwrap();
            }
        }
    }
    (header, bytes[8 + n..].to_vec())
}

/// The inverse of [`split_safetensors`]: metadata values go back to JSON strings (a string stays a string).
fn join_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut header = header.clone();
    if let Some(Value::Object(meta)) = header.get_mut("__metadata__") {
        for v in meta.values_mut() {
            if !v.is_string() {
                *v = Value::String(v.to_string());
            }
        }
    }
    let text = header.to_string();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Loads `bytes` as a checkpoint and takes its tensors as the model would; nothing may panic.
fn exercise_store(bytes: &[u8]) -> std::result::Result<(), TestCaseError> {
    let mut store = match TensorStore::from_safetensors_bytes("model.safetensors", bytes) {
        Ok(store) => store,
        Err(e) => return one_line(&e),
    };
    let _: Vec<&str> = store.names().collect();
    for name in ["a", "b", "w"] {
        let _ = store.shape_of(name);
    }
    for (name, shape) in [("w", vec![8usize, 64]), ("a", vec![2, 3]), ("b", vec![4])] {
        match store.weight(name, &shape) {
            Ok(StoredWeight::Quantized(q)) => {
                let _ = q.dequantize();
            }
            Ok(StoredWeight::Float(_)) => {}
            Err(e) => one_line(&e)?,
        }
    }
    if let Err(e) = store.finish() {
        one_line(&e)?;
    }
    Ok(())
}

/// Byte-level damage to a file.
#[derive(Clone, Debug)]
enum Damage {
    Flip(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    HeaderLength(u64),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        4 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Damage::Flip(i, b)),
        1 => any::<prop::sample::Index>().prop_map(Damage::Truncate),
        1 => prop_oneof![Just(0u64), Just(u64::MAX), Just(1 << 40), Just(7), any::<u64>()].prop_map(Damage::HeaderLength),
    ]
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn safetensors_from_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        exercise_store(&bytes)?;
    }

    #[test]
    fn safetensors_with_any_header(header in prop::collection::vec(any::<u8>(), 0..300), data in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&data);
        exercise_store(&bytes)?;
    }

    #[test]
    fn safetensors_damaged(damages in prop::collection::vec(damage(), 1..4)) {
        let mut bytes = base_safetensors();
        for d in &damages {
            if bytes.is_empty() {
                break;
            }
            match d {
                Damage::Flip(i, b) => {
                    let at = i.index(bytes.len());
                    bytes[at] ^= b | 1;
                }
                Damage::Truncate(i) => {
                    let at = i.index(bytes.len());
                    bytes.truncate(at);
                }
                Damage::HeaderLength(n) => {
                    if bytes.len() >= 8 {
                        bytes[..8].copy_from_slice(&n.to_le_bytes());
                    }
                }
            }
        }
        exercise_store(&bytes)?;
    }

    /// Valid files whose header (shapes, offsets, dtypes) or quantization metadata (bits, group size, rows, scales'
    /// layout) lies.
    #[test]
    fn safetensors_header_and_metadata_mutated(edits in edits()) {
        let (header, data) = split_safetensors(&base_safetensors());
        exercise_store(&join_safetensors(&mutate(&header, &edits), &data))?;
    }

    #[test]
    fn quantization_metadata_mutated(edits in edits()) {
        let (header, _) = split_safetensors(&base_safetensors());
        let meta = mutate(&header["__metadata__"], &edits);
        let Value::Object(meta) = meta else { return Ok(()) };
        let meta: HashMap<String, String> = meta
            .into_iter()
            .map(|(k, v)| (k, v.as_str().map(String::from).unwrap_or_else(|| v.to_string())))
            .collect();
        if let Err(e) = quant::read_checkpoint_metadata("model.safetensors", &meta) {
            one_line(&e)?;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// results.json, segq.toml, list files

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("segq-parsers-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A minimal valid results.json: one f32 level over 2 labels.
fn base_results() -> Value {
    json!({
        "segq_version": "0.1.0",
        "created_utc": "2026-01-01T00:00:00Z",
        "complete": true,
        "config": {},
        "model": {"source": "embedded", "num_labels": 2, "class_names": ["a", "b"], "parameters": 10,
                  "f32_weight_bytes": 40},
        "dataset": {"source": "demo", "split": "validation", "shard": null, "offset": 0, "limit": null,
                    "examples_total_selected": 2},
        "machine": {"cpu_model": "cpu", "logical_cores": 2, "threads": 2, "os": "linux"},
        "counts": {"read": 2, "evaluated": 2, "skipped": 0, "skip_reasons": []},
        "levels": [{
            "label": "f32", "level": "f32", "method": "none", "group_size": null, "bits_per_weight": 32.0,
            "status": {"state": "ok"},
            "confusion": {"num_labels": 2, "counts": [[5, 1, 0], [0, 3, 1], [0, 0, 0]]},
            "agreement": null, "weight_bytes_memory": 40, "weight_bytes_disk": null, "ratio_to_f32": 1.0,
            "load_time_s": 0.1, "quantize_time_s": 0.0, "peak_rss_bytes": 1000,
            "model_latency_ms": [1.0, 2.0], "pipeline_latency_ms": [2.0, 3.0], "wall_time_s": 0.5
        }, {
            "label": "int4", "level": "int4", "method": "rtn", "group_size": 64, "bits_per_weight": 4.5,
            "status": {"state": "ok"},
            "confusion": {"num_labels": 2, "counts": [[4, 2, 0], [1, 2, 1], [0, 0, 0]]},
            "agreement": {"num_labels": 2, "counts": [[5, 1, 0], [0, 4, 0], [0, 0, 0]]},
            "weight_bytes_memory": 12, "weight_bytes_disk": 14, "ratio_to_f32": 0.3,
            "load_time_s": 0.1, "quantize_time_s": 0.2, "peak_rss_bytes": 1000,
            "model_latency_ms": [1.0, 2.0], "pipeline_latency_ms": [2.0, 3.0], "wall_time_s": 0.5
        }]
    })
}

/// Reads `bytes` as a results file, then uses what it read as `segq merge` and the reports do.
fn exercise_results(dir: &std::path::Path, bytes: &[u8]) -> std::result::Result<(), TestCaseError> {
    let path = dir.join("results.json");
    std::fs::write(&path, bytes).unwrap();
    match EvalResults::read(&path) {
        Ok(results) => {
            for level in &results.levels {
                let _ = (level.miou(), level.model_median_ms(), level.images_per_s_pipeline());
                let _ = results.class_iou_delta(level);
            }
            if let Err(e) = segq::eval::merge::merge(vec![results.clone(), results]) {
                one_line(&e)?;
            }
        }
        Err(e) => one_line(&e)?,
    }
    Ok(())
}

/// A valid segq.toml with every key written out.
fn base_toml() -> String {
    Config::default().to_toml()
}

/// Replaces the `index`-th run of digits in `text` by `with`.
fn replace_number(text: &str, index: prop::sample::Index, with: &str) -> String {
    let bytes = text.as_bytes();
    let mut runs = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                i += 1;
            }
            runs.push((start, i));
        } else {
            i += 1;
        }
    }
    if runs.is_empty() {
        return text.to_string();
    }
    let (start, end) = runs[index.index(runs.len())];
    format!("{}{}{}", &text[..start], with, &text[end..])
}

fn hostile_toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("18446744073709551615".to_string()),
        Just("9223372036854775807".to_string()),
        Just("99999999999999999999999".to_string()),
        Just("1e400".to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("-inf".to_string()),
        Just("0.5".to_string()),
        Just("\"x\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        any::<i64>().prop_map(|v| v.to_string()),
    ]
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn results_from_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        exercise_results(&scratch("results-bytes"), &bytes)?;
    }

    #[test]
    fn results_mutated(edits in edits()) {
        let value = mutate(&base_results(), &edits);
        exercise_results(&scratch("results-mutated"), value.to_string().as_bytes())?;
    }

    #[test]
    fn toml_from_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Err(e) = Config::from_toml(&String::from_utf8_lossy(&bytes), "segq.toml") {
            one_line(&e)?;
        }
    }

    #[test]
    fn toml_with_hostile_numbers(
        changes in prop::collection::vec((any::<prop::sample::Index>(), hostile_toml_value()), 1..4),
    ) {
        let mut text = base_toml();
        for (index, with) in &changes {
            text = replace_number(&text, *index, with);
        }
        match Config::from_toml(&text, "segq.toml") {
            Ok(mut config) => {
                if let Err(e) = config.validate() {
                    one_line(&e)?;
                }
                let _ = config.to_toml();
                if let Err(e) = config.set("eval.batch_size=99999999999999") {
                    one_line(&e)?;
                }
            }
            Err(e) => one_line(&e)?,
        }
    }

    #[test]
    fn list_file_from_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let dir = scratch("list");
        let path = dir.join("list.txt");
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = segq::data::folders::list_file_pairs(&path) {
            one_line(&e)?;
        }
    }

    #[test]
    fn list_file_from_lines(lines in prop::collection::vec(
        prop::collection::vec(prop_oneof![
            Just("a.png"), Just("m.png"), Just("\t"), Just(" "), Just("#"), Just("\r"), Just("../x.png"),
            Just("/abs/y.png"), Just(""), Just("\u{0}"), Just("é.png"),
        ], 0..6).prop_map(|parts| parts.concat()),
        0..8,
    )) {
        let dir = scratch("list-lines");
        let path = dir.join("list.txt");
        std::fs::write(&path, lines.join("\n")).unwrap();
        if let Err(e) = segq::data::folders::list_file_pairs(&path) {
            one_line(&e)?;
        }
    }
}

/// The bases the mutations start from are valid: the properties above explore around real inputs.
#[test]
fn the_bases_are_valid() {
    SegformerConfig::from_json(&demo_config().to_string()).unwrap();
    PreprocessorConfig::from_json(&demo_preprocessor().to_string()).unwrap();
    let bytes = base_safetensors();
    let (header, data) = split_safetensors(&bytes);
    let mut store =
        TensorStore::from_safetensors_bytes("model.safetensors", &join_safetensors(&header, &data)).unwrap();
    assert!(matches!(
        store.weight("w", &[8, 64]).unwrap(),
        StoredWeight::Quantized(_)
    ));
    store.take("a", &[2, 3]).unwrap();
    store.take("b", &[4]).unwrap();
    store.finish().unwrap();
    let dir = scratch("bases");
    let path = dir.join("results.json");
    std::fs::write(&path, base_results().to_string()).unwrap();
    EvalResults::read(&path).unwrap();
    Config::from_toml(&base_toml(), "segq.toml").unwrap();
    let _ = manifest();
}
