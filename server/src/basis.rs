//! Basis selection: for a file the master sends to a path the remote lacks, a
//! remote file that the remote can use as the delta basis.
//!
//! A release update renames files as often as it changes them: shared
//! libraries carry a hash and a version in their names
//! (`libfoo-ab12cd34.3.26.so` becomes `libfoo-9f8e7d6c.3.27.so`), package
//! metadata directories carry the version (`numpy-1.26.4.dist-info/RECORD`
//! becomes `numpy-2.0.0.dist-info/RECORD`). The old file is still on the
//! remote (the same sync deletes it), and it is the best basis for the new one.
//!
//! [`BasisIndex`] indexes the *candidate* remote files (regular files that the
//! master does not have; see [`crate::plan`] for which ones) and
//! [`BasisIndex::choose`] picks, for one new master path and size:
//!
//! 1. a candidate of **the same size** (its content may be identical: then the
//!    remote copies it and nothing is sent): first one whose normalized path
//!    is the same, then one whose normalized name is, then the candidate of
//!    that size nearest to the new path in path order;
//! 2. otherwise a candidate whose **normalized path** is the same (the same
//!    directory once version tokens are stripped from the directory names too),
//!    then one whose distinctive normalized **name** is the same in another
//!    directory, of **a close size** (within 2x), the closest size first;
//! 3. otherwise none.
//!
//! # Normalization
//! [`normalize_name`] splits a name into tokens at `.`, `-`, `_`, `+`, `~`,
//! `@` and space, and replaces every run of *variable* tokens (with the
//! separators between them) by one [`MARKER`] byte. A token is variable when
//! it is
//! - a version number: digits, optionally with a pre-release or build suffix
//!   (`26`, `0rc1`, `1a2`, `4post1`), or a version word followed by digits
//!   (`v2`, `r0`, `rc1`, `dev0`);
//! - a hash: ≥ 6 hex digits of one case with at least one digit (`ab12cd34`),
//!   or ≥ 16 letters and digits with at least 3 digits (base32 store hashes);
//! - a bare version word (`dev`, `rc`, `post`, `pre`, `alpha`, `beta`,
//!   `final`, `snapshot`) right after a variable token (`3.23.dev`).
//!
//! Everything else is kept as is, extension included, and so are digits
//! inside a word: `x86`, `md5`, `libssl3` and `python3` are names, not
//! versions.
//!
//! ```
//! use fleetsync_server::basis::{normalize_name, MARKER};
//!
//! let mut a = Vec::new();
//! let mut b = Vec::new();
//! normalize_name(b"libfoo-ab12cd34.3.26.so", &mut a);
//! normalize_name(b"libfoo-9f8e7d6c.3.27.so", &mut b);
//! assert_eq!(a, b);
//! assert_eq!(a, [&b"libfoo-"[..], &[MARKER], b".so"].concat());
//! ```
//!
//! # Cost
//! The index maps the 64-bit hash of each candidate's normalized path, of its
//! name when distinctive, and its size to the candidates that have it: about
//! 105 bytes per candidate (measured with a million), held only while a plan
//! is resolved. Candidates are usually few (the files an update removes). A
//! lookup normalizes one name (the parent directory's normalized form is
//! cached, since sends come in path order) and makes three hash lookups: no
//! per-pair comparison.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::list::FileList;

/// The byte that replaces a run of variable tokens in a normalized name (paths
/// never hold a NUL byte).
pub const MARKER: u8 = 0;

/// What [`normalize_name`] saw in a name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NameShape {
    /// At least one variable token was replaced by [`MARKER`].
    pub had_variable: bool,
    /// Kept words of at least two letters, not counting a final extension.
    pub words: u32,
}

impl NameShape {
    /// Whether the normalized name alone identifies a file well enough to
    /// match it in another directory: it was versioned or hashed and keeps a
    /// word besides the extension (`libfoo-#.so` yes; `RECORD`, `#.dat` no).
    pub fn distinctive(self) -> bool {
        self.had_variable && self.words > 0
    }
}

fn is_sep(b: u8) -> bool {
    matches!(b, b'.' | b'-' | b'_' | b'+' | b'~' | b'@' | b' ')
}

