//! The live view of a run (one line per stage: pending / running with progress / cached /
//! done / failed), drawn with indicatif when stderr is a terminal, and a `tracing` writer that
//! prints log lines above it without tearing it.

use std::io::{self, IsTerminal, Write};
use std::sync::OnceLock;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use pipe_core::kind::Progress;

fn multi() -> &'static MultiProgress {
    static MULTI: OnceLock<MultiProgress> = OnceLock::new();
    MULTI.get_or_init(|| {
        if io::stderr().is_terminal() {
            MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10))
        } else {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        }
    })
}

/// Whether a live view is being drawn (else events are logged as lines).
pub fn live() -> bool {
    !multi().is_hidden()
}

/// Stops drawing the live view (for `--quiet` and `--dry-run`).
pub fn hide() {
    multi().set_draw_target(ProgressDrawTarget::hidden());
}

/// A `tracing_subscriber` writer for stderr that keeps the live view intact.
#[derive(Clone, Copy, Default)]
pub struct StderrWriter;

impl Write for StderrWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        multi().suspend(|| io::stderr().write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// One stage's line in the live view.
pub struct StageLine {
    bar: ProgressBar,
    id: String,
}

const WIDTH: usize = 14;

impl StageLine {
    pub fn new(id: &str) -> Self {
        let bar = multi().add(ProgressBar::new_spinner());
        bar.set_style(ProgressStyle::with_template("  {prefix} {msg}").expect("template"));
        bar.set_prefix(format!("{id:WIDTH$}"));
        bar.set_message("pending");
        StageLine {
            bar,
            id: id.to_string(),
        }
    }

    pub fn running(&self) {
        self.bar.set_style(
            ProgressStyle::with_template("{spinner:.cyan} {prefix} running {elapsed:>4} {msg}")
                .expect("template"),
        );
        self.bar.enable_steady_tick(Duration::from_millis(120));
        self.bar.set_message("");
        if !live() {
            tracing::info!("{}: running", self.id);
        }
    }

    pub fn finish(&self, status: &str, detail: &str) {
        self.bar.disable_steady_tick();
        self.bar
            .set_style(ProgressStyle::with_template("  {prefix} {msg}").expect("template"));
        self.bar.finish_with_message(format!("{status} {detail}"));
        if !live() && status != "pending" {
            tracing::info!("{}: {status} {detail}", self.id);
        }
    }

    /// Back to pending, after it had finished (its result turned out unusable), and why.
    pub fn again(&self, why: &str) {
        self.bar.reset();
        self.bar
            .set_style(ProgressStyle::with_template("  {prefix} {msg}").expect("template"));
        self.bar.set_message(format!("pending ({why})"));
        if !live() {
            tracing::info!("{}: {why}", self.id);
        }
    }

    /// The handle a running stage reports progress through.
    pub fn reporter(&self) -> BarProgress {
        BarProgress(self.bar.clone())
    }
}

/// Progress reported by a stage, shown on its line.
pub struct BarProgress(ProgressBar);

impl Progress for BarProgress {
    fn set_length(&self, len: u64) {
        self.0.set_length(len);
        self.0.set_style(
            ProgressStyle::with_template(
                "{spinner:.cyan} {prefix} [{bar:28.cyan/blue}] {percent:>3}% {msg} (eta {eta})",
            )
            .expect("template")
            .progress_chars("=> "),
        );
    }
    fn set_bytes_length(&self, len: u64) {
        self.0.set_length(len);
        self.0.set_style(
            ProgressStyle::with_template(
                "{spinner:.cyan} {prefix} [{bar:28.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} (eta {eta}) {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
    }
    fn set_position(&self, pos: u64) {
        self.0.set_position(pos);
    }
    fn set_message(&self, msg: String) {
        self.0.set_message(msg);
    }
}

/// The live view of one run: a line per stage, moved on by the engine's events.
pub struct LiveView {
    lines: std::collections::HashMap<String, StageLine>,
}

impl LiveView {
    pub fn new(pipeline: &pipe_core::Pipeline) -> Self {
        LiveView {
            lines: pipeline
                .stages
                .iter()
                .map(|s| (s.id.clone(), StageLine::new(&s.id)))
                .collect(),
        }
    }
}

impl pipe_core::Observer for LiveView {
    fn started(&self, stage: &str) -> std::sync::Arc<dyn Progress> {
        match self.lines.get(stage) {
            Some(line) => {
                line.running();
                std::sync::Arc::new(line.reporter())
            }
            None => std::sync::Arc::new(pipe_core::kind::NoProgress),
        }
    }
    fn finished(&self, outcome: &pipe_core::runner::Outcome) {
        if let Some(line) = self.lines.get(&outcome.stage) {
            let (word, detail) = crate::report::outcome_words(outcome);
            line.finish(word, &detail);
        }
    }
    fn again(&self, stage: &str, why: &str) {
        if let Some(line) = self.lines.get(stage) {
            line.again(why);
        }
    }
}
