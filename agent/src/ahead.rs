//! Patches made ahead of the master's stream. A stream sends its files one after another,
//! and a file that goes as a patch has to have it made first (zstd against the old version:
//! about 0.1 s for a 35 MB library), so with one stream the remote waited while the master
//! made each patch on one core. Here workers on the other cores make the patches of the
//! files the stream has not reached yet, as the remote's answers to the basis query arrive
//! (most of them while the stream still sends the files that go whole); the stream finds
//! them made in the delta cache, or waits for the one being made.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use fleetsync_engine::AlgorithmInfo;
use fleetsync_proto::BasisFound;
use tracing::debug;

use crate::outgoing;
use crate::path;
use crate::send::SendOrder;
use crate::session::Shared;

/// How often the thread passing the answers on looks whether the stream is done with them.
const POLL: Duration = Duration::from_millis(2);

/// Workers at most (beside the stream's own thread).
const MAX_WORKERS: usize = 3;

/// Where the stream is: one past the index (in the basis query) of the file it handles now,
/// 0 before the first. Workers skip the files it has reached.
pub(crate) struct Position(AtomicU32);

impl Position {
    /// The stream is at query index `q`.
    pub(crate) fn at(&self, q: u32) {
        self.0.fetch_max(q.saturating_add(1), Ordering::Relaxed);
    }

    fn reached(&self, q: u32) -> bool {
        q < self.0.load(Ordering::Relaxed)
    }
}

