//! One generic CRC: a kernel trait, one [`Algorithm`] wrapper over any kernel,
//! and one combine for every CRC, done by GF(2) polynomial arithmetic.
//!
//! Combine: with digest `D`, init `I` and xorout `X`, and `adv(r, n)` the
//! register `r` advanced over `n` zero bytes (`r * x^(8n) mod P`),
//! `D(A‖B) = adv(D(A) ^ X ^ I, |B|) ^ D(B)`. This follows from linearity:
//! starting the register at `R` instead of `I` changes the result by the
//! advance of `R ^ I`.

use crate::{Algorithm, Digest, Error};

/// The Rocksoft parameters that combining needs. `refin == refout` is
/// assumed (true of every CRC-16 and CRC-32 used here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CrcSpec {
    /// Register width in bits (1..=64).
    pub width: u8,
    /// Generator polynomial, normal (MSB-first) form, top term omitted.
    pub poly: u64,
    /// Initial register value, as the catalogue gives it (unreflected).
    pub init: u64,
    /// Value XORed into the register to produce the digest.
    pub xorout: u64,
    /// `refin` (and `refout`).
    pub reflected: bool,
}

fn reflect(v: u64, width: u8) -> u64 {
    v.reverse_bits() >> (64 - u32::from(width))
}

/// CRC-32/ISO-HDLC (zlib).
pub(crate) const CRC32_SPEC: CrcSpec = CrcSpec {
    width: 32,
    poly: 0x04c1_1db7,
    init: 0xffff_ffff,
    xorout: 0xffff_ffff,
    reflected: true,
};

/// CRC-32/CKSUM, the CRC part of POSIX `cksum`.
pub(crate) const CKSUM_SPEC: CrcSpec = CrcSpec {
    width: 32,
    poly: 0x04c1_1db7,
    init: 0,
    xorout: 0xffff_ffff,
    reflected: false,
};

impl CrcSpec {
    fn mask(&self) -> u64 {
        if self.width == 64 {
            u64::MAX
        } else {
            (1u64 << self.width) - 1
        }
    }

    /// The polynomial in reflected form (x^0 at the top bit).
    fn rpoly(&self) -> u64 {
        reflect(self.poly & self.mask(), self.width)
    }

    /// `a * b mod P`, both in reflected form (zlib's `multmodp`, any width).
    fn mulmod(&self, a: u64, mut b: u64) -> u64 {
        if a == 0 {
            return 0;
        }
        let rp = self.rpoly();
        let mut m = 1u64 << (self.width - 1);
        let mut p = 0;
        loop {
            if a & m != 0 {
                p ^= b;
                if a & (m - 1) == 0 {
                    break;
                }
            }
            m >>= 1;
            b = if b & 1 != 0 { (b >> 1) ^ rp } else { b >> 1 };
        }
        p
    }

    /// `x^(8n) mod P` in reflected form, by square-and-multiply.
    fn x8n(&self, mut n: u64) -> u64 {
        let rp = self.rpoly();
        // x^0 is the top bit in reflected form; x^8 is eight multiplications by x.
        let mut base = 1u64 << (self.width - 1);
        for _ in 0..8 {
            base = if base & 1 != 0 {
                (base >> 1) ^ rp
            } else {
                base >> 1
            };
        }
        let mut result = 1u64 << (self.width - 1);
        while n != 0 {
            if n & 1 != 0 {
                result = self.mulmod(result, base);
            }
            base = self.mulmod(base, base);
            n >>= 1;
        }
        result
    }

    /// The register `r` advanced over `n` zero bytes.
    pub(crate) fn advance(&self, r: u64, n: u64) -> u64 {
        if self.reflected {
            self.mulmod(self.x8n(n), r)
        } else {
            let r = reflect(r, self.width);
            reflect(self.mulmod(self.x8n(n), r), self.width)
        }
    }

    /// The digest of `A‖B` from the digests of `A` and `B` and `|B|`.
    pub(crate) fn combine(&self, d_a: u64, d_b: u64, len_b: u64) -> u64 {
        if len_b == 0 {
            return d_a;
        }
        self.advance(d_a ^ self.xorout ^ self.init_register(), len_b) ^ d_b
    }

    /// The initial register in the domain the digest lives in: reflected
    /// CRCs shift right, so their register holds `init` bit-reversed
    /// (matters for asymmetric inits like CRC-16/RIELLO's 0xb2aa).
    fn init_register(&self) -> u64 {
        if self.reflected {
            reflect(self.init & self.mask(), self.width)
        } else {
            self.init & self.mask()
        }
    }

    /// The digest of the empty message.
    pub(crate) fn empty(&self) -> u64 {
        self.init_register() ^ self.xorout
    }
}

/// A CRC kernel: the fast loop of one CRC, from a fixed start.
pub(crate) trait CrcKernel: Clone + Send + Sync + 'static {
    /// Feeds bytes.
    fn update(&mut self, data: &[u8]);
    /// The digest (final XOR applied) of everything fed since the start.
    fn value(&self) -> u64;
}

/// CRC-32/ISO-HDLC through `crc32fast`.
impl CrcKernel for crc32fast::Hasher {
    fn update(&mut self, data: &[u8]) {
        crc32fast::Hasher::update(self, data);
    }
    fn value(&self) -> u64 {
        u64::from(self.clone().finalize())
    }
}

/// Any catalog CRC through `crc-fast` (PCLMULQDQ/VPCLMULQDQ folding).
impl CrcKernel for crc_fast::Digest {
    fn update(&mut self, data: &[u8]) {
        crc_fast::Digest::update(self, data);
    }
    fn value(&self) -> u64 {
        self.finalize()
    }
}

