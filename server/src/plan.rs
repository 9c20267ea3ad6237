//! [`PairPlan`]: what one remote needs to become identical to the master.
//!
//! Planning is pure: two sorted [`FileList`]s in, a list of [`Step`]s out. It
//! runs in two stages because some decisions need checksums computed by the
//! agents:
//!
//! 1. [`PairPlan::new`] diffs the lists in one merge pass and collects the
//!    regular files of equal size on both sides ([`PairPlan::checksum_candidates`]);
//! 2. [`PairPlan::resolve`] takes, for each candidate, whether the checksums
//!    matched, and produces the final [`Plan`] in execution order.
//!
//! ```
//! use fleetsync_server::list::{FileList, Kind, Meta};
//! use fleetsync_server::plan::{PairPlan, PlanOptions, StepKind};
//!
//! let file = Meta { kind: Some(Kind::File), mode: 0o644, size: 5, nlink: 1, ..Meta::default() };
//! let mut master = FileList::new();
//! master.push(b"a.txt", &file, b"").unwrap();
//! master.finish().unwrap();
//! let mut remote = FileList::new();
//! remote.push(b"a.txt", &file, b"").unwrap();
//! remote.finish().unwrap();
//!
//! let pair = PairPlan::new(&master, &remote, PlanOptions::default());
//! assert_eq!(pair.checksum_candidates().len(), 1); // same size: ask for checksums
//! let plan = pair.resolve(&master, &remote, &[false]);               // ... and they differ
//! assert_eq!(plan.sends().len(), 1);
//! assert_eq!(plan.sends()[0].kind, StepKind::Send);
//! ```
//!
//! # Order of execution
//! - **before** the transfer (one apply request to the remote): deletions,
//!   deepest first (remote-only entries with `--delete`; entries whose type
//!   changes from or to a directory), then new directories, shallowest first;
//! - **sends** (one send order to the master agent): new and changed files;
//! - **after** (one apply request): symlinks, hard links (their group leader
//!   has arrived by then), attribute fixes, and last the attributes of every
//!   directory that is new, differs, or had an entry created or removed in it,
//!   deepest first (creating an entry changes the directory's mtime).

use crate::list::{FileList, Kind, Meta};

const NONE: u32 = u32::MAX;

/// Options of a plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// Delete remote entries that the master lacks (rsync `--delete`).
    pub delete: bool,
    /// Compare and apply owner and group (the remote agent runs as root).
    pub owner: bool,
}

/// What a step does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StepKind {
    /// Remove a remote file, symlink or empty directory (`remote` index).
    Delete,
    /// Remove a remote directory with everything in it (`remote` index).
    DeleteTree,
    /// Create a directory (`master` index).
    Mkdir,
    /// Send a regular file from the master (`master` index).
    Send,
    /// Create or repoint a symlink (`master` index).
    Symlink,
    /// Make `master` a hard link to `other` (the group's leader, a master index).
    HardLink,
    /// Apply mode/owner/mtime of `master` to the remote entry.
    SetAttrs,
    /// A special file (FIFO, socket, device) on the master: not synced.
    Skip,
}

impl StepKind {
    /// The word used in itemized output and JSON.
    pub fn name(self) -> &'static str {
        match self {
            StepKind::Delete | StepKind::DeleteTree => "delete",
            StepKind::Mkdir => "mkdir",
            StepKind::Send => "send",
            StepKind::Symlink => "symlink",
            StepKind::HardLink => "hardlink",
            StepKind::SetAttrs => "attrs",
            StepKind::Skip => "skip",
        }
    }
}

/// Why a step is needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Why {
    /// Missing on the remote.
    New,
    /// Only on the remote (`--delete`).
    Extra,
    /// The remote entry has another type.
    KindChanged,
    /// Sizes differ.
    SizeDiffers,
    /// Checksums differ.
    ChecksumDiffers,
    /// The remote file is hard-linked to a path the master does not link it to.
    BreakLink,
    /// The hard-link group leader was replaced, or the member is not linked.
    Relink,
    /// The symlink points elsewhere.
    TargetDiffers,
    /// Mode, owner or mtime differ.
    AttrsDiffer,
    /// A directory whose contents changed: restore its mtime.
    DirTouched,
    /// FIFO, socket or device.
    Special,
}

