//! [`RemoteList`]: a remote's file list held against the master's.
//!
//! With a million files on each of many remotes that mostly match the master, holding
//! every remote list whole costs the master's list again per remote. A remote entry that
//! is the same as the master's ([`FileList::same_entry`]: same path, kind, mode, owner,
//! mtime, size or symlink target, neither hard-linked) is one bit over the master's
//! indexes; only the other entries (different, remote-only, hard-linked) are kept, in a
//! [`FileList`] of their own.
//!
//! The lists are compacted as they stream in ([`RemoteBuilder`]): each remote entry is
//! matched on arrival with the master's entries listed so far. Agents walk their trees
//! in the same order ([`walk_order`]), so the master entry after the last match is most
//! often the one, and the master's list in the order it arrives can be searched by
//! bisection (no index). A remote entry that comes before the master's waits (pending)
//! until the master has listed more, and a remote whose list runs too far ahead is not
//! read for a while ([`RemoteBuilder::wants_input`]).
//!
//! ```
//! use std::sync::Arc;
//! use fleetsync_server::list::{FileList, Kind, Meta};
//! use fleetsync_server::remote_list::RemoteList;
//!
//! let file = Meta { kind: Some(Kind::File), mode: 0o644, size: 3, nlink: 1, ..Meta::default() };
//! let mut master = FileList::new();
//! master.push(b"a", &file, b"").unwrap();
//! master.push(b"b", &file, b"").unwrap();
//! master.finish().unwrap();
//! let mut remote = FileList::new();
//! remote.push(b"a", &file, b"").unwrap();
//! remote.push(b"c", &file, b"").unwrap();
//! remote.finish().unwrap();
//!
//! let r = RemoteList::compact(Arc::new(master), &remote).unwrap();
//! assert_eq!(r.len(), 2);
//! assert_eq!(r.others().len(), 1); // only "c" is held as a record
//! let a = r.find(b"a").unwrap();
//! assert!(r.is_same(a));
//! assert_eq!(r.path(a), b"a");
//! ```

use std::sync::Arc;

use crate::list::{FileList, Kind, ListError, Meta};

/// Pending entries are matched again when the master list has grown by as many, and by
/// at least this many (the tests match them again more often).
const RETRY_MIN: usize = if cfg!(test) { 2 } else { 4096 };
/// Pending entries beyond which a remote's list should wait for the master's (about
/// 100 bytes each).
const PENDING_MAX: usize = 32_768;

/// The order in which agents walk a tree (names sorted per directory, a directory
/// before its contents): bytewise with `/` before every other byte.
pub fn walk_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let key = |&c: &u8| if c == b'/' { 0 } else { u16::from(c) + 1 };
    a.iter().map(key).cmp(b.iter().map(key))
}

/// A bit per master index.
#[derive(Clone, Debug, Default)]
struct Bits(Vec<u64>);

impl Bits {
    fn get(&self, i: u32) -> bool {
        self.0
            .get(i as usize / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set(&mut self, i: u32) {
        let w = i as usize / 64;
        if w >= self.0.len() {
            // Grows with the master list while it arrives.
            self.0.resize((w + 1).next_power_of_two(), 0);
        }
        self.0[w] |= 1 << (i % 64);
    }

    /// How many bits are set.
    fn count(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The set bits at `from` or after, in order.
    fn iter_from(&self, from: u32) -> impl Iterator<Item = u32> + '_ {
        let w0 = from as usize / 64;
        self.0
            .iter()
            .enumerate()
            .skip(w0)
            .flat_map(move |(w, &word)| {
                let word = if w == w0 {
                    word & (!0u64 << (from % 64))
                } else {
                    word
                };
                BitsOf(word).map(move |b| (w * 64) as u32 + b)
            })
    }
}

struct BitsOf(u64);

impl Iterator for BitsOf {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(b)
    }
}

/// A remote's finished list: the entries the same as the master's (a bit per master
/// index) and the others.
///
/// Remote indexes: `r` below the master's length is the remote entry the same as master
/// entry `r` ([`RemoteList::is_same`]); `master.len() + j` is entry `j` of
/// [`RemoteList::others`]. The others are in path order, so are their indexes; an entry
/// the same as the master's reads as the master's (path, metadata).
#[derive(Debug)]
pub struct RemoteList {
    master: Arc<FileList>,
    nm: u32,
    same: Bits,
    n_same: usize,
    others: FileList,
    /// Listed digests of the entries the same as the master's (the others keep theirs in
    /// [`RemoteList::others`]), until [`RemoteList::take_listed_digests`].
    listed: ListedDigests,
}

/// The digests a remote listed for its entries the same as the master's: a bit per master
/// index where it equals the master's listed digest (the common case: a warm re-sync costs
/// a bit per file), the few others held with their master index.
#[derive(Debug, Default)]
pub struct ListedDigests {
    equal: Bits,
    held: Vec<u32>,
    held_digests: Vec<u8>,
    width: usize,
}

impl ListedDigests {
    fn push(&mut self, m: u32, remote: &[u8], master: Option<&[u8]>) -> Result<(), ListError> {
        if master == Some(remote) {
            self.equal.set(m);
            return Ok(());
        }
        if self.held.is_empty() {
            self.width = remote.len();
        } else if remote.len() != self.width {
            return Err(ListError::DigestWidth {
                expected: self.width,
                got: remote.len(),
            });
        }
        self.held.push(m);
        self.held_digests.extend_from_slice(remote);
        Ok(())
    }