/// Any CRC as an [`Algorithm`]: kernel `K` plus the generic combine.
///
/// `prefix` is the digest of everything before the kernel's current run, so
/// a combined state can keep taking input with a fresh kernel.
#[derive(Clone)]
pub(crate) struct Crc<K> {
    name: &'static str,
    spec: CrcSpec,
    kernel: K,
    fresh: K,
    kernel_len: u64,
    prefix: u64,
    prefix_len: u64,
}

impl<K: CrcKernel> Crc<K> {
    pub(crate) fn new(name: &'static str, spec: CrcSpec, kernel: K) -> Self {
        Crc {
            name,
            spec,
            fresh: kernel.clone(),
            kernel,
            kernel_len: 0,
            prefix: spec.empty(),
            prefix_len: 0,
        }
    }

    /// The digest as a number.
    pub(crate) fn value(&self) -> u64 {
        if self.prefix_len == 0 {
            self.kernel.value()
        } else {
            self.spec
                .combine(self.prefix, self.kernel.value(), self.kernel_len)
        }
    }

    pub(crate) fn spec(&self) -> &CrcSpec {
        &self.spec
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        self.kernel.update(data);
        self.kernel_len += data.len() as u64;
    }

    pub(crate) fn total_len(&self) -> u64 {
        self.prefix_len + self.kernel_len
    }

    pub(crate) fn reset(&mut self) {
        self.kernel = self.fresh.clone();
        self.kernel_len = 0;
        self.prefix = self.spec.empty();
        self.prefix_len = 0;
    }

    /// Appends the state of the chunk that follows.
    pub(crate) fn append(&mut self, next: &Self) {
        let left = self.value();
        self.prefix = self.spec.combine(left, next.value(), next.total_len());
        self.prefix_len = self.total_len() + next.total_len();
        self.kernel = self.fresh.clone();
        self.kernel_len = 0;
    }
}

impl<K: CrcKernel> Algorithm for Crc<K> {
    fn name(&self) -> &str {
        self.name
    }
    fn update(&mut self, data: &[u8]) {
        Crc::update(self, data);
    }
    fn finish(&self) -> Digest {
        Digest::from_value(self.value(), usize::from(self.spec.width.div_ceil(8)))
    }
    fn reset(&mut self) {
        Crc::reset(self);
    }
    fn can_combine(&self) -> bool {
        true
    }
    fn combine(&mut self, next: &dyn Algorithm) -> Result<(), Error> {
        let next = downcast_same::<Self>(self, next)?;
        if next.spec != self.spec {
            return Err(Error::CombineMismatch {
                left: self.name().to_owned(),
                right: next.name().to_owned(),
            });
        }
        self.append(next);
        Ok(())
    }
    fn len(&self) -> u64 {
        self.total_len()
    }
    plain_state_methods!();
}

/// `next` as `T`, or the mismatch error naming both algorithms.
pub(crate) fn downcast_same<'a, T: 'static>(
    this: &dyn Algorithm,
    next: &'a dyn Algorithm,
) -> Result<&'a T, Error> {
    next.as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| Error::CombineMismatch {
            left: this.name().to_owned(),
            right: next.name().to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitwise(spec: &CrcSpec, data: &[u8]) -> u64 {
        // Textbook MSB-first CRC on the normal form, reflecting bytes when needed.
        let top = 1u64 << (spec.width - 1);
        let mask = spec.mask();
        let mut r = spec.init & mask;
        for &byte in data {
            let b = if spec.reflected {
                byte.reverse_bits()
            } else {
                byte
            };
            for i in (0..8).rev() {
                let bit = u64::from((b >> i) & 1);
                let fb = ((r & top) != 0) as u64 ^ bit;
                r = (r << 1) & mask;
                if fb != 0 {
                    r ^= spec.poly & mask;
                }
            }
        }
        if spec.reflected {
            r = reflect(r, spec.width);
        }
        r ^ spec.xorout
    }

    const SPECS: [CrcSpec; 4] = [
        // CRC-16/RIELLO: reflected with an asymmetric init.
        CrcSpec {
            width: 16,
            poly: 0x1021,
            init: 0xb2aa,
            xorout: 0,
            reflected: true,
        },
        CRC32_SPEC,
        // CRC-16/IBM-3740: not reflected.
        CrcSpec {
            width: 16,
            poly: 0x1021,
            init: 0xffff,
            xorout: 0,
            reflected: false,
        },
        CKSUM_SPEC,
    ];

    #[test]
    fn bitwise_reference_matches_catalog_check() {
        assert_eq!(bitwise(&SPECS[0], b"123456789"), 0x63d0);
        assert_eq!(bitwise(&SPECS[1], b"123456789"), 0xcbf4_3926);
        assert_eq!(bitwise(&SPECS[2], b"123456789"), 0x29b1);
        assert_eq!(bitwise(&SPECS[3], b"123456789"), 0x765e_7680);
    }

    #[test]
    fn combine_matches_direct_on_every_split() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for spec in &SPECS {
            let whole = bitwise(spec, &data);
            for split in [0, 1, 2, 7, 8, 9, 100, 299, 300] {
                let (a, b) = data.split_at(split);
                let c = spec.combine(bitwise(spec, a), bitwise(spec, b), b.len() as u64);
                assert_eq!(c, whole, "{spec:?} split {split}");
            }
        }
    }
}
