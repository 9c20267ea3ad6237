//! [`FileList`]: a compact, sorted, in-memory file list.
//!
//! A million entries must fit in well under 200 bytes each, so a list is one
//! byte arena holding every path (and symlink target) plus one fixed 32-byte
//! record per entry with a `u32` offset into the arena. Hard-link identities
//! `(dev, inode)` are kept in a side table, only for the entries that have
//! more than one link.

use std::cmp::Ordering;

/// The type of an entry, as far as syncing cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Regular file.
    File = 0,
    /// Directory.
    Dir = 1,
    /// Symbolic link.
    Symlink = 2,
    /// FIFO, socket or device: listed, never synced.
    Special = 3,
}

/// The metadata of one entry, as an agent lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Meta {
    /// Entry type.
    pub kind: Option<Kind>,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes (regular files).
    pub size: u64,
    /// Modification time, seconds.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// File system device.
    pub dev: u64,
    /// Inode number.
    pub inode: u64,
    /// Hard link count.
    pub nlink: u64,
}

const F_LINKED: u8 = 1;
/// The entry came with a cached digest (see [`FileList::digest`]).
const F_DIGEST: u8 = 2;

/// Where a linked entry's path is: `(path_off, path_len)`. The offset alone is not
/// unique: an entry without bytes (the root `""`, no target) shares it with the next.
type LinkAt = (u32, u16);

/// One fixed-size record (32 bytes). Owners are interned: trees have few
/// distinct (uid, gid) pairs.
#[derive(Clone, Copy, Debug)]
struct Rec {
    size: u64,
    mtime_sec: i64,
    path_off: u32,
    mtime_nsec: u32,
    path_len: u16,
    mode: u16,
    owner: u16,
    kind: Kind,
    flags: u8,
}

/// Errors building a [`FileList`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListError {
    /// A path (or symlink target) longer than 65,535 bytes.
    PathTooLong {
        /// The start of the offending path.
        path: Vec<u8>,
    },
    /// More than 4 GiB of path bytes, more than 2^32-2 entries, or more
    /// than 65,536 distinct (uid, gid) pairs.
    TooLarge,
    /// The same path twice.
    Duplicate {
        /// The path.
        path: Vec<u8>,
    },
    /// A listed digest of another width than the list's first one.
    DigestWidth {
        /// The list's width.
        expected: usize,
        /// The offending digest's.
        got: usize,
    },
}

impl std::fmt::Display for ListError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListError::PathTooLong { path } => write!(
                f,
                "path too long: '{}...'",
                String::from_utf8_lossy(&path[..path.len().min(64)])
            ),
            ListError::TooLarge => f.write_str(
                "file list too large (4 GiB of paths, 2^32 entries or 65,536 distinct owners)",
            ),
            ListError::Duplicate { path } => {
                write!(f, "path listed twice: '{}'", String::from_utf8_lossy(path))
            }
            ListError::DigestWidth { expected, got } => write!(
                f,
                "protocol error: a listed digest of {got} bytes where the list's are {expected}"
            ),
        }
    }
}

impl std::error::Error for ListError {}

/// A file list sorted by path (bytewise), so that a directory comes before
/// everything beneath it and two lists diff with one merge pass.
///
/// ```
/// use fleetsync_server::list::{FileList, Kind, Meta};
///
/// let mut list = FileList::new();
/// let file = Meta { kind: Some(Kind::File), mode: 0o644, size: 3, nlink: 1, ..Meta::default() };
/// list.push(b"b", &file, b"").unwrap();
/// list.push(b"a", &file, b"").unwrap();
/// list.finish().unwrap();
/// assert_eq!(list.path(0), b"a");
/// assert_eq!(list.find(b"b"), Some(1));
/// ```
#[derive(Debug, Default)]
pub struct FileList {
    arena: Vec<u8>,
    recs: Vec<Rec>,
    /// `((path_off, path_len), dev, inode)` of the entries with nlink > 1, sorted.
    links: Vec<(LinkAt, u64, u64)>,
    /// Distinct (uid, gid) pairs, indexed by `Rec::owner`.
    owners: Vec<(u32, u32)>,
    owner_ix: std::collections::HashMap<(u32, u32), u16>,
    /// Listed digests: the `path_off` of each entry that has one (ascending: entries are
    /// pushed in arena order; unique: only regular files, whose paths are never empty, have
    /// one) and the digests, `digest_width` bytes each, in that order.
    digest_offs: Vec<u32>,
    digests: Vec<u8>,
    digest_width: usize,
    /// A bit per entry of a finished list: a regular file. The checksum candidates are
    /// walked several times per remote; a bit is 256 times less memory to stream than
    /// the record's kind.
    files: Vec<u64>,
    sorted: bool,
}

