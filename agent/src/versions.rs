//! The master agent's store of file versions it has pushed (`fleetsync agent
//! --keep-versions 2GiB --versions-dir DIR`), so that on the next release it can
//! send a patch against the old version a remote reports having.
//!
//! Layout of `DIR`:
//! - `objects/<algorithm>-<size>-<hex digest>`: one file per content, written
//!   to `tmp/` first, fsynced, then renamed (a name never shows a torn copy;
//!   [`VersionStore::get`] and [`VersionStore::open`] also check the size);
//! - `index`: which paths had which content, and the order of use, one record a
//!   line, appended as things happen and rewritten compactly on open (a torn
//!   last line after a crash is ignored);
//! - `lock`: held (`flock`) while a store is open, so two agents never share it.
//!
//! The store is bounded: after each add the least recently used versions (by
//! add or get) are removed until it holds at most `max_bytes`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Versions [`VersionStore::known`] returns for a path, newest first.
pub const KNOWN_PER_PATH: usize = 4;

/// Versions remembered per path (older ones are forgotten for that path).
const KEPT_PER_PATH: usize = 8;

/// One content: checksum algorithm, digest and size.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    algorithm: String,
    digest: Vec<u8>,
    size: u64,
}

impl Key {
    fn file_name(&self) -> String {
        format!("{}-{}-{}", self.algorithm, self.size, hex(&self.digest))
    }

    /// Parses a content file's name (the algorithm may contain `-`).
    fn from_file_name(n: &str) -> Option<Key> {
        let mut it = n.rsplitn(3, '-');
        let digest = unhex(it.next()?).filter(|d| !d.is_empty())?;
        let size = it.next()?.parse().ok()?;
        let algorithm = it.next()?.to_owned();
        valid_algorithm(&algorithm).then_some(Key {
            algorithm,
            digest,
            size,
        })
    }

    /// The index form: `<algorithm> <size> <hex digest>`.
    fn record(&self) -> String {
        format!("{} {} {}", self.algorithm, self.size, hex(&self.digest))
    }
}

fn valid_algorithm(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= 64
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-+.".contains(&b))
        && !a.starts_with('.')
}

struct Entry {
    /// Recency: the key of this entry in `State::lru`.
    used: u64,
    paths: HashSet<Vec<u8>>,
}

struct State {
    objects: HashMap<Key, Entry>,
    /// Recency → content; the first is the least recently used.
    lru: BTreeMap<u64, Key>,
    /// Path → the versions it had, oldest first (at most `KEPT_PER_PATH`).
    by_path: HashMap<Vec<u8>, Vec<Key>>,
    total: u64,
    tick: u64,
    index: File,
    /// Lines in the index file, to rewrite it when mostly stale.
    index_lines: u64,
}

/// A bounded store of file contents by checksum, outside the tree; see the
/// [module docs](self). `Send + Sync`: every method takes `&self`, so several
/// send orders can add and read at once.
///
/// ```no_run
/// use fleetsync_agent::VersionStore;
///
/// let store = VersionStore::open("/var/cache/fleetsync/versions".as_ref(), 2 << 30).unwrap();
/// let f = std::fs::File::open("/srv/tree/lib/libfoo.so").unwrap();
/// let (digest, size) = (vec![0xab; 16], f.metadata().unwrap().len());
/// store.add(b"lib/libfoo.so", "xxh128", &digest, size, &f).unwrap();
/// for (old, size) in store.known(b"lib/libfoo.so", "xxh128") {
///     let basis = store.get("xxh128", &old, size); // the old content, to patch against
/// #   let _ = basis;
/// }
/// ```
pub struct VersionStore {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    temp_seq: AtomicU64,
    _lock: File,
}

