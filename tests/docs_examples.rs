//! The job files under docs/examples and the configuration snippets in the docs, checked with segq itself: every
//! `segq.toml` (the Kubernetes ConfigMap's, each ```` ```toml ```` block of README.md and docs/*.md) parses with
//! segq's loader, and each ```` ```toml recipe ```` block as a `--recipe` file; the Kubernetes commands run as written (paths mapped into a scratch folder); the Slurm script
//! runs with stand-ins for `sbatch` and `srun`, including the documented rerun of one failed task, and the merge
//! it queues succeeds.

mod common;
mod eval_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::repo_root;
use eval_support::{results, scratch};
use segq::config::Config;

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The text of the block scalar `key: |` in a YAML file: the lines indented deeper than the key, dedented.
fn yaml_block(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let header = lines.next().unwrap_or_else(|| panic!("no `{key}: |` block"));
    let indent = header.len() - header.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        .collect();
    let margin = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    body.iter()
        .map(|l| format!("{}\n", l.get(margin..).unwrap_or("")))
        .collect()
}

/// The shell commands of a YAML container's `args:` list (`- segq ...` items).
fn yaml_segq_commands(yaml: &str) -> Vec<String> {
    yaml.lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("- "))
        .filter(|l| l.starts_with("segq "))
        .map(str::to_string)
        .collect()
}

/// The container's `env:` pairs (`- name: X` then `value: "Y"`).
fn yaml_env(yaml: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = yaml.lines().map(str::trim).collect();
    lines
        .windows(2)
        .filter_map(|w| {
            let name = w[0].strip_prefix("- name: ")?;
            let value = w[1].strip_prefix("value: ")?;
            Some((name.to_string(), value.trim_matches('"').to_string()))
        })
        .collect()
}

/// The ```toml blocks of README.md and docs/*.md, as (where, text).
/// Every ```` ```toml ```` block as (origin, text, is a recipe file): ```` ```toml recipe ```` marks a `--recipe`
/// file, every other block is a `segq.toml`.
fn toml_blocks() -> Vec<(String, String, bool)> {
    let root = repo_root();
    let mut files = vec![root.join("README.md")];
    files.extend(
        std::fs::read_dir(root.join("docs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "md")),
    );
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut current: Option<(usize, String, bool)> = None;
        for (i, line) in text.lines().enumerate() {
            match &mut current {
                Some((start, body, recipe)) if line.trim() == "```" => {
                    out.push((format!("{}:{start}", file.display()), std::mem::take(body), *recipe));
                    current = None;
                }
                Some((_, body, _)) => {
                    body.push_str(line);
                    body.push('\n');
                }
                None if line.trim_start().starts_with("```toml") => {
                    current = Some((i + 1, String::new(), line.trim() == "```toml recipe"))
                }
                None => {}
            }
        }
    }
    out
}

/// A folder holding `segq` (a link to the binary under test), to put first on PATH.
fn bin_dir(root: &Path) -> PathBuf {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let link = bin.join("segq");
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_segq"), &link).unwrap();
    }
    bin
}

/// `sh -c script` in `dir`, offline, without W&B, scheduler variables or the user's caches.
fn shell(dir: &Path, script: &str) -> Command {
    let mut c = Command::new("bash");
    c.arg("-c").arg(script).current_dir(dir);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("SLURM_") || name.starts_with("WANDB_") || name.starts_with("HF_") {
            c.env_remove(&name);
        }
    }
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("{}:{path}", bin_dir(dir).display()))
        .env("HOME", dir.join("home"))
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env("HF_HOME", dir.join("hf"))
        .env("HF_HUB_OFFLINE", "1")
        .env("WANDB_MODE", "disabled")
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("SEGQ_SHARD_INDEX")
        .env_remove("SEGQ_SHARD_COUNT")
        .env_remove("RUST_LOG");
    c
}

