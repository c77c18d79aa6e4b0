//! What `segq eval` shows and listens to on the console, as evaluation observers: the progress bar, Ctrl-C, and
//! the results table printed once the files are written.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use segq::eval::{EvalObserver, EvalOutput};

/// The progress bar, drawn on stderr when it is a terminal.
pub struct Progress(indicatif::ProgressBar);

impl Progress {
    pub fn new(show: bool) -> Progress {
        if show && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let style = indicatif::ProgressStyle::with_template(
                "{spinner} {pos}/{len} images [{elapsed_precise} < {eta}] {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            Progress(indicatif::ProgressBar::new(0).with_style(style))
        } else {
            Progress(indicatif::ProgressBar::hidden())
        }
    }
}

impl EvalObserver for Progress {
    fn started(&mut self, examples: usize) {
        self.0.set_length(examples as u64);
    }
    fn batch_done(&mut self, images: usize) {
        self.0.inc(images as u64);
    }
    fn finished(&mut self, _output: &EvalOutput) -> segq::Result<()> {
        self.0.finish_and_clear();
        Ok(())
    }
}

/// Ctrl-C: the first stops the run after the current batch (partial results are written), the second aborts.
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    pub fn install() -> Interrupt {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = flag.clone();
        let _ = ctrlc::set_handler(move || {
            if handler_flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("interrupt: finishing the current batch and writing partial results (Ctrl-C again to abort)");
        });
        Interrupt(flag)
    }
}

impl EvalObserver for Interrupt {
    fn should_stop(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Prints the results table once the files are written, before W&B's messages.
pub struct Table;

impl EvalObserver for Table {
    fn finished(&mut self, output: &EvalOutput) -> segq::Result<()> {
        println!("{}", segq::report::format_table(&output.results));
        Ok(())
    }
}
