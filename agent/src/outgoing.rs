//! The master's side of one file on an agent-to-agent stream: how the file travels and its
//! frames on the wire.
//!
//! Per file, in order of preference (see [`choose`]):
//! - **append**: the remote holds the partial file of an interrupted transfer whose bytes are
//!   the start of this file: only the rest is sent;
//! - **copy**: the remote's basis (another path) has exactly this content (by a
//!   collision-resistant digest): nothing is sent;
//! - **patch**: the master kept the remote's version in its [`VersionStore`]: a zstd frame
//!   with that version as reference prefix (`zstd --patch-from`), computed once for every
//!   remote on the same old version ([`DeltaCache`]);
//! - **delta**: the remote sent a block signature of its copy: rsync copy/literal
//!   instructions, literals compressed;
//! - **whole**: the bytes, each chunk compressed when it pays ([`ChunkCoder`]).
//!
//! Every frame passes the stream's and the master's bandwidth limits ([`RateLimiter`]).

use std::collections::HashMap;
use std::io::{BufWriter, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use capnp::message::{Builder, HeapAllocator};
use fleetsync_engine::{Algorithm, AlgorithmInfo, AlignedBuf};
use fleetsync_proto::tls::Stream;
use fleetsync_proto::{encode_file_chunk, frame, BasisFound, Coding, FileEntry, Msg};

use crate::codec::chunk::ChunkCoder;
use crate::codec::{delta, patch};
use crate::ratelimit::RateLimiter;
use crate::session::Shared;

/// Files smaller than this always travel whole: a delta would save too little for its
/// round trip and signature.
pub(crate) const DELTA_MIN: u64 = 64 * 1024;

/// Files larger than this are not patched or deltaed in memory (they travel whole, or
/// as the rest of their partial file).
pub(crate) const DELTA_MAX: u64 = 512 * 1024 * 1024;

/// Deltas kept for other remotes on the same old version, at most this many bytes.
const CACHE_BYTES: u64 = 256 * 1024 * 1024;

/// zstd level of the patches. Patch time grows steeply with the level while the patch
/// barely shrinks: on a real update (numpy, scipy and pandas wheels: 184 changed files,
/// 92 MB; 4 remotes on loopback) level 19 up to 1 MiB and 6 above took 4.7 s of sending
/// for 3.14 MB of patches per remote, level 3 for all 1.0 s for 3.21 MB.
const PATCH_LEVEL: i32 = 3;

/// How one file travels, as chosen by [`choose`].
pub(crate) enum Route {
    /// The bytes.
    Whole,
    /// The rest after the remote's partial file of `keep` bytes.
    Append { keep: u64 },
    /// Nothing: the remote's `basis` holds this content.
    Copy { basis: Vec<u8> },
    /// A zstd patch against `old` (the remote's version, kept by the master), whose content
    /// is `basis` on the remote.
    Patch {
        basis: Vec<u8>,
        old: std::fs::File,
        key: BasisKey,
    },
    /// rsync instructions against the remote's `basis`, whose block signature is given.
    Delta {
        basis: Vec<u8>,
        signature: Vec<u8>,
        key: BasisKey,
    },
}

/// The remote's version a delta is relative to.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct BasisKey {
    pub(crate) size: u64,
    pub(crate) digest: Vec<u8>,
}

/// Chooses how `entry` travels given the remote's answer about its basis (`found`, with the
/// basis path `basis`). To check for a rename it may read the master's file (`reader`)
/// whole into `bytes`.
pub(crate) fn choose(
    shared: &Shared,
    info: &AlgorithmInfo,
    entry: &FileEntry,
    basis: &[u8],
    found: Option<&BasisFound>,
    reader: &mut dyn Read,
    bytes: &mut Option<Vec<u8>>,
) -> Route {
    let Some(f) = found else {
        return Route::Whole;
    };
    if !f.partial_digest.is_empty() && f.partial_size > 0 && f.partial_size < entry.size {
        // Checked against the master's bytes while sending (see FileStream::send_append).
        return Route::Append {
            keep: f.partial_size,
        };
    }
    if f.basis_digest.is_empty() || entry.size < DELTA_MIN || entry.size > DELTA_MAX {
        return Route::Whole;
    }
    let key = BasisKey {
        size: f.basis_size,
        digest: f.basis_digest.clone(),
    };
    if f.basis_size == entry.size
        && basis != entry.path.as_slice()
        && collision_resistant(&info.name)
    {
        // Another path of the same size: maybe the same content (a rename).
        if bytes.is_none() {
            let mut b = Vec::with_capacity(entry.size as usize);
            if reader.read_to_end(&mut b).is_err() {
                // Sent whole from here: the read error is reported as the file's failure.
                return Route::Whole;
            }
            *bytes = Some(b);
        }
        if let Some(b) = bytes.as_deref() {
            let mut st = info.instantiate();
            st.update(b);
            if st.finish().as_bytes() == f.basis_digest.as_slice() {
                return Route::Copy {
                    basis: basis.to_vec(),
                };
            }
        }
    }
    if f.basis_size <= DELTA_MAX {
        if let Some(store) = &shared.versions {
            if let Some(old) = store.get(&info.name, &f.basis_digest, f.basis_size) {
                return Route::Patch {
                    basis: basis.to_vec(),
                    old,
                    key,
                };
            }
        }
    }
    if !f.signature.is_empty() {
        return Route::Delta {
            basis: basis.to_vec(),
            signature: f.signature.clone(),
            key,
        };
    }
    Route::Whole
}

