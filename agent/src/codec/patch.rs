//! Patch deltas, for a sender that holds both versions of a file: the new version as one zstd
//! frame compressed with the old version (the *basis*) as reference prefix and long-distance
//! matching on, with a window that covers basis and new file — what `zstd --patch-from=OLD
//! NEW --long` does, and readable by `zstd -d --patch-from=OLD --long=N`.
//!
//! The frame carries its content size and a checksum, so a corrupted or truncated patch is an
//! error at the latest when the frame ends (and the file's digest is checked after that).
//!
//! Memory: the encoder holds both versions (the caller's slices) plus zstd's tables; the
//! decoder maps the basis and keeps a window of up to the new file's size (zstd keeps the
//! output it may still copy from). Both are bounded by [`PATCH_MAX`]: above it the caller
//! sends the file another way. A decoder given its destination file
//! ([`PatchDecoder::decode_into`]) keeps no window: zstd decodes straight into a mapping of
//! the file, whose pages are the window.

use std::cell::RefCell;
use std::fs::File;
use std::io;

use memmap2::{Mmap, MmapMut};
use zstd::zstd_safe::{self, CCtx, CParameter, DCtx, DParameter, InBuffer, OutBuffer};

/// Largest basis + new file a patch is made for (1 GiB): its window log (30) is what a
/// decoder accepts, and it bounds the decoder's memory.
pub(crate) const PATCH_MAX: u64 = 1 << 30;
/// zstd's error code for an output buffer too small for what the frame decodes to.
const DST_TOO_SMALL: zstd_safe::ErrorCode =
    (zstd_safe::zstd_sys::ZSTD_ErrorCode::ZSTD_error_dstSize_tooSmall as usize).wrapping_neg();
/// zstd's smallest window log.
const MIN_WINDOW_LOG: u32 = 10;
/// The largest window log a [`PatchDecoder`] accepts, that of [`PATCH_MAX`].
const MAX_WINDOW_LOG: u32 = 30;
/// Output buffer of the decoder: decoded data is handed out in pieces of at most this size.
const OUT_PIECE: usize = 1 << 20;
/// Largest decoding context kept for the next patch on the same thread (see [`SPARE`]).
const SPARE_MAX: usize = 64 << 20;

/// A decoding context and output buffer, kept from the last patch decoded on this thread.
struct Spare {
    /// Reset with its parameters: it refers to no basis.
    dctx: DCtx<'static>,
    out: Vec<u8>,
}

thread_local! {
    /// What the last [`PatchDecoder`] of this thread leaves for the next one. zstd holds a
    /// patch's window (up to the new file's size) in the context: a fresh context per file
    /// faulted every page of that window in again and unmapped it at the end, a quarter of
    /// a relaying remote's CPU on a release update (`perf record`, 75 patched files, 58 MB).
    /// A file streams on one connection's thread, so the files of one stream share a
    /// context; one over [`SPARE_MAX`] is not kept.
    static SPARE: RefCell<Option<Spare>> = const { RefCell::new(None) };
}

/// Window log covering `total` bytes (basis + new), or `None` above [`PATCH_MAX`].
fn window_log(total: u64) -> Option<u32> {
    if total > PATCH_MAX {
        return None;
    }
    let log = u64::BITS - total.saturating_sub(1).leading_zeros();
    Some(log.clamp(MIN_WINDOW_LOG, MAX_WINDOW_LOG))
}

/// Whether a patch is made for a basis of `basis_len` and a new file of `new_len` bytes
/// (together at most [`PATCH_MAX`]); the caller checks before reading both into memory.
pub(crate) fn patch_fits(basis_len: u64, new_len: u64) -> bool {
    basis_len
        .checked_add(new_len)
        .is_some_and(|total| total <= PATCH_MAX)
}

fn zstd_error(what: &str, code: zstd_safe::ErrorCode) -> io::Error {
    io::Error::other(format!("{what}: {}", zstd_safe::get_error_name(code)))
}