/// Words that end a version number (`0rc1`, `1a2`, `2post1`).
const SUFFIX_WORDS: &[&[u8]] = &[
    b"a", b"b", b"c", b"p", b"r", b"rc", b"dev", b"post", b"pre", b"alpha", b"beta",
];
/// Words that start a version token when digits follow (`v2`, `r0`, `rc1`).
const PREFIX_WORDS: &[&[u8]] = &[
    b"v", b"r", b"a", b"b", b"p", b"rc", b"dev", b"post", b"pre", b"alpha", b"beta",
];
/// Words that are variable on their own right after a variable token.
const LONE_WORDS: &[&[u8]] = &[
    b"dev",
    b"rc",
    b"post",
    b"pre",
    b"alpha",
    b"beta",
    b"final",
    b"snapshot",
];

fn one_of(word: &[u8], set: &[&[u8]]) -> bool {
    set.iter().any(|w| w.eq_ignore_ascii_case(word))
}

/// Splits off the leading run of bytes that satisfy `f`.
fn run(t: &[u8], f: impl Fn(u8) -> bool) -> (&[u8], &[u8]) {
    let n = t.iter().position(|&b| !f(b)).unwrap_or(t.len());
    t.split_at(n)
}

fn is_version(t: &[u8]) -> bool {
    let (prefix, t) = run(t, |b| b.is_ascii_alphabetic());
    let (digits, t) = run(t, |b| b.is_ascii_digit());
    let (suffix, t) = run(t, |b| b.is_ascii_alphabetic());
    let (_, rest) = run(t, |b| b.is_ascii_digit());
    rest.is_empty()
        && !digits.is_empty()
        && (prefix.is_empty() || one_of(prefix, PREFIX_WORDS))
        && (suffix.is_empty() || one_of(suffix, SUFFIX_WORDS))
}

fn is_hash(t: &[u8]) -> bool {
    let digits = t.iter().filter(|b| b.is_ascii_digit()).count();
    let hex_lower = t.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let hex_upper = t.iter().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F'));
    (t.len() >= 6 && digits > 0 && (hex_lower || hex_upper))
        || (t.len() >= 16 && digits >= 3 && t.iter().all(u8::is_ascii_alphanumeric))
}

/// Appends the normalized form of one path component (no `/`) to `out`: see
/// the module docs. Returns what it saw.
pub fn normalize_name(name: &[u8], out: &mut Vec<u8>) -> NameShape {
    let mut shape = NameShape::default();
    let mut in_var = false;
    // Whether the last token was a kept word after a '.' (an extension).
    let mut last_ext_word = false;
    let mut rest = name;
    while !rest.is_empty() {
        let (seps, r) = run(rest, is_sep);
        let (tok, r) = run(r, |b| !is_sep(b));
        rest = r;
        if tok.is_empty() {
            out.extend_from_slice(seps);
            break;
        }
        let var = is_version(tok) || is_hash(tok) || (in_var && one_of(tok, LONE_WORDS));
        if var {
            if !in_var {
                out.extend_from_slice(seps);
                out.push(MARKER);
                in_var = true;
            }
            shape.had_variable = true;
            last_ext_word = false;
        } else {
            out.extend_from_slice(seps);
            out.extend_from_slice(tok);
            in_var = false;
            let word = tok.iter().filter(|b| b.is_ascii_alphabetic()).count() >= 2;
            if word {
                shape.words += 1;
            }
            last_ext_word = word && seps.last() == Some(&b'.');
        }
    }
    if last_ext_word {
        shape.words -= 1;
    }
    shape
}

/// Appends the normalized form of a relative path (every component
/// normalized, joined by `/`) to `out`; returns the shape of the last component.
pub fn normalize_path(path: &[u8], out: &mut Vec<u8>) -> NameShape {
    let mut shape = NameShape::default();
    for (k, comp) in path.split(|&b| b == b'/').enumerate() {
        if k > 0 {
            out.push(b'/');
        }
        shape = normalize_name(comp, out);
    }
    shape
}

/// murmur3's 64-bit finalizer.
fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The hash of a normalized key. std's SipHash (fixed keys): on a million
/// 30-byte keys it took 11 ms, an FxHash-style word loop 14 ms.
fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b"", path),
    }
}

