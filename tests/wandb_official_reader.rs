//! Writes an offline run through the library and has wandb's own code read it back
//! (scripts/check_wandb_offline.py: wandb-core's `leet inspect`, wandb's protobuf classes, and `wandb sync` to a
//! fake loopback server). Needs a Python with the `wandb` package in SEGQ_WANDB_PYTHON, so it is `#[ignore]`d:
//! a plain `cargo test` lists it as ignored, and `.ci/run` runs it with `-- --ignored` after installing wandb into
//! a virtualenv. Run that way without a working reader, it fails.

mod wandb_support;

use std::ffi::OsString;
use std::process::Command;

use segq::track::{TrackingMode, TrackingSettings, log_runs};
use wandb_support::{example_run, temp_dir};

/// The Python in SEGQ_WANDB_PYTHON, once it has shown that it imports wandb; panics otherwise.
fn reader_python() -> OsString {
    let python = std::env::var_os("SEGQ_WANDB_PYTHON").filter(|p| !p.is_empty()).expect(
        "SEGQ_WANDB_PYTHON is not set: point it at a Python that has the wandb package \
             (python3 -m venv /tmp/venv-wandb && /tmp/venv-wandb/bin/pip install wandb)",
    );
    let output = Command::new(&python)
        .args(["-c", "import wandb; print(wandb.__version__)"])
        .output()
        .unwrap_or_else(|e| panic!("SEGQ_WANDB_PYTHON={}: cannot run it: {e}", python.display()));
    assert!(
        output.status.success(),
        "SEGQ_WANDB_PYTHON={}: cannot import wandb:\n{}",
        python.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!(
        "official W&B reader: {} with wandb {}",
        python.display(),
        String::from_utf8_lossy(&output.stdout).trim()
    );
    python
}

#[test]
#[ignore = "needs SEGQ_WANDB_PYTHON, a Python with wandb; .ci/run runs it with --ignored"]
fn official_wandb_reader_accepts_offline_runs() {
    let python = reader_python();
    let dir = temp_dir("official-reader");
    let settings = TrackingSettings {
        mode: Some(TrackingMode::Offline),
        dir: Some(dir.clone()),
        ..Default::default()
    };
    // A second run with a history long enough to split records across 32 KiB blocks.
    let mut long = example_run("long");
    let row = long.history[0].clone();
    long.history = (0..400).map(|_| row.clone()).collect();
    let mut big = example_run("big");
    big.images[0].rgb = image::RgbImage::from_fn(300, 200, |x, y| image::Rgb([x as u8, y as u8, (x ^ y) as u8]));
    for (_, mask) in &mut big.images[0].masks {
        *mask = image::GrayImage::from_fn(300, 200, |x, y| image::Luma([((x / 50 + y / 50) % 3) as u8]));
    }
    big.tables[0].rows = (0..1500)
        .map(|i| vec![serde_json::json!(format!("class {i}")), serde_json::json!(0.5)])
        .collect();
    // A summary record over two blocks long: split into first, middle and last chunks.
    let many: serde_json::Map<String, serde_json::Value> = (0..4000)
        .map(|i| (format!("class_{i:04}"), serde_json::json!(i as f64 / 4000.0)))
        .collect();
    big.summary
        .insert("per_class_iou".into(), serde_json::Value::Object(many));
    let outcome = log_runs(&settings, &[example_run("int4-hqq"), long, big]).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_wandb_offline.py");
    for (index, run) in outcome.runs.iter().enumerate() {
        let run_dir = run.offline_dir.as_ref().unwrap();
        // The first run is also uploaded by `wandb sync` to the script's fake loopback server.
        let sync: &[&str] = if index == 0 { &["--sync"] } else { &[] };
        let output = Command::new(&python)
            .arg(script)
            .arg(run_dir)
            .args(sync)
            .args([
                "--config-keys",
                "model,dataset,level,method,group_size,threads,segq_version,_wandb",
            ])
            .args(["--history-keys", "mean_iou,overall_accuracy,_step,_runtime,_timestamp"])
            .args([
                "--summary-keys",
                "mean_iou,images_per_s,weight_mb,per_class_iou,sample_0,per_class_iou_table",
            ])
            .output()
            .expect("run the check script");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        println!("{stdout}{stderr}");
        assert!(
            output.status.success(),
            "{} rejected by wandb's reader:\n{stdout}{stderr}",
            run_dir.display()
        );
        assert!(stdout.contains("wandb-core reader: agrees"), "{stdout}");
        if index == 0 {
            assert!(stdout.contains("sync: "), "{stdout}");
        }
    }
}

/// `segq eval --shard I/2` twice, then `segq merge --wandb offline`: wandb's reader accepts each merged run (one
/// per level, named like an unsharded eval's), and the shards wrote no run.
#[test]
#[ignore = "needs SEGQ_WANDB_PYTHON, a Python with wandb; .ci/run runs it with --ignored"]
fn official_wandb_reader_accepts_merged_shard_runs() {
    let python = reader_python();
    let dir = temp_dir("official-reader-merged");
    let segq = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_segq"));
        c.env("HF_HUB_OFFLINE", "1")
            .env("NETRC", "/nonexistent/netrc")
            .env_remove("WANDB_API_KEY")
            .env_remove("WANDB_MODE")
            .env_remove("WANDB_DIR")
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env_remove("JOB_COMPLETION_INDEX")
            .arg("-q");
        c
    };
    let mut shards = Vec::new();
    for index in 0..2 {
        let out = dir.join(format!("shard-{index}"));
        let status = segq()
            .args(["eval", "--quant", "f32,int8", "--method", "rtn", "--limit", "4"])
            .args([
                "--set",
                "eval.samples=0",
                "--wandb",
                "offline",
                "--shard",
                &format!("{index}/2"),
            ])
            .arg("--out")
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
        assert!(!out.join("wandb").exists(), "a shard logs no run by default");
        shards.push(out);
    }
    let merged = dir.join("merged");
    let status = segq()
        .arg("merge")
        .args(&shards)
        .arg("--out")
        .arg(&merged)
        .args(["--wandb", "offline"])
        .status()
        .unwrap();
    assert!(status.success());
    let folders = wandb_support::run_folders(&merged);
    assert_eq!(folders.len(), 2, "one run per level: {folders:?}");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_wandb_offline.py");
    for folder in &folders {
        let output = Command::new(&python)
            .arg(script)
            .arg(folder)
            .args(["--config-keys", "model,dataset,level,method,examples,segq_version"])
            .args(["--history-keys", "mean_iou,overall_accuracy,_step"])
            .args(["--summary-keys", "mean_iou,mean_accuracy,weight_mb,per_class_iou"])
            .output()
            .expect("run the check script");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        println!("{stdout}{stderr}");
        assert!(
            output.status.success(),
            "{} rejected:\n{stdout}{stderr}",
            folder.display()
        );
        assert!(stdout.contains("wandb-core reader: agrees"), "{stdout}");
    }
}
