//! An algorithm defined outside the crate plugs into a `Registry` and is used
//! by `hash_file` like a built-in one, including the parallel chunked path.

use std::any::Any;

use fleetsync_engine::{hash_file, Algorithm, Digest, Error, HashOptions, IoMode, Registry};

/// FNV-1a 64-bit: not combinable.
#[derive(Clone)]
struct Fnv1a64 {
    h: u64,
    len: u64,
}

impl Default for Fnv1a64 {
    fn default() -> Self {
        Fnv1a64 {
            h: 0xcbf2_9ce4_8422_2325,
            len: 0,
        }
    }
}

impl Algorithm for Fnv1a64 {
    fn name(&self) -> &str {
        "fnv1a64"
    }
    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.h = (self.h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.len += data.len() as u64;
    }
    fn finish(&self) -> Digest {
        Digest::from_value(self.h, 8)
    }
    fn reset(&mut self) {
        *self = Self::default();
    }
    fn box_clone(&self) -> Box<dyn Algorithm> {
        Box::new(self.clone())
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Sum of all bytes modulo 2^64: trivially combinable.
#[derive(Clone, Default)]
struct ByteSum {
    sum: u64,
    len: u64,
}

impl Algorithm for ByteSum {
    fn name(&self) -> &str {
        "bytesum"
    }
    fn update(&mut self, data: &[u8]) {
        self.sum = data
            .iter()
            .fold(self.sum, |s, &b| s.wrapping_add(u64::from(b)));
        self.len += data.len() as u64;
    }
    fn finish(&self) -> Digest {
        Digest::from_value(self.sum, 8)
    }
    fn reset(&mut self) {
        *self = Self::default();
    }
    fn box_clone(&self) -> Box<dyn Algorithm> {
        Box::new(self.clone())
    }
    fn can_combine(&self) -> bool {
        true
    }
    fn combine(&mut self, next: &dyn Algorithm) -> Result<(), Error> {
        let next = next
            .as_any()
            .downcast_ref::<Self>()
            .ok_or_else(|| Error::CombineMismatch {
                left: "bytesum".into(),
                right: next.name().into(),
            })?;
        self.sum = self.sum.wrapping_add(next.sum);
        self.len += next.len;
        Ok(())
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[test]
fn a_third_party_algorithm_is_registered_and_used_by_hash_file() {
    let mut registry = Registry::with_builtins();
    registry.register("fnv1a64", "FNV-1a 64-bit", || Box::new(Fnv1a64::default()));
    registry.register("bytesum", "byte sum mod 2^64", || {
        Box::new(ByteSum::default())
    });
    assert!(registry.iter().any(|i| i.name == "fnv1a64"));
    assert!(registry.info("bytesum").unwrap().combinable);
    assert!(!registry.info("fnv1a64").unwrap().combinable);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    std::fs::write(&path, b"a").unwrap();
    let algs = [registry.info("fnv1a64").unwrap()];
    let h = hash_file(&path, &algs, &HashOptions::default()).unwrap();
    // Published FNV-1a 64 test vector: "a" -> af63dc4c8601ec8c.
    assert_eq!(h.digests[0].to_hex(), "af63dc4c8601ec8c");

    // The combinable one goes through the parallel chunked path.
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let want: u64 = data.iter().map(|&b| u64::from(b)).sum();
    std::fs::write(&path, &data).unwrap();
    let algs = [
        registry.info("bytesum").unwrap(),
        registry.info("crc32").unwrap(),
    ];
    let opts = HashOptions {
        io: IoMode::Pread,
        chunk_size: 4096,
        parallel_threshold: 8192,
    };
    let h = hash_file(&path, &algs, &opts).unwrap();
    assert_eq!(h.digests[0].value(), Some(want));
    assert_eq!(
        h.digests[1].value(),
        Some(u64::from(crc32fast_reference(&data)))
    );
}

/// Bitwise CRC-32 (zlib), written from the definition, as an independent check.
fn crc32fast_reference(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}
