//! `--compare`: time the coreutils tools and `fleetsync sum` the same way
//! (a process each, output to /dev/null, best of N, warm cache).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use fleetsync_engine::AlgorithmInfo;

use super::progress::Progress;
use super::workload::Workload;
use crate::cmd::hashargs::ReadArgs;

/// Our time and a reference tool's on the same workload.
pub(crate) struct Comparison {
    /// Our algorithm.
    pub algorithm: String,
    /// The reference, as a shell command line (`DIR`/`FILE` for the workload).
    pub reference: String,
    /// `fleetsync sum` wall time.
    pub ours_seconds: f64,
    /// The reference's wall time.
    pub theirs_seconds: f64,
    /// CPU time (user + system, all threads and processes) of our best run.
    pub ours_cpu_seconds: f64,
    /// CPU time of the reference's best run.
    pub theirs_cpu_seconds: f64,
    /// Their wall time / ours in each round (ours and theirs run back to
    /// back), in run order.
    pub round_ratios: Vec<f64>,
    /// The speed-up we promise (issue 3), if any.
    pub target: Option<f64>,
}

impl Comparison {
    /// How many times faster we are.
    pub fn ratio(&self) -> f64 {
        self.theirs_seconds / self.ours_seconds
    }

    /// How many times less CPU we use.
    pub fn cpu_ratio(&self) -> f64 {
        self.theirs_cpu_seconds / self.ours_cpu_seconds.max(1e-9)
    }

    /// The median of the per-round ratios: each round's two runs share the
    /// machine's load of that moment, so this resists slow drifts that the
    /// best-of-N figures can split unevenly.
    pub fn median_round_ratio(&self) -> f64 {
        let mut r = self.round_ratios.clone();
        r.sort_by(f64::total_cmp);
        match r.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => r[n / 2],
            n => (r[n / 2 - 1] + r[n / 2]) / 2.0,
        }
    }

    /// Whether the target is met (`None` without a target).
    pub fn met(&self) -> Option<bool> {
        self.target.map(|t| self.ratio() >= t)
    }
}

/// The reference tools of one algorithm on a single file, with our targets.
fn references(algorithm: &str) -> &'static [(&'static [&'static str], Option<f64>)] {
    match algorithm {
        "crc32" | "crc32c" | "crc16" | "adler32" | "cksum" => &[(&["cksum"], Some(1.5))],
        "sysv" => &[(&["cksum"], Some(1.5)), (&["sum", "-s"], None)],
        "bsd" => &[(&["sum", "-r"], Some(1.8))],
        "md5" => &[(&["md5sum"], Some(1.0))],
        "sha1" => &[(&["sha1sum"], Some(1.5))],
        "sha224" => &[(&["sha224sum"], None)],
        "sha256" => &[(&["sha256sum"], Some(2.0))],
        "sha384" => &[(&["sha384sum"], None)],
        "sha512" => &[(&["sha512sum"], Some(1.0))],
        "blake3" => &[(&["b3sum"], Some(1.0))],
        _ => &[],
    }
}

/// Whether `algorithm` has a reference tool installed here.
pub(crate) fn has_reference(algorithm: &str) -> bool {
    references(algorithm)
        .iter()
        .any(|(tool, _)| installed(tool[0]))
}

