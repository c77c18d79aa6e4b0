//! The `segq` binary: parse arguments, set up logging and threads, dispatch to a subcommand. Every error ends as
//! one line on stderr and a non-zero exit code; panics are caught and reported the same way.

mod cli;

use clap::Parser;

// Inference allocates and frees multi-megabyte activations on every forward pass. glibc serves those with mmap and
// hands them back to the kernel on free, so each pass pays page faults and the kernel's zeroing of fresh pages again
// (a quarter of an int8 SegFormer-B0 pass, measured with perf). mimalloc, told not to return freed pages to the
// system (`keep_freed_memory`), reuses them: SegFormer-B0 512x512 went from about 140 to 100 ms per image here.
// The counting wrapper lets `segq bench` report the heap inference needs, whatever the allocator keeps mapped.
#[global_allocator]
static GLOBAL: segq::sysinfo::CountingAlloc<mimalloc::MiMalloc> = segq::sysinfo::CountingAlloc(mimalloc::MiMalloc);

/// `mi_option_purge_delay` in mimalloc.h (v3, the version libmimalloc-sys builds by default); the Rust bindings
/// leave this option out. -1: freed memory is never purged (returned to the system).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option; called first thing in main, before other threads exist.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

fn main() {
    keep_freed_memory();
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
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) => match cli::usage_error_line(&e) {
            Some(line) => {
                eprintln!("error: {line}");
                std::process::exit(2);
            }
            None => e.exit(),
        },
    };
    if let Err(e) = cli::init_logging(&args.global) {
        eprintln!("error: {}", cli::error_line(&e));
        std::process::exit(2);
    }
    let code = match std::panic::catch_unwind(|| cli::run(args)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            tracing::debug!(error = ?e, "command failed");
            eprintln!("error: {}", cli::error_line(&e));
            1
        }
        Err(_) => 101,
    };
    std::process::exit(code);
}
