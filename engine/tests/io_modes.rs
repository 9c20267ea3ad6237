//! `hash_file` gives the same digests whatever the read backend, the chunking
//! and the parallel split, and says honestly which backend read the file.

use std::path::Path;

use fleetsync_engine::{
    hash_file, hash_reader, AlgorithmInfo, Error, HashOptions, IoMode, IoUsed, Registry,
};

fn data(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 7) as u8
        })
        .collect()
}

fn infos(names: &[&str]) -> Vec<AlgorithmInfo> {
    let r = Registry::with_builtins();
    names.iter().map(|n| r.info(n).unwrap()).collect()
}

/// The reference: one `update` over the whole input, no I/O involved.
fn reference(algs: &[AlgorithmInfo], bytes: &[u8]) -> Vec<String> {
    algs.iter()
        .map(|a| {
            let mut s = a.instantiate();
            s.update(bytes);
            s.finish().to_hex()
        })
        .collect()
}

fn uring_works() -> bool {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("probe");
    std::fs::write(&p, b"x").unwrap();
    let opts = HashOptions {
        io: IoMode::Uring,
        ..HashOptions::default()
    };
    match hash_file(&p, &infos(&["crc32"]), &opts) {
        Ok(h) => h.io == IoUsed::Uring,
        Err(Error::UringUnavailable { .. }) => false,
        Err(e) => panic!("unexpected error probing io_uring: {e}"),
    }
}

fn check_all_modes(path: &Path, bytes: &[u8], algs: &[AlgorithmInfo], opts: &HashOptions) {
    let want = reference(algs, bytes);
    let uring = uring_works();
    for mode in [IoMode::Auto, IoMode::Uring, IoMode::Pread, IoMode::Mmap] {
        let o = HashOptions {
            io: mode,
            ..opts.clone()
        };
        let got = match hash_file(path, algs, &o) {
            Err(Error::UringUnavailable { .. }) if mode == IoMode::Uring && !uring => continue,
            r => r.unwrap_or_else(|e| panic!("{mode} on {} bytes: {e}", bytes.len())),
        };
        let hex: Vec<String> = got.digests.iter().map(|d| d.to_hex()).collect();
        assert_eq!(
            hex,
            want,
            "{mode}, {} bytes, chunk {}",
            bytes.len(),
            opts.chunk_size
        );
        assert_eq!(got.size, bytes.len() as u64);
        let expected_io = match mode {
            IoMode::Pread => IoUsed::Pread,
            IoMode::Mmap => IoUsed::Mmap,
            IoMode::Uring => IoUsed::Uring,
            // Auto: single files are read with pread (measured faster).
            IoMode::Auto => IoUsed::Pread,
        };
        assert_eq!(got.io, expected_io, "{mode} on {} bytes", bytes.len());
    }
}

const COMBINABLE: &[&str] = &[
    "crc32",
    "crc32c",
    "cksum",
    "adler32",
    "sysv",
    "crc16/xmodem",
];
const MIXED: &[&str] = &["crc32", "md5", "sha256", "blake3", "bsd", "xxh128"];

#[test]
fn every_mode_agrees_on_edge_sizes_and_chunk_sizes() {
    let dir = tempfile::tempdir().unwrap();
    for chunk in [4096usize, 8192, 65_537] {
        let opts = HashOptions {
            io: IoMode::Auto,
            chunk_size: chunk,
            parallel_threshold: 2 * chunk as u64,
        };
        let sizes = [
            0,
            1,
            4095,
            4096,
            4097,
            chunk - 1,
            chunk,
            chunk + 1,
            2 * chunk + 1,
            7 * chunk + 3,
        ];
        for (i, &size) in sizes.iter().enumerate() {
            let bytes = data(size, i as u32);
            let path = dir.path().join(format!("f{chunk}-{size}"));
            std::fs::write(&path, &bytes).unwrap();
            check_all_modes(&path, &bytes, &infos(COMBINABLE), &opts);
            check_all_modes(&path, &bytes, &infos(MIXED), &opts);
        }
    }
}

#[test]
fn big_file_over_the_default_threshold_uses_real_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let opts = HashOptions::default();
    let size = opts.parallel_threshold as usize + opts.chunk_size + 12_345;
    let bytes = data(size, 99);
    let path = dir.path().join("big");
    std::fs::write(&path, &bytes).unwrap();
    check_all_modes(&path, &bytes, &infos(COMBINABLE), &opts);
    check_all_modes(&path, &bytes, &infos(&["sha1", "blake3", "xxh3"]), &opts);
}

