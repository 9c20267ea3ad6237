//! The file list: answers a `listRequest` with the tree's entries, in batches.

use fleetsync_proto::Msg;
use fleetsync_select::{Classification, Decision};

use crate::session::{send, Shared, SharedWriter};
use crate::AgentError;

/// Entries per `listBatch` unless the server asks otherwise.
pub const DEFAULT_BATCH: usize = 4096;

/// The most entries per `listBatch`, whatever the server asks.
const MAX_BATCH: usize = 65536;

/// Entries per `listBatch` for a request asking `requested` (0: the default).
pub(crate) fn batch_size(requested: u32) -> usize {
    if requested == 0 {
        DEFAULT_BATCH
    } else {
        (requested as usize).min(MAX_BATCH)
    }
}

/// Answers a `listRequest`: the tree's entries that `spec` selects, in `listBatch` frames of
/// `batch`, each regular file with its cached digest in `cached_digests` (an algorithm name;
/// empty: none). The classification is compiled once here, for the whole listing.
pub(crate) fn list(
    w: &SharedWriter,
    shared: &Shared,
    request_id: u64,
    spec: &fleetsync_proto::ClassificationSpec,
    batch: usize,
    cached_digests: &str,
) -> Result<(), AgentError> {
    let class = Classification::from(spec);
    let matcher = class
        .compile()
        .map_err(|e| AgentError::Engine(format!("bad classification: {e}")))?;
    let everything = class.is_everything();
    let decide = move |p: &[u8], is_dir: bool| {
        if everything {
            Decision::Include
        } else {
            matcher.decide(p, is_dir)
        }
    };
    let mut entries = Vec::with_capacity(batch);
    shared
        .backend
        .list_with_digests(&decide, cached_digests, &mut |e| {
            entries.push(e);
            if entries.len() >= batch {
                let msg = Msg::ListBatch {
                    request_id,
                    entries: std::mem::take(&mut entries),
                    last: false,
                };
                send(w, &msg)?;
                // The same buffer for the next batch: a fresh one of this size is a new
                // mapping (above the agent's mmap threshold) and page faults to fill.
                if let Msg::ListBatch { entries: mut e, .. } = msg {
                    e.clear();
                    entries = e;
                }
            }
            Ok(())
        })?;
    send(
        w,
        &Msg::ListBatch {
            request_id,
            entries,
            last: true,
        },
    )
}
