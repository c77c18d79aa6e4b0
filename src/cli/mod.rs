//! Command-line definitions (clap derive), one file per subcommand; each merges its flags into the configuration
//! (defaults < segq.toml < environment < flags) and calls the library.

mod bench;
mod config_cmd;
mod console;
mod eval;
mod inspect;
mod merge;
mod predict;
mod quantize;
mod sensitivity;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

use segq::config::Config;
use segq::limits;

#[derive(Parser, Debug)]
#[command(
    name = "segq",
    version,
    about = "Quantize SegFormer models and measure what each level costs: mIoU, memory, speed"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Less log output (-q: warnings only, -qq: errors only).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub quiet: u8,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Configuration file (default: ./segq.toml when present).
    #[arg(short, long, global = true)]
    pub config: Option<PathBuf>,
    /// Override any configuration key: --set section.key=value (repeatable), e.g. --set eval.batch_size=8.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Compute threads (0 = one per core); overrides eval.threads.
    #[arg(long, global = true)]
    pub threads: Option<usize>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Evaluate every quantization level and method on a dataset: mIoU, accuracy, agreement, memory, speed.
    Eval(eval::EvalArgs),
    /// Write a quantized checkpoint (loadable with --model DIR), or a report of quantization error.
    Quantize(quantize::QuantizeArgs),
    /// Time forward passes per quantization level.
    Bench(bench::BenchArgs),
    /// Merge sharded evaluation results into one, identical to an unsharded run.
    Merge(merge::MergeArgs),
    /// Segment images: class-index mask PNG, colour overlay, optional raw logits.
    Predict(predict::PredictArgs),
    /// Show a model's configuration and, per layer, kind, shape, parameters, format and bytes.
    Inspect(inspect::InspectArgs),
    /// Per-layer sensitivity: the damage of quantizing only one layer (or block, stage) at each level, ranked.
    Sensitivity(sensitivity::SensitivityArgs),
    /// Write or show the configuration file.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
}

/// Sets up `tracing` from -v/-q, RUST_LOG and --log-format; logs go to stderr.
pub fn init_logging(args: &GlobalArgs) -> Result<()> {
    let level = match (args.verbose as i8) - (args.quiet as i8) {
        i8::MIN..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() && args.verbose == 0 && args.quiet == 0 => {
            tracing_subscriber::EnvFilter::try_new(&v).map_err(|e| segq::Error::config("RUST_LOG", e.to_string()))?
        }
        _ => tracing_subscriber::EnvFilter::try_new(format!("{level},ureq=warn,rustls=warn,hf_hub=warn"))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_on_stderr())
        .with_writer(std::io::stderr);
    // A person at a terminal reads messages, not timestamps; a batch job's log keeps them.
    let on_terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match (args.log_format, on_terminal) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).init(),
        (LogFormat::Text, true) => builder.with_target(false).without_time().compact().init(),
        (LogFormat::Text, false) => builder.with_target(false).compact().init(),
    }
    Ok(())
}

/// Colour codes in log lines only when stderr is a terminal and `NO_COLOR` is unset or empty (no-color.org):
/// redirected logs and CI captures stay plain text.
fn colour_on_stderr() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The one line `segq` prints for an error: each cause of the chain once. segq's errors show their own cause
/// (`path: cause`, in segq's words), so the chain ends at the first one; other causes are added only when the line
/// does not hold them yet.
pub fn error_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for link in error.chain() {
        let cause = link.to_string();
        let complete = link.downcast_ref::<segq::Error>().is_some();
        if line.contains(&cause) {
            if complete {
                break;
            }
            continue;
        }
        line = if line.is_empty() {
            cause
        } else if cause.contains(&line) {
            // The cause repeats everything said so far (a context that restates its source): keep the fuller one.
            cause
        } else {
            format!("{line}: {cause}")
        };
        if complete {
            break;
        }
    }
    segq::hub::scrub(&line)
}

/// A command-line value clap refused (`--quant int7`, `--shard x`) as one line that names the flag and the value
/// once: clap's own text ("invalid value 'x' for '--shard <SHARD>': --shard 'x': ...") repeats what segq's parsers
/// already say. `None` for everything else (help, version, unknown or missing arguments), which clap prints itself.
pub fn usage_error_line(error: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let text = |kind| match error.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let arg = text(ContextKind::InvalidArg)?;
    let flag = arg.split(' ').next().unwrap_or(&arg);
    let value = text(ContextKind::InvalidValue)?;
    let line = match error.kind() {
        ErrorKind::ValueValidation => {
            let cause = std::error::Error::source(error)?.to_string();
            if cause.contains(flag) {
                cause
            } else if !value.is_empty() && cause.contains(&value) {
                format!("{flag}: {cause}")
            } else {
                format!("{flag} '{value}': {cause}")
            }
        }
        ErrorKind::InvalidValue => match error.get(ContextKind::ValidValue) {
            Some(ContextValue::Strings(valid)) => format!("{flag} '{value}': expected one of {}", valid.join(", ")),
            _ => return None,
        },
        _ => return None,
    };
    Some(segq::hub::scrub(&line))
}

/// Loads the configuration and applies the global --set overrides.
pub fn load_config(global: &GlobalArgs) -> Result<Config> {
    let (mut config, path) = Config::load(global.config.as_deref())?;
    if let Some(p) = &path {
        tracing::debug!(path = %p.display(), "configuration file");
    }
    for assignment in &global.set {
        config.set(assignment)?;
    }
    // Thread and worker counts are clamped here, where flags and files meet, before anything starts threads.
    config.eval.threads = match global.threads {
        Some(t) => limits::clamp_threads(t, "--threads"),
        None => limits::clamp_threads(config.eval.threads, "eval.threads"),
    };
    config.dataset.workers = limits::clamp_threads(config.dataset.workers, "dataset.workers");
    Ok(config)
}

/// Sizes the global thread pool (rayon, and candle's GEMM through RAYON_NUM_THREADS) once.
pub fn set_threads(threads: usize) -> usize {
    let n = if threads == 0 {
        segq::sysinfo::logical_cores()
    } else {
        threads
    }
    .min(limits::MAX_THREADS);
    // SAFETY: called once at start-up, before any other thread exists.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    n
}

pub fn run(cli: Cli) -> Result<()> {
    let global = cli.global;
    match cli.command {
        Some(Command::Eval(args)) => eval::run(&global, args),
        Some(Command::Quantize(args)) => quantize::run(&global, args),
        Some(Command::Bench(args)) => bench::run(&global, args),
        Some(Command::Merge(args)) => merge::run(&global, args),
        Some(Command::Predict(args)) => predict::run(&global, args),
        Some(Command::Inspect(args)) => inspect::run(&global, args),
        Some(Command::Sensitivity(args)) => sensitivity::run(&global, args),
        Some(Command::Config(cmd)) => config_cmd::run(&global, cmd),
        // The main job: with no subcommand, evaluate the configured (by default embedded) model and dataset.
        None => eval::run(&global, eval::EvalArgs::default()),
    }
}
