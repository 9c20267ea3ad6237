//! Compares candidate crates for the same kernel on this machine; the numbers
//! justify the choices in `builtin.rs`. Run:
//! `cargo run --release -p fleetsync-engine --example kernel_choice`.

use std::hint::black_box;
use std::time::Instant;

fn gbps(name: &str, buf: &[u8], mut f: impl FnMut(&[u8]) -> u64) {
    let mut sink = 0u64;
    for _ in 0..3 {
        sink ^= f(buf);
    }
    let reps = 200;
    let t = Instant::now();
    for _ in 0..reps {
        sink ^= f(black_box(buf));
    }
    let secs = t.elapsed().as_secs_f64();
    black_box(sink);
    println!(
        "{name:32} {:7.2} GB/s",
        (buf.len() * reps) as f64 / secs / 1e9
    );
}

fn main() {
    let buf: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    gbps("crc32 crc32fast", &buf, |b| u64::from(crc32fast::hash(b)));
    gbps("crc32 crc-fast", &buf, |b| {
        crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32IsoHdlc, b)
    });
    gbps("crc32c crc-fast", &buf, |b| {
        crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, b)
    });
    static C32C: crc::Crc<u32, crc::Table<16>> =
        crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);
    gbps("crc32c crc Table<16>", &buf, |b| {
        u64::from(C32C.checksum(b))
    });
    gbps("cksum crc-fast", &buf, |b| {
        crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Cksum, b)
    });
    static CK: crc::Crc<u32, crc::Table<16>> =
        crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_CKSUM);
    gbps("cksum crc Table<16>", &buf, |b| u64::from(CK.checksum(b)));
    gbps("crc16/xmodem crc-fast", &buf, |b| {
        crc_fast::checksum(crc_fast::CrcAlgorithm::Crc16Xmodem, b)
    });
    gbps("crc16/arc crc-fast", &buf, |b| {
        crc_fast::checksum(crc_fast::CrcAlgorithm::Crc16Arc, b)
    });
    static X: crc::Crc<u16, crc::Table<16>> =
        crc::Crc::<u16, crc::Table<16>>::new(&crc::CRC_16_XMODEM);
    gbps("crc16/xmodem crc Table<16>", &buf, |b| {
        u64::from(X.checksum(b))
    });
    static A: crc::Crc<u16, crc::Table<16>> =
        crc::Crc::<u16, crc::Table<16>>::new(&crc::CRC_16_ARC);
    gbps("crc16/arc crc Table<16>", &buf, |b| {
        u64::from(A.checksum(b))
    });
    gbps("adler32 simd-adler32", &buf, |b| {
        u64::from(simd_adler32::adler32(&b))
    });
    // Small inputs: crc-fast has per-call setup; the tree of small files cares.
    let small = &buf[..100];
    gbps("100B crc32 crc32fast", small, |b| {
        u64::from(crc32fast::hash(b))
    });
    gbps("100B crc32 crc-fast", small, |b| {
        crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32IsoHdlc, b)
    });
    gbps("100B crc16/arc crc-fast", small, |b| {
        crc_fast::checksum(crc_fast::CrcAlgorithm::Crc16Arc, b)
    });
    gbps("100B crc16/arc crc Table<16>", small, |b| {
        u64::from(A.checksum(b))
    });
}
