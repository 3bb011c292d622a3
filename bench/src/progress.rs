//! The progress display: one bar over every step of the run and one for the current workload.
//! Hidden when stderr is not a terminal; log lines are printed either way.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

pub struct Progress {
    multi: MultiProgress,
    main: ProgressBar,
    sub: ProgressBar,
}

impl Progress {
    pub fn new(total_steps: u64) -> Progress {
        let multi = MultiProgress::new();
        let main = multi.add(ProgressBar::new(total_steps));
        if let Ok(style) = ProgressStyle::with_template(
            "{elapsed_precise:.dim} [{bar:30.cyan/blue}] {pos}/{len} {msg}",
        ) {
            main.set_style(style.progress_chars("=> "));
        }
        let sub = multi.add(ProgressBar::new(0));
        if let Ok(style) = ProgressStyle::with_template("           {spinner} {msg} {percent:>3}%")
        {
            sub.set_style(style);
        }
        Progress { multi, main, sub }
    }

    /// Names the step that starts now.
    pub fn step(&self, msg: String) {
        self.main.set_message(msg);
    }

    /// Marks a step as done.
    pub fn inc(&self) {
        self.main.inc(1);
    }

    /// Marks `n` steps as done (skipped after an error).
    pub fn main_inc(&self, n: u64) {
        self.main.inc(n);
    }

    /// Starts the inner bar for a workload of `len` units.
    pub fn sub_start(&self, what: &str, len: u64) {
        self.sub.reset();
        self.sub.set_length(len.max(1));
        self.sub.set_position(0);
        self.sub.set_message(what.to_string());
    }

    pub fn sub_set(&self, pos: u64) {
        self.sub.set_position(pos);
    }

    /// Prints a line above the bars (or just to stderr when they are hidden).
    pub fn println(&self, line: &str) {
        self.multi.suspend(|| eprintln!("{line}"));
    }

    pub fn finish(&self) {
        self.sub.finish_and_clear();
        self.main.finish_and_clear();
    }
}
