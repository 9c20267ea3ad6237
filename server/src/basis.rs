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
//! The index holds, per candidate, a 64-bit hash of its normalized path (and
//! of its name when distinctive) with its size and index: at most 64 bytes
//! per candidate, only while a plan is resolved. Candidates are usually few
//! (the files an update removes). A lookup normalizes one path (the parent
//! directory's normalized form is cached, since sends come in path order) and
//! makes a few binary searches: no per-pair comparison.

use std::hash::Hasher;

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

fn hash(bytes: &[u8]) -> u64 {
    // SipHash with fixed keys: deterministic, fast enough (lookups of a
    // million paths take well under a second, see the plan tests).
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

/// `(key hash, size, remote index)`, sorted.
type Keyed = Vec<(u64, u64, u32)>;

/// The candidate remote files of one pair, indexed for [`BasisIndex::choose`].
#[derive(Debug, Default)]
pub struct BasisIndex {
    by_path: Keyed,
    by_name: Keyed,
    /// `(size, remote index)`, sorted.
    by_size: Vec<(u64, u32)>,
    // Scratch space and the normalized parent directory of the last lookup.
    dir: Vec<u8>,
    dir_norm: Vec<u8>,
    key: Vec<u8>,
    check: Vec<u8>,
}

/// The entries of a sorted [`Keyed`] with hash `h`.
fn group(v: &[(u64, u64, u32)], h: u64) -> &[(u64, u64, u32)] {
    let lo = v.partition_point(|e| e.0 < h);
    let hi = lo + v[lo..].partition_point(|e| e.0 == h);
    &v[lo..hi]
}

/// The first entry of `g` (one hash, sorted by size) of exactly `size`.
fn exact(g: &[(u64, u64, u32)], size: u64) -> Option<u32> {
    let k = g.partition_point(|e| e.1 < size);
    g.get(k).filter(|e| e.1 == size).map(|e| e.2)
}

/// The entry of `g` of the closest size within 2x of `size`.
fn closest(g: &[(u64, u64, u32)], size: u64) -> Option<u32> {
    let k = g.partition_point(|e| e.1 < size);
    let close = |s: u64| s.max(size) <= s.min(size).saturating_mul(2);
    // Ratio distance: compare a/b with c/d as a*d vs c*b, in u128.
    let dist = |s: u64| {
        let (lo, hi) = (s.min(size) as u128, s.max(size) as u128);
        (hi, lo)
    };
    let below = k.checked_sub(1).map(|i| g[i]).filter(|e| close(e.1));
    let above = g.get(k).copied().filter(|e| close(e.1));
    match (below, above) {
        (Some(b), Some(a)) => {
            let ((bh, bl), (ah, al)) = (dist(b.1), dist(a.1));
            // Smaller hi/lo ratio wins; the smaller file on a tie.
            Some(if bh * al <= ah * bl { b.2 } else { a.2 })
        }
        (b, a) => b.or(a).map(|e| e.2),
    }
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl BasisIndex {
    /// Indexes the `candidates` (remote indexes of regular files) of `remote`.
    /// Empty files are left out: they are no basis.
    pub fn new(remote: &FileList, candidates: impl IntoIterator<Item = u32>) -> Self {
        let mut ix = BasisIndex::default();
        let mut key = Vec::new();
        for r in candidates {
            let size = remote.size(r);
            if size == 0 {
                continue;
            }
            let path = remote.path(r);
            key.clear();
            let shape = normalize_path(path, &mut key);
            ix.by_path.push((hash(&key), size, r));
            if shape.distinctive() {
                key.clear();
                normalize_name(split_parent(path).1, &mut key);
                ix.by_name.push((hash(&key), size, r));
            }
            ix.by_size.push((size, r));
        }
        ix.by_path.sort_unstable();
        ix.by_name.sort_unstable();
        ix.by_size.sort_unstable();
        ix
    }

    /// Whether there is no candidate.
    pub fn is_empty(&self) -> bool {
        self.by_size.is_empty()
    }

    /// Number of candidates indexed.
    pub fn len(&self) -> usize {
        self.by_size.len()
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        (self.by_path.capacity() + self.by_name.capacity()) * std::mem::size_of::<(u64, u64, u32)>()
            + self.by_size.capacity() * std::mem::size_of::<(u64, u32)>()
            + self.dir.capacity()
            + self.dir_norm.capacity()
            + self.key.capacity()
            + self.check.capacity()
    }

    /// The remote index of the basis for a new master file at `path` of
    /// `size` bytes (see the module docs for the order of preference), or
    /// `None`. Calls in path order are fastest.
    pub fn choose(&mut self, remote: &FileList, path: &[u8], size: u64) -> Option<u32> {
        if size == 0 || self.is_empty() {
            return None;
        }
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
        let shape = normalize_name(name, &mut self.key);
        let h_path = hash(&self.key);
        let h_name = shape
            .distinctive()
            .then(|| hash(&self.key[self.dir_norm.len()..]));
        // 1. The same size: by name first, else the nearest in path order.
        if let Some(r) = exact(group(&self.by_path, h_path), size) {
            if self.same_key(remote, r, false) {
                return Some(r);
            }
        }
        if let Some(r) = exact(self.name_group(h_name), size) {
            if self.same_key(remote, r, true) {
                return Some(r);
            }
        }
        if let Some(r) = self.nearest_of_size(remote, path, size) {
            return Some(r);
        }
        // 2. A similar name of a close size: the same directory first.
        if let Some(r) = closest(group(&self.by_path, h_path), size) {
            if self.same_key(remote, r, false) {
                return Some(r);
            }
        }
        let r = closest(self.name_group(h_name), size)?;
        self.same_key(remote, r, true).then_some(r)
    }

    fn name_group(&self, h: Option<u64>) -> &[(u64, u64, u32)] {
        h.map_or(&[][..], |h| group(&self.by_name, h))
    }

    /// Whether candidate `r` really has the key of the current lookup (not
    /// only its hash): a collision would cost a useless basis, never a
    /// wrong file, but it is cheap to rule out.
    fn same_key(&mut self, remote: &FileList, r: u32, name_only: bool) -> bool {
        let path = remote.path(r);
        self.check.clear();
        let want = if name_only {
            normalize_name(split_parent(path).1, &mut self.check);
            &self.key[self.dir_norm.len()..]
        } else {
            normalize_path(path, &mut self.check);
            &self.key[..]
        };
        self.check == want
    }

    /// The candidate of exactly `size` bytes whose path shares the longest
    /// prefix with `path`, looked at among its two neighbours in path order.
    fn nearest_of_size(&self, remote: &FileList, path: &[u8], size: u64) -> Option<u32> {
        let lo = self.by_size.partition_point(|e| e.0 < size);
        let hi = lo + self.by_size[lo..].partition_point(|e| e.0 == size);
        let g = &self.by_size[lo..hi];
        if g.is_empty() {
            return None;
        }
        // Remote indexes are in path order: find where `path` would sit.
        let k = g.partition_point(|e| remote.path(e.1) < path);
        let below = k.checked_sub(1).map(|i| g[i].1);
        let above = g.get(k).map(|e| e.1);
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
}

#[cfg(test)]
mod tests;
