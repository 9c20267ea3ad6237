//! The checksum reply: digests computed where the data lives, in parallel.

use fleetsync_proto::Msg;
use rayon::prelude::*;

use crate::session::{send_error, send_flush, Shared, SharedWriter};
use crate::{path, AgentError};

/// Answers a `checksumRequest`: each path's digest in `algorithm` (or why not), in
/// `checksumReply` frames; `fresh` reads the data even when a digest is cached.
pub(crate) fn reply(
    w: &SharedWriter,
    shared: &Shared,
    request_id: u64,
    algorithm: &str,
    paths: &[Vec<u8>],
    fresh: bool,
) -> Result<(), AgentError> {
    let info = match shared.registry.info(algorithm) {
        Ok(i) => i,
        Err(e) => return send_error(w, request_id, e.to_string()),
    };
    const CHUNK: usize = 4096;
    let chunks: Vec<&[Vec<u8>]> = paths.chunks(CHUNK).collect();
    if chunks.is_empty() {
        return send_flush(
            w,
            &Msg::ChecksumReply {
                request_id,
                results: Vec::new(),
                last: true,
            },
        );
    }
    let n = chunks.len();
    let started = std::time::Instant::now();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let results = chunk
            .par_iter()
            .map(|p| {
                let r = path::check(p).and_then(|()| shared.backend.checksum(p, &info, fresh));
                match r {
                    Ok((digest, size)) => fleetsync_proto::ChecksumResult {
                        path: p.clone(),
                        size,
                        digest: Ok(digest),
                    },
                    Err(e) => fleetsync_proto::ChecksumResult {
                        path: p.clone(),
                        size: 0,
                        digest: Err(e.to_string()),
                    },
                }
            })
            .collect();
        send_flush(
            w,
            &Msg::ChecksumReply {
                request_id,
                results,
                last: i + 1 == n,
            },
        )?;
    }
    shared.backend.checksums_done();
    shared
        .metrics
        .checksummed(paths.len() as u64, started.elapsed());
    Ok(())
}
