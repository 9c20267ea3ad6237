//! Prints which backend hashes a file in each I/O mode, and how fast.
//! `cargo run --release -p fleetsync-engine --example io_probe -- FILE [ALG...]`

use std::path::PathBuf;
use std::time::Instant;

use fleetsync_engine::{hash_file, HashOptions, IoMode, Registry};

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
    for mode in [IoMode::Auto, IoMode::Uring, IoMode::Pread, IoMode::Mmap] {
        let opts = HashOptions {
            io: mode,
            ..HashOptions::default()
        };
        let _ = hash_file(&path, &algs, &opts);
        let mut best = f64::MAX;
        let mut last = None;
        for _ in 0..3 {
            let t = Instant::now();
            last = Some(hash_file(&path, &algs, &opts));
            best = best.min(t.elapsed().as_secs_f64());
        }
        match last.expect("ran") {
            Ok(h) => {
                let s = best;
                println!(
                    "{mode:6} used {:6} {:8.2} GB/s  {}",
                    h.io.to_string(),
                    h.size as f64 / s / 1e9,
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
