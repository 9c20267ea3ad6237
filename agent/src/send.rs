//! The sending side of an agent-to-agent file stream (on the master, on a server's
//! `sendOrder`): connects to the remote agent, asks which bases it holds for the files worth
//! a delta (`basisQuery`), streams the files (each along the route [`outgoing::choose`]
//! picks), relays the remote's per-file results to the server, sends again whole any file
//! whose coded data did not verify on the remote, then reports `done`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufReader, Read};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};

use fleetsync_proto::tls::Stream;
use std::str::FromStr;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use fleetsync_engine::{AlgorithmInfo, AlignedBuf};
use fleetsync_proto::{
    auth, frame, BasisFound, BasisItem, Coding, Done, FileEntry, ItemResult, Msg, Outcome,
    Progress, RelayNode, Role, TransferOptions, Version,
};
use tracing::{debug, warn};

use crate::codec::chunk::{ChunkCoder, Compression};
use crate::forward::RELAY;
use crate::lock::{lock_beneath, FileLock, LockKind};
use crate::outgoing::{self, Route, SendError, Start, Wire, DELTA_MAX, DELTA_MIN};
use crate::ratelimit::RateLimiter;
use crate::session::{failed, flush, send, send_flush, ResultBatch, Shared, SharedWriter};
use crate::{path, AgentError};

/// The coding a remote puts on a failed result when the file's data did not verify (a
/// corrupted or stale delta, a corrupted chunk): sending it again whole may succeed.
pub(crate) const RETRY: &str = "retry";

/// How long the master waits for the remote's last results before ending the stream.
const RESULT_WAIT: Duration = Duration::from_secs(600);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Chunks of a relayed stream: each relay of a tree forwards a chunk once it has received it
/// whole, so a chunk's time on a link is the delay each hop adds (128 KiB: 10 ms at
/// 100 Mbit/s, against 84 ms for the 1 MiB chunks of a direct stream). Smaller chunks
/// compress worse, each on its own (the scipy 1.13.0 tree in zstd -3 chunks: 40.2 MB at
/// 128 KiB, 41.2 MB at 64 KiB, 42.9 MB at 32 KiB).
const RELAY_CHUNK: usize = 128 * 1024;

/// Chunks of a relayed stream that are never compressed (patches): a quarter of
/// [`RELAY_CHUNK`], 2.6 ms a hop at 100 Mbit/s, 26 ms at 10 Mbit/s (where a chain of 16
/// remotes waited 1.6 s in all for its 128 KiB chunks).
const RELAY_RAW_CHUNK: usize = 32 * 1024;

/// How often a send order reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// A server's order to stream files to another agent (the `sendOrder` message).
pub(crate) struct SendOrder {
    pub(crate) request_id: u64,
    /// The remote agent, `host:port`.
    pub(crate) target: String,
    /// Checksum algorithm the remote verifies each file with.
    pub(crate) algorithm: String,
    /// The files to send, in order.
    pub(crate) paths: Vec<Vec<u8>>,
    /// `--lock`: lock the master copy (and the remote its destination) with this timeout.
    pub(crate) lock_timeout_ms: Option<u32>,
    /// Block transaction the files are staged in on the remote (empty: none).
    pub(crate) stage: String,
    /// Compression, bandwidth limits, deltas.
    pub(crate) transfer: TransferOptions,
    /// Parallel to `paths` (or empty): the remote file to delta against.
    pub(crate) bases: Vec<Vec<u8>>,
    /// Parallel to `paths` (or empty): sizes in the master's list.
    pub(crate) sizes: Vec<u64>,
    /// With `--tls`: the server's ticket, presented first to the remote.
    pub(crate) ticket: Vec<u8>,
    /// Fan-out: the remotes `target` forwards the stream to (see [`crate::forward`]).
    pub(crate) relays: Vec<RelayNode>,
}

