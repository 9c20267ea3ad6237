//! The old Unix sums (`sum -r`, `sum -s`) and Adler-32.

use crate::crc::downcast_same;
use crate::{Algorithm, Digest, Error};

/// BSD `sum -r` kernel: a 16-bit rotate-right-then-add checksum.
///
/// The dependency chain (rotate, add) is inherently serial: each byte needs
/// the previous 16-bit state, so there is no lane parallelism to exploit.
/// `u16::rotate_right` compiles to one `ror` and the add to one `add`, so
/// this runs at the 2-cycle-per-byte latency bound; unrolling by 8 only
/// removes loop overhead. Hand-written because no crate offers it; measured
/// (1 MiB, `examples/kernel_choice.rs`): 1.52 GB/s against 0.75 GB/s for the
/// textbook shift/add/mask loop of coreutils `sum.c` (`sum -r` itself
/// hashed a cached 1 GB file in 1.56 s of user time, ~0.64 GB/s).
pub(crate) fn bsd_update(mut s: u16, data: &[u8]) -> u16 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        s = s.rotate_right(1).wrapping_add(u16::from(c[0]));
        s = s.rotate_right(1).wrapping_add(u16::from(c[1]));
        s = s.rotate_right(1).wrapping_add(u16::from(c[2]));
        s = s.rotate_right(1).wrapping_add(u16::from(c[3]));
        s = s.rotate_right(1).wrapping_add(u16::from(c[4]));
        s = s.rotate_right(1).wrapping_add(u16::from(c[5]));
        s = s.rotate_right(1).wrapping_add(u16::from(c[6]));
        s = s.rotate_right(1).wrapping_add(u16::from(c[7]));
    }
    for &b in chunks.remainder() {
        s = s.rotate_right(1).wrapping_add(u16::from(b));
    }
    s
}

/// System V `sum -s` kernel: the byte sum modulo 2^32 (coreutils keeps an
/// `unsigned int`), folded to 16 bits only when printed.
///
/// On x86_64 this uses `psadbw` (SSE2, always present there), which sums
/// 16 bytes per instruction into two u64 lanes; elsewhere a scalar loop.
/// Measured (1 MiB, `examples/kernel_choice.rs`): 49.6 GB/s against
/// 11.0 GB/s for the plain `fold` that LLVM vectorises at the x86-64
/// baseline; that gap is why it is hand-written.
pub(crate) fn sysv_update(s: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        s.wrapping_add(sysv_sse2(data) as u32)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        data.iter()
            .fold(s, |acc, &b| acc.wrapping_add(u32::from(b)))
    }
}

#[cfg(target_arch = "x86_64")]
fn sysv_sse2(data: &[u8]) -> u64 {
    use std::arch::x86_64::{
        __m128i, _mm_add_epi64, _mm_loadu_si128, _mm_sad_epu8, _mm_setzero_si128, _mm_storeu_si128,
    };
    let mut chunks = data.chunks_exact(64);
    // SAFETY: SSE2 is part of the x86_64 baseline; every load reads 16 bytes
    // inside a 64-byte chunk of `data` (unaligned loads), and the store
    // writes into a local 16-byte array.
    let total = unsafe {
        let zero = _mm_setzero_si128();
        let mut acc0 = _mm_setzero_si128();
        let mut acc1 = _mm_setzero_si128();
        for c in &mut chunks {
            let p = c.as_ptr().cast::<__m128i>();
            let a = _mm_sad_epu8(_mm_loadu_si128(p), zero);
            let b = _mm_sad_epu8(_mm_loadu_si128(p.add(1)), zero);
            let d = _mm_sad_epu8(_mm_loadu_si128(p.add(2)), zero);
            let e = _mm_sad_epu8(_mm_loadu_si128(p.add(3)), zero);
            acc0 = _mm_add_epi64(acc0, _mm_add_epi64(a, b));
            acc1 = _mm_add_epi64(acc1, _mm_add_epi64(d, e));
        }
        let mut lanes = [0u64; 2];
        _mm_storeu_si128(
            lanes.as_mut_ptr().cast::<__m128i>(),
            _mm_add_epi64(acc0, acc1),
        );
        lanes[0].wrapping_add(lanes[1])
    };
    chunks
        .remainder()
        .iter()
        .fold(total, |acc, &b| acc.wrapping_add(u64::from(b)))
}

/// `sum -s` folding of the 32-bit byte sum to 16 bits (coreutils `sum.c`).
pub(crate) fn sysv_fold(s: u32) -> u16 {
    let r = (s & 0xffff) + (s >> 16);
    ((r & 0xffff) + (r >> 16)) as u16
}

