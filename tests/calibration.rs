//! Calibrated quantization end to end on the embedded demo: `segq eval` calibrates on images it does not evaluate
//! (and says so), the calibrated methods beat the calibration-free ones where issue 15 asks, the static levels and
//! SmoothQuant run from the same calibration, statistics are cached between runs, and a run that has no image left
//! to calibrate on fails with one line saying what to pass.

mod eval_support;

use std::path::Path;

use eval_support::{labels, level, results, scratch, segq, segq_fails, segq_ok};
use serde_json::Value;

const DEMO: &str = "assets/demo/ade/ADEChallengeData2016";

fn image(i: usize, kind: &str) -> String {
    let (folder, ext) = if kind == "image" {
        ("images", "jpg")
    } else {
        ("annotations", "png")
    };
    format!(
        "{}/{DEMO}/{folder}/validation/SYN_val_{i:08}.{ext}",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn eval_calibrates_on_held_out_images_and_reports_them() {
    let dir = scratch("calib-eval");
    let out = dir.join("run");
    let stdout = segq_ok(&[
        "eval",
        "--quant",
        "f32,int4",
        "--method",
        "rtn,gptq",
        "--offset",
        "4",
        "--limit",
        "3",
        "--calib",
        "embedded",
        "--calib-size",
        "3",
        "--set",
        "quant.calib_cache=false",
        "--set",
        "eval.samples=0",
        "--out",
        out.to_str().unwrap(),
    ]);
    let r = results(&out);
    assert_eq!(labels(&r), ["f32", "int4-rtn-g64", "int4-gptq-g64"]);
    let c = &r["calibration"];
    assert_eq!(c["images"], 3);
    assert_eq!(c["overlap"], 0);
    assert_eq!(c["dataset_rows"], 12);
    assert_eq!(c["statistics"]["hessian"], true);
    assert_eq!(c["cached"], false);
    let gptq = level(&r, "int4-gptq-g64");
    assert_eq!(gptq["status"]["state"], "ok");
    assert_eq!(gptq["method"], "gptq");
    // The 8 depthwise convolutions have no input matrix: hqq quantizes them, and the row lists them.
    let fallbacks = gptq["fallbacks"].as_array().unwrap();
    assert_eq!(fallbacks.len(), 8, "{fallbacks:?}");
    assert!(
        fallbacks
            .iter()
            .all(|f| f["layer"].as_str().unwrap().ends_with("dwconv.dwconv") && f["method"] == "hqq")
    );
    assert!(level(&r, "int4-rtn-g64").get("fallbacks").is_none());
    assert!(stdout.contains("Calibrated rows: 3 images"), "{stdout}");
    assert!(stdout.contains("none evaluated"), "{stdout}");
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(summary.contains("Calibrated rows: 3 images"), "{summary}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn nothing_left_to_calibrate_on_is_one_line_that_says_what_to_pass() {
    let dir = scratch("calib-none");
    let err = segq_fails(&[
        "eval",
        "--quant",
        "f32,int4",
        "--method",
        "gptq",
        "--calib",
        "embedded",
        "--out",
        dir.join("run").to_str().unwrap(),
    ]);
    assert!(
        err.contains("--calib-allow-overlap") && err.contains("every one of its 12 rows"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn overlap_is_allowed_on_request_and_counted_and_statistics_are_cached() {
    let dir = scratch("calib-overlap");
    let cache = dir.join("cache");
    let run = |name: &str| {
        let out = dir.join(name);
        let mut c = segq();
        c.env("XDG_CACHE_HOME", &cache).args([
            "eval",
            "--quant",
            "f32,int8-static",
            "--limit",
            "2",
            "--calib",
            "embedded",
            "--calib-size",
            "12",
            "--calib-allow-overlap",
            "--act-calib",
            "percentile:99.99",
            "--smooth",
            "0.5",
            "--set",
            "eval.samples=0",
            "--out",
            out.to_str().unwrap(),
        ]);
        eval_support::run_ok(c);
        results(&out)
    };
    let first = run("first");
    let c = &first["calibration"];
    assert_eq!(c["images"], 12);
    assert_eq!(c["overlap"], 2);
    assert_eq!(c["act_calib"], "percentile:99.99");
    assert_eq!(c["smooth"], 0.5);
    assert_eq!(c["cached"], false);
    assert_eq!(labels(&first), ["f32", "int8-static-rtn-sq0.5"]);
    let row = level(&first, "int8-static-rtn-sq0.5");
    assert_eq!(row["status"]["state"], "ok");
    let agree = row["summary"]["agreement"]["miou"].as_f64().unwrap();
    assert!(agree > 0.9, "int8-static agreement mIoU {agree}");
    let cached = std::fs::read_dir(cache.join("segq").join("calib")).unwrap().count();
    assert!(cached >= 1, "no calibration cache written");
    let second = run("second");
    assert_eq!(second["calibration"]["cached"], true);
    assert_eq!(second["calibration"]["set_id"], first["calibration"]["set_id"]);
    let scores = |r: &Value| level(r, "int8-static-rtn-sq0.5")["confusion"].clone();
    assert_eq!(scores(&first), scores(&second), "cached statistics changed the result");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Issue 15's integration target on the demo, measured like scripts/compare_quanto.py: calibrated on eight demo
/// images, scored on the four others, at the same group size.
#[test]
fn gptq_beats_rtn_and_hqq_and_awq_beats_rtn_at_int4_and_int2() {
    let dir = scratch("calib-methods");
    let list = dir.join("calib.txt");
    let lines: String = (5..=12)
        .map(|i| format!("{}\t{}\n", image(i, "image"), image(i, "mask")))
        .collect();
    std::fs::write(&list, lines).unwrap();
    let report = dir.join("report.json");
    let mut args = vec![
        "quantize".to_string(),
        "--quant".into(),
        "int4,int2".into(),
        "--method".into(),
        "rtn,hqq,gptq,awq".into(),
        "--calib".into(),
        list.to_str().unwrap().into(),
        "--calib-size".into(),
        "8".into(),
        "--set".into(),
        "quant.calib_cache=false".into(),
        "--error-report".into(),
        report.to_str().unwrap().into(),
        "--images".into(),
    ];
    args.extend((1..=4).map(|i| image(i, "image")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    segq_ok(&args);
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let get = |label: &str, key: &str| -> f64 {
        r["recipes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["label"] == label)
            .unwrap_or_else(|| panic!("{label} missing from {r}"))[key]
            .as_f64()
            .unwrap()
    };
    for (bits, g) in [("int4", "g64"), ("int2", "g32")] {
        let label = |m: &str| format!("{bits}-{m}-{g}");
        let err = |m: &str| get(&label(m), "logits_rel_error");
        let agree = |m: &str| get(&label(m), "agreement_miou");
        for base in ["rtn", "hqq"] {
            assert!(
                err("gptq") < err(base),
                "{bits}: gptq {} vs {base} {}",
                err("gptq"),
                err(base)
            );
            assert!(
                agree("gptq") > agree(base),
                "{bits}: gptq {} vs {base} {}",
                agree("gptq"),
                agree(base)
            );
        }
        assert!(
            err("awq") < err("rtn"),
            "{bits}: awq {} vs rtn {}",
            err("awq"),
            err("rtn")
        );
        assert!(
            agree("awq") > agree("rtn"),
            "{bits}: awq {} vs rtn {}",
            agree("awq"),
            agree("rtn")
        );
        assert_eq!(get(&label("gptq"), "fallback_layers"), 8.0);
    }
    let _ = Path::new(&report);
    std::fs::remove_dir_all(dir).unwrap();
}