impl FileList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    /// Bytes of heap memory held (capacity, not length).
    pub fn heap_bytes(&self) -> usize {
        self.arena.capacity()
            + self.recs.capacity() * std::mem::size_of::<Rec>()
            + self.links.capacity() * std::mem::size_of::<(LinkAt, u64, u64)>()
            + self.digest_offs.capacity() * 4
            + self.digests.capacity()
    }

    /// Gives the entry pushed last the digest it was listed with (every digest of a list
    /// has the width of its first).
    pub fn set_last_digest(&mut self, digest: &[u8]) -> Result<(), ListError> {
        let Some(rec) = self.recs.last_mut() else {
            return Ok(());
        };
        if self.digest_offs.is_empty() {
            self.digest_width = digest.len();
        } else if digest.len() != self.digest_width {
            return Err(ListError::DigestWidth {
                expected: self.digest_width,
                got: digest.len(),
            });
        }
        if rec.flags & F_DIGEST == 0 {
            rec.flags |= F_DIGEST;
            self.digest_offs.push(rec.path_off);
            self.digests.extend_from_slice(digest);
        }
        Ok(())
    }

    /// The digest entry `i` was listed with.
    pub fn digest(&self, i: u32) -> Option<&[u8]> {
        self.digest_near(i, &mut 0)
    }

    /// [`FileList::digest`], looking first where `next` says (then set past the digest
    /// found): lookups in the order the entries were pushed take no search (a binary
    /// search over a million digests per remote entry was most of a warm re-sync's server
    /// CPU).
    pub fn digest_near(&self, i: u32, next: &mut usize) -> Option<&[u8]> {
        let r = self.rec(i);
        if r.flags & F_DIGEST == 0 {
            return None;
        }
        let k = if self.digest_offs.get(*next) == Some(&r.path_off) {
            *next
        } else {
            self.digest_offs.binary_search(&r.path_off).ok()?
        };
        *next = k + 1;
        self.digests
            .get(k * self.digest_width..(k + 1) * self.digest_width)
    }

    /// Whether any entry was listed with a digest.
    pub fn has_digests(&self) -> bool {
        !self.digest_offs.is_empty()
    }

    /// Appends one entry; `link_target` is stored for symlinks only.
    pub fn push(&mut self, path: &[u8], meta: &Meta, link_target: &[u8]) -> Result<(), ListError> {
        let kind = meta.kind.unwrap_or(Kind::Special);
        let target: &[u8] = if kind == Kind::Symlink {
            link_target
        } else {
            b""
        };
        if path.len() > u16::MAX as usize || target.len() > u16::MAX as usize {
            return Err(ListError::PathTooLong {
                path: path[..path.len().min(256)].to_vec(),
            });
        }
        let off = self.arena.len();
        if off + path.len() + target.len() > u32::MAX as usize
            || self.recs.len() >= u32::MAX as usize - 1
        {
            return Err(ListError::TooLarge);
        }
        self.arena.extend_from_slice(path);
        self.arena.extend_from_slice(target);
        let owner = match self.owner_ix.get(&(meta.uid, meta.gid)) {
            Some(&o) => o,
            None => {
                if self.owners.len() > u16::MAX as usize {
                    return Err(ListError::TooLarge);
                }
                let o = self.owners.len() as u16;
                self.owners.push((meta.uid, meta.gid));
                self.owner_ix.insert((meta.uid, meta.gid), o);
                o
            }
        };
        let linked = kind == Kind::File && meta.nlink > 1;
        if linked {
            self.links
                .push(((off as u32, path.len() as u16), meta.dev, meta.inode));
        }
        self.recs.push(Rec {
            size: if kind == Kind::Symlink {
                target.len() as u64
            } else {
                meta.size
            },
            mtime_sec: meta.mtime_sec,
            path_off: off as u32,
            mtime_nsec: meta.mtime_nsec,
            path_len: path.len() as u16,
            mode: (meta.mode & 0o7777) as u16,
            owner,
            kind,
            flags: if linked { F_LINKED } else { 0 },
        });
        self.sorted = false;
        Ok(())
    }

    /// Sorts by path and trims spare capacity; call once after the last push.
    pub fn finish(&mut self) -> Result<(), ListError> {
        self.finish_mapped().map(drop)
    }

    /// [`FileList::finish`], giving where each entry went: `moved[i]` is the sorted
    /// index of the entry pushed `i`th (indexes taken while the list was built are
    /// mapped with it).
    pub fn finish_mapped(&mut self) -> Result<Vec<u32>, ListError> {
        let n = self.recs.len();
        // Sorting indexes, not the 32-byte records, keeps the insertion order at hand
        // (order[k]: the entry that goes to k) for 4 bytes per entry.
        let mut order: Vec<u32> = (0..n as u32).collect();
        {
            let (arena, recs) = (&self.arena, &self.recs);
            let path = |i: u32| {
                let r = &recs[i as usize];
                &arena[r.path_off as usize..][..r.path_len as usize]
            };
            order.sort_unstable_by(|&a, &b| path(a).cmp(path(b)));
            if let Some(w) = order.windows(2).find(|w| path(w[0]) == path(w[1])) {
                return Err(ListError::Duplicate {
                    path: path(w[0]).to_vec(),
                });
            }
        }
        // Moves the records in place along the cycles of `order`.
        let mut visited = vec![0u64; n.div_ceil(64)];
        for start in 0..n {
            if visited[start / 64] & (1 << (start % 64)) != 0 {
                continue;
            }
            let first = self.recs[start];
            let mut j = start;
            loop {
                visited[j / 64] |= 1 << (j % 64);
                let k = order[j] as usize;
                if k == start {
                    self.recs[j] = first;
                    break;
                }
                self.recs[j] = self.recs[k];
                j = k;
            }
        }
        drop(visited);
        self.files = vec![0; n.div_ceil(64)];
        for (i, r) in self.recs.iter().enumerate() {
            if r.kind == Kind::File {
                self.files[i / 64] |= 1 << (i % 64);
            }
        }
        let mut moved = vec![0u32; n];
        for (k, &o) in order.iter().enumerate() {
            moved[o as usize] = k as u32;
        }
        drop(order);
        self.links.sort_unstable_by_key(|l| l.0);
        debug_assert!(self.links.windows(2).all(|w| w[0].0 < w[1].0));
        self.arena.shrink_to_fit();
        self.recs.shrink_to_fit();
        self.links.shrink_to_fit();
        self.digest_offs.shrink_to_fit();
        self.digests.shrink_to_fit();
        self.owner_ix = std::collections::HashMap::new();
        self.sorted = true;
        Ok(moved)
    }

    /// Whether entry `i` is the same as an entry of another list with `meta` and
    /// `link_target`, as far as a plan can tell: kind, mode, owner, mtime, size (of a
    /// regular file) or target (of a symlink), and neither is a regular file with other
    /// hard links. A directory's size is no part of it (no plan looks at it).
    pub fn same_entry(&self, i: u32, meta: &Meta, link_target: &[u8]) -> bool {
        let r = self.rec(i);
        let kind = meta.kind.unwrap_or(Kind::Special);
        r.kind == kind
            && r.flags & F_LINKED == 0
            && !(kind == Kind::File && meta.nlink > 1)
            && r.mode == (meta.mode & 0o7777) as u16
            && r.mtime_sec == meta.mtime_sec
            && r.mtime_nsec == meta.mtime_nsec
            && self.owners[r.owner as usize] == (meta.uid, meta.gid)
            && match kind {
                Kind::File => r.size == meta.size,
                Kind::Symlink => self.link_target(i) == link_target,
                Kind::Dir | Kind::Special => true,
            }
    }

    fn rec(&self, i: u32) -> &Rec {
        &self.recs[i as usize]
    }

    /// The relative path of entry `i` (`b""` is the root).
    pub fn path(&self, i: u32) -> &[u8] {
        let r = self.rec(i);
        &self.arena[r.path_off as usize..][..r.path_len as usize]
    }

    /// The symlink target of entry `i` (empty for non-symlinks).
    pub fn link_target(&self, i: u32) -> &[u8] {
        let r = self.rec(i);
        if r.kind != Kind::Symlink {
            return b"";
        }
        &self.arena[r.path_off as usize + r.path_len as usize..][..r.size as usize]
    }

    /// The metadata of entry `i` (dev/inode only for linked regular files,
    /// nlink 1 or 2 meaning "not linked" / "linked").
    pub fn meta(&self, i: u32) -> Meta {
        let r = self.rec(i);
        let (dev, inode) = self.link_key(i).unwrap_or((0, 0));
        let (uid, gid) = self.owners[r.owner as usize];
        Meta {
            kind: Some(r.kind),
            mode: r.mode as u32,
            uid,
            gid,
            size: r.size,
            mtime_sec: r.mtime_sec,
            mtime_nsec: r.mtime_nsec,
            dev,
            inode,
            nlink: if r.flags & F_LINKED != 0 { 2 } else { 1 },
        }
    }

    /// The entry type.
    pub fn kind(&self, i: u32) -> Kind {
        self.rec(i).kind
    }

    /// Whether entry `i` is a regular file (as `kind(i) == Kind::File`, from a bit per
    /// entry once the list is finished).
    pub fn is_file(&self, i: u32) -> bool {
        match self.files.get(i as usize / 64) {
            Some(w) if self.sorted => w & (1 << (i % 64)) != 0,
            _ => self.kind(i) == Kind::File,
        }
    }

    /// Size in bytes.
    pub fn size(&self, i: u32) -> u64 {
        self.rec(i).size
    }

    /// `(dev, inode)` of a regular file with more than one link.
    pub fn link_key(&self, i: u32) -> Option<(u64, u64)> {
        let r = self.rec(i);
        if r.flags & F_LINKED == 0 {
            return None;
        }
        let k = self
            .links
            .binary_search_by_key(&(r.path_off, r.path_len), |l| l.0)
            .ok()?;
        Some((self.links[k].1, self.links[k].2))
    }

    /// Index of `path` (the list must be finished).
    pub fn find(&self, path: &[u8]) -> Option<u32> {
        debug_assert!(self.sorted || self.recs.len() < 2);
        self.recs
            .binary_search_by(|r| {
                let p = &self.arena[r.path_off as usize..][..r.path_len as usize];
                p.cmp(path)
            })
            .ok()
            .map(|i| i as u32)
    }

    pub(crate) fn cmp_paths(a: &FileList, i: u32, b: &FileList, j: u32) -> Ordering {
        a.path(i).cmp(b.path(j))
    }
}

