//! The built-in algorithms and their registration.

use crate::crc::{downcast_same, Crc, CrcKernel, CrcSpec, CKSUM_SPEC, CRC32_SPEC};
use crate::sums::{Adler32, Bsd, Sysv};
use crate::{Algorithm, AlgorithmInfo, Digest, Error, Registry};

// Kernel choices, measured on the 2-core AVX2 + VPCLMULQDQ (no AVX-512)
// machine over a 1 MiB buffer, release build
// (`cargo run --release -p fleetsync-engine --example kernel_choice`):
//   crc32:  crc32fast 9.5 GB/s, crc-fast 6.9 GB/s (100 B inputs: 5.5 vs 3.5)
//   crc32c: crc-fast 10.2 GB/s, crc Table<16> 2.1 GB/s
//   cksum:  crc-fast 7.5 GB/s,  crc Table<16> 2.1 GB/s
//   crc16:  crc-fast 8.3-8.4 GB/s, crc Table<16> 2.2-3.1 GB/s (100 B: 3.4 vs 1.7)
/// CRC-32/ISO-HDLC kernel.
type Crc32Kernel = crc32fast::Hasher;
/// CRC-32/ISCSI, CRC-32/CKSUM and CRC-16 kernel.
type FastKernel = crc_fast::Digest;

/// Registers every built-in algorithm.
pub(crate) fn register_all(r: &mut Registry) {
    r.register("crc32", "CRC-32 (zlib, IEEE 802.3), the default", || {
        Box::new(crc32())
    });
    r.register("crc32c", "CRC-32C (Castagnoli, iSCSI)", || {
        Box::new(crc32c())
    });
    r.register(
        "cksum",
        "POSIX cksum: CRC-32/CKSUM over the data and its length",
        || Box::new(Cksum::new()),
    );
    r.register(
        "adler32",
        "Adler-32 (zlib)",
        || Box::new(Adler32::default()),
    );
    r.register("bsd", "BSD sum (sum -r), 16-bit rotating checksum", || {
        Box::new(Bsd::default())
    });
    r.register(
        "sysv",
        "System V sum (sum -s), byte sum folded to 16 bits",
        || Box::new(Sysv::default()),
    );
    r.register("crc16", "CRC-16/ARC (same as crc16/arc)", || {
        Box::new(crc16(&CRC16_CATALOG[0], "crc16"))
    });
    for entry in CRC16_CATALOG {
        let info = crc16_info(entry);
        r.register(&info.name, &info.description, move || {
            Box::new(crc16(entry, entry.name))
        });
    }
    r.register("md2", "MD2 (RFC 1319), legacy", || {
        Box::new(RustCrypto::<md2::Md2>::new("md2"))
    });
    r.register("md5", "MD5 (RFC 1321), like md5sum", || {
        Box::new(crate::md5_block::Md5::default())
    });
    r.register("sha1", "SHA-1 (FIPS 180-4), like sha1sum", || {
        Box::new(RustCrypto::<sha1::Sha1>::new("sha1"))
    });
    r.register("sha224", "SHA-224 (FIPS 180-4), like sha224sum", || {
        Box::new(RustCrypto::<sha2::Sha224>::new("sha224"))
    });
    r.register("sha256", "SHA-256 (FIPS 180-4), like sha256sum", || {
        Box::new(RustCrypto::<sha2::Sha256>::new("sha256"))
    });
    r.register("sha384", "SHA-384 (FIPS 180-4), like sha384sum", || {
        Box::new(RustCrypto::<sha2::Sha384>::new("sha384"))
    });
    r.register("sha512", "SHA-512 (FIPS 180-4), like sha512sum", || {
        Box::new(RustCrypto::<sha2::Sha512>::new("sha512"))
    });
    r.register("blake3", "BLAKE3 (256-bit), like b3sum", || {
        Box::new(Blake3::default())
    });
    r.register(
        "xxh3",
        "XXH3 64-bit (non-cryptographic), like xxh3sum",
        || Box::new(Xxh3::new(false)),
    );
    r.register(
        "xxh128",
        "XXH3 128-bit (non-cryptographic), like xxh128sum",
        || Box::new(Xxh3::new(true)),
    );
}