fn output(mut command: Command) -> (bool, String, String) {
    let out = command.output().expect("bash runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_documented_configuration_parses_with_segqs_loader() {
    let blocks = toml_blocks();
    assert!(blocks.len() >= 2, "the docs lost their configuration examples");
    assert!(blocks.iter().any(|b| b.2), "the docs lost their recipe file example");
    for (origin, text, recipe) in &blocks {
        let parsed = if *recipe {
            segq::quant::Recipe::from_toml(text, origin).map(drop)
        } else {
            Config::from_toml(text, origin).map(drop)
        };
        if let Err(e) = parsed {
            panic!("{origin}: {e}\n{text}");
        }
    }
    let yaml = read("docs/examples/segq-k8s-indexed-job.yaml");
    let toml = yaml_block(&yaml, "segq.toml");
    let config = Config::from_toml(&toml, "segq-k8s-indexed-job.yaml segq.toml")
        .unwrap_or_else(|e| panic!("the Kubernetes ConfigMap's segq.toml: {e}\n{toml}"));
    assert_ne!(config, Config::default(), "the ConfigMap sets something");
    // The file a user writes with `segq config init` is the schema's own, with every key.
    let init = Config::from_toml(segq::config::DEFAULT_FILE, "segq config init").unwrap();
    assert_eq!(init, Config::default());
}

#[test]
fn yaml_extraction_reads_block_scalars_and_args() {
    let yaml = "data:\n  segq.toml: |\n    [eval]\n      # nested\n    batch_size = 2\n  other: x\nargs:\n  - segq merge a --out b\n";
    assert_eq!(yaml_block(yaml, "segq.toml"), "[eval]\n  # nested\nbatch_size = 2\n");
    assert_eq!(yaml_segq_commands(yaml), ["segq merge a --out b"]);
    assert_eq!(
        yaml_env("env:\n  - name: A\n    value: \"8\"\n"),
        [("A".to_string(), "8".to_string())]
    );
}

/// The Indexed Job's command with its ConfigMap, as a pod runs it (volumes mapped into a scratch folder): offline
/// and with an empty cache it gets as far as fetching the Hub model, so the flags, the configuration and the shard
/// from JOB_COMPLETION_INDEX / SEGQ_SHARD_COUNT were all accepted and the output folder was made. Then the merge
/// Job's command merges shards of the demo.
#[test]
fn kubernetes_example_commands_run_as_written() {
    let dir = scratch("docs-k8s");
    let (config_dir, results_dir) = (dir.join("config"), dir.join("results"));
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::create_dir_all(&results_dir).unwrap();
    // The pod's absolute paths (words starting /config or /results) mapped into the scratch folder.
    let map = |text: &str| {
        text.split(' ')
            .map(|word| {
                if let Some(rest) = word.strip_prefix("/config") {
                    format!("{}{rest}", config_dir.display())
                } else if let Some(rest) = word.strip_prefix("/results") {
                    format!("{}{rest}", results_dir.display())
                } else {
                    word.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let job = read("docs/examples/segq-k8s-indexed-job.yaml");
    std::fs::write(config_dir.join("segq.toml"), yaml_block(&job, "segq.toml")).unwrap();
    let env = yaml_env(&job);
    assert!(env.iter().any(|(n, v)| n == "SEGQ_SHARD_COUNT" && v == "8"), "{env:?}");
    assert!(
        job.contains("completions: 8"),
        "completions must equal SEGQ_SHARD_COUNT"
    );
    let commands = yaml_segq_commands(&job);
    assert_eq!(commands.len(), 1, "{commands:?}");
    let mut pod = shell(&dir, &map(&commands[0]));
    pod.env("JOB_COMPLETION_INDEX", "3");
    for (name, value) in &env {
        pod.env(name, map(value));
    }
    let (ok, _, stderr) = output(pod);
    assert!(!ok, "offline with an empty cache the Hub model cannot load");
    let error = stderr.lines().rfind(|l| l.starts_with("error: ")).unwrap_or_default();
    assert!(
        error.contains("nvidia/segformer-b0-finetuned-ade-512-512") || error.contains("scene_parse_150"),
        "the pod must fail only at fetching the model or dataset, not on its flags or configuration: {stderr}"
    );
    assert!(results_dir.join("shard-3").is_dir(), "the plan was built: {stderr}");

    for shard in ["0/2", "1/2"] {
        let out = results_dir.join(format!("shard-{}", &shard[..1]));
        let (ok, _, stderr) = output(shell(
            &dir,
            &format!(
                "segq -q eval --quant f32,int8 --method rtn --limit 2 --shard {shard} --out {}",
                out.display()
            ),
        ));
        assert!(ok, "{stderr}");
    }
    std::fs::remove_dir_all(results_dir.join("shard-3")).unwrap();
    let merge = read("docs/examples/segq-k8s-merge-job.yaml");
    let commands = yaml_segq_commands(&merge);
    assert_eq!(commands.len(), 1, "{commands:?}");
    let (ok, _, stderr) = output(shell(&dir, &map(&commands[0])));
    assert!(ok, "{}: {stderr}", commands[0]);
    let merged = results(&results_dir.join("merged"));
    assert_eq!(merged["complete"], true);
    assert_eq!(merged["counts"]["evaluated"], 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One array task of docs/examples/segq-slurm.sh, with the variables Slurm sets, `srun` running its command and
/// `sbatch` recording what it was asked to submit.
fn slurm_task(dir: &Path, job: u32, task: u32, array: (u32, u32), rerun_into: Option<&str>) -> (bool, String) {
    let script = repo_root().join("docs/examples/segq-slurm.sh");
    let mut c = shell(dir, &format!("bash {}", script.display()));
    let (min, max) = array;
    c.env(
        "PATH",
        format!(
            "{}:{}",
            dir.join("fake-slurm").display(),
            std::env::var("PATH").unwrap()
        ),
    )
    .env("SEGQ", env!("CARGO_BIN_EXE_segq"))
    .env("SLURM_ARRAY_JOB_ID", job.to_string())
    .env("SLURM_ARRAY_TASK_ID", task.to_string())
    .env("SLURM_ARRAY_TASK_MIN", min.to_string())
    .env("SLURM_ARRAY_TASK_MAX", max.to_string())
    .env("SLURM_ARRAY_TASK_COUNT", (max - min + 1).to_string())
    .env("SLURM_ARRAY_TASK_STEP", "1")
    .env("SLURM_CPUS_PER_TASK", "1");
    if let Some(results) = rerun_into {
        c.env("RESULTS", results);
    }
    let (ok, _, stderr) = output(c);
    (ok, stderr)
}

#[test]
fn slurm_script_reruns_a_failed_task_into_its_own_shard_and_the_merge_succeeds() {
    let dir = scratch("docs-slurm");
    let fake = dir.join("fake-slurm");
    std::fs::create_dir_all(&fake).unwrap();
    let submitted = dir.join("sbatch.log");
    let write_script = |name: &str, body: String| {
        let path = fake.join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    };
    // sbatch records one line per argument, then a blank line, and answers like Slurm.
    write_script(
        "sbatch",
        format!(
            "#!/bin/bash\nprintf '%s\\n' \"$@\" >> '{}'\necho >> '{}'\necho 'Submitted batch job 9'\n",
            submitted.display(),
            submitted.display()
        ),
    );
    write_script("srun", "#!/bin/bash\nexec \"$@\"\n".into());
    // What the user's segq.toml holds, made small: 8 demo images, two levels, one image per shard.
    std::fs::write(
        dir.join("segq.toml"),
        "[quant]\nlevels = [\"f32\", \"int8\"]\nmethods = [\"rtn\"]\n[eval]\nlimit = 8\nsamples = 0\n",
    )
    .unwrap();

    // The array 0-7 of job 1000; task 5 fails (its srun is never reached: it is simply not run here).
    for task in (0..8).filter(|t| *t != 5) {
        let (ok, stderr) = slurm_task(&dir, 1000, task, (0, 7), None);
        assert!(ok, "task {task}: {stderr}");
    }
    let first_merge = std::fs::read_to_string(&submitted).unwrap();
    assert!(first_merge.contains("--dependency=afterok:1000"), "{first_merge}");
    std::fs::remove_file(&submitted).unwrap();

    // The documented rerun: `RESULTS=results/1000 sbatch --array=5 docs/examples/segq-slurm.sh`. Slurm describes
    // a one-task array (min = max = 5, count 1); the script's SEGQ_SHARD_COUNT keeps the shard 5 of 8.
    let (ok, stderr) = slurm_task(&dir, 2000, 5, (5, 5), Some("results/1000"));
    assert!(ok, "rerun of task 5: {stderr}");
    let shard = results(&dir.join("results/1000/shard-5"));
    assert_eq!(
        shard["dataset"]["shard"],
        serde_json::json!([5, 8]),
        "{}",
        shard["dataset"]
    );
    assert_eq!(shard["counts"]["evaluated"], 1);

    // The rerun queued the merge of every shard in the first run's folder; run what it submitted.
    let queued = std::fs::read_to_string(&submitted).unwrap();
    assert!(queued.contains("--dependency=afterok:2000"), "{queued}");
    let wrap = queued
        .lines()
        .find_map(|l| l.strip_prefix("--wrap="))
        .unwrap_or_else(|| panic!("no --wrap in {queued}"));
    let (ok, _, stderr) = output(shell(&dir, wrap));
    assert!(ok, "the queued merge `{wrap}` failed: {stderr}");
    let merged = results(&dir.join("results/1000/merged"));
    assert_eq!(merged["complete"], true);
    assert_eq!(merged["counts"]["evaluated"], 8);
    assert_eq!(merged["dataset"]["examples_total_selected"], 8);

    // Without SEGQ_SHARD_COUNT (the script before the fix), the one-task rerun is refused instead of silently
    // evaluating the whole selection as shard 0 of 1.
    let mut old = shell(&dir, "segq -q eval --shard auto --out rerun-without-count");
    old.env("SLURM_ARRAY_TASK_ID", "5")
        .env("SLURM_ARRAY_TASK_MIN", "5")
        .env("SLURM_ARRAY_TASK_MAX", "5")
        .env("SLURM_ARRAY_TASK_COUNT", "1");
    let (ok, _, stderr) = output(old);
    assert!(!ok);
    assert!(stderr.contains("SEGQ_SHARD_COUNT"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The keys of `segq config init`'s file per section, as (section, key, the line with its `#` removed).
fn config_init_keys() -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in segq::config::DEFAULT_FILE.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let setting = line.trim_start_matches('#').trim_start();
        let Some((key, _)) = setting.split_once(" = ") else {
            continue;
        };
        if !section.is_empty() && !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            out.push((section.clone(), key.to_string(), setting.to_string()));
        }
    }
    out
}

/// The keys the tables of docs/configuration.md document, per `## [section]` heading.
fn documented_keys() -> Vec<(String, String)> {
    let mut section = None;
    let mut out = Vec::new();
    for line in read("docs/configuration.md").lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            section = heading
                .trim()
                .strip_prefix("`[")
                .and_then(|h| h.strip_suffix("]`"))
                .map(str::to_string);
            continue;
        }
        if let (Some(section), Some(cell)) = (&section, line.strip_prefix("| `")) {
            let key = cell.split('`').next().unwrap_or_default();
            out.push((section.clone(), key.to_string()));
        }
    }
    out
}

/// `segq config init` writes every key the reference documents (set or as a commented example), each example
/// valid as written, and the reference documents every key the file has: `tracking.name` was once missing.
#[test]
fn config_init_and_the_configuration_reference_list_the_same_keys() {
    let init = config_init_keys();
    for (section, _, setting) in &init {
        let snippet = format!("[{section}]\n{setting}\n");
        if let Err(e) = Config::from_toml(&snippet, "segq config init") {
            panic!("`segq config init` shows `{setting}` under [{section}], which segq refuses: {e}");
        }
    }
    let documented = documented_keys();
    assert!(
        documented.len() >= 30,
        "docs/configuration.md's tables were not found: {documented:?}"
    );
    let in_init: Vec<(String, String)> = init.iter().map(|(s, k, _)| (s.clone(), k.clone())).collect();
    let missing_in_init: Vec<_> = documented.iter().filter(|k| !in_init.contains(k)).collect();
    assert!(
        missing_in_init.is_empty(),
        "documented but not in `segq config init`: {missing_in_init:?}"
    );
    let missing_in_docs: Vec<_> = in_init.iter().filter(|k| !documented.contains(k)).collect();
    assert!(
        missing_in_docs.is_empty(),
        "in `segq config init` but not documented: {missing_in_docs:?}"
    );
}

/// Every environment variable segq's source reads is in docs/configuration.md's table.
#[test]
fn every_environment_variable_segq_reads_is_documented() {
    let docs = read("docs/configuration.md");
    let table = docs
        .split("## Environment variables")
        .nth(1)
        .expect("the section exists");
    let mut sources = vec![repo_root().join("src")];
    let mut names = std::collections::BTreeSet::new();
    while let Some(path) = sources.pop() {
        if path.is_dir() {
            sources.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for literal in text.split('"').skip(1).step_by(2) {
            let prefixed = ["WANDB_", "HF_", "SEGQ_", "SLURM_", "JOB_", "XDG_"]
                .iter()
                .any(|p| literal.starts_with(p));
            let plain = ["NO_COLOR", "RUST_LOG", "NETRC", "HOME"].contains(&literal);
            let name_like = literal.len() > 3
                && literal
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            if (prefixed || plain) && name_like {
                names.insert(literal.to_string());
            }
        }
    }
    assert!(
        names.contains("SEGQ_SIMD") && names.contains("WANDB_API_KEY"),
        "{names:?}"
    );
    let undocumented: Vec<_> = names.iter().filter(|n| !table.contains(&format!("`{n}`"))).collect();
    assert!(
        undocumented.is_empty(),
        "environment variables segq reads that docs/configuration.md does not list: {undocumented:?}"
    );
}
