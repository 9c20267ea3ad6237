//! What `bench` shows while it works, and how it times one thing.

use std::time::{Duration, Instant};

/// Progress on stderr: a bar on a terminal, plain `bench: ...` lines in a
/// log, nothing with --json.
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
}

impl Progress {
    /// Nothing with `json` (the report is the only output).
    pub(crate) fn new(json: bool) -> Self {
        use std::io::IsTerminal;
        let tty = std::io::stderr().is_terminal();
        Progress {
            bar: (tty && !json).then(|| {
                let bar = indicatif::ProgressBar::new(0);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar.enable_steady_tick(Duration::from_millis(200));
                bar
            }),
            plain: !tty && !json,
        }
    }

    /// Sets the number of steps.
    pub(crate) fn start(&self, len: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(len);
        }
    }

    /// Says what is happening now.
    pub(crate) fn note(&self, msg: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(msg.to_owned());
        } else if self.plain {
            eprintln!("bench: {msg}");
        }
    }

    /// One step done.
    pub(crate) fn step(&self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Runs `f` up to `runs` times and returns the fastest time in seconds;
/// stops repeating once one run took more than 10 s.
pub(crate) fn best_of(runs: u32, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        let took = start.elapsed();
        best = best.min(took.as_secs_f64());
        if took > Duration::from_secs(10) {
            break;
        }
    }
    Ok(best.max(1e-9))
}