    /// The master list was sorted: the indexes move with it.
    fn remap(&mut self, moved: &[u32]) {
        let mut equal = Bits(vec![0; moved.len().div_ceil(64)]);
        for i in self.equal.iter_from(0) {
            equal.set(moved[i as usize]);
        }
        self.equal = equal;
        for m in &mut self.held {
            *m = moved[*m as usize];
        }
    }

    /// How many entries listed a digest.
    pub fn len(&self) -> usize {
        self.equal.count() + self.held.len()
    }

    /// Whether no entry listed a digest.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Master indexes whose remote digest equals the master's listed one.
    pub fn equal(&self) -> impl Iterator<Item = u32> + '_ {
        self.equal.iter_from(0)
    }

    /// `(master index, remote digest)` of the others.
    pub fn held(&self) -> impl Iterator<Item = (u32, &[u8])> + '_ {
        self.held
            .iter()
            .enumerate()
            .map(|(k, &m)| (m, &self.held_digests[k * self.width..][..self.width]))
    }
}

impl Default for RemoteList {
    fn default() -> Self {
        RemoteList {
            master: Arc::new(FileList::new()),
            nm: 0,
            same: Bits::default(),
            n_same: 0,
            others: FileList::new(),
            listed: ListedDigests::default(),
        }
    }
}

impl RemoteList {
    /// Compacts a finished remote list against a finished master list.
    pub fn compact(master: Arc<FileList>, remote: &FileList) -> Result<RemoteList, ListError> {
        let mut b = RemoteBuilder::default();
        let ctx = MasterRef {
            list: &master,
            complete: true,
            walk_sorted: false,
        };
        for j in 0..remote.len() as u32 {
            let e = (remote.path(j), remote.meta(j), remote.link_target(j));
            b.push(e.0, &e.1, e.2, remote.digest(j), &ctx)?;
        }
        b.finish(master.clone())
    }

    /// A remote list held whole, nothing matched (what the server did before compacting:
    /// the reference of the tests).
    pub fn plain(master: Arc<FileList>, remote: FileList) -> Result<RemoteList, ListError> {
        if master.len() + remote.len() >= u32::MAX as usize {
            return Err(ListError::TooLarge);
        }
        Ok(RemoteList {
            nm: master.len() as u32,
            master,
            same: Bits::default(),
            n_same: 0,
            others: remote,
            listed: ListedDigests::default(),
        })
    }

    /// The master list this one is held against.
    pub fn master(&self) -> &FileList {
        &self.master
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.n_same + self.others.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of entries the same as the master's.
    pub fn same_count(&self) -> usize {
        self.n_same
    }

    /// Whether remote index `r` is an entry the same as the master's (at master index `r`).
    pub fn is_same(&self, r: u32) -> bool {
        r < self.nm
    }

    /// Whether the remote has master entry `m`'s path, the same as the master's.
    pub fn has_same(&self, m: u32) -> bool {
        self.same.get(m)
    }

    /// The master indexes whose remote entry is the same, from `from` on, in order.
    pub fn same_from(&self, from: u32) -> impl Iterator<Item = u32> + '_ {
        self.same.iter_from(from)
    }

    /// The digests listed with the entries the same as the master's (the others' are in
    /// [`RemoteList::others`]); they are freed from the list.
    pub fn take_listed_digests(&mut self) -> ListedDigests {
        std::mem::take(&mut self.listed)
    }

    /// The remote entries that are not the same as the master's, sorted by path.
    pub fn others(&self) -> &FileList {
        &self.others
    }

    /// The remote index of entry `j` of [`RemoteList::others`].
    pub fn other_index(&self, j: u32) -> u32 {
        self.nm + j
    }

