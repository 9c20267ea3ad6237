//! rsync-style deltas, for when only the remote holds the old version (the *basis*): the
//! remote sends the block signature of its copy ([`signature`]), the sender answers with
//! copy/literal instructions against it ([`delta_encode`]), and the remote rebuilds the file
//! as the instructions stream in, reading the basis by offset ([`DeltaApplier`]).
//!
//! Signatures and deltas are in librsync's format (MD4 signature magic `rs\x01\x36`, delta
//! magic `rs\x02\x36`), made by the `fast_rsync` crate. Its own `apply` needs the basis and the
//! whole delta in memory; files go up to several GiB, so the applier here is ours: a state
//! machine over the delta bytes, with the basis read from its file. Literals are left raw:
//! the chunk coder compresses the stream they travel in.
//!
//! The strong hash is a truncated MD4 (what librsync and `fast_rsync` use): a collision can
//! only make a wrong file, which the receiver's digest check rejects like any corruption.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use fast_rsync::{Signature, SignatureOptions};

/// Smallest block of a signature...
const MIN_BLOCK: u32 = 512;
/// ...and largest (as rsync's `MAX_BLOCK_SIZE`, 128 KiB).
const MAX_BLOCK: u32 = 128 << 10;
/// Bytes of MD4 kept per block: with the 32-bit rolling checksum, 96 bits to tell blocks apart.
const STRONG_BYTES: u32 = 8;
/// Signature header: magic, block size, strong hash size.
const SIGNATURE_HEADER: usize = 12;
/// librsync's magic of an MD4 signature.
const SIGNATURE_MAGIC: u32 = 0x7273_0136;
/// librsync's magic of a delta.
const DELTA_MAGIC: u32 = 0x7273_0236;
/// Largest piece of delta or output handed out at once.
const PIECE: usize = 1 << 20;

/// The block size for a basis of `size` bytes: about its square root (so that signature and
/// delta overhead grow alike), a multiple of 64, within 512 B..=128 KiB.
fn block_size(size: u64) -> u32 {
    let root = (size as f64).sqrt() as u64;
    let rounded = root.div_ceil(64) * 64;
    rounded.clamp(MIN_BLOCK as u64, MAX_BLOCK as u64) as u32
}

/// The signature of a basis of `size` bytes read from `basis` (read once, in pieces, never
/// whole in memory): 12 bytes of header and 12 per block, e.g. 0.5 MB for 2 GiB. An error if
/// reading fails or `basis` ends before `size` bytes.
pub(crate) fn signature(basis: &mut dyn Read, size: u64) -> io::Result<Vec<u8>> {
    let block = block_size(size);
    let options = SignatureOptions {
        block_size: block,
        crypto_hash_size: STRONG_BYTES,
    };
    let blocks = size.div_ceil(block as u64) as usize;
    let mut out = Vec::with_capacity(SIGNATURE_HEADER + blocks * (4 + STRONG_BYTES as usize));
    // Pieces of whole blocks: the signature of a buffer is the concatenation of its blocks'
    // entries, so the signatures of consecutive pieces join into that of the whole.
    let piece = (PIECE as u64 * 4).div_ceil(block as u64) * block as u64;
    let mut buf = vec![0; piece.min(size.max(1)) as usize];
    let mut left = size;
    let mut first = true;
    loop {
        let n = left.min(buf.len() as u64) as usize;
        basis.read_exact(&mut buf[..n])?;
        let sig = Signature::calculate(&buf[..n], options).into_serialized();
        let entries = if first {
            &sig[..]
        } else {
            &sig[SIGNATURE_HEADER..]
        };
        out.extend_from_slice(entries);
        first = false;
        left -= n as u64;
        if left == 0 {
            return Ok(out);
        }
    }
}