/// `sum -r`.
#[derive(Clone, Default)]
pub(crate) struct Bsd {
    state: u16,
    len: u64,
}

impl Algorithm for Bsd {
    fn name(&self) -> &str {
        "bsd"
    }
    fn update(&mut self, data: &[u8]) {
        self.state = bsd_update(self.state, data);
        self.len += data.len() as u64;
    }
    fn finish(&self) -> Digest {
        Digest::from_value(u64::from(self.state), 2)
    }
    fn reset(&mut self) {
        *self = Self::default();
    }
    plain_state_methods!(len);
}

/// `sum -s`.
#[derive(Clone, Default)]
pub(crate) struct Sysv {
    sum: u32,
    len: u64,
}

impl Algorithm for Sysv {
    fn name(&self) -> &str {
        "sysv"
    }
    fn update(&mut self, data: &[u8]) {
        self.sum = sysv_update(self.sum, data);
        self.len += data.len() as u64;
    }
    fn finish(&self) -> Digest {
        Digest::from_value(u64::from(sysv_fold(self.sum)), 2)
    }
    fn reset(&mut self) {
        *self = Self::default();
    }
    fn can_combine(&self) -> bool {
        true
    }
    fn combine(&mut self, next: &dyn Algorithm) -> Result<(), Error> {
        let next = downcast_same::<Self>(self, next)?;
        self.sum = self.sum.wrapping_add(next.sum);
        self.len += next.len;
        Ok(())
    }
    plain_state_methods!(len);
}

const ADLER_BASE: u64 = 65521;

/// zlib's `adler32_combine`: the Adler-32 of `A‖B` from those of `A`, `B` and `|B|`.
pub(crate) fn adler32_combine(a1: u32, a2: u32, len2: u64) -> u32 {
    let rem = len2 % ADLER_BASE;
    let a1 = u64::from(a1);
    let a2 = u64::from(a2);
    let mut sum1 = a1 & 0xffff;
    let mut sum2 = (rem * sum1) % ADLER_BASE;
    sum1 += (a2 & 0xffff) + ADLER_BASE - 1;
    sum2 += ((a1 >> 16) & 0xffff) + ((a2 >> 16) & 0xffff) + ADLER_BASE - rem;
    if sum1 >= ADLER_BASE {
        sum1 -= ADLER_BASE;
    }
    if sum1 >= ADLER_BASE {
        sum1 -= ADLER_BASE;
    }
    if sum2 >= ADLER_BASE << 1 {
        sum2 -= ADLER_BASE << 1;
    }
    if sum2 >= ADLER_BASE {
        sum2 -= ADLER_BASE;
    }
    (sum1 | (sum2 << 16)) as u32
}

/// Adler-32 through `simd-adler32` (AVX2 on this class of CPU).
#[derive(Clone)]
pub(crate) struct Adler32 {
    hasher: simd_adler32::Adler32,
    len: u64,
}

impl Default for Adler32 {
    fn default() -> Self {
        Adler32 {
            hasher: simd_adler32::Adler32::new(),
            len: 0,
        }
    }
}

impl Algorithm for Adler32 {
    fn name(&self) -> &str {
        "adler32"
    }
    fn update(&mut self, data: &[u8]) {
        self.hasher.write(data);
        self.len += data.len() as u64;
    }
    fn finish(&self) -> Digest {
        Digest::from_value(u64::from(self.hasher.finish()), 4)
    }
    fn reset(&mut self) {
        *self = Self::default();
    }
    fn can_combine(&self) -> bool {
        true
    }
    fn combine(&mut self, next: &dyn Algorithm) -> Result<(), Error> {
        let next = downcast_same::<Self>(self, next)?;
        let c = adler32_combine(self.hasher.finish(), next.hasher.finish(), next.len);
        self.hasher = simd_adler32::Adler32::from_checksum(c);
        self.len += next.len;
        Ok(())
    }
    plain_state_methods!(len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysv_sse2_matches_scalar_sum() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 131 + 7) as u8).collect();
        for len in [0, 1, 15, 16, 63, 64, 65, 1000, 10_000] {
            let scalar = data[..len]
                .iter()
                .fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
            assert_eq!(sysv_update(0, &data[..len]), scalar, "len {len}");
        }
    }

    #[test]
    fn bsd_matches_coreutils_formula() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 31 + 1) as u8).collect();
        let mut c: u32 = 0;
        for &b in &data {
            c = (c >> 1) + ((c & 1) << 15);
            c += u32::from(b);
            c &= 0xffff;
        }
        assert_eq!(u32::from(bsd_update(0, &data)), c);
    }
}
