//! The receiving side of an agent-to-agent file stream (on the remote): each file is
//! reconstructed (whole chunks, compressed or not; a zstd patch or an rsync delta against a
//! basis file; the rest of a partial file; a copy of a basis) into a temporary file (or a
//! block's staging directory), verified (size and checksum against the master's), then
//! committed in groups (attributes; one flush of the group; renames; one fsync per
//! directory; see [`Committer`]) on a thread of its own and recorded in the write log.
//! A stream cut mid-file keeps what arrived as the path's partial file, for the next sync to
//! continue. A file whose data does not verify is reported with coding [`RETRY`]: the master
//! sends it again whole.

use std::collections::{BTreeSet, HashSet};
use std::io::{BufReader, Read, Write};
use std::sync::{Arc, Mutex};
use std::thread;

use fleetsync_engine::Algorithm;
use fleetsync_proto::fleetsync_capnp::message::Which as W;
use fleetsync_proto::tls::Stream;
use fleetsync_proto::{
    fleetsync_capnp, frame, Attrs, Coding, Done, FileEntry, ItemResult, Msg, Outcome, ProtoError,
};
use tracing::{debug, warn};

use crate::backend::{FinishedTemp, TempFile};
use crate::codec::chunk::ChunkDecoder;
use crate::codec::delta::DeltaApplier;
use crate::codec::patch::PatchDecoder;
use crate::error::show;
use crate::forward::Forwarder;
use crate::lock::{lock_beneath, LockKind};
use crate::metrics::AgentMetrics;
use crate::records::ConsistState;
use crate::send::RETRY;
use crate::session::{failed, flush, send, send_flush, Shared, SharedWriter, OWNER_NOTE};
use crate::{bases, path, AgentError};

/// A cut stream keeps a file's bytes as its partial file from this many on.
const KEEP_PARTIAL_FROM: u64 = 1 << 20;

/// Where a file's reconstructed bytes go: the temp file and the checksum state.
struct Sink {
    temp: Option<Box<dyn TempFile>>,
    state: Option<Box<dyn Algorithm>>,
    received: u64,
    /// Why the file failed, and whether sending it again whole may help.
    error: Option<(String, bool)>,
}

impl Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        if let Some(t) = self.temp.as_mut() {
            t.write_all(data)?;
        }
        self.wrote(data);
        Ok(())
    }

    /// Bytes that are in the temp file already (written through its mapping): hashed and
    /// counted.
    fn wrote(&mut self, data: &[u8]) {
        if let Some(s) = self.state.as_mut() {
            s.update(data);
        }
        self.received += data.len() as u64;
    }

    fn fail(&mut self, why: String, retry: bool) {
        if self.error.is_none() {
            self.error = Some((why, retry));
            self.temp = None;
        }
    }
}

/// How chunks become the file's bytes.
enum Decoder {
    /// The chunks are the bytes (whole, append).
    Plain,
    /// One zstd frame against the basis.
    Patch(PatchDecoder),
    /// rsync instructions against the basis.
    Delta(DeltaApplier),
    /// No chunks (copy of the basis, or the file failed at its start).
    None,
}

/// The file being received.
struct Incoming {
    entry: FileEntry,
    sink: Sink,
    decoder: Decoder,
    coding: Coding,
    /// Some chunk was zstd-compressed.
    zstd: bool,
    /// Bytes of chunk data received.
    wire: u64,
    /// `--lock`: exclusive-lock the destination while replacing it.
    lock_timeout_ms: Option<u32>,
    /// Algorithm of the digest (for the write log).
    algorithm: String,
    /// Block transaction the file is staged in (empty: put in place at once).
    stage: String,
}

/// Remote side: receives files from a master agent until `streamEnd`.
/// With `allowed` (the paths of the stream's ticket, `--tls`), a `fileStart` for any other
/// path closes the stream.
pub(crate) fn receive(
    reader: &mut BufReader<Stream>,
    w: &SharedWriter,
    shared: &Arc<Shared>,
    allowed: Option<&HashSet<Vec<u8>>>,
) -> Result<(), AgentError> {
    let mut cur: Option<Incoming> = None;
    let mut committer = Committer::new(w.clone(), shared.clone());
    let r = receive_files(reader, w, shared, &mut cur, &mut committer, allowed);
    if r.is_err() {
        // Cut off: what arrived of the file in flight is kept as its partial file (or
        // dropped, its temp file removed).
        if let Some(inc) = cur.take() {
            inc.keep_partial();
        }
    }
    r
}

