//! `hash_open_file`: hashing a file the caller already opened gives what
//! `hash_file` gives for its path, published known answers, and what
//! independent crates compute, on every read path (small, streamed,
//! parallel chunks); it reads from the start whatever the file offset.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};

use fleetsync_engine::{hash_file, hash_open_file, Error, HashOptions, IoMode, Registry};
use proptest::prelude::*;

fn opts(io: IoMode) -> HashOptions {
    HashOptions {
        io,
        ..HashOptions::default()
    }
}

/// A file holding `data` in a fresh temp dir (kept alive by the guard).
fn file_with(data: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, data).unwrap();
    (dir, path)
}

fn md5_of(data: &[u8]) -> Vec<u8> {
    use md5::Digest as _;
    md5::Md5::digest(data).to_vec()
}

#[test]
fn known_answers_crc32_md5_sha256_of_check_string() {
    let (_dir, path) = file_with(b"123456789");
    let r = Registry::with_builtins();
    let algs = [
        r.info("crc32").unwrap(),
        r.info("md5").unwrap(),
        r.info("sha256").unwrap(),
        r.info("cksum").unwrap(),
    ];
    for io in [IoMode::Auto, IoMode::Pread, IoMode::Mmap] {
        let h = hash_open_file(&File::open(&path).unwrap(), &algs, &opts(io)).unwrap();
        assert_eq!(h.size, 9);
        // CRC-32/ISO-HDLC and CRC-32/CKSUM check values (reveng catalogue),
        // MD5 and SHA-256 of "123456789" as md5sum/sha256sum print them.
        assert_eq!(h.digests[0].to_hex(), "cbf43926", "{io}");
        assert_eq!(h.digests[1].to_hex(), "25f9e794323b453885f5181f1b624d0b");
        assert_eq!(
            h.digests[2].to_hex(),
            "15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225"
        );
        assert_eq!(h.digests[3].value(), Some(930_766_865));
    }
}

#[test]
fn empty_file_hashes_to_the_empty_digests() {
    let (_dir, path) = file_with(b"");
    let r = Registry::with_builtins();
    let algs = [r.info("md5").unwrap(), r.info("crc32").unwrap()];
    let h = hash_open_file(&File::open(&path).unwrap(), &algs, &HashOptions::default()).unwrap();
    assert_eq!(h.size, 0);
    assert_eq!(h.digests[0].to_hex(), "d41d8cd98f00b204e9800998ecf8427e");
    assert_eq!(h.digests[1].to_hex(), "00000000");
}

#[test]
fn reads_from_the_start_and_leaves_the_offset_alone() {
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let (_dir, path) = file_with(&data);
    let mut file = File::open(&path).unwrap();
    file.seek(SeekFrom::Start(12_345)).unwrap();
    let r = Registry::with_builtins();
    let h = hash_open_file(&file, &[r.info("md5").unwrap()], &HashOptions::default()).unwrap();
    assert_eq!(h.digests[0].as_bytes(), md5_of(&data).as_slice());
    assert_eq!(file.stream_position().unwrap(), 12_345);
}

#[test]
fn a_pipe_is_read_as_a_stream_to_its_end() {
    let (reader, mut writer) = std::io::pipe().unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let sent = data.clone();
    let t = std::thread::spawn(move || writer.write_all(&sent));
    let file = File::from(std::os::fd::OwnedFd::from(reader));
    let r = Registry::with_builtins();
    let h = hash_open_file(&file, &[r.info("crc32").unwrap()], &HashOptions::default()).unwrap();
    t.join().unwrap().unwrap();
    assert_eq!(h.size, data.len() as u64);
    assert_eq!(
        h.digests[0].value(),
        Some(u64::from(crc32fast::hash(&data)))
    );
}

#[test]
fn a_directory_is_an_io_error_without_a_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = File::open(dir.path()).unwrap();
    let r = Registry::with_builtins();
    let err = hash_open_file(&file, &[r.info("crc32").unwrap()], &HashOptions::default())
        .expect_err("a directory has no bytes to hash");
    match err {
        Error::Io { path: None, source } => {
            assert_eq!(source.raw_os_error(), Some(libc::EISDIR), "{source}")
        }
        other => panic!("unexpected error {other:?}"),
    }
}

#[test]
fn big_file_takes_the_parallel_chunk_path_and_matches_independent_crates() {
    // 5 MiB + a tail, split into 1 MiB chunks (threshold lowered).
    let data: Vec<u8> = (0..(5u32 << 20) + 4_321)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (_dir, path) = file_with(&data);
    let r = Registry::with_builtins();
    let algs = [r.info("crc32").unwrap(), r.info("md5").unwrap()];
    for io in [IoMode::Pread, IoMode::Mmap, IoMode::Auto] {
        let o = HashOptions {
            io,
            chunk_size: 1 << 20,
            parallel_threshold: 1 << 20,
        };
        let h = hash_open_file(&File::open(&path).unwrap(), &algs, &o).unwrap();
        assert_eq!(h.size, data.len() as u64);
        assert_eq!(
            h.digests[0].value(),
            Some(u64::from(crc32fast::hash(&data)))
        );
        assert_eq!(h.digests[1].as_bytes(), md5_of(&data).as_slice());
        assert_eq!(h, hash_file(&path, &algs, &o).unwrap());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Same digests as `hash_file` and as crc32fast / md-5, whatever the
    /// size (around the 1 MiB read block and the chunk size) and split.
    #[test]
    fn matches_hash_file_and_reference_crates(
        len in prop_oneof![0usize..5000, (1usize << 20) - 70..(1 << 20) + 70, 0usize..(3 << 20)],
        seed in any::<u32>(),
        chunk_kib in 1usize..1500,
        mmap in any::<bool>(),
    ) {
        let mut x = seed | 1;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let (_dir, path) = file_with(&data);
        let r = Registry::with_builtins();
        let algs = [r.info("crc32").unwrap(), r.info("md5").unwrap()];
        let o = HashOptions {
            io: if mmap { IoMode::Mmap } else { IoMode::Pread },
            chunk_size: chunk_kib << 10,
            parallel_threshold: (chunk_kib as u64) << 10,
        };
        let h = hash_open_file(&File::open(&path).unwrap(), &algs, &o).unwrap();
        prop_assert_eq!(h.size, len as u64);
        prop_assert_eq!(h.digests[0].value(), Some(u64::from(crc32fast::hash(&data))));
        let md5_ref = md5_of(&data);
        prop_assert_eq!(h.digests[1].as_bytes(), md5_ref.as_slice());
        prop_assert_eq!(&h, &hash_file(&path, &algs, &o).unwrap());
    }
}
