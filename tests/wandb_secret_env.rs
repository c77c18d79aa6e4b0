//! With a (fake) API key in the real environment, nothing segq writes or reports contains it: an offline run,
//! and an online run whose server is unreachable (the key is loaded and used, then the run falls back offline).

mod wandb_support;

use std::time::Duration;

use segq::track::wandb::{OnlineOptions, log_runs_with};
use segq::track::{TrackingMode, TrackingSettings, log_runs};
use wandb_support::{all_files, assert_secret_absent, example_run, temp_dir};

const FAKE_KEY: &str = "fakekey-9f8e7d6c5b4a39281706f5e4d3c2b1a0";

#[test]
fn key_from_env_never_reaches_files_logs_or_errors() {
    // This test binary is its own process and this is its only test, so setting the variable races nothing.
    unsafe { std::env::set_var("WANDB_API_KEY", FAKE_KEY) };
    let dir = temp_dir("secret-env");
    let offline = TrackingSettings {
        mode: Some(TrackingMode::Offline),
        dir: Some(dir.clone()),
        ..Default::default()
    };
    let outcome = log_runs(&offline, &[example_run("offline")]).unwrap();
    let mut reports = vec![format!("{outcome:?}")];

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let online = TrackingSettings {
        mode: Some(TrackingMode::Online),
        base_url: Some(format!("http://127.0.0.1:{port}")),
        dir: Some(dir.clone()),
        ..Default::default()
    };
    let options = OnlineOptions {
        attempts: 2,
        base_delay: Duration::from_millis(1),
        ..Default::default()
    };
    let outcome = log_runs_with(&online, &[example_run("online")], &options, &|n| std::env::var(n).ok()).unwrap();
    assert_eq!(outcome.runs[0].mode, TrackingMode::Offline);
    reports.push(format!("{outcome:?}"));
    let refused = TrackingSettings {
        base_url: Some("http://10.1.2.3".into()),
        ..online
    };
    reports.push(log_runs(&refused, &[example_run("x")]).unwrap_err().to_string());

    let files = all_files(&dir);
    assert!(files.len() >= 10, "two runs with .wandb logs and media: {files:?}");
    let reports: Vec<&str> = reports.iter().map(String::as_str).collect();
    assert_secret_absent(FAKE_KEY, &reports, &[&dir]);
}
