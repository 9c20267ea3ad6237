//! Hashing files and streams: every buffer is read once and fed to every
//! algorithm; big files whose algorithms all combine are split into chunks
//! hashed in parallel on the current rayon pool.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};

use rayon::prelude::*;

use crate::io::{buf, pread, Block, IoMode, IoUsed};
use crate::{Algorithm, AlgorithmInfo, Digest, Error};

/// How to read and split files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashOptions {
    /// Read backend.
    pub io: IoMode,
    /// Bytes per parallel chunk (default 8 MiB). Also the most one read asks for.
    pub chunk_size: usize,
    /// Files bigger than this whose algorithms all combine are split into
    /// `chunk_size` chunks hashed on several threads (default 32 MiB).
    pub parallel_threshold: u64,
}

impl Default for HashOptions {
    fn default() -> Self {
        HashOptions {
            io: IoMode::Auto,
            chunk_size: 8 << 20,
            parallel_threshold: 32 << 20,
        }
    }
}

/// The digests of one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileHash {
    /// Bytes hashed: the file's size when it was opened.
    pub size: u64,
    /// One digest per requested algorithm, in the order requested.
    pub digests: Vec<Digest>,
    /// The backend that read the file.
    pub io: IoUsed,
}

/// Sequential reads ask for at most this much at a time: big enough to
/// amortise a syscall and a rayon fan-out, small enough to stay in L2-ish
/// cache while several algorithms go over it.
const SEQ_BLOCK: usize = buf::POOL_BUF;
/// Buffers of a sequential reader thread (one being hashed, the rest filling).
const SEQ_DEPTH: usize = 4;
/// Files up to this size are read on the calling thread; bigger ones that
/// are streamed get a reader thread (double buffering). Below this, the
/// thread costs more than the overlap gains, and in a tree the other files
/// keep the cores busy anyway.
const SYNC_MAX: u64 = 8 << 20;
/// Piece size for feeding several algorithms the same bytes: half the L2
/// cache of the build machine (512 KiB), so each algorithm reads from L2.
const L2_BLOCK: usize = 256 << 10;
/// Most chunks one parallel file is split into.
const MAX_CHUNKS: u64 = 1 << 16;
/// Blocks at least this long are fed to several algorithms in parallel.
const PAR_ALGS_MIN: usize = 64 << 10;

/// Hashes the file at `path` with every algorithm in `algs` in one pass.
///
/// The file is hashed up to the size it had when opened; a file that
/// shrinks meanwhile is an error. Paths that are not regular files (a FIFO,
/// a device) are read as streams to their end.
///
/// ```
/// use fleetsync_engine::{hash_file, HashOptions, IoMode, Registry};
///
/// let dir = std::env::temp_dir().join(format!("fleetsync-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("check.txt");
/// std::fs::write(&path, b"123456789").unwrap();
///
/// let registry = Registry::with_builtins();
/// let algs = [registry.info("crc32").unwrap(), registry.info("sha256").unwrap()];
/// let opts = HashOptions { io: IoMode::Pread, ..HashOptions::default() };
/// let hashed = hash_file(&path, &algs, &opts).unwrap();
/// assert_eq!(hashed.size, 9);
/// assert_eq!(hashed.digests[0].value(), Some(0xcbf43926));
/// assert_eq!(
///     hashed.digests[1].to_hex(),
///     "15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225"
/// );
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn hash_file(
    path: &Path,
    algs: &[AlgorithmInfo],
    opts: &HashOptions,
) -> Result<FileHash, Error> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    hash_opened(path, &file, algs, opts)
}

