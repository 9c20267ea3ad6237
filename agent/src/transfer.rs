//! Agent-to-agent file streaming: the master's sending side (on a send order)
//! and the remote's receiving side.

use std::collections::{BTreeSet, HashSet};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use fleetsync_engine::Algorithm;
use fleetsync_proto::fleetsync_capnp::message::Which as W;
use fleetsync_proto::{
    auth, encode_file_chunk, fleetsync_capnp, frame, Attrs, Done, FileEntry, ItemResult, Msg,
    Outcome, Progress, ProtoError, Role,
};
use tracing::{debug, warn};

use crate::backend::TempFile;
use crate::checkserve::ConsistState;
use crate::error::show;
use crate::journal::RelPath;
use crate::lock::{FileLock, LockError, LockKind, LockOptions};
use crate::server::{flush, send, send_flush, Shared, SharedWriter};
use crate::{path, AgentError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct RelayState {
    reported: HashSet<Vec<u8>>,
    ok: u64,
    failed: u64,
    skipped: u64,
    bytes: u64,
    done: bool,
}

/// Locks `p` beneath `root` for `--lock`; `Ok(None)` if there is no such file or it is a
/// symlink (nothing a reader could have locked: readers lock what a link points to). The
/// error is the [`LockError`] text, which names the holders.
fn lock_beneath(
    root: &std::path::Path,
    p: &[u8],
    kind: LockKind,
    timeout_ms: u32,
) -> Result<Option<FileLock>, String> {
    use std::os::unix::ffi::OsStrExt;
    let rel = RelPath::new(std::ffi::OsStr::from_bytes(p)).map_err(|e| e.to_string())?;
    let opts = LockOptions {
        timeout: Duration::from_millis(timeout_ms.into()),
        ..LockOptions::default()
    };
    match FileLock::open_beneath(root, &rel, kind, &opts) {
        Ok(l) => Ok(Some(l)),
        Err(LockError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound
                || source.raw_os_error() == Some(libc::ELOOP) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The result of an item that failed with `message`.
pub(crate) fn failed(path: &[u8], message: String) -> ItemResult {
    ItemResult {
        path: path.to_vec(),
        outcome: Outcome::Failed,
        message,
        bytes: 0,
        digest: Vec::new(),
    }
}

/// Master side: connects to `target`, streams `paths`, relays the remote's
/// per-file results to the server, then reports `done`.
#[allow(clippy::too_many_arguments)] // the send order's fields
pub(crate) fn send_files(
    server: &SharedWriter,
    shared: &Shared,
    request_id: u64,
    target: &str,
    algorithm: &str,
    paths: &[Vec<u8>],
    lock_timeout_ms: Option<u32>,
    stage: &str,
) -> Result<(), AgentError> {
    let total = paths.len() as u64;
    let fail_all = |why: String| -> Result<(), AgentError> {
        warn!("send order {request_id} to {target}: {why}");
        for chunk in paths.chunks(1024) {
            let results = chunk.iter().map(|p| failed(p, why.clone())).collect();
            send(
                server,
                &Msg::ItemResults {
                    request_id,
                    results,
                },
            )?;
        }
        send_flush(
            server,
            &Msg::Done(Done {
                request_id,
                failed: total,
                ..Done::default()
            }),
        )
    };
    let info = match shared.registry.info(algorithm) {
        Ok(i) => i,
        Err(e) => return fail_all(e.to_string()),
    };
    let remote = match connect(target, shared.token.as_deref()) {
        Ok(s) => s,
        Err(e) => return fail_all(format!("cannot reach remote agent {target}: {e}")),
    };
    let state = Arc::new(Mutex::new(RelayState::default()));
    let relay = {
        let read_half = remote
            .try_clone()
            .map_err(|e| AgentError::Proto(e.into()))?;
        let state = state.clone();
        let server = server.clone();
        thread::Builder::new()
            .name("agent-relay".into())
            .spawn(move || relay_results(read_half, &server, &state))
            .map_err(|e| AgentError::Proto(e.into()))?
    };

    let mut out = BufWriter::with_capacity(
        1 << 20,
        remote
            .try_clone()
            .map_err(|e| AgentError::Proto(e.into()))?,
    );
    let mut local_failures: Vec<ItemResult> = Vec::new();
    let mut local_failed: HashSet<Vec<u8>> = HashSet::new();
    let mut buf = vec![0u8; frame::MAX_CHUNK];
    let mut stream_error: Option<String> = None;
    let mut last_progress = Instant::now();
    let (mut items, mut bytes) = (0u64, 0u64);
    for p in paths {
        // With --lock: a shared lock on the master copy, held until the file is sent.
        let lock =
            match lock_timeout_ms.map(|ms| lock_beneath(&shared.root, p, LockKind::Shared, ms)) {
                Some(Err(e)) => {
                    local_failures.push(failed(p, e));
                    local_failed.insert(p.clone());
                    continue;
                }
                Some(Ok(lock)) => lock,
                None => None,
            };
        let opened = path::check(p).and_then(|()| shared.backend.open_read(p));
        let (mut reader, entry) = match opened {
            Ok(x) => x,
            Err(e) => {
                local_failures.push(failed(p, e.to_string()));
                local_failed.insert(p.clone());
                continue;
            }
        };
        if let Some(l) = &lock {
            // The file read must be the one locked (not a replacement renamed in between).
            let same = l.file().metadata().is_ok_and(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ino() == entry.inode && m.dev() == entry.dev
            });
            if !same {
                let why = "replaced on the master while being locked; sync again".to_owned();
                local_failures.push(failed(p, why));
                local_failed.insert(p.clone());
                continue;
            }
        }
        // Progress also within a big file, so that the server sees bytes
        // flowing (its idle timeout) and the progress bar moves.
        let mut in_file = |sent_in_file: u64| -> Result<(), AgentError> {
            if last_progress.elapsed() > PROGRESS_EVERY {
                last_progress = Instant::now();
                send_flush(
                    server,
                    &Msg::Progress(Progress {
                        request_id,
                        items,
                        bytes: bytes + sent_in_file,
                        total_items: total,
                        total_bytes: 0,
                    }),
                )?;
            }
            Ok(())
        };
        match stream_file(
            &mut out,
            &mut *reader,
            &entry,
            request_id,
            &info,
            &mut buf,
            &mut in_file,
            lock_timeout_ms,
            stage,
        ) {
            Ok(n) => bytes += n,
            Err(StreamError::Server(e)) => return Err(e),
            Err(StreamError::Net(e)) => {
                stream_error = Some(e);
                break;
            }
        }
        drop(lock);
        items += 1;
        if last_progress.elapsed() > PROGRESS_EVERY {
            last_progress = Instant::now();
            if !local_failures.is_empty() {
                send(
                    server,
                    &Msg::ItemResults {
                        request_id,
                        results: std::mem::take(&mut local_failures),
                    },
                )?;
            }
            send_flush(
                server,
                &Msg::Progress(Progress {
                    request_id,
                    items,
                    bytes,
                    total_items: total,
                    total_bytes: 0,
                }),
            )?;
        }
    }
    if stream_error.is_none() {
        let r = frame::write_frame(&mut out, &Msg::StreamEnd.encode())
            .map_err(|e| e.to_string())
            .and_then(|()| out.flush().map_err(|e| e.to_string()));
        if let Err(e) = r {
            stream_error = Some(e);
        }
    }
    if stream_error.is_some() {
        let _ = remote.shutdown(std::net::Shutdown::Both);
    }
    drop(out);
    let relay_result = relay
        .join()
        .unwrap_or_else(|_| Err("relay thread panicked".into()));
    let _ = remote.shutdown(std::net::Shutdown::Both);
    let st = state.lock().expect("poisoned");
    let why = stream_error
        .or_else(|| relay_result.err())
        .or_else(|| (!st.done).then(|| "remote agent closed the connection".to_owned()));
    let mut done = Done {
        request_id,
        ok: st.ok,
        failed: st.failed + local_failed.len() as u64,
        skipped: st.skipped,
    };
    // Paths the remote never answered for (the connection broke).
    let why = why.unwrap_or_else(|| "no result from the remote agent".into());
    for p in paths {
        if !st.reported.contains(p) && !local_failed.contains(p) {
            local_failures.push(failed(p, why.clone()));
            done.failed += 1;
        }
    }
    drop(st);
    for chunk in local_failures.chunks(1024) {
        send(
            server,
            &Msg::ItemResults {
                request_id,
                results: chunk.to_vec(),
            },
        )?;
    }
    send_flush(server, &Msg::Done(done))
}

enum StreamError {
    /// The connection to the remote agent failed.
    Net(String),
    /// The connection to the server failed.
    Server(AgentError),
}

/// How often a send order reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Sends one file; a read error mid-file becomes an aborted `fileEnd` (the
/// remote discards it). Returns the bytes sent.
#[allow(clippy::too_many_arguments)] // the send loop's state, passed down once per file
fn stream_file(
    out: &mut BufWriter<TcpStream>,
    reader: &mut dyn Read,
    entry: &FileEntry,
    request_id: u64,
    info: &fleetsync_engine::AlgorithmInfo,
    buf: &mut [u8],
    progress: &mut dyn FnMut(u64) -> Result<(), AgentError>,
    lock_timeout_ms: Option<u32>,
    stage: &str,
) -> Result<u64, StreamError> {
    let net = |e: ProtoError| StreamError::Net(e.to_string());
    frame::write_frame(
        out,
        &Msg::FileStart {
            request_id,
            entry: entry.clone(),
            algorithm: info.name.clone(),
            lock_timeout_ms,
            stage: stage.to_owned(),
        }
        .encode(),
    )
    .map_err(net)?;
    let mut state: Box<dyn Algorithm> = info.instantiate();
    let mut sent = 0u64;
    let mut read_error = None;
    loop {
        // Fill the chunk as far as possible (fewer, bigger frames).
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    read_error = Some(e.to_string());
                    break;
                }
            }
        }
        if filled > 0 {
            state.update(&buf[..filled]);
            frame::write_frame(out, &encode_file_chunk(&buf[..filled])).map_err(net)?;
            sent += filled as u64;
            progress(sent).map_err(StreamError::Server)?;
        }
        if filled < buf.len() || read_error.is_some() {
            break;
        }
    }
    let end = match read_error {
        None => Msg::FileEnd {
            size: sent,
            digest: state.finish().as_bytes().to_vec(),
            aborted: false,
            error: String::new(),
        },
        Some(e) => Msg::FileEnd {
            size: sent,
            digest: Vec::new(),
            aborted: true,
            error: format!("read failed on the master: {e}"),
        },
    };
    frame::write_frame(out, &end.encode()).map_err(net)?;
    Ok(sent)
}

