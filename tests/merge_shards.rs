//! Sharded evaluations merge exactly: the demo evaluated in 1, 2, 3 and 7 shards (explicit `I/N`, and `--shard
//! auto` from Slurm and Kubernetes variables), merged with `segq merge`, gives the confusion matrices, agreement
//! matrices, per-image counts, counts, every score and the bootstrap intervals of one unsharded run.

mod eval_support;

use std::path::{Path, PathBuf};

use eval_support::{run_ok, scratch, segq, segq_fails, segq_ok};
use segq::eval::results::EvalResults;

/// Few images and two levels keep this fast; 4 images in 7 shards leaves three shards empty, which must still merge.
const LIMIT: &str = "4";

fn eval_args(out: &Path) -> Vec<String> {
    [
        "eval",
        "--quant",
        "f32,int4",
        "--method",
        "rtn",
        "--limit",
        LIMIT,
        "--threads",
        "2",
        "--set",
        "eval.samples=0",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// How a shard learns its index.
enum ShardBy {
    Flag,
    Slurm,
    Kubernetes,
}

/// Runs every shard of `count` into `dir/shard-I`; returns the shard folders.
fn run_shards(dir: &Path, count: usize, by: ShardBy) -> Vec<PathBuf> {
    (0..count)
        .map(|index| {
            let out = dir.join(format!("shard-{index}"));
            let mut command = segq();
            command.args(eval_args(&out));
            match by {
                ShardBy::Flag => {
                    command.args(["--shard", &format!("{index}/{count}")]);
                }
                ShardBy::Slurm => {
                    // An array declared as --array=10-14:2 style grid: ids 10, 12, ...
                    command
                        .args(["--shard", "auto"])
                        .env("SLURM_ARRAY_TASK_ID", (10 + 2 * index).to_string())
                        .env("SLURM_ARRAY_TASK_MIN", "10")
                        .env("SLURM_ARRAY_TASK_STEP", "2")
                        .env("SLURM_ARRAY_TASK_COUNT", count.to_string());
                }
                ShardBy::Kubernetes => {
                    command
                        .args(["--shard", "auto"])
                        .env("JOB_COMPLETION_INDEX", index.to_string())
                        .env("SEGQ_SHARD_COUNT", count.to_string());
                }
            }
            run_ok(command);
            let part = EvalResults::read(&out.join("results.json")).unwrap();
            assert_eq!(part.dataset.shard, Some((index, count)), "{}", out.display());
            out
        })
        .collect()
}

fn merge(dir: &Path, parts: &[PathBuf]) -> EvalResults {
    let out = dir.join("merged");
    let mut args = vec!["merge".to_string()];
    // Give the parts in reverse order: merge must not depend on it.
    args.extend(parts.iter().rev().map(|p| p.display().to_string()));
    args.extend(["--out".to_string(), out.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stdout = segq_ok(&args);
    assert!(stdout.lines().any(|l| l.starts_with("int4-rtn-g64")), "{stdout}");
    for file in ["summary.csv", "summary.md", "plots/miou_vs_bits.svg"] {
        assert!(out.join(file).is_file(), "merge wrote no {file}");
    }
    EvalResults::read(&out.join("results.json")).unwrap()
}

fn assert_same_scores(merged: &EvalResults, whole: &EvalResults, what: &str) {
    assert!(merged.complete, "{what}: merged result is complete");
    assert_eq!(merged.dataset.shard, None);
    assert_eq!(
        merged.dataset.examples_total_selected, whole.dataset.examples_total_selected,
        "{what}"
    );
    assert_eq!(
        (merged.counts.read, merged.counts.evaluated, merged.counts.skipped),
        (whole.counts.read, whole.counts.evaluated, whole.counts.skipped),
        "{what}: counts"
    );
    assert_eq!(merged.bootstrap, whole.bootstrap, "{what}: bootstrap settings");
    assert_eq!(merged.levels.len(), whole.levels.len());
    for (m, w) in merged.levels.iter().zip(&whole.levels) {
        let label = &w.label;
        assert_eq!(m.label, *label);
        assert_eq!(m.status, w.status, "{what} {label}");
        assert!(m.confusion.is_some(), "{what} {label}: scored");
        assert_eq!(m.confusion, w.confusion, "{what} {label}: confusion matrix");
        assert_eq!(m.agreement, w.agreement, "{what} {label}: agreement matrix");
        // Derived scores come from the matrices, so they are bit-identical too.
        assert_eq!(m.metrics(), w.metrics(), "{what} {label}: metrics");
        assert_eq!(
            m.agreement_metrics(),
            w.agreement_metrics(),
            "{what} {label}: agreement"
        );
        // Per-image counts join by image index, so the bootstrap draws the same images: identical intervals.
        assert_eq!(m.per_image, w.per_image, "{what} {label}: per-image counts");
        assert_eq!(m.per_image.len(), whole.counts.evaluated as usize);
        let intervals = |l: &segq::eval::results::LevelResult| {
            let s = l.summary.as_ref().expect("summaries are filled on read");
            (s.delta_miou_ci, s.agreement_miou_ci, s.delta_miou_significant)
        };
        assert!(intervals(w).0.is_some(), "{what} {label}: an interval");
        assert_eq!(intervals(m), intervals(w), "{what} {label}: bootstrap intervals");
        assert_eq!(m.weight_bytes_memory, w.weight_bytes_memory);
        assert_eq!(m.bits_per_weight, w.bits_per_weight);
        assert_eq!(
            m.model_latency_ms.len(),
            w.model_latency_ms.len(),
            "{what} {label}: one latency per image"
        );
    }
}

#[test]
fn shards_merge_into_the_unsharded_result() {
    let dir = scratch("merge");
    let whole_dir = dir.join("whole");
    let mut whole = segq();
    whole.args(eval_args(&whole_dir));
    run_ok(whole);
    let whole = EvalResults::read(&whole_dir.join("results.json")).unwrap();
    assert!(whole.complete);
    assert_eq!(whole.counts.evaluated, LIMIT.parse::<u64>().unwrap());
    assert!(whole.levels.iter().all(|l| l.is_ok()));

    for (count, by) in [
        (1, ShardBy::Flag),
        (2, ShardBy::Slurm),
        (3, ShardBy::Kubernetes),
        (7, ShardBy::Flag),
    ] {
        let set = dir.join(format!("of-{count}"));
        let parts = run_shards(&set, count, by);
        let evaluated: Vec<u64> = parts
            .iter()
            .map(|p| EvalResults::read(&p.join("results.json")).unwrap().counts.evaluated)
            .collect();
        assert_eq!(
            evaluated.iter().sum::<u64>(),
            whole.counts.evaluated,
            "{count} shards: {evaluated:?}"
        );
        let merged = merge(&set, &parts);
        assert_same_scores(&merged, &whole, &format!("{count} shards"));
    }
}

#[test]
fn merge_refuses_missing_or_mixed_shards() {
    let dir = scratch("merge-missing");
    let mut args = eval_args(&dir.join("shard-0"));
    args[6] = "1".into(); // --limit 1
    args.extend(["--shard".into(), "0/3".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    segq_ok(&args);
    let part = dir.join("shard-0");

    let stderr = segq_fails(&[
        "merge",
        part.to_str().unwrap(),
        "--out",
        dir.join("m").to_str().unwrap(),
    ]);
    assert!(stderr.contains("missing shards 1, 2 of 3"), "{stderr}");

    // Accepted on request, marked incomplete.
    let out = dir.join("partial");
    segq_ok(&[
        "merge",
        "--allow-partial",
        part.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let merged = EvalResults::read(&out.join("results.json")).unwrap();
    assert!(!merged.complete);
    assert!(
        std::fs::read_to_string(out.join("summary.md"))
            .unwrap()
            .contains("INCOMPLETE")
    );

    // The same shard twice is refused.
    let stderr = segq_fails(&[
        "merge",
        part.to_str().unwrap(),
        part.join("results.json").to_str().unwrap(),
        "--out",
        dir.join("twice").to_str().unwrap(),
    ]);
    assert!(stderr.contains("shard 0/3 is given twice"), "{stderr}");

    // --shard auto with a task id off the Slurm array's grid names the variable.
    let mut command = segq();
    command
        .args(["eval", "--shard", "auto", "--quant", "f32", "--limit", "1"])
        .env("SLURM_ARRAY_TASK_ID", "3")
        .env("SLURM_ARRAY_TASK_MIN", "0")
        .env("SLURM_ARRAY_TASK_STEP", "2")
        .env("SLURM_ARRAY_TASK_COUNT", "4");
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("SLURM_ARRAY_TASK_ID=3"),
        "{stderr}"
    );
}
