//! Framing: a `u32` little-endian length, then one Cap'n Proto message in the
//! standard stream encoding (`capnp::serialize`).
//!
//! The length is checked against a hard maximum before anything is allocated.
//! [`read_frame`]/[`write_frame`] are for blocking sockets (agents, one thread per
//! connection); [`FrameDecoder`] is for event loops (the server): push bytes as
//! they arrive, pop whole frames.

use std::io::{self, Read, Write};

use capnp::message::{Allocator, Builder, HeapAllocator, ReaderOptions};

use crate::ProtoError;

/// The largest frame accepted or sent: 16 MiB.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// The largest frame accepted before a peer has authenticated: 4 KiB.
pub const MAX_HANDSHAKE_FRAME: usize = 4096;

/// The largest data chunk in a `fileChunk` message: 1 MiB.
pub const MAX_CHUNK: usize = 1024 * 1024;

/// Reader limits used for every message: traversal bounded by twice the
/// largest frame, nesting by 64 levels (selector trees included).
pub fn reader_options() -> ReaderOptions {
    let mut o = ReaderOptions::new();
    o.traversal_limit_in_words(Some(2 * MAX_FRAME / 8));
    o.nesting_limit(64);
    o
}

/// [`reader_options`] for a message of `body_len` bytes: the traversal limit
/// is also bounded by 8 times the message's own size (plus slack), because a
/// list of zero-sized structs may claim millions of elements in a few bytes
/// (Cap'n Proto charges each one word): without this, a 300-byte frame
/// decoded into two million file entries (hundreds of MB, before the
/// handshake too). Honest readers traverse a message about once.
pub fn reader_options_for(body_len: usize) -> ReaderOptions {
    let mut o = reader_options();
    let words = (body_len / 8).saturating_mul(8).saturating_add(1024);
    o.traversal_limit_in_words(Some(words.min(2 * MAX_FRAME / 8)));
    o
}

/// A message builder whose first segment is big enough for `bytes` of payload,
/// so that large messages stay in one segment.
pub fn builder_with_capacity(bytes: usize) -> Builder<HeapAllocator> {
    let words = (bytes / 8 + 64).min(u32::MAX as usize) as u32;
    Builder::new(HeapAllocator::new().first_segment_words(words))
}

/// Serialized size of `msg` in bytes, without the length prefix.
pub fn message_len<A: Allocator>(msg: &Builder<A>) -> usize {
    capnp::serialize::compute_serialized_size_in_words(msg) * 8
}

/// Encodes `msg` as one frame (length prefix included), for event loops.
pub fn encode_frame<A: Allocator>(msg: &Builder<A>) -> Result<Vec<u8>, ProtoError> {
    let len = message_len(msg);
    check_len(len, MAX_FRAME)?;
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    capnp::serialize::write_message(&mut out, msg).map_err(write_error)?;
    Ok(out)
}

/// Writes `msg` as one frame. Use a buffered writer; this does not flush.
pub fn write_frame<W: Write, A: Allocator>(w: &mut W, msg: &Builder<A>) -> Result<(), ProtoError> {
    let len = message_len(msg);
    check_len(len, MAX_FRAME)?;
    w.write_all(&(len as u32).to_le_bytes())?;
    capnp::serialize::write_message(&mut *w, msg).map_err(write_error)?;
    Ok(())
}

/// Writing can only fail in the writer: report it as I/O, not as a bad message.
fn write_error(e: capnp::Error) -> ProtoError {
    ProtoError::Io(io::Error::other(e.to_string()))
}

fn check_len(len: usize, max: usize) -> Result<(), ProtoError> {
    if len > max {
        return Err(ProtoError::FrameTooLarge {
            len: len as u64,
            max: max as u64,
        });
    }
    Ok(())
}

/// Reads one frame body (without the prefix) of at most `max` bytes.
///
/// Returns `Ok(None)` on a clean end of stream (no byte of a new frame read).
pub fn read_frame_limited<R: Read>(r: &mut R, max: usize) -> Result<Option<Vec<u8>>, ProtoError> {
    let Some(len) = read_prefix(r, max)? else {
        return Ok(None);
    };
    let mut body = vec![0u8; len];
    read_body(r, &mut body)?;
    Ok(Some(body))
}

/// Reads a frame's length prefix and checks it against `max`; `Ok(None)` on a
/// clean end of stream (no byte of a new frame read).
fn read_prefix<R: Read>(r: &mut R, max: usize) -> Result<Option<usize>, ProtoError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtoError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(prefix) as usize;
    check_len(len, max)?;
    Ok(Some(len))
}

/// Fills `body` from the stream; an early end is [`ProtoError::Truncated`].
fn read_body<R: Read>(r: &mut R, body: &mut [u8]) -> Result<(), ProtoError> {
    r.read_exact(body).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtoError::Truncated
        } else {
            ProtoError::Io(e)
        }
    })
}