fn receive_files(
    reader: &mut BufReader<Stream>,
    w: &SharedWriter,
    shared: &Arc<Shared>,
    cur: &mut Option<Incoming>,
    committer: &mut Committer,
    allowed: Option<&HashSet<Vec<u8>>>,
) -> Result<(), AgentError> {
    let backend = &shared.backend;
    let mut fb = frame::FrameBuf::new();
    let mut chunks = ChunkDecoder::new();
    // Paths the basis query found a partial file for: removed when sent otherwise.
    let partials: Arc<Mutex<HashSet<Vec<u8>>>> = Default::default();
    let mut answering: Option<thread::JoinHandle<()>> = None;
    // A relay (the stream began with `forward`): its children, and the request id its own
    // results go under.
    let mut relay: Option<(Forwarder, u64)> = None;
    let mut first = true;
    loop {
        if !fb.read(reader, frame::MAX_FRAME)? {
            // Cut off: whatever was in flight is dropped (its temp file removed).
            return Err(AgentError::Proto(ProtoError::Truncated));
        }
        let msg = fb.parse()?;
        let root: fleetsync_capnp::message::Reader<'_> =
            msg.get_root().map_err(ProtoError::from)?;
        let which = root.which().map_err(ProtoError::from)?;
        if let Some((fwd, _)) = &relay {
            // Passed on before it is handled here: the children do not wait for our disk.
            if matches!(
                which,
                W::FileChunk(_) | W::FileStart(_) | W::FileEnd(_) | W::StreamEnd(())
            ) {
                fwd.frame(fb.bytes());
            }
        }
        let was_first = std::mem::replace(&mut first, false);
        if let W::FileChunk(c) = which {
            let c = c.map_err(ProtoError::from)?;
            let data = c.get_data().map_err(ProtoError::from)?;
            let Some(inc) = cur.as_mut() else {
                return Err(AgentError::Proto(ProtoError::Decode(
                    "fileChunk outside a file".into(),
                )));
            };
            inc.take_chunk(data, c.get_zstd(), &mut chunks);
            continue;
        }
        match Msg::from_reader(root)? {
            Msg::Forward {
                request_id,
                children,
            } => {
                if !was_first {
                    return Err(AgentError::Proto(ProtoError::Decode(
                        "forward after the start of a stream".into(),
                    )));
                }
                let fwd = Forwarder::start(&children, shared, w);
                relay = Some((fwd, request_id));
            }
            Msg::BasisQuery {
                request_id,
                algorithm,
                items,
            } => {
                if answering.is_some() {
                    return Err(AgentError::Proto(ProtoError::Decode(
                        "a second basisQuery on one stream".into(),
                    )));
                }
                let (w, shared, partials) = (w.clone(), shared.clone(), partials.clone());
                answering = Some(
                    thread::Builder::new()
                        .name("agent-bases".into())
                        .spawn(move || {
                            bases::answer(&w, &shared, request_id, &algorithm, &items, &partials)
                        })
                        .map_err(|e| AgentError::Proto(e.into()))?,
                );
            }
            Msg::FileStart {
                request_id,
                entry,
                algorithm,
                lock_timeout_ms,
                stage,
                coding,
                basis,
                basis_size,
            } => {
                if cur.is_some() {
                    return Err(AgentError::Proto(ProtoError::Decode(
                        "fileStart inside a file".into(),
                    )));
                }
                if allowed.is_some_and(|a| !a.contains(&entry.path)) {
                    let message = format!(
                        "refused {}: the server's ticket for this stream does not cover it",
                        show(&entry.path)
                    );
                    let _ = send_flush(
                        w,
                        &Msg::Error {
                            request_id: 0,
                            message: message.clone(),
                        },
                    );
                    return Err(AgentError::Proto(ProtoError::Remote(message)));
                }
                if coding != Coding::Append
                    && partials.lock().expect("poisoned").remove(&entry.path)
                {
                    // The master sent it otherwise: its partial file is of no more use.
                    let _ = backend.remove_partial(&entry.path);
                }
                // In a relay tree each remote reports under its own request id.
                let request_id = relay.as_ref().map_or(request_id, |r| r.1);
                committer.state.lock().expect("poisoned").done.request_id = request_id;
                *cur = Some(Incoming::start(
                    shared,
                    entry,
                    algorithm,
                    lock_timeout_ms,
                    stage,
                    (coding, basis, basis_size),
                ));
            }
            Msg::FileEnd {
                size,
                digest,
                aborted,
                error,
            } => {
                let Some(inc) = cur.take() else {
                    return Err(AgentError::Proto(ProtoError::Decode(
                        "fileEnd outside a file".into(),
                    )));
                };
                match inc.into_job(shared, size, digest, aborted, error) {
                    Ok(job) => committer.submit(w, job)?,
                    Err((p, why, retry, wire)) => {
                        debug!("receive {}: {why}", show(&p));
                        committer.report_failure(w, &p, why, retry, wire)?;
                        if reader.buffer().is_empty() {
                            flush(w)?;
                        }
                    }
                }
            }
            Msg::StreamEnd => {
                if let Some(t) = answering.take() {
                    let _ = t.join();
                }
                // Every group's renames are durable already (see commit_group).
                let mut done = committer.finish();
                if let Some((fwd, request_id)) = relay.as_mut() {
                    // Every result of the subtree goes up before this relay's `done`.
                    fwd.finish();
                    done.request_id = *request_id;
                }
                shared.consist.sync_log();
                send_flush(w, &Msg::Done(done))?;
                return Ok(());
            }
            other => {
                return Err(AgentError::Proto(ProtoError::Unexpected {
                    expected: "a file stream message",
                    got: other.kind_name(),
                }))
            }
        }
    }
}

