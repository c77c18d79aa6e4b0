//! What `segq eval` shows and listens to on the console, as evaluation observers: the progress bar, Ctrl-C, and
//! the results table printed once the files are written.

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

/// Ctrl-C and SIGTERM (what Slurm and Kubernetes send before killing a job): the first stops the run after the
/// current batch and any upload in progress (partial results are written, `--resume` continues them); a second
/// aborts at once.
pub struct Interrupt;

impl Interrupt {
    pub fn install() -> Interrupt {
        let _ = ctrlc::set_handler(|| {
            if segq::interrupt::request_stop() {
                std::process::exit(130);
            }
            eprintln!("interrupt: finishing the current batch and writing partial results (again to abort)");
        });
        Interrupt
    }
}

impl EvalObserver for Interrupt {
    fn should_stop(&self) -> bool {
        segq::interrupt::stop_requested()
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
