//! Two file lists as agents could send them (any kinds, links, duplicates,
//! missing parents, no root): building the server's `FileList`s, planning,
//! resolving with arbitrary checksum answers and describing every step never
//! panics.
#![no_main]

use fleetsync_server::list::{FileList, Kind, Meta};
use fleetsync_server::plan::{describe, PairPlan, PlanOptions};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Entry {
    /// Path components, each an index into `NAMES` (few names: lists collide).
    comps: Vec<u8>,
    kind: u8,
    mode: u16,
    owner: u8,
    size: u8,
    mtime: u8,
    nlink: u8,
    inode: u8,
    target: u8,
}

#[derive(Debug, Arbitrary)]
struct Input {
    master: Vec<Entry>,
    remote: Vec<Entry>,
    delete: bool,
    owner: bool,
    same: Vec<bool>,
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

fuzz_target!(|input: Input| {
    let (Some(master), Some(remote)) = (build(&input.master), build(&input.remote)) else {
        return;
    };
    let opts = PlanOptions {
        delete: input.delete,
        owner: input.owner,
    };
    let pair = PairPlan::new(&master, &remote, opts);
    let n = pair.checksum_candidates().len();
    let same: Vec<bool> = (0..n)
        .map(|k| input.same.get(k).copied().unwrap_or(true))
        .collect();
    let plan = pair.resolve(&master, &remote, &same);
    for step in plan.steps() {
        let _ = describe(step, &master, &remote, input.owner);
    }
    let _ = plan.send_bytes(&master);
});
