//! End-to-end tests of the `segq` binary: each bad input gives one clear line and a non-zero exit; the main
//! commands write what they promise.

mod common;
mod eval_support;

use std::path::Path;

use common::{fixtures, repo_root};
use eval_support::{scratch as tmp, segq, segq_fails};

/// Runs segq expecting failure; returns stderr, which must be a single `error:` line.
fn fails(args: &[&str]) -> String {
    let stderr = segq_fails(args);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "segq {args:?}: expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

const IMAGE: &str = "tests/fixtures/images/odd_37x53.png";

#[test]
fn missing_model_folder() {
    let e = fails(&["predict", "--model", "./no/such/model", IMAGE]);
    assert!(
        e.contains("no/such/model") && e.contains("no such file or folder"),
        "{e}"
    );
}

#[test]
fn malformed_config_json() {
    let dir = tmp("malformed");
    copy_dir(&fixtures().join("models/tiny_c"), &dir);
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"segformer\", ").unwrap();
    let e = fails(&["predict", "--model", dir.to_str().unwrap(), IMAGE]);
    assert!(e.contains("config.json") && e.contains("malformed config.json"), "{e}");
}

#[test]
fn unsupported_model_type() {
    let dir = tmp("bert");
    copy_dir(&fixtures().join("models/tiny_c"), &dir);
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"bert\"}").unwrap();
    let e = fails(&["inspect", "--model", dir.to_str().unwrap()]);
    assert!(e.contains("unsupported model_type \"bert\""), "{e}");
}

#[test]
fn wrongly_shaped_and_missing_tensors() {
    // tiny_c's weights with tiny_a's config: shapes differ; the message names the tensor and both shapes.
    let dir = tmp("shapes");
    copy_dir(&fixtures().join("models/tiny_c"), &dir);
    std::fs::copy(fixtures().join("models/tiny_a/config.json"), dir.join("config.json")).unwrap();
    let e = fails(&["inspect", "--model", dir.to_str().unwrap()]);
    assert!(
        e.contains("tensor `segformer.encoder.") && e.contains("has shape [") && e.contains("expects ["),
        "{e}"
    );

    // A config with one more block than the checkpoint holds: a missing tensor.
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("models/tiny_c/config.json")).unwrap()).unwrap();
    config["depths"][0] = serde_json::json!(2);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let e = fails(&["inspect", "--model", dir.to_str().unwrap()]);
    assert!(
        e.contains("checkpoint lacks tensor `segformer.encoder.block.0.1."),
        "{e}"
    );

    // One block fewer: unexpected tensors.
    config["depths"][0] = serde_json::json!(1);
    config["depths"][1] = serde_json::json!(1);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let e = fails(&["inspect", "--model", dir.to_str().unwrap()]);
    assert!(
        e.contains("unexpected tensor(s)") && e.contains("segformer.encoder.block.1.1."),
        "{e}"
    );
}

#[test]
fn undecodable_image() {
    let dir = tmp("badimage");
    let bad = dir.join("broken.jpg");
    std::fs::write(&bad, b"\xFF\xD8\xFF\xE0 not really a jpeg").unwrap();
    let e = fails(&[
        "predict",
        "--model",
        "tests/fixtures/models/tiny_c",
        bad.to_str().unwrap(),
    ]);
    assert!(e.contains("broken.jpg"), "{e}");
}

