//! The built-in algorithms and their registration.

use std::any::Any;

use crate::{Algorithm, AlgorithmInfo, Digest, Error, Registry};

/// Registers every built-in algorithm.
pub(crate) fn register_all(r: &mut Registry) {
    r.register("crc32", "CRC-32 (zlib, IEEE 802.3), the default", || {
        Box::new(Crc32::default())
    });
}

/// Algorithms named by pattern rather than listed one by one (e.g. `crc16/<catalog name>`).
pub(crate) fn lookup_dynamic(name: &str) -> Option<AlgorithmInfo> {
    let _ = name;
    None
}

/// CRC-32/ISO-HDLC via `crc32fast` (PCLMULQDQ on x86_64).
#[derive(Clone, Default)]
struct Crc32 {
    hasher: crc32fast::Hasher,
    len: u64,
}

impl Algorithm for Crc32 {
    fn name(&self) -> &str {
        "crc32"
    }
    fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len() as u64;
    }
    fn finish(&self) -> Digest {
        Digest::from_value(u64::from(self.hasher.clone().finalize()), 4)
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
                left: self.name().to_owned(),
                right: next.name().to_owned(),
            })?;
        self.hasher.combine(&next.hasher);
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