/// Runs `stream` (given the remote's answers, `bases`, and where to say it is) with workers
/// making the patches of the files `queried` of `order` ahead of it. Without a version store
/// (no patches to make) or a second core, `stream` runs alone on `bases`.
pub(crate) fn with_patches_ahead<R>(
    shared: &Shared,
    info: &AlgorithmInfo,
    order: &SendOrder,
    queried: &[usize],
    bases: Receiver<BasisFound>,
    stream: impl FnOnce(&Receiver<BasisFound>, &Position) -> R,
) -> R {
    let position = Position(AtomicU32::new(0));
    let workers = thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .min(MAX_WORKERS);
    if queried.is_empty() || shared.versions.is_none() || workers == 0 {
        return stream(&bases, &position);
    }
    // (Held by the thread passing the answers on; a Receiver is not shared otherwise.)
    let bases = Mutex::new(bases);
    let stop = AtomicBool::new(false);
    let (to_workers, jobs) = channel::<BasisFound>();
    let jobs = Mutex::new(jobs);
    thread::scope(|sc| {
        let (to_stream, answers) = channel::<BasisFound>();
        let (stop, bases) = (&stop, &bases);
        let spawned = thread::Builder::new()
            .name("agent-answers".into())
            .spawn_scoped(sc, move || {
                // Every answer to the workers and to the stream, until the remote's answers
                // end or the stream is done.
                let bases = bases.lock().expect("poisoned");
                while !stop.load(Ordering::Relaxed) {
                    match bases.recv_timeout(POLL) {
                        Ok(f) => {
                            let _ = to_workers.send(f.clone());
                            if to_stream.send(f).is_err() {
                                break;
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            });
        if let Err(e) = spawned {
            debug!("no thread for patches ahead: {e}");
            return stream(&bases.lock().expect("poisoned"), &position);
        }
        for n in 0..workers {
            let (jobs, position) = (&jobs, &position);
            let spawned = thread::Builder::new()
                .name("agent-ahead".into())
                .spawn_scoped(sc, move || loop {
                    let job = jobs.lock().expect("poisoned").recv();
                    let Ok(found) = job else { break };
                    if stop.load(Ordering::Relaxed) || position.reached(found.index) {
                        continue; // the stream is there already
                    }
                    let Some(&i) = queried.get(found.index as usize) else {
                        continue;
                    };
                    let p = &order.paths[i];
                    let Ok((mut reader, entry)) =
                        path::check(p).and_then(|()| shared.backend.open_read(p))
                    else {
                        continue; // (the stream reports it)
                    };
                    let found = order.adjust_found(found);
                    outgoing::make_ahead(
                        shared,
                        info,
                        &entry,
                        order.basis(i),
                        &found,
                        &mut *reader,
                    );
                });
            if let Err(e) = spawned {
                debug!("patches ahead: worker {n} not started: {e}");
                break;
            }
        }
        // However the stream ends (a panic too), the threads stop: the scope waits for them.
        let _stop = StopOnDrop(stop);
        stream(&answers, &position)
    })
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::mpsc::channel;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use fleetsync_proto::{BasisFound, TransferOptions};

    use super::with_patches_ahead;
    use crate::outgoing::{BasisKey, DeltaKey};
    use crate::send::SendOrder;
    use crate::versions::VersionStore;

    const FILES: [&str; 3] = ["a.bin", "sub/b.bin", "c.bin"];

    fn content(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i / 4096) as u8)
            .collect()
    }

    fn crc32(b: &[u8]) -> Vec<u8> {
        let info = fleetsync_engine::Registry::with_builtins()
            .info("crc32")
            .unwrap();
        let mut st = info.instantiate();
        st.update(b);
        st.finish().as_bytes().to_vec()
    }

    /// A master tree whose files changed since the versions its store keeps: the order to
    /// send them and the remote's answers (each remote file is the kept old version).
    fn master(dir: &Path) -> (crate::Agent, SendOrder, Vec<BasisFound>) {
        let root = dir.join("tree");
        let store = Arc::new(VersionStore::open(&dir.join("versions"), 1 << 30).unwrap());
        let mut answers = Vec::new();
        for (i, p) in FILES.iter().enumerate() {
            let old = content(i as u8, 300_000 + i * 1000);
            let mut new = old.clone();
            new[1000..1100].fill(0xee);
            let f = root.join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(&f, &old).unwrap();
            let digest = crc32(&old);
            let src = std::fs::File::open(&f).unwrap();
            store
                .add(p.as_bytes(), "crc32", &digest, old.len() as u64, &src)
                .unwrap();
            std::fs::write(&f, &new).unwrap();
            answers.push(BasisFound {
                index: i as u32,
                basis_size: old.len() as u64,
                basis_digest: digest,
                ..BasisFound::default()
            });
        }
        let agent = crate::Agent::new(&root, None, None)
            .unwrap()
            .with_versions(store);
        let paths: Vec<Vec<u8>> = FILES.iter().map(|p| p.as_bytes().to_vec()).collect();
        let order = SendOrder {
            request_id: 1,
            target: "unused:1".into(),
            algorithm: "crc32".into(),
            paths: paths.clone(),
            lock_timeout_ms: None,
            stage: String::new(),
            transfer: TransferOptions::default(),
            bases: paths,
            sizes: answers.iter().map(|a| a.basis_size + 1000).collect(),
            ticket: Vec::new(),
            relays: Vec::new(),
        };
        (agent, order, answers)
    }

    #[test]
    fn patches_are_made_ahead_and_the_stream_gets_every_answer_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, order, answers) = master(dir.path());
        let shared = agent.shared();
        let (tx, rx) = channel();
        for a in &answers {
            tx.send(a.clone()).unwrap();
        }
        let keys: Vec<DeltaKey> = FILES
            .iter()
            .zip(&answers)
            .map(|(p, a)| {
                let (_, entry) = shared.backend.open_read(p.as_bytes()).unwrap();
                let basis = BasisKey {
                    size: a.basis_size,
                    digest: a.basis_digest.clone(),
                };
                DeltaKey::new(&entry, true, &basis)
            })
            .collect();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (done_tx, done_rx) = channel();
        // `tx` stays open all along, as the remote's connection does while the stream runs:
        // the call must come back anyway.
        let worker = std::thread::spawn(move || {
            let info = shared.registry.info("crc32").unwrap();
            let queried: Vec<usize> = (0..FILES.len()).collect();
            let got = with_patches_ahead(&shared, &info, &order, &queried, rx, |answers, _at| {
                let got: Vec<u32> = (0..FILES.len())
                    .map(|_| answers.recv_timeout(Duration::from_secs(10)).unwrap().index)
                    .collect();
                // The stream has not reached any file: the workers make every patch.
                let deadline = Instant::now() + Duration::from_secs(20);
                while cores > 1
                    && !keys.iter().all(|k| shared.deltas.made(k))
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let made = keys.iter().filter(|k| shared.deltas.made(k)).count();
                (got, made)
            });
            let _ = done_tx.send(got);
        });
        let (got, made) = done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("with_patches_ahead did not return while the answers' sender was open");
        worker.join().unwrap();
        drop(tx);
        assert_eq!(got, vec![0, 1, 2], "answers out of order or missing");
        if cores > 1 {
            assert_eq!(made, FILES.len(), "patches not made ahead of the stream");
        } else {
            eprintln!("one core: no workers, nothing made ahead (checked: the stream ran)");
        }
    }

    #[test]
    fn a_panicking_stream_does_not_leave_the_scope_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, order, answers) = master(dir.path());
        let shared = agent.shared();
        let (tx, rx) = channel();
        tx.send(answers[0].clone()).unwrap();
        let (done_tx, done_rx) = channel();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let info = shared.registry.info("crc32").unwrap();
                with_patches_ahead(&shared, &info, &order, &[0, 1, 2], rx, |_, _| -> () {
                    panic!("the stream failed")
                })
            }));
            let _ = done_tx.send(r.is_err());
        });
        let panicked = done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the scope waited on its threads after the stream panicked");
        drop(tx);
        assert!(panicked, "the stream's panic was not passed on");
    }
}
