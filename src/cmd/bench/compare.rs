//! `--compare`: time the coreutils tools and `fleetsync sum` the same way
//! (a process each, output to /dev/null, best of N, warm cache).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use fleetsync_engine::AlgorithmInfo;

use super::{best_of, Args, Progress, Workload};

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
    /// The speed-up we promise (issue 3), if any.
    pub target: Option<f64>,
}

impl Comparison {
    /// How many times faster we are.
    pub fn ratio(&self) -> f64 {
        self.theirs_seconds / self.ours_seconds
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

/// Times `argv` (stdout and stderr to /dev/null); fails if it exits non-zero.
fn time_command(runs: u32, argv: &[OsString]) -> anyhow::Result<f64> {
    best_of(runs, || {
        let status = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("running {}", argv[0].to_string_lossy()))?;
        if !status.success() {
            bail!("{} failed: {status}", render(argv));
        }
        Ok(())
    })
}

fn render(argv: &[OsString]) -> String {
    argv.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Times every algorithm that has a reference tool, ours and theirs.
///
/// Runs alternate (ours, each reference, ours, ...) so that a load spike on a
/// shared machine hits both sides alike; the best run of each side counts.
pub(crate) fn run(
    args: &Args,
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
            args.io.clone().into(),
        ];
        if let Some(j) = args.jobs {
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
        let mut ours = f64::INFINITY;
        let mut theirs = vec![f64::INFINITY; refs.len()];
        for _ in 0..args.runs {
            ours = ours.min(time_command(1, &ours_argv)?);
            for ((argv, ..), best) in refs.iter().zip(&mut theirs) {
                *best = best.min(time_command(1, argv)?);
            }
        }
        progress.step();
        for ((_, shown, target), theirs) in refs.into_iter().zip(theirs) {
            out.push(Comparison {
                algorithm: alg.name.clone(),
                reference: shown,
                ours_seconds: ours,
                theirs_seconds: theirs,
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