/// Checks a signature received from a remote: librsync MD4 magic, a block size within
/// bounds, a strong hash of 1..=16 bytes, whole entries. Returns it parsed.
fn parse_signature(signature: &[u8]) -> Result<Signature, String> {
    let bad = |why: String| {
        format!(
            "malformed delta signature ({} bytes): {why}",
            signature.len()
        )
    };
    if signature.len() < SIGNATURE_HEADER {
        return Err(bad("shorter than its header".to_owned()));
    }
    let word = |i: usize| u32::from_be_bytes(signature[i..i + 4].try_into().expect("4 bytes"));
    let (magic, block, strong) = (word(0), word(4), word(8));
    if magic != SIGNATURE_MAGIC {
        return Err(bad(format!("magic {magic:#010x}, not an MD4 signature")));
    }
    if !(1..=MAX_BLOCK).contains(&block) {
        return Err(bad(format!("block size {block}")));
    }
    if !(1..=16).contains(&strong) {
        return Err(bad(format!("strong hash of {strong} bytes")));
    }
    if !(signature.len() - SIGNATURE_HEADER).is_multiple_of(4 + strong as usize) {
        return Err(bad("ends within a block's entry".to_owned()));
    }
    Signature::deserialize(signature.to_vec()).map_err(|e| bad(e.to_string()))
}

/// Gathers the delta into pieces of [`PIECE`] bytes for `out`.
struct Pieces<'a> {
    out: &'a mut dyn FnMut(&[u8]) -> io::Result<()>,
    buf: Vec<u8>,
    total: u64,
}

impl Pieces<'_> {
    fn flush_piece(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            (self.out)(&self.buf)?;
            self.total += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }
}

