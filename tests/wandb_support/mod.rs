//! Shared pieces of the W&B integration tests: an example run and a scripted loopback HTTP server.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use segq::track::{MaskedImage, RunLog, Table};
use serde_json::{Map, Value, json};

/// A run shaped like what `segq eval` logs: two history steps, a per-class table and one masked sample image.
pub fn example_run(name: &str) -> RunLog {
    let mut config = Map::new();
    for (key, value) in [
        ("model", json!("nvidia/segformer-b0-finetuned-ade-512-512")),
        ("dataset", json!("scene_parse_150")),
        ("level", json!("int4")),
        ("method", json!("hqq")),
        ("group_size", json!(64)),
        ("threads", json!(2)),
        ("segq_version", json!(segq::VERSION)),
    ] {
        config.insert(key.into(), value);
    }
    let row = |miou: f64, acc: f64| {
        let mut m = Map::new();
        m.insert("mean_iou".into(), json!(miou));
        m.insert("overall_accuracy".into(), json!(acc));
        m
    };
    let mut summary = Map::new();
    summary.insert("images_per_s".into(), json!(2.25));
    summary.insert("weight_mb".into(), json!(1.9));
    summary.insert("per_class_iou".into(), json!({"wall": 0.71, "floor": 0.62}));
    let rgb = image::RgbImage::from_fn(20, 12, |x, y| image::Rgb([(x * 12) as u8, (y * 20) as u8, 90]));
    let gt = image::GrayImage::from_fn(20, 12, |x, _| image::Luma([(x / 7) as u8]));
    let pred = image::GrayImage::from_fn(20, 12, |x, y| image::Luma([((x + y) / 8 % 3) as u8]));
    RunLog {
        name: name.into(),
        group: "eval-test".into(),
        tags: vec!["int4".into(), "hqq".into()],
        config,
        history: vec![row(0.30, 0.70), row(0.35, 0.74)],
        summary,
        tables: vec![Table {
            key: "per_class_iou_table".into(),
            columns: vec!["class".into(), "iou".into()],
            rows: vec![vec![json!("wall"), json!(0.71)], vec![json!("floor"), json!(0.62)]],
        }],
        images: vec![MaskedImage {
            key: "sample_0".into(),
            caption: "ADE_val_00000001".into(),
            rgb,
            masks: vec![("ground_truth".into(), gt), ("predictions".into(), pred)],
            class_labels: BTreeMap::from([(0, "wall".into()), (1, "floor".into()), (2, "sky".into())]),
        }],
        exit_code: 0,
    }
}

/// A fresh empty folder under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("segq-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every file under `dir`, recursively.
pub fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Fails when `secret` appears in any of `texts` or in the bytes of any file under `dirs`.
pub fn assert_secret_absent(secret: &str, texts: &[&str], dirs: &[&Path]) {
    for text in texts {
        assert!(!text.contains(secret), "secret leaked into: {text}");
    }
    for dir in dirs {
        for file in all_files(dir) {
            let bytes = std::fs::read(&file).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "secret in {}",
                file.display()
            );
        }
    }
}

/// The run folders under `<dir>/wandb`.
pub fn run_folders(dir: &Path) -> Vec<PathBuf> {
    let mut folders: Vec<PathBuf> = std::fs::read_dir(dir.join("wandb"))
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    folders.sort();
    folders
}

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Lower-case names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn operation(&self) -> Option<String> {
        self.json()
            .get("operationName")
            .and_then(Value::as_str)
            .map(str::to_string)
    }
}

/// (status, extra headers, body)
pub type Reply = (u16, Vec<(String, String)>, String);

/// A loopback HTTP/1.1 server that records each request and answers with `respond(request, index)`.
pub struct ScriptedServer {
    pub base_url: String,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
}

impl ScriptedServer {
    pub fn start(respond: impl Fn(&Recorded, usize, &str) -> Reply + Send + 'static) -> ScriptedServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&requests);
        let base = base_url.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                serve_connection(stream, &log, &respond, &base);
            }
        });
        ScriptedServer { base_url, requests }
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve_connection(
    stream: TcpStream,
    log: &Mutex<Vec<Recorded>>,
    respond: &impl Fn(&Recorded, usize, &str) -> Reply,
    base_url: &str,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut headers = BTreeMap::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
            }
        }
        let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let recorded = Recorded {
            method,
            path,
            headers,
            body,
        };
        let index = {
            let mut log = log.lock().unwrap();
            log.push(recorded.clone());
            log.len() - 1
        };
        let (status, extra, text) = respond(&recorded, index, base_url);
        let mut response = format!("HTTP/1.1 {status} Scripted\r\nContent-Type: application/json\r\n");
        for (name, value) in extra {
            response.push_str(&format!("{name}: {value}\r\n"));
        }
        response.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        ));
        let _ = writer.write_all(response.as_bytes());
        let _ = writer.flush();
    }
}

/// Answers like a W&B server: UpsertBucket (entity "me"), CreateRunFiles (upload URLs on this server), PUT, file_stream.
pub fn wandb_like(request: &Recorded, base_url: &str) -> Reply {
    let ok = |body: Value| (200, Vec::new(), body.to_string());
    match (request.method.as_str(), request.operation().as_deref()) {
        ("POST", Some("UpsertBucket")) => {
            let name = request.json()["variables"]["name"].clone();
            ok(
                json!({"data": {"upsertBucket": {"bucket": {"id": "b1", "name": name, "displayName": "x",
                "project": {"id": "p1", "name": "segq", "entity": {"id": "e1", "name": "me"}}}, "inserted": true}}}),
            )
        }
        ("POST", Some("CreateRunFiles")) => {
            let files: Vec<Value> = request.json()["variables"]["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| json!({"name": f, "uploadUrl": format!("{base_url}/upload/{}", f.as_str().unwrap())}))
                .collect();
            ok(
                json!({"data": {"createRunFiles": {"runID": "r1", "uploadHeaders": ["X-Upload-Test: yes"], "files": files}}}),
            )
        }
        ("PUT", _) => (200, Vec::new(), String::new()),
        ("POST", None) if request.path.ends_with("/file_stream") => ok(json!({"exitcode": null, "limits": {}})),
        _ => (404, Vec::new(), "{\"error\": \"not scripted\"}".into()),
    }
}

/// A loopback port nothing listens on (connections are refused).
pub fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

/// A loopback server that accepts every connection, reads the request, writes `reply_start` (possibly nothing,
/// possibly the first bytes of an answer) and then says nothing more, holding the connection open: a server that
/// hangs after accept, or in the middle of its answer. Returns the base URL and the number of connections seen.
pub fn stalling_server(reply_start: &'static str) -> (String, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base_url = format!("http://{}", listener.local_addr().unwrap());
    let connections = Arc::new(Mutex::new(0));
    let seen = Arc::clone(&connections);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            *seen.lock().unwrap() += 1;
            let mut head = [0u8; 4096];
            let _ = stream.set_read_timeout(Some(std::time::Duration::from_millis(200)));
            let _ = stream.read(&mut head);
            let _ = stream.write_all(reply_start.as_bytes());
            let _ = stream.flush();
            held.push(stream);
        }
    });
    (base_url, connections)
}
