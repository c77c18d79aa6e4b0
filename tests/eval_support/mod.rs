//! Helpers shared by the tests that run the `segq` binary (cli, eval, merge, quantize): running it offline,
//! scratch folders, and reading what a run wrote.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use serde_json::Value;

/// The `segq` binary, offline, with W&B disabled and only warnings logged.
pub fn segq() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_segq"));
    c.env("HF_HUB_OFFLINE", "1")
        .env("WANDB_MODE", "disabled")
        .env_remove("RUST_LOG")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("SEGQ_SHARD_INDEX")
        .arg("-q");
    c
}

/// A fresh, empty scratch folder unique to this process and `name`.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("segq-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a prepared command; panics with its stderr unless it succeeds. Returns stdout.
pub fn run_ok(mut command: Command) -> String {
    let start = Instant::now();
    let out: Output = command.output().expect("segq runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{command:?} failed ({:?}): {stderr}",
        out.status.code()
    );
    eprintln!("{:.1} s: {command:?}", start.elapsed().as_secs_f64());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `segq ARGS...` and returns stdout; panics with stderr on failure.
pub fn segq_ok(args: &[&str]) -> String {
    let mut c = segq();
    c.args(args);
    run_ok(c)
}

/// Runs `segq ARGS...` expecting failure that is not a panic; returns stderr.
pub fn segq_fails(args: &[&str]) -> String {
    let out = segq().args(args).output().expect("segq runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "segq {args:?} should fail; stderr: {stderr}");
    assert_ne!(out.status.code(), Some(101), "segq {args:?} panicked: {stderr}");
    stderr
}

/// `DIR/results.json` as JSON.
pub fn results(dir: &Path) -> Value {
    let path = dir.join("results.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The level of `results` labelled `label`.
pub fn level<'a>(results: &'a Value, label: &str) -> &'a Value {
    results["levels"]
        .as_array()
        .expect("levels is a list")
        .iter()
        .find(|l| l["label"] == label)
        .unwrap_or_else(|| panic!("no level {label} in {}", labels(results).join(", ")))
}

/// The labels of every level, in order.
pub fn labels(results: &Value) -> Vec<String> {
    results["levels"]
        .as_array()
        .expect("levels is a list")
        .iter()
        .map(|l| l["label"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// A JSON array of numbers as u64 (panics on anything else).
pub fn u64s(value: &Value) -> Vec<u64> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| {
            v.as_f64()
                .map(|f| f as u64)
                .unwrap_or_else(|| panic!("not a number: {v}"))
        })
        .collect()
}

/// Image and annotation bytes of the demo dataset's validation example `n` (1-based), from the repository.
pub fn demo_example(n: usize) -> (Vec<u8>, Vec<u8>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/ade/ADEChallengeData2016");
    let stem = format!("SYN_val_{n:08}");
    let image = root.join(format!("images/validation/{stem}.jpg"));
    let label = root.join(format!("annotations/validation/{stem}.png"));
    (
        std::fs::read(&image).unwrap_or_else(|e| panic!("{}: {e}", image.display())),
        std::fs::read(&label).unwrap_or_else(|e| panic!("{}: {e}", label.display())),
    )
}