/// Hashes a file that is already open, from its start, with every
/// algorithm in `algs` in one pass: what [`hash_file`] does after opening.
///
/// Use it when the caller opened the file itself (beneath a directory
/// descriptor, with `openat2`, with `O_NOFOLLOW`): no path is resolved
/// again. The file's current offset is neither used nor moved (reads are
/// positioned). A regular file is hashed up to the size `fstat` gives now;
/// if it shrinks meanwhile that is an error; big files are split into
/// chunks hashed in parallel exactly as [`hash_file`] does. Anything else (a
/// pipe, a device) is read as a stream to its end. Errors carry no path:
/// the caller knows which file it passed.
///
/// Reads go into page-aligned buffers that each thread reuses, so hashing
/// many small files allocates nothing per file.
///
/// ```
/// use std::fs::File;
/// use fleetsync_engine::{hash_open_file, HashOptions, Registry};
///
/// let dir = std::env::temp_dir().join(format!("fleetsync-doc-open-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("check.txt");
/// std::fs::write(&path, b"123456789").unwrap();
///
/// let registry = Registry::with_builtins();
/// let algs = [registry.info("crc32").unwrap(), registry.info("md5").unwrap()];
/// let file = File::open(&path).unwrap();
/// let hashed = hash_open_file(&file, &algs, &HashOptions::default()).unwrap();
/// assert_eq!(hashed.size, 9);
/// assert_eq!(hashed.digests[0].to_hex(), "cbf43926");
/// assert_eq!(hashed.digests[1].to_hex(), "25f9e794323b453885f5181f1b624d0b");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn hash_open_file(
    file: &File,
    algs: &[AlgorithmInfo],
    opts: &HashOptions,
) -> Result<FileHash, Error> {
    hash_opened_as(file, algs, opts, NotRegular::Stream, |source| Error::Io {
        path: None,
        source,
    })
}

/// Hashes an already opened file; `path` names it in errors.
pub(crate) fn hash_opened(
    path: &Path,
    file: &File,
    algs: &[AlgorithmInfo],
    opts: &HashOptions,
) -> Result<FileHash, Error> {
    hash_opened_as(file, algs, opts, NotRegular::Stream, |e| Error::io(path, e))
}

/// What to do with an open file that is not a regular file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotRegular {
    /// Read it as a stream to its end (`hash_file` on a FIFO or a device).
    Stream,
    /// Refuse it: a tree walk found a regular file there, and something
    /// else has replaced it since.
    Refuse,
}

/// Hashes an already opened file, mapping I/O errors with `err`.
pub(crate) fn hash_opened_as(
    file: &File,
    algs: &[AlgorithmInfo],
    opts: &HashOptions,
    not_regular: NotRegular,
    err: impl Fn(io::Error) -> Error,
) -> Result<FileHash, Error> {
    let (regular, size) = fstat(file).map_err(&err)?;
    if !regular {
        return match not_regular {
            NotRegular::Stream => hash_stream(file, algs).map_err(err),
            NotRegular::Refuse => Err(err(io::Error::other("no longer a regular file"))),
        };
    }
    // Every chunk keeps its states until the combine: bound their number so
    // a tiny `chunk_size` on a huge file cannot exhaust memory.
    let chunk = opts
        .chunk_size
        .max(1)
        .max(size.div_ceil(MAX_CHUNKS).min(usize::MAX as u64) as usize);
    let parallel =
        size > opts.parallel_threshold && size > chunk as u64 && chunks_combine(algs, chunk);
    let io = choose_backend(opts.io)?;
    let mut states = new_states(algs);
    let read = FileRead {
        file,
        size,
        chunk,
        parallel,
        algs,
    };
    let io = read_with(io, read, &mut states).map_err(err)?;
    Ok(FileHash {
        size,
        digests: states.iter().map(|s| s.finish()).collect(),
        io,
    })
}