/// Whether equal digests of `algorithm` are proof enough of equal content to copy a file
/// from another path with nothing sent: the copy is verified with the same digest, so with
/// a CRC (the default) a collision would put other content in place unnoticed. With a weak
/// checksum a renamed file goes as a delta (a patch or rsync instructions: a few bytes for
/// identical content), which the checksum does verify.
fn collision_resistant(algorithm: &str) -> bool {
    matches!(
        algorithm,
        "blake3" | "sha224" | "sha256" | "sha384" | "sha512"
    )
}

/// The frame writer of one stream: bandwidth limits, chunk compression, byte counts.
pub(crate) struct Wire {
    out: BufWriter<Stream>,
    limits: Vec<Arc<RateLimiter>>,
    coder: ChunkCoder,
    /// Bytes of file data (chunk payloads) written.
    pub(crate) data_bytes: u64,
    /// The largest chunk of coded data (patches, deltas, bytes read whole) per frame.
    pub(crate) max_chunk: usize,
    /// The largest chunk of data sent as it is, never compressed (patches: zstd's output
    /// already) per frame: smaller than `max_chunk` on a relayed stream, where each relay
    /// forwards a chunk once it has all of it, since these lose nothing to smaller frames.
    pub(crate) max_raw_chunk: usize,
}

impl Wire {
    pub(crate) fn new(out: Stream, limits: Vec<Arc<RateLimiter>>, coder: ChunkCoder) -> Wire {
        Wire {
            out: BufWriter::with_capacity(1 << 20, out),
            limits,
            coder,
            data_bytes: 0,
            max_chunk: frame::MAX_CHUNK,
            max_raw_chunk: frame::MAX_CHUNK,
        }
    }

    /// Writes a frame that is not file data.
    pub(crate) fn frame(&mut self, msg: &Builder<HeapAllocator>) -> Result<(), String> {
        frame::write_frame(&mut self.out, msg).map_err(|e| e.to_string())
    }

    /// Writes one chunk of file data (at most [`frame::MAX_CHUNK`]), compressed when
    /// `compress` and the coder finds it pays. Returns its bytes on the wire.
    pub(crate) fn chunk(&mut self, raw: &[u8], compress: bool) -> Result<u64, String> {
        let (data, zstd) = match compress.then(|| self.coder.encode(raw)).flatten() {
            Some(z) => (z, true),
            None => (raw, false),
        };
        let n = data.len();
        let t = Instant::now();
        for l in &self.limits {
            l.take(n);
        }
        frame::write_frame(&mut self.out, &encode_file_chunk(data, zstd))
            .map_err(|e| e.to_string())?;
        // Time blocked (limits and socket) tells the coder whether the link is the
        // bottleneck.
        self.coder.observe_write(n, t.elapsed());
        self.data_bytes += n as u64;
        Ok(n as u64)
    }

    pub(crate) fn new_file(&mut self) {
        self.coder.start_file();
    }

    pub(crate) fn flush(&mut self) -> Result<(), String> {
        self.out.flush().map_err(|e| e.to_string())
    }
}

/// Deltas and patches computed for one remote, kept for the others on the same old version
/// (one delta, many remotes): keyed by the new file's identity and the basis version.
#[derive(Default)]
pub(crate) struct DeltaCache {
    map: Mutex<HashMap<DeltaKey, Arc<DeltaCell>>>,
    bytes: AtomicU64,
}

