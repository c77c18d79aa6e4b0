//! The `segq` binary: parse arguments, set up logging and threads, dispatch to a subcommand. Every error ends as
//! one line on stderr and a non-zero exit code; panics are caught and reported the same way.

mod cli;

use clap::Parser;

// Inference allocates and frees multi-megabyte activations on every forward pass; glibc returns them to the
// kernel and the next pass pays page faults and zeroing again (about 15% of a SegFormer-B0 pass, measured with
// perf). mimalloc keeps freed pages for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown cause".into());
        eprintln!(
            "error: internal error{location}: {} (please report this)",
            segq::hub::scrub(&message)
        );
    }));
    let args = cli::Cli::parse();
    if let Err(e) = cli::init_logging(&args.global) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let code = match std::panic::catch_unwind(|| cli::run(args)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            tracing::debug!(error = ?e, "command failed");
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", segq::hub::scrub(&chain.join(": ")));
            1
        }
        Err(_) => 101,
    };
    std::process::exit(code);
}