#[test]
fn hub_repo_not_cached_offline() {
    let cache = tmp("hubcache");
    let out = segq()
        .env("HF_HUB_CACHE", &cache)
        .args(["inspect", "--model", "nvidia/segformer-b0-finetuned-ade-512-512"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("HF_HUB_OFFLINE") && stderr.contains("nvidia/segformer-b0-finetuned-ade-512-512"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn hub_model_loads_from_a_populated_cache_offline() {
    // The cache layout transformers writes: models--owner--name/{refs/main, snapshots/<rev>/files}.
    let cache = tmp("hubcache-ok");
    let repo = cache.join("models--acme--tiny-segformer");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    copy_dir(&fixtures().join("models/tiny_c"), &repo.join("snapshots").join(rev));
    let out = segq()
        .env("HF_HUB_CACHE", &cache)
        .args(["inspect", "--json", "--model", "acme/tiny-segformer"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["config"]["hidden_sizes"], serde_json::json!([8, 16, 16, 24]));
}

#[test]
fn config_errors_name_key_and_line() {
    let dir = tmp("config");
    let file = dir.join("segq.toml");
    std::fs::write(&file, "[eval]\nbatch_size = 2\nbatchsize = 4\n").unwrap();
    let e = fails(&["--config", file.to_str().unwrap(), "config", "show"]);
    assert!(e.contains("line 3") && e.contains("batchsize"), "{e}");
    std::fs::write(&file, "[tracking]\napi_key = \"secret-value-123\"\n").unwrap();
    let e = fails(&["--config", file.to_str().unwrap(), "config", "show"]);
    assert!(e.contains("tracking.api_key") && !e.contains("secret-value-123"), "{e}");
}

#[test]
fn config_init_then_show_round_trips() {
    let dir = tmp("init");
    let file = dir.join("segq.toml");
    let out = segq()
        .args(["config", "init", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = segq()
        .args([
            "--config",
            file.to_str().unwrap(),
            "--set",
            "eval.batch_size=7",
            "config",
            "show",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("batch_size = 7") && shown.contains("[tracking]"),
        "{shown}"
    );
    let e = fails(&["config", "init", file.to_str().unwrap()]);
    assert!(e.contains("already exists"), "{e}");
}

#[test]
fn predict_writes_mask_overlay_and_logits() {
    let out_dir = tmp("predict");
    let out = segq()
        .args([
            "predict",
            "--model",
            "tests/fixtures/models/tiny_b_bin",
            "--save-logits",
            "--out",
        ])
        .arg(&out_dir)
        .arg(repo_root().join("tests/fixtures/images/wide_101x45.png"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mask = image::open(out_dir.join("wide_101x45.mask.png")).unwrap();
    assert_eq!((mask.width(), mask.height()), (101, 45));
    assert!(matches!(mask, image::DynamicImage::ImageLuma8(_)));
    let overlay = image::open(out_dir.join("wide_101x45.overlay.png")).unwrap();
    assert_eq!((overlay.width(), overlay.height()), (101, 45));
    // The saved logits equal the reference's shape: [num_labels, 72/4, 40/4].
    let npy = common::Npy::read(&out_dir.join("wide_101x45.logits.npy"));
    assert_eq!(npy.shape, vec![12, 18, 10]);
    let expected = common::Npy::read(&fixtures().join("reference/tiny_b_bin__wide_101x45.logits.npy"));
    let max_ref = expected.f32s().iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = npy
        .f32s()
        .iter()
        .zip(expected.f32s())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-4 * max_ref, "{diff}");
    // Every mask value is a class of the model.
    assert!(mask.to_luma8().pixels().all(|p| p.0[0] < 12));
}

#[test]
fn bench_image_reports_every_pipeline_stage() {
    let image = repo_root().join("assets/demo/ade/ADEChallengeData2016/images/validation/SYN_val_00000001.jpg");
    let out = segq()
        .args([
            "--threads",
            "2",
            "bench",
            "--model",
            "embedded",
            "--quant",
            "f32",
            "--iters",
            "2",
            "--warmup",
            "0",
        ])
        .arg("--image")
        .arg(&image)
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{report}");
    let row = &rows[0];
    assert_eq!(row["label"], "f32");
    assert_eq!(row["image_size"], serde_json::json!([309, 365]));
    for stage in ["decode_ms", "preprocess_ms", "forward_ms", "postprocess_ms", "write_ms"] {
        let ms = row["stages"][stage].as_f64().unwrap();
        assert!(ms > 0.0, "{stage}: {row}");
    }
    assert!(row["batching_ms"].is_null() && row["stages"]["batching_ms"].as_f64().unwrap() >= 0.0);
    let (total, fixed) = (row["total_ms"].as_f64().unwrap(), row["fixed_ms"].as_f64().unwrap());
    let forward = row["stages"]["forward_ms"].as_f64().unwrap();
    assert!(fixed > 0.0 && total > forward, "{row}");
    assert!(row["fixed_percent_of_forward"].as_f64().unwrap() > 0.0, "{row}");
    // The table names each stage.
    let out = segq()
        .args([
            "bench", "--model", "embedded", "--quant", "f32", "--iters", "1", "--warmup", "0",
        ])
        .arg("--image")
        .arg(&image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    for column in ["decode", "preproc", "forward", "postproc", "PNGs", "fixed %"] {
        assert!(table.contains(column), "{column}: {table}");
    }
    // The image is named once above the table, whose lines fit a 100-column terminal.
    assert!(
        table.contains("image: ") && table.contains("(309x365), model input"),
        "{table}"
    );
    let table_lines: Vec<&str> = table.lines().skip_while(|l| !l.starts_with("level")).collect();
    assert_eq!(table_lines.len(), 2, "{table}");
    assert!(table_lines.iter().all(|l| l.len() <= 100), "{table}");
}

#[test]
fn bench_image_names_a_missing_image() {
    let e = fails(&[
        "bench",
        "--model",
        "embedded",
        "--quant",
        "f32",
        "--image",
        "no/such/image.jpg",
    ]);
    assert!(e.contains("no/such/image.jpg"), "{e}");
}
