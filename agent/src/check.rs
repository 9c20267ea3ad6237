//! The consistency check's answer: runs the agent's checks on the files of a
//! `consistencyRequest` (see [`crate::records`]) and replies with the inconsistent ones.

use fleetsync_proto::{ExpectedFile, Msg};
use tracing::debug;

use crate::session::{flush, send, send_error, send_flush, Shared, SharedWriter};
use crate::AgentError;

/// Inconsistent files per `consistencyReply` frame.
const PER_REPLY: usize = 4096;

/// Answers a `consistencyRequest`.
pub(crate) fn reply(
    w: &SharedWriter,
    shared: &Shared,
    request_id: u64,
    algorithm: &str,
    files: &[ExpectedFile],
) -> Result<(), AgentError> {
    // Records carry the algorithm's own name (as the master's `fileStart` does).
    let algorithm = match shared.registry.info(algorithm) {
        Ok(info) => info.name,
        Err(e) => return send_error(w, request_id, e.to_string()),
    };
    let found = shared.consist.check(&algorithm, files);
    debug!(
        request_id,
        files = files.len(),
        inconsistent = found.len(),
        "consistency check"
    );
    let mut chunks = found.chunks(PER_REPLY).peekable();
    if chunks.peek().is_none() {
        return send_flush(
            w,
            &Msg::ConsistencyReply {
                request_id,
                inconsistent: Vec::new(),
                checked: files.len() as u64,
                last: true,
            },
        );
    }
    let mut first = true;
    while let Some(chunk) = chunks.next() {
        let msg = Msg::ConsistencyReply {
            request_id,
            inconsistent: chunk.to_vec(),
            checked: if first { files.len() as u64 } else { 0 },
            last: chunks.peek().is_none(),
        };
        first = false;
        send(w, &msg)?;
    }
    flush(w)
}