/// Algorithms named by pattern rather than listed one by one: `crc16/<catalog
/// name>` in any case, with `_` accepted for `-` and `crc-16/` for `crc16/`.
pub(crate) fn lookup_dynamic(name: &str) -> Option<AlgorithmInfo> {
    let lower = name.to_ascii_lowercase().replace('_', "-");
    let rest = lower
        .strip_prefix("crc16/")
        .or_else(|| lower.strip_prefix("crc-16/"))?;
    let entry = CRC16_CATALOG
        .iter()
        .find(|e| e.name.strip_prefix("crc16/") == Some(rest))?;
    let info = crc16_info(entry);
    Some(AlgorithmInfo::new(
        &info.name,
        &info.description,
        move || Box::new(crc16(entry, entry.name)),
    ))
}

struct NameDesc {
    name: String,
    description: String,
}

fn crc16_info(e: &'static Crc16Entry) -> NameDesc {
    let p = e.params;
    NameDesc {
        name: e.name.to_owned(),
        description: format!(
            "CRC-16/{} (poly {:#06x}, init {:#06x}, {}, xorout {:#06x})",
            e.name["crc16/".len()..].to_ascii_uppercase(),
            p.poly,
            p.init,
            if p.refin {
                "reflected"
            } else {
                "not reflected"
            },
            p.xorout
        ),
    }
}

/// The CRC-32/ISO-HDLC (zlib) state.
fn crc32() -> Crc<Crc32Kernel> {
    Crc::new("crc32", CRC32_SPEC, crc32fast::Hasher::new())
}

/// The CRC-32/ISCSI (Castagnoli) state.
fn crc32c() -> Crc<FastKernel> {
    Crc::new(
        "crc32c",
        CrcSpec {
            width: 32,
            poly: 0x1edc_6f41,
            init: 0xffff_ffff,
            xorout: 0xffff_ffff,
            reflected: true,
        },
        crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi),
    )
}

fn crc16(entry: &'static Crc16Entry, name: &'static str) -> Crc<FastKernel> {
    let p = entry.params;
    Crc::new(
        name,
        CrcSpec {
            width: p.width,
            poly: u64::from(p.poly),
            init: u64::from(p.init),
            xorout: u64::from(p.xorout),
            reflected: p.refin,
        },
        crc_fast::Digest::new(entry.fast),
    )
}

/// One CRC-16 of the reveng catalogue: registry name, its parameters, and
/// the matching `crc-fast` kernel.
pub(crate) struct Crc16Entry {
    /// Registry name, `crc16/<lowercase catalog name>`.
    pub(crate) name: &'static str,
    /// Rocksoft parameters and check value.
    pub(crate) params: &'static crc::Algorithm<u16>,
    fast: crc_fast::CrcAlgorithm,
}

macro_rules! crc16_catalog {
    ($( $name:literal => $param:ident, $fast:ident; )*) => {
        /// Every CRC-16 of the catalogue, CRC-16/ARC first.
        pub(crate) static CRC16_CATALOG: &[Crc16Entry] = &[
            $( Crc16Entry {
                name: concat!("crc16/", $name),
                params: &crc::$param,
                fast: crc_fast::CrcAlgorithm::$fast,
            }, )*
        ];
    };
}

