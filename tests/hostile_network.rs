//! Hostile network input, through the `segq` binary: W&B servers that refuse, hang, fail, throttle or answer
//! garbage; W&B settings that cannot work (refused before the evaluation starts); and model downloads that are
//! endless, too large, HTML pages, junk, errors or cut short. Each case checks the exit code, the one line naming
//! the culprit, that the API key appears nowhere, that every level's offline run is on disk, and that no bad or
//! partial download stays in the cache (the next run against a fixed server succeeds).
//!
//! Servers are loopback threads; W&B cases run with a 2-second retry budget and HTTP timeout, so a hanging server
//! costs seconds.

mod hostile_support;
mod wandb_support;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hostile_support::{Outcome, scratch, segq};
use wandb_support::{
    ScriptedServer, all_files, assert_secret_absent, closed_port_url, run_folders, stalling_server, wandb_like,
};

const FAKE_KEY: &str = "hostile-fake-wandb-key-5e1f0c3d2b1a";

/// `segq eval` of two levels of the demo on one image, online to `base_url` with a 2 s budget and timeout; the run
/// folders go to the returned output folder.
fn eval_online(case: &str, base_url: &str) -> (hostile_support::Case, PathBuf) {
    eval_online_with_budget(case, base_url, "2")
}

/// [`eval_online`] with another `tracking.retry_budget_s`.
fn eval_online_with_budget(case: &str, base_url: &str, budget: &str) -> (hostile_support::Case, PathBuf) {
    let out = scratch(&format!("{case}-out"));
    let budget = format!("tracking.retry_budget_s={budget}");
    let command = segq(
        case,
        &[
            "eval",
            "--quant",
            "f32,int8",
            "--method",
            "rtn",
            "--limit",
            "1",
            "--set",
            "eval.samples=1",
            "--set",
            &budget,
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .env("WANDB_MODE", "online")
    .env("WANDB_API_KEY", FAKE_KEY)
    .env("WANDB_BASE_URL", base_url)
    .env("WANDB_HTTP_TIMEOUT", "2")
    .timeout(Duration::from_secs(90));
    (command, out)
}

/// The key is in no output and no file written.
fn assert_key_nowhere(outcome: &Outcome, dirs: &[&Path]) {
    assert_secret_absent(FAKE_KEY, &[&outcome.stderr, &outcome.stdout], dirs);
}

/// Both levels' runs are on disk as offline runs, and every failure line names the server and its folder.
fn assert_runs_kept_offline(outcome: &Outcome, out: &Path, server: &str) {
    let folders = run_folders(out);
    assert_eq!(folders.len(), 2, "one run per level: {folders:?}\n{}", outcome.stderr);
    for folder in &folders {
        let name = folder.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("offline-run-"), "{name}");
        assert!(
            outcome.stderr.contains(&format!("wandb sync {}", folder.display())),
            "no sync line for {name}:\n{}",
            outcome.stderr
        );
    }
    let failures: Vec<&str> = outcome
        .stderr
        .lines()
        .filter(|l| l.contains(server) && l.contains("wandb sync"))
        .collect();
    assert_eq!(failures.len(), 2, "one line per run:\n{}", outcome.stderr);
    assert!(failures.iter().all(|l| l.contains(server)), "{failures:?}");
    assert_key_nowhere(outcome, &[out]);
}

#[test]
fn wandb_server_refusing_connections() {
    let url = closed_port_url();
    let (case, out) = eval_online("wandb-refused", &url);
    let outcome = case.run();
    outcome.succeeded();
    assert_runs_kept_offline(&outcome, &out, &url);
}

#[test]
fn wandb_server_hanging_after_accept() {
    let (url, _) = stalling_server("");
    let (case, out) = eval_online("wandb-hang", &url);
    let outcome = case.run();
    outcome
        .succeeded()
        .warns(&["no answer within 2 s", "tracking.retry_budget_s"]);
    assert_runs_kept_offline(&outcome, &out, &url);
}

#[test]
fn wandb_server_hanging_mid_answer() {
    let (url, _) = stalling_server("HTTP/1.1 200 OK\r\nContent-Length: 900\r\n\r\n{\"data\": {\"upsert");
    let (case, out) = eval_online("wandb-hang-mid", &url);
    let outcome = case.run();
    outcome.succeeded();
    assert_runs_kept_offline(&outcome, &out, &url);
}

#[test]
fn wandb_server_failing_with_500() {
    let server = ScriptedServer::start(|_, _, _| (500, Vec::new(), "{\"error\": \"boom\"}".into()));
    let (case, out) = eval_online("wandb-500", &server.base_url);
    let outcome = case.run();
    outcome.succeeded().warns(&["HTTP 500", "gave up after"]);
    assert_runs_kept_offline(&outcome, &out, &server.base_url);
}

#[test]
fn wandb_server_failing_once_then_working() {
    let server = ScriptedServer::start(|request, index, base| match index {
        0 => (500, Vec::new(), "{\"error\": \"boom\"}".into()),
        _ => wandb_like(request, base),
    });
    let (case, out) = eval_online("wandb-500-then-ok", &server.base_url);
    let outcome = case.run();
    outcome.succeeded();
    let folders = run_folders(&out);
    assert_eq!(folders.len(), 2);
    assert!(
        folders
            .iter()
            .all(|f| f.file_name().unwrap().to_str().unwrap().starts_with("run-")),
        "both uploaded and marked synced: {folders:?}\n{}",
        outcome.stderr
    );
    assert!(!outcome.stderr.contains("wandb sync"), "{}", outcome.stderr);
    assert_key_nowhere(&outcome, &[&out]);
}

#[test]
fn wandb_server_answering_garbage() {
    let server = ScriptedServer::start(|_, _, _| (200, Vec::new(), "\u{1}\u{2}not json at all".into()));
    let (case, out) = eval_online("wandb-garbage", &server.base_url);
    let outcome = case.run();
    outcome.succeeded().warns(&["not JSON"]);
    assert_runs_kept_offline(&outcome, &out, &server.base_url);
}

#[test]
fn wandb_server_rejecting_the_key() {
    let server =
        ScriptedServer::start(|_, _, _| (401, Vec::new(), "{\"errors\": [{\"message\": \"bad key\"}]}".into()));
    let (case, out) = eval_online("wandb-401", &server.base_url);
    let outcome = case.run();
    outcome.succeeded().warns(&["HTTP 401"]);
    assert_eq!(
        server.recorded().len(),
        1,
        "a refused key is not retried, nor tried again for the next run"
    );
    assert_runs_kept_offline(&outcome, &out, &server.base_url);
}

#[test]
fn wandb_server_throttling_briefly() {
    let server = ScriptedServer::start(|request, index, base| match index {
        0 => (429, vec![("Retry-After".into(), "1".into())], "{}".into()),
        _ => wandb_like(request, base),
    });
    let (case, out) = eval_online("wandb-429-short", &server.base_url);
    let outcome = case.run();
    outcome.succeeded();
    assert!(
        run_folders(&out)
            .iter()
            .all(|f| f.file_name().unwrap().to_str().unwrap().starts_with("run-"))
    );
}

#[test]
fn wandb_server_throttling_beyond_the_budget() {
    let server = ScriptedServer::start(|_, _, _| (429, vec![("Retry-After".into(), "600".into())], "{}".into()));
    let (case, out) = eval_online("wandb-429-long", &server.base_url);
    let outcome = case.run();
    outcome.succeeded().warns(&["wait 600 s"]);
    assert_eq!(server.recorded().len(), 1, "gave up at once");
    assert_runs_kept_offline(&outcome, &out, &server.base_url);
}

#[test]
fn wandb_upload_interrupted_with_ctrl_c() {
    let (url, connections) = stalling_server("");
    // Long limits: only the interrupt can end the upload quickly.
    let (case, out) = eval_online_with_budget("wandb-sigint", &url, "300");
    let running = case.env("WANDB_HTTP_TIMEOUT", "300").spawn();
    while *connections.lock().unwrap() == 0 {
        std::thread::sleep(Duration::from_millis(20));
    }
    running.signal(libc::SIGINT);
    let outcome = running.wait();
    assert!(outcome.elapsed < Duration::from_secs(60), "{:?}", outcome.elapsed);
    assert_ne!(outcome.code, Some(0), "{}", outcome.stderr);
    let folders = run_folders(&out);
    assert_eq!(folders.len(), 2, "every level's run on disk: {}", outcome.stderr);
    assert!(outcome.stderr.contains("interrupted"), "{}", outcome.stderr);
    assert_key_nowhere(&outcome, &[&out]);
}

/// `segq eval` with W&B online to a server that is never reached: for settings that must fail first.
fn eval_with(case: &str, vars: &[(&str, &str)]) -> (Outcome, PathBuf) {
    let (mut command, out) = eval_online(case, &closed_port_url());
    for (name, value) in vars {
        command = command.env(name, value);
    }
    (command.run(), out)
}

/// The refusal came before the evaluation: no results, no run folder.
fn assert_nothing_evaluated(outcome: &Outcome, out: &Path) {
    assert!(
        !out.join("results.json").exists(),
        "evaluated anyway:\n{}",
        outcome.stderr
    );
    assert!(run_folders(out).is_empty());
}

#[test]
fn wandb_mode_bogus() {
    let (outcome, out) = eval_with("wandb-mode-bogus", &[("WANDB_MODE", "bogus")]);
    outcome.refused(&["WANDB_MODE", "bogus"]);
    assert_nothing_evaluated(&outcome, &out);
}

#[test]
fn wandb_online_without_a_key() {
    let (case, out) = eval_online("wandb-no-key", &closed_port_url());
    let outcome = case.env_remove("WANDB_API_KEY").env("NETRC", "/nonexistent").run();
    outcome.refused(&["WANDB_API_KEY"]);
    assert_nothing_evaluated(&outcome, &out);
}

#[test]
fn wandb_base_url_malformed() {
    for (index, bad) in [
        "not a url",
        "http//api.wandb.ai",
        "http://:8080",
        "http://localhost:99999",
    ]
    .into_iter()
    .enumerate()
    {
        let (outcome, out) = eval_with(&format!("wandb-bad-url-{index}"), &[("WANDB_BASE_URL", bad)]);
        outcome.refused(&["WANDB_BASE_URL"]);
        assert_nothing_evaluated(&outcome, &out);
    }
}

#[test]
fn wandb_base_url_plain_http_to_another_host() {
    let (outcome, out) = eval_with("wandb-plain-http", &[("WANDB_BASE_URL", "http://wandb.example.com")]);
    outcome.refused(&["WANDB_BASE_URL", "https"]);
    assert_nothing_evaluated(&outcome, &out);
    assert_key_nowhere(&outcome, &[&out]);
}

#[test]
fn wandb_dir_is_a_file() {
    let dir = scratch("wandb-dir-file-target");
    let file = dir.join("not-a-folder");
    std::fs::write(&file, "x").unwrap();
    let (outcome, out) = eval_with("wandb-dir-file", &[("WANDB_DIR", file.to_str().unwrap())]);
    outcome.refused(&["WANDB_DIR", file.to_str().unwrap()]);
    assert_nothing_evaluated(&outcome, &out);
}

#[test]
fn wandb_http_timeout_malformed() {
    let (outcome, out) = eval_with("wandb-timeout-bad", &[("WANDB_HTTP_TIMEOUT", "soon")]);
    outcome.refused(&["WANDB_HTTP_TIMEOUT"]);
    assert_nothing_evaluated(&outcome, &out);
}

#[test]
fn wandb_retry_budget_negative() {
    let (case, out) = eval_online_with_budget("wandb-budget-bad", &closed_port_url(), "-1");
    let outcome = case.run();
    outcome.refused(&["tracking.retry_budget_s"]);
    assert_nothing_evaluated(&outcome, &out);
}

// ---------------------------------------------------------------------------------------------------------------
// Model downloads

/// How the model server answers.
#[derive(Clone, Copy, Debug)]
enum Serve {
    /// The demo model's files, as a web server would.
    Files,
    /// 200 and zeros forever, without a length.
    Endless,
    /// 200 and a Content-Length of a terabyte.
    HugeLength,
    /// 200 and a login page.
    Html,
    /// 200 and bytes that are no model file.
    Junk,
    Status(u16),
    /// 200, a Content-Length, a tenth of it, then the connection closes.
    CutShort,
    /// 200, a Content-Length, a tenth of it, then nothing while the connection stays open.
    Stall,
}

struct ModelServer {
    base_url: String,
    serve: Arc<Mutex<Serve>>,
}

impl ModelServer {
    fn start(serve: Serve) -> ModelServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let serve = Arc::new(Mutex::new(serve));
        let mode = Arc::clone(&serve);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let current = *mode.lock().unwrap();
                std::thread::spawn(move || answer(stream, current));
            }
        });
        ModelServer { base_url, serve }
    }

    fn set(&self, serve: Serve) {
        *self.serve.lock().unwrap() = serve;
    }

    fn model_url(&self) -> String {
        format!("{}/demo/model.safetensors", self.base_url)
    }
}