/// A delta being made or made (`None`: it could not be made).
type DeltaCell = OnceLock<Option<Arc<Vec<u8>>>>;

#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct DeltaKey {
    /// Device, inode, size, mtime of the new file.
    file: (u64, u64, u64, i64, u32),
    /// Patch (true) or rsync delta.
    patch: bool,
    basis: BasisKey,
}

impl DeltaKey {
    pub(crate) fn new(entry: &FileEntry, patch: bool, basis: &BasisKey) -> DeltaKey {
        DeltaKey {
            file: (
                entry.dev,
                entry.inode,
                entry.size,
                entry.mtime_sec,
                entry.mtime_nsec,
            ),
            patch,
            basis: basis.clone(),
        }
    }
}

impl DeltaCache {
    /// Whether the delta for `key` is made (not merely being made).
    #[cfg(test)]
    pub(crate) fn made(&self, key: &DeltaKey) -> bool {
        let m = self.map.lock().expect("poisoned");
        m.get(key)
            .is_some_and(|c| c.get().is_some_and(Option::is_some))
    }

    /// The delta for `key`, made by `make` unless another stream made (or is making) it.
    pub(crate) fn get_or_make(
        &self,
        key: DeltaKey,
        make: impl FnOnce() -> Option<Vec<u8>>,
    ) -> Option<Arc<Vec<u8>>> {
        let cell = {
            let mut m = self.map.lock().expect("poisoned");
            if self.bytes.load(Ordering::Relaxed) > CACHE_BYTES {
                m.clear();
                self.bytes.store(0, Ordering::Relaxed);
            }
            m.entry(key).or_default().clone()
        };
        cell.get_or_init(|| {
            let d = make().map(Arc::new);
            if let Some(d) = &d {
                self.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
            d
        })
        .clone()
    }
}

/// How a file went: bytes of the file sent (or covered) and how.
pub(crate) struct Sent {
    pub(crate) bytes: u64,
    pub(crate) coding: Coding,
    /// The digest of the content sent (for the version store); empty if aborted.
    pub(crate) digest: Vec<u8>,
}

/// Why a file could not be sent.
pub(crate) enum SendError {
    /// The connection to the remote agent failed.
    Net(String),
    /// The connection to the server failed.
    Server(crate::AgentError),
}

/// A `fileStart` for `entry`.
pub(crate) struct Start<'a> {
    pub(crate) request_id: u64,
    pub(crate) entry: &'a FileEntry,
    pub(crate) algorithm: &'a str,
    pub(crate) lock_timeout_ms: Option<u32>,
    pub(crate) stage: &'a str,
}

impl Start<'_> {
    fn encode(&self, coding: Coding, basis: &[u8], basis_size: u64) -> Builder<HeapAllocator> {
        Msg::FileStart {
            request_id: self.request_id,
            entry: self.entry.clone(),
            algorithm: self.algorithm.to_owned(),
            lock_timeout_ms: self.lock_timeout_ms,
            stage: self.stage.to_owned(),
            coding,
            basis: basis.to_vec(),
            basis_size,
        }
        .encode()
    }
}

fn end(size: u64, digest: Vec<u8>) -> Builder<HeapAllocator> {
    Msg::FileEnd {
        size,
        digest,
        aborted: false,
        error: String::new(),
    }
    .encode()
}