impl Incoming {
    /// Prepares to receive `entry`, coded as `coding` (against `basis`; `basis_size`: the
    /// partial file's bytes to keep): its temporary file (or staged file, in block
    /// transaction `stage`), decoder and checksum state. What fails here is kept and
    /// reported at the file's end.
    fn start(
        shared: &Shared,
        entry: FileEntry,
        algorithm: String,
        lock_timeout_ms: Option<u32>,
        stage: String,
        (coding, basis, basis_size): (Coding, Vec<u8>, u64),
    ) -> Incoming {
        let p = entry.path.clone();
        let mut inc = Incoming {
            entry,
            sink: Sink {
                temp: None,
                state: None,
                received: 0,
                error: None,
            },
            decoder: Decoder::None,
            coding,
            zstd: false,
            wire: 0,
            // A staged file replaces nothing until its block commits.
            lock_timeout_ms: lock_timeout_ms.filter(|_| stage.is_empty()),
            algorithm,
            stage,
        };
        let info = match path::check(&p).and_then(|()| {
            shared
                .registry
                .info(&inc.algorithm)
                .map_err(|e| AgentError::Engine(e.to_string()))
        }) {
            Ok(i) => i,
            Err(e) => {
                inc.sink.fail(e.to_string(), false);
                return inc;
            }
        };
        let mut state = info.instantiate();
        if coding == Coding::Append {
            // The partial file's first `basis_size` bytes stay: hashed here, then appended to.
            match resume(shared, &p, basis_size, &mut *state) {
                Ok(temp) => {
                    inc.sink.temp = Some(temp);
                    inc.sink.received = basis_size;
                    inc.sink.state = Some(state);
                    inc.decoder = Decoder::Plain;
                }
                Err(why) => inc.sink.fail(why, true),
            }
            return inc;
        }
        let temp = if inc.stage.is_empty() {
            shared.backend.create_temp(&p)
        } else {
            let can_chown = shared.backend.can_chown();
            shared.stages.stage_file(&inc.stage, &p, can_chown)
        };
        match temp {
            Ok(t) => {
                inc.sink.temp = Some(t);
                inc.sink.state = Some(state);
            }
            Err(e) => {
                inc.sink.fail(e.to_string(), false);
                return inc;
            }
        }
        let open_basis = || {
            path::check(&basis)
                .and_then(|()| shared.backend.open_basis(&basis))
                .map_err(|e| format!("basis {}: {e}", show(&basis)))
        };
        match coding {
            Coding::Whole | Coding::Append => inc.decoder = Decoder::Plain,
            Coding::Patch => match open_basis().and_then(|f| {
                PatchDecoder::new(f).map_err(|e| format!("basis {}: {e}", show(&basis)))
            }) {
                Ok(mut d) => {
                    // Straight into the temp file when it is one (no copy, no window of
                    // zstd's own); written through it otherwise.
                    let size = inc.entry.size;
                    if let Some(file) = inc
                        .sink
                        .temp
                        .as_ref()
                        .and_then(|t| t.file())
                        .filter(|_| size > 0)
                    {
                        if let Err(e) = d.decode_into(file, size) {
                            debug!("patch of {} not decoded in place: {e}", show(&p));
                        }
                    }
                    inc.decoder = Decoder::Patch(d);
                }
                Err(why) => inc.sink.fail(why, true),
            },
            Coding::Delta => match open_basis() {
                Ok(f) => inc.decoder = Decoder::Delta(DeltaApplier::new(f)),
                Err(why) => inc.sink.fail(why, true),
            },
            Coding::CopyBasis => match open_basis() {
                Ok(mut f) => {
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        match f.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                if let Err(e) = inc.sink.write(&buf[..n]) {
                                    inc.sink.fail(format!("write: {e}"), false);
                                    break;
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                inc.sink.fail(format!("basis {}: {e}", show(&basis)), true);
                                break;
                            }
                        }
                    }
                }
                Err(why) => inc.sink.fail(why, true),
            },
        }
        inc
    }

    /// Takes the next chunk of the file's data (`zstd`: one compressed frame of it).
    fn take_chunk(&mut self, data: &[u8], zstd: bool, chunks: &mut ChunkDecoder) {
        self.wire += data.len() as u64;
        if self.sink.error.is_some() {
            return;
        }
        let raw = if zstd {
            self.zstd = true;
            match chunks.decode(data, frame::MAX_CHUNK) {
                Ok(r) => r,
                Err(e) => return self.sink.fail(format!("corrupted chunk: {e}"), true),
            }
        } else {
            data
        };
        let sink = &mut self.sink;
        let r = match &mut self.decoder {
            Decoder::Plain => sink.write(raw).map_err(|e| (format!("write: {e}"), false)),
            Decoder::Patch(d) => {
                // Decoded in place, the bytes are in the temp file already.
                let in_place = d.in_place();
                d.feed(raw, &mut |out| {
                    if !in_place {
                        return sink.write(out);
                    }
                    sink.wrote(out);
                    Ok(())
                })
                .map_err(|e| (format!("patch: {e}"), true))
            }
            Decoder::Delta(d) => d
                .feed(raw, &mut |out| sink.write(out))
                .map_err(|e| (format!("delta: {e}"), true)),
            Decoder::None => Err(("data for a file that takes none".to_owned(), true)),
        };
        if let Err((why, retry)) = r {
            self.sink.fail(why, retry);
        }
    }

    /// A cut stream: keeps what arrived of a whole (or resumed) file as its partial file,
    /// when worth it.
    fn keep_partial(self) {
        let worth = matches!(self.coding, Coding::Whole | Coding::Append)
            && self.stage.is_empty()
            && self.sink.error.is_none()
            && self.sink.received >= KEEP_PARTIAL_FROM;
        if let (true, Some(t)) = (worth, self.sink.temp) {
            match t.keep_as_partial() {
                Ok(true) => debug!(
                    "kept {} bytes of {} for the next sync",
                    self.sink.received,
                    show(&self.entry.path)
                ),
                Ok(false) => {}
                Err(e) => debug!("partial file of {}: {e}", show(&self.entry.path)),
            }
        }
    }

    /// How the file travelled, for its result.
    fn coding_name(&self) -> &'static str {
        match self.coding {
            Coding::Whole if self.zstd => "zstd",
            Coding::Whole => "whole",
            Coding::Patch => "patch",
            Coding::Delta => "delta",
            Coding::Append => "resume",
            Coding::CopyBasis => "copy",
        }
    }

    /// The file ended (`fileEnd` with `size`, `digest`, `aborted`, `error`): checked, it is
    /// ready to commit; otherwise its path, why it failed, whether to send it again and its
    /// bytes on the wire.
    fn into_job(
        mut self,
        shared: &Shared,
        size: u64,
        digest: Vec<u8>,
        aborted: bool,
        error: String,
    ) -> Result<Verified, (Vec<u8>, String, bool, u64)> {
        let path = self.entry.path.clone();
        let lock = self.lock_timeout_ms.map(|ms| (shared.root.clone(), ms));
        let (algorithm, stage) = (self.algorithm.clone(), self.stage.clone());
        let coding = self.coding_name();
        let wire = self.wire;
        let finished = match std::mem::replace(&mut self.decoder, Decoder::None) {
            Decoder::Patch(d) => d.finish().map_err(|e| format!("patch: {e}")),
            Decoder::Delta(d) => d.finish().map_err(|e| format!("delta: {e}")),
            Decoder::Plain | Decoder::None => Ok(()),
        };
        if let Err(why) = finished {
            self.sink.fail(why, true);
        }
        match self.verify(size, &digest, aborted, error) {
            Ok((temp, attrs)) => Ok((
                temp,
                attrs,
                CommitJob {
                    path,
                    size,
                    lock,
                    algorithm,
                    digest,
                    stage,
                    wire,
                    coding,
                    owner_skipped: false,
                },
            )),
            Err((why, retry)) => Err((path, why, retry, wire)),
        }
    }

    /// Checks the completely received file; returns it with its attributes.
    fn verify(
        self,
        size: u64,
        digest: &[u8],
        aborted: bool,
        error: String,
    ) -> Result<(Box<dyn TempFile>, Attrs), (String, bool)> {
        if let Some(e) = self.sink.error {
            return Err(e);
        }
        if aborted {
            return Err((
                if error.is_empty() {
                    "aborted by the sender".into()
                } else {
                    error
                },
                false,
            ));
        }
        let retry = self.coding != Coding::Whole || self.zstd;
        if self.sink.received != size {
            return Err((
                format!("received {} bytes, sender sent {size}", self.sink.received),
                retry,
            ));
        }
        let got = self
            .sink
            .state
            .as_ref()
            .map(|s| s.finish())
            .ok_or(("no checksum state".to_owned(), false))?;
        if got.as_bytes() != digest {
            return Err((
                "checksum mismatch: the file changed or was corrupted in transit".into(),
                true,
            ));
        }
        let e = &self.entry;
        let attrs = Attrs {
            mode: Some(e.mode),
            owner: Some((e.uid, e.gid)),
            mtime: Some((e.mtime_sec, e.mtime_nsec)),
        };
        let temp = self
            .sink
            .temp
            .ok_or(("no temporary file".to_owned(), false))?;
        Ok((temp, attrs))
    }
}

