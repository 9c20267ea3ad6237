//! The engine's own MD5 (`md5` in the registry) against the references:
//! RFC 1321's test suite, coreutils `md5sum` on random data, and the
//! RustCrypto `md-5` crate on random data split at random points.

use std::io::Write;
use std::process::{Command, Stdio};

use fleetsync_engine::Registry;
use proptest::prelude::*;

fn ours(pieces: &[&[u8]]) -> String {
    let mut s = Registry::with_builtins().get("md5").unwrap();
    for p in pieces {
        s.update(p);
    }
    s.finish().to_hex()
}

fn crate_md5(data: &[u8]) -> String {
    use md5::Digest as _;
    md5::Md5::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Deterministic pseudo-random bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn rfc_1321_appendix_a5_suite() {
    let cases: [(&str, &str); 7] = [
        ("", "d41d8cd98f00b204e9800998ecf8427e"),
        ("a", "0cc175b9c0f1b6a831c399e269772661"),
        ("abc", "900150983cd24fb0d6963f7d28e17f72"),
        ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
        (
            "abcdefghijklmnopqrstuvwxyz",
            "c3fcd3d76192e4007dfb496cca67e13b",
        ),
        (
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
            "d174ab98d277d9f5a5611c2c9f419d9f",
        ),
        (
            "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
            "57edf4a22be3c955ac49da2e2107b67a",
        ),
    ];
    for (input, want) in cases {
        assert_eq!(ours(&[input.as_bytes()]), want, "{input:?}");
        // Byte by byte crosses every block boundary the slow way.
        let bytes: Vec<&[u8]> = input.as_bytes().chunks(1).collect();
        assert_eq!(ours(&bytes), want, "{input:?} byte by byte");
    }
}

/// `md5sum` of `data` fed on standard input.
fn md5sum(data: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("coreutils md5sum is the reference; install coreutils");
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..32].to_owned()
}

#[test]
fn differential_against_md5sum_on_random_data() {
    // Every length around the padding boundaries (55/56/64 bytes), then
    // bigger random inputs up to a few MiB.
    let mut lens: Vec<usize> = (0..=130).collect();
    lens.extend([1000, 4095, 4096, 65_537, 1 << 20, (3 << 20) + 17]);
    for (i, len) in lens.into_iter().enumerate() {
        let data = noise(len, 0x1234_5678 + i as u64);
        assert_eq!(ours(&[&data]), md5sum(&data), "length {len}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Same digest as `md-5` whatever the data and however it is split.
    #[test]
    fn matches_the_md5_crate_for_any_split(
        data in proptest::collection::vec(any::<u8>(), 0..5000),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
        at.sort_unstable();
        let mut pieces = Vec::new();
        let mut start = 0;
        for a in at {
            pieces.push(&data[start..a]);
            start = a;
        }
        pieces.push(&data[start..]);
        prop_assert_eq!(ours(&pieces), crate_md5(&data));
    }
}