crc16_catalog! {
    "arc" => CRC_16_ARC, Crc16Arc;
    "cdma2000" => CRC_16_CDMA2000, Crc16Cdma2000;
    "cms" => CRC_16_CMS, Crc16Cms;
    "dds-110" => CRC_16_DDS_110, Crc16Dds110;
    "dect-r" => CRC_16_DECT_R, Crc16DectR;
    "dect-x" => CRC_16_DECT_X, Crc16DectX;
    "dnp" => CRC_16_DNP, Crc16Dnp;
    "en-13757" => CRC_16_EN_13757, Crc16En13757;
    "genibus" => CRC_16_GENIBUS, Crc16Genibus;
    "gsm" => CRC_16_GSM, Crc16Gsm;
    "ibm-3740" => CRC_16_IBM_3740, Crc16Ibm3740;
    "ibm-sdlc" => CRC_16_IBM_SDLC, Crc16IbmSdlc;
    "iso-iec-14443-3-a" => CRC_16_ISO_IEC_14443_3_A, Crc16IsoIec144433A;
    "kermit" => CRC_16_KERMIT, Crc16Kermit;
    "lj1200" => CRC_16_LJ1200, Crc16Lj1200;
    "m17" => CRC_16_M17, Crc16M17;
    "maxim-dow" => CRC_16_MAXIM_DOW, Crc16MaximDow;
    "mcrf4xx" => CRC_16_MCRF4XX, Crc16Mcrf4xx;
    "modbus" => CRC_16_MODBUS, Crc16Modbus;
    "nrsc-5" => CRC_16_NRSC_5, Crc16Nrsc5;
    "opensafety-a" => CRC_16_OPENSAFETY_A, Crc16OpensafetyA;
    "opensafety-b" => CRC_16_OPENSAFETY_B, Crc16OpensafetyB;
    "profibus" => CRC_16_PROFIBUS, Crc16Profibus;
    "riello" => CRC_16_RIELLO, Crc16Riello;
    "spi-fujitsu" => CRC_16_SPI_FUJITSU, Crc16SpiFujitsu;
    "t10-dif" => CRC_16_T10_DIF, Crc16T10Dif;
    "teledisk" => CRC_16_TELEDISK, Crc16Teledisk;
    "tms37157" => CRC_16_TMS37157, Crc16Tms37157;
    "umts" => CRC_16_UMTS, Crc16Umts;
    "usb" => CRC_16_USB, Crc16Usb;
    "xmodem" => CRC_16_XMODEM, Crc16Xmodem;
}

/// POSIX `cksum`: CRC-32/CKSUM over the data, then over the length in as
/// few bytes as it takes, least significant first (as coreutils does).
///
/// The state is the pre-length CRC plus the byte count, so chunk states
/// combine with the generic CRC combine; the length goes in at `finish`.
#[derive(Clone)]
struct Cksum {
    crc: Crc<FastKernel>,
}

impl Cksum {
    fn new() -> Self {
        Cksum {
            crc: Crc::new(
                "cksum",
                CKSUM_SPEC,
                crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Cksum),
            ),
        }
    }
}

impl Algorithm for Cksum {
    fn name(&self) -> &str {
        "cksum"
    }
    fn update(&mut self, data: &[u8]) {
        self.crc.update(data);
    }
    fn finish(&self) -> Digest {
        let mut n = self.crc.total_len();
        let mut len_bytes = Vec::with_capacity(8);
        while n != 0 {
            len_bytes.push(n as u8);
            n >>= 8;
        }
        let mut tail = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Cksum);
        CrcKernel::update(&mut tail, &len_bytes);
        let v = self
            .crc
            .spec()
            .combine(self.crc.value(), tail.value(), len_bytes.len() as u64);
        Digest::from_value(v, 4)
    }
    fn reset(&mut self) {
        self.crc.reset();
    }
    fn can_combine(&self) -> bool {
        true
    }
    fn combine(&mut self, next: &dyn Algorithm) -> Result<(), Error> {
        let next = downcast_same::<Self>(self, next)?;
        self.crc.append(&next.crc);
        Ok(())
    }
    fn len(&self) -> u64 {
        self.crc.total_len()
    }
    plain_state_methods!();
}

/// Any RustCrypto hash (`digest::Digest`) as an [`Algorithm`].
#[derive(Clone)]
struct RustCrypto<D> {
    name: &'static str,
    hasher: D,
    len: u64,
}

