//! The object-safe [`Algorithm`] trait and the [`Digest`] it produces.

use std::any::Any;
use std::fmt;

use crate::Error;

/// The [`Algorithm`] methods that are the same for every `Clone + 'static`
/// state (`box_clone`, `as_any`; with `len`, also `len` read from a `len`
/// field), written once for the `impl Algorithm` blocks of the built-ins.
macro_rules! plain_state_methods {
    () => {
        fn box_clone(&self) -> Box<dyn $crate::Algorithm> {
            Box::new(self.clone())
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    };
    (len) => {
        fn len(&self) -> u64 {
            self.len
        }
        plain_state_methods!();
    };
}

/// One running checksum computation, chosen at run time by name.
///
/// Implementations keep their hot loop monomorphic inside [`Algorithm::update`];
/// callers hold a `Box<dyn Algorithm>` from a [`crate::Registry`].
pub trait Algorithm: Send + Sync {
    /// The registry name of this algorithm, e.g. `"crc32"` or `"crc16/xmodem"`.
    fn name(&self) -> &str;

    /// Feeds the next bytes of the input.
    fn update(&mut self, data: &[u8]);

    /// Returns the digest of everything fed so far, without consuming the state.
    fn finish(&self) -> Digest;

    /// Forgets everything fed so far.
    fn reset(&mut self);

    /// A fresh copy of this state (same algorithm, same bytes fed).
    fn box_clone(&self) -> Box<dyn Algorithm>;

    /// Whether [`Algorithm::combine`] is supported.
    fn can_combine(&self) -> bool {
        false
    }

    /// Appends `next`, the state of the chunk that immediately follows this
    /// one, so that `self` becomes the state of both chunks concatenated.
    ///
    /// `next` must have been started fresh (from [`crate::Registry::get`] or
    /// [`Algorithm::reset`]) and be of the same algorithm.
    fn combine(&mut self, next: &dyn Algorithm) -> Result<(), Error> {
        let _ = next;
        Err(Error::CombineUnsupported {
            algorithm: self.name().to_owned(),
        })
    }

    /// Number of input bytes fed so far.
    fn len(&self) -> u64;

    /// Whether no input has been fed.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Downcasting support for [`Algorithm::combine`] implementations.
    fn as_any(&self) -> &dyn Any;
}

impl Clone for Box<dyn Algorithm> {
    fn clone(&self) -> Self {
        self.box_clone()
    }
}

/// The result of a checksum: its bytes (big-endian for numeric checksums),
/// and, for checksums that tools print in decimal, the number itself.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Digest {
    bytes: Vec<u8>,
    value: Option<u64>,
}

impl Digest {
    /// A digest made of raw bytes (cryptographic hashes, XXH3).
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Self {
        Digest {
            bytes: bytes.into(),
            value: None,
        }
    }

    /// A numeric checksum of `width_bytes` bytes (CRCs, Adler-32, sums),
    /// stored big-endian so that [`Digest::to_hex`] prints it as the
    /// conventional number.
    pub fn from_value(value: u64, width_bytes: usize) -> Self {
        assert!((1..=8).contains(&width_bytes), "numeric width 1..=8 bytes");
        let bytes = value.to_be_bytes()[8 - width_bytes..].to_vec();
        Digest {
            bytes,
            value: Some(value),
        }
    }

    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The numeric value, for numeric checksums.
    pub fn value(&self) -> Option<u64> {
        self.value
    }

    /// Lowercase hexadecimal, as `md5sum` and friends print it.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(self.bytes.len() * 2);
        for b in &self.bytes {
            use fmt::Write;
            let _ = write!(s, "{b:02x}");
        }
        s
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}