/// Whether `file` is a regular file, and its size: one `fstat`, the
/// cheapest way to ask (std's `metadata` makes a `statx` with an empty path).
fn fstat(file: &File) -> io::Result<(bool, u64)> {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: the descriptor is open for the borrow of `file`, and `st`
    // points to writable memory of the size `fstat` fills.
    if unsafe { libc::fstat(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fstat` returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok((
        st.st_mode & libc::S_IFMT == libc::S_IFREG,
        st.st_size as u64,
    ))
}

/// One regular file to read: its size, the chunk size, and whether the
/// chunks are hashed in parallel (each with fresh states of `algs`).
#[derive(Clone, Copy)]
struct FileRead<'a> {
    file: &'a File,
    size: u64,
    chunk: usize,
    parallel: bool,
    algs: &'a [AlgorithmInfo],
}

/// Reads the file with backend `io`, feeding `states`; returns the backend
/// that read it (`pread` when a map was refused).
fn read_with(
    io: IoUsed,
    read: FileRead<'_>,
    states: &mut [Box<dyn Algorithm>],
) -> io::Result<IoUsed> {
    let FileRead {
        file,
        size,
        chunk,
        parallel,
        algs,
    } = read;
    match io {
        IoUsed::Mmap => match crate::io::mmap::map(file, size)? {
            Some(map) => hash_mmap(&map, chunk, parallel, algs, states),
            // An empty file: nothing to map or read.
            None if size == 0 => Ok(()),
            // No map could be made (all guard slots busy, or the `SIGBUS`
            // handler refused): read with `pread` instead.
            None => return read_with(IoUsed::Pread, read, states),
        },
        IoUsed::Pread | IoUsed::Stream if parallel => par_pread(file, size, chunk, algs, states),
        IoUsed::Pread | IoUsed::Stream if size <= SYNC_MAX => {
            read_sync(file, size, states, pread::read_exact_at)
        }
        IoUsed::Pread | IoUsed::Stream => {
            let block = chunk.min(SEQ_BLOCK);
            seq_pipeline(states, SEQ_DEPTH, |tx, free| {
                pread::produce(file, size, block, SEQ_DEPTH, tx, free)
            })
        }
        IoUsed::Uring => hash_uring(read, states),
    }
    .map(|()| io)
}

/// Which backend reads a regular file of `size` bytes in `mode`.
fn choose_backend(mode: IoMode) -> Result<IoUsed, Error> {
    match mode {
        IoMode::Pread => Ok(IoUsed::Pread),
        IoMode::Mmap => Ok(IoUsed::Mmap),
        IoMode::Uring => crate::io::uring_available()
            .map(|()| IoUsed::Uring)
            .map_err(|reason| Error::UringUnavailable { reason }),
        // Auto reads single files with pread: on this machine (kernel 6.18,
        // 1 GB cached file, 2 cores) io_uring reads measured slower in every
        // pattern: sequential crc32 1.9 vs 5.2 GB per CPU-second, parallel
        // chunks 2.0-2.3 vs 8.0-8.2 (one earlier run had them equal, 6.2 vs
        // 6.2). perf puts the kernel's copy into our buffers at 55% of the
        // time under io_uring against 12% under pread. Cold reads were mixed
        // (sequential xxh3 1.08 vs 0.64 GB/s for uring, parallel crc32 0.56
        // vs 0.77). Trees still use io_uring batches for small files, which
        // measured no slower (see `tree.rs`).
        // Nor does Auto map files: a map skips pread's copy but costs per
        // page-cache folio, so it wins only for files cached in large folios.
        // 1 GiB crc32, paired runs: file written in 4 KiB pieces, map 0.77x
        // pread's speed; written in 1 MiB or 256 KiB pieces, 0.84x to 1.3x
        // from one run to the next. A probe (one chunk each way, timed in
        // thread CPU time) did not pick the faster one reliably either.
        IoMode::Auto => Ok(IoUsed::Pread),
    }
}

/// io_uring: every reader keeps `DEPTH` registered-buffer reads in flight.
/// Parallel: each rayon worker reads its own chunks on its own ring (cached
/// copies then run on every core). Sequential: one reader, reads punted to
/// kernel threads so the copies overlap the hashing.
#[cfg(all(feature = "uring", target_os = "linux"))]
fn hash_uring(read: FileRead<'_>, states: &mut [Box<dyn Algorithm>]) -> io::Result<()> {
    use crate::io::uring;
    let (file, size, chunk) = (read.file, read.size, read.chunk);
    if read.parallel {
        let n = size.div_ceil(chunk as u64);
        let results: Vec<io::Result<Vec<Box<dyn Algorithm>>>> = (0..n)
            .into_par_iter()
            .map(|i| {
                let start = i * chunk as u64;
                let mut st = chunk_states(read.algs, start);
                let end = (start + chunk as u64).min(size);
                uring::read_range(file, start, end, false, &mut |piece| {
                    update_all(&mut st, piece)
                })?;
                Ok(st)
            })
            .collect();
        combine_chunks(states, results)
    } else {
        uring::read_range(file, 0, size, false, &mut |piece| feed(states, piece))
    }
}

#[cfg(not(all(feature = "uring", target_os = "linux")))]
fn hash_uring(_read: FileRead<'_>, _states: &mut [Box<dyn Algorithm>]) -> io::Result<()> {
    unreachable!("uring_available() is false without the feature")
}

/// Hashes a stream (stdin, a pipe) to its end.
///
/// ```
/// use fleetsync_engine::{hash_reader, IoUsed, Registry};
///
/// let registry = Registry::with_builtins();
/// let algs = [registry.info("md5").unwrap()];
/// let hashed = hash_reader(&b"abc"[..], &algs).unwrap();
/// assert_eq!(hashed.digests[0].to_hex(), "900150983cd24fb0d6963f7d28e17f72");
/// assert_eq!(hashed.io, IoUsed::Stream);
/// ```
pub fn hash_reader<R: Read>(reader: R, algs: &[AlgorithmInfo]) -> Result<FileHash, Error> {
    hash_stream(reader, algs).map_err(|source| Error::Io { path: None, source })
}

fn hash_stream<R: Read>(mut reader: R, algs: &[AlgorithmInfo]) -> io::Result<FileHash> {
    let mut states = new_states(algs);
    let mut buf = buf::take();
    let mut size = 0u64;
    let result = loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        };
        feed(&mut states, &buf[..n]);
        size += n as u64;
    };
    buf::give(buf);
    result?;
    Ok(FileHash {
        size,
        digests: states.iter().map(|s| s.finish()).collect(),
        io: IoUsed::Stream,
    })
}

/// The digests of bytes already in memory (a small file read in a batch).
#[cfg_attr(not(all(feature = "uring", target_os = "linux")), allow(dead_code))]
pub(crate) fn hash_bytes(algs: &[AlgorithmInfo], data: &[u8], io: IoUsed) -> FileHash {
    let mut states = new_states(algs);
    feed(&mut states, data);
    FileHash {
        size: data.len() as u64,
        digests: states.iter().map(|s| s.finish()).collect(),
        io,
    }
}

/// Whether every algorithm's chunk states combine at `chunk`-byte splits:
/// the combinable ones always, BLAKE3 at power-of-two sizes (whole subtrees).
fn chunks_combine(algs: &[AlgorithmInfo], chunk: usize) -> bool {
    algs.iter().all(|a| {
        a.combinable || (is_blake3(a) && crate::builtin::Blake3::chunk_size_ok(chunk as u64))
    })
}

fn is_blake3(info: &AlgorithmInfo) -> bool {
    info.instantiate().as_any().is::<crate::builtin::Blake3>()
}

/// Fresh states for the chunk of a file that starts at `offset`.
fn chunk_states(algs: &[AlgorithmInfo], offset: u64) -> Vec<Box<dyn Algorithm>> {
    algs.iter()
        .map(|a| {
            if !a.combinable && is_blake3(a) {
                Box::new(crate::builtin::Blake3::at_offset(offset)) as Box<dyn Algorithm>
            } else {
                a.instantiate()
            }
        })
        .collect()
}

/// Combines the chunk states, in file order, into `states`.
fn combine_chunks(
    states: &mut [Box<dyn Algorithm>],
    chunks: impl IntoIterator<Item = io::Result<Vec<Box<dyn Algorithm>>>>,
) -> io::Result<()> {
    let mut chunks = chunks.into_iter();
    if let Some(first) = chunks.next() {
        // Start from the first chunk itself (a BLAKE3 chunk state knows its
        // offset; a fresh state does not).
        for (s, f) in states.iter_mut().zip(first?) {
            *s = f;
        }
    }
    for st in chunks {
        append(states, &st?)?;
    }
    Ok(())
}

fn new_states(algs: &[AlgorithmInfo]) -> Vec<Box<dyn Algorithm>> {
    algs.iter().map(AlgorithmInfo::instantiate).collect()
}

/// Feeds `data` to every state; big blocks go to the algorithms in parallel.
fn feed(states: &mut [Box<dyn Algorithm>], data: &[u8]) {
    if states.len() > 1 && data.len() >= PAR_ALGS_MIN {
        states.par_iter_mut().for_each(|s| s.update(data));
    } else {
        for s in states {
            s.update(data);
        }
    }
}

/// Appends the chunk states `next` to `acc`, algorithm by algorithm.
fn append(acc: &mut [Box<dyn Algorithm>], next: &[Box<dyn Algorithm>]) -> io::Result<()> {
    for (a, n) in acc.iter_mut().zip(next) {
        a.combine(n.as_ref())
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
    Ok(())
}

/// Reads a file with `read_at` in `SEQ_BLOCK` pieces on this thread, into
/// this thread's pooled buffer, and hashes each piece.
fn read_sync(
    file: &File,
    size: u64,
    states: &mut [Box<dyn Algorithm>],
    read_at: fn(&File, &mut [u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    let mut buf = buf::take();
    let mut offset = 0u64;
    let mut result = Ok(());
    while offset < size {
        let len = (SEQ_BLOCK as u64).min(size - offset) as usize;
        result = read_at(file, &mut buf[..len], offset);
        if result.is_err() {
            break;
        }
        feed(states, &buf[..len]);
        offset += len as u64;
    }
    buf::give(buf);
    result
}

/// Runs `produce` on a reader thread and hashes its blocks, in order, on
/// this one (double buffering).
fn seq_pipeline<P>(states: &mut [Box<dyn Algorithm>], depth: usize, produce: P) -> io::Result<()>
where
    P: FnOnce(&SyncSender<io::Result<Block>>, &Receiver<Block>) + Send,
{
    let (tx, rx) = sync_channel(depth);
    let (free_tx, free_rx) = channel();
    std::thread::scope(|s| {
        s.spawn(move || produce(&tx, &free_rx));
        let mut expect = 0u64;
        for block in rx.iter() {
            let block = block?;
            debug_assert_eq!(block.offset, expect);
            expect += block.len as u64;
            feed(states, block.bytes());
            let _ = free_tx.send(block);
        }
        Ok(())
    })
}

/// Hashes `chunk`-sized pieces with `pread` on the current rayon pool.
fn par_pread(
    file: &File,
    size: u64,
    chunk: usize,
    algs: &[AlgorithmInfo],
    states: &mut [Box<dyn Algorithm>],
) -> io::Result<()> {
    let n = size.div_ceil(chunk as u64);
    let results: Vec<_> = (0..n)
        .into_par_iter()
        .map(|i| pread_chunk(file, size, chunk, i, algs))
        .collect();
    combine_chunks(states, results)
}

/// The states of chunk `i` (of `chunk` bytes) read with `pread`.
///
/// The chunk is read in [`L2_BLOCK`] pieces into the worker's pooled
/// buffer, so a worker holds one buffer whatever the chunk size, and every
/// algorithm reads the piece from cache.
fn pread_chunk(
    file: &File,
    size: u64,
    chunk: usize,
    i: u64,
    algs: &[AlgorithmInfo],
) -> io::Result<Vec<Box<dyn Algorithm>>> {
    let mut buf = buf::take();
    let mut offset = i * chunk as u64;
    let mut st = chunk_states(algs, offset);
    let end = (offset + chunk as u64).min(size);
    let mut read = Ok(());
    while offset < end {
        let len = (L2_BLOCK as u64).min(end - offset) as usize;
        read = pread::read_exact_at(file, &mut buf[..len], offset);
        if read.is_err() {
            break;
        }
        for a in &mut st {
            a.update(&buf[..len]);
        }
        offset += len as u64;
    }
    buf::give(buf);
    read.map(|()| st)
}

/// The states of chunk `i` (of `chunk` bytes) of a mapped file.
fn map_chunk(
    bytes: &[u8],
    chunk: usize,
    i: usize,
    algs: &[AlgorithmInfo],
) -> Vec<Box<dyn Algorithm>> {
    let start = i * chunk;
    let piece = &bytes[start..(start + chunk).min(bytes.len())];
    let mut st = chunk_states(algs, start as u64);
    update_all(&mut st, piece);
    st
}

/// Feeds `data` to every state piece by piece, so that with several
/// algorithms each piece is still in cache for the next one.
fn update_all(states: &mut [Box<dyn Algorithm>], data: &[u8]) {
    if states.len() == 1 {
        states[0].update(data);
        return;
    }
    for piece in data.chunks(L2_BLOCK) {
        for a in states.iter_mut() {
            a.update(piece);
        }
    }
}

/// Hashes through a map of the whole file.
fn hash_mmap(
    map: &crate::io::mmap::GuardedMap,
    chunk: usize,
    parallel: bool,
    algs: &[AlgorithmInfo],
    states: &mut [Box<dyn Algorithm>],
) -> io::Result<()> {
    let bytes = map.bytes();
    if parallel {
        let n = bytes.len().div_ceil(chunk);
        let chunks: Vec<_> = (0..n)
            .into_par_iter()
            .map(|i| Ok(map_chunk(bytes, chunk, i, algs)))
            .collect();
        combine_chunks(states, chunks)?;
    } else {
        for piece in bytes.chunks(chunk.min(SEQ_BLOCK)) {
            feed(states, piece);
        }
    }
    if map.shrank() {
        return Err(pread::shrank());
    }
    Ok(())
}