/// Turns `p`'s partial file into the temp file being written, after hashing its first
/// `keep` bytes into `state` (it must hold exactly that many).
fn resume(
    shared: &Shared,
    p: &[u8],
    keep: u64,
    state: &mut dyn Algorithm,
) -> Result<Box<dyn TempFile>, String> {
    let (mut f, size) = shared
        .backend
        .open_partial(p)
        .map_err(|e| format!("partial file: {e}"))?
        .ok_or("the partial file is gone")?;
    if size != keep {
        return Err(format!("the partial file has {size} bytes, not {keep}"));
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut left = keep;
    while left > 0 {
        let n = f
            .read(&mut buf[..left.min(1 << 20) as usize])
            .map_err(|e| format!("partial file: {e}"))?;
        if n == 0 {
            return Err("the partial file shrank".into());
        }
        state.update(&buf[..n]);
        left -= n as u64;
    }
    let (temp, at) = shared
        .backend
        .create_temp_from_partial(p)
        .map_err(|e| format!("partial file: {e}"))?
        .ok_or("the partial file is gone")?;
    if at != keep {
        return Err(format!("the partial file has {at} bytes, not {keep}"));
    }
    Ok(temp)
}

/// Files of one commit group at most: the group is what arrived while the previous group
/// was being flushed (so groups grow as the disk lags), up to this many.
const GROUP_FILES: usize = 1024;
/// Bytes of one commit group at most (one big file makes a group of its own).
const GROUP_BYTES: u64 = 64 << 20;

/// A verified file: its temp, the attributes to give it, and the rest of its commit.
type Verified = (Box<dyn TempFile>, Attrs, CommitJob);

/// A verified file (its temp and attributes go separately: see [`Committer::submit`]).
struct CommitJob {
    path: Vec<u8>,
    size: u64,
    /// `--lock`: the tree root and the lock timeout.
    lock: Option<(std::path::PathBuf, u32)>,
    /// The verified digest, recorded in the write log once committed.
    algorithm: String,
    digest: Vec<u8>,
    /// Block transaction of a staged file (empty: none): its record waits for the block's
    /// commit, when the file is actually in place.
    stage: String,
    /// Bytes of its data on the wire, and how it travelled.
    wire: u64,
    coding: &'static str,
    /// The owner could not be applied (set when finished).
    owner_skipped: bool,
}

/// A verified file whose temp is finished ([`TempFile::finish`]: attributes applied,
/// closed), waiting in the commit queue for its group's flush.
struct Finished {
    file: Box<dyn FinishedTemp>,
    job: CommitJob,
}

struct CommitState {
    done: Done,
    owner_noted: bool,
    metrics: Arc<AgentMetrics>,
}

/// Commits verified files in groups, on a thread of its own so that the stream keeps
/// flowing meanwhile: a group's temp files are made durable together (one flush,
/// [`Backend::make_durable`]), then renamed into place, then their directories fsynced
/// once, then recorded in the write log and reported in one `itemResults` frame. So a file
/// never shows under its real name before its bytes are durable, for one flush per group
/// instead of one per file (with 200,000 files of 0..49 bytes, the per-file fsync had made
/// the copy 1.8x slower than `rsync -a`).
///
/// [`Backend::make_durable`]: crate::backend::Backend::make_durable
struct Committer {
    tx: Option<std::sync::mpsc::SyncSender<Finished>>,
    worker: Option<thread::JoinHandle<()>>,
    state: Arc<Mutex<CommitState>>,
}

impl Committer {
    fn new(w: SharedWriter, shared: Arc<Shared>) -> Committer {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Finished>(GROUP_FILES);
        let state = Arc::new(Mutex::new(CommitState {
            done: Done::default(),
            owner_noted: false,
            metrics: shared.metrics.clone(),
        }));
        let st = state.clone();
        let worker = thread::Builder::new()
            .name("agent-commit".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut bytes = first.job.size;
                    let mut group = vec![first];
                    while group.len() < GROUP_FILES && bytes < GROUP_BYTES {
                        match rx.try_recv() {
                            Ok(f) => {
                                bytes += f.job.size;
                                group.push(f);
                            }
                            Err(_) => break,
                        }
                    }
                    commit_group(group, &st, &w, &shared);
                }
            })
            .ok();
        Committer {
            tx: Some(tx),
            worker,
            state,
        }
    }

    fn request_id(&self) -> u64 {
        self.state.lock().expect("poisoned").done.request_id
    }

    /// Counts and reports (unflushed) a file that failed before its commit.
    /// With `retry`, the master may send the file again whole.
    fn report_failure(
        &self,
        w: &SharedWriter,
        path: &[u8],
        why: String,
        retry: bool,
        wire: u64,
    ) -> Result<(), AgentError> {
        let mut r = failed(path, why);
        r.wire_bytes = wire;
        if retry {
            r.coding = RETRY.to_owned();
        }
        {
            let mut st = self.state.lock().expect("poisoned");
            st.done.failed += 1;
            st.metrics.received(&r);
        }
        send(
            w,
            &Msg::ItemResults {
                request_id: self.request_id(),
                results: vec![r],
            },
        )
    }

    /// Finishes the job's temp file (attributes, close) here, and queues it for its group.
    fn submit(&self, w: &SharedWriter, (temp, attrs, job): Verified) -> Result<(), AgentError> {
        if self.worker.is_none() {
            // The thread could not be started.
            return Err(AgentError::Proto(ProtoError::Io(std::io::Error::other(
                "no commit thread",
            ))));
        }
        let (file, applied) = match temp.finish(&attrs) {
            Ok(f) => f,
            Err(e) => {
                debug!("commit {}: {e}", show(&job.path));
                self.state.lock().expect("poisoned").done.failed += 1;
                return send(
                    w,
                    &Msg::ItemResults {
                        request_id: self.request_id(),
                        results: vec![failed(&job.path, e.to_string())],
                    },
                );
            }
        };
        self.tx
            .as_ref()
            .expect("open until finish")
            .send(Finished {
                file,
                job: CommitJob {
                    owner_skipped: applied.owner_skipped,
                    ..job
                },
            })
            .map_err(|_| {
                AgentError::Proto(ProtoError::Io(std::io::Error::other("commit thread gone")))
            })
    }

    /// Waits for every commit; returns the totals.
    fn finish(&mut self) -> Done {
        self.tx = None;
        if let Some(t) = self.worker.take() {
            let _ = t.join();
        }
        self.state.lock().expect("poisoned").done
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        // Files already verified are still committed when the stream breaks.
        self.finish();
    }
}

