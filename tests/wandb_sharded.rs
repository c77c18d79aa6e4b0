//! W&B and sharded evaluations, through the `segq` binary: a shard logs no runs by default (one line says the merge
//! publishes) or, with `--wandb-shard-runs`, runs named and tagged `shard-I-of-N`; `segq merge --wandb` publishes
//! exactly one run per level whose summary equals an unsharded run's scores, offline (read back record by record)
//! and online (to a fake W&B server); run names carry the `tracking.name` prefix once; and the console says where
//! offline runs are and how to sync them in one line, with no repeated notices.

mod wandb_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;
use segq::track::wandb::records::{Record, RecordType};
use segq::track::wandb::txlog;
use serde_json::Value;
use wandb_support::{ScriptedServer, assert_secret_absent, run_folders, temp_dir, wandb_like};

const FAKE_KEY: &str = "sharded-fake-wandb-key-0a1b2c3d4e5f";

/// `segq` with info-level logs (the W&B lines are info), no key, no W&B variables from the caller's environment.
fn segq() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_segq"));
    c.env("HF_HUB_OFFLINE", "1")
        .env("NETRC", "/nonexistent/netrc")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    for var in [
        "WANDB_MODE",
        "WANDB_API_KEY",
        "WANDB_NAME",
        "WANDB_RUN_GROUP",
        "WANDB_PROJECT",
        "WANDB_ENTITY",
        "WANDB_DIR",
        "WANDB_BASE_URL",
        "WANDB_TAGS",
        "SLURM_ARRAY_TASK_ID",
        "JOB_COMPLETION_INDEX",
        "SEGQ_SHARD_INDEX",
    ] {
        c.env_remove(var);
    }
    c
}

/// Runs `command`; panics with its stderr unless it succeeds. Returns stderr.
fn run_ok(command: &mut Command) -> String {
    let out = command.output().expect("segq runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{command:?} failed: {stderr}");
    stderr
}

fn eval(out: &Path, extra: &[&str]) -> Command {
    let mut c = segq();
    c.args([
        "eval",
        "--quant",
        "f32,int4",
        "--method",
        "rtn",
        "--limit",
        "4",
        "--threads",
        "2",
        "--set",
        "eval.samples=0",
        "--out",
        out.to_str().unwrap(),
    ])
    .args(extra);
    c
}

fn merge(parts: &[PathBuf], out: &Path, extra: &[&str]) -> Command {
    let mut c = segq();
    c.arg("merge").args(parts).arg("--out").arg(out).args(extra);
    c
}

/// One offline run folder read back: display name, group, tags, config and summary.
#[derive(Debug)]
struct RunRead {
    name: String,
    group: String,
    tags: Vec<String>,
    config: BTreeMap<String, Value>,
    summary: BTreeMap<String, Value>,
    exit_code: i32,
}

fn read_run(folder: &Path) -> RunRead {
    let log = std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "wandb"))
        .unwrap_or_else(|| panic!("no .wandb file in {}", folder.display()));
    let bytes = std::fs::read(&log).unwrap();
    let mut run = RunRead {
        name: String::new(),
        group: String::new(),
        tags: Vec::new(),
        config: BTreeMap::new(),
        summary: BTreeMap::new(),
        exit_code: -1,
    };
    for payload in txlog::read_records(&bytes).unwrap() {
        match Record::decode(payload.as_slice()).unwrap().record_type.unwrap() {
            RecordType::Run(r) => {
                run.name = r.display_name;
                run.group = r.run_group;
                run.tags = r.tags;
            }
            RecordType::Config(c) => {
                for item in c.update {
                    run.config
                        .insert(item.key, serde_json::from_str(&item.value_json).unwrap());
                }
            }
            RecordType::Summary(s) => {
                for item in s.update {
                    run.summary
                        .insert(item.key, serde_json::from_str(&item.value_json).unwrap());
                }
            }
            RecordType::Exit(e) => run.exit_code = e.exit_code,
            _ => {}
        }
    }
    run
}

