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
