//! Times `hash_tree` over a generated tree of small files in each I/O mode
//! (best of 5; wall clock and per CPU-second).
//! `cargo run --release -p fleetsync-engine --example tree_probe -- [FILES]`

use std::time::Instant;

use fleetsync_engine::{hash_tree, HashOptions, IoMode, Registry};

mod probe_clock;
use probe_clock::cpu_seconds;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("FILES"))
        .unwrap_or(5000);
    let dir = std::env::temp_dir().join(format!("fleetsync-tree-probe-{}", std::process::id()));
    let mut total = 0u64;
    for i in 0..n {
        let sub = dir.join(format!("d{:02}", i % 50));
        std::fs::create_dir_all(&sub).unwrap();
        let len = (i * 37) % 8192;
        total += len as u64;
        std::fs::write(sub.join(format!("f{i:05}")), vec![i as u8; len]).unwrap();
    }
    let registry = Registry::with_builtins();
    let algs = [registry.info("crc32").unwrap()];
    for mode in [IoMode::Auto, IoMode::Uring, IoMode::Pread] {
        let opts = HashOptions {
            io: mode,
            ..HashOptions::default()
        };
        let (mut wall, mut cpu) = (f64::MAX, f64::MAX);
        let mut io = String::new();
        for _ in 0..5 {
            let (t, c) = (Instant::now(), cpu_seconds());
            let tree = hash_tree(&dir, &algs, &opts).unwrap();
            wall = wall.min(t.elapsed().as_secs_f64());
            cpu = cpu.min(cpu_seconds() - c);
            io = tree.entries[0].result.as_ref().unwrap().io.to_string();
        }
        println!(
            "{mode:6} used {io:6} {n} files ({total} bytes): {:7.0} files/s wall, {:7.0} files per CPU-s",
            n as f64 / wall,
            n as f64 / cpu
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
