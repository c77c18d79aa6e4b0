//! A Hub dataset read in part: against a fake Hub (HF_ENDPOINT) serving a split as 3 Parquet files of 4 rows,
//! `--limit` downloads only the first file and `--shard 1/2` only the files holding its rows (row counts from the
//! footers, read by Range requests, then from the counts saved in segq's cache); the scores equal a run on all
//! files locally; and an offline run (HF_HUB_OFFLINE) on that partial cache works for the same rows and names the
//! missing file for others.

#[path = "support/parquet.rs"]
mod parquet_support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use parquet_support::{FixtureRow, write_parquet_dataset};
use serde_json::Value;

const COMMIT: &str = "4f1c2b3a4d5e6f708192a3b4c5d6e7f809112233";
const SPLIT_DIR: &str = "scene_parsing/validation";
const FILES: [&str; 3] = ["0000.parquet", "0001.parquet", "0002.parquet"];

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("segq-hubsel-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The demo's 12 scenes as `<dir>/scene_parsing/validation/000N.parquet`, 4 rows each in row groups of 2.
fn write_split(dir: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/ade/ADEChallengeData2016");
    let pairs = segq::data::folders::ade_pairs(&root, "validation").unwrap();
    assert_eq!(pairs.len(), 12);
    let split = dir.join(SPLIT_DIR);
    std::fs::create_dir_all(&split).unwrap();
    for (chunk, name) in pairs.chunks(4).zip(FILES) {
        let rows: Vec<FixtureRow> = chunk
            .iter()
            .map(|p| FixtureRow {
                image: Some(std::fs::read(&p.image).unwrap()),
                label: Some(std::fs::read(&p.mask).unwrap()),
                path: Some(format!("{}.jpg", p.id)),
            })
            .collect();
        write_parquet_dataset(&split.join(name), &rows, 2, "image", "annotation").unwrap();
    }
}

/// A request for a file: its name and the Range header.
#[derive(Clone, Debug)]
struct FileRequest {
    file: String,
    range: String,
}

impl FileRequest {
    /// A download of the file's content (hf-hub asks `bytes=0-0` for metadata, then `bytes=0-`).
    fn is_download(&self) -> bool {
        self.range.starts_with("bytes=") && self.range != "bytes=0-0" && !self.range.starts_with("bytes=-")
    }
    fn is_footer(&self) -> bool {
        self.range.starts_with("bytes=-")
    }
}

/// A fake Hub: the revision API (file list and commit) and `resolve/` with Range support, recording file requests.
struct FakeHub {
    url: String,
    requests: Arc<Mutex<Vec<FileRequest>>>,
}

impl FakeHub {
    fn start(split_root: PathBuf) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&requests);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut range = String::new();
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                        break;
                    }
                    if let Some((name, value)) = header.split_once(':')
                        && name.trim().eq_ignore_ascii_case("range")
                    {
                        range = value.trim().to_string();
                    }
                }
                let (status, headers, body) = answer(&split_root, &path, &range, &log);
                let mut head = format!(
                    "HTTP/1.1 {status} Fake\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                for (name, value) in headers {
                    head.push_str(&format!("{name}: {value}\r\n"));
                }
                head.push_str("\r\n");
                let _ = writer.write_all(head.as_bytes());
                let _ = writer.write_all(&body);
                let _ = writer.flush();
            }
        });
        FakeHub { url, requests }
    }

    fn take(&self) -> Vec<FileRequest> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }
}

fn answer(
    root: &Path,
    path: &str,
    range: &str,
    log: &Mutex<Vec<FileRequest>>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    if path.starts_with("/api/datasets/fake/scenes/revision/") {
        let siblings: Vec<Value> = FILES
            .iter()
            .map(|f| serde_json::json!({"rfilename": format!("{SPLIT_DIR}/{f}")}))
            .chain([serde_json::json!({"rfilename": "README.md"})])
            .collect();
        let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
        return (
            200,
            vec![("Content-Type".into(), "application/json".into())],
            body.into_bytes(),
        );
    }
    let Some(rest) = path.strip_prefix("/datasets/fake/scenes/resolve/") else {
        return (404, Vec::new(), b"not found".to_vec());
    };
    // `<revision>/<config>/<split>/<file>`; the revision is a commit or the url-encoded ref.
    let Some((_, file)) = rest.split_once('/') else {
        return (404, Vec::new(), Vec::new());
    };
    let Ok(bytes) = std::fs::read(root.join(file)) else {
        return (404, Vec::new(), b"no such file".to_vec());
    };
    log.lock().unwrap().push(FileRequest {
        file: file.rsplit('/').next().unwrap().to_string(),
        range: range.to_string(),
    });
    let size = bytes.len();
    let (start, end) = match range.strip_prefix("bytes=") {
        Some(spec) => match spec.split_once('-') {
            Some(("", n)) => (size - n.parse::<usize>().unwrap().min(size), size),
            Some((a, "")) => (a.parse().unwrap(), size),
            Some((a, b)) => (a.parse().unwrap(), b.parse::<usize>().unwrap() + 1),
            None => (0, size),
        },
        None => (0, size),
    };
    let headers = vec![
        ("ETag".into(), format!("\"etag-{file}\"").replace('/', "-")),
        ("X-Repo-Commit".into(), COMMIT.into()),
        ("Content-Range".into(), format!("bytes {start}-{}/{size}", end - 1)),
    ];
    (206, headers, bytes[start..end].to_vec())
}

