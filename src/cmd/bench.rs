//! `fleetsync bench`: throughput of every checksum algorithm on one workload,
//! optionally side by side with the coreutils tools it replaces.

mod compare;
mod progress;
mod report;
mod workload;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use fleetsync_engine::{hash_file, hash_tree, AlgorithmInfo, HashOptions, Registry};

use super::hashargs::{Algorithms, ReadArgs};
use progress::{best_of, Progress};
use report::Measurement;
use workload::{Workload, WorkloadArgs};

const AFTER_HELP: &str = "\
Workloads: by default a synthetic file of --size bytes (pseudo-random, written
once to a temporary directory, so it is in the page cache); with --files N a
synthetic tree of N files of --file-size bytes; with --path your own file or tree.

Each algorithm runs in this process (best of --runs); GB/s counts 10^9 bytes.
Default algorithms: every one in `fleetsync sum --list` except the crc16/<catalog>
variants (crc16 itself is included) and md2 (legacy, ~100x slower than md5:
minutes on 1 GiB); name them with -a to include them.

--compare also times the coreutils reference tools (cksum, sum -r, sum -s,
md5sum, sha1sum, sha224sum, sha256sum, sha384sum, sha512sum, and b3sum if
installed; for trees `find DIR -type f -print0 | xargs -0 cksum`) against
`fleetsync sum` run the same way: as a process, output to /dev/null, warm
cache, runs alternating between ours and theirs, best of --runs each. It prints
ours/theirs per algorithm and the target.

Sizes take the suffixes K, M, G (powers of 1024, also KiB, MiB, GiB) and KB,
MB, GB (powers of 1000).

Exit status: 0 done; 2 error.";

/// Arguments of `fleetsync bench`.
#[derive(clap::Args)]
#[command(
    after_help = AFTER_HELP,
    mut_arg("algorithms", |a| a.help(
        "Algorithms to run, comma-separated (default: all but crc16/<catalog> and md2)"
    ))
)]
pub struct Args {
    #[command(flatten)]
    algorithms: Algorithms,
    #[command(flatten)]
    workload: WorkloadArgs,
    #[command(flatten)]
    read: ReadArgs,
    /// Timed runs per algorithm and tool; the best counts. Runs after the first
    /// are skipped once one has taken over 10 s.
    #[arg(long, value_name = "N", default_value_t = 3)]
    runs: u32,
    /// Print the results as one JSON document.
    #[arg(long)]
    json: bool,
    /// Also write a horizontal bar chart of the throughputs to FILE (SVG).
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Also time the coreutils reference tools and print our/their ratios.
    #[arg(long)]
    compare: bool,
}

/// Runs `fleetsync bench`; returns the process exit code.
pub fn run(args: Args) -> anyhow::Result<u8> {
    let registry = Registry::with_builtins();
    let algs: Vec<AlgorithmInfo> = if args.algorithms.is_empty() {
        registry
            .iter()
            .filter(|i| !i.name.starts_with("crc16/") && i.name != "md2")
            .cloned()
            .collect()
    } else {
        args.algorithms.resolve(&registry)?
    };
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let opts = args.read.hash_options()?;
    let pool = args.read.thread_pool()?;

    let load_before = load_average();
    let progress = Progress::new(args.json);
    let workload = args.workload.prepare(&progress)?;
    progress.note(&format!("workload: {}", workload.description));
    let compared = if args.compare {
        algs.iter()
            .filter(|a| compare::has_reference(&a.name))
            .count()
    } else {
        0
    };
    progress.start((algs.len() + compared) as u64);
    let mut results = Vec::new();
    for alg in &algs {
        progress.note(&format!("timing {}", alg.name));
        let seconds = best_of(args.runs, || {
            pool.install(|| hash_once(&workload, alg, &opts))
        })?;
        results.push(Measurement {
            algorithm: alg.name.clone(),
            seconds,
        });
        progress.step();
    }
    let comparisons = if args.compare {
        compare::run(&args.read, args.runs, &workload, &algs, &progress)?
    } else {
        Vec::new()
    };
    progress.finish();
    let threads = pool.current_num_threads();
    let report = report::Report {
        workload: &workload,
        results: &results,
        comparisons: &comparisons,
        threads,
        io: &args.read.io,
        load: load_before.zip(load_average()),
    };
    if let Some(svg) = &args.svg {
        write_atomically(svg, report.svg().as_bytes())
            .with_context(|| format!("writing {}", svg.display()))?;
    }
    let text = if args.json {
        report.json()
    } else {
        report.table()
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(0)
}

/// The 1-minute load average, where `/proc/loadavg` exists.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn hash_once(w: &Workload, alg: &AlgorithmInfo, opts: &HashOptions) -> anyhow::Result<()> {
    let algs = std::slice::from_ref(alg);
    if w.tree {
        let tree = hash_tree(&w.path, algs, opts)?;
        if let Some(bad) = tree.entries.iter().find(|e| e.result.is_err()) {
            if let Err(e) = &bad.result {
                bail!("{}: {e}", bad.path.display());
            }
        }
    } else {
        hash_file(&w.path, algs, opts)?;
    }
    Ok(())
}

/// Writes `bytes` to a temp file beside `path`, then renames it into place.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