/// A frame holds exactly one message: what the reader left over is an error.
fn no_trailing_bytes(rest: &[u8]) -> Result<(), ProtoError> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(ProtoError::Decode(format!(
            "{} trailing bytes after the message",
            rest.len()
        )))
    }
}

/// Reads one frame body of at most [`MAX_FRAME`] bytes; `Ok(None)` at end of stream.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Vec<u8>>, ProtoError> {
    read_frame_limited(r, MAX_FRAME)
}

/// Parses a frame body into a Cap'n Proto reader with [`reader_options_for`] its size.
///
/// The bytes are copied once into aligned segments.
pub fn parse(
    body: &[u8],
) -> Result<capnp::message::Reader<capnp::serialize::OwnedSegments>, ProtoError> {
    let mut slice = body;
    let reader = capnp::serialize::read_message(&mut slice, reader_options_for(body.len()))?;
    no_trailing_bytes(slice)?;
    Ok(reader)
}

/// Frame bodies smaller than this go as they are even to a peer that takes `zstd` frames:
/// compressing them saves a few bytes for a whole zstd frame header and a call.
pub const COMPRESS_MIN: usize = 1024;

/// zstd level of compressed frames: level 1 already takes a file listing (paths with long
/// common prefixes, mostly equal owners, modes and times) to about a tenth, at several
/// hundred MB/s, cheaper than the bytes it saves on any network the server and agents are
/// apart on.
const FRAME_LEVEL: i32 = 1;

/// The `zstd` frames of one connection whose peers both said `frameCompression` in the
/// handshake ([`crate::auth`]): frames of at least [`COMPRESS_MIN`] bytes are sent as a
/// `zstd` message holding the frame's body, when that is smaller. The receiver takes them
/// back with [`inflate`].
pub struct FrameCompressor {
    cctx: zstd::zstd_safe::CCtx<'static>,
    body: Vec<u8>,
    packed: Vec<u8>,
}

impl std::fmt::Debug for FrameCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameCompressor").finish_non_exhaustive()
    }
}

impl FrameCompressor {
    /// A compressor for one connection.
    pub fn new() -> Result<Self, ProtoError> {
        let mut cctx = zstd::zstd_safe::CCtx::try_create()
            .ok_or_else(|| ProtoError::Io(io::Error::other("zstd: out of memory")))?;
        cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(FRAME_LEVEL))
            .map_err(zstd_error)?;
        Ok(FrameCompressor {
            cctx,
            body: Vec::new(),
            packed: Vec::new(),
        })
    }

    /// Writes `msg` as one frame, compressed when it is big enough and that pays. Use a
    /// buffered writer; this does not flush.
    pub fn write_frame<W: Write, A: Allocator>(
        &mut self,
        w: &mut W,
        msg: &Builder<A>,
    ) -> Result<(), ProtoError> {
        let len = message_len(msg);
        check_len(len, MAX_FRAME)?;
        if len < COMPRESS_MIN {
            return write_frame(w, msg);
        }
        self.body.clear();
        capnp::serialize::write_message(&mut self.body, msg).map_err(write_error)?;
        self.packed.clear();
        self.packed
            .reserve(zstd::zstd_safe::compress_bound(self.body.len()));
        self.cctx
            .compress2(&mut self.packed, &self.body)
            .map_err(zstd_error)?;
        // The wrapper costs a few words: send the body as it is unless compressing saved more.
        if self.packed.len() + 64 >= self.body.len() {
            w.write_all(&(self.body.len() as u32).to_le_bytes())?;
            w.write_all(&self.body)?;
            return Ok(());
        }
        let mut outer = builder_with_capacity(self.packed.len());
        outer
            .init_root::<crate::fleetsync_capnp::message::Builder>()
            .set_zstd(&self.packed);
        write_frame(w, &outer)
    }

    /// [`FrameCompressor::write_frame`] into a new buffer, for event loops.
    pub fn encode_frame<A: Allocator>(&mut self, msg: &Builder<A>) -> Result<Vec<u8>, ProtoError> {
        let mut out = Vec::new();
        self.write_frame(&mut out, msg)?;
        Ok(out)
    }
}

fn zstd_error(code: zstd::zstd_safe::ErrorCode) -> ProtoError {
    ProtoError::Io(io::Error::other(format!(
        "zstd: {}",
        zstd::zstd_safe::get_error_name(code)
    )))
}