/// `segq eval` of f32 on `dataset`, against `hub`, with its own Hub cache and segq cache.
fn eval(hub: &str, caches: &Path, dataset: &str, out: &Path, selection: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_segq"));
    c.env("HF_ENDPOINT", hub)
        .env("HF_HUB_CACHE", caches.join("hf"))
        .env("XDG_CACHE_HOME", caches.join("xdg"))
        .env("HF_HOME", caches.join("hf-home"))
        .env("WANDB_MODE", "disabled")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .env_remove("RUST_LOG")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .args([
            "-q",
            "eval",
            "--quant",
            "f32",
            "--threads",
            "2",
            "--set",
            "eval.samples=0",
        ])
        .args(["--dataset", dataset, "--split", "validation", "--out"])
        .arg(out)
        .args(selection);
    c
}

fn run_ok(mut command: Command) -> Value {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out = command
        .get_args()
        .skip_while(|a| *a != "--out")
        .nth(1)
        .map(PathBuf::from)
        .unwrap();
    serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap()
}

/// What must match between two runs of the same rows: counts, selection and each level's confusion matrix.
fn evaluated(results: &Value) -> Value {
    serde_json::json!({
        "counts": results["counts"],
        "selected": results["dataset"]["examples_total_selected"],
        "confusion": results["levels"].as_array().unwrap().iter().map(|l| l["confusion"].clone()).collect::<Vec<_>>(),
    })
}

fn downloads(requests: &[FileRequest]) -> Vec<String> {
    let mut files: Vec<String> = requests
        .iter()
        .filter(|r| r.is_download())
        .map(|r| r.file.clone())
        .collect();
    files.sort();
    files.dedup();
    files
}

#[test]
fn only_the_files_holding_the_selected_rows_are_downloaded() {
    let dir = scratch("select");
    let split_root = dir.join("hub");
    write_split(&split_root);
    let hub = FakeHub::start(split_root.clone());
    let local = split_root.to_str().unwrap();

    // --limit 2: rows 0..2, all in the first file. Row counts come from the three footers.
    let caches = dir.join("caches-a");
    let limited = run_ok(eval(
        &hub.url,
        &caches,
        "fake/scenes",
        &dir.join("a"),
        &["--limit", "2"],
    ));
    let requests = hub.take();
    assert_eq!(downloads(&requests), ["0000.parquet"], "{requests:?}");
    let footers: Vec<&str> = requests
        .iter()
        .filter(|r| r.is_footer())
        .map(|r| r.file.as_str())
        .collect();
    assert_eq!(footers, FILES, "one footer read per file: {requests:?}");
    let whole_local = run_ok(eval(&hub.url, &caches, local, &dir.join("a-local"), &["--limit", "2"]));
    assert_eq!(evaluated(&limited), evaluated(&whole_local));
    assert_eq!(limited["counts"]["evaluated"], 2);

    // --shard 1/2 in a fresh Hub cache: rows 6..12 are in files 1 and 2; the counts saved by the first run are
    // reused, so no footer is read again.
    let fresh = dir.join("caches-b");
    std::fs::create_dir_all(&fresh).unwrap();
    let _ = std::fs::remove_dir_all(fresh.join("xdg"));
    copy_dir(&caches.join("xdg"), &fresh.join("xdg"));
    let shard = run_ok(eval(
        &hub.url,
        &fresh,
        "fake/scenes",
        &dir.join("b"),
        &["--shard", "1/2"],
    ));
    let requests = hub.take();
    assert_eq!(downloads(&requests), ["0001.parquet", "0002.parquet"], "{requests:?}");
    assert!(!requests.iter().any(FileRequest::is_footer), "{requests:?}");
    let shard_local = run_ok(eval(&hub.url, &fresh, local, &dir.join("b-local"), &["--shard", "1/2"]));
    assert_eq!(evaluated(&shard), evaluated(&shard_local));
    assert_eq!(shard["counts"]["evaluated"], 6);

    // Offline on that partial cache: the same shard works from the cache and the saved counts...
    let mut offline = eval(&hub.url, &fresh, "fake/scenes", &dir.join("c"), &["--shard", "1/2"]);
    offline.env("HF_HUB_OFFLINE", "1");
    assert_eq!(evaluated(&run_ok(offline)), evaluated(&shard));
    // ...and rows in the file never downloaded are refused, naming it.
    let mut missing = eval(&hub.url, &fresh, "fake/scenes", &dir.join("d"), &["--limit", "2"]);
    missing.env("HF_HUB_OFFLINE", "1");
    let output = missing.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_ne!(output.status.code(), Some(101), "{stderr}");
    assert!(
        stderr.contains("0000.parquet") && stderr.contains("HF_HUB_OFFLINE"),
        "{stderr}"
    );
    assert!(hub.take().is_empty(), "offline runs make no request");

    // The whole split (no selection) still downloads every file.
    let all = run_ok(eval(
        &hub.url,
        &dir.join("caches-c"),
        "fake/scenes",
        &dir.join("e"),
        &[],
    ));
    assert_eq!(downloads(&hub.take()), FILES);
    assert_eq!(all["counts"]["evaluated"], 12);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