/// The patch that turns `basis` into `new`, at zstd `level` (3 is zstd's default; the patch
/// size depends far more on the long-distance matches than on the level). Whole patch in
/// memory (patches are small and cached for several remotes). Basis and new together above
/// [`PATCH_MAX`] are refused (`InvalidInput`).
pub(crate) fn patch_encode(basis: &[u8], new: &[u8], level: i32) -> io::Result<Vec<u8>> {
    let too_big = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "no patch for a basis of {} and a file of {} bytes: together over the {} \
                 bytes a patch covers",
                basis.len(),
                new.len(),
                PATCH_MAX
            ),
        )
    };
    if !patch_fits(basis.len() as u64, new.len() as u64) {
        return Err(too_big());
    }
    let log = window_log(basis.len() as u64 + new.len() as u64).ok_or_else(too_big)?;
    let mut cctx = CCtx::try_create().ok_or_else(|| io::Error::other("zstd: out of memory"))?;
    for p in [
        CParameter::CompressionLevel(level),
        CParameter::WindowLog(log),
        CParameter::EnableLongDistanceMatching(true),
        CParameter::ChecksumFlag(true),
        CParameter::ContentSizeFlag(true),
    ] {
        cctx.set_parameter(p)
            .map_err(|c| zstd_error("zstd parameter", c))?;
    }
    cctx.ref_prefix(basis)
        .map_err(|c| zstd_error("zstd basis", c))?;
    let mut out = Vec::with_capacity(zstd_safe::compress_bound(new.len()));
    cctx.compress2(&mut out, new)
        .map_err(|c| zstd_error("zstd patch", c))?;
    out.shrink_to_fit();
    Ok(out)
}

/// The old version a patch applies to (or is made against): mapped from its file, or in
/// memory.
pub(crate) enum Basis {
    Mapped(Mmap),
    Bytes(Vec<u8>),
}

impl Basis {
    /// The contents of `file`, mapped into memory, not read. The file must not be truncated
    /// while this lives (reading a mapped page past the end of a file raises `SIGBUS`);
    /// changes of its bytes change what is read.
    pub(crate) fn map(file: &File) -> io::Result<Self> {
        if file.metadata()?.len() == 0 {
            return Ok(Self::Bytes(Vec::new()));
        }
        // SAFETY: the mapping is only read, through `as_slice`, while `self` lives. Another
        // process writing to the file changes what is read (a patch made from it or a file
        // decoded with it is wrong, and the digests checked at the end of every file reject
        // it); truncating it is the documented hazard of `map` (SIGBUS), as for every reader
        // of a mapped file.
        Ok(Self::Mapped(unsafe { Mmap::map(file)? }))
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Bytes(b) => b,
        }
    }
}

/// Where a [`PatchDecoder`] is.
enum State {
    /// Within the frame.
    Running,
    /// The frame ended, checksum verified.
    Done,
    /// Failed; every later call answers this.
    Failed(String),
}

/// Streaming applier of a patch from [`patch_encode`] (or `zstd --patch-from`): takes the
/// patch in pieces of any size and hands the new file out as it is decoded.
pub(crate) struct PatchDecoder {
    // `dctx` refers to `basis`'s bytes (under a 'static lifetime, see `with_basis`) until
    // `drop` resets it (or drops it first: fields drop in declaration order); `None` only
    // within `drop`.
    dctx: Option<DCtx<'static>>,
    out: Vec<u8>,
    /// The destination, mapped, and how much of it is decoded ([`Self::decode_into`]).
    mapped: Option<(MmapMut, usize)>,
    /// Some patch was fed.
    started: bool,
    state: State,
    basis: Basis,
}

