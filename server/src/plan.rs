//! [`PairPlan`]: what one remote needs to become identical to the master.
//!
//! Planning is pure: a sorted master [`FileList`] and a remote's [`RemoteList`] in, a
//! list of [`Step`]s out. It runs in two stages because some decisions need checksums
//! computed by the agents:
//!
//! 1. [`PairPlan::new`] diffs the lists in one merge pass and collects the
//!    regular files of equal size on both sides ([`PairPlan::candidates_from`]);
//! 2. [`PairPlan::resolve`] takes, for each candidate, whether the checksums
//!    matched, and produces the final [`Plan`] in execution order.
//!
//! A candidate is named by its master index. A remote entry the same as the master's
//! ([`RemoteList::is_same`]) costs the plan nothing until it is resolved: its candidate
//! (a regular file) is implicit in the remote list's bits.
//!
//! ```
//! use std::sync::Arc;
//! use fleetsync_server::list::{FileList, Kind, Meta};
//! use fleetsync_server::plan::{PairPlan, PlanOptions, StepKind};
//! use fleetsync_server::remote_list::RemoteList;
//!
//! let file = Meta { kind: Some(Kind::File), mode: 0o644, size: 5, nlink: 1, ..Meta::default() };
//! let mut master = FileList::new();
//! master.push(b"a.txt", &file, b"").unwrap();
//! master.finish().unwrap();
//! let master = Arc::new(master);
//! let mut remote = FileList::new();
//! remote.push(b"a.txt", &file, b"").unwrap();
//! remote.finish().unwrap();
//! let remote = RemoteList::compact(master.clone(), &remote).unwrap();
//!
//! let pair = PairPlan::new(&master, &remote, PlanOptions::default());
//! assert_eq!(pair.candidate_count(), 1); // same size: ask for checksums
//! let plan = pair.resolve(&master, &remote, |_| false); // ... and they differ
//! assert_eq!(plan.sends().len(), 1);
//! assert_eq!(plan.sends()[0].kind, StepKind::Send);
//! ```
//!
//! # Order of execution
//! - **before** the transfer (one apply request to the remote): deletions,
//!   deepest first (remote-only entries with `--delete`; entries whose type
//!   changes from or to a directory), then new directories, shallowest first;
//! - **sends** (one send order to the master agent): new and changed files,
//!   each with its delta basis on the remote ([`Step::basis`]);
//! - **after** (one apply request): first the deferred deletions (remote-only
//!   files chosen as a basis, and their remote-only parent directories,
//!   deepest first: the remote reads them while it receives), then symlinks,
//!   hard links (their group leader has arrived by then), attribute fixes,
//!   and last the attributes of every directory that is new, differs, or had
//!   an entry created or removed in it, deepest first (creating an entry
//!   changes the directory's mtime).
//!
//! # Delta bases
//! Every send names, in [`Step::other`], the remote file the remote can use
//! as the basis of a delta ([`Step::basis`]):
//! - a changed file (size or checksum differs, or a hard link to break): the
//!   same path on the remote;
//! - a new file (or one replacing a symlink or directory): the file
//!   [`crate::basis`] picks among the *candidates*, the remote's regular
//!   files that the master does not have (deleted by this sync with
//!   `--delete`, kept without) and the remote files that a master symlink
//!   replaces (in *after*). Files beneath a remote directory deleted as a
//!   tree (a directory whose type changes) are no candidates: it goes before
//!   the transfer. A candidate chosen as a basis and deleted by the plan is
//!   deleted in *after* instead of *before*, with its remote-only parent
//!   directories. One candidate may be the basis of several sends.

use crate::basis::BasisIndex;
use crate::list::{FileList, Kind, Meta};
use crate::remote_list::RemoteList;

const NONE: u32 = u32::MAX;

/// "No index" in [`Step::other`] (`u32::MAX`).
pub const NO_INDEX: u32 = NONE;

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
    /// index (or [`NO_INDEX`] for a new directory); sends: the remote index
    /// of the delta basis (or [`NO_INDEX`]: none), see [`Step::basis`].
    pub other: u32,
}