/// Runs by display name.
fn read_runs(out: &Path) -> BTreeMap<String, RunRead> {
    run_folders(out)
        .iter()
        .map(|f| {
            let run = read_run(f);
            (run.name.clone(), run)
        })
        .collect()
}

/// Summary entries that measure scores (not time, memory or the run's clock), which a merge must reproduce.
fn scores(summary: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    const TIMINGS: &[&str] = &[
        "images_per_s",
        "images_per_s_pipeline",
        "latency_ms/median",
        "latency_ms/p95",
        "load_time_s",
        "peak_rss_mb",
    ];
    summary
        .iter()
        .filter(|(k, _)| !k.starts_with('_') && !TIMINGS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Two shards (default: no W&B runs), and the unsharded run logged offline as `exp1`; returns (shards, whole).
fn shards_and_whole(dir: &Path) -> (Vec<PathBuf>, PathBuf) {
    let whole = dir.join("whole");
    run_ok(eval(&whole, &["--wandb", "offline"]).env("WANDB_NAME", "exp1"));
    let shards: Vec<PathBuf> = (0..2)
        .map(|i| {
            let out = dir.join(format!("shard-{i}"));
            let stderr = run_ok(&mut eval(&out, &["--shard", &format!("{i}/2"), "--wandb", "offline"]));
            assert!(run_folders(&out).is_empty(), "a shard logs no runs by default");
            let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("W&B")).collect();
            assert_eq!(lines.len(), 1, "{stderr}");
            assert!(
                lines[0].contains(&format!("shard {i}/2")) && lines[0].contains("segq merge --wandb"),
                "{stderr}"
            );
            out
        })
        .collect();
    (shards, whole)
}

fn assert_merged_like_whole(merged: &BTreeMap<String, RunRead>, whole: &BTreeMap<String, RunRead>) {
    let names: Vec<&String> = merged.keys().collect();
    assert_eq!(names, whole.keys().collect::<Vec<_>>(), "one run per level, same names");
    assert_eq!(names, ["exp1-f32", "exp1-int4-rtn-g64"], "the prefix once");
    for (name, run) in merged {
        let reference = &whole[name];
        assert_eq!(run.exit_code, 0, "{name}");
        assert!(run.summary.contains_key("mean_iou"), "{name}: {:?}", run.summary);
        assert_eq!(scores(&run.summary), scores(&reference.summary), "{name}: summary");
        assert!(
            !run.tags.iter().any(|t| t.starts_with("shard-")),
            "{name}: {:?}",
            run.tags
        );
        for key in ["model", "dataset", "split", "level", "method", "group_size", "examples"] {
            assert_eq!(run.config.get(key), reference.config.get(key), "{name}: config {key}");
        }
        assert!(!run.config.contains_key("shard"), "{name}");
    }
}

#[test]
fn merge_publishes_one_offline_run_per_level_like_an_unsharded_eval() {
    let dir = temp_dir("wandb-sharded-offline");
    let (shards, whole) = shards_and_whole(&dir);
    let out = dir.join("merged");
    let stderr = run_ok(merge(&shards, &out, &["--wandb", "offline"]).env("WANDB_NAME", "exp1"));
    let merged = read_runs(&out);
    let whole = read_runs(&whole);
    assert_merged_like_whole(&merged, &whole);
    for run in merged.values() {
        assert!(run.group.starts_with("segq-eval-"), "{}", run.group);
    }
    // One line for all offline runs, with the exact command.
    let wandb_dir = out.join("wandb");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("W&B")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains(&format!("2 runs kept offline in {}", wandb_dir.display()))
            && lines[0].contains(&format!("`wandb sync {}/offline-run-*`", wandb_dir.display())),
        "{stderr}"
    );
}

