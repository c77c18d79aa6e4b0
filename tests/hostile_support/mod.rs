//! The harness of the hostile-input suite (tests/hostile_*.rs): runs the `segq` binary on one bad input under an
//! address-space cap and a deadline, records its exit, output and peak memory, and checks that it failed the way a
//! user can act on: a non-zero exit code, no panic or abort, one `error:` line naming the culprit, memory bounded.
//!
//! Every case is built at test time (big files are generated, never committed); see each test file for its corpus.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Address-space cap of every hostile run: a case that tries to allocate what its input claims fails here (and the
/// test reports the abort) instead of taking the machine down. Generous, because address space is not memory: the
/// allocator and thread stacks reserve far more than they touch.
pub const ADDRESS_SPACE_CAP: u64 = 16 << 30;

/// Peak resident memory allowed to any hostile case: a normal run of the embedded demo peaks near 250 MiB, and the
/// issue's bound is 1 GB above a normal run.
pub const PEAK_RSS_LIMIT_BYTES: u64 = (250 << 20) + (1 << 30);

/// A `segq` invocation being prepared: offline, W&B disabled, colour off, in a scratch HOME and cache.
pub struct Case {
    command: Command,
    description: String,
    timeout: Duration,
}

/// What one run did.
#[derive(Debug)]
pub struct Outcome {
    pub description: String,
    /// Exit code; `None` when a signal ended the process.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub peak_rss_bytes: u64,
    pub elapsed: Duration,
}