impl<D: digest::Digest> RustCrypto<D> {
    fn new(name: &'static str) -> Self {
        RustCrypto {
            name,
            hasher: D::new(),
            len: 0,
        }
    }
}

impl<D> Algorithm for RustCrypto<D>
where
    D: digest::Digest + Clone + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        self.name
    }
    fn update(&mut self, data: &[u8]) {
        digest::Digest::update(&mut self.hasher, data);
        self.len += data.len() as u64;
    }
    fn finish(&self) -> Digest {
        Digest::from_bytes(self.hasher.clone().finalize().to_vec())
    }
    fn reset(&mut self) {
        self.hasher = D::new();
        self.len = 0;
    }
    plain_state_methods!(len);
}

/// Inputs at least this long go through `blake3::Hasher::update_rayon`
/// (the BLAKE3 docs' rule of thumb: below ~128 KiB threads cost more than
/// they save).
const BLAKE3_RAYON_MIN: usize = 128 * 1024;

/// BLAKE3, hashed across the current rayon pool for big buffers.
///
/// Not combinable through the generic [`Algorithm::combine`] contract (any
/// split point, fresh states): BLAKE3 can only merge subtrees whose sizes
/// and offsets follow its tree, and a subtree must know its offset before it
/// sees input. Inside the engine, the parallel file path makes chunk states
/// with [`Blake3::at_offset`] over power-of-two chunk sizes (8 MiB by
/// default) and `combine` accepts exactly those: each chunk becomes one
/// subtree chaining value (`blake3::hazmat`), and `finish` merges them the
/// way the BLAKE3 tree does. Anything else is refused.
#[derive(Clone, Default)]
pub(crate) struct Blake3 {
    hasher: blake3::Hasher,
    len: u64,
    /// Where this state's input starts, when made for the chunk path.
    offset: Option<u64>,
    /// Finished chunks before `hasher`'s: (length, chaining value), all of
    /// the same power-of-two length, starting at offset 0.
    done: Vec<(u64, blake3::hazmat::ChainingValue)>,
}

impl Blake3 {
    /// A state for the chunk of a file that starts at `offset`.
    pub(crate) fn at_offset(offset: u64) -> Self {
        use blake3::hazmat::HasherExt;
        let mut hasher = blake3::Hasher::new();
        hasher.set_input_offset(offset);
        Blake3 {
            hasher,
            len: 0,
            offset: Some(offset),
            done: Vec::new(),
        }
    }

    /// Whether `chunk` bytes per chunk keep every chunk a whole BLAKE3 subtree.
    pub(crate) fn chunk_size_ok(chunk: u64) -> bool {
        chunk >= blake3::CHUNK_LEN as u64 && chunk.is_power_of_two()
    }

    fn refuse(&self) -> Error {
        Error::CombineUnsupported {
            algorithm: "blake3 (only whole power-of-two chunks made by the engine)".to_owned(),
        }
    }

    /// Merges `cvs` (equal power-of-two subtrees, the last possibly shorter)
    /// into the tree BLAKE3 builds over them: the left part is the largest
    /// power-of-two number of pieces smaller than the whole.
    fn merge(cvs: &[blake3::hazmat::ChainingValue]) -> blake3::hazmat::ChainingValue {
        use blake3::hazmat::{merge_subtrees_non_root, Mode};
        if cvs.len() == 1 {
            return cvs[0];
        }
        let left = left_pieces(cvs.len());
        merge_subtrees_non_root(
            &Self::merge(&cvs[..left]),
            &Self::merge(&cvs[left..]),
            Mode::Hash,
        )
    }
}