/// Commits one group: one flush, the renames, one fsync per directory, the records, one
/// `itemResults` frame.
fn commit_group(
    group: Vec<Finished>,
    state: &Mutex<CommitState>,
    w: &SharedWriter,
    shared: &Shared,
) {
    let (files, jobs): (Vec<_>, Vec<_>) = group.into_iter().map(|f| (f.file, f.job)).unzip();
    // Their bytes durable before any of them shows under its real name.
    let durable = shared
        .backend
        .make_durable(&files)
        .map_err(|e| e.to_string());
    let mut results = Vec::with_capacity(jobs.len());
    let mut dirs: BTreeSet<&[u8]> = BTreeSet::new();
    let mut outcomes = Vec::with_capacity(jobs.len());
    for (file, job) in files.into_iter().zip(&jobs) {
        // A file not published is dropped: its temp is removed.
        let r = durable
            .clone()
            .and_then(|()| publish(file, job, &shared.consist));
        if r.is_ok() && job.stage.is_empty() {
            dirs.insert(path::split(&job.path).0);
        }
        outcomes.push(r);
    }
    // The renames durable before they are reported.
    for d in dirs {
        if let Err(e) = shared.backend.sync_dir(d) {
            warn!("{e}");
        }
    }
    let request_id = {
        let mut st = state.lock().expect("poisoned");
        for (r, job) in outcomes.into_iter().zip(jobs) {
            results.push(match r {
                Ok(()) => {
                    st.done.ok += 1;
                    let message = if job.owner_skipped && !st.owner_noted {
                        st.owner_noted = true;
                        OWNER_NOTE.to_owned()
                    } else {
                        String::new()
                    };
                    ItemResult {
                        path: job.path,
                        outcome: Outcome::Ok,
                        message,
                        bytes: job.size,
                        digest: job.digest,
                        wire_bytes: job.wire,
                        coding: job.coding.to_owned(),
                    }
                }
                Err(e) => {
                    st.done.failed += 1;
                    failed(&job.path, e)
                }
            });
        }
        for r in &results {
            st.metrics.received(r);
        }
        st.done.request_id
    };
    let _ = send_flush(
        w,
        &Msg::ItemResults {
            request_id,
            results,
        },
    );
}

/// Puts one durable file in place (with `--lock`, under an exclusive lock on the existing
/// destination, which cooperating readers hold shared) and records it.
fn publish(
    file: Box<dyn FinishedTemp>,
    job: &CommitJob,
    consist: &ConsistState,
) -> Result<(), String> {
    let guard = match &job.lock {
        Some((root, ms)) => Some(
            lock_beneath(root, &job.path, LockKind::Exclusive, *ms).map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let stat = file.stat();
    file.publish().map_err(|e| e.to_string())?;
    if job.stage.is_empty() {
        match stat {
            Some(st) => consist.record_finished(&job.path, &job.algorithm, &job.digest, st),
            None => consist.record(&job.path, &job.algorithm, &job.digest),
        }
    } else {
        consist.record_staged(&job.stage, &job.path, &job.algorithm, &job.digest);
    }
    drop(guard);
    Ok(())
}
