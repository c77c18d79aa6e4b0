//! The documentation's commands, run as written. Every shell block in README.md and docs/*.md whose fence is tagged
//! `offline` (```` ```sh offline ````: renders as a plain shell block) runs against the embedded demo, with no
//! network and a fresh home, cache and working folder, and must exit 0. `cargo run --release --` and `segq` run the
//! binary under test. A ```` ```text output ```` block right after such a block is its sample output: every line of
//! it must appear in what the commands printed (`...` stands for anything, runs of spaces for any spacing).
//! Shell blocks that need the network, a cluster or an install are listed in [`SKIPPED`] with the reason; an
//! unmarked block missing from that list fails the test, so every new command gets classified.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::repo_root;

/// Shell blocks deliberately not run: (file, text the block contains, why).
const SKIPPED: &[(&str, &str, &str)] = &[
    ("README.md", "cargo test", "runs this test suite itself"),
    (
        "README.md",
        "--model nvidia/segformer-b0-finetuned-ade-512-512 --dataset scene_parse_150",
        "downloads SegFormer-B0 and Scene Parse 150 from the Hugging Face Hub",
    ),
    (
        "docs/quickstart.md",
        "cargo install --path .",
        "installs segq into ~/.cargo/bin (a release build of the whole crate); the tests run the built binary",
    ),
    (
        "docs/quickstart.md",
        "--model nvidia/segformer-b0-finetuned-ade-512-512 --dataset scene_parse_150",
        "downloads SegFormer-B0 and Scene Parse 150 from the Hugging Face Hub",
    ),
    (
        "docs/quickstart.md",
        "segq predict --model nvidia/segformer-b0-finetuned-ade-512-512",
        "downloads SegFormer-B0 and needs the user's photos",
    ),
    (
        "docs/quickstart.md",
        "segq inspect --model nvidia/segformer-b0-finetuned-ade-512-512",
        "downloads SegFormer-B0",
    ),
    (
        "docs/quickstart.md",
        "segq quantize --model nvidia/segformer-b0-finetuned-ade-512-512",
        "downloads SegFormer-B0 and Scene Parse 150",
    ),
    (
        "docs/quickstart.md",
        "segq eval --dataset scene_parse_150 --shard $i/4",
        "downloads Scene Parse 150 (the shard-and-merge path runs offline in tests/merge_shards.rs)",
    ),
    (
        "docs/cluster.md",
        "sbatch --array=<task>",
        "needs a Slurm cluster (tests/docs_examples.rs runs the script with stand-ins for sbatch and srun)",
    ),
    (
        "docs/offline.md",
        "huggingface-cli download",
        "downloads from the Hugging Face Hub",
    ),
    (
        "docs/offline.md",
        "segq eval --model nvidia/segformer-b0-finetuned-ade-512-512 --dataset scene_parse_150 --limit 1",
        "downloads SegFormer-B0 and Scene Parse 150 from the Hugging Face Hub",
    ),
    ("docs/offline.md", "rsync -a", "copies a cache between two machines"),
    (
        "docs/offline.md",
        "HF_HUB_OFFLINE=1 segq eval --model nvidia/segformer-b0-finetuned-ade-512-512",
        "needs the filled cache of the blocks before it",
    ),
    (
        "docs/sensitivity.md",
        "demo32.txt",
        "the 32-image benchmark: minutes in a release build, recorded in the page",
    ),
];

/// The longest a runnable block may take before the test calls it hung (the default demo eval takes well under).
const BLOCK_TIMEOUT: Duration = Duration::from_secs(900);

/// A fenced code block of a Markdown file.
#[derive(Debug, Clone)]
struct Block {
    file: String,
    line: usize,
    lang: String,
    tags: Vec<String>,
    text: String,
}

impl Block {
    fn is_shell(&self) -> bool {
        matches!(self.lang.as_str(), "sh" | "bash" | "shell" | "console")
    }
    fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
    fn runnable(&self) -> bool {
        self.is_shell() && self.has_tag("offline")
    }
    fn is_sample_output(&self) -> bool {
        self.lang == "text" && self.has_tag("output")
    }
}

/// The fenced blocks of `text` (``` or ~~~ fences, indented up to a list item's depth).
fn blocks(file: &str, text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<(String, Block)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let fence: String = trimmed.chars().take_while(|c| *c == '`' || *c == '~').collect();
        match &mut open {
            Some((marker, block)) => {
                if trimmed.trim_end() == marker.as_str() {
                    out.push(open.take().unwrap().1);
                } else {
                    block.text.push_str(line);
                    block.text.push('\n');
                }
            }
            None if fence.len() >= 3 && fence.chars().all(|c| c == fence.chars().next().unwrap()) => {
                let mut info = trimmed[fence.len()..].split_whitespace().map(str::to_string);
                let block = Block {
                    file: file.to_string(),
                    line: i + 1,
                    lang: info.next().unwrap_or_default(),
                    tags: info.collect(),
                    text: String::new(),
                };
                open = Some((fence, block));
            }
            None => {}
        }
    }
    assert!(open.is_none(), "{file}: a code block is never closed");
    out
}

