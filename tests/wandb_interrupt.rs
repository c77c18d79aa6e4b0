//! A stop request (what Ctrl-C sets) during an upload to a server that never answers: the upload ends at once,
//! not at its deadline, and every run is on disk for `wandb sync`. Its own test binary, because the stop request
//! is process-wide and cannot be taken back.

mod wandb_support;

use std::time::{Duration, Instant};

use segq::track::wandb::{OnlineOptions, log_runs_with};
use segq::track::{TrackingMode, TrackingSettings};
use wandb_support::{example_run, run_folders, stalling_server, temp_dir};

#[test]
fn a_stop_request_ends_a_hanging_upload_and_keeps_every_run() {
    let (base_url, connections) = stalling_server("");
    let dir = temp_dir("online-interrupt");
    let settings = TrackingSettings {
        mode: Some(TrackingMode::Online),
        base_url: Some(base_url.clone()),
        dir: Some(dir.clone()),
        ..Default::default()
    };
    // Long enough that only the stop request can end the upload within the test's bound.
    let options = OnlineOptions {
        timeout: Duration::from_secs(300),
        retry_budget: Duration::from_secs(300),
        ..Default::default()
    };
    let watched = std::sync::Arc::clone(&connections);
    std::thread::spawn(move || {
        while *watched.lock().unwrap() == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
        segq::interrupt::request_stop();
    });
    let env = |name: &str| (name == "WANDB_API_KEY").then(|| "fake-key-for-interrupt-test".to_string());
    let started = Instant::now();
    let runs = [example_run("f32"), example_run("int8"), example_run("int4")];
    let outcome = log_runs_with(&settings, &runs, &options, &env).unwrap();
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    assert!(outcome.interrupted);
    assert_eq!(run_folders(&dir).len(), 3, "every run on disk");
    for run in &outcome.runs {
        let line = run.upload_error.as_deref().unwrap();
        let folder = run.offline_dir.as_ref().unwrap();
        assert!(line.contains("interrupted") && line.contains(&base_url), "{line}");
        assert!(line.contains(&format!("wandb sync {}", folder.display())), "{line}");
        assert!(!line.contains("fake-key-for-interrupt-test"));
    }
}