/// If the message of `reader` is a `zstd` frame ([`FrameCompressor`]): the frame body it
/// holds, decompressed; `None` for any other message. A body over [`MAX_FRAME`], one whose
/// zstd frame does not state its size or states it wrongly, or a corrupt one is an error
/// (before anything of that size is allocated); whether the body is itself a `zstd` frame
/// is for the caller's decoding to refuse.
pub fn inflate<S: capnp::message::ReaderSegments>(
    reader: &capnp::message::Reader<S>,
) -> Result<Option<Vec<u8>>, ProtoError> {
    use crate::fleetsync_capnp::message::Which;
    let root: crate::fleetsync_capnp::message::Reader<'_> = reader.get_root()?;
    let Ok(Which::Zstd(data)) = root.which() else {
        return Ok(None);
    };
    let data = data?;
    let bad = |why: String| ProtoError::Decode(format!("zstd frame: {why}"));
    let size = match zstd::zstd_safe::get_frame_content_size(data) {
        Ok(Some(n)) => n,
        Ok(None) => return Err(bad("no content size".into())),
        Err(_) => return Err(bad("not a zstd frame".into())),
    };
    if size > MAX_FRAME as u64 {
        return Err(ProtoError::FrameTooLarge {
            len: size,
            max: MAX_FRAME as u64,
        });
    }
    let mut body = Vec::with_capacity(size as usize);
    let n = zstd::zstd_safe::decompress(&mut body, data)
        .map_err(|c| bad(zstd::zstd_safe::get_error_name(c).to_owned()))?;
    if n as u64 != size {
        return Err(bad(format!("{n} bytes where it said {size}")));
    }
    Ok(Some(body))
}

/// Incremental frame decoder for event loops: [`FrameDecoder::push`] bytes as
/// they arrive, then pop whole frame bodies with [`FrameDecoder::next_frame`].
///
/// An oversize length prefix is an error as soon as its 4 bytes are in, before
/// anything is allocated for the body; after an error the connection should be
/// closed.
#[derive(Debug)]
pub struct FrameDecoder {
    /// Received bytes are `buf[start..end]`; the rest of `buf` is room for the next read
    /// (zeroed once, when the buffer grows, and reused: a server reading millions of list
    /// entries spent a fifth of its CPU copying through a stack buffer, zeroing and
    /// shifting before this).
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

/// Room [`FrameDecoder::read_from`] makes for one `read`.
const READ_CHUNK: usize = 64 * 1024;

impl FrameDecoder {
    /// A decoder accepting frames up to [`MAX_FRAME`].
    pub fn new() -> Self {
        Self::with_max(MAX_FRAME)
    }

    /// A decoder accepting frames up to `max` bytes (e.g. [`MAX_HANDSHAKE_FRAME`]
    /// before authentication).
    pub fn with_max(max: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            end: 0,
            max,
        }
    }

    /// Changes the maximum (e.g. after the handshake).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Makes room for `n` more bytes after `end`: first by moving the unread bytes to the
    /// front (only when that frees enough, so a big frame arriving in pieces is not shifted
    /// on every read), else by growing.
    fn reserve(&mut self, n: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end >= n {
            return;
        }
        if self.start > 0 && self.buf.len() - (self.end - self.start) >= n {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            return;
        }
        let need = self.end + n;
        let len = need.max(self.buf.len() * 2);
        self.buf.resize(len, 0);
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Pops the next whole frame body, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ProtoError> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        check_len(len, self.max)?;
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let body = avail[4..4 + len].to_vec();
        self.start += 4 + len;
        Ok(Some(body))
    }

    /// Reads what `r` has (one `read` call) into the buffer; returns the
    /// number of bytes read (0 = end of stream). `WouldBlock` is passed on.
    pub fn read_from<R: Read>(&mut self, r: &mut R) -> io::Result<usize> {
        self.reserve(READ_CHUNK);
        let n = r.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }
}

/// A reusable, 8-byte-aligned buffer for reading frames from a blocking
/// stream: once grown, reading and parsing a frame allocates and copies
/// nothing (the hot path of a receiving agent: 1 MiB file chunks).
#[derive(Debug, Default)]
pub struct FrameBuf {
    words: Vec<capnp::Word>,
    len: usize,
}

impl FrameBuf {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the next frame of at most `max` bytes. `Ok(false)` on a clean end
    /// of stream.
    pub fn read<R: Read>(&mut self, r: &mut R, max: usize) -> Result<bool, ProtoError> {
        let Some(len) = read_prefix(r, max)? else {
            return Ok(false);
        };
        let words = len.div_ceil(8);
        if self.words.len() < words {
            self.words = capnp::Word::allocate_zeroed_vec(words);
        }
        self.len = len;
        let buf = &mut capnp::Word::words_to_bytes_mut(&mut self.words)[..len];
        read_body(r, buf)?;
        Ok(true)
    }

    /// The last frame's body.
    pub fn bytes(&self) -> &[u8] {
        &capnp::Word::words_to_bytes(&self.words)[..self.len]
    }

    /// Parses the last frame in place, with [`reader_options_for`] its size.
    pub fn parse(
        &self,
    ) -> Result<capnp::message::Reader<capnp::serialize::NoAllocSliceSegments<'_>>, ProtoError>
    {
        let mut slice = self.bytes();
        let reader = capnp::serialize::read_message_from_flat_slice_no_alloc(
            &mut slice,
            reader_options_for(self.len),
        )?;
        no_trailing_bytes(slice)?;
        Ok(reader)
    }
}