/// README.md and every docs/*.md, as (path relative to the repository, text).
fn documentation() -> Vec<(String, String)> {
    let root = repo_root();
    let mut files = vec![PathBuf::from("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| p.strip_prefix(&root).unwrap().to_path_buf())
        .collect();
    docs.sort();
    files.extend(docs);
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(root.join(&p)).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.to_string_lossy().replace('\\', "/"), text)
        })
        .collect()
}

fn all_blocks() -> Vec<Block> {
    documentation()
        .iter()
        .flat_map(|(file, text)| blocks(file, text))
        .collect()
}

/// Whitespace runs collapsed to one space, ends trimmed.
fn normalized(line: &str) -> String {
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// True when `actual` holds the pieces of `sample` between its `...` in order.
fn line_matches(sample: &str, actual: &str) -> bool {
    let actual = normalized(actual);
    let mut rest = actual.as_str();
    for piece in normalized(sample).split("...").map(str::trim).filter(|p| !p.is_empty()) {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

/// A scratch folder for one documentation file's commands: `home/`, `cache/`, `hf/`, `bin/segq`, `work/`.
struct Sandbox {
    root: PathBuf,
}

impl Sandbox {
    fn new(file: &str) -> Sandbox {
        let name = file.replace(['/', '.'], "-");
        let root = std::env::temp_dir().join(format!("segq-docs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for sub in ["home", "cache", "hf", "bin", "work"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_segq"), root.join("bin/segq")).unwrap();
        Sandbox { root }
    }

    /// `bash` running `script` in `work/` as a user without network, W&B key or scheduler would.
    fn command(&self, script: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg("-euo").arg("pipefail").arg("-c").arg(script);
        c.current_dir(self.root.join("work"));
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            let scheduler = name.starts_with("SLURM_") || name.starts_with("SEGQ_") || name == "JOB_COMPLETION_INDEX";
            if name.starts_with("WANDB_") || name.starts_with("HF_") || scheduler {
                c.env_remove(&name);
            }
        }
        let path = std::env::var("PATH").unwrap_or_default();
        c.env("PATH", format!("{}:{path}", self.root.join("bin").display()))
            .env("HOME", self.root.join("home"))
            .env("XDG_CACHE_HOME", self.root.join("cache"))
            .env("HF_HOME", self.root.join("hf"))
            .env("HF_HUB_OFFLINE", "1")
            .env("NO_COLOR", "1")
            .env_remove("NETRC")
            .env_remove("RUST_LOG")
            .env_remove("RAYON_NUM_THREADS");
        c
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The block's commands with `cargo run --release --` turned into `segq` (the binary under test).
fn script_of(block: &Block) -> String {
    block
        .text
        .replace("cargo run --release -- ", "segq ")
        .replace("cargo run --release --\n", "segq\n")
}

struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
    seconds: f64,
}

fn run(sandbox: &Sandbox, script: &str) -> Ran {
    let start = Instant::now();
    let dir = sandbox.root.join("work");
    let (stdout_path, stderr_path) = (sandbox.root.join("stdout"), sandbox.root.join("stderr"));
    let mut child = sandbox
        .command(script)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("bash in {}: {e}", dir.display()));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > BLOCK_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ran {
        ok: status.is_some_and(|s| s.success()),
        stdout: std::fs::read_to_string(stdout_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(stderr_path).unwrap_or_default(),
        seconds: start.elapsed().as_secs_f64(),
    }
}

#[test]
fn parses_fences_tags_and_sample_lines() {
    let doc = "intro\n```sh offline\nsegq eval\n```\n\n  ~~~text output\n  a  b ... c\n  ~~~\n```toml\nx = 1\n```\n";
    let found = blocks("x.md", doc);
    assert_eq!(found.len(), 3);
    assert!(found[0].runnable() && found[0].line == 2 && found[0].text == "segq eval\n");
    assert!(found[1].is_sample_output() && !found[1].runnable());
    assert!(!found[2].is_shell());
    assert!(line_matches("a  b ... c", "a b  then  c d"));
    assert!(!line_matches("a b ... c", "c a b"));
    assert!(line_matches(
        "int8-rtn rtn 8.07 ... ok",
        "int8-rtn   rtn   8.07  62.11  ok"
    ));
    assert_eq!(
        script_of(&Block {
            text: "cargo run --release -- eval --limit 2\n".into(),
            ..found[0].clone()
        }),
        "segq eval --limit 2\n"
    );
}

#[test]
fn every_shell_block_is_run_or_skipped_with_a_reason() {
    let blocks = all_blocks();
    let mut unclassified = Vec::new();
    for block in blocks.iter().filter(|b| b.is_shell() && !b.runnable()) {
        if !SKIPPED
            .iter()
            .any(|(file, text, _)| block.file == *file && block.text.contains(text))
        {
            unclassified.push(format!("{}:{}: {}", block.file, block.line, block.text.trim()));
        }
    }
    assert!(
        unclassified.is_empty(),
        "shell blocks neither tagged `offline` nor listed in SKIPPED (tag the fence ```sh offline when the commands \
         run offline on the demo, else add the block to SKIPPED with the reason):\n{}",
        unclassified.join("\n")
    );
    for (file, text, why) in SKIPPED {
        assert!(!why.is_empty());
        assert!(
            blocks
                .iter()
                .any(|b| b.is_shell() && !b.runnable() && b.file == *file && b.text.contains(text)),
            "SKIPPED lists `{text}` in {file}, but no unmarked shell block there holds it: remove the entry"
        );
    }
    for (i, block) in blocks.iter().enumerate() {
        if block.is_sample_output() {
            let before = i.checked_sub(1).map(|j| &blocks[j]);
            assert!(
                before.is_some_and(|b| b.runnable() && b.file == block.file),
                "{}:{}: a ```text output block must follow a ```sh offline block",
                block.file,
                block.line
            );
        }
    }
    assert!(
        blocks.iter().filter(|b| b.runnable()).count() >= 5,
        "the documentation lost its runnable commands"
    );
}

#[test]
fn documented_offline_commands_run_and_print_what_the_docs_show() {
    let mut failures = Vec::new();
    for (file, text) in documentation() {
        let blocks = blocks(&file, &text);
        if !blocks.iter().any(Block::runnable) {
            continue;
        }
        // One sandbox per page: its blocks run in order, as a reader follows the page.
        let sandbox = Sandbox::new(&file);
        for (i, block) in blocks.iter().enumerate() {
            if !block.runnable() {
                continue;
            }
            let ran = run(&sandbox, &script_of(block));
            eprintln!(
                "{:.1} s: {}:{}: {}",
                ran.seconds,
                block.file,
                block.line,
                block.text.trim()
            );
            if !ran.ok {
                failures.push(format!(
                    "{}:{}: `{}` failed (or ran past {} s); stderr:\n{}",
                    block.file,
                    block.line,
                    block.text.trim(),
                    BLOCK_TIMEOUT.as_secs(),
                    ran.stderr.trim()
                ));
                continue;
            }
            let Some(sample) = blocks.get(i + 1).filter(|b| b.is_sample_output()) else {
                continue;
            };
            let printed: Vec<&str> = ran.stdout.lines().chain(ran.stderr.lines()).collect();
            for line in sample.text.lines().filter(|l| !l.trim().is_empty()) {
                if !printed.iter().any(|p| line_matches(line, p)) {
                    failures.push(format!(
                        "{}:{}: sample output line\n  {}\nis not in what `{}` printed:\n{}",
                        sample.file,
                        sample.line,
                        line.trim(),
                        block.text.trim(),
                        ran.stdout
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The sandbox really hides the network and the user's credentials (a check of the test itself).
#[test]
fn sandbox_is_offline_and_keyless() {
    let sandbox = Sandbox::new("sandbox-check");
    let ran = run(
        &sandbox,
        "echo \"$HF_HUB_OFFLINE ${WANDB_API_KEY-unset} ${HF_TOKEN-unset} $HOME\"; command -v segq",
    );
    assert!(ran.ok, "{}", ran.stderr);
    let home = sandbox.root.join("home");
    assert!(
        ran.stdout.starts_with(&format!("1 unset unset {}", home.display())),
        "{}",
        ran.stdout
    );
    assert!(
        Path::new(ran.stdout.lines().nth(1).unwrap()).starts_with(&sandbox.root),
        "{}",
        ran.stdout
    );
}

/// `segq eval` ends by saying where everything is: the table is a summary, the files hold the rest.
#[test]
fn eval_ends_by_naming_the_full_results() {
    let sandbox = Sandbox::new("final-line");
    let ran = run(
        &sandbox,
        "segq eval --quant f32 --limit 1 --wandb disabled --out run-out",
    );
    assert!(ran.ok, "{}", ran.stderr);
    let last = ran.stdout.lines().rfind(|l| !l.trim().is_empty()).unwrap_or_default();
    assert_eq!(
        last,
        "full results: run-out/summary.md, run-out/results.json (plots/ and samples/ beside them)"
    );
    for file in ["summary.md", "results.json"] {
        assert!(sandbox.root.join("work/run-out").join(file).is_file(), "{file}");
    }
}