fn answer(mut stream: TcpStream, serve: Serve) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let name = path.rsplit('/').next().unwrap_or("").to_string();
    let head = |status: &str, extra: &str| format!("HTTP/1.1 {status}\r\n{extra}Connection: close\r\n\r\n");
    let _ = match serve {
        Serve::Files => {
            let file = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("assets/demo/model")
                .join(&name);
            match std::fs::read(&file) {
                Ok(bytes) => stream
                    .write_all(head("200 OK", &format!("Content-Length: {}\r\n", bytes.len())).as_bytes())
                    .and_then(|_| stream.write_all(&bytes)),
                Err(_) => stream.write_all(head("404 Not Found", "Content-Length: 0\r\n").as_bytes()),
            }
        }
        Serve::Endless => {
            let zeros = vec![0u8; 64 << 10];
            let mut result = stream.write_all(head("200 OK", "").as_bytes());
            while result.is_ok() {
                result = stream.write_all(&zeros);
            }
            result
        }
        Serve::HugeLength => stream.write_all(head("200 OK", "Content-Length: 1000000000000\r\n").as_bytes()),
        Serve::Html => {
            let page = "<!DOCTYPE html>\n<html><body>Please sign in</body></html>\n";
            stream.write_all(
                format!(
                    "{}{page}",
                    head(
                        "200 OK",
                        &format!("Content-Type: text/html\r\nContent-Length: {}\r\n", page.len())
                    )
                )
                .as_bytes(),
            )
        }
        Serve::Junk => {
            let junk: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
            stream
                .write_all(head("200 OK", &format!("Content-Length: {}\r\n", junk.len())).as_bytes())
                .and_then(|_| stream.write_all(&junk))
        }
        Serve::Status(code) => {
            let body = format!("{{\"error\": \"status {code}\"}}");
            stream.write_all(
                format!(
                    "{}{body}",
                    head(
                        &format!("{code} Scripted"),
                        &format!("Content-Length: {}\r\n", body.len())
                    )
                )
                .as_bytes(),
            )
        }
        Serve::CutShort | Serve::Stall => {
            let result = stream
                .write_all(head("200 OK", "Content-Length: 100000\r\n").as_bytes())
                .and_then(|_| stream.write_all(&[7u8; 10000]));
            if matches!(serve, Serve::Stall) {
                std::thread::sleep(Duration::from_secs(600));
            }
            result
        }
    };
}

