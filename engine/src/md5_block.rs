//! MD5 (RFC 1321) with a hand-scheduled block function.
//!
//! Written by hand because a measurement showed the crate was the
//! bottleneck: on the 2-core AMD EPYC we measure on, `fleetsync sum -a md5`
//! of a cached 1 GiB file ran at 0.53 GB/s with RustCrypto `md-5` 0.10
//! (feature `asm`) against 0.60 GB/s for coreutils `md5sum` (0.88x; MD5 is
//! serial, so nothing but the block function can close that gap).
//!
//! Measured with this block function (same machine, other jobs running):
//! `examples/md5_probe.rs` 0.68-0.70 GB/s against 0.53-0.54 GB/s for
//! `md-5` in the same run (1.28-1.31x); `fleetsync bench --compare -a md5`
//! 0.66 GB/s against `md5sum` 0.57 in the same run (1.16x wall, 1.07x CPU).
//! 0.69 GB/s is 64 bytes per ~93 ns, about 288 cycles per block at this
//! CPU's ~3.1 GHz: the latency of the chain below (16 steps each of 5, 4,
//! 4 and 5 operations), so the block function runs at its bound.
//!
//! MD5 is a chain of 64 steps, each `a = b + rotl(a + f(b, c, d) + k + m, s)`,
//! where `b` is the previous step's result: the time per block is the
//! latency of that chain, not the instruction count. So every step here is
//! written to put as few operations as possible between the previous
//! result `b` and this one:
//!
//! - `a + k + m` does not depend on `b` and is added first, off the chain;
//! - F as `d ^ (b & (c ^ d))`: `c ^ d` is ready early, 2 ops after `b`;
//! - G as `(c & !d) + (b & d)`: the two halves have no bit in common, so
//!   OR is ADD, and `c & !d` joins the early sum: 1 op after `b`, then the add;
//! - H as `b ^ (c ^ d)`: 1 op after `b`;
//! - I as `c ^ (b | !d)`: `!d` is ready early, 2 ops after `b`.

/// The sine-derived constants `floor(abs(sin(i + 1)) * 2^32)` (RFC 1321 §3.4).
const K: [u32; 64] = [
    0xd76a_a478,
    0xe8c7_b756,
    0x2420_70db,
    0xc1bd_ceee,
    0xf57c_0faf,
    0x4787_c62a,
    0xa830_4613,
    0xfd46_9501,
    0x6980_98d8,
    0x8b44_f7af,
    0xffff_5bb1,
    0x895c_d7be,
    0x6b90_1122,
    0xfd98_7193,
    0xa679_438e,
    0x49b4_0821,
    0xf61e_2562,
    0xc040_b340,
    0x265e_5a51,
    0xe9b6_c7aa,
    0xd62f_105d,
    0x0244_1453,
    0xd8a1_e681,
    0xe7d3_fbc8,
    0x21e1_cde6,
    0xc337_07d6,
    0xf4d5_0d87,
    0x455a_14ed,
    0xa9e3_e905,
    0xfcef_a3f8,
    0x676f_02d9,
    0x8d2a_4c8a,
    0xfffa_3942,
    0x8771_f681,
    0x6d9d_6122,
    0xfde5_380c,
    0xa4be_ea44,
    0x4bde_cfa9,
    0xf6bb_4b60,
    0xbebf_bc70,
    0x289b_7ec6,
    0xeaa1_27fa,
    0xd4ef_3085,
    0x0488_1d05,
    0xd9d4_d039,
    0xe6db_99e5,
    0x1fa2_7cf8,
    0xc4ac_5665,
    0xf429_2244,
    0x432a_ff97,
    0xab94_23a7,
    0xfc93_a039,
    0x655b_59c3,
    0x8f0c_cc92,
    0xffef_f47d,
    0x8584_5dd1,
    0x6fa8_7e4f,
    0xfe2c_e6e0,
    0xa301_4314,
    0x4e08_11a1,
    0xf753_7e82,
    0xbd3a_f235,
    0x2ad7_d2bb,
    0xeb86_d391,
];

/// The initial state (RFC 1321 §3.3).
const INIT: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];

/// `x`, computed where it is written: hides the value from the optimiser so
/// that it cannot re-associate the sum. LLVM canonicalises `a + f + k + m`
/// to add the constant `k` last, after `f`, putting it on the dependency
/// chain (6 operations per F step instead of 5). Measured with
/// `examples/md5_probe.rs` on the EPYC, quiet machine, against `md-5` in
/// the same run: no barrier 1.06x, `std::hint::black_box` (a store and a
/// load per step) 0.95x, this empty `asm!` (no instruction at all) 1.28x.
/// Off x86-64 the plain sum is still correct, only slower.
#[inline(always)]
fn opaque(mut x: u32) -> u32 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: an empty instruction template: the register holding `x` is
    // declared read and written but left as it is, and nothing else is touched.
    unsafe {
        std::arch::asm!("/* {0:e} */", inout(reg) x, options(pure, nomem, nostack, preserves_flags));
    }
    x
}