impl Step {
    /// For a send, the remote index of the file the remote should use as the
    /// delta basis (`remote.path(basis)` is its path): the same path for a
    /// changed file, a chosen remote file for a new one (see the module docs).
    pub fn basis(&self) -> Option<u32> {
        (self.kind == StepKind::Send && self.other != NONE).then_some(self.other)
    }
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

    /// Files the master must send, each with its basis ([`Step::basis`]).
    pub fn sends(&self) -> &[Step] {
        &self.steps[self.n_before..self.n_before + self.n_sends]
    }

    /// Deferred deletions (of bases), symlinks, hard links and attribute
    /// fixes, to apply after sending.
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
    /// `(master, remote)` of the candidates whose remote entry is not the same as the
    /// master's (the others are the regular files among the remote list's bits).
    candidates: Vec<(u32, u32)>,
    n_candidates: usize,
    /// `(member, leader)` for every master hard-link group member, sorted.
    leader_of: Vec<(u32, u32)>,
    skipped: Vec<u32>,
    /// Remote regular files that may serve as a basis for a new file: the
    /// remote-only ones and those a master symlink replaces (usually few).
    basis_pool: Vec<u32>,
    /// The remote files of `basis_pool` that a master symlink replaces (sorted).
    replaced_by_symlink: Vec<u32>,
}

