//! rsync-style deltas, for when only the remote holds the old version (the *basis*): the
//! remote sends the block signature of its copy ([`signature`]), the sender answers with
//! copy/literal instructions against it ([`delta_encode`]), and the remote rebuilds the file
//! as the instructions stream in, reading the basis by offset ([`DeltaApplier`]).
//!
//! Signatures and deltas are in librsync's format (MD4 signature magic `rs\x01\x36`, delta
//! magic `rs\x02\x36`). Signatures are made by the `fast_rsync` crate; its `diff` is slow on
//! data that matches little (see [`Index`]) and its `apply` needs the basis and the whole
//! delta in memory, while files go up to several GiB: the diff and the applier (a state
//! machine over the delta bytes, reading the basis from its file) are ours, checked against
//! `fast_rsync` and librsync's `rdiff`. Literals are left raw: the chunk coder compresses the
//! stream they travel in.
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
/// bounds, a strong hash of 1..=16 bytes, whole entries. Returns its block size and strong
/// hash size.
fn parse_signature(signature: &[u8]) -> Result<(usize, usize), String> {
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
    Ok((block as usize, strong as usize))
}

/// librsync's weak checksum (rsync's rolling sum with `CHAR_OFFSET` 31) of `block`, as
/// `fast_rsync` stores it in a signature: `s1 | s2 << 16`.
pub(super) fn weak_sum(block: &[u8]) -> u32 {
    let len = block.len() as u32;
    let (mut s1, mut s2) = (0u16, 0u16);
    // s2 is the sum of the running s1, written as a weighted sum so that it vectorises.
    for (i, &b) in block.iter().enumerate() {
        s1 = s1.wrapping_add(u16::from(b));
        s2 = s2.wrapping_add(u16::from(b).wrapping_mul((len as u16).wrapping_sub(i as u16)));
    }
    s1 = s1.wrapping_add((len as u16).wrapping_mul(31));
    s2 = s2.wrapping_add(((len.wrapping_mul(len.wrapping_add(1)) / 2) as u16).wrapping_mul(31));
    u32::from(s1) | u32::from(s2) << 16
}

/// The weak checksum of a window of `len` bytes moved on by one: `old` leaves, `new` enters.
#[inline]
pub(super) fn weak_roll(sum: u32, len: usize, old: u8, new: u8) -> u32 {
    let (mut s1, mut s2) = (sum as u16, (sum >> 16) as u16);
    s1 = s1.wrapping_add(u16::from(new)).wrapping_sub(u16::from(old));
    s2 = s2
        .wrapping_add(s1)
        .wrapping_sub((len as u16).wrapping_mul(u16::from(old).wrapping_add(31)));
    u32::from(s1) | u32::from(s2) << 16
}

/// A weak checksum that failed its strong check this often is not tried again (a crafted
/// signature must not make the sender hash every position).
const MAX_WEAK_COLLISIONS: u32 = 1024;
/// At most this many blocks with the same weak checksum are compared per position.
const MAX_CANDIDATES: usize = 16;

/// The blocks of a signature, for looking windows of the new file up.
///
/// Written here rather than using `fast_rsync::diff`: that looks every position up in two
/// hash maps, 61-149 MB/s on 64 MiB that match nothing, against 160-276 MB/s with the bit
/// filter in front of a sorted table here (release build, this 2-core machine under a load
/// of 4; `measure_delta_speed`); on matching data both run at 500-800 MB/s, and both make
/// the same deltas. Signatures are `fast_rsync`'s.
struct Index<'a> {
    block: usize,
    strong: usize,
    /// The signature's entries (after the header).
    entries: &'a [u8],
    blocks: usize,
    /// One bit per hash of weak checksum: most windows stop at a clear bit.
    filter: Vec<u64>,
    shift: u32,
    /// (weak, block index), sorted; of blocks with equal weak and strong sums only the first.
    table: Vec<(u32, u32)>,
    /// Weak checksums whose strong check failed, and how often.
    collisions: std::collections::HashMap<u32, u32>,
}

impl<'a> Index<'a> {
    fn new(signature: &'a [u8], block: usize, strong: usize) -> Self {
        let entries = &signature[SIGNATURE_HEADER..];
        let blocks = entries.len() / (4 + strong);
        // 16 to 32 bits per block (a clear bit for at least 15 windows in 16 that match
        // nothing), within 64 Kib..64 Mib.
        let bits_log = (blocks.max(1).ilog2() + 5).clamp(16, 26);
        let mut index = Index {
            block,
            strong,
            entries,
            blocks,
            filter: vec![0; 1 << (bits_log - 6)],
            shift: 64 - bits_log,
            table: Vec::with_capacity(blocks),
            collisions: std::collections::HashMap::new(),
        };
        for i in 0..blocks {
            let weak = index.weak(i);
            index.table.push((weak, i as u32));
            let bit = index.bit(weak);
            index.filter[bit >> 6] |= 1 << (bit & 63);
        }
        index.table.sort_unstable();
        // Identical blocks (zeros, repeated records): one entry, so that a lookup does not
        // walk them all. A copy that continues the previous one is tried first anyway.
        let mut table = std::mem::take(&mut index.table);
        table.dedup_by(|b, a| {
            a.0 == b.0 && index.strong(a.1 as usize) == index.strong(b.1 as usize)
        });
        index.table = table;
        index
    }

    fn weak(&self, i: usize) -> u32 {
        let at = i * (4 + self.strong);
        u32::from_be_bytes(self.entries[at..at + 4].try_into().expect("4 bytes"))
    }

