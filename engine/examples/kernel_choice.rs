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
    {
        use crc_fast::CrcAlgorithm as C;
        let candidates = [
            ("crc32 crc-fast", C::Crc32IsoHdlc),
            ("crc32c crc-fast", C::Crc32Iscsi),
            ("cksum crc-fast", C::Crc32Cksum),
            ("crc16/xmodem crc-fast", C::Crc16Xmodem),
            ("crc16/arc crc-fast", C::Crc16Arc),
        ];
        for (name, alg) in candidates {
            gbps(name, &buf, |b| crc_fast::checksum(alg, b));
        }
    }
    static C32C: crc::Crc<u32, crc::Table<16>> =
        crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);
    static CK: crc::Crc<u32, crc::Table<16>> =
        crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_CKSUM);
    static X: crc::Crc<u16, crc::Table<16>> =
        crc::Crc::<u16, crc::Table<16>>::new(&crc::CRC_16_XMODEM);
    static A: crc::Crc<u16, crc::Table<16>> =
        crc::Crc::<u16, crc::Table<16>>::new(&crc::CRC_16_ARC);
    gbps("crc32c crc Table<16>", &buf, |b| {
        u64::from(C32C.checksum(b))
    });
    gbps("cksum crc Table<16>", &buf, |b| u64::from(CK.checksum(b)));
    gbps("crc16/xmodem crc Table<16>", &buf, |b| {
        u64::from(X.checksum(b))
    });
    gbps("crc16/arc crc Table<16>", &buf, |b| {
        u64::from(A.checksum(b))
    });
    gbps("adler32 simd-adler32", &buf, |b| {
        u64::from(simd_adler32::adler32(&b))
    });
    // sysv: plain byte-sum loop (what LLVM makes of it at the x86-64 baseline)
    // against the hand-written psadbw kernel inside the engine.
    gbps("sysv scalar fold", &buf, |b| {
        u64::from(b.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x))))
    });
    let registry = fleetsync_engine::Registry::with_builtins();
    for name in ["sysv", "bsd"] {
        let info = registry.info(name).unwrap();
        gbps(&format!("{name} engine"), &buf, |b| {
            let mut s = info.instantiate();
            s.update(b);
            s.finish().value().unwrap()
        });
    }
    gbps("bsd textbook (coreutils formula)", &buf, |b| {
        let mut c: u32 = 0;
        for &x in b {
            c = (c >> 1) + ((c & 1) << 15);
            c = (c + u32::from(x)) & 0xffff;
        }
        u64::from(c)
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