impl PatchDecoder {
    /// A decoder for patches against the contents of `basis` (mapped into memory, not
    /// read). The file must not be truncated while the decoder lives (reading a mapped page
    /// past the end of a file raises `SIGBUS`); changes of its bytes give a wrong file,
    /// caught by the frame's checksum.
    pub(crate) fn new(basis: File) -> io::Result<Self> {
        let len = basis.metadata()?.len();
        if len > PATCH_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("basis of {len} bytes: over the {PATCH_MAX} bytes a patch covers"),
            ));
        }
        Self::with_basis(Basis::map(&basis)?)
    }

    /// A decoder for patches against `basis` held in memory.
    pub(crate) fn from_bytes(basis: Vec<u8>) -> io::Result<Self> {
        Self::with_basis(Basis::Bytes(basis))
    }

    fn with_basis(basis: Basis) -> io::Result<Self> {
        let bytes = basis.as_slice();
        // SAFETY: the slice points into the mapping or the vector's heap buffer, neither of
        // which moves when `basis` is moved into `Self`, nor changes or is freed before
        // `dctx` is dropped: `basis` is never modified or replaced, and `dctx` is declared
        // (so dropped) before it. The 'static lifetime never leaves this type.
        let prefix: &'static [u8] =
            unsafe { std::slice::from_raw_parts(bytes.as_ptr(), bytes.len()) };
        let (mut dctx, out) = match SPARE.with(|s| s.borrow_mut().take()) {
            Some(spare) => (spare.dctx, spare.out),
            None => (
                DCtx::try_create().ok_or_else(|| io::Error::other("zstd: out of memory"))?,
                vec![0; OUT_PIECE],
            ),
        };
        dctx.set_parameter(DParameter::WindowLogMax(MAX_WINDOW_LOG))
            .map_err(|c| zstd_error("zstd parameter", c))?;
        dctx.ref_prefix(prefix)
            .map_err(|c| zstd_error("zstd basis", c))?;
        Ok(Self {
            dctx: Some(dctx),
            out,
            mapped: None,
            started: false,
            state: State::Running,
            basis,
        })
    }

    /// Decodes the new file straight into `file` (its `len` bytes reserved first), in zstd's
    /// stable-output mode: zstd then keeps no window of its own (up to the file's size of
    /// freshly faulted memory per patch, copied out again) and nothing is written twice.
    /// [`Self::feed`] then hands out the decoded bytes only to be looked at (hashed): they
    /// are in the file already. Call before the first [`Self::feed`]. An error (the file
    /// system cannot reserve or map the file, no room) leaves the file empty and the
    /// decoder as it was: the caller writes what `feed` hands out instead.
    ///
    /// The file must stay at `len` bytes while mapped, until the decoder is dropped: a
    /// mapped page past the end of a file raises `SIGBUS`, as for the mapped basis. Its
    /// blocks are reserved (`fallocate`) before it is mapped so that a full disk is an
    /// error here, never a fault while decoding.
    pub(crate) fn decode_into(&mut self, file: &File, len: u64) -> io::Result<()> {
        if self.started || self.mapped.is_some() {
            return Err(io::Error::other("decode_into after the patch started"));
        }
        if len == 0 || len > PATCH_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no mapped output of {len} bytes"),
            ));
        }
        let dctx = self.dctx.as_mut().expect("taken only by drop");
        let mapped = rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len)
            .map_err(io::Error::from)
            .and_then(|()| {
                // SAFETY: the mapping is written only by zstd through `feed` and read
                // through the slices `feed` hands out, while the decoder lives; the file is
                // the receiver's own new temporary file, sized (and its blocks reserved)
                // just above. Someone else truncating it is the documented hazard of this
                // method (SIGBUS), as for the mapped basis.
                unsafe { MmapMut::map_mut(file) }
            })
            .and_then(|m| match m.len() as u64 == len {
                true => Ok(m),
                false => Err(io::Error::other("the mapped file is not the size reserved")),
            })
            .and_then(|m| {
                dctx.set_parameter(DParameter::StableOutBuffer(true))
                    .map_err(|c| zstd_error("zstd parameter", c))?;
                Ok(m)
            });
        let map = mapped.inspect_err(|_| {
            let _ = file.set_len(0);
        })?;
        self.mapped = Some((map, 0));
        Ok(())
    }

    /// Whether the decoder writes into its destination itself ([`Self::decode_into`]).
    pub(crate) fn in_place(&self) -> bool {
        self.mapped.is_some()
    }

    /// Takes the next piece of the patch (any split); hands what it decodes to `out`, in
    /// pieces of at most 1 MiB (in place: the whole newly decoded part of the file). An
    /// error (corrupt patch, data after its end, more than the destination holds, `out`
    /// failing) names what went wrong and ends the decoding.
    pub(crate) fn feed(
        &mut self,
        data: &[u8],
        out: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(), String> {
        match &self.state {
            State::Running => {}
            State::Failed(e) => return Err(e.clone()),
            State::Done if data.is_empty() => return Ok(()),
            State::Done => {
                return self.fail(format!("{} bytes after the end of the patch", data.len()))
            }
        }
        self.started = true;
        let mut input = InBuffer::around(data);
        if let Some((map, pos)) = self.mapped.as_mut() {
            let dctx = self.dctx.as_mut().expect("taken only by drop");
            let start = *pos;
            let res = loop {
                let (taken, before) = (input.pos(), *pos);
                // Stable output: the same buffer on every call, its position as zstd left it.
                let mut output = OutBuffer::around_pos(&mut map[..], before);
                let res = dctx.decompress_stream(&mut output, &mut input);
                *pos = output.pos();
                match res {
                    Ok(hint) if hint != 0 && input.pos() < data.len() => {
                        if input.pos() == taken && *pos == before {
                            break Err(None); // no progress: the destination is full
                        }
                    }
                    Ok(hint) => break Ok(hint),
                    Err(c) => break Err(Some(c)),
                }
            };
            let (len, now) = (map.len(), *pos);
            if now > start {
                if let Err(e) = out(&map[start..now]) {
                    return self.fail(format!("writing the patched file: {e}"));
                }
            }
            return match res {
                Ok(0) if input.pos() < data.len() => self.fail(format!(
                    "{} bytes after the end of the patch",
                    data.len() - input.pos()
                )),
                Ok(0) => {
                    self.state = State::Done;
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(c) if now == len || c == Some(DST_TOO_SMALL) => self.fail(format!(
                    "the patch decodes to more than the file's {len} bytes"
                )),
                Err(None) => self.fail("zstd made no progress within the patch".to_owned()),
                Err(Some(c)) => {
                    self.fail(format!("corrupt patch: {}", zstd_safe::get_error_name(c)))
                }
            };
        }
        loop {
            let mut output = OutBuffer::around(&mut self.out[..]);
            let dctx = self.dctx.as_mut().expect("taken only by drop");
            let res = dctx.decompress_stream(&mut output, &mut input);
            let n = output.pos();
            let hint = match res {
                Ok(h) => h,
                Err(c) => {
                    return self.fail(format!("corrupt patch: {}", zstd_safe::get_error_name(c)))
                }
            };
            if n > 0 {
                if let Err(e) = out(&self.out[..n]) {
                    return self.fail(format!("writing the patched file: {e}"));
                }
            }
            if hint == 0 {
                self.state = State::Done;
                let rest = data.len() - input.pos();
                if rest > 0 {
                    return self.fail(format!("{rest} bytes after the end of the patch"));
                }
                return Ok(());
            }
            if input.pos() == data.len() && n < self.out.len() {
                // All taken, nothing held back: more patch needed.
                return Ok(());
            }
        }
    }

    fn fail(&mut self, why: String) -> Result<(), String> {
        self.state = State::Failed(why.clone());
        Err(why)
    }

    /// The patch ended: an error if its frame was not complete (truncated) or had failed.
    pub(crate) fn finish(self) -> Result<(), String> {
        match &self.state {
            State::Done => Ok(()),
            State::Failed(e) => Err(e.clone()),
            State::Running => Err("patch truncated: it ended within its zstd frame".to_owned()),
        }
    }

    /// Size of the basis the decoder applies patches to.
    pub(crate) fn basis_len(&self) -> usize {
        self.basis.as_slice().len()
    }
}

impl Drop for PatchDecoder {
    fn drop(&mut self) {
        let Some(mut dctx) = self.dctx.take() else {
            return;
        };
        // A reset of session and parameters clears the prefix: the context refers to
        // `basis` no more, and may outlive it. Otherwise it is dropped here, before `basis`.
        if dctx
            .reset(zstd_safe::ResetDirective::SessionAndParameters)
            .is_ok()
            && dctx.sizeof() <= SPARE_MAX
        {
            let out = std::mem::take(&mut self.out);
            SPARE.with(|s| *s.borrow_mut() = Some(Spare { dctx, out }));
        }
    }
}