impl Write for Pieces<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(PIECE - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PIECE {
            self.flush_piece()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The delta that turns the basis `signature` describes into `new`, handed to `out` in
/// pieces of at most 1 MiB; returns its size. A malformed signature is an error naming it,
/// as is `out` failing.
pub(crate) fn delta_encode(
    signature: &[u8],
    new: &[u8],
    out: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> Result<u64, String> {
    let sig = parse_signature(signature)?;
    let index = sig.index();
    let mut pieces = Pieces {
        out,
        buf: Vec::with_capacity(PIECE),
        total: 0,
    };
    fast_rsync::diff(&index, new, &mut pieces).map_err(|e| format!("delta: {e}"))?;
    pieces
        .flush_piece()
        .map_err(|e| format!("delta: writing: {e}"))?;
    Ok(pieces.total)
}

/// Where the applier is in the delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Gathering the 4 bytes of magic.
    Magic,
    /// At a command byte.
    Command,
    /// Gathering the parameters of command `cmd` (`need` bytes in all).
    Params { cmd: u8, need: usize },
    /// Within a literal, this many bytes to go.
    Literal(u64),
    /// After the end command.
    End,
}

/// Streaming applier of a delta from [`delta_encode`] (librsync format): takes the delta in
/// pieces of any size, reads copies from the basis file by offset, hands the rebuilt file to
/// `out` in pieces of at most 1 MiB.
pub(crate) struct DeltaApplier {
    basis: File,
    /// Size of the basis (`Err`: it could not be told, reported by the first `feed`).
    basis_len: Result<u64, String>,
    step: Step,
    /// Bytes of the magic or of a command's parameters gathered so far.
    pending: Vec<u8>,
    /// Copies are read from the basis into this.
    buf: Vec<u8>,
    /// Set once a call failed: every later one answers it.
    failed: Option<String>,
}

impl DeltaApplier {
    /// An applier of deltas against `basis` (read by offset, from any thread position).
    pub(crate) fn new(basis: File) -> Self {
        let basis_len = basis
            .metadata()
            .map(|m| m.len())
            .map_err(|e| format!("delta basis: {e}"));
        Self {
            basis,
            basis_len,
            step: Step::Magic,
            pending: Vec::with_capacity(17),
            buf: Vec::new(),
            failed: None,
        }
    }

    /// Takes the next piece of the delta (any split). An error (malformed delta, a copy
    /// beyond the basis, the basis unreadable, `out` failing) names what went wrong and ends
    /// the applying.
    pub(crate) fn feed(
        &mut self,
        data: &[u8],
        out: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(), String> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let res = self.run(data, out);
        if let Err(e) = &res {
            self.failed = Some(e.clone());
        }
        res
    }

    fn run(
        &mut self,
        mut data: &[u8],
        out: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(), String> {
        let basis_len = self.basis_len.clone()?;
        let write = |out: &mut dyn FnMut(&[u8]) -> io::Result<()>, d: &[u8]| {
            out(d).map_err(|e| format!("writing the rebuilt file: {e}"))
        };
        while !data.is_empty() {
            match self.step {
                Step::Magic => {
                    let n = (4 - self.pending.len()).min(data.len());
                    self.pending.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.pending.len() == 4 {
                        let magic = u32::from_be_bytes(self.pending[..].try_into().expect("4"));
                        if magic != DELTA_MAGIC {
                            return Err(format!("not a delta: magic {magic:#010x}"));
                        }
                        self.pending.clear();
                        self.step = Step::Command;
                    }
                }
                Step::Command => {
                    let cmd = data[0];
                    data = &data[1..];
                    self.step = match cmd {
                        0 => Step::End,
                        // Literal of 1..=64 bytes, its length in the command.
                        0x01..=0x40 => Step::Literal(u64::from(cmd)),
                        // Literal with a length of 1, 2, 4 or 8 bytes.
                        0x41..=0x44 => Step::Params {
                            cmd,
                            need: 1 << (cmd - 0x41),
                        },
                        // Copy: offset and length of 1, 2, 4 or 8 bytes each.
                        0x45..=0x54 => {
                            let mode = cmd - 0x45;
                            Step::Params {
                                cmd,
                                need: (1 << (mode / 4)) + (1 << (mode % 4)),
                            }
                        }
                        _ => return Err(format!("malformed delta: unknown command {cmd:#04x}")),
                    };
                }
                Step::Params { cmd, need } => {
                    let n = (need - self.pending.len()).min(data.len());
                    self.pending.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.pending.len() == need {
                        self.step = self.command(cmd, basis_len, out)?;
                        self.pending.clear();
                    }
                }
                Step::Literal(left) => {
                    let n = left.min(data.len() as u64) as usize;
                    write(out, &data[..n])?;
                    data = &data[n..];
                    let left = left - n as u64;
                    self.step = if left == 0 {
                        Step::Command
                    } else {
                        Step::Literal(left)
                    };
                }
                Step::End => {
                    return Err(format!(
                        "malformed delta: {} bytes after its end",
                        data.len()
                    ))
                }
            }
        }
        Ok(())
    }

    /// Carries out command `cmd` whose parameters are in `pending`; the next step.
    fn command(
        &mut self,
        cmd: u8,
        basis_len: u64,
        out: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<Step, String> {
        let be = |b: &[u8]| b.iter().fold(0u64, |v, &x| v << 8 | u64::from(x));
        if cmd <= 0x44 {
            let len = be(&self.pending);
            return Ok(if len == 0 {
                Step::Command
            } else {
                Step::Literal(len)
            });
        }
        let mode = cmd - 0x45;
        let (offset, len) = self.pending.split_at(1 << (mode / 4));
        let (offset, len) = (be(offset), be(len));
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > basis_len) {
            return Err(format!(
                "malformed delta: copy of {len} bytes at {offset} from a basis of {basis_len}"
            ));
        }
        if self.buf.is_empty() {
            self.buf = vec![0; PIECE];
        }
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(PIECE as u64) as usize;
            self.basis
                .read_exact_at(&mut self.buf[..n], at)
                .map_err(|e| format!("delta basis: reading {n} bytes at {at}: {e}"))?;
            out(&self.buf[..n]).map_err(|e| format!("writing the rebuilt file: {e}"))?;
            at += n as u64;
        }
        Ok(Step::Command)
    }

    /// The delta ended: an error if it stopped before its end command (truncated) or had
    /// failed.
    pub(crate) fn finish(self) -> Result<(), String> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let within = match self.step {
            Step::End => return Ok(()),
            Step::Magic => "its magic",
            Step::Command => "a command boundary, before the end command",
            Step::Params { .. } => "a command's parameters",
            Step::Literal(_) => "a literal",
        };
        Err(format!("delta truncated: it ended within {within}"))
    }
}