/// Tests: a plain regular file of `size` bytes (mode 0644, mtime 100, one link).
#[cfg(test)]
pub(crate) fn test_file(size: u64) -> Meta {
    Meta {
        kind: Some(Kind::File),
        mode: 0o644,
        size,
        mtime_sec: 100,
        nlink: 1,
        ..Meta::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_is_32_bytes() {
        assert_eq!(std::mem::size_of::<Rec>(), 32);
    }

    #[test]
    fn sorted_parent_before_children() {
        let mut l = FileList::new();
        let d = Meta {
            kind: Some(Kind::Dir),
            ..Meta::default()
        };
        for p in [&b"a/b"[..], b"a-b", b"a", b"", b"a/b/c"] {
            l.push(p, &d, b"").unwrap();
        }
        l.finish().unwrap();
        let got: Vec<&[u8]> = (0..l.len() as u32).map(|i| l.path(i)).collect();
        assert_eq!(got, vec![&b""[..], b"a", b"a-b", b"a/b", b"a/b/c"]);
    }

    #[test]
    fn symlink_target_and_links_survive_sorting() {
        let mut l = FileList::new();
        let s = Meta {
            kind: Some(Kind::Symlink),
            ..Meta::default()
        };
        let f = Meta {
            kind: Some(Kind::File),
            nlink: 2,
            dev: 7,
            inode: 9,
            ..Meta::default()
        };
        l.push(b"z", &s, b"target/\xff").unwrap();
        l.push(b"y", &f, b"ignored").unwrap();
        l.finish().unwrap();
        assert_eq!(l.link_target(1), b"target/\xff");
        assert_eq!(l.link_key(0), Some((7, 9)));
        assert_eq!(l.link_key(1), None);
        assert_eq!(l.link_target(0), b"");
    }

    #[test]
    fn listed_digests_follow_their_entries_through_sorting() {
        let mut l = FileList::new();
        let f = Meta {
            kind: Some(Kind::File),
            ..Meta::default()
        };
        l.push(b"c", &f, b"").unwrap();
        l.set_last_digest(&[3, 3]).unwrap();
        l.push(b"b", &f, b"").unwrap();
        l.push(b"a", &f, b"").unwrap();
        l.set_last_digest(&[1, 1]).unwrap();
        assert!(matches!(
            l.set_last_digest(&[1, 1, 1]),
            Err(ListError::DigestWidth {
                expected: 2,
                got: 3
            })
        ));
        l.finish().unwrap();
        assert_eq!(l.digest(0), Some(&[1u8, 1][..]));
        assert_eq!(l.digest(1), None);
        assert_eq!(l.digest(2), Some(&[3u8, 3][..]));
    }

    #[test]
    fn regression_linked_empty_path_and_the_next_entry_keep_their_inodes() {
        // "" has no bytes in the arena: "b" starts at the same offset.
        let f = |inode| Meta {
            kind: Some(Kind::File),
            nlink: 2,
            dev: 1,
            inode,
            ..Meta::default()
        };
        let mut l = FileList::new();
        l.push(b"", &f(4), b"").unwrap();
        l.push(b"b", &f(7), b"").unwrap();
        l.finish().unwrap();
        assert_eq!(l.link_key(0), Some((1, 4)));
        assert_eq!(l.link_key(1), Some((1, 7)));
    }

    #[test]
    fn duplicates_rejected() {
        let mut l = FileList::new();
        let f = Meta::default();
        l.push(b"x", &f, b"").unwrap();
        l.push(b"x", &f, b"").unwrap();
        assert!(matches!(l.finish(), Err(ListError::Duplicate { .. })));
    }
}