impl SendOrder {
    /// Carries the order out: connects to the target, streams every path, relays the
    /// remote's results; every path gets a result and the order ends with `done`.
    pub(crate) fn run(&self, server: &SharedWriter, shared: &Shared) -> Result<(), AgentError> {
        let info = match shared.registry.info(&self.algorithm) {
            Ok(i) => i,
            Err(e) => return self.fail_all(server, e.to_string()),
        };
        let compression = match self.transfer.compress.as_str() {
            "" => Compression::Auto,
            c => match Compression::from_str(c) {
                Ok(c) => c,
                Err(e) => return self.fail_all(server, format!("--compress: {e}")),
            },
        };
        let remote = match connect(&self.target, shared) {
            Ok(s) => s,
            Err(e) => {
                let why = format!("cannot reach remote agent {}: {e}", self.target);
                return self.fail_all(server, why);
            }
        };
        // A clean stop of this agent closes it (the remote keeps its partial file).
        let _live = shared.live.add(remote.tcp(), false);
        // Over loopback the bytes never meet a link: compressing only costs CPU.
        let compression = match (compression, remote.peer_addr()) {
            (Compression::Auto, Ok(a)) if a.ip().is_loopback() => Compression::Off,
            (c, _) => c,
        };
        let (bases_tx, bases_rx) = channel();
        let relay = Relay::start(&remote, server, bases_tx, self)?;
        let mut limits = Vec::new();
        if self.transfer.master_bwlimit > 0 {
            let rate = self.transfer.master_bwlimit;
            let mut all = shared.master_limits.lock().expect("poisoned");
            // Limits no stream uses any more go (the map holds the only reference).
            all.retain(|_, l| Arc::strong_count(l) > 1);
            let l = all
                .entry(rate)
                .or_insert_with(|| Arc::new(RateLimiter::new(rate)));
            limits.push(l.clone());
        }
        if self.transfer.bwlimit > 0 {
            limits.push(Arc::new(RateLimiter::new(self.transfer.bwlimit)));
        }
        // A relay forwards a chunk once it has all of it: smaller chunks, less delay per hop.
        let chunk = if self.relays.is_empty() {
            frame::MAX_CHUNK
        } else {
            RELAY_CHUNK
        };
        let mut wire = Wire::new(try_clone(&remote)?, limits, ChunkCoder::new(compression));
        wire.max_chunk = chunk;
        wire.max_raw_chunk = if self.relays.is_empty() {
            frame::MAX_CHUNK
        } else {
            RELAY_RAW_CHUNK
        };
        let mut stream = FileStream {
            wire,
            buf: AlignedBuf::new(chunk),
            keeper: Keeper::start(shared, &info.name),
            info,
            order: self,
            relay: relay.state.clone(),
        };
        if !self.ticket.is_empty() {
            let ticket = Msg::StreamTicket {
                ticket: self.ticket.clone(),
            };
            if let Err(e) = stream.wire.frame(&ticket.encode()) {
                let _ = remote.shutdown(Shutdown::Both);
                drop(stream);
                let _ = relay.join();
                return self.fail_all(server, format!("remote agent {}: {e}", self.target));
            }
        }
        let mut local = LocalFailures::default();
        let mut stream_error = None;
        if !self.relays.is_empty() {
            // The target relays the stream to its subtree.
            let forward = Msg::Forward {
                request_id: self.request_id,
                children: self.relays.clone(),
            };
            stream_error = stream.wire.frame(&forward.encode()).err();
        }
        if stream_error.is_none() {
            stream_error = self.stream_all(server, shared, &mut stream, bases_rx, &mut local)?;
        }
        if stream_error.is_none() {
            stream_error = stream.end().err();
        }
        if stream_error.is_some() {
            let _ = remote.shutdown(Shutdown::Both);
        }
        let wire_bytes = stream.wire.data_bytes;
        // (Dropping the stream waits for its keeper: every version kept before the report.)
        drop(stream);
        let relayed = relay.join();
        let _ = remote.shutdown(Shutdown::Both);
        debug!(
            "send order {} to {}: {wire_bytes} bytes of file data on the wire",
            self.request_id, self.target
        );
        self.report(server, local, relayed, stream_error)
    }

    /// The files worth asking the remote about (deltas, partial files), by index: those of
    /// at least [`DELTA_MIN`] bytes. With deltas off (`--no-delta`), the remote is asked for
    /// its partial files only (an interrupted transfer still resumes).
    fn queried(&self) -> Vec<usize> {
        if self.sizes.len() != self.paths.len() {
            return Vec::new();
        }
        (0..self.paths.len())
            .filter(|&i| self.sizes[i] >= DELTA_MIN)
            .collect()
    }

    /// The remote's answer `f` as this order uses it: a staged file starts afresh in its
    /// block's staging directory, and a partial file is one remote's, not its relay
    /// subtree's, so neither resumes one.
    pub(crate) fn adjust_found(&self, mut f: BasisFound) -> BasisFound {
        if !self.stage.is_empty() || !self.relays.is_empty() {
            f.partial_size = 0;
            f.partial_digest.clear();
        }
        f
    }

