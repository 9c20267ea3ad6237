//! Combining chunk states gives exactly what one pass over the whole input
//! gives, for every combinable algorithm, at any split points; and the
//! parallel chunked file path equals the single-thread streaming path.

use fleetsync_engine::{hash_file, hash_reader, AlgorithmInfo, HashOptions, IoMode, Registry};
use proptest::prelude::*;

fn combinable() -> Vec<AlgorithmInfo> {
    let r = Registry::with_builtins();
    let list: Vec<AlgorithmInfo> = r.iter().filter(|i| i.combinable).cloned().collect();
    // Every CRC-16 of the catalogue, crc32, crc32c, cksum, adler32, sysv.
    assert!(
        list.len() >= 36,
        "only {} combinable algorithms",
        list.len()
    );
    list
}

#[test]
fn the_expected_algorithms_combine_and_the_others_do_not() {
    let r = Registry::with_builtins();
    for name in [
        "crc32",
        "crc32c",
        "cksum",
        "adler32",
        "sysv",
        "crc16",
        "crc16/modbus",
    ] {
        assert!(r.info(name).unwrap().combinable, "{name}");
    }
    for name in ["bsd", "md5", "sha256", "blake3", "xxh3", "xxh128", "md2"] {
        assert!(!r.info(name).unwrap().combinable, "{name}");
        let mut a = r.get(name).unwrap();
        let b = r.get(name).unwrap();
        assert!(a.combine(b.as_ref()).is_err(), "{name}");
    }
}

#[test]
fn combining_different_algorithms_is_an_error() {
    let r = Registry::with_builtins();
    let mut a = r.get("crc16/xmodem").unwrap();
    let b = r.get("crc16/kermit").unwrap();
    assert!(a.combine(b.as_ref()).is_err());
    let c = r.get("crc32").unwrap();
    assert!(a.combine(c.as_ref()).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn combine_at_random_splits_equals_one_pass(
        data in proptest::collection::vec(any::<u8>(), 0..3000),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        tail in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
        cuts.sort_unstable();
        for info in combinable() {
            let mut whole = info.instantiate();
            whole.update(&data);

            let mut acc = info.instantiate();
            let mut start = 0;
            for &cut in cuts.iter().chain(std::iter::once(&data.len())) {
                let mut piece = info.instantiate();
                piece.update(&data[start..cut]);
                acc.combine(piece.as_ref()).unwrap();
                start = cut;
            }
            prop_assert_eq!(acc.finish(), whole.finish(), "{}", info.name);
            prop_assert_eq!(acc.len(), whole.len());

            // A combined state keeps taking input.
            acc.update(&tail);
            whole.update(&tail);
            prop_assert_eq!(acc.finish(), whole.finish(), "{} after more input", info.name);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn parallel_chunked_file_equals_streaming(
        data in proptest::collection::vec(any::<u8>(), 0..20_000),
        chunk in 1usize..5000,
        mmap in any::<bool>(),
    ) {
        let algs = combinable();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, &data).unwrap();
        let opts = HashOptions {
            io: if mmap { IoMode::Mmap } else { IoMode::Pread },
            chunk_size: chunk,
            parallel_threshold: 0,
        };
        let parallel = hash_file(&path, &algs, &opts).unwrap();
        let streaming = hash_reader(&data[..], &algs).unwrap();
        prop_assert_eq!(parallel.digests, streaming.digests);
        prop_assert_eq!(parallel.size, data.len() as u64);
    }
}

#[test]
fn regression_reflected_crc_with_asymmetric_init_combines() {
    // CRC-16/RIELLO, ISO-IEC-14443-3-A and TMS37157 are reflected with an
    // init that is not its own bit reversal; combine once used it unreflected.
    let r = Registry::with_builtins();
    for name in ["crc16/riello", "crc16/iso-iec-14443-3-a", "crc16/tms37157"] {
        let mut whole = r.get(name).unwrap();
        whole.update(b"123456789");
        let mut a = r.get(name).unwrap();
        a.update(b"1234");
        let mut b = r.get(name).unwrap();
        b.update(b"56789");
        a.combine(b.as_ref()).unwrap();
        assert_eq!(a.finish(), whole.finish(), "{name}");
    }
}