/// Sends one file along `route`. `reader` is the master's file (positioned at its start);
/// `bytes` its whole content if the route needed it read. `progress` is told the file bytes
/// covered so far.
#[allow(clippy::too_many_arguments)]
pub(crate) fn send_file(
    wire: &mut Wire,
    cache: &DeltaCache,
    info: &AlgorithmInfo,
    buf: &mut AlignedBuf,
    start: &Start<'_>,
    route: Route,
    reader: &mut dyn Read,
    bytes: Option<Vec<u8>>,
    progress: &mut dyn FnMut(u64) -> Result<(), crate::AgentError>,
) -> Result<Sent, SendError> {
    let net = SendError::Net;
    wire.new_file();
    let entry = start.entry;
    match route {
        Route::Whole => match bytes {
            None => stream(wire, info, buf, start, reader, 0, progress),
            Some(b) => send_bytes(wire, info, start, &b),
        },
        Route::Append { keep } => stream(wire, info, buf, start, reader, keep, progress),
        Route::Copy { basis } => {
            let digest = digest_of(info, bytes.as_deref().unwrap_or_default());
            wire.frame(&start.encode(Coding::CopyBasis, &basis, 0))
                .map_err(net)?;
            wire.frame(&end(entry.size, digest.clone())).map_err(net)?;
            Ok(Sent {
                bytes: entry.size,
                coding: Coding::CopyBasis,
                digest,
            })
        }
        Route::Patch { basis, old, key } => {
            let new = match whole(entry, bytes, reader) {
                Ok(b) => b,
                Err(e) => return abort(wire, start, e),
            };
            match make_patch(cache, entry, &key, old, &new) {
                Some(p) => send_coded(wire, info, start, Coding::Patch, &basis, &p, &new, false),
                None => send_bytes(wire, info, start, &new),
            }
        }
        Route::Delta {
            basis,
            signature,
            key,
        } => {
            let new = match whole(entry, bytes, reader) {
                Ok(b) => b,
                Err(e) => return abort(wire, start, e),
            };
            let made = cache.get_or_make(DeltaKey::new(entry, false, &key), || {
                let mut d = Vec::new();
                delta::delta_encode(&signature, &new, &mut |piece| {
                    d.extend_from_slice(piece);
                    Ok(())
                })
                .ok()?;
                Some(d)
            });
            match made {
                Some(d) => send_coded(wire, info, start, Coding::Delta, &basis, &d, &new, true),
                None => send_bytes(wire, info, start, &new),
            }
        }
    }
}

/// A file that could not be read: started and aborted (the remote reports the failure).
fn abort(wire: &mut Wire, start: &Start<'_>, why: String) -> Result<Sent, SendError> {
    let net = SendError::Net;
    wire.frame(&start.encode(Coding::Whole, &[], 0))
        .map_err(net)?;
    let msg = Msg::FileEnd {
        size: 0,
        digest: Vec::new(),
        aborted: true,
        error: format!("read failed on the master: {why}"),
    };
    wire.frame(&msg.encode()).map_err(net)?;
    Ok(Sent {
        bytes: 0,
        coding: Coding::Whole,
        digest: Vec::new(),
    })
}

/// The patch from `old` (the remote's version `key`, as kept by the master) to `new`, the
/// content of `entry`: made here unless another stream or [`make_ahead`] made it or is making
/// it (then this waits for it). `None`: it cannot be made (the file goes whole).
fn make_patch(
    cache: &DeltaCache,
    entry: &FileEntry,
    key: &BasisKey,
    old: std::fs::File,
    new: &[u8],
) -> Option<Arc<Vec<u8>>> {
    cache.get_or_make(DeltaKey::new(entry, true, key), || {
        // Mapped, not read: `old` is the version store's own copy, written once and never
        // changed in place (see `patch::Basis::map` for the hazard of a truncation).
        let old = match patch::Basis::map(&old) {
            Ok(m) => m,
            Err(_) => patch::Basis::Bytes(read_all(old)?),
        };
        patch::patch_encode(old.as_slice(), new, PATCH_LEVEL).ok()
    })
}

/// Files at most this large (new and old together) have their patch made ahead of the
/// stream ([`make_ahead`]): each worker holds the new version whole and maps the old one
/// while it works.
pub(crate) const AHEAD_MAX: u64 = 128 * 1024 * 1024;

/// Makes, ahead of the stream that will send it, the patch `entry` would go as given the
/// remote's answer `found` (the file open as `reader`; `basis` the remote's path): the
/// stream then finds it in the cache. Does nothing for a file that would go any other way,
/// or whose new and old versions are together larger than [`AHEAD_MAX`].
pub(crate) fn make_ahead(
    shared: &Shared,
    info: &AlgorithmInfo,
    entry: &FileEntry,
    basis: &[u8],
    found: &BasisFound,
    reader: &mut dyn Read,
) {
    if entry.size.saturating_add(found.basis_size) > AHEAD_MAX {
        return;
    }
    let mut bytes = None;
    if let Route::Patch { old, key, .. } =
        choose(shared, info, entry, basis, Some(found), reader, &mut bytes)
    {
        // (A read error is the stream's to report.)
        if let Ok(new) = whole(entry, bytes, reader) {
            make_patch(&shared.deltas, entry, &key, old, &new);
        }
    }
}

/// The whole content of `entry`: `bytes` if [`choose`] read it, else read from `reader`.
fn whole(
    entry: &FileEntry,
    bytes: Option<Vec<u8>>,
    reader: &mut dyn Read,
) -> Result<Vec<u8>, String> {
    match bytes {
        Some(b) => Ok(b),
        None => {
            let mut b = Vec::with_capacity(entry.size as usize);
            reader.read_to_end(&mut b).map_err(|e| e.to_string())?;
            Ok(b)
        }
    }
}