    /// The remote file to delta path `i` against (empty: none).
    pub(crate) fn basis(&self, i: usize) -> &[u8] {
        self.bases.get(i).map(Vec::as_slice).unwrap_or_default()
    }

    /// The `basisQuery` for the files `queried`.
    fn basis_query(&self, shared: &Shared, queried: &[usize]) -> Msg {
        let known = |p: &[u8]| -> Vec<Version> {
            match &shared.versions {
                Some(v) => v
                    .known(p, &self.algorithm)
                    .into_iter()
                    .map(|(digest, size)| Version { size, digest })
                    .collect(),
                None => Vec::new(),
            }
        };
        let items = queried
            .iter()
            .map(|&i| {
                let p = &self.paths[i];
                if self.transfer.no_delta {
                    // No basis named: the remote looks for the partial file only.
                    return BasisItem {
                        path: p.clone(),
                        basis: Vec::new(),
                        known: Vec::new(),
                        signature: false,
                    };
                }
                let basis = self.basis(i);
                let mut k = known(p);
                if !basis.is_empty() && basis != p.as_slice() {
                    k.extend(known(basis));
                }
                BasisItem {
                    path: p.clone(),
                    basis: basis.to_vec(),
                    known: k,
                    signature: self.sizes[i] <= DELTA_MAX,
                }
            })
            .collect();
        Msg::BasisQuery {
            request_id: self.request_id,
            algorithm: self.algorithm.clone(),
            items,
        }
    }

    /// Answers every path failed with `why` (nothing could be sent).
    fn fail_all(&self, server: &SharedWriter, why: String) -> Result<(), AgentError> {
        warn!("send order {} to {}: {why}", self.request_id, self.target);
        let mut results = ResultBatch::new(server, self.request_id);
        for p in &self.paths {
            results.push(failed(p, why.clone()))?;
        }
        results.finish(Done {
            request_id: self.request_id,
            failed: self.paths.len() as u64,
            ..Done::default()
        })
    }

    /// Streams every path that can be opened; those that cannot go to `local`. Returns why
    /// the connection to the remote broke, if it did.
    fn stream_all(
        &self,
        server: &SharedWriter,
        shared: &Shared,
        stream: &mut FileStream<'_>,
        bases: Receiver<BasisFound>,
        local: &mut LocalFailures,
    ) -> Result<Option<String>, AgentError> {
        let mut progress = ProgressReport {
            server,
            request_id: self.request_id,
            total_items: self.paths.len() as u64,
            items: 0,
            bytes: 0,
            last: Instant::now(),
        };
        // Files worth a delta are asked about first; while the remote looks at its copies,
        // the others go whole; then those, each with the remote's answer.
        let queried = self.queried();
        if !queried.is_empty() {
            let q = self.basis_query(shared, &queried);
            if let Err(e) = stream.wire.frame(&q.encode()) {
                return Ok(Some(e));
            }
            if let Err(e) = stream.wire.flush() {
                return Ok(Some(e));
            }
        }
        let mut is_queried = vec![false; self.paths.len()];
        for &i in &queried {
            is_queried[i] = true;
        }
        let order = (0..self.paths.len())
            .filter(|&i| !is_queried[i])
            .map(|i| (i, None))
            .chain(
                queried
                    .iter()
                    .enumerate()
                    .map(|(q, &i)| (i, Some(q as u32))),
            );
        let info = stream.info.clone();
        crate::ahead::with_patches_ahead(shared, &info, self, &queried, bases, |bases, at| {
            self.stream_files(
                server,
                shared,
                stream,
                order,
                bases,
                at,
                &mut progress,
                local,
            )
        })
    }