impl Why {
    /// A short English reason.
    pub fn text(self) -> &'static str {
        match self {
            Why::New => "new",
            Why::Extra => "not on master",
            Why::KindChanged => "type changed",
            Why::SizeDiffers => "size differs",
            Why::ChecksumDiffers => "checksum differs",
            Why::BreakLink => "break hard link",
            Why::Relink => "hard link",
            Why::TargetDiffers => "target differs",
            Why::AttrsDiffer => "attributes differ",
            Why::DirTouched => "directory contents changed",
            Why::Special => "special file skipped",
        }
    }
}

/// One planned action. Indexes refer to the master list, except for
/// deletions (remote list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// What to do.
    pub kind: StepKind,
    /// Why.
    pub why: Why,
    /// Master index (remote index for deletions).
    pub index: u32,
    /// Hard links: the leader's master index; attribute fixes: the remote
    /// index (or `u32::MAX` for a new directory).
    pub other: u32,
}

/// The final plan of one pair, in execution order.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    steps: Vec<Step>,
    n_before: usize,
    n_sends: usize,
    /// Special files on the master, not synced.
    pub skipped: Vec<u32>,
}

impl Plan {
    /// Deletions and new directories, to apply before sending.
    pub fn before(&self) -> &[Step] {
        &self.steps[..self.n_before]
    }

    /// Files the master must send.
    pub fn sends(&self) -> &[Step] {
        &self.steps[self.n_before..self.n_before + self.n_sends]
    }

    /// Symlinks, hard links and attribute fixes, to apply after sending.
    pub fn after(&self) -> &[Step] {
        &self.steps[self.n_before + self.n_sends..]
    }

    /// Every step, in order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Whether nothing needs doing.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Bytes to send.
    pub fn send_bytes(&self, master: &FileList) -> u64 {
        self.sends().iter().map(|s| master.size(s.index)).sum()
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.steps.capacity() * std::mem::size_of::<Step>() + self.skipped.capacity() * 4
    }
}

#[derive(Clone, Copy, Debug)]
enum FileState {
    Send(Why),
    /// A hard-link group member other than the leader.
    Member,
}

#[derive(Clone, Copy, Debug)]
struct FileCase {
    m: u32,
    r: u32,
    state: FileState,
}

/// The diff of one master/remote pair, waiting for checksums.
#[derive(Debug)]
pub struct PairPlan {
    opts: PlanOptions,
    deletes: Vec<(u32, bool, Why)>,
    mkdirs: Vec<u32>,
    dirs: Vec<(u32, u32)>,
    symlinks: Vec<(u32, Why)>,
    link_attrs: Vec<(u32, u32)>,
    files: Vec<FileCase>,
    candidates: Vec<(u32, u32)>,
    /// `(member, leader)` for every master hard-link group member, sorted.
    leader_of: Vec<(u32, u32)>,
    skipped: Vec<u32>,
}

/// Groups linked entries of a list by `(dev, inode)`: `(key, index)` sorted.
fn link_groups(list: &FileList) -> Vec<((u64, u64), u32)> {
    let mut v: Vec<((u64, u64), u32)> = (0..list.len() as u32)
        .filter_map(|i| list.link_key(i).map(|k| (k, i)))
        .collect();
    v.sort_unstable();
    v
}

fn attrs_differ(a: &Meta, b: &Meta, owner: bool, mode: bool) -> bool {
    (mode && a.mode != b.mode)
        || (owner && (a.uid != b.uid || a.gid != b.gid))
        || a.mtime_sec != b.mtime_sec
        || a.mtime_nsec != b.mtime_nsec
}

fn parent(path: &[u8]) -> Option<&[u8]> {
    if path.is_empty() {
        return None;
    }
    Some(match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[..i],
        None => b"",
    })
}