/// The largest power of two strictly smaller than `n` (n >= 2).
fn left_pieces(n: usize) -> usize {
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

impl Algorithm for Blake3 {
    fn name(&self) -> &str {
        "blake3"
    }
    fn update(&mut self, data: &[u8]) {
        // Chunk states (`offset` set) already run one per thread.
        if data.len() >= BLAKE3_RAYON_MIN && self.offset.is_none() {
            self.hasher.update_rayon(data);
        } else {
            self.hasher.update(data);
        }
        self.len += data.len() as u64;
    }
    fn finish(&self) -> Digest {
        use blake3::hazmat::{merge_subtrees_root, HasherExt, Mode};
        if self.done.is_empty() {
            return Digest::from_bytes(self.hasher.finalize().as_bytes().to_vec());
        }
        // `combine` freezes a piece only when a non-empty one follows, so
        // the live hasher always holds the last piece here.
        let mut cvs: Vec<_> = self.done.iter().map(|(_, cv)| *cv).collect();
        cvs.push(self.hasher.finalize_non_root());
        let left = left_pieces(cvs.len());
        let hash = merge_subtrees_root(
            &Self::merge(&cvs[..left]),
            &Self::merge(&cvs[left..]),
            Mode::Hash,
        );
        Digest::from_bytes(hash.as_bytes().to_vec())
    }
    fn reset(&mut self) {
        *self = match self.offset {
            Some(o) => Self::at_offset(o),
            None => Self::default(),
        };
    }
    fn combine(&mut self, next: &dyn Algorithm) -> Result<(), Error> {
        use blake3::hazmat::HasherExt;
        let next = downcast_same::<Self>(self, next)?;
        let live = self.len - self.done_len();
        let aligned = self.offset == Some(0)
            && next.done.is_empty()
            && next.offset == Some(self.len)
            && Self::chunk_size_ok(live)
            && self.done.iter().all(|(l, _)| *l == live)
            && next.len <= live;
        if !aligned {
            return Err(self.refuse());
        }
        if next.len == 0 {
            return Ok(());
        }
        // The live piece is whole and something follows: freeze it.
        self.done.push((live, self.hasher.finalize_non_root()));
        self.hasher = next.hasher.clone();
        self.len += next.len;
        Ok(())
    }
    plain_state_methods!(len);
}

impl Blake3 {
    fn done_len(&self) -> u64 {
        self.done.iter().map(|(l, _)| l).sum()
    }
}

/// XXH3, 64- or 128-bit; digests in the canonical (big-endian) byte order
/// that `xxhsum` prints.
#[derive(Clone)]
struct Xxh3 {
    wide: bool,
    hasher: xxhash_rust::xxh3::Xxh3Default,
    len: u64,
}

impl Xxh3 {
    fn new(wide: bool) -> Self {
        Xxh3 {
            wide,
            hasher: xxhash_rust::xxh3::Xxh3Default::new(),
            len: 0,
        }
    }
}

impl Algorithm for Xxh3 {
    fn name(&self) -> &str {
        if self.wide {
            "xxh128"
        } else {
            "xxh3"
        }
    }
    fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len() as u64;
    }
    fn finish(&self) -> Digest {
        if self.wide {
            Digest::from_bytes(self.hasher.digest128().to_be_bytes().to_vec())
        } else {
            Digest::from_bytes(self.hasher.digest().to_be_bytes().to_vec())
        }
    }
    fn reset(&mut self) {
        *self = Self::new(self.wide);
    }
    plain_state_methods!(len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_crc16_of_the_catalog_gives_its_check_value() {
        for e in CRC16_CATALOG {
            assert_eq!(e.params.refin, e.params.refout, "{}", e.name);
            let mut c = crc16(e, e.name);
            Crc::update(&mut c, b"123456789");
            assert_eq!(c.value(), u64::from(e.params.check), "{}", e.name);
        }
    }

    #[test]
    fn crc16_names_resolve_in_any_spelling() {
        for name in ["crc16/xmodem", "CRC-16/XMODEM", "crc16/IBM_3740"] {
            assert!(lookup_dynamic(name).is_some(), "{name}");
        }
        assert!(lookup_dynamic("crc16/nope").is_none());
    }
}
