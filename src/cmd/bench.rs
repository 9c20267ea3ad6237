//! `fleetsync bench`: throughput of every checksum algorithm on one workload,
//! optionally side by side with the coreutils tools it replaces.

mod compare;
mod report;

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fleetsync_engine::{AlgorithmInfo, Registry};

use crate::cmd::sum::engine::{hash_file, hash_tree, HashOptions, IoMode};

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
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// Algorithms to run, comma-separated (default: all but crc16/<catalog> and md2).
    #[arg(
        short = 'a',
        long = "algorithm",
        value_name = "ALG",
        value_delimiter = ','
    )]
    algorithms: Vec<String>,
    /// Size of the synthetic file.
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Use a synthetic tree of N files instead of one big file.
    #[arg(long, value_name = "N", conflicts_with = "path")]
    files: Option<u64>,
    /// Size of each file of the synthetic tree.
    #[arg(long, value_name = "SIZE", default_value = "4KiB", value_parser = parse_size)]
    file_size: u64,
    /// Benchmark on this file or directory instead of synthetic data.
    #[arg(long, value_name = "PATH")]
    path: Option<PathBuf>,
    /// How files are read.
    #[arg(long, value_name = "MODE", default_value = "auto",
          value_parser = ["auto", "uring", "pread", "mmap"])]
    io: String,
    /// Worker threads (default: one per core).
    #[arg(short = 'j', long, value_name = "N")]
    jobs: Option<usize>,
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

/// Parses `1GiB`, `4K`, `10MB`, `512`.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let num: f64 = num.parse().map_err(|_| format!("bad size '{s}'"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(format!("bad size unit in '{s}'")),
    };
    Ok((num * mult as f64).round() as u64)
}

/// What is being hashed.
pub(crate) struct Workload {
    /// The file, or the root of the tree.
    pub path: PathBuf,
    /// Whether `path` is a tree.
    pub tree: bool,
    /// Total bytes of regular files.
    pub bytes: u64,
    /// Number of regular files.
    pub files: u64,
    /// What it is, for the report.
    pub description: String,
    /// Keeps a synthetic workload alive; deleted on drop.
    _temp: Option<tempfile::TempDir>,
}

/// The timing of one algorithm.
pub(crate) struct Measurement {
    pub algorithm: String,
    pub seconds: f64,
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
        args.algorithms
            .iter()
            .map(|n| registry.info(n.trim()))
            .collect::<Result<_, _>>()?
    };
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let opts = HashOptions {
        io: args
            .io
            .parse::<IoMode>()
            .map_err(|e| anyhow::anyhow!("--io: {e}"))?,
        ..HashOptions::default()
    };
    let pool = {
        let mut b = rayon::ThreadPoolBuilder::new();
        if let Some(n) = args.jobs {
            anyhow::ensure!(n > 0, "-j must be at least 1");
            b = b.num_threads(n);
        }
        b.build().context("building the thread pool")?
    };

    let progress = Progress::new(&args);
    let workload = prepare(&args, &progress)?;
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
        compare::run(&args, &workload, &algs, &progress)?
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
        io: &args.io,
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

/// Progress on stderr: a bar on a terminal, plain `bench: ...` lines in a
/// log, nothing with --json.
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
}

impl Progress {
    fn new(args: &Args) -> Self {
        use std::io::IsTerminal;
        let tty = std::io::stderr().is_terminal();
        Progress {
            bar: (tty && !args.json).then(|| {
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
            plain: !tty && !args.json,
        }
    }

    /// Sets the number of steps.
    fn start(&self, len: u64) {
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

    fn finish(&self) {
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

fn prepare(args: &Args, progress: &Progress) -> anyhow::Result<Workload> {
    if let Some(path) = &args.path {
        let meta = fs::metadata(path).with_context(|| path.display().to_string())?;
        if meta.is_dir() {
            let (files, bytes) = count_tree(path)?;
            return Ok(Workload {
                path: path.clone(),
                tree: true,
                bytes,
                files,
                description: format!("tree {} ({files} files, {bytes} bytes)", path.display()),
                _temp: None,
            });
        }
        return Ok(Workload {
            path: path.clone(),
            tree: false,
            bytes: meta.len(),
            files: 1,
            description: format!("file {} ({} bytes)", path.display(), meta.len()),
            _temp: None,
        });
    }
    let temp = tempfile::Builder::new()
        .prefix("fleetsync-bench-")
        .tempdir()
        .context("creating a temporary directory")?;
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    if let Some(n) = args.files {
        let root = temp.path().join("tree");
        progress.note(&format!("creating {n} files of {} bytes", args.file_size));
        let mut buf = vec![0u8; args.file_size as usize];
        for i in 0..n {
            let dir = root.join(format!("d{:04}", i / 1000));
            if i % 1000 == 0 {
                fs::create_dir_all(&dir)?;
            }
            rng.fill(&mut buf);
            fs::write(dir.join(format!("f{i:07}")), &buf)?;
        }
        return Ok(Workload {
            path: root,
            tree: true,
            bytes: n * args.file_size,
            files: n,
            description: format!("{n} files of {} bytes (synthetic tree)", args.file_size),
            _temp: Some(temp),
        });
    }
    let path = temp.path().join("data.bin");
    progress.note(&format!("creating a {}-byte file", args.size));
    let mut w = BufWriter::with_capacity(1 << 20, File::create(&path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = args.size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    w.flush()?;
    Ok(Workload {
        path,
        tree: false,
        bytes: args.size,
        files: 1,
        description: format!("one {}-byte file (synthetic, page cache)", args.size),
        _temp: Some(temp),
    })
}

fn count_tree(root: &Path) -> anyhow::Result<(u64, u64)> {
    let (mut files, mut bytes) = (0, 0);
    for entry in fs::read_dir(root).with_context(|| root.display().to_string())? {
        let entry = entry?;
        let ft = entry.file_type()?;
        if ft.is_dir() {
            let (f, b) = count_tree(&entry.path())?;
            files += f;
            bytes += b;
        } else if ft.is_file() {
            files += 1;
            bytes += entry.metadata()?.len();
        }
    }
    Ok((files, bytes))
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

/// Fast non-cryptographic filler, so the data is incompressible and repeatable.
struct XorShift(u64);

impl XorShift {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_dd() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert!(parse_size("3 parsecs").is_err());
    }
}