impl PairPlan {
    /// Diffs `master` against `remote` (both finished).
    pub fn new(master: &FileList, remote: &FileList, opts: PlanOptions) -> Self {
        let mut p = PairPlan {
            opts,
            deletes: Vec::new(),
            mkdirs: Vec::new(),
            dirs: Vec::new(),
            symlinks: Vec::new(),
            link_attrs: Vec::new(),
            files: Vec::new(),
            candidates: Vec::new(),
            leader_of: Vec::new(),
            skipped: Vec::new(),
        };
        // Master hard-link groups: leader = first member in path order.
        let groups = link_groups(master);
        let mut k = 0;
        while k < groups.len() {
            let mut e = k + 1;
            while e < groups.len() && groups[e].0 == groups[k].0 {
                e += 1;
            }
            if e - k > 1 {
                let leader = groups[k].1;
                for g in &groups[k..e] {
                    p.leader_of.push((g.1, leader));
                }
            }
            k = e;
        }
        p.leader_of.sort_unstable();
        let remote_groups = link_groups(remote);

        let (mut i, mut j) = (0u32, 0u32);
        let (nm, nr) = (master.len() as u32, remote.len() as u32);
        while i < nm || j < nr {
            let ord = if i == nm {
                std::cmp::Ordering::Greater
            } else if j == nr {
                std::cmp::Ordering::Less
            } else {
                FileList::cmp_paths(master, i, remote, j)
            };
            match ord {
                std::cmp::Ordering::Less => {
                    p.on_master(master, remote, i, NONE, &remote_groups);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    if opts.delete && !remote.path(j).is_empty() {
                        // Not recursive: children are listed and go first;
                        // excluded entries inside stay protected, as in rsync.
                        p.deletes.push((j, false, Why::Extra));
                    }
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    p.on_master(master, remote, i, j, &remote_groups);
                    i += 1;
                    j += 1;
                }
            }
        }
        p
    }

    fn leader(&self, m: u32) -> Option<u32> {
        self.leader_of
            .binary_search_by_key(&m, |x| x.0)
            .ok()
            .map(|k| self.leader_of[k].1)
    }

    /// Whether remote entry `r` shares its inode with a remote path that the
    /// master does not link to `m`.
    fn remote_link_must_break(
        &self,
        master: &FileList,
        remote: &FileList,
        m: u32,
        r: u32,
        remote_groups: &[((u64, u64), u32)],
    ) -> bool {
        let Some(key) = remote.link_key(r) else {
            return false;
        };
        let my_leader = self.leader(m);
        let start = remote_groups.partition_point(|g| g.0 < key);
        for g in remote_groups[start..].iter().take_while(|g| g.0 == key) {
            if g.1 == r {
                continue;
            }
            let other = master.find(remote.path(g.1));
            let same_group = match (other, my_leader) {
                (Some(o), Some(l)) => self.leader(o) == Some(l),
                _ => false,
            };
            if !same_group {
                return true;
            }
        }
        false
    }

    fn on_master(
        &mut self,
        master: &FileList,
        remote: &FileList,
        m: u32,
        r: u32,
        remote_groups: &[((u64, u64), u32)],
    ) {
        let mk = master.kind(m);
        if mk == Kind::Special {
            self.skipped.push(m);
            return;
        }
        let mut r = r;
        let mut why_new = Why::New;
        if r != NONE {
            let rk = remote.kind(r);
            if rk != mk {
                why_new = Why::KindChanged;
                // A directory cannot be renamed over (nor replace a file):
                // remove first. Never the remote root.
                if (mk == Kind::Dir || rk == Kind::Dir) && !master.path(m).is_empty() {
                    self.deletes.push((r, rk == Kind::Dir, Why::KindChanged));
                }
                r = NONE;
            }
        }
        match mk {
            Kind::Dir => {
                if r == NONE {
                    self.mkdirs.push(m);
                }
                self.dirs.push((m, r));
            }
            Kind::Symlink => {
                if r == NONE {
                    self.symlinks.push((m, why_new));
                } else if master.link_target(m) != remote.link_target(r) {
                    self.symlinks.push((m, Why::TargetDiffers));
                } else if attrs_differ(&master.meta(m), &remote.meta(r), self.opts.owner, false) {
                    self.link_attrs.push((m, r));
                }
            }
            Kind::File => {
                let state = if self.leader(m).is_some_and(|l| l != m) {
                    FileState::Member
                } else if r == NONE {
                    FileState::Send(why_new)
                } else if self.remote_link_must_break(master, remote, m, r, remote_groups) {
                    FileState::Send(Why::BreakLink)
                } else if master.size(m) != remote.size(r) {
                    FileState::Send(Why::SizeDiffers)
                } else {
                    // Candidates live only in `candidates` (8 bytes each).
                    self.candidates.push((m, r));
                    return;
                };
                self.files.push(FileCase { m, r, state });
            }
            Kind::Special => unreachable!(),
        }
    }

