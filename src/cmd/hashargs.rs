//! Options `sum` and `bench` share: the checksum algorithms (`-a`), how files
//! are read (`--io`, `-j`), and sizes such as `1GiB`.

use anyhow::Context;
use fleetsync_engine::{AlgorithmInfo, HashOptions, IoMode, Registry};

/// `-a ALG[,ALG...]`. Each subcommand gives it its own help (the defaults differ) with
/// `#[command(mut_arg("algorithms", ...))]`.
#[derive(clap::Args)]
pub struct Algorithms {
    #[arg(
        id = "algorithms",
        short = 'a',
        long = "algorithm",
        value_name = "ALG",
        value_delimiter = ','
    )]
    pub names: Vec<String>,
}

impl Algorithms {
    /// Whether `-a` was not given.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The named algorithms, in the order given; an error for the first unknown name.
    pub fn resolve(&self, registry: &Registry) -> anyhow::Result<Vec<AlgorithmInfo>> {
        resolve(registry, &self.names)
    }
}

/// The algorithms `names` (surrounding spaces ignored), in order; an error for the first
/// unknown name.
pub fn resolve(registry: &Registry, names: &[String]) -> anyhow::Result<Vec<AlgorithmInfo>> {
    let mut algs = Vec::with_capacity(names.len());
    for name in names {
        algs.push(registry.info(name.trim())?);
    }
    Ok(algs)
}

/// How files are read, and by how many threads.
#[derive(clap::Args)]
pub struct ReadArgs {
    /// How files are read.
    #[arg(long, value_name = "MODE", default_value = "auto",
          value_parser = ["auto", "uring", "pread", "mmap"])]
    pub io: String,
    /// Worker threads (default: one per core).
    #[arg(short = 'j', long, value_name = "N")]
    pub jobs: Option<usize>,
}

impl ReadArgs {
    /// The engine's options with `--io` applied (the rest at their defaults).
    pub fn hash_options(&self) -> anyhow::Result<HashOptions> {
        Ok(HashOptions {
            io: self
                .io
                .parse::<IoMode>()
                .map_err(|e| anyhow::anyhow!("--io: {e}"))?,
            ..HashOptions::default()
        })
    }

    /// A pool of `-j` threads (without `-j`, one per core).
    pub fn thread_pool(&self) -> anyhow::Result<rayon::ThreadPool> {
        let mut b = rayon::ThreadPoolBuilder::new();
        if let Some(n) = self.jobs {
            anyhow::ensure!(n > 0, "-j must be at least 1");
            b = b.num_threads(n);
        }
        b.build().context("building the thread pool")
    }
}

/// Parses `1GiB`, `4K`, `10MB`, `512`.
pub fn parse_size(s: &str) -> Result<u64, String> {
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