fn connect(target: &str, token: Option<&[u8]>) -> Result<TcpStream, AgentError> {
    let addrs: Vec<_> = target
        .to_socket_addrs()
        .map_err(|e| AgentError::Proto(e.into()))?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(mut s) => {
                let _ = s.set_nodelay(true);
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

fn relay_results(
    remote: TcpStream,
    server: &SharedWriter,
    state: &Mutex<RelayState>,
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
                results,
            } => {
                {
                    let mut st = state.lock().expect("poisoned");
                    for r in &results {
                        match r.outcome {
                            Outcome::Ok => st.ok += 1,
                            Outcome::Failed => st.failed += 1,
                            Outcome::Skipped => st.skipped += 1,
                        }
                        st.bytes += r.bytes;
                        st.reported.insert(r.path.clone());
                    }
                }
                send(
                    server,
                    &Msg::ItemResults {
                        request_id,
                        results,
                    },
                )
                .map_err(|e| e.to_string())?;
                if r.buffer().is_empty() {
                    flush(server).map_err(|e| e.to_string())?;
                }
            }
            Msg::Done(_) => {
                state.lock().expect("poisoned").done = true;
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

/// The file being received.
struct Incoming {
    entry: FileEntry,
    temp: Option<Box<dyn TempFile>>,
    state: Option<Box<dyn Algorithm>>,
    received: u64,
    error: Option<String>,
    /// `--lock`: exclusive-lock the destination while replacing it.
    lock_timeout_ms: Option<u32>,
    /// Algorithm of the digest (for the write log).
    algorithm: String,
    /// Block transaction the file is staged in (empty: put in place at once).
    stage: String,
}

/// Remote side: receives files from a master agent until `streamEnd`.
pub(crate) fn receive(
    reader: &mut BufReader<TcpStream>,
    w: &SharedWriter,
    shared: &Shared,
) -> Result<(), AgentError> {
    let backend = &shared.backend;
    let mut cur: Option<Incoming> = None;
    let mut committer = Committer::new(w.clone(), COMMIT_THREADS, shared.consist.clone());
    let mut fb = frame::FrameBuf::new();
    loop {
        if !fb.read(reader, frame::MAX_FRAME)? {
            // Cut off: whatever was in flight is dropped (its temp file removed).
            return Err(AgentError::Proto(ProtoError::Truncated));
        }
        let msg = fb.parse()?;
        let root: fleetsync_capnp::message::Reader<'_> =
            msg.get_root().map_err(ProtoError::from)?;
        if let W::FileChunk(c) = root.which().map_err(ProtoError::from)? {
            let data = c.and_then(|c| c.get_data()).map_err(ProtoError::from)?;
            let Some(inc) = cur.as_mut() else {
                return Err(AgentError::Proto(ProtoError::Decode(
                    "fileChunk outside a file".into(),
                )));
            };
            if inc.error.is_none() {
                if let Some(t) = inc.temp.as_mut() {
                    if let Err(e) = t.write_all(data) {
                        inc.error = Some(format!("write: {e}"));
                        inc.temp = None;
                    }
                }
                if let Some(s) = inc.state.as_mut() {
                    s.update(data);
                }
            }
            inc.received += data.len() as u64;
            continue;
        }
        match Msg::from_reader(root)? {
            Msg::FileStart {
                request_id,
                entry,
                algorithm,
                lock_timeout_ms,
                stage,
            } => {
                if cur.is_some() {
                    return Err(AgentError::Proto(ProtoError::Decode(
                        "fileStart inside a file".into(),
                    )));
                }
                committer.state.lock().expect("poisoned").done.request_id = request_id;
                let mut inc = Incoming {
                    entry,
                    temp: None,
                    state: None,
                    received: 0,
                    error: None,
                    // A staged file replaces nothing until its block commits.
                    lock_timeout_ms: lock_timeout_ms.filter(|_| stage.is_empty()),
                    algorithm: algorithm.clone(),
                    stage: stage.clone(),
                };
                let p = inc.entry.path.clone();
                let prepared = path::check(&p)
                    .and_then(|()| {
                        shared
                            .registry
                            .info(&algorithm)
                            .map_err(|e| AgentError::Engine(e.to_string()))
                    })
                    .and_then(|info| {
                        let temp = if stage.is_empty() {
                            backend.create_temp(&p)?
                        } else {
                            crate::blockserve::stage_file(shared, &stage, &p)?
                        };
                        Ok((info, temp))
                    });
                match prepared {
                    Ok((info, temp)) => {
                        inc.state = Some(info.instantiate());
                        inc.temp = Some(temp);
                    }
                    Err(e) => inc.error = Some(e.to_string()),
                }
                cur = Some(inc);
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
                let p = inc.entry.path.clone();
                let lock = inc.lock_timeout_ms.map(|ms| (shared.root.clone(), ms));
                let algorithm = inc.algorithm.clone();
                let stage = inc.stage.clone();
                match verify_file(inc, size, &digest, aborted, error) {
                    Ok((temp, attrs)) => committer.submit(CommitJob {
                        temp,
                        attrs,
                        path: p,
                        size,
                        lock,
                        algorithm,
                        digest,
                        stage,
                    })?,
                    Err(e) => {
                        debug!("receive {}: {e}", show(&p));
                        committer.state.lock().expect("poisoned").done.failed += 1;
                        send(
                            w,
                            &Msg::ItemResults {
                                request_id: committer.request_id(),
                                results: vec![failed(&p, e)],
                            },
                        )?;
                        if reader.buffer().is_empty() {
                            flush(w)?;
                        }
                    }
                }
            }
            Msg::StreamEnd => {
                let (done, dirs) = committer.finish();
                for d in &dirs {
                    if let Err(e) = backend.sync_dir(d) {
                        warn!("{e}");
                    }
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

/// Checks a completely received file; returns it ready to commit.
fn verify_file(
    inc: Incoming,
    size: u64,
    digest: &[u8],
    aborted: bool,
    error: String,
) -> Result<(Box<dyn TempFile>, Attrs), String> {
    if let Some(e) = inc.error {
        return Err(e);
    }
    if aborted {
        return Err(if error.is_empty() {
            "aborted by the sender".into()
        } else {
            error
        });
    }
    if inc.received != size {
        return Err(format!(
            "received {} bytes, sender sent {size}",
            inc.received
        ));
    }
    let got = inc
        .state
        .as_ref()
        .map(|s| s.finish())
        .ok_or("no checksum state")?;
    if got.as_bytes() != digest {
        return Err("checksum mismatch: the file changed or was corrupted in transit".into());
    }
    let e = &inc.entry;
    let attrs = Attrs {
        mode: Some(e.mode),
        owner: Some((e.uid, e.gid)),
        mtime: Some((e.mtime_sec, e.mtime_nsec)),
    };
    let temp = inc.temp.ok_or("no temporary file")?;
    Ok((temp, attrs))
}

/// Threads committing verified files (fsync, attributes, rename) so that the
/// disk flushes of many files overlap while the stream keeps flowing.
const COMMIT_THREADS: usize = 8;

struct CommitJob {
    temp: Box<dyn TempFile>,
    attrs: Attrs,
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
}

#[derive(Default)]
struct CommitState {
    done: Done,
    dirs: BTreeSet<Vec<u8>>,
    owner_noted: bool,
}

struct Committer {
    tx: Option<std::sync::mpsc::SyncSender<CommitJob>>,
    workers: Vec<thread::JoinHandle<()>>,
    state: Arc<Mutex<CommitState>>,
}

impl Committer {
    fn new(w: SharedWriter, threads: usize, consist: Arc<ConsistState>) -> Committer {
        let (tx, rx) = std::sync::mpsc::sync_channel::<CommitJob>(threads * 2);
        let rx = Arc::new(Mutex::new(rx));
        let state = Arc::new(Mutex::new(CommitState::default()));
        let workers = (0..threads)
            .filter_map(|_| {
                let (rx, state, w) = (rx.clone(), state.clone(), w.clone());
                let consist = consist.clone();
                thread::Builder::new()
                    .name("agent-commit".into())
                    .spawn(move || loop {
                        let job = rx.lock().expect("poisoned").recv();
                        let Ok(job) = job else { return };
                        commit_one(job, &state, &w, &consist);
                    })
                    .ok()
            })
            .collect();
        Committer {
            tx: Some(tx),
            workers,
            state,
        }
    }

    fn request_id(&self) -> u64 {
        self.state.lock().expect("poisoned").done.request_id
    }

    fn submit(&self, job: CommitJob) -> Result<(), AgentError> {
        if self.workers.is_empty() {
            // No thread could be started.
            return Err(AgentError::Proto(ProtoError::Io(std::io::Error::other(
                "no commit threads",
            ))));
        }
        self.tx
            .as_ref()
            .expect("open until finish")
            .send(job)
            .map_err(|_| {
                AgentError::Proto(ProtoError::Io(std::io::Error::other("commit threads gone")))
            })
    }

    /// Waits for every commit; returns the totals and the directories written to.
    fn finish(&mut self) -> (Done, BTreeSet<Vec<u8>>) {
        self.tx = None;
        for t in self.workers.drain(..) {
            let _ = t.join();
        }
        let mut st = self.state.lock().expect("poisoned");
        (st.done, std::mem::take(&mut st.dirs))
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        // Files already verified are still committed when the stream breaks.
        self.finish();
    }
}

fn commit_one(
    job: CommitJob,
    state: &Mutex<CommitState>,
    w: &SharedWriter,
    consist: &ConsistState,
) {
    let CommitJob {
        temp,
        attrs,
        path,
        size,
        lock,
        algorithm,
        digest,
        stage,
    } = job;
    let record = |path: &[u8]| {
        if stage.is_empty() {
            consist.record(path, &algorithm, &digest);
        } else {
            consist.record_staged(&stage, path, &algorithm, &digest);
        }
    };
    // With --lock: an exclusive lock on the existing destination (cooperating readers hold
    // shared locks on it) while the new file is renamed over it.
    let r = match lock.map(|(root, ms)| lock_beneath(&root, &path, LockKind::Exclusive, ms)) {
        Some(Err(e)) => Err(e),
        Some(Ok(guard)) => {
            let r = temp.commit(&attrs).map_err(|e| e.to_string());
            if r.is_ok() {
                record(&path);
            }
            drop(guard);
            r
        }
        None => {
            let r = temp.commit(&attrs).map_err(|e| e.to_string());
            if r.is_ok() {
                record(&path);
            }
            r
        }
    };
    let (result, request_id) = {
        let mut st = state.lock().expect("poisoned");
        let result = match r {
            Ok(applied) => {
                st.done.ok += 1;
                st.dirs.insert(path::split(&path).0.to_vec());
                let message = if applied.owner_skipped && !st.owner_noted {
                    st.owner_noted = true;
                    "owner/group not applied: the agent is not running as root".to_owned()
                } else {
                    String::new()
                };
                ItemResult {
                    path,
                    outcome: Outcome::Ok,
                    message,
                    bytes: size,
                    digest,
                }
            }
            Err(e) => {
                st.done.failed += 1;
                failed(&path, e)
            }
        };
        (result, st.done.request_id)
    };
    let _ = send_flush(
        w,
        &Msg::ItemResults {
            request_id,
            results: vec![result],
        },
    );
}