    /// Streams the files of `order` (indexes into `paths`, with their query index if
    /// queried), telling `at` where it is; the rest of [`SendOrder::stream_all`].
    #[allow(clippy::too_many_arguments)]
    fn stream_files(
        &self,
        server: &SharedWriter,
        shared: &Shared,
        stream: &mut FileStream<'_>,
        order: impl Iterator<Item = (usize, Option<u32>)>,
        bases: &Receiver<BasisFound>,
        at: &crate::ahead::Position,
        progress: &mut ProgressReport<'_>,
        local: &mut LocalFailures,
    ) -> Result<Option<String>, AgentError> {
        let mut answers = Answers::new(bases);
        for (i, q) in order {
            let p = &self.paths[i];
            if let Some(q) = q {
                at.at(q);
            }
            let found = q.and_then(|q| answers.get(q)).map(|f| self.adjust_found(f));
            let mut source = match self.open_source(shared, p) {
                Ok(x) => x,
                Err(why) => {
                    shared.metrics.failed(1);
                    local.fail(p, why);
                    continue;
                }
            };
            // Progress also within a big file, so that the server sees bytes flowing (its
            // idle timeout) and the progress bar moves.
            let mut in_file = |sent_in_file: u64| {
                if progress.due() {
                    progress.send(sent_in_file)?;
                }
                Ok(())
            };
            let route = {
                let mut bytes = None;
                let route = outgoing::choose(
                    shared,
                    &stream.info,
                    &source.entry,
                    self.basis(i),
                    found.as_ref(),
                    &mut *source.reader,
                    &mut bytes,
                );
                (route, bytes)
            };
            let wire_before = stream.wire.data_bytes;
            match stream.send_file(shared, &mut source, route, &mut in_file) {
                Ok(n) => {
                    progress.bytes += n;
                    let wire = stream.wire.data_bytes - wire_before;
                    shared.metrics.sent(n, wire);
                }
                Err(SendError::Server(e)) => return Err(e),
                Err(SendError::Net(e)) => return Ok(Some(e)),
            }
            drop(source);
            progress.items += 1;
            if progress.due() {
                local.send_pending(server, self.request_id)?;
                progress.send(0)?;
            }
        }
        // Files whose coded data did not verify on the remote go again, whole.
        for p in stream.retries() {
            let mut source = match self.open_source(shared, &p) {
                Ok(x) => x,
                Err(why) => {
                    shared.metrics.failed(1);
                    local.fail(&p, why);
                    continue;
                }
            };
            let mut in_file = |_| Ok(());
            match stream.send_file(shared, &mut source, (Route::Whole, None), &mut in_file) {
                Ok(_) => {}
                Err(SendError::Server(e)) => return Err(e),
                Err(SendError::Net(e)) => return Ok(Some(e)),
            }
        }
        Ok(None)
    }

    /// Opens the master copy of `p` for reading; with `--lock`, shared-locked first (the lock
    /// is held until the file is sent). The error is the item's failure message.
    fn open_source(&self, shared: &Shared, p: &[u8]) -> Result<Source, String> {
        let lock = match self.lock_timeout_ms {
            Some(ms) => lock_beneath(&shared.root, p, LockKind::Shared, ms)?,
            None => None,
        };
        let (reader, entry) = path::check(p)
            .and_then(|()| shared.backend.open_read(p))
            .map_err(|e| e.to_string())?;
        if let Some(l) = &lock {
            // The file read must be the one locked (not a replacement renamed in between).
            let same = l.file().metadata().is_ok_and(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ino() == entry.inode && m.dev() == entry.dev
            });
            if !same {
                return Err("replaced on the master while being locked; sync again".to_owned());
            }
        }
        Ok(Source {
            reader,
            entry,
            _lock: lock,
        })
    }

    /// The order's last word: the master's own failures, a failure for every path the remote
    /// never answered for (the connection broke), then `done` with the totals.
    fn report(
        &self,
        server: &SharedWriter,
        local: LocalFailures,
        (relayed, relay_result): (RelayState, Result<(), String>),
        stream_error: Option<String>,
    ) -> Result<(), AgentError> {
        let why = stream_error
            .or_else(|| relay_result.err())
            .or_else(|| (!relayed.done).then(|| "remote agent closed the connection".to_owned()))
            .unwrap_or_else(|| "no result from the remote agent".into());
        let mut done = Done {
            request_id: self.request_id,
            ok: relayed.ok,
            failed: relayed.failed + local.paths.len() as u64,
            skipped: relayed.skipped,
        };
        let mut results = ResultBatch::new(server, self.request_id);
        for r in local.results {
            results.push(r)?;
        }
        for p in &self.paths {
            if !relayed.reported.contains(p) && !local.paths.contains(p) {
                results.push(failed(p, why.clone()))?;
                done.failed += 1;
            }
        }
        results.send_pending()?;
        self.report_subtree(server, &relayed, &why)?;
        results.finish(done)
    }

    /// For every remote the target relayed to: a failure (coding [`RELAY`], which the
    /// server sends again directly) for each file it did not confirm, then its `done`.
    fn report_subtree(
        &self,
        server: &SharedWriter,
        relayed: &RelayState,
        why: &str,
    ) -> Result<(), AgentError> {
        let mut nodes = Vec::new();
        subtree(&self.relays, &mut nodes);
        for node in nodes {
            let reported = relayed.subtree.get(&node.request_id);
            let mut results = ResultBatch::new(server, node.request_id);
            let mut done = Done {
                request_id: node.request_id,
                ..Done::default()
            };
            if let Some(r) = reported {
                (done.ok, done.failed, done.skipped) = (r.ok, r.failed, r.skipped);
            }
            for p in &self.paths {
                if reported.is_some_and(|r| r.paths.contains(p)) {
                    continue;
                }
                let mut r = failed(p, format!("not received through the relay tree ({why})"));
                r.coding = RELAY.to_owned();
                results.push(r)?;
                done.failed += 1;
            }
            results.finish(done)?;
        }
        Ok(())
    }
}