/// A fresh, empty folder for one case.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("segq-hostile-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// `segq ARGS...`, run from a scratch folder named after the case.
pub fn segq(case: &str, args: &[&str]) -> Case {
    let home = scratch(&format!("{case}-home"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_segq"));
    command
        .args(args)
        .current_dir(&home)
        .env("HOME", &home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("HF_HOME", home.join("hf"))
        .env("HF_HUB_OFFLINE", "1")
        .env("WANDB_MODE", "disabled")
        .env("NO_COLOR", "1")
        .env_remove("WANDB_API_KEY")
        .env_remove("WANDB_BASE_URL")
        .env_remove("WANDB_DIR")
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("SEGQ_SHARD_INDEX")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Case {
        command,
        description: format!("{case}: segq {}", args.join(" ")),
        timeout: Duration::from_secs(120),
    }
}

impl Case {
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    pub fn env_remove(mut self, key: &str) -> Self {
        self.command.env_remove(key);
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.command.current_dir(dir);
        self
    }

    /// A run longer than this is a hang: the process is killed and the test fails.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Starts the process (under the address-space cap) without waiting for it.
    #[allow(clippy::zombie_processes)] // reaped by Running::wait with wait4, which std cannot see
    pub fn spawn(mut self) -> Running {
        // SAFETY: setrlimit is async-signal-safe and touches only the child between fork and exec.
        unsafe {
            self.command.pre_exec(|| {
                let cap = libc::rlimit {
                    rlim_cur: ADDRESS_SPACE_CAP,
                    rlim_max: ADDRESS_SPACE_CAP,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &cap) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let no_core = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = self.command.spawn().expect("segq starts");
        let stdout = drain(child.stdout.take().unwrap());
        let stderr = drain(child.stderr.take().unwrap());
        Running {
            pid: child.id() as libc::pid_t,
            description: self.description,
            timeout: self.timeout,
            started,
            stdout,
            stderr,
        }
    }

    /// Runs to the end (or the deadline).
    pub fn run(self) -> Outcome {
        self.spawn().wait()
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// A started run.
pub struct Running {
    pid: libc::pid_t,
    description: String,
    timeout: Duration,
    started: Instant,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Running {
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(self.pid, signal) };
    }

    /// Waits until `path` exists (a file the run writes), failing the test at the deadline.
    pub fn wait_for_file(&self, path: &Path) {
        while !path.exists() {
            assert!(
                self.started.elapsed() < self.timeout,
                "{}: {} never appeared",
                self.description,
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process, killing it (and failing the test) past the deadline. Reaps with wait4 to read the
    /// child's peak resident memory.
    pub fn wait(self) -> Outcome {
        let mut status = 0;
        // SAFETY: rusage is plain data; wait4 fills it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: waits only for our own child.
            let r = unsafe { libc::wait4(self.pid, &mut status, libc::WNOHANG, &mut usage) };
            if r == self.pid {
                break;
            }
            assert!(r == 0, "{}: wait4 failed", self.description);
            if self.started.elapsed() > self.timeout {
                self.signal(libc::SIGKILL);
                // SAFETY: as above, blocking this time.
                unsafe { libc::wait4(self.pid, &mut status, 0, &mut usage) };
                let stderr = self.stderr.join().unwrap_or_default();
                panic!(
                    "{}: hung (killed after {:?}); stderr:\n{stderr}",
                    self.description, self.timeout
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let elapsed = self.started.elapsed();
        let (code, signal) = if libc::WIFEXITED(status) {
            (Some(libc::WEXITSTATUS(status)), None)
        } else {
            (None, Some(libc::WTERMSIG(status)))
        };
        Outcome {
            description: self.description,
            code,
            signal,
            stdout: self.stdout.join().unwrap_or_default(),
            stderr: self.stderr.join().unwrap_or_default(),
            peak_rss_bytes: usage.ru_maxrss as u64 * 1024,
            elapsed,
        }
    }
}

/// Text that must never reach a user: Rust panics, allocator aborts, backtraces, terminal colour codes.
const NEVER_SHOWN: [&str; 6] = [
    "panicked at",
    "internal error",
    "memory allocation of",
    "RUST_BACKTRACE",
    "capacity overflow",
    "\u{1b}[",
];

impl Outcome {
    fn context(&self) -> String {
        format!(
            "{} (code {:?}, signal {:?}, {:.1} s, peak {} MiB)\nstderr:\n{}\nstdout:\n{}",
            self.description,
            self.code,
            self.signal,
            self.elapsed.as_secs_f64(),
            self.peak_rss_bytes >> 20,
            self.stderr,
            self.stdout
        )
    }

    fn assert_bounded(&self) {
        for text in NEVER_SHOWN {
            assert!(!self.stderr.contains(text), "stderr shows {text:?}: {}", self.context());
        }
        assert!(
            self.peak_rss_bytes <= PEAK_RSS_LIMIT_BYTES,
            "peak memory {} MiB over the {} MiB bound: {}",
            self.peak_rss_bytes >> 20,
            PEAK_RSS_LIMIT_BYTES >> 20,
            self.context()
        );
    }

    /// The run was refused: exit code 1 or 2 (not a signal, not a panic's 101), bounded memory, and exactly one
    /// `error:` line, which names every one of `culprits` (the file, key, flag, row or tensor at fault).
    pub fn refused(&self, culprits: &[&str]) -> &Self {
        assert!(
            matches!(self.code, Some(1) | Some(2)),
            "expected a clean refusal (exit 1 or 2): {}",
            self.context()
        );
        self.assert_bounded();
        let errors: Vec<&str> = self.stderr.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(errors.len(), 1, "expected one error line: {}", self.context());
        for culprit in culprits {
            assert!(
                errors[0].contains(culprit),
                "error line does not name {culprit:?}: {}",
                self.context()
            );
        }
        self
    }

    /// The run succeeded, within the memory bound and without panic text.
    pub fn succeeded(&self) -> &Self {
        assert_eq!(self.code, Some(0), "expected success: {}", self.context());
        self.assert_bounded();
        self
    }

    /// stderr (warnings included) mentions every one of `texts`.
    pub fn warns(&self, texts: &[&str]) -> &Self {
        for text in texts {
            assert!(
                self.stderr.contains(text),
                "stderr does not mention {text:?}: {}",
                self.context()
            );
        }
        self
    }
}

/// Bytes and modification time of every file under `dir`, to show that a refused run changed nothing.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.push((path, bytes));
            }
        }
    }
    out.sort();
    out
}
