//! What `segq eval` (and `segq sensitivity`) shows and listens to on the console, as evaluation observers: the
//! progress bar, Ctrl-C, and the results table printed once the files are written.

use segq::eval::{EvalObserver, EvalOutput};

/// Progress: a bar on stderr when it is a terminal; otherwise (a batch job's log) one line every
/// [`PROGRESS_LINE_EVERY`], so a log shows the run is alive and how long it has left without a line per batch.
pub enum Progress {
    Bar(indicatif::ProgressBar),
    Lines(ProgressLines),
    Off,
}

/// How often a log (stderr not a terminal) gets a progress line.
pub const PROGRESS_LINE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

pub struct ProgressLines {
    total: usize,
    done: usize,
    started: std::time::Instant,
    last_line: std::time::Instant,
}

impl Progress {
    pub fn new(show: bool) -> Progress {
        if !show {
            return Progress::Off;
        }
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let style = indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} images [{elapsed_precise} < {eta}] {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            Progress::Bar(indicatif::ProgressBar::new(0).with_style(style))
        } else {
            let now = std::time::Instant::now();
            Progress::Lines(ProgressLines {
                total: 0,
                done: 0,
                started: now,
                last_line: now,
            })
        }
    }
}

impl ProgressLines {
    /// `done of total images (pct), rate, time left`, as a log reader wants it.
    fn line(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = self.done as f64 / elapsed.max(1e-9);
        let left = self.total.saturating_sub(self.done) as f64 / rate.max(1e-9);
        format!(
            "progress: {}/{} images ({:.0}%), {:.2} images/s, about {} left",
            self.done,
            self.total,
            100.0 * self.done as f64 / self.total.max(1) as f64,
            rate,
            human_duration(left)
        )
    }
}

/// `1h02m`, `4m05s`, `12s`.
fn human_duration(seconds: f64) -> String {
    let s = seconds.round().max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

impl EvalObserver for Progress {
    fn started(&mut self, examples: usize) {
        match self {
            Progress::Bar(bar) => bar.set_length(examples as u64),
            Progress::Lines(lines) => {
                lines.total = examples;
                lines.started = std::time::Instant::now();
                lines.last_line = lines.started;
            }
            Progress::Off => {}
        }
    }
    fn batch_done(&mut self, images: usize) {
        match self {
            Progress::Bar(bar) => bar.inc(images as u64),
            Progress::Lines(lines) => {
                lines.done += images;
                if lines.last_line.elapsed() >= PROGRESS_LINE_EVERY && lines.done < lines.total {
                    tracing::info!("{}", lines.line());
                    lines.last_line = std::time::Instant::now();
                }
            }
            Progress::Off => {}
        }
    }
    fn finished(&mut self, _output: &EvalOutput) -> segq::Result<()> {
        self.finish();
        Ok(())
    }
}

impl Progress {
    /// Clears the bar (the run is over).
    pub fn finish(&mut self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// `segq sensitivity` counts image passes (every variant runs every image) on the same bar.
impl segq::eval::sensitivity::SensitivityObserver for Progress {
    fn started(&mut self, images: usize) {
        EvalObserver::started(self, images);
    }
    fn images_done(&mut self, images: usize) {
        EvalObserver::batch_done(self, images);
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

/// Prints the results table once the files are written, before W&B's messages: the compact one unless `--wide`.
pub struct Table(pub segq::report::TableWidth);

impl EvalObserver for Table {
    fn finished(&mut self, output: &EvalOutput) -> segq::Result<()> {
        println!("{}", segq::report::format_table(&output.results, self.0));
        Ok(())
    }
}

/// The table width `--wide` asks for.
pub fn table_width(wide: bool) -> segq::report::TableWidth {
    if wide {
        segq::report::TableWidth::Wide
    } else {
        segq::report::TableWidth::Compact
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_say_how_far_and_how_long() {
        let lines = ProgressLines {
            total: 2000,
            done: 500,
            started: std::time::Instant::now() - std::time::Duration::from_secs(100),
            last_line: std::time::Instant::now(),
        };
        let line = lines.line();
        assert!(
            line.starts_with("progress: 500/2000 images (25%), 5.00 images/s, about 5m0"),
            "{line}"
        );
        assert_eq!(human_duration(3725.0), "1h02m");
        assert_eq!(human_duration(12.4), "12s");
    }
}