/// `segq inspect --model URL` with downloads allowed and the URL cache in `cache`.
fn inspect(case: &str, url: &str, cache: &Path) -> hostile_support::Case {
    segq(case, &["inspect", "--model", url])
        .env("HF_HUB_OFFLINE", "0")
        .env("XDG_CACHE_HOME", cache)
        .timeout(Duration::from_secs(90))
}

/// Nothing in the cache: no file, no `.part`.
fn assert_cache_empty(cache: &Path, outcome: &Outcome) {
    let files = if cache.exists() { all_files(cache) } else { Vec::new() };
    assert!(files.is_empty(), "left in the cache: {files:?}\n{}", outcome.stderr);
}

/// A bad answer is refused naming the URL and `culprits`, leaves the cache empty, and a fixed server then works.
fn refused_then_fixed(case: &str, serve: Serve, vars: &[(&str, &str)], culprits: &[&str]) {
    let server = ModelServer::start(serve);
    let cache = scratch(&format!("{case}-cache"));
    let url = server.model_url();
    let mut command = inspect(case, &url, &cache);
    for (name, value) in vars {
        command = command.env(name, value);
    }
    let outcome = command.run();
    let mut named = vec![url.as_str()];
    named.extend_from_slice(culprits);
    outcome.refused(&named);
    assert_cache_empty(&cache, &outcome);
    server.set(Serve::Files);
    let fixed = inspect(&format!("{case}-fixed"), &url, &cache).run();
    fixed.succeeded();
    assert!(
        all_files(&cache)
            .iter()
            .all(|f| !f.to_string_lossy().ends_with(".part"))
    );
}