/// Runs the block function over every 64-byte block of `blocks` (whose
/// length must be a multiple of 64), updating `state`.
///
/// The state stays in registers across blocks; each block is 64 steps
/// fully unrolled, each with the shortest dependency chain its round
/// function allows (see the module docs).
#[inline]
pub(crate) fn compress(state: &mut [u32; 4], blocks: &[u8]) {
    debug_assert_eq!(blocks.len() % 64, 0);
    let [mut a, mut b, mut c, mut d] = *state;
    for block in blocks.chunks_exact(64) {
        let mut m = [0u32; 16];
        for (w, bytes) in m.iter_mut().zip(block.chunks_exact(4)) {
            *w = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        let (a0, b0, c0, d0) = (a, b, c, d);

        // One step: `$a = $b + rotl($a + f + K[$i] + m[$w], $s)`, with the
        // terms that do not depend on `$b` summed first.
        macro_rules! f {
            ($a:ident, $b:ident, $c:ident, $d:ident, $w:expr, $s:expr, $i:expr) => {
                let early = opaque($a.wrapping_add(K[$i]).wrapping_add(m[$w]));
                let f = $d ^ ($b & ($c ^ $d));
                $a = $b.wrapping_add(early.wrapping_add(f).rotate_left($s));
            };
        }
        macro_rules! g {
            ($a:ident, $b:ident, $c:ident, $d:ident, $w:expr, $s:expr, $i:expr) => {
                let early = opaque(
                    $a.wrapping_add(K[$i])
                        .wrapping_add(m[$w])
                        .wrapping_add($c & !$d),
                );
                $a = $b.wrapping_add(early.wrapping_add($b & $d).rotate_left($s));
            };
        }
        macro_rules! h {
            ($a:ident, $b:ident, $c:ident, $d:ident, $w:expr, $s:expr, $i:expr) => {
                let early = opaque($a.wrapping_add(K[$i]).wrapping_add(m[$w]));
                let cd = $c ^ $d;
                $a = $b.wrapping_add(early.wrapping_add($b ^ cd).rotate_left($s));
            };
        }
        macro_rules! i {
            ($a:ident, $b:ident, $c:ident, $d:ident, $w:expr, $s:expr, $i:expr) => {
                let early = opaque($a.wrapping_add(K[$i]).wrapping_add(m[$w]));
                let nd = !$d;
                $a = $b.wrapping_add(early.wrapping_add($c ^ ($b | nd)).rotate_left($s));
            };
        }

        f!(a, b, c, d, 0, 7, 0);
        f!(d, a, b, c, 1, 12, 1);
        f!(c, d, a, b, 2, 17, 2);
        f!(b, c, d, a, 3, 22, 3);
        f!(a, b, c, d, 4, 7, 4);
        f!(d, a, b, c, 5, 12, 5);
        f!(c, d, a, b, 6, 17, 6);
        f!(b, c, d, a, 7, 22, 7);
        f!(a, b, c, d, 8, 7, 8);
        f!(d, a, b, c, 9, 12, 9);
        f!(c, d, a, b, 10, 17, 10);
        f!(b, c, d, a, 11, 22, 11);
        f!(a, b, c, d, 12, 7, 12);
        f!(d, a, b, c, 13, 12, 13);
        f!(c, d, a, b, 14, 17, 14);
        f!(b, c, d, a, 15, 22, 15);

        g!(a, b, c, d, 1, 5, 16);
        g!(d, a, b, c, 6, 9, 17);
        g!(c, d, a, b, 11, 14, 18);
        g!(b, c, d, a, 0, 20, 19);
        g!(a, b, c, d, 5, 5, 20);
        g!(d, a, b, c, 10, 9, 21);
        g!(c, d, a, b, 15, 14, 22);
        g!(b, c, d, a, 4, 20, 23);
        g!(a, b, c, d, 9, 5, 24);
        g!(d, a, b, c, 14, 9, 25);
        g!(c, d, a, b, 3, 14, 26);
        g!(b, c, d, a, 8, 20, 27);
        g!(a, b, c, d, 13, 5, 28);
        g!(d, a, b, c, 2, 9, 29);
        g!(c, d, a, b, 7, 14, 30);
        g!(b, c, d, a, 12, 20, 31);

        h!(a, b, c, d, 5, 4, 32);
        h!(d, a, b, c, 8, 11, 33);
        h!(c, d, a, b, 11, 16, 34);
        h!(b, c, d, a, 14, 23, 35);
        h!(a, b, c, d, 1, 4, 36);
        h!(d, a, b, c, 4, 11, 37);
        h!(c, d, a, b, 7, 16, 38);
        h!(b, c, d, a, 10, 23, 39);
        h!(a, b, c, d, 13, 4, 40);
        h!(d, a, b, c, 0, 11, 41);
        h!(c, d, a, b, 3, 16, 42);
        h!(b, c, d, a, 6, 23, 43);
        h!(a, b, c, d, 9, 4, 44);
        h!(d, a, b, c, 12, 11, 45);
        h!(c, d, a, b, 15, 16, 46);
        h!(b, c, d, a, 2, 23, 47);

        i!(a, b, c, d, 0, 6, 48);
        i!(d, a, b, c, 7, 10, 49);
        i!(c, d, a, b, 14, 15, 50);
        i!(b, c, d, a, 5, 21, 51);
        i!(a, b, c, d, 12, 6, 52);
        i!(d, a, b, c, 3, 10, 53);
        i!(c, d, a, b, 10, 15, 54);
        i!(b, c, d, a, 1, 21, 55);
        i!(a, b, c, d, 8, 6, 56);
        i!(d, a, b, c, 15, 10, 57);
        i!(c, d, a, b, 6, 15, 58);
        i!(b, c, d, a, 13, 21, 59);
        i!(a, b, c, d, 4, 6, 60);
        i!(d, a, b, c, 11, 10, 61);
        i!(c, d, a, b, 2, 15, 62);
        i!(b, c, d, a, 9, 21, 63);

        a = a.wrapping_add(a0);
        b = b.wrapping_add(b0);
        c = c.wrapping_add(c0);
        d = d.wrapping_add(d0);
    }
    *state = [a, b, c, d];
}

/// An MD5 computation in progress.
#[derive(Clone)]
pub(crate) struct Md5 {
    state: [u32; 4],
    /// Bytes of an incomplete block.
    pending: [u8; 64],
    pending_len: usize,
    /// Bytes hashed so far (the padding encodes it mod 2^64 bits).
    len: u64,
}

impl Default for Md5 {
    fn default() -> Self {
        Md5 {
            state: INIT,
            pending: [0; 64],
            pending_len: 0,
            len: 0,
        }
    }
}

impl Md5 {
    /// Hashes `data` after what came before.
    pub(crate) fn update(&mut self, mut data: &[u8]) {
        self.len = self.len.wrapping_add(data.len() as u64);
        if self.pending_len > 0 {
            let take = (64 - self.pending_len).min(data.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&data[..take]);
            self.pending_len += take;
            data = &data[take..];
            if self.pending_len < 64 {
                return;
            }
            compress(&mut self.state, &self.pending);
            self.pending_len = 0;
        }
        let whole = data.len() / 64 * 64;
        compress(&mut self.state, &data[..whole]);
        let rest = &data[whole..];
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// The digest of everything hashed so far (the state is left as is).
    pub(crate) fn digest(&self) -> [u8; 16] {
        let mut state = self.state;
        let mut tail = [0u8; 128];
        tail[..self.pending_len].copy_from_slice(&self.pending[..self.pending_len]);
        tail[self.pending_len] = 0x80;
        // The length goes in the last 8 bytes of the first block that has room.
        let end = if self.pending_len < 56 { 64 } else { 128 };
        tail[end - 8..end].copy_from_slice(&self.len.wrapping_mul(8).to_le_bytes());
        compress(&mut state, &tail[..end]);
        let mut out = [0u8; 16];
        for (o, w) in out.chunks_exact_mut(4).zip(state) {
            o.copy_from_slice(&w.to_le_bytes());
        }
        out
    }
}

impl crate::Algorithm for Md5 {
    fn name(&self) -> &str {
        "md5"
    }
    fn update(&mut self, data: &[u8]) {
        Md5::update(self, data);
    }
    fn finish(&self) -> crate::Digest {
        crate::Digest::from_bytes(self.digest().to_vec())
    }
    fn reset(&mut self) {
        *self = Md5::default();
    }
    fn box_clone(&self) -> Box<dyn crate::Algorithm> {
        Box::new(self.clone())
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_the_sines_of_rfc_1321() {
        for (i, k) in K.iter().enumerate() {
            let want = (((i + 1) as f64).sin().abs() * 4_294_967_296.0) as u32;
            assert_eq!(*k, want, "K[{i}]");
        }
    }
}