    /// The index in [`RemoteList::others`] of remote index `r` (`None`: the same as
    /// the master's).
    pub fn other_of(&self, r: u32) -> Option<u32> {
        r.checked_sub(self.nm)
    }

    /// Whether `r` is a remote index of this list.
    pub fn contains(&self, r: u32) -> bool {
        match self.other_of(r) {
            None => self.same.get(r),
            Some(j) => (j as usize) < self.others.len(),
        }
    }

    /// The list holding entry `r`, and its index there: the master's for an entry the
    /// same as the master's, else the others.
    fn at(&self, r: u32) -> (&FileList, u32) {
        match self.other_of(r) {
            None => (&self.master, r),
            Some(j) => (&self.others, j),
        }
    }

    /// The relative path of entry `r`.
    pub fn path(&self, r: u32) -> &[u8] {
        let (list, i) = self.at(r);
        list.path(i)
    }

    /// The symlink target of entry `r` (empty for non-symlinks).
    pub fn link_target(&self, r: u32) -> &[u8] {
        let (list, i) = self.at(r);
        list.link_target(i)
    }

    /// The metadata of entry `r` (see [`FileList::meta`]).
    pub fn meta(&self, r: u32) -> Meta {
        let (list, i) = self.at(r);
        list.meta(i)
    }

    /// The entry type.
    pub fn kind(&self, r: u32) -> Kind {
        let (list, i) = self.at(r);
        list.kind(i)
    }

    /// Size in bytes.
    pub fn size(&self, r: u32) -> u64 {
        let (list, i) = self.at(r);
        list.size(i)
    }

    /// `(dev, inode)` of a regular file with more than one link (never one the same as
    /// the master's).
    pub fn link_key(&self, r: u32) -> Option<(u64, u64)> {
        self.other_of(r).and_then(|j| self.others.link_key(j))
    }

    /// The remote index of `path`.
    pub fn find(&self, path: &[u8]) -> Option<u32> {
        match self.others.find(path) {
            Some(j) => Some(self.other_index(j)),
            None => self.master.find(path).filter(|&m| self.same.get(m)),
        }
    }

    /// Bytes of heap memory held (the master's list not counted).
    pub fn heap_bytes(&self) -> usize {
        self.same.0.capacity() * 8 + self.others.heap_bytes()
    }
}

/// The master's list as a remote entry is matched against it: complete (sorted) or still
/// arriving (in the order listed).
pub(crate) struct MasterRef<'a> {
    pub(crate) list: &'a FileList,
    pub(crate) complete: bool,
    /// The entries so far came in [`walk_order`] (as agents list them): the list in the
    /// order it arrives can be bisected.
    pub(crate) walk_sorted: bool,
}

impl MasterRef<'_> {
    /// The master index of `path`, trying `guess` first. While the master list is
    /// incomplete, `None` may also mean "not yet", or "not found" in a list not in walk
    /// order (the entry is matched again later: a miss is never a wrong answer).
    fn find(&self, path: &[u8], guess: u32) -> Option<u32> {
        let list = self.list;
        if (guess as usize) < list.len() && list.path(guess) == path {
            return Some(guess);
        }
        if self.complete {
            return list.find(path);
        }
        if !self.walk_sorted {
            return None;
        }
        // A remote ahead of the master (the usual miss): past the master's last entry,
        // known with one comparison instead of a bisection.
        match list.len().checked_sub(1) {
            Some(last) if walk_order(list.path(last as u32), path).is_lt() => return None,
            None => return None,
            _ => {}
        }
        let (mut lo, mut hi) = (0u32, list.len() as u32);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match walk_order(list.path(mid), path) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }
}

/// A remote's list while it arrives, compacted as it comes (see the module docs).
#[derive(Default)]
pub(crate) struct RemoteBuilder {
    /// A bit per master index whose remote entry is the same: insertion indexes of the
    /// master list until it is sorted ([`RemoteBuilder::master_sorted`]).
    same: Bits,
    n_same: usize,
    /// Digests listed with the entries in `same`.
    listed: ListedDigests,
    /// Where the master's next listed digest most likely is (see
    /// [`FileList::digest_near`]).
    digest_guess: usize,
    /// Entries that matched no master entry while the master list was incomplete.
    pending: FileList,
    /// The master list's length when `pending` was last matched.
    pending_checked: usize,
    others: FileList,
    /// The master index after the last match: agents walk in the same order, so the
    /// next remote entry is most often there (no hashing, no random memory access).
    guess: u32,
}

impl RemoteBuilder {
    /// Entries received so far.
    pub(crate) fn len(&self) -> usize {
        self.n_same + self.pending.len() + self.others.len()
    }