/// Every node of a relay tree, depth first.
fn subtree<'a>(nodes: &'a [RelayNode], out: &mut Vec<&'a RelayNode>) {
    for n in nodes {
        out.push(n);
        subtree(&n.children, out);
    }
}

/// What one remote of the relay tree answered so far.
#[derive(Default)]
struct SubtreeState {
    paths: HashSet<Vec<u8>>,
    ok: u64,
    failed: u64,
    skipped: u64,
}

/// A master copy open for sending.
struct Source {
    reader: Box<dyn Read + Send>,
    entry: FileEntry,
    /// With `--lock`: the shared lock on it, held until it is sent.
    _lock: Option<FileLock>,
}

/// Paths the master itself could not send, with their results not yet sent to the server.
#[derive(Default)]
struct LocalFailures {
    results: Vec<ItemResult>,
    paths: HashSet<Vec<u8>>,
}

impl LocalFailures {
    fn fail(&mut self, p: &[u8], why: String) {
        self.results.push(failed(p, why));
        self.paths.insert(p.to_vec());
    }

    /// Sends the results gathered so far (the paths stay known as failed).
    fn send_pending(&mut self, server: &SharedWriter, request_id: u64) -> Result<(), AgentError> {
        if self.results.is_empty() {
            return Ok(());
        }
        send(
            server,
            &Msg::ItemResults {
                request_id,
                results: std::mem::take(&mut self.results),
            },
        )
    }
}

/// A send order's progress, reported to the server every [`PROGRESS_EVERY`].
struct ProgressReport<'w> {
    server: &'w SharedWriter,
    request_id: u64,
    total_items: u64,
    /// Files sent so far.
    items: u64,
    /// Bytes of the files sent so far.
    bytes: u64,
    last: Instant,
}

impl ProgressReport<'_> {
    /// True (and the clock restarted) if a report is due.
    fn due(&mut self) -> bool {
        if self.last.elapsed() > PROGRESS_EVERY {
            self.last = Instant::now();
            true
        } else {
            false
        }
    }

    /// Reports, counting `in_file` bytes of the file being sent.
    fn send(&self, in_file: u64) -> Result<(), AgentError> {
        send_flush(
            self.server,
            &Msg::Progress(Progress {
                request_id: self.request_id,
                items: self.items,
                bytes: self.bytes + in_file,
                total_items: self.total_items,
                total_bytes: 0,
            }),
        )
    }
}

/// The remote's answers to the basis query, taken in query order.
struct Answers<'r> {
    rx: &'r Receiver<BasisFound>,
    /// Answers received ahead of the file that needs them.
    ahead: VecDeque<BasisFound>,
    closed: bool,
}

impl<'r> Answers<'r> {
    fn new(rx: &'r Receiver<BasisFound>) -> Self {
        Answers {
            rx,
            ahead: VecDeque::new(),
            closed: false,
        }
    }

    /// The answer for query item `q` (waiting for it); `None` if the remote gave none.
    fn get(&mut self, q: u32) -> Option<BasisFound> {
        loop {
            while let Some(f) = self.ahead.front() {
                if f.index < q {
                    self.ahead.pop_front();
                } else if f.index == q {
                    return self.ahead.pop_front();
                } else {
                    return None;
                }
            }
            if self.closed {
                return None;
            }
            match self.rx.recv() {
                Ok(f) => self.ahead.push_back(f),
                Err(_) => self.closed = true,
            }
        }
    }
}

