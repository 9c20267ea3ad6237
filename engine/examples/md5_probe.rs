//! MD5 block function A/B: the engine's hand-scheduled MD5 (through the
//! registry) against RustCrypto `md-5` (feature `asm`), over the same
//! buffer in the same run, alternating, best of several rounds.
//!
//! `cargo run --release -p fleetsync-engine --example md5_probe [MiB] [rounds] [ours|crate]`
//!
//! With `ours` or `crate` only that one runs (for `perf stat -e cycles`,
//! which counts the same on a busy machine).

use std::time::Instant;

use fleetsync_engine::Registry;

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(256, |a| a.parse().expect("MiB"));
    let rounds: usize = args.next().map_or(5, |a| a.parse().expect("rounds"));
    let only = args.next();
    let run_ours = only.as_deref() != Some("crate");
    let run_crate = only.as_deref() != Some("ours");
    let mut x = 0x9e37_79b9u32;
    let buf: Vec<u8> = (0..mib << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let registry = Registry::with_builtins();
    let info = registry.info("md5").expect("md5");
    let (mut ours, mut theirs) = (f64::MAX, f64::MAX);
    for _ in 0..rounds {
        let mut a = None;
        let mut b = None;
        if run_ours {
            let t = Instant::now();
            let mut s = info.instantiate();
            for piece in buf.chunks(1 << 20) {
                s.update(piece);
            }
            a = Some(s.finish().as_bytes().to_vec());
            ours = ours.min(t.elapsed().as_secs_f64());
        }
        if run_crate {
            let t = Instant::now();
            let mut h = <md5::Md5 as md5::Digest>::new();
            for piece in buf.chunks(1 << 20) {
                md5::Digest::update(&mut h, piece);
            }
            b = Some(md5::Digest::finalize(h).to_vec());
            theirs = theirs.min(t.elapsed().as_secs_f64());
        }
        if let (Some(a), Some(b)) = (a, b) {
            assert_eq!(a, b, "digests differ");
        }
    }
    let gb = buf.len() as f64 / 1e9;
    println!(
        "engine md5 {:.3} GB/s, md-5 crate {:.3} GB/s, ratio {:.3}",
        gb / ours,
        gb / theirs,
        theirs / ours
    );
}