    /// Whether more entries may come: not while [`PENDING_MAX`] wait for the master's,
    /// unless the master (of `master_len` entries) has grown enough to match them again.
    pub(crate) fn wants_input(&self, master_len: usize) -> bool {
        self.pending.len() < PENDING_MAX || master_len - self.pending_checked >= self.pending.len()
    }

    /// Entries that wait for the master's.
    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// One remote entry, with the digest it was listed with.
    pub(crate) fn push(
        &mut self,
        path: &[u8],
        meta: &Meta,
        link_target: &[u8],
        digest: Option<&[u8]>,
        master: &MasterRef<'_>,
    ) -> Result<(), ListError> {
        if !self.matched(path, meta, link_target, digest, master)? {
            self.pending.push(path, meta, link_target)?;
            if let Some(d) = digest {
                self.pending.set_last_digest(d)?;
            }
            // Matched again once the master has listed as much as is pending: each
            // entry waits for a while, and the work stays linear in the lists.
            let grown = master.list.len() - self.pending_checked;
            if grown >= self.pending.len().max(RETRY_MIN) {
                self.retry_pending(master)?;
            }
        }
        Ok(())
    }

    /// Matches an entry against the master; `false`: the master may list it later.
    fn matched(
        &mut self,
        path: &[u8],
        meta: &Meta,
        link_target: &[u8],
        digest: Option<&[u8]>,
        master: &MasterRef<'_>,
    ) -> Result<bool, ListError> {
        let found = master.find(path, self.guess);
        if let Some(m) = found {
            self.guess = m + 1;
        }
        match found {
            Some(m) if master.list.same_entry(m, meta, link_target) => {
                if self.same.get(m) {
                    return Err(ListError::Duplicate {
                        path: path.to_vec(),
                    });
                }
                self.same.set(m);
                self.n_same += 1;
                if let Some(d) = digest {
                    let theirs = master.list.digest_near(m, &mut self.digest_guess);
                    self.listed.push(m, d, theirs)?;
                }
            }
            Some(_) => self.push_other(path, meta, link_target, digest)?,
            None if master.complete => self.push_other(path, meta, link_target, digest)?,
            None => return Ok(false),
        }
        Ok(true)
    }

    fn push_other(
        &mut self,
        path: &[u8],
        meta: &Meta,
        link_target: &[u8],
        digest: Option<&[u8]>,
    ) -> Result<(), ListError> {
        self.others.push(path, meta, link_target)?;
        match digest {
            Some(d) => self.others.set_last_digest(d),
            None => Ok(()),
        }
    }

    fn retry_pending(&mut self, master: &MasterRef<'_>) -> Result<(), ListError> {
        self.pending_checked = master.list.len();
        let old = std::mem::take(&mut self.pending);
        for j in 0..old.len() as u32 {
            let (path, meta, target) = (old.path(j), old.meta(j), old.link_target(j));
            let digest = old.digest(j);
            if !self.matched(path, &meta, target, digest, master)? {
                self.pending.push(path, &meta, target)?;
                if let Some(d) = digest {
                    self.pending.set_last_digest(d)?;
                }
            }
        }
        Ok(())
    }

    /// The master list was sorted (`moved[i]`: where its entry `i` went) and is complete:
    /// the bits move with it and the pending entries are matched.
    pub(crate) fn master_sorted(
        &mut self,
        moved: &[u32],
        master: &MasterRef<'_>,
    ) -> Result<(), ListError> {
        let mut same = Bits(vec![0; moved.len().div_ceil(64)]);
        for i in self.same.iter_from(0) {
            same.set(moved[i as usize]);
        }
        self.same = same;
        self.listed.remap(moved);
        self.guess = 0;
        self.retry_pending(master)
    }

    /// The remote's list is complete, and so is the master's (sorted).
    pub(crate) fn finish(mut self, master: Arc<FileList>) -> Result<RemoteList, ListError> {
        debug_assert!(self.pending.is_empty());
        self.others.finish()?;
        // A path both the same as the master's and among the others: listed twice.
        for j in 0..self.others.len() as u32 {
            let p = self.others.path(j);
            if master.find(p).is_some_and(|m| self.same.get(m)) {
                return Err(ListError::Duplicate { path: p.to_vec() });
            }
        }
        let mut list = RemoteList::plain(master, self.others)?;
        list.same = self.same;
        list.same.0.shrink_to_fit();
        list.n_same = self.n_same;
        list.listed = self.listed;
        Ok(list)
    }
}

#[cfg(test)]
mod tests;