    fn strong(&self, i: usize) -> &'a [u8] {
        let at = i * (4 + self.strong) + 4;
        &self.entries[at..at + self.strong]
    }

    fn bit(&self, weak: u32) -> usize {
        (u64::from(weak).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    /// Whether some block may have weak checksum `weak` (false: none has).
    #[inline]
    fn maybe(&self, weak: u32) -> bool {
        let bit = self.bit(weak);
        self.filter[bit >> 6] & (1 << (bit & 63)) != 0
    }

    /// The basis block equal to `window` (whose weak checksum is `weak`), preferring block
    /// `expect` (the one continuing the previous copy).
    fn find(&mut self, window: &[u8], weak: u32, expect: Option<usize>) -> Option<usize> {
        if !self.maybe(weak) {
            return None;
        }
        let first = self.table.partition_point(|&(w, _)| w < weak);
        if self.table.get(first).is_none_or(|&(w, _)| w != weak) {
            return None;
        }
        if self
            .collisions
            .get(&weak)
            .is_some_and(|&n| n >= MAX_WEAK_COLLISIONS)
        {
            return None;
        }
        let options = SignatureOptions {
            block_size: self.block as u32,
            crypto_hash_size: self.strong as u32,
        };
        // The strong sum exactly as the signature has it: that of a one-block signature.
        let one = Signature::calculate(window, options).into_serialized();
        let strong = &one[SIGNATURE_HEADER + 4..];
        if let Some(e) = expect.filter(|&e| e < self.blocks) {
            if self.weak(e) == weak && self.strong(e) == strong {
                return Some(e);
            }
        }
        let found = self.table[first..]
            .iter()
            .take_while(|&&(w, _)| w == weak)
            .take(MAX_CANDIDATES)
            .map(|&(_, i)| i as usize)
            .find(|&i| self.strong(i) == strong);
        if found.is_none() {
            *self.collisions.entry(weak).or_insert(0) += 1;
        }
        found
    }
}

/// Writes delta commands (librsync format) into `out`.
struct Commands<'a, 'b> {
    out: &'a mut Pieces<'b>,
}

impl Commands<'_, '_> {
    /// A big-endian number in 1, 2, 4 or 8 bytes; the size class (0..=3).
    fn number(buf: &mut Vec<u8>, v: u64) -> u8 {
        let class = match v {
            0..=0xff => 0,
            0x100..=0xffff => 1,
            0x1_0000..=0xffff_ffff => 2,
            _ => 3,
        };
        buf.extend_from_slice(&v.to_be_bytes()[8 - (1 << class)..]);
        class
    }

    fn literal(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut cmd = Vec::with_capacity(9);
        if data.len() <= 64 {
            cmd.push(data.len() as u8);
        } else {
            cmd.push(0);
            let class = Self::number(&mut cmd, data.len() as u64);
            cmd[0] = 0x41 + class;
        }
        self.out.write_all(&cmd)?;
        self.out.write_all(data)
    }

    fn copy(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let mut cmd = Vec::with_capacity(17);
        cmd.push(0);
        let o = Self::number(&mut cmd, offset);
        let l = Self::number(&mut cmd, len);
        cmd[0] = 0x45 + o * 4 + l;
        self.out.write_all(&cmd)
    }
}

/// Writes the delta from the basis `index` describes to `new`.
fn diff(index: &mut Index<'_>, new: &[u8], out: &mut Pieces<'_>) -> io::Result<()> {
    let b = index.block;
    let mut cmds = Commands { out };
    cmds.out.write_all(&DELTA_MAGIC.to_be_bytes())?;
    let mut here = 0;
    // New bytes from `lit` to `here` are not matched yet; `copy` is the copy before them.
    let mut lit = 0;
    let mut copy: Option<(u64, u64)> = None;
    let mut weak = if new.len() >= b {
        weak_sum(&new[..b])
    } else {
        0
    };
    while here + b <= new.len() {
        // The hot loop: most windows of unmatched data stop at the filter.
        while here + b < new.len() && !index.maybe(weak) {
            weak = weak_roll(weak, b, new[here], new[here + b]);
            here += 1;
        }
        let expect = copy
            .filter(|_| lit == here)
            .map(|(o, l)| ((o + l) / b as u64) as usize);
        if let Some(i) = index.find(&new[here..here + b], weak, expect) {
            let offset = i as u64 * b as u64;
            if lit < here {
                if let Some((o, l)) = copy.take() {
                    cmds.copy(o, l)?;
                }
                cmds.literal(&new[lit..here])?;
            }
            copy = match copy {
                Some((o, l)) if o + l == offset => Some((o, l + b as u64)),
                Some((o, l)) => {
                    cmds.copy(o, l)?;
                    Some((offset, b as u64))
                }
                None => Some((offset, b as u64)),
            };
            here += b;
            lit = here;
            if here + b <= new.len() {
                weak = weak_sum(&new[here..here + b]);
            }
            continue;
        }
        if here + b < new.len() {
            weak = weak_roll(weak, b, new[here], new[here + b]);
        }
        here += 1;
    }
    if let Some((o, l)) = copy {
        cmds.copy(o, l)?;
    }
    cmds.literal(&new[lit..])?;
    cmds.out.write_all(&[0])
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
    let (block, strong) = parse_signature(signature)?;
    let mut index = Index::new(signature, block, strong);
    let mut pieces = Pieces {
        out,
        buf: Vec::with_capacity(PIECE),
        total: 0,
    };
    diff(&mut index, new, &mut pieces)
        .and_then(|()| pieces.flush_piece())
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
                    let n = left.min(data.len().min(PIECE) as u64) as usize;
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