#[test]
fn sequential_pipeline_over_several_blocks() {
    // Not combinable, bigger than 8 MiB: the reader-thread path.
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(9 * (1 << 20) + 17, 5);
    let path = dir.path().join("seq");
    std::fs::write(&path, &bytes).unwrap();
    check_all_modes(&path, &bytes, &infos(MIXED), &HashOptions::default());
}

#[test]
fn a_stream_hashes_like_a_file() {
    let bytes = data(200_000, 3);
    let algs = infos(MIXED);
    let got = hash_reader(&bytes[..], &algs).unwrap();
    assert_eq!(got.io, IoUsed::Stream);
    assert_eq!(got.size, bytes.len() as u64);
    let hex: Vec<String> = got.digests.iter().map(|d| d.to_hex()).collect();
    assert_eq!(hex, reference(&algs, &bytes));
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let err = hash_file(
        Path::new("/nonexistent/fleetsync-test"),
        &infos(&["crc32"]),
        &HashOptions::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/fleetsync-test"),
        "{err}"
    );
}

#[test]
fn io_modes_parse_and_print() {
    for mode in [IoMode::Auto, IoMode::Uring, IoMode::Pread, IoMode::Mmap] {
        assert_eq!(mode.to_string().parse::<IoMode>().unwrap(), mode);
    }
    assert!("nope".parse::<IoMode>().is_err());
    assert_eq!(IoUsed::Stream.to_string(), "stream");
}

#[test]
fn hashing_runs_inside_a_capped_rayon_pool() {
    // One thread: the reader threads must not deadlock against the pool.
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(600_000, 11);
    let path = dir.path().join("pool");
    std::fs::write(&path, &bytes).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let opts = HashOptions {
        io: IoMode::Auto,
        chunk_size: 65_536,
        parallel_threshold: 65_536,
    };
    pool.install(|| check_all_modes(&path, &bytes, &infos(COMBINABLE), &opts));
}

#[test]
fn blake3_big_files_split_into_subtrees_match_blake3() {
    // Power-of-two chunks make each chunk a BLAKE3 subtree (hazmat merge);
    // the reference is the blake3 crate's one-shot hash via one update.
    let dir = tempfile::tempdir().unwrap();
    let algs = infos(&["blake3", "crc32"]);
    for chunk in [1024usize, 4096, 65_536] {
        let opts = HashOptions {
            io: IoMode::Auto,
            chunk_size: chunk,
            parallel_threshold: 0,
        };
        for pieces in [2usize, 3, 4, 5, 7, 8, 9] {
            for extra in [0usize, 1, chunk / 2, chunk - 1] {
                let size = (pieces - 1) * chunk + extra.max(1);
                let bytes = data(size, (pieces * 31 + extra) as u32);
                let path = dir.path().join(format!("b3-{chunk}-{pieces}-{extra}"));
                std::fs::write(&path, &bytes).unwrap();
                check_all_modes(&path, &bytes, &algs, &opts);
            }
        }
    }
    // A chunk size that is not a power of two: BLAKE3 streams instead.
    let opts = HashOptions {
        io: IoMode::Pread,
        chunk_size: 5000,
        parallel_threshold: 0,
    };
    let bytes = data(23_456, 1);
    let path = dir.path().join("b3-odd");
    std::fs::write(&path, &bytes).unwrap();
    check_all_modes(&path, &bytes, &algs, &opts);
}

/// A file truncated while it is hashed through a map: the hash is refused
/// with the same error a short `pread` gives, and the process lives (an
/// unguarded map would die of SIGBUS here).
#[test]
fn a_mapped_file_that_shrinks_meanwhile_is_an_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shrinks");
    for algs in [infos(&["sha256"]), infos(&["crc32"])] {
        // Sparse: no disk space, but every page is read (and cached) as zeros.
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(1 << 30).unwrap();
        let opts = HashOptions {
            io: IoMode::Mmap,
            ..HashOptions::default()
        };
        let truncate = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_len(4096)
                    .unwrap();
            })
        };
        let got = hash_file(&path, &algs, &opts);
        truncate.join().unwrap();
        let err = got.expect_err("1 GiB hashed in under 20 ms?");
        assert!(err.to_string().contains("shrank"), "{err}");
        // The next hash of the (now short) file works as ever.
        let again = hash_file(&path, &algs, &opts).unwrap();
        assert_eq!(again.size, 4096);
        let hex: Vec<String> = again.digests.iter().map(|d| d.to_hex()).collect();
        assert_eq!(hex, reference(&algs, &[0u8; 4096]));
    }
}