    /// `(master index, remote index)` of the regular files whose checksums
    /// are needed on both sides (equal size).
    pub fn checksum_candidates(&self) -> &[(u32, u32)] {
        &self.candidates
    }

    /// Finishes the plan; `same[k]` says whether candidate `k`'s checksums matched.
    pub fn resolve(self, master: &FileList, remote: &FileList, same: &[bool]) -> Plan {
        assert_eq!(
            same.len(),
            self.candidates.len(),
            "one answer per candidate"
        );
        let owner = self.opts.owner;
        let mut sends = Vec::new();
        let mut after = Vec::new();
        let mut attr_fixes = Vec::new();
        // Leaders that get sent: all their members must be relinked.
        let mut sent_leaders: Vec<u32> = Vec::new();
        for f in &self.files {
            if let FileState::Send(why) = f.state {
                sends.push(Step {
                    kind: StepKind::Send,
                    why,
                    index: f.m,
                    other: NONE,
                });
            }
        }
        for (k, &(m, r)) in self.candidates.iter().enumerate() {
            if !same[k] {
                sends.push(Step {
                    kind: StepKind::Send,
                    why: Why::ChecksumDiffers,
                    index: m,
                    other: NONE,
                });
            } else if attrs_differ(&master.meta(m), &remote.meta(r), owner, true) {
                attr_fixes.push(Step {
                    kind: StepKind::SetAttrs,
                    why: Why::AttrsDiffer,
                    index: m,
                    other: r,
                });
            }
        }
        sends.sort_unstable_by_key(|s| s.index);
        attr_fixes.sort_unstable_by_key(|s| s.index);
        for s in &sends {
            if self.leader(s.index) == Some(s.index) {
                sent_leaders.push(s.index);
            }
        }
        // Hard-link members.
        for f in &self.files {
            if !matches!(f.state, FileState::Member) {
                continue;
            }
            let leader = self.leader(f.m).expect("member has a leader");
            let ok = f.r != NONE
                && sent_leaders.binary_search(&leader).is_err()
                && remote
                    .find(master.path(leader))
                    .and_then(|rl| remote.link_key(rl))
                    .is_some_and(|k| remote.link_key(f.r) == Some(k));
            if !ok {
                after.push(Step {
                    kind: StepKind::HardLink,
                    why: Why::Relink,
                    index: f.m,
                    other: leader,
                });
            }
        }
        let mut before: Vec<Step> = Vec::new();
        let mut deletes = self.deletes;
        deletes.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        deletes.dedup_by_key(|d| d.0);
        for (r, recursive, why) in deletes {
            before.push(Step {
                kind: if recursive {
                    StepKind::DeleteTree
                } else {
                    StepKind::Delete
                },
                why,
                index: r,
                other: NONE,
            });
        }
        for &m in &self.mkdirs {
            before.push(Step {
                kind: StepKind::Mkdir,
                why: Why::New,
                index: m,
                other: NONE,
            });
        }
        let mut links: Vec<Step> = self
            .symlinks
            .iter()
            .map(|&(m, why)| Step {
                kind: StepKind::Symlink,
                why,
                index: m,
                other: NONE,
            })
            .collect();
        links.append(&mut after);
        let mut after = links;
        after.extend(self.link_attrs.iter().map(|&(m, r)| Step {
            kind: StepKind::SetAttrs,
            why: Why::AttrsDiffer,
            index: m,
            other: r,
        }));
        after.append(&mut attr_fixes);

        // Directories whose contents change get their attributes (mtime) restored.
        let mut touched: Vec<u32> = Vec::new();
        let mut touch = |path: &[u8]| {
            if let Some(p) = parent(path) {
                if let Some(d) = master.find(p) {
                    touched.push(d);
                }
            }
        };
        for s in before.iter().chain(sends.iter()).chain(after.iter()) {
            match s.kind {
                StepKind::Delete | StepKind::DeleteTree => touch(remote.path(s.index)),
                StepKind::SetAttrs | StepKind::Skip => {}
                _ => touch(master.path(s.index)),
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for &(m, r) in self.dirs.iter().rev() {
            let why = if r == NONE {
                Some(Why::New)
            } else if attrs_differ(&master.meta(m), &remote.meta(r), owner, true) {
                Some(Why::AttrsDiffer)
            } else if touched.binary_search(&m).is_ok() {
                Some(Why::DirTouched)
            } else {
                None
            };
            if let Some(why) = why {
                after.push(Step {
                    kind: StepKind::SetAttrs,
                    why,
                    index: m,
                    other: r,
                });
            }
        }
        let n_before = before.len();
        let n_sends = sends.len();
        let mut steps = before;
        steps.append(&mut sends);
        steps.append(&mut after);
        Plan {
            steps,
            n_before,
            n_sends,
            skipped: self.skipped,
        }
    }
}

/// A human description of a step for itemized output: what differs.
pub fn describe(step: &Step, master: &FileList, remote: &FileList, owner: bool) -> String {
    match step.kind {
        StepKind::SetAttrs if step.other != NONE => {
            let (a, b) = (remote.meta(step.other), master.meta(step.index));
            let mut parts = Vec::new();
            if a.mode != b.mode && master.kind(step.index) != Kind::Symlink {
                parts.push(format!("mode {:04o}->{:04o}", a.mode, b.mode));
            }
            if owner && (a.uid != b.uid || a.gid != b.gid) {
                parts.push(format!("owner {}:{}->{}:{}", a.uid, a.gid, b.uid, b.gid));
            }
            if a.mtime_sec != b.mtime_sec || a.mtime_nsec != b.mtime_nsec {
                parts.push("mtime".to_owned());
            }
            if parts.is_empty() {
                step.why.text().to_owned()
            } else {
                parts.join(", ")
            }
        }
        StepKind::Symlink => format!(
            "{} -> {}",
            step.why.text(),
            String::from_utf8_lossy(master.link_target(step.index))
        ),
        StepKind::HardLink => format!("=> {}", String::from_utf8_lossy(master.path(step.other))),
        _ => step.why.text().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct E {
        path: &'static [u8],
        kind: Kind,
        mode: u32,
        size: u64,
        mtime: i64,
        uid: u32,
        link: Option<u64>,
        target: &'static [u8],
    }

    fn f(path: &'static str, size: u64) -> E {
        E {
            path: path.as_bytes(),
            kind: Kind::File,
            mode: 0o644,
            size,
            mtime: 100,
            uid: 0,
            link: None,
            target: b"",
        }
    }
    fn d(path: &'static str) -> E {
        E {
            kind: Kind::Dir,
            mode: 0o755,
            size: 4096,
            ..f(path, 0)
        }
    }
    fn l(path: &'static str, target: &'static str) -> E {
        E {
            kind: Kind::Symlink,
            mode: 0o777,
            target: target.as_bytes(),
            ..f(path, 0)
        }
    }
    fn linked(mut e: E, inode: u64) -> E {
        e.link = Some(inode);
        e
    }

    fn list(entries: &[E]) -> FileList {
        let mut fl = FileList::new();
        for e in entries {
            let meta = Meta {
                kind: Some(e.kind),
                mode: e.mode,
                uid: e.uid,
                gid: 0,
                size: e.size,
                mtime_sec: e.mtime,
                mtime_nsec: 0,
                dev: 1,
                inode: e.link.unwrap_or(0),
                nlink: if e.link.is_some() { 2 } else { 1 },
            };
            fl.push(e.path, &meta, e.target).unwrap();
        }
        fl.finish().unwrap();
        fl
    }

    /// Plans with the given checksum answers; returns "kind why path" lines
    /// in execution order, sections separated by "|".
    fn plan(m: &[E], r: &[E], opts: PlanOptions, same: impl Fn(&[u8]) -> bool) -> Vec<String> {
        let (ml, rl) = (list(m), list(r));
        let pair = PairPlan::new(&ml, &rl, opts);
        let answers: Vec<bool> = pair
            .checksum_candidates()
            .iter()
            .map(|&(mi, _)| same(ml.path(mi)))
            .collect();
        let plan = pair.resolve(&ml, &rl, &answers);
        let show = |s: &Step| {
            let path = match s.kind {
                StepKind::Delete | StepKind::DeleteTree => rl.path(s.index),
                _ => ml.path(s.index),
            };
            format!("{:?} {:?} {}", s.kind, s.why, String::from_utf8_lossy(path))
        };
        let mut out: Vec<String> = plan.before().iter().map(show).collect();
        out.push("|".into());
        out.extend(plan.sends().iter().map(show));
        out.push("|".into());
        out.extend(plan.after().iter().map(show));
        for &s in &plan.skipped {
            out.push(format!("skip {}", String::from_utf8_lossy(ml.path(s))));
        }
        out
    }

    fn opts() -> PlanOptions {
        PlanOptions {
            delete: true,
            owner: true,
        }
    }

    #[test]
    fn empty_remote_gets_everything_dirs_first_attrs_last() {
        let m = [
            d(""),
            d("a"),
            f("a/x", 3),
            l("a/s", "x"),
            d("a/b"),
            f("z", 0),
        ];
        let got = plan(&m, &[], opts(), |_| true);
        assert_eq!(
            got,
            vec![
                "Mkdir New ", // root missing entirely: created (agent: ok if exists)
                "Mkdir New a",
                "Mkdir New a/b",
                "|",
                "Send New a/x",
                "Send New z",
                "|",
                "Symlink New a/s",
                "SetAttrs New a/b",
                "SetAttrs New a",
                "SetAttrs New ",
            ]
        );
    }

    #[test]
    fn identical_trees_need_nothing_but_checksums() {
        let m = [d(""), d("a"), f("a/x", 3), l("a/s", "x")];
        let (ml, rl) = (list(&m), list(&m));
        let pair = PairPlan::new(&ml, &rl, opts());
        assert_eq!(pair.checksum_candidates().len(), 1);
        let plan = pair.resolve(&ml, &rl, &[true]);
        assert!(plan.is_empty(), "{:?}", plan.steps());
    }

    #[test]
    fn same_size_different_content_is_sent_after_checksum() {
        let m = [d(""), f("x", 3), f("y", 3)];
        let got = plan(&m, &m, opts(), |p| p != b"x");
        assert_eq!(
            got,
            vec!["|", "Send ChecksumDiffers x", "|", "SetAttrs DirTouched "]
        );
    }

    #[test]
    fn different_size_is_sent_without_checksum() {
        let (ml, rl) = (list(&[f("x", 3)]), list(&[f("x", 4)]));
        let pair = PairPlan::new(&ml, &rl, opts());
        assert!(pair.checksum_candidates().is_empty());
        let plan = pair.resolve(&ml, &rl, &[]);
        assert_eq!(plan.sends()[0].why, Why::SizeDiffers);
    }

    #[test]
    fn extra_remote_entries_deleted_deepest_first_only_with_delete() {
        let m = [d("")];
        let r = [
            d(""),
            d("e"),
            f("e/1", 1),
            d("e/sub"),
            f("e/sub/2", 1),
            f("z", 1),
        ];
        let got = plan(&m, &r, opts(), |_| true);
        assert_eq!(
            got,
            vec![
                "Delete Extra z",
                "Delete Extra e/sub/2",
                "Delete Extra e/sub",
                "Delete Extra e/1",
                "Delete Extra e",
                "|",
                "|",
                "SetAttrs DirTouched ",
            ]
        );
        let got = plan(
            &m,
            &r,
            PlanOptions {
                delete: false,
                owner: true,
            },
            |_| true,
        );
        assert_eq!(got, vec!["|", "|"]);
    }

    #[test]
    fn mode_only_change_is_an_attribute_fix() {
        let mut x = f("x", 3);
        let m = [x.clone()];
        x.mode = 0o600;
        let got = plan(&m, &[x], opts(), |_| true);
        assert_eq!(got, vec!["|", "|", "SetAttrs AttrsDiffer x"]);
    }

    #[test]
    fn mtime_only_change_is_an_attribute_fix_and_owner_only_when_root() {
        let mut x = f("x", 3);
        let m = [x.clone()];
        x.uid = 1000;
        let got = plan(&m, &[x.clone()], opts(), |_| true);
        assert_eq!(got, vec!["|", "|", "SetAttrs AttrsDiffer x"]);
        let no_owner = PlanOptions {
            delete: true,
            owner: false,
        };
        assert_eq!(plan(&m, &[x.clone()], no_owner, |_| true), vec!["|", "|"]);
        x.mtime = 5;
        assert_eq!(
            plan(&m, &[x], no_owner, |_| true),
            vec!["|", "|", "SetAttrs AttrsDiffer x"]
        );
    }

    #[test]
    fn file_to_dir_and_dir_to_file_delete_then_create() {
        let m = [d(""), f("a", 1), d("b"), f("b/in", 1)];
        let r = [d(""), d("a"), f("a/old", 1), f("b", 1)];
        let got = plan(&m, &r, opts(), |_| true);
        assert_eq!(
            got,
            vec![
                "Delete KindChanged b",
                "Delete Extra a/old",
                "DeleteTree KindChanged a",
                "Mkdir New b",
                "|",
                "Send KindChanged a",
                "Send New b/in",
                "|",
                "SetAttrs New b",
                "SetAttrs DirTouched ",
            ]
        );
    }

    #[test]
    fn dir_to_file_without_delete_removes_whole_tree() {
        let m = [f("a", 1)];
        let r = [d("a"), f("a/old", 1)];
        let got = plan(
            &m,
            &r,
            PlanOptions {
                delete: false,
                owner: true,
            },
            |_| true,
        );
        assert_eq!(
            got,
            vec!["DeleteTree KindChanged a", "|", "Send KindChanged a", "|"]
        );
    }

    #[test]
    fn file_to_symlink_is_replaced_atomically_without_delete() {
        let m = [l("a", "t"), f("b", 1)];
        let r = [f("a", 1), l("b", "t")];
        let got = plan(&m, &r, opts(), |_| true);
        assert_eq!(
            got,
            vec!["|", "Send KindChanged b", "|", "Symlink KindChanged a"]
        );
    }

    #[test]
    fn symlinks_new_repointed_dangling_and_attrs() {
        let mut same_target = l("c", "t");
        let m = [
            l("a", "new"),
            l("b", "missing/dangling"),
            same_target.clone(),
        ];
        same_target.mtime = 1;
        let r = [l("b", "old"), same_target];
        let got = plan(&m, &r, opts(), |_| true);
        assert_eq!(
            got,
            vec![
                "|",
                "|",
                "Symlink New a",
                "Symlink TargetDiffers b",
                "SetAttrs AttrsDiffer c"
            ]
        );
    }

    #[test]
    fn symlink_mode_is_never_compared() {
        let mut s = l("a", "t");
        let m = [s.clone()];
        s.mode = 0o755;
        assert_eq!(plan(&m, &[s], opts(), |_| true), vec!["|", "|"]);
    }

    #[test]
    fn new_hard_link_group_sends_one_links_the_rest() {
        let m = [
            linked(f("a", 5), 1),
            linked(f("b", 5), 1),
            linked(f("c", 5), 1),
            f("d", 5),
        ];
        let got = plan(&m, &[], opts(), |_| true);
        assert_eq!(
            got,
            vec![
                "|",
                "Send New a",
                "Send New d",
                "|",
                "HardLink Relink b",
                "HardLink Relink c"
            ]
        );
    }

    #[test]
    fn intact_hard_link_group_needs_only_leader_checksum() {
        let m = [linked(f("a", 5), 1), linked(f("b", 5), 1)];
        let r = [linked(f("a", 5), 7), linked(f("b", 5), 7)];
        let (ml, rl) = (list(&m), list(&r));
        let pair = PairPlan::new(&ml, &rl, opts());
        assert_eq!(pair.checksum_candidates(), &[(0, 0)]);
        assert!(pair.resolve(&ml, &rl, &[true]).is_empty());
    }

    #[test]
    fn hard_link_member_missing_on_remote_is_linked() {
        let m = [linked(f("a", 5), 1), linked(f("b", 5), 1)];
        let r = [f("a", 5), f("b", 5)];
        let got = plan(&m, &r, opts(), |_| true);
        assert_eq!(got, vec!["|", "|", "HardLink Relink b"]);
    }

    #[test]
    fn changed_leader_relinks_all_members() {
        let m = [linked(f("a", 5), 1), linked(f("b", 5), 1)];
        let r = [linked(f("a", 5), 7), linked(f("b", 5), 7)];
        let got = plan(&m, &r, opts(), |_| false);
        assert_eq!(
            got,
            vec!["|", "Send ChecksumDiffers a", "|", "HardLink Relink b"]
        );
    }

    #[test]
    fn remote_link_that_must_be_broken_gets_a_fresh_copy() {
        // Master: a and b are separate files with the same content; remote: linked.
        let m = [f("a", 5), f("b", 5)];
        let r = [linked(f("a", 5), 7), linked(f("b", 5), 7)];
        let got = plan(&m, &r, opts(), |_| true);
        assert_eq!(got, vec!["|", "Send BreakLink a", "Send BreakLink b", "|"]);
    }

    #[test]
    fn remote_link_to_outsider_breaks_the_group_leader() {
        let m = [linked(f("a", 5), 1), linked(f("b", 5), 1), f("z", 5)];
        let r = [
            linked(f("a", 5), 7),
            linked(f("b", 5), 7),
            linked(f("z", 5), 7),
        ];
        let got = plan(&m, &r, opts(), |_| true);
        assert_eq!(
            got,
            vec![
                "|",
                "Send BreakLink a",
                "Send BreakLink z",
                "|",
                "HardLink Relink b"
            ]
        );
    }

    #[test]
    fn special_files_are_skipped_with_a_note() {
        let fifo = E {
            kind: Kind::Special,
            ..f("p", 0)
        };
        let got = plan(
            std::slice::from_ref(&fifo),
            std::slice::from_ref(&fifo),
            opts(),
            |_| true,
        );
        assert_eq!(got, vec!["|", "|", "skip p"]);
    }

    #[test]
    fn directory_attributes_fixed_last_deepest_first() {
        let mut a = d("a");
        let mut ab = d("a/b");
        let m = [d(""), a.clone(), ab.clone()];
        a.mtime = 1;
        ab.mode = 0o700;
        let got = plan(&m, &[d(""), a, ab], opts(), |_| true);
        assert_eq!(
            got,
            vec![
                "|",
                "|",
                "SetAttrs AttrsDiffer a/b",
                "SetAttrs AttrsDiffer a"
            ]
        );
    }

    #[test]
    fn names_with_newlines_and_non_utf8() {
        let m = [E {
            path: b"we ird\n\xff",
            ..f("", 1)
        }];
        let got = plan(&m, &[], opts(), |_| true);
        assert_eq!(got.len(), 3);
        assert!(got[1].starts_with("Send New we ird\n"));
    }

    #[test]
    fn describe_names_what_differs() {
        let mut x = f("x", 3);
        let ml = list(&[x.clone()]);
        x.mode = 0o600;
        x.mtime = 1;
        let rl = list(&[x]);
        let plan = PairPlan::new(&ml, &rl, opts()).resolve(&ml, &rl, &[true]);
        assert_eq!(
            describe(&plan.after()[0], &ml, &rl, true),
            "mode 0600->0644, mtime"
        );
    }
}
