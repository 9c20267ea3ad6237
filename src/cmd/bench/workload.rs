//! What `bench` hashes: a file or tree of yours, or synthetic data made for the run.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::progress::Progress;
use crate::cmd::hashargs::parse_size;

/// The workload options of `fleetsync bench`.
#[derive(clap::Args)]
pub(crate) struct WorkloadArgs {
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

impl WorkloadArgs {
    /// The workload: `--path`, else a synthetic tree (`--files`) or file, in a temporary
    /// directory deleted with the [`Workload`].
    pub(crate) fn prepare(&self, progress: &Progress) -> anyhow::Result<Workload> {
        if let Some(path) = &self.path {
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
        if let Some(n) = self.files {
            let root = temp.path().join("tree");
            progress.note(&format!("creating {n} files of {} bytes", self.file_size));
            let mut buf = vec![0u8; self.file_size as usize];
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
                bytes: n * self.file_size,
                files: n,
                description: format!("{n} files of {} bytes (synthetic tree)", self.file_size),
                _temp: Some(temp),
            });
        }
        let path = temp.path().join("data.bin");
        progress.note(&format!("creating a {}-byte file", self.size));
        // Written from a page-aligned buffer in 1 MiB pieces, as a release
        // tool's writes land: written from a malloc'd (unaligned) buffer the
        // file read back ~15% slower, for us and for the reference tools.
        let mut w = File::create(&path)?;
        let mut buf = fleetsync_engine::AlignedBuf::new(1 << 20);
        let mut left = self.size;
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
            bytes: self.size,
            files: 1,
            description: format!("one {}-byte file (synthetic, page cache)", self.size),
            _temp: Some(temp),
        })
    }
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
