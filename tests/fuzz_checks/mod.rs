//! Oracles for the server's parsers and planner fed with untrusted input,
//! shared by the cargo-fuzz targets in `fuzz/` and the stable property tests
//! `tests/server_fuzz.rs`.
#![allow(dead_code)]

use fleetsync_select::{parse_expr, Classification};
use fleetsync_server::blocks::BlocksFile;
use fleetsync_server::list::{FileList, Kind, Meta};
use fleetsync_server::plan::{describe, PairPlan, PlanOptions, StepKind, NO_INDEX};
use fleetsync_server::remote_list::RemoteList;

/// A blocks file: parsing never panics; an accepted file has a complete
/// order that respects every `after`, and its blocks can be assigned.
pub fn blocks_file(text: &str) {
    let Ok(file) = BlocksFile::parse(text) else {
        return;
    };
    let order: Vec<&str> = file.order().map(|b| b.name.as_str()).collect();
    assert_eq!(order.len(), file.blocks().len(), "order misses blocks");
    for (k, b) in file.order().enumerate() {
        assert_eq!(file.get(&b.name), Some(b));
        for a in &b.after {
            let pos = order
                .iter()
                .position(|n| n == a)
                .expect("after names a block");
            assert!(pos < k, "{} runs before {a}, which it comes after", b.name);
        }
    }
    let compiled: Vec<_> = file
        .blocks()
        .iter()
        .map(|b| {
            parse_expr(&b.select).ok().and_then(|e| {
                Classification {
                    rules: vec![],
                    select: Some(e),
                }
                .compile()
                .ok()
            })
        })
        .collect();
    for path in [&b""[..], b"etc/app/x.conf", b"usr/bin/app", b"a"] {
        let _ = file.assign(|sel| {
            let k = file.blocks().iter().position(|b| b.select == sel).unwrap();
            compiled[k]
                .as_ref()
                .is_some_and(|m| m.is_included(path, false))
        });
    }
}

/// One listed entry, in a compact form generators can produce: path
/// components are indices into a few names so that lists collide.
#[derive(Clone, Debug)]
pub struct Entry {
    pub comps: Vec<u8>,
    pub kind: u8,
    pub mode: u16,
    pub owner: u8,
    pub size: u8,
    pub mtime: u8,
    pub nlink: u8,
    pub inode: u8,
    pub target: u8,
}

const NAMES: &[&[u8]] = &[b"a", b"b", b"c.txt", b"d d", b"\xff"];

fn build(entries: &[Entry]) -> Option<FileList> {
    let mut list = FileList::new();
    for e in entries {
        let mut path = Vec::new();
        for (k, c) in e.comps.iter().take(4).enumerate() {
            if k > 0 {
                path.push(b'/');
            }
            path.extend_from_slice(NAMES[*c as usize % NAMES.len()]);
        }
        let kind = [Kind::File, Kind::Dir, Kind::Symlink, Kind::Special][e.kind as usize % 4];
        let meta = Meta {
            kind: Some(kind),
            mode: u32::from(e.mode),
            uid: u32::from(e.owner % 3),
            gid: u32::from(e.owner / 3 % 3),
            size: u64::from(e.size % 4),
            mtime_sec: i64::from(e.mtime % 3),
            mtime_nsec: 0,
            dev: 1,
            inode: u64::from(e.inode % 5),
            nlink: u64::from(e.nlink % 3),
        };
        let target = NAMES[e.target as usize % NAMES.len()];
        list.push(&path, &meta, target).ok()?;
    }
    list.finish().ok()?;
    Some(list)
}

/// The plan of `remote` against `master`, `same[k]` the checksum answer of
/// candidate `k` (true past the end), as lines that name paths (remote
/// indexes depend on how the remote list is held).
fn plan_lines(
    master: &FileList,
    remote: &RemoteList,
    opts: PlanOptions,
    same: &[bool],
) -> Vec<String> {
    let pair = PairPlan::new(master, remote, opts);
    let differs: Vec<u32> = pair
        .candidates_from(master, remote, 0)
        .enumerate()
        .filter(|(k, _)| !same.get(*k).copied().unwrap_or(true))
        .map(|(_, c)| c.0)
        .collect();
    let plan = pair.resolve(master, remote, |m| differs.binary_search(&m).is_err());
    let _ = plan.send_bytes(master);
    let name = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    plan.steps()
        .iter()
        .map(|s| {
            let path = match s.kind {
                StepKind::Delete | StepKind::DeleteTree => remote.path(s.index),
                _ => master.path(s.index),
            };
            let other = match s.kind {
                _ if s.other == NO_INDEX => String::new(),
                StepKind::HardLink => name(master.path(s.other)),
                _ => name(remote.path(s.other)),
            };
            let what = describe(s, master, remote, opts.owner);
            format!("{:?} {:?} {} {other} {what}", s.kind, s.why, name(path))
        })
        .collect()
}

/// Two lists as agents could send them (any kinds, hard links, missing
/// parents, no root): planning, resolving with arbitrary checksum answers and
/// describing every step never panics, the remote list compacted against the
/// master's plans what it held whole does, and a list planned against itself
/// needs nothing.
pub fn plan(master: &[Entry], remote: &[Entry], delete: bool, owner: bool, same: &[bool]) {
    let (Some(m), Some(r)) = (build(master), build(remote)) else {
        return;
    };
    let m = std::sync::Arc::new(m);
    let opts = PlanOptions { delete, owner };
    let compact = RemoteList::compact(m.clone(), &r).expect("a finished list compacts");
    let whole = RemoteList::plain(m.clone(), r).expect("small lists");
    assert_eq!(
        plan_lines(&m, &compact, opts, same),
        plan_lines(&m, &whole, opts, same),
        "compacted vs whole remote list"
    );

    let m2 = RemoteList::compact(m.clone(), &build(master).unwrap()).unwrap();
    let pair = PairPlan::new(&m, &m2, opts);
    let plan = pair.resolve(&m, &m2, |_| true);
    assert!(
        plan.is_empty(),
        "a list planned against itself: {:?}",
        plan.steps()
            .iter()
            .map(|s| describe(s, &m, &m2, owner))
            .collect::<Vec<_>>()
    );
    let m3 = RemoteList::plain(m.clone(), build(master).unwrap()).unwrap();
    assert!(PairPlan::new(&m, &m3, opts)
        .resolve(&m, &m3, |_| true)
        .is_empty());
}
