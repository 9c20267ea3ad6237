//! Two file lists as agents could send them: building the server's
//! `FileList`s, planning, resolving with arbitrary checksum answers and
//! describing every step never panics; a list against itself plans nothing.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[path = "../../tests/fuzz_checks/mod.rs"]
mod checks;

#[derive(Debug, Arbitrary)]
struct Entry {
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

fn conv(v: Vec<Entry>) -> Vec<checks::Entry> {
    v.into_iter()
        .map(|e| checks::Entry {
            comps: e.comps,
            kind: e.kind,
            mode: e.mode,
            owner: e.owner,
            size: e.size,
            mtime: e.mtime,
            nlink: e.nlink,
            inode: e.inode,
            target: e.target,
        })
        .collect()
}

fuzz_target!(|input: Input| {
    checks::plan(
        &conv(input.master),
        &conv(input.remote),
        input.delete,
        input.owner,
        &input.same,
    );
});