/// The file stream to the remote agent.
struct FileStream<'o> {
    wire: Wire,
    info: AlgorithmInfo,
    /// One chunk's worth, reused for every file; page-aligned, since the
    /// kernel copies page-cache data into an unaligned buffer several times
    /// slower (see the engine's `AlignedBuf`).
    buf: AlignedBuf,
    order: &'o SendOrder,
    relay: Arc<RelayShared>,
    /// Keeps what was sent in the version store (with `--keep-versions`).
    keeper: Option<Keeper>,
}

impl FileStream<'_> {
    /// Sends one file along `route` (with the bytes `choose` read, if it did); keeps a
    /// copy in the version store. Returns the file bytes covered.
    fn send_file(
        &mut self,
        shared: &Shared,
        source: &mut Source,
        (route, bytes): (Route, Option<Vec<u8>>),
        progress: &mut dyn FnMut(u64) -> Result<(), AgentError>,
    ) -> Result<u64, SendError> {
        let order = self.order;
        let start = Start {
            request_id: order.request_id,
            entry: &source.entry,
            algorithm: &self.info.name,
            lock_timeout_ms: order.lock_timeout_ms,
            stage: &order.stage,
        };
        let sent = outgoing::send_file(
            &mut self.wire,
            &shared.deltas,
            &self.info,
            &mut self.buf,
            &start,
            route,
            &mut *source.reader,
            bytes,
            progress,
        )?;
        self.relay.sent();
        let e = &source.entry;
        if !sent.digest.is_empty() && e.size >= DELTA_MIN && sent.coding != Coding::CopyBasis {
            match (&self.keeper, &shared.versions) {
                (Some(k), _) => k.keep(e, sent.digest),
                (None, Some(store)) => {
                    keep_version(&*shared.backend, store, e, &self.info.name, &sent.digest)
                }
                (None, None) => {}
            }
        }
        Ok(sent.bytes)
    }

    /// Waits until the remote answered for every file sent (or the connection ended);
    /// returns the files to send again whole.
    fn retries(&mut self) -> Vec<Vec<u8>> {
        if let Err(e) = self.wire.flush() {
            debug!("flush before waiting for results: {e}");
            return Vec::new();
        }
        self.relay.wait_all(RESULT_WAIT)
    }

    /// Ends the stream (`streamEnd`) and flushes it.
    fn end(&mut self) -> Result<(), String> {
        self.wire.frame(&Msg::StreamEnd.encode())?;
        self.wire.flush()
    }
}

/// Copies the files a stream sent into the version store on a thread of its own: the copy
/// and its fsync (tens of milliseconds for a big file) would otherwise hold the next file
/// back. The order joins it ([`Keeper::finish`]) before it reports, so the next job finds
/// every version kept.
struct Keeper {
    tx: Option<Sender<(FileEntry, Vec<u8>)>>,
    thread: Option<JoinHandle<()>>,
}