#[test]
fn merge_publishes_online_to_the_group() {
    let dir = temp_dir("wandb-sharded-online");
    let (shards, whole) = shards_and_whole(&dir);
    let server = ScriptedServer::start(|request, _, base| wandb_like(request, base));
    let out = dir.join("merged");
    let stderr = run_ok(
        merge(&shards, &out, &["--wandb", "online"])
            .env("WANDB_API_KEY", FAKE_KEY)
            .env("WANDB_BASE_URL", &server.base_url)
            .env("WANDB_NAME", "exp1")
            .env("WANDB_RUN_GROUP", "sweep-7"),
    );
    let requests = server.recorded();
    let upserts: Vec<Value> = requests
        .iter()
        .filter(|r| r.operation().as_deref() == Some("UpsertBucket"))
        .map(|r| r.json()["variables"].clone())
        .collect();
    let mut names: Vec<&str> = upserts.iter().map(|v| v["displayName"].as_str().unwrap()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names, ["exp1-f32", "exp1-int4-rtn-g64"], "{upserts:?}");
    assert!(upserts.iter().all(|v| v["groupName"] == "sweep-7"), "{upserts:?}");
    // The summary the server received equals the unsharded run's scores.
    let whole = read_runs(&whole);
    for (name, reference) in &whole {
        let run_id = upserts
            .iter()
            .find(|v| v["displayName"] == name.as_str())
            .map(|v| v["name"].as_str().unwrap().to_string())
            .unwrap();
        let summary_line = requests
            .iter()
            .rev()
            .filter(|r| r.path.ends_with(&format!("/{run_id}/file_stream")))
            .filter_map(|r| {
                r.json()["files"]["wandb-summary.json"]["content"]
                    .as_array()
                    .and_then(|c| c.last().cloned())
            })
            .next()
            .unwrap_or_else(|| panic!("no summary for {name}"));
        let summary: BTreeMap<String, Value> = serde_json::from_str(summary_line.as_str().unwrap()).unwrap();
        assert_eq!(scores(&summary), scores(&reference.summary), "{name}");
    }
    // One line per run, with its URL; the uploaded folders are marked synced.
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("W&B")).collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(lines.iter().all(|l| l.contains(&server.base_url)), "{stderr}");
    assert!(!stderr.contains("wandb sync"), "{stderr}");
    assert!(
        run_folders(&out)
            .iter()
            .all(|f| f.file_name().unwrap().to_str().unwrap().starts_with("run-"))
    );
    assert_secret_absent(FAKE_KEY, &[&stderr], &[&out]);
}

#[test]
fn shard_runs_when_asked_are_named_and_tagged_and_need_a_group() {
    let dir = temp_dir("wandb-shard-runs");
    let out = dir.join("shard-1");
    let refused = eval(&out, &["--shard", "1/2", "--wandb", "offline", "--wandb-shard-runs"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("WANDB_RUN_GROUP") && stderr.contains("tracking.group"),
        "{stderr}"
    );
    assert!(!out.join("results.json").exists(), "refused before evaluating");
    run_ok(
        eval(&out, &["--shard", "1/2", "--wandb", "offline", "--wandb-shard-runs"])
            .env("WANDB_RUN_GROUP", "sweep-8")
            .env("WANDB_NAME", "exp2"),
    );
    let runs = read_runs(&out);
    assert_eq!(
        runs.keys().collect::<Vec<_>>(),
        ["exp2-f32-shard-1-of-2", "exp2-int4-rtn-g64-shard-1-of-2"]
    );
    for run in runs.values() {
        assert_eq!(run.group, "sweep-8");
        assert!(run.tags.contains(&"shard-1-of-2".to_string()), "{:?}", run.tags);
        assert_eq!(run.config["shard"], "1/2");
    }
}

#[test]
fn no_key_says_once_where_the_runs_are_and_how_to_sync() {
    let dir = temp_dir("wandb-console");
    let out = dir.join("eval");
    let stderr = run_ok(&mut eval(&out, &[]));
    let wandb_dir = out.join("wandb");
    assert_eq!(run_folders(&out).len(), 2);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("W&B")).collect();
    assert_eq!(lines.len(), 1, "one line:\n{stderr}");
    assert_eq!(stderr.matches("no API key").count(), 1, "{stderr}");
    assert!(
        lines[0].contains(&format!("`wandb sync {}/offline-run-*`", wandb_dir.display())),
        "{stderr}"
    );
}
