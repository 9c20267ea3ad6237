//! Kernel throughput of every algorithm over a 1 MiB buffer, and the tree
//! walk + hash over a generated tree of small files.
//!
//! `cargo bench --bench kernels` (a few seconds per group: sample size 10,
//! short measurement). Filter with e.g. `cargo bench --bench kernels -- crc`.

use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use fleetsync_engine::{hash_file, hash_tree, HashOptions, IoMode, Registry};

const KERNEL_ALGS: &[&str] = &[
    "crc32",
    "crc32c",
    "cksum",
    "adler32",
    "bsd",
    "sysv",
    "crc16",
    "crc16/xmodem",
    "crc16/modbus",
    "md2",
    "md5",
    "sha1",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "blake3",
    "xxh3",
    "xxh128",
];

fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn kernels(c: &mut Criterion) {
    let registry = Registry::with_builtins();
    let buf = pattern(1 << 20);
    for name in KERNEL_ALGS {
        let info = registry.info(name).expect("built-in");
        let mut group = c.benchmark_group(format!("kernel/{name}"));
        group.throughput(Throughput::Bytes(buf.len() as u64));
        // Flat sampling: 10 samples of equal size, not 1+2+...+10 iterations
        // (keeps md2, at a few MB/s, to seconds).
        group.sampling_mode(SamplingMode::Flat);
        group.bench_function("1MiB", |b| {
            b.iter(|| {
                let mut state = info.instantiate();
                state.update(std::hint::black_box(&buf));
                state.finish()
            })
        });
        group.finish();
    }
}

fn files(c: &mut Criterion) {
    let registry = Registry::with_builtins();
    let dir = tempfile::tempdir().expect("temp dir");

    // A tree of 2000 small files (0-8 KiB) in 40 directories.
    let root = dir.path().join("tree");
    let mut total = 0u64;
    for i in 0..2000usize {
        let sub = root.join(format!("d{:02}", i % 40));
        std::fs::create_dir_all(&sub).expect("mkdir");
        let data = pattern((i * 37) % 8192);
        total += data.len() as u64;
        std::fs::write(sub.join(format!("f{i:04}")), data).expect("write");
    }
    let algs = [registry.info("crc32").expect("crc32")];
    let mut group = c.benchmark_group("tree/2000-small-files");
    group.throughput(Throughput::Bytes(total));
    group.sampling_mode(SamplingMode::Flat);
    for mode in [IoMode::Auto, IoMode::Pread, IoMode::Uring] {
        let opts = HashOptions {
            io: mode,
            ..HashOptions::default()
        };
        if hash_tree(&root, &algs, &opts).is_err() {
            continue; // io_uring unavailable here
        }
        group.bench_function(BenchmarkId::new("crc32", mode), |b| {
            b.iter(|| hash_tree(&root, &algs, &opts).expect("tree"))
        });
    }
    group.finish();

    // One 64 MiB file, parallel chunked (crc32) and sequential (sha256).
    let big = dir.path().join("big");
    std::fs::write(&big, pattern(64 << 20)).expect("write");
    let mut group = c.benchmark_group("file/64MiB");
    group.throughput(Throughput::Bytes(64 << 20));
    group.sampling_mode(SamplingMode::Flat);
    for name in ["crc32", "sha256"] {
        let algs = [registry.info(name).expect("built-in")];
        for mode in [IoMode::Auto, IoMode::Pread, IoMode::Uring, IoMode::Mmap] {
            let opts = HashOptions {
                io: mode,
                ..HashOptions::default()
            };
            if hash_file(&big, &algs, &opts).is_err() {
                continue;
            }
            group.bench_function(BenchmarkId::new(name, mode), |b| {
                b.iter(|| hash_file(&big, &algs, &opts).expect("hash"))
            });
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = kernels, files
}
criterion_main!(benches);