fn read_all(mut f: std::fs::File) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    f.read_to_end(&mut v).ok()?;
    Some(v)
}

fn digest_of(info: &AlgorithmInfo, bytes: &[u8]) -> Vec<u8> {
    let mut st = info.instantiate();
    st.update(bytes);
    st.finish().as_bytes().to_vec()
}

/// Sends `coded` (a patch or delta of `new`, or `new` itself) in chunks.
#[allow(clippy::too_many_arguments)]
fn send_coded(
    wire: &mut Wire,
    info: &AlgorithmInfo,
    start: &Start<'_>,
    coding: Coding,
    basis: &[u8],
    coded: &[u8],
    new: &[u8],
    compress: bool,
) -> Result<Sent, SendError> {
    let net = SendError::Net;
    wire.frame(&start.encode(coding, basis, 0)).map_err(net)?;
    let chunk = if compress {
        wire.max_chunk
    } else {
        wire.max_raw_chunk
    };
    for piece in coded.chunks(chunk) {
        wire.chunk(piece, compress).map_err(net)?;
    }
    let digest = digest_of(info, new);
    wire.frame(&end(new.len() as u64, digest.clone()))
        .map_err(net)?;
    Ok(Sent {
        bytes: new.len() as u64,
        coding,
        digest,
    })
}

/// Sends `new`, already read, whole (compressed where it pays).
fn send_bytes(
    wire: &mut Wire,
    info: &AlgorithmInfo,
    start: &Start<'_>,
    new: &[u8],
) -> Result<Sent, SendError> {
    send_coded(wire, info, start, Coding::Whole, &[], new, new, true)
}

/// Streams the file from `reader`; with `keep` > 0 the remote keeps its partial file's
/// first `keep` bytes (checked by the final digest, which covers the whole file) and only
/// the rest is sent. A read error mid-file becomes an aborted `fileEnd` (the remote
/// discards the file).
fn stream(
    wire: &mut Wire,
    info: &AlgorithmInfo,
    buf: &mut AlignedBuf,
    start: &Start<'_>,
    reader: &mut dyn Read,
    keep: u64,
    progress: &mut dyn FnMut(u64) -> Result<(), crate::AgentError>,
) -> Result<Sent, SendError> {
    let net = SendError::Net;
    let mut state: Box<dyn Algorithm> = info.instantiate();
    // The kept prefix is hashed (not sent): the remote hashes its copy of it the same way.
    let mut skipped = 0u64;
    let mut read_error = None;
    while skipped < keep {
        let want = (keep - skipped).min(buf.len() as u64) as usize;
        let (filled, err) = fill(reader, &mut buf[..want]);
        state.update(&buf[..filled]);
        skipped += filled as u64;
        if err.is_some() || filled < want {
            read_error = err.or_else(|| Some("the file shrank while being sent".into()));
            break;
        }
    }
    let (coding, basis_size) = if keep > 0 {
        (Coding::Append, keep)
    } else {
        (Coding::Whole, 0)
    };
    wire.frame(&start.encode(coding, &[], basis_size))
        .map_err(net)?;
    let mut sent = skipped;
    if read_error.is_none() {
        read_error = loop {
            let (filled, read_error) = fill(reader, buf);
            if filled > 0 {
                let chunk = &buf[..filled];
                state.update(chunk);
                wire.chunk(chunk, true).map_err(net)?;
                sent += filled as u64;
                progress(sent).map_err(SendError::Server)?;
            }
            if filled < buf.len() || read_error.is_some() {
                break read_error;
            }
        };
    }
    let (msg, digest) = match read_error {
        None => {
            let d = state.finish().as_bytes().to_vec();
            (end(sent, d.clone()), d)
        }
        Some(e) => (
            Msg::FileEnd {
                size: sent,
                digest: Vec::new(),
                aborted: true,
                error: format!("read failed on the master: {e}"),
            }
            .encode(),
            Vec::new(),
        ),
    };
    wire.frame(&msg).map_err(net)?;
    Ok(Sent {
        bytes: sent,
        coding,
        digest,
    })
}

/// Fills `buf` from `reader` as far as it goes (fewer, bigger frames): the bytes read, and the
/// read error that stopped it, if one did.
pub(crate) fn fill(reader: &mut dyn Read, buf: &mut [u8]) -> (usize, Option<String>) {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (filled, Some(e.to_string())),
        }
    }
    (filled, None)
}