/// Whether `tool` is on `PATH`.
fn installed(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// One timed run of a command: wall-clock seconds, and CPU seconds (user +
/// system) of it and every process it waited for.
#[derive(Clone, Copy)]
struct Timing {
    wall: f64,
    cpu: f64,
}

/// CPU seconds used so far by this process's waited-for descendants.
fn children_cpu() -> f64 {
    // SAFETY: `rusage` is plain old data, so all-zero bytes are a valid value,
    // and getrusage only writes into the struct we hand it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage for the call's duration.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Runs `argv` once (stdout and stderr to /dev/null); fails if it exits non-zero.
fn time_command(argv: &[OsString]) -> anyhow::Result<Timing> {
    let cpu_before = children_cpu();
    let start = Instant::now();
    let status = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running {}", argv[0].to_string_lossy()))?;
    let wall = start.elapsed().as_secs_f64().max(1e-9);
    if !status.success() {
        bail!("{} failed: {status}", render(argv));
    }
    Ok(Timing {
        wall,
        cpu: (children_cpu() - cpu_before).max(0.0),
    })
}

/// The best of two timings: each figure's minimum.
fn best(a: Timing, b: Timing) -> Timing {
    Timing {
        wall: a.wall.min(b.wall),
        cpu: a.cpu.min(b.cpu),
    }
}

fn render(argv: &[OsString]) -> String {
    argv.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Times every algorithm that has a reference tool, ours and theirs.
///
/// Runs alternate (ours, each reference; each reference, ours; ...) so that a
/// load spike on a shared machine hits both sides alike; the best run of each
/// side counts.
pub(crate) fn run(
    read: &ReadArgs,
    runs: u32,
    w: &Workload,
    algs: &[AlgorithmInfo],
    progress: &Progress,
) -> anyhow::Result<Vec<Comparison>> {
    let exe: PathBuf = std::env::current_exe().context("locating the fleetsync binary")?;
    let mut out = Vec::new();
    for alg in algs {
        let refs: Vec<_> = references(&alg.name)
            .iter()
            .filter(|(tool, _)| installed(tool[0]))
            .map(|(tool, target)| reference_argv(tool, &w.path, w.tree, *target, &alg.name))
            .collect();
        if refs.is_empty() {
            continue;
        }
        let mut ours_argv: Vec<OsString> = vec![
            exe.clone().into(),
            "sum".into(),
            "-a".into(),
            alg.name.clone().into(),
            "--io".into(),
            read.io.clone().into(),
        ];
        if let Some(j) = read.jobs {
            ours_argv.extend(["-j".into(), j.to_string().into()]);
        }
        if w.tree {
            ours_argv.push("-r".into());
        }
        ours_argv.push(w.path.clone().into());
        let shown: Vec<&str> = refs.iter().map(|(_, shown, _)| shown.as_str()).collect();
        progress.note(&format!(
            "timing fleetsync sum -a {} against {}",
            alg.name,
            shown.join(", ")
        ));
        let none = Timing {
            wall: f64::INFINITY,
            cpu: f64::INFINITY,
        };
        let mut ours = none;
        let mut theirs = vec![none; refs.len()];
        let mut rounds = vec![Vec::new(); refs.len()];
        for run in 0..runs {
            // Ours first on even runs, last on odd ones: neither side always
            // follows the other (or the previous algorithm's run).
            let mut this_ours = none;
            if run % 2 == 0 {
                this_ours = time_command(&ours_argv)?;
            }
            let mut this_theirs = Vec::with_capacity(refs.len());
            for (argv, ..) in &refs {
                this_theirs.push(time_command(argv)?);
            }
            if run % 2 == 1 {
                this_ours = time_command(&ours_argv)?;
            }
            ours = best(ours, this_ours);
            for ((t, r), this) in theirs.iter_mut().zip(&mut rounds).zip(this_theirs) {
                *t = best(*t, this);
                r.push(this.wall / this_ours.wall);
            }
        }
        progress.step();
        for (((_, shown, target), theirs), round_ratios) in refs.into_iter().zip(theirs).zip(rounds)
        {
            out.push(Comparison {
                algorithm: alg.name.clone(),
                reference: shown,
                ours_seconds: ours.wall,
                theirs_seconds: theirs.wall,
                ours_cpu_seconds: ours.cpu,
                theirs_cpu_seconds: theirs.cpu,
                round_ratios,
                target,
            });
        }
    }
    Ok(out)
}

/// The reference command for a file (`TOOL FILE`) or a tree
/// (`find DIR -type f -print0 | xargs -0 TOOL`), how it is shown, and its target.
fn reference_argv(
    tool: &[&str],
    path: &Path,
    tree: bool,
    target: Option<f64>,
    algorithm: &str,
) -> (Vec<OsString>, String, Option<f64>) {
    if tree {
        let script = format!("find \"$1\" -type f -print0 | xargs -0 {}", tool.join(" "));
        let argv = vec![
            "sh".into(),
            "-c".into(),
            script.into(),
            "sh".into(),
            path.into(),
        ];
        let shown = format!("find DIR -type f -print0 | xargs -0 {}", tool.join(" "));
        // The tree target (issue 3) is for cksum only.
        (argv, shown, (algorithm == "cksum").then_some(2.0))
    } else {
        let mut argv: Vec<OsString> = tool.iter().map(OsString::from).collect();
        argv.push(path.into());
        (argv, tool.join(" "), target)
    }
}