/// Groups linked entries of a list by `(dev, inode)`: `(key, index)` sorted, the
/// indexes given by `index_of`.
fn link_groups(list: &FileList, index_of: impl Fn(u32) -> u32) -> Vec<((u64, u64), u32)> {
    let mut v: Vec<((u64, u64), u32)> = (0..list.len() as u32)
        .filter_map(|i| list.link_key(i).map(|k| (k, index_of(i))))
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

/// The remote indexes strictly beneath directory `d` (one range: the list is
/// sorted, and every path with the prefix `d/` sorts together).
fn subtree(remote: &FileList, d: u32) -> std::ops::Range<u32> {
    let dir = remote.path(d);
    let below = |i: u32| {
        let p = remote.path(i);
        // Whether `p` sorts before every path beginning with `dir/`.
        match p.get(..dir.len()) {
            Some(head) if head == dir => p.get(dir.len()).is_none_or(|&c| c < b'/'),
            _ => p < dir,
        }
    };
    let inside = |i: u32| {
        let p = remote.path(i);
        p.len() > dir.len() && p.starts_with(dir) && p[dir.len()] == b'/'
    };
    let (mut lo, mut hi) = (d + 1, remote.len() as u32);
    // First index not `below`.
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if below(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let start = lo;
    let mut hi = remote.len() as u32;
    // First index after `start` not `inside`.
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if inside(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    start..lo
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
    /// Diffs `master` against `remote` (held against `master`).
    pub fn new(master: &FileList, remote: &RemoteList, opts: PlanOptions) -> Self {
        let mut p = PairPlan {
            opts,
            deletes: Vec::new(),
            mkdirs: Vec::new(),
            dirs: Vec::new(),
            symlinks: Vec::new(),
            link_attrs: Vec::new(),
            files: Vec::new(),
            candidates: Vec::new(),
            n_candidates: 0,
            leader_of: Vec::new(),
            skipped: Vec::new(),
            basis_pool: Vec::new(),
            replaced_by_symlink: Vec::new(),
        };
        // Master hard-link groups: leader = first member in path order.
        let groups = link_groups(master, |i| i);
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
        // Only the others can be hard-linked.
        let others = remote.others();
        let remote_groups = link_groups(others, |j| remote.other_index(j));

        // The merge of the master with the remote's others; a master entry whose remote
        // entry is the same is matched with it (remote index = master index).
        let (mut i, mut j) = (0u32, 0u32);
        let (nm, no) = (master.len() as u32, others.len() as u32);
        while i < nm || j < no {
            if i < nm && remote.has_same(i) {
                p.on_master(master, remote, i, i, &remote_groups);
                i += 1;
                continue;
            }
            let ord = if i == nm {
                std::cmp::Ordering::Greater
            } else if j == no {
                std::cmp::Ordering::Less
            } else {
                FileList::cmp_paths(master, i, others, j)
            };
            let r = remote.other_index(j);
            match ord {
                std::cmp::Ordering::Less => {
                    p.on_master(master, remote, i, NONE, &remote_groups);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    if others.kind(j) == Kind::File {
                        p.basis_pool.push(r);
                    }
                    if opts.delete && !others.path(j).is_empty() {
                        // Not recursive: children are listed and go first;
                        // excluded entries inside stay protected, as in rsync.
                        p.deletes.push((r, false, Why::Extra));
                    }
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    p.on_master(master, remote, i, r, &remote_groups);
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
        remote: &RemoteList,
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
        remote: &RemoteList,
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
                if rk == Kind::File && mk == Kind::Symlink {
                    // Replaced in *after*: still there during the sends.
                    self.basis_pool.push(r);
                    self.replaced_by_symlink.push(r);
                }
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
                    // A remote entry the same as the master's is a candidate by its bit;
                    // the others live only in `candidates` (8 bytes each).
                    self.n_candidates += 1;
                    if !remote.is_same(r) {
                        self.candidates.push((m, r));
                    }
                    return;
                };
                self.files.push(FileCase { m, r, state });
            }
            Kind::Special => unreachable!(),
        }
    }

    /// Chooses the basis of every new file in `sends` (sorted by master
    /// index); returns the remote indexes, sorted, whose deletion must wait
    /// until after the sends: the chosen bases that the plan deletes, and
    /// their remote-only parent directories.
    fn choose_bases(&self, master: &FileList, remote: &RemoteList, sends: &mut [Step]) -> Vec<u32> {
        let is_new = |s: &Step| matches!(s.why, Why::New | Why::KindChanged) && s.other == NONE;
        if self.basis_pool.is_empty() || !sends.iter().any(is_new) {
            return Vec::new();
        }
        // Remote directories deleted as a tree (before the sends): nothing
        // beneath them can be a basis. Their subtrees are index ranges of the
        // remote's others (like the pool: none is the same as the master's).
        let others = remote.others();
        let local = |r: u32| remote.other_of(r).expect("not the same as the master's");
        let mut gone: Vec<std::ops::Range<u32>> = self
            .deletes
            .iter()
            .filter(|d| d.1)
            .map(|d| subtree(others, local(d.0)))
            .collect();
        gone.sort_unstable_by_key(|g| g.start);
        // Nested trees: keep the outer ranges only, so that they are disjoint.
        gone.dedup_by(|inner, outer| inner.end <= outer.end);
        let under_gone = |r: u32| {
            let k = gone.partition_point(|g| g.start <= r);
            k > 0 && gone[k - 1].contains(&r)
        };
        let pool = self
            .basis_pool
            .iter()
            .map(|&r| local(r))
            .filter(|&j| !under_gone(j));
        let mut index = BasisIndex::new(others, pool);
        if index.is_empty() {
            return Vec::new();
        }
        let mut chosen: Vec<u32> = Vec::new();
        for s in sends.iter_mut().filter(|s| is_new(s)) {
            if let Some(b) = index.choose(others, master.path(s.index), master.size(s.index)) {
                s.other = remote.other_index(b);
                chosen.push(s.other);
            }
        }
        drop(index);
        if !self.opts.delete {
            return Vec::new();
        }
        chosen.sort_unstable();
        chosen.dedup();
        // Remote-only bases are deleted (`--delete`); so are their parents that
        // the master lacks (a file replaced by a symlink is no remote-only one).
        let mut deferred = Vec::new();
        let mut last_parent: &[u8] = b"";
        for b in chosen {
            if self.replaced_by_symlink.binary_search(&b).is_ok() {
                continue;
            }
            deferred.push(b);
            // Bases come in path order: siblings share the walk up.
            let first = parent(remote.path(b)).unwrap_or(b"");
            if first == last_parent {
                continue;
            }
            last_parent = first;
            let mut dir = first;
            while !dir.is_empty() && master.find(dir).is_none() {
                match remote.find(dir) {
                    Some(d) => deferred.push(d),
                    None => break,
                }
                dir = parent(dir).unwrap_or(b"");
            }
        }
        deferred.sort_unstable();
        deferred.dedup();
        deferred
    }

    /// Number of checksum candidates: the regular files whose checksums are needed on
    /// both sides (equal size).
    pub fn candidate_count(&self) -> usize {
        self.n_candidates
    }

    /// `(master index, remote index)` of the checksum candidates from master index
    /// `from` on, in master order (`remote` and `master` as given to [`PairPlan::new`]).
    pub fn candidates_from<'a>(
        &'a self,
        master: &'a FileList,
        remote: &'a RemoteList,
        from: u32,
    ) -> impl Iterator<Item = (u32, u32)> + 'a {
        let implicit = remote
            .same_from(from)
            .filter(move |&m| master.is_file(m))
            .map(|m| (m, m))
            .peekable();
        let k = self.candidates.partition_point(|c| c.0 < from);
        let explicit = self.candidates[k..].iter().copied().peekable();
        Merge(implicit, explicit)
    }

    /// The remote index of candidate `m` (a master index), if `m` is one.
    pub fn candidate(&self, master: &FileList, remote: &RemoteList, m: u32) -> Option<u32> {
        if remote.has_same(m) {
            return master.is_file(m).then_some(m);
        }
        let k = self.candidates.binary_search_by_key(&m, |c| c.0).ok()?;
        Some(self.candidates[k].1)
    }

    /// Finishes the plan; `same(m)` says whether the checksums of candidate `m` (a master
    /// index) matched.
    pub fn resolve(
        self,
        master: &FileList,
        remote: &RemoteList,
        same: impl Fn(u32) -> bool,
    ) -> Plan {
        let owner = self.opts.owner;
        let mut sends = Vec::new();
        let mut after = Vec::new();
        let mut attr_fixes = Vec::new();
        // Leaders that get sent: all their members must be relinked.
        let mut sent_leaders: Vec<u32> = Vec::new();
        for f in &self.files {
            if let FileState::Send(why) = f.state {
                // A changed file's basis is its old version; new ones get theirs below.
                sends.push(Step {
                    kind: StepKind::Send,
                    why,
                    index: f.m,
                    other: f.r,
                });
            }
        }
        for (m, r) in self.candidates_from(master, remote, 0) {
            if !same(m) {
                sends.push(Step {
                    kind: StepKind::Send,
                    why: Why::ChecksumDiffers,
                    index: m,
                    other: r,
                });
            } else if !remote.is_same(r)
                && attrs_differ(&master.meta(m), &remote.meta(r), owner, true)
            {
                // (An entry the same as the master's has the same attributes.)
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
        let deferred = self.choose_bases(master, remote, &mut sends);
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
        let mut late_deletes: Vec<Step> = Vec::new();
        let mut deletes = self.deletes;
        deletes.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        deletes.dedup_by_key(|d| d.0);
        for (r, recursive, why) in deletes {
            let step = Step {
                kind: if recursive {
                    StepKind::DeleteTree
                } else {
                    StepKind::Delete
                },
                why,
                index: r,
                other: NONE,
            };
            if deferred.binary_search(&r).is_ok() {
                late_deletes.push(step);
            } else {
                before.push(step);
            }
        }
        for &m in &self.mkdirs {
            before.push(Step {
                kind: StepKind::Mkdir,
                why: Why::New,
                index: m,
                other: NONE,
            });
        }
        let mut links = late_deletes;
        links.extend(self.symlinks.iter().map(|&(m, why)| Step {
            kind: StepKind::Symlink,
            why,
            index: m,
            other: NONE,
        }));
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
pub fn describe(step: &Step, master: &FileList, remote: &RemoteList, owner: bool) -> String {
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

/// Two candidate iterators (each in master order, none in both) merged.
struct Merge<A: Iterator<Item = (u32, u32)>, B: Iterator<Item = (u32, u32)>>(
    std::iter::Peekable<A>,
    std::iter::Peekable<B>,
);

impl<A: Iterator<Item = (u32, u32)>, B: Iterator<Item = (u32, u32)>> Iterator for Merge<A, B> {
    type Item = (u32, u32);
    fn next(&mut self) -> Option<(u32, u32)> {
        match (self.0.peek(), self.1.peek()) {
            (Some(a), Some(b)) if a.0 < b.0 => self.0.next(),
            (Some(_), Some(_)) | (None, _) => self.1.next(),
            (Some(_), None) => self.0.next(),
        }
    }
}

#[cfg(test)]
mod tests;