/// A pass-through hasher for keys that are hashes (or sizes) already, with
/// a 64-bit finalizer (murmur3's `fmix64`) so that sizes spread too.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        fmix64(self.0)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Candidates grouped by a 64-bit key: each group is a range of `members`.
///
/// A hash map to the ranges, not binary searches over one sorted array: with
/// a million candidates every probe of a binary search missed the cache (the
/// plan of a million renamed files took 9.8 s with sorted arrays, 3.8 s with
/// the maps, release build on a loaded 2-core machine).
#[derive(Debug, Default)]
struct Groups {
    ranges: HashMap<u64, (u32, u32), BuildHasherDefault<KeyHasher>>,
    members: Vec<u32>,
}

impl Groups {
    /// Groups `(key, order, remote index)`; members of a group are sorted by
    /// `(order, remote index)`.
    fn new(mut v: Vec<(u64, u64, u32)>) -> Self {
        v.sort_unstable();
        let n_groups = 1 + v.windows(2).filter(|w| w[0].0 != w[1].0).count();
        let mut g = Groups {
            ranges: HashMap::with_capacity_and_hasher(n_groups, BuildHasherDefault::default()),
            members: Vec::with_capacity(v.len()),
        };
        let mut k = 0;
        while k < v.len() {
            let e = k + v[k..].partition_point(|x| x.0 == v[k].0);
            g.ranges.insert(v[k].0, (k as u32, e as u32));
            g.members.extend(v[k..e].iter().map(|x| x.2));
            k = e;
        }
        g
    }

    fn get(&self, key: u64) -> &[u32] {
        match self.ranges.get(&key) {
            Some(&(a, b)) => &self.members[a as usize..b as usize],
            None => &[],
        }
    }

    fn heap_bytes(&self) -> usize {
        // hashbrown: one control byte per bucket besides the entry.
        self.ranges.capacity() * (std::mem::size_of::<(u64, (u32, u32))>() + 1)
            + self.members.capacity() * 4
    }
}

/// The candidate remote files of one pair, indexed for [`BasisIndex::choose`].
#[derive(Debug, Default)]
pub struct BasisIndex {
    /// By the hash of the normalized path; members sorted by size.
    by_path: Groups,
    /// By the hash of the normalized name, distinctive names only; sorted by size.
    by_name: Groups,
    /// By size; members in path order.
    by_size: Groups,
    n: usize,
    keys: KeyMaker,
    check: Vec<u8>,
}

/// Normalized paths of paths that come in path order: the normalized form of
/// the last parent directory is kept (siblings share it).
#[derive(Debug, Default)]
struct KeyMaker {
    dir: Vec<u8>,
    /// The normalized `dir`, with a trailing `/` unless it is the root.
    dir_norm: Vec<u8>,
    /// The normalized path last made.
    key: Vec<u8>,
}

impl KeyMaker {
    /// Normalizes `path` into `self.key`; returns the shape of its name.
    fn make(&mut self, path: &[u8]) -> NameShape {
        let (dir, name) = split_parent(path);
        if dir != self.dir.as_slice() {
            self.dir.clear();
            self.dir.extend_from_slice(dir);
            self.dir_norm.clear();
            if !dir.is_empty() {
                normalize_path(dir, &mut self.dir_norm);
                self.dir_norm.push(b'/');
            }
        }
        self.key.clear();
        self.key.extend_from_slice(&self.dir_norm);
        normalize_name(name, &mut self.key)
    }

    /// The normalized name of the path last made.
    fn name_key(&self) -> &[u8] {
        &self.key[self.dir_norm.len()..]
    }

    fn heap_bytes(&self) -> usize {
        self.dir.capacity() + self.dir_norm.capacity() + self.key.capacity()
    }
}

/// The first member of `g` (sorted by size) of exactly `size`.
fn exact(remote: &FileList, g: &[u32], size: u64) -> Option<u32> {
    let k = g.partition_point(|&r| remote.size(r) < size);
    g.get(k).copied().filter(|&r| remote.size(r) == size)
}

