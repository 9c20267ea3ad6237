//! Tree operations outside a file stream (`applyRequest`): mkdir, delete, attributes, links.

use fleetsync_proto::{Attrs, Done, FileKind, Op, OpKind};
use tracing::debug;

use crate::backend::Applied;
use crate::error::show;
use crate::session::{failed, succeeded, ResultBatch, Shared, SharedWriter, OWNER_NOTE};
use crate::{path, AgentError};

/// Answers an `applyRequest`: applies `ops` in order (directory mtimes last, deepest first),
/// one item result per op, then `done`. `owner_noted`: the connection already told the server
/// that owners cannot be applied.
pub(crate) fn apply(
    w: &SharedWriter,
    shared: &Shared,
    request_id: u64,
    ops: &[Op],
    owner_noted: &mut bool,
) -> Result<(), AgentError> {
    let backend = &shared.backend;
    let mut done = Done {
        request_id,
        ..Done::default()
    };
    let mut results = ResultBatch::new(w, request_id);
    // Directory mtimes change whenever something inside changes: apply them last.
    let mut dir_mtimes: Vec<(Vec<u8>, (i64, u32))> = Vec::new();
    let mut note = |applied: Applied| -> String {
        if applied.owner_skipped && !*owner_noted {
            *owner_noted = true;
            OWNER_NOTE.to_owned()
        } else {
            String::new()
        }
    };
    for op in ops {
        let p = &op.path;
        let r: Result<String, AgentError> = path::check(p).and_then(|()| match &op.kind {
            OpKind::Mkdir(attrs) => {
                let a = backend.mkdir(p, attrs)?;
                if let Some(t) = attrs.mtime {
                    dir_mtimes.push((p.clone(), t));
                }
                Ok(note(a))
            }
            OpKind::Delete { recursive } => backend.delete(p, *recursive).map(|()| String::new()),
            OpKind::SetAttrs(attrs) => {
                let mut attrs = *attrs;
                if attrs.mtime.is_some() && backend.kind(p)? == Some(FileKind::Dir) {
                    dir_mtimes.push((p.clone(), attrs.mtime.take().expect("checked")));
                }
                Ok(note(backend.set_attrs(p, &attrs)?))
            }
            OpKind::Symlink { target, attrs } => Ok(note(backend.symlink(p, target, attrs)?)),
            OpKind::HardLink { existing } => {
                path::check(existing)?;
                backend.hard_link(p, existing).map(|()| String::new())
            }
            OpKind::Put { .. } => Err(AgentError::Verify {
                path: p.clone(),
                why: "a put is only valid in a block commit".into(),
            }),
        });
        let result = match r {
            Ok(m) => {
                done.ok += 1;
                succeeded(p, m)
            }
            Err(e) => {
                done.failed += 1;
                debug!("apply {}: {e}", show(p));
                failed(p, e.to_string())
            }
        };
        results.push(result)?;
    }
    // Deepest first, so that setting a child's mtime cannot disturb a parent's.
    dir_mtimes.sort_by_key(|(p, _)| {
        std::cmp::Reverse(p.iter().filter(|&&b| b == b'/').count() + usize::from(!p.is_empty()))
    });
    for (p, t) in dir_mtimes {
        let attrs = Attrs {
            mtime: Some(t),
            ..Attrs::default()
        };
        if let Err(e) = backend.set_attrs(&p, &attrs) {
            // The op was already reported ok; report the late failure as its own item.
            done.failed += 1;
            results.push(failed(&p, e.to_string()))?;
        }
    }
    results.finish(done)
}
