//! Prints which backend hashes a file in each I/O mode, and how fast (best
//! of 3, wall clock and per CPU-second, which stays meaningful on a busy
//! machine). `FS_SEQUENTIAL=1` forbids the parallel split.
//! `cargo run --release -p fleetsync-engine --example io_probe -- FILE [ALG...]`

use std::path::PathBuf;
use std::time::Instant;

use fleetsync_engine::{hash_file, HashOptions, IoMode, Registry};

mod probe_clock;
use probe_clock::cpu_seconds;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().expect("FILE"));
    let names: Vec<String> = args.collect();
    let names = if names.is_empty() {
        vec!["crc32".to_owned()]
    } else {
        names
    };
    let registry = Registry::with_builtins();
    let algs: Vec<_> = names.iter().map(|n| registry.info(n).unwrap()).collect();
    // FS_MODES=auto,pread limits the modes tried (e.g. to measure RSS).
    let modes: Vec<IoMode> = match std::env::var("FS_MODES") {
        Ok(list) => list.split(',').map(|m| m.parse().unwrap()).collect(),
        Err(_) => vec![IoMode::Auto, IoMode::Uring, IoMode::Pread, IoMode::Mmap],
    };
    for mode in modes {
        let mut opts = HashOptions {
            io: mode,
            ..HashOptions::default()
        };
        // FS_SEQUENTIAL=1: never split the file (measures the sequential path).
        if std::env::var_os("FS_SEQUENTIAL").is_some() {
            opts.parallel_threshold = u64::MAX;
        }
        if std::env::var_os("FS_ONCE").is_none() {
            let _ = hash_file(&path, &algs, &opts);
        }
        let mut best = f64::MAX;
        let mut best_cpu = f64::MAX;
        let mut last = None;
        let runs = if std::env::var_os("FS_ONCE").is_some() {
            1
        } else {
            3
        };
        for _ in 0..runs {
            let t = Instant::now();
            let c = cpu_seconds();
            last = Some(hash_file(&path, &algs, &opts));
            best = best.min(t.elapsed().as_secs_f64());
            best_cpu = best_cpu.min(cpu_seconds() - c);
        }
        match last.expect("ran") {
            Ok(h) => {
                let s = best;
                println!(
                    "{mode:6} used {:6} {:8.2} GB/s wall {:8.2} GB/cpu-s  {}",
                    h.io.to_string(),
                    h.size as f64 / s / 1e9,
                    h.size as f64 / best_cpu / 1e9,
                    h.digests
                        .iter()
                        .map(|d| d.to_hex())
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
            Err(e) => println!("{mode:6} error: {e}"),
        }
    }
}
