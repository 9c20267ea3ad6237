//! Plan steps as the operations the remote agent applies.

use fleetsync_proto::{Attrs, Op, OpKind};

use crate::list::{FileList, Kind, Meta};
use crate::plan::{Step, StepKind};
use crate::remote_list::RemoteList;

/// The master's attributes of an entry: its mode when `with_mode` (never for symlinks),
/// its owner when the remote agent can apply it, its mtime.
pub(crate) fn master_attrs(meta: &Meta, owner: bool, with_mode: bool) -> Attrs {
    Attrs {
        mode: with_mode.then_some(meta.mode),
        owner: owner.then_some((meta.uid, meta.gid)),
        mtime: Some((meta.mtime_sec, meta.mtime_nsec)),
    }
}

/// The apply operations of plan steps (sends and skips have none: sends go to the master).
pub(crate) fn apply_ops(
    steps: &[Step],
    master: &FileList,
    remote: &RemoteList,
    owner: bool,
) -> Vec<Op> {
    steps
        .iter()
        .filter_map(|s| {
            let kind = match s.kind {
                StepKind::Delete | StepKind::DeleteTree => {
                    return Some(Op {
                        path: remote.path(s.index).to_vec(),
                        kind: OpKind::Delete {
                            recursive: s.kind == StepKind::DeleteTree,
                        },
                    })
                }
                StepKind::Mkdir => {
                    let mut a = master_attrs(&master.meta(s.index), owner, true);
                    a.mtime = None;
                    OpKind::Mkdir(a)
                }
                StepKind::Symlink => OpKind::Symlink {
                    target: master.link_target(s.index).to_vec(),
                    attrs: master_attrs(&master.meta(s.index), owner, false),
                },
                StepKind::HardLink => OpKind::HardLink {
                    existing: master.path(s.other).to_vec(),
                },
                StepKind::SetAttrs => {
                    let is_link = master.kind(s.index) == Kind::Symlink;
                    OpKind::SetAttrs(master_attrs(&master.meta(s.index), owner, !is_link))
                }
                StepKind::Send | StepKind::Skip => return None,
            };
            Some(Op {
                path: master.path(s.index).to_vec(),
                kind,
            })
        })
        .collect()
}

/// A block's op list, in plan order: puts for the files staged by the sends, then what
/// [`apply_ops`] makes of the other steps.
pub(crate) fn block_ops(
    steps: &[Step],
    master: &FileList,
    remote: &RemoteList,
    owner: bool,
) -> Vec<Op> {
    let mut ops = Vec::with_capacity(steps.len());
    for s in steps {
        if s.kind == StepKind::Send {
            let meta = master.meta(s.index);
            ops.push(Op {
                path: master.path(s.index).to_vec(),
                kind: OpKind::Put {
                    attrs: master_attrs(&meta, owner, true),
                    size: meta.size,
                },
            });
        } else {
            ops.extend(apply_ops(std::slice::from_ref(s), master, remote, owner));
        }
    }
    ops
}