/// The member of `g` (sorted by size) of the closest size within 2x of `size`.
fn closest(remote: &FileList, g: &[u32], size: u64) -> Option<u32> {
    let k = g.partition_point(|&r| remote.size(r) < size);
    let close = |r: &u32| {
        let s = remote.size(*r);
        s.max(size) <= s.min(size).saturating_mul(2)
    };
    let below = k.checked_sub(1).map(|i| g[i]).filter(close);
    let above = g.get(k).copied().filter(close);
    match (below, above) {
        (Some(b), Some(a)) => {
            // The smaller ratio wins (b: size/sb, a: sa/size); the smaller file on a tie.
            let (sb, sa) = (remote.size(b) as u128, remote.size(a) as u128);
            let s = size as u128;
            Some(if s * s <= sa * sb { b } else { a })
        }
        (b, a) => b.or(a),
    }
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl BasisIndex {
    /// Indexes the `candidates` (remote indexes of regular files) of `remote`.
    /// Empty files are left out: they are no basis.
    pub fn new(remote: &FileList, candidates: impl IntoIterator<Item = u32>) -> Self {
        let mut keys = KeyMaker::default();
        let (mut by_path, mut by_name) = (Vec::new(), Vec::new());
        for r in candidates {
            let size = remote.size(r);
            if size == 0 {
                continue;
            }
            let shape = keys.make(remote.path(r));
            by_path.push((hash(&keys.key), size, r));
            if shape.distinctive() {
                by_name.push((hash(keys.name_key()), size, r));
            }
        }
        let by_size: Vec<(u64, u64, u32)> =
            by_path.iter().map(|&(_, size, r)| (size, 0, r)).collect();
        BasisIndex {
            n: by_path.len(),
            by_path: Groups::new(by_path),
            by_name: Groups::new(by_name),
            by_size: Groups::new(by_size),
            ..BasisIndex::default()
        }
    }

    /// Whether there is no candidate.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Number of candidates indexed.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.by_path.heap_bytes()
            + self.by_name.heap_bytes()
            + self.by_size.heap_bytes()
            + self.keys.heap_bytes()
            + self.check.capacity()
    }

    /// The remote index of the basis for a new master file at `path` of
    /// `size` bytes (see the module docs for the order of preference), or
    /// `None`. Calls in path order are fastest.
    pub fn choose(&mut self, remote: &FileList, path: &[u8], size: u64) -> Option<u32> {
        if size == 0 || self.is_empty() {
            return None;
        }
        let shape = self.keys.make(path);
        let (key, name_key) = (&self.keys.key[..], self.keys.name_key());
        let by_path = self.by_path.get(hash(key));
        let by_name = if shape.distinctive() {
            self.by_name.get(hash(name_key))
        } else {
            &[]
        };
        let check = &mut self.check;
        // Whether candidate `r` really has the key looked up (not only its
        // hash): a collision would cost a useless basis, never a wrong file,
        // but it is cheap to rule out.
        let mut verified = |r: Option<u32>, name_only: bool| {
            r.filter(|&r| {
                check.clear();
                if name_only {
                    normalize_name(split_parent(remote.path(r)).1, check);
                    check.as_slice() == name_key
                } else {
                    normalize_path(remote.path(r), check);
                    check.as_slice() == key
                }
            })
        };
        // 1. The same size: by name first, else the nearest in path order.
        verified(exact(remote, by_path, size), false)
            .or_else(|| verified(exact(remote, by_name, size), true))
            .or_else(|| nearest_of_size(self.by_size.get(size), remote, path))
            // 2. A similar name of a close size, the same directory first.
            .or_else(|| verified(closest(remote, by_path, size), false))
            .or_else(|| verified(closest(remote, by_name, size), true))
    }
}

/// The member of `g` (one size, in path order) whose path shares the longest
/// prefix with `path`, looked at among its two neighbours in path order.
fn nearest_of_size(g: &[u32], remote: &FileList, path: &[u8]) -> Option<u32> {
    let k = g.partition_point(|&r| remote.path(r) < path);
    let below = k.checked_sub(1).map(|i| g[i]);
    let above = g.get(k).copied();
    match (below, above) {
        (Some(b), Some(a)) => Some(
            if common_prefix(remote.path(a), path) > common_prefix(remote.path(b), path) {
                a
            } else {
                b
            },
        ),
        (b, a) => b.or(a),
    }
}

#[cfg(test)]
mod tests;