impl std::fmt::Debug for VersionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionStore")
            .field("dir", &self.dir)
            .field("max_bytes", &self.max_bytes)
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl VersionStore {
    /// Opens (creating it if needed) the store in `dir`, holding at most
    /// `max_bytes`; what a previous run stored is kept (down to `max_bytes`).
    /// Fails if another process has the store open.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir.join("objects"))?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |e| {
                io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("version store {} is in use: {e}", dir.display()),
                )
            },
        )?;
        // Copies cut by a crash.
        for e in std::fs::read_dir(dir.join("tmp"))? {
            let _ = std::fs::remove_file(e?.path());
        }
        // What is really there: content files whose size matches their name.
        let mut on_disk: Vec<(Key, std::time::SystemTime)> = Vec::new();
        for e in std::fs::read_dir(dir.join("objects"))? {
            let e = e?;
            let key = e.file_name().to_str().and_then(Key::from_file_name);
            let md = e.metadata()?;
            match key {
                Some(k) if md.is_file() && md.len() == k.size => {
                    on_disk.push((k, md.modified().unwrap_or(std::time::UNIX_EPOCH)))
                }
                _ => {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        // Not mentioned in the index: least recent, oldest file first.
        on_disk.sort_by_key(|(_, t)| *t);
        let index_path = dir.join("index");
        let mut replay = Replay::default();
        if let Ok(f) = File::open(&index_path) {
            replay.read(BufReader::new(f));
        }
        let mut st = State {
            objects: HashMap::new(),
            lru: BTreeMap::new(),
            by_path: HashMap::new(),
            total: 0,
            tick: 0,
            // Replaced by the rewritten index below.
            index: OpenOptions::new()
                .append(true)
                .create(true)
                .open(&index_path)?,
            index_lines: 0,
        };
        // Every content file on disk is kept (and counted), in its order of use;
        // one the index lost track of (a crash before its record) counts as
        // least recent.
        let mut order: Vec<(u64, Key)> = on_disk
            .iter()
            .map(|(k, _)| (replay.used.get(k).copied().unwrap_or(0), k.clone()))
            .collect();
        order.sort_by_key(|(t, _)| *t);
        for (_, k) in order {
            st.tick += 1;
            st.total += k.size;
            st.lru.insert(st.tick, k.clone());
            st.objects.insert(
                k,
                Entry {
                    used: st.tick,
                    paths: HashSet::new(),
                },
            );
        }
        let mut paths: Vec<(u64, Vec<u8>, Key)> = replay
            .paths
            .into_iter()
            .flat_map(|(p, ks)| ks.into_iter().map(move |(k, seq)| (seq, p.clone(), k)))
            .filter(|(_, _, k)| st.objects.contains_key(k))
            .collect();
        paths.sort_unstable_by_key(|(seq, _, _)| *seq);
        for (_, p, k) in paths {
            st.link(&p, &k);
        }
        let store = VersionStore {
            dir: dir.to_path_buf(),
            max_bytes,
            state: Mutex::new(st),
            temp_seq: AtomicU64::new(0),
            _lock: lock,
        };
        {
            let mut st = store.state.lock().expect("poisoned");
            store.evict(&mut st);
            store.rewrite_index(&mut st)?;
        }
        Ok(store)
    }

    /// Stores a copy of the file open as `src` (the tree file just sent: its
    /// content has digest `digest` under checksum `algorithm`, `size` bytes) as
    /// a version of `path` (tree-relative). The copy is read from offset 0 with
    /// positioned reads (`src`'s file position is not moved), written to a temp
    /// file, fsynced and renamed, so no torn version is ever stored. If that
    /// content is stored already, only `path` → it is recorded. Then the least
    /// recently used versions are evicted until at most `max_bytes` are held;
    /// a version larger than `max_bytes` is not stored at all.
    ///
    /// Fails if `src` holds fewer than `size` bytes, or on an I/O error.
    pub fn add(
        &self,
        path: &[u8],
        algorithm: &str,
        digest: &[u8],
        size: u64,
        src: &File,
    ) -> io::Result<()> {
        if !valid_algorithm(algorithm) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("version store: bad checksum algorithm name {algorithm:?}"),
            ));
        }
        if digest.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "version store: empty digest",
            ));
        }
        if size > self.max_bytes {
            return Ok(());
        }
        let key = Key {
            algorithm: algorithm.to_owned(),
            digest: digest.to_vec(),
            size,
        };
        {
            let mut st = self.state.lock().expect("poisoned");
            if st.objects.contains_key(&key) {
                st.touch(&key);
                st.link(path, &key);
                st.append(&format!("p {} {}", key.record(), hex(path)));
                return self.maybe_compact(&mut st);
            }
        }
        // Copy outside the lock: other adds and gets go on meanwhile.
        let tmp = self.dir.join("tmp").join(format!(
            "{}.{}",
            std::process::id(),
            self.temp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let copied = (|| {
            let mut out = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            copy_prefix(src, &mut out, size)?;
            out.sync_all()?;
            std::fs::rename(&tmp, self.dir.join("objects").join(key.file_name()))
        })();
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let mut st = self.state.lock().expect("poisoned");
        if !st.objects.contains_key(&key) {
            // (Another thread may have stored the same content meanwhile: the
            // rename replaced it with identical bytes.)
            st.total += size;
            st.objects.insert(
                key.clone(),
                Entry {
                    used: 0,
                    paths: HashSet::new(),
                },
            );
        }
        st.touch(&key);
        st.link(path, &key);
        st.append(&format!("p {} {}", key.record(), hex(path)));
        self.evict(&mut st);
        self.maybe_compact(&mut st)
    }

    /// The stored version with this content, opened for reading (and marked
    /// recently used); `None` if not stored.
    pub fn get(&self, algorithm: &str, digest: &[u8], size: u64) -> Option<File> {
        let key = Key {
            algorithm: algorithm.to_owned(),
            digest: digest.to_vec(),
            size,
        };
        let mut st = self.state.lock().expect("poisoned");
        st.objects.get(&key)?;
        let f = File::open(self.dir.join("objects").join(key.file_name()))
            .ok()
            .filter(|f| f.metadata().is_ok_and(|m| m.is_file() && m.len() == size));
        let Some(f) = f else {
            // Gone or damaged behind our back: forget it.
            self.remove(&mut st, &key);
            return None;
        };
        st.touch(&key);
        st.append(&format!("u {}", key.record()));
        let _ = self.maybe_compact(&mut st);
        Some(f)
    }

    /// Digests (with sizes) of the versions stored for `path` under
    /// `algorithm`, newest first, at most [`KNOWN_PER_PATH`].
    pub fn known(&self, path: &[u8], algorithm: &str) -> Vec<(Vec<u8>, u64)> {
        let st = self.state.lock().expect("poisoned");
        st.by_path
            .get(path)
            .map(|ks| {
                ks.iter()
                    .rev()
                    .filter(|k| k.algorithm == algorithm)
                    .take(KNOWN_PER_PATH)
                    .map(|k| (k.digest.clone(), k.size))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Bytes held (the sum of the stored versions' sizes).
    pub fn bytes(&self) -> u64 {
        self.state.lock().expect("poisoned").total
    }

    /// The most bytes held after an add.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Rewrites the index when most of its lines are stale.
    fn maybe_compact(&self, st: &mut State) -> io::Result<()> {
        if st.index_lines > 1024 + 4 * (st.objects.len() as u64 + st.by_path.len() as u64) {
            self.rewrite_index(st)?;
        }
        Ok(())
    }

    /// Removes least recently used versions until at most `max_bytes` are held.
    fn evict(&self, st: &mut State) {
        while st.total > self.max_bytes {
            let Some(key) = st.lru.values().next().cloned() else {
                break;
            };
            self.remove(st, &key);
        }
    }

    /// Forgets `key` and removes its file.
    fn remove(&self, st: &mut State, key: &Key) {
        let Some(e) = st.objects.remove(key) else {
            return;
        };
        st.lru.remove(&e.used);
        st.total -= key.size;
        for p in e.paths {
            if let Some(ks) = st.by_path.get_mut(&p) {
                ks.retain(|k| k != key);
                if ks.is_empty() {
                    st.by_path.remove(&p);
                }
            }
        }
        let _ = std::fs::remove_file(self.dir.join("objects").join(key.file_name()));
        st.append(&format!("d {}", key.record()));
    }

    /// Writes the index anew (paths in the order they were added, then every
    /// version in order of use) and renames it over the old one.
    fn rewrite_index(&self, st: &mut State) -> io::Result<()> {
        let mut text = String::new();
        let mut links: Vec<(usize, &Vec<u8>, &Key)> = Vec::new();
        for (p, ks) in &st.by_path {
            for (i, k) in ks.iter().enumerate() {
                links.push((i, p, k));
            }
        }
        // Oldest first within each path; across paths the order does not matter.
        links.sort_by_key(|(i, _, _)| *i);
        for (_, p, k) in links {
            text.push_str(&format!("p {} {} .\n", k.record(), hex(p)));
        }
        for k in st.lru.values() {
            text.push_str(&format!("u {} .\n", k.record()));
        }
        let tmp = self.dir.join("index.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join("index"))?;
        st.index = OpenOptions::new()
            .append(true)
            .open(self.dir.join("index"))?;
        st.index_lines = text.lines().count() as u64;
        Ok(())
    }
}

impl State {
    fn touch(&mut self, key: &Key) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.objects.get_mut(key) {
            self.lru.remove(&e.used);
            e.used = tick;
            self.lru.insert(tick, key.clone());
        }
    }

    /// Records that `path` had `key` (as its newest version).
    fn link(&mut self, path: &[u8], key: &Key) {
        let ks = self.by_path.entry(path.to_vec()).or_default();
        ks.retain(|k| k != key);
        ks.push(key.clone());
        let dropped: Vec<Key> = if ks.len() > KEPT_PER_PATH {
            ks.drain(..ks.len() - KEPT_PER_PATH).collect()
        } else {
            Vec::new()
        };
        for k in dropped {
            if let Some(e) = self.objects.get_mut(&k) {
                e.paths.remove(path);
            }
        }
        if let Some(e) = self.objects.get_mut(key) {
            e.paths.insert(path.to_vec());
        }
    }

    /// Appends a record to the index (`line` without its end marker). The index
    /// only speeds up a restart (recency and path links): a failed write is
    /// logged, not fatal.
    fn append(&mut self, line: &str) {
        self.index_lines += 1;
        if let Err(e) = self.index.write_all(format!("{line} .\n").as_bytes()) {
            tracing::warn!("version store: writing the index: {e}");
        }
    }
}

/// The index read back: recency and path links, before checking what exists.
#[derive(Default)]
struct Replay {
    seq: u64,
    used: HashMap<Key, u64>,
    /// Path → (version, when linked).
    paths: HashMap<Vec<u8>, Vec<(Key, u64)>>,
}

impl Replay {
    fn touch(&mut self, k: Key) {
        self.seq += 1;
        self.used.insert(k, self.seq);
    }

    fn read(&mut self, r: impl BufRead) {
        for line in r.split(b'\n') {
            let Ok(line) = line else { break };
            // A line cut by a crash lacks its end marker and is skipped.
            let Some(rec) = std::str::from_utf8(&line).ok().and_then(parse_record) else {
                continue;
            };
            match rec {
                Record::Path(k, p) => {
                    self.touch(k.clone());
                    let seq = self.seq;
                    let ks = self.paths.entry(p).or_default();
                    ks.retain(|(x, _)| *x != k);
                    ks.push((k, seq));
                }
                Record::Used(k) => self.touch(k),
                Record::Dropped(k) => {
                    self.used.remove(&k);
                    for ks in self.paths.values_mut() {
                        ks.retain(|(x, _)| *x != k);
                    }
                }
            }
        }
    }
}

enum Record {
    Path(Key, Vec<u8>),
    Used(Key),
    Dropped(Key),
}

/// One index line: `p|u|d <algorithm> <size> <hex digest> [<hex path>] .`; the
/// final `.` marks a complete line (a torn last line lacks it).
fn parse_record(line: &str) -> Option<Record> {
    let f: Vec<&str> = line.split(' ').collect();
    if f.last() != Some(&".") {
        return None;
    }
    let key = |f: &[&str]| -> Option<Key> {
        valid_algorithm(f[0]).then_some(())?;
        Some(Key {
            algorithm: f[0].to_owned(),
            size: f[1].parse().ok()?,
            digest: unhex(f[2])?,
        })
    };
    match (f[0], f.len()) {
        ("p", 6) => Some(Record::Path(key(&f[1..4])?, unhex(f[4])?)),
        ("u", 5) => Some(Record::Used(key(&f[1..4])?)),
        ("d", 5) => Some(Record::Dropped(key(&f[1..4])?)),
        _ => None,
    }
}

/// Copies the first `size` bytes of `src` into `out`: `copy_file_range` with
/// an explicit source offset (the kernel copies, sharing extents where the file
/// system can), falling back to positioned reads.
fn copy_prefix(src: &File, out: &mut File, size: u64) -> io::Result<()> {
    let mut off = 0u64;
    while off < size {
        let want = (size - off).min(1 << 30) as usize;
        let mut src_off = off;
        match rustix::fs::copy_file_range(src, Some(&mut src_off), &*out, None, want) {
            Ok(0) => break,
            Ok(n) => off += n as u64,
            Err(_) => break, // EXDEV, ENOSYS, EINVAL...: copy by hand below
        }
    }
    let mut buf = vec![0u8; (1 << 20).min(size.saturating_sub(off)) as usize];
    while off < size {
        let want = ((size - off) as usize).min(buf.len());
        let n = src.read_at(&mut buf[..want], off)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        off += n as u64;
    }
    if off != size {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("version store: source has {off} bytes, {size} expected"),
        ));
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    if s.is_empty() {
        s.push('-');
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s == "-" {
        return Some(Vec::new());
    }
    if s.is_empty() {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|c| {
            let pair = std::str::from_utf8(c).ok().filter(|p| p.len() == 2)?;
            u8::from_str_radix(pair, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    /// A file with `data`, and its SHA-256 (from the engine's registry).
    fn file(dir: &Path, name: &str, data: &[u8]) -> (File, Vec<u8>) {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        let info = fleetsync_engine::Registry::with_builtins()
            .info("sha256")
            .unwrap();
        let mut h = info.instantiate();
        h.update(data);
        (File::open(p).unwrap(), h.finish().as_bytes().to_vec())
    }

    fn read_all(mut f: File) -> Vec<u8> {
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        v
    }

    /// Adds `data` as a version of `path`; returns its digest.
    fn add(s: &VersionStore, src: &Path, path: &str, data: &[u8]) -> Vec<u8> {
        let (f, d) = file(src, "src", data);
        s.add(path.as_bytes(), "sha256", &d, data.len() as u64, &f)
            .unwrap();
        d
    }

    #[test]
    fn add_get_known() {
        let (dir, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = VersionStore::open(&dir.path().join("v"), 1 << 20).unwrap();
        let d1 = add(&s, src.path(), "lib/a.so", b"release one");
        let d2 = add(&s, src.path(), "lib/a.so", b"release two!");
        // sha256("release one") from coreutils sha256sum.
        // The file name carries the digest as sha256sum(1) prints it.
        let name = "sha256-11-65873e8edacdf13220544036728e115798a13623da29754aceee0a406215afee";
        assert!(s.dir.join("objects").join(name).is_file());
        assert_eq!(read_all(s.get("sha256", &d1, 11).unwrap()), b"release one");
        assert_eq!(read_all(s.get("sha256", &d2, 12).unwrap()), b"release two!");
        assert!(
            s.get("sha256", &d1, 12).is_none(),
            "size is part of the key"
        );
        assert!(s.get("xxh128", &d1, 11).is_none());
        assert_eq!(
            s.known(b"lib/a.so", "sha256"),
            vec![(d2.clone(), 12), (d1.clone(), 11)]
        );
        assert!(s.known(b"lib/a.so", "xxh128").is_empty());
        assert!(s.known(b"lib/b.so", "sha256").is_empty());
        assert_eq!(s.bytes(), 23);
        // The same content under another path is stored once.
        add(&s, src.path(), "lib/b.so", b"release one");
        assert_eq!(s.bytes(), 23);
        assert_eq!(s.known(b"lib/b.so", "sha256"), vec![(d1, 11)]);
    }

    #[test]
    fn copies_from_the_start_without_moving_the_source() {
        let (dir, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = VersionStore::open(dir.path(), 1 << 30).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (mut f, d) = file(src.path(), "big", &data);
        f.seek(SeekFrom::Start(1234)).unwrap();
        s.add(b"big", "sha256", &d, data.len() as u64, &f).unwrap();
        assert_eq!(f.stream_position().unwrap(), 1234);
        assert_eq!(
            read_all(s.get("sha256", &d, data.len() as u64).unwrap()),
            data
        );
    }

    #[test]
    fn a_short_source_is_an_error_and_stores_nothing() {
        let (dir, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = VersionStore::open(dir.path(), 1 << 20).unwrap();
        let (f, d) = file(src.path(), "f", b"only ten b");
        let e = s.add(b"f", "sha256", &d, 20, &f).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(s.get("sha256", &d, 20).is_none());
        assert_eq!(s.bytes(), 0);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("objects"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn evicts_the_least_recently_used() {
        let (dir, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = VersionStore::open(dir.path(), 300).unwrap();
        let a = add(&s, src.path(), "a", &[b'a'; 100]);
        let b = add(&s, src.path(), "b", &[b'b'; 100]);
        let c = add(&s, src.path(), "c", &[b'c'; 100]);
        assert!(s.get("sha256", &a, 100).is_some()); // a is now newer than b
        let d = add(&s, src.path(), "d", &[b'd'; 100]);
        assert_eq!(s.bytes(), 300);
        assert!(
            s.get("sha256", &b, 100).is_none(),
            "b was least recently used"
        );
        assert!(s.known(b"b", "sha256").is_empty());
        // Adding known content again counts as a use: c becomes newer than a.
        add(&s, src.path(), "c2", &[b'c'; 100]);
        add(&s, src.path(), "e", &[b'e'; 150]);
        assert!(s.bytes() <= 300, "{}", s.bytes());
        assert!(s.get("sha256", &a, 100).is_none());
        assert!(s.get("sha256", &d, 100).is_none());
        assert!(s.get("sha256", &c, 100).is_some());
        assert_eq!(s.bytes(), 250);
        let files = std::fs::read_dir(dir.path().join("objects"))
            .unwrap()
            .count();
        assert_eq!(files, 2, "evicted content files are removed");
    }

    #[test]
    fn a_version_bigger_than_the_store_is_not_kept() {
        let (dir, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = VersionStore::open(dir.path(), 100).unwrap();
        let small = add(&s, src.path(), "s", &[1; 60]);
        let big = add(&s, src.path(), "b", &[2; 101]);
        assert!(s.get("sha256", &big, 101).is_none());
        assert!(s.known(b"b", "sha256").is_empty());
        assert!(
            s.get("sha256", &small, 60).is_some(),
            "nothing evicted for it"
        );
        assert_eq!(s.bytes(), 60);
    }

    #[test]
    fn a_restart_keeps_versions_paths_and_recency() {
        let (dir, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b, c);
        {
            let s = VersionStore::open(dir.path(), 300).unwrap();
            a = add(&s, src.path(), "p", &[b'a'; 100]);
            b = add(&s, src.path(), "p", &[b'b'; 100]);
            c = add(&s, src.path(), "q", &[b'c'; 100]);
            assert!(s.get("sha256", &a, 100).is_some()); // order of use: b, c, a
            assert!(
                VersionStore::open(dir.path(), 300).is_err(),
                "a second store on the same directory is refused"
            );
        }
        let s = VersionStore::open(dir.path(), 300).unwrap();
        assert_eq!(s.bytes(), 300);
        assert_eq!(
            s.known(b"p", "sha256"),
            vec![(b.clone(), 100), (a.clone(), 100)]
        );
        assert_eq!(s.known(b"q", "sha256"), vec![(c.clone(), 100)]);
        let d = add(&s, src.path(), "r", &[b'd'; 100]);
        assert!(
            s.get("sha256", &b, 100).is_none(),
            "b was least recently used"
        );
        assert!(s.get("sha256", &c, 100).is_some());
        assert!(s.get("sha256", &a, 100).is_some());
        assert_eq!(s.known(b"p", "sha256"), vec![(a, 100)]);
        drop(s);
        // A smaller limit on reopening evicts down to it, oldest first (used
        // last: d, c, a).
        let s = VersionStore::open(dir.path(), 200).unwrap();
        assert_eq!(s.bytes(), 200);
        assert!(s.get("sha256", &d, 100).is_none());
        assert!(s.get("sha256", &c, 100).is_some());
    }

    #[test]
    fn a_crash_mid_add_leaves_no_torn_version() {
        let (dir, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let good;
        {
            let s = VersionStore::open(dir.path(), 1000).unwrap();
            good = add(&s, src.path(), "g", b"good");
        }
        // What a crash can leave: a copy in tmp/, a content file shorter than its
        // name says (not fsynced before the crash), a torn index line.
        std::fs::write(dir.path().join("tmp/123.0"), b"half").unwrap();
        let torn_key = Key {
            algorithm: "sha256".into(),
            digest: vec![0xee; 32],
            size: 10,
        };
        let objects = dir.path().join("objects");
        std::fs::write(objects.join(torn_key.file_name()), b"short").unwrap();
        // ... and a complete content file whose index record was not written yet.
        let unrecorded = Key {
            algorithm: "sha256".into(),
            digest: vec![0xaa; 32],
            size: 3,
        };
        std::fs::write(objects.join(unrecorded.file_name()), b"xyz").unwrap();
        let mut idx = OpenOptions::new()
            .append(true)
            .open(dir.path().join("index"))
            .unwrap();
        let good_key = Key {
            algorithm: "sha256".into(),
            digest: good.clone(),
            size: 4,
        };
        idx.write_all(format!("p {} 74", good_key.record()).as_bytes())
            .unwrap();
        drop(idx);
        let s = VersionStore::open(dir.path(), 1000).unwrap();
        assert!(s.get("sha256", &torn_key.digest, 10).is_none());
        assert!(!objects.join(torn_key.file_name()).exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert!(
            s.known(b"t", "sha256").is_empty(),
            "the torn line is ignored"
        );
        assert_eq!(read_all(s.get("sha256", &good, 4).unwrap()), b"good");
        assert_eq!(s.bytes(), 7, "the unrecorded content is counted");
        assert_eq!(read_all(s.get("sha256", &[0xaa; 32], 3).unwrap()), b"xyz");
        // A content file damaged while open is dropped by get.
        std::fs::write(objects.join(good_key.file_name()), b"goo").unwrap();
        assert!(s.get("sha256", &good, 4).is_none());
        assert_eq!(s.bytes(), 3);
    }

    #[test]
    fn concurrent_adds_stay_within_the_limit() {
        let (dir, src) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = VersionStore::open(dir.path(), 50_000).unwrap();
        let src = src.path().to_path_buf();
        std::thread::scope(|sc| {
            for t in 0..8u32 {
                let (s, src) = (&s, &src);
                sc.spawn(move || {
                    for i in 0..20u32 {
                        // Threads share half of their contents (lengths differ).
                        let tag = if i % 2 == 0 { i } else { 100 + t * 20 + i };
                        let data = vec![tag as u8; 1000 + tag as usize];
                        let (f, d) = file(src, &format!("{t}"), &data);
                        s.add(
                            format!("p{i}").as_bytes(),
                            "sha256",
                            &d,
                            data.len() as u64,
                            &f,
                        )
                        .unwrap();
                        assert!(s.bytes() <= 50_000);
                        if let Some(g) = s.get("sha256", &d, data.len() as u64) {
                            assert_eq!(read_all(g), data);
                        }
                    }
                });
            }
        });
        assert!(s.bytes() <= 50_000 && s.bytes() > 40_000, "{}", s.bytes());
        let on_disk: u64 = std::fs::read_dir(dir.path().join("objects"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(on_disk, s.bytes());
        drop(s);
        let s = VersionStore::open(dir.path(), 50_000).unwrap();
        assert_eq!(s.bytes(), on_disk);
    }
}