#[test]
fn download_endless_body() {
    refused_then_fixed(
        "download-endless",
        Serve::Endless,
        &[("SEGQ_MAX_DOWNLOAD_BYTES", "3000000")],
        &["SEGQ_MAX_DOWNLOAD_BYTES"],
    );
}

#[test]
fn download_announcing_more_than_the_cap() {
    refused_then_fixed(
        "download-huge",
        Serve::HugeLength,
        &[],
        &["SEGQ_MAX_DOWNLOAD_BYTES", "931.3 GiB"],
    );
}

#[test]
fn download_html_page_with_200() {
    refused_then_fixed("download-html", Serve::Html, &[], &["HTML", "200"]);
}

#[test]
fn download_junk_bytes() {
    refused_then_fixed("download-junk", Serve::Junk, &[], &["not a safetensors file"]);
}

#[test]
fn download_404() {
    refused_then_fixed("download-404", Serve::Status(404), &[], &["404"]);
}

#[test]
fn download_500() {
    refused_then_fixed("download-500", Serve::Status(500), &[], &["HTTP 500"]);
}

#[test]
fn download_cut_short() {
    refused_then_fixed("download-cut", Serve::CutShort, &[], &[]);
}

#[test]
fn download_stalling_mid_body() {
    refused_then_fixed(
        "download-stall",
        Serve::Stall,
        &[("HF_HUB_DOWNLOAD_TIMEOUT", "1")],
        &["HF_HUB_DOWNLOAD_TIMEOUT"],
    );
}

#[test]
fn download_limit_malformed() {
    let server = ModelServer::start(Serve::Files);
    let cache = scratch("download-limit-bad-cache");
    let outcome = inspect("download-limit-bad", &server.model_url(), &cache)
        .env("SEGQ_MAX_DOWNLOAD_BYTES", "lots")
        .run();
    outcome.refused(&["SEGQ_MAX_DOWNLOAD_BYTES"]);
}

#[test]
fn download_bad_entry_already_in_the_cache() {
    let server = ModelServer::start(Serve::Files);
    let cache = scratch("download-bad-cached-cache");
    let url = server.model_url();
    inspect("download-bad-cached-first", &url, &cache).run().succeeded();
    let cached: Vec<PathBuf> = all_files(&cache)
        .into_iter()
        .filter(|f| f.file_name().unwrap() == "model.safetensors")
        .collect();
    assert_eq!(cached.len(), 1);
    // What an older segq could have cached: an error page under the file's name.
    std::fs::write(&cached[0], "<html><body>502 Bad Gateway</body></html>").unwrap();
    let outcome = inspect("download-bad-cached", &url, &cache).run();
    outcome.refused(&[cached[0].to_str().unwrap(), "delete"]);
}
