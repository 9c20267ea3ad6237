//! The remote's answer to a `basisQuery`: for each file the master may send as a delta, the
//! size and digest of the basis the remote holds (from its checksum cache when it can), an
//! rsync block signature of it unless the master already holds that version, and the partial
//! file an interrupted transfer left for the path. Answered in query order, on a thread of
//! its own while the stream keeps flowing.

use std::collections::HashSet;
use std::sync::Mutex;

use fleetsync_engine::AlgorithmInfo;
use fleetsync_proto::{BasisFound, BasisItem, Msg};
use rayon::prelude::*;
use tracing::debug;

use crate::codec::delta;
use crate::error::show;
use crate::path;
use crate::session::{send_flush, Shared, SharedWriter};

/// Items answered per batch (computed in parallel, sent in order).
const BATCH: usize = 16;

/// Answers `items` with `basisReply` frames; records in `partials` the paths a partial file
/// was found for. A reply that cannot be sent ends the answering (the stream is gone).
pub(crate) fn answer(
    w: &SharedWriter,
    shared: &Shared,
    request_id: u64,
    algorithm: &str,
    items: &[BasisItem],
    partials: &Mutex<HashSet<Vec<u8>>>,
) {
    let info = match shared.registry.info(algorithm) {
        Ok(i) => i,
        Err(e) => {
            // No bases: every file travels whole.
            debug!("basis query: {e}");
            let found = (0..items.len() as u32)
                .map(|index| BasisFound {
                    index,
                    ..BasisFound::default()
                })
                .collect();
            let _ = send_flush(
                w,
                &Msg::BasisReply {
                    request_id,
                    items: found,
                },
            );
            return;
        }
    };
    for (b, batch) in items.chunks(BATCH).enumerate() {
        let found: Vec<BasisFound> = batch
            .par_iter()
            .enumerate()
            .map(|(i, item)| find(shared, &info, (b * BATCH + i) as u32, item))
            .collect();
        {
            let mut p = partials.lock().expect("poisoned");
            for (f, item) in found.iter().zip(batch) {
                if !f.partial_digest.is_empty() {
                    p.insert(item.path.clone());
                }
            }
        }
        let reply = Msg::BasisReply {
            request_id,
            items: found,
        };
        if send_flush(w, &reply).is_err() {
            return;
        }
    }
}

/// What the remote holds for one item.
fn find(shared: &Shared, info: &AlgorithmInfo, index: u32, item: &BasisItem) -> BasisFound {
    let mut f = BasisFound {
        index,
        ..BasisFound::default()
    };
    if path::check(&item.path).is_ok() {
        match shared.backend.open_partial(&item.path) {
            Ok(Some((file, size))) if size > 0 => match digest(info, file) {
                Ok(d) => {
                    f.partial_size = size;
                    f.partial_digest = d;
                }
                Err(e) => debug!("partial file of {}: {e}", show(&item.path)),
            },
            Ok(_) => {}
            Err(e) => debug!("partial file of {}: {e}", show(&item.path)),
        }
    }
    if item.basis.is_empty() || path::check(&item.basis).is_err() {
        return f;
    }
    let (d, size) = match shared.backend.checksum(&item.basis, info, false) {
        Ok(x) => x,
        Err(e) => {
            debug!("basis {}: {e}", show(&item.basis));
            return f;
        }
    };
    let known = item.known.iter().any(|v| v.size == size && v.digest == d);
    if item.signature && !known {
        match shared.backend.open_basis(&item.basis) {
            Ok(mut file) => match delta::signature(&mut file, size) {
                Ok(s) => f.signature = s,
                Err(e) => debug!("signature of {}: {e}", show(&item.basis)),
            },
            Err(e) => debug!("basis {}: {e}", show(&item.basis)),
        }
    }
    f.basis_size = size;
    f.basis_digest = d;
    f
}

/// The digest of an open file, through the engine's reader (as every checksum of the agent).
fn digest(info: &AlgorithmInfo, file: std::fs::File) -> Result<Vec<u8>, String> {
    let hashed = fleetsync_engine::hash_open_file(
        &file,
        std::slice::from_ref(info),
        &fleetsync_engine::HashOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    let d = hashed.digests.first().ok_or("no digest")?;
    Ok(d.as_bytes().to_vec())
}