impl Keeper {
    /// The keeper of `shared`'s version store; `None` without one (`--keep-versions`), or if
    /// no thread could be started (then files are kept on the stream's thread).
    fn start(shared: &Shared, algorithm: &str) -> Option<Keeper> {
        let store = shared.versions.clone()?;
        let backend = shared.backend.clone();
        let algorithm = algorithm.to_owned();
        let (tx, rx) = channel::<(FileEntry, Vec<u8>)>();
        let thread = thread::Builder::new()
            .name("agent-keep".into())
            .spawn(move || {
                for (e, digest) in rx {
                    keep_version(&*backend, &store, &e, &algorithm, &digest);
                }
            })
            .ok()?;
        Some(Keeper {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues `e`, sent with content `digest`.
    fn keep(&self, e: &FileEntry, digest: Vec<u8>) {
        if let Some(tx) = &self.tx {
            // (The thread ends only when `tx` is dropped.)
            let _ = tx.send((e.clone(), digest));
        }
    }

    /// Waits until every queued file is kept.
    fn finish(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Keeps the content just sent of `e` in the version store, if the file is still the one
/// sent (same size and mtime). (Should it have changed with both kept, the stored version's
/// content would not match its digest: a patch against it then fails the remote's digest
/// check and the file goes again whole.)
fn keep_version(
    backend: &dyn crate::backend::Backend,
    store: &crate::versions::VersionStore,
    e: &FileEntry,
    algorithm: &str,
    digest: &[u8],
) {
    let Ok(f) = backend.open_basis(&e.path) else {
        return;
    };
    let same = f.metadata().is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.len() == e.size && m.mtime() == e.mtime_sec && m.mtime_nsec() as u32 == e.mtime_nsec
    });
    if same {
        if let Err(err) = store.add(&e.path, algorithm, digest, e.size, &f) {
            debug!("version store: {err}");
        }
    }
}

fn try_clone(s: &Stream) -> Result<Stream, AgentError> {
    s.try_clone().map_err(|e| AgentError::Proto(e.into()))
}

/// What the remote agent answered so far.
#[derive(Default)]
struct RelayState {
    reported: HashSet<Vec<u8>>,
    ok: u64,
    failed: u64,
    skipped: u64,
    bytes: u64,
    done: bool,
    /// Files the master has sent, and results the remote gave for them.
    sent: u64,
    answered: u64,
    /// Files to send again whole, and those already sent again.
    retry: Vec<Vec<u8>>,
    /// Files sent again, with the wire bytes of their first try.
    retried: HashMap<Vec<u8>, u64>,
    /// The relay stopped reading (the remote closed or failed).
    closed: bool,
    /// This order's request id (results under another id are of the relay tree).
    own: u64,
    /// The stream is relayed: a file that did not verify is not sent again on it (the
    /// tree would receive it twice) but reported [`RELAY`] for the server to resend.
    relays: bool,
    /// What each remote of the relay tree answered, by request id.
    subtree: HashMap<u64, SubtreeState>,
}

/// The relay's state, shared with the sender.
#[derive(Default)]
struct RelayShared {
    st: Mutex<RelayState>,
    cv: Condvar,
}

impl RelayShared {
    /// One more file sent.
    fn sent(&self) {
        self.st.lock().expect("poisoned").sent += 1;
    }

    /// Waits (at most `limit`) until every file sent has its result; returns the files to
    /// send again whole.
    fn wait_all(&self, limit: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + limit;
        let mut st = self.st.lock().expect("poisoned");
        while st.answered < st.sent && !st.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self.cv.wait_timeout(st, left).expect("poisoned").0;
        }
        std::mem::take(&mut st.retry)
    }
}

/// The thread relaying the remote agent's results to the server.
struct Relay {
    state: Arc<RelayShared>,
    thread: JoinHandle<Result<(), String>>,
}

impl Relay {
    fn start(
        remote: &Stream,
        server: &SharedWriter,
        bases: Sender<BasisFound>,
        order: &SendOrder,
    ) -> Result<Relay, AgentError> {
        let read_half = try_clone(remote)?;
        let state = Arc::new(RelayShared::default());
        {
            let mut st = state.st.lock().expect("poisoned");
            st.own = order.request_id;
            st.relays = !order.relays.is_empty();
            let mut nodes = Vec::new();
            subtree(&order.relays, &mut nodes);
            for n in nodes {
                st.subtree.insert(n.request_id, SubtreeState::default());
            }
        }
        let thread = {
            let (state, server) = (state.clone(), server.clone());
            thread::Builder::new()
                .name("agent-relay".into())
                .spawn(move || {
                    let r = relay_results(read_half, &server, &state, &bases);
                    state.st.lock().expect("poisoned").closed = true;
                    state.cv.notify_all();
                    r
                })
                .map_err(|e| AgentError::Proto(e.into()))?
        };
        Ok(Relay { state, thread })
    }

    /// Waits for the remote's last answer: what it answered, and why it stopped early if it
    /// did.
    fn join(self) -> (RelayState, Result<(), String>) {
        let r = self
            .thread
            .join()
            .unwrap_or_else(|_| Err("relay thread panicked".into()));
        let state = std::mem::take(&mut *self.state.st.lock().expect("poisoned"));
        (state, r)
    }
}

/// Dials the remote agent `target` and authenticates: TLS first with `--tls` (its
/// certificate must be of role `agent` and name the host of `target`), then the token
/// handshake (inside TLS).
pub(crate) fn connect(target: &str, shared: &Shared) -> Result<Stream, AgentError> {
    let token = shared.token.as_deref();
    let addrs: Vec<_> = target
        .to_socket_addrs()
        .map_err(|e| AgentError::Proto(e.into()))?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                let mut s = match &shared.tls {
                    Some(tls) => {
                        let name = fleetsync_proto::tls::server_name(target)?;
                        Stream::connect(s, &tls.dial, name, CONNECT_TIMEOUT)?
                    }
                    None => Stream::plain(s),
                };
                let _ = s.set_read_timeout(Some(CONNECT_TIMEOUT));
                auth::connect(&mut s, token, Role::Agent)?;
                let _ = s.set_read_timeout(None);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(AgentError::Proto(
        last.unwrap_or_else(|| std::io::Error::other("no address"))
            .into(),
    ))
}
/// Results of a remote of the relay tree (`request_id`): counted, and passed on to the
/// server, whose files failed to verify marked [`RELAY`] for it to send again.
fn subtree_results(
    server: &SharedWriter,
    state: &RelayShared,
    request_id: u64,
    mut results: Vec<ItemResult>,
) -> Result<(), String> {
    {
        let mut st = state.st.lock().expect("poisoned");
        let Some(sub) = st.subtree.get_mut(&request_id) else {
            return Err(format!(
                "results for request {request_id}, not of this relay tree"
            ));
        };
        for r in &mut results {
            if r.outcome == Outcome::Failed && r.coding == RETRY {
                r.coding = RELAY.to_owned();
            }
            match r.outcome {
                Outcome::Ok => sub.ok += 1,
                Outcome::Failed => sub.failed += 1,
                Outcome::Skipped => sub.skipped += 1,
            }
            sub.paths.insert(r.path.clone());
        }
    }
    send(
        server,
        &Msg::ItemResults {
            request_id,
            results,
        },
    )
    .map_err(|e| e.to_string())
}

fn relay_results(
    remote: Stream,
    server: &SharedWriter,
    state: &RelayShared,
    bases: &Sender<BasisFound>,
) -> Result<(), String> {
    let mut r = BufReader::with_capacity(256 * 1024, remote);
    loop {
        let body = match frame::read_frame(&mut r) {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        match Msg::decode(&body).map_err(|e| e.to_string())? {
            Msg::ItemResults {
                request_id,
                mut results,
            } => {
                if request_id != state.st.lock().expect("poisoned").own {
                    subtree_results(server, state, request_id, results)?;
                    if r.buffer().is_empty() {
                        flush(server).map_err(|e| e.to_string())?;
                    }
                    continue;
                }
                {
                    let mut st = state.st.lock().expect("poisoned");
                    let st = &mut *st;
                    st.answered += results.len() as u64;
                    if st.relays {
                        for r in &mut results {
                            if r.outcome == Outcome::Failed && r.coding == RETRY {
                                r.coding = RELAY.to_owned();
                            }
                        }
                    }
                    results.retain_mut(|r| {
                        if let Some(first) = st.retried.get(&r.path) {
                            // The second try: its result counts both tries' bytes.
                            r.wire_bytes += first;
                            return true;
                        }
                        let again = r.outcome == Outcome::Failed && r.coding == RETRY;
                        if again {
                            debug!(
                                "{}: {}; sending it again whole",
                                crate::error::show(&r.path),
                                r.message
                            );
                            st.retried.insert(r.path.clone(), r.wire_bytes);
                            st.retry.push(r.path.clone());
                        }
                        !again
                    });
                    for r in &results {
                        match r.outcome {
                            Outcome::Ok => st.ok += 1,
                            Outcome::Failed => st.failed += 1,
                            Outcome::Skipped => st.skipped += 1,
                        }
                        st.bytes += r.bytes;
                        st.reported.insert(r.path.clone());
                    }
                    state.cv.notify_all();
                }
                if !results.is_empty() {
                    send(
                        server,
                        &Msg::ItemResults {
                            request_id,
                            results,
                        },
                    )
                    .map_err(|e| e.to_string())?;
                }
                if r.buffer().is_empty() {
                    flush(server).map_err(|e| e.to_string())?;
                }
            }
            Msg::BasisReply { items, .. } => {
                for f in items {
                    // The sender may have stopped (the stream broke): nothing to do then.
                    let _ = bases.send(f);
                }
            }
            Msg::Done(_) => {
                state.st.lock().expect("poisoned").done = true;
                return Ok(());
            }
            Msg::Error { message, .. } => return Err(format!("remote agent: {message}")),
            other => {
                return Err(format!(
                    "unexpected '{}' from the remote agent",
                    other.kind_name()
                ))
            }
        }
    }
}
