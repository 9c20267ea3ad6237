//! A persistent checksum cache, so that a no-change re-sync reads no file.
//!
//! A digest is reused only when the file's device, inode, size, mtime **and
//! ctime** are all unchanged. Every change of content through the kernel
//! (write, truncate, and also `touch -d` to restore an mtime) updates the
//! ctime, which user space cannot set back; so "same size and mtime, different
//! content" is still found. Digests of files whose ctime is less than
//! [`RACY_SECS`] before the moment they were hashed are not cached (a write
//! in the same clock tick could go unnoticed — git's "racy clean" problem).
//!
//! The cache lives outside the tree (`$XDG_CACHE_HOME/fleetsync` or
//! `~/.cache/fleetsync`), one file per root, written atomically.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Files changed this recently (ctime) when hashed are not cached.
pub const RACY_SECS: i64 = 2;

const MAGIC: &[u8; 8] = b"FSSUMC01";

/// What must be unchanged for a cached digest to be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileKey {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size.
    pub size: u64,
    /// Modification time (s, ns).
    pub mtime: (i64, u32),
    /// Status change time (s, ns).
    pub ctime: (i64, u32),
}

/// Cached digests per algorithm.
#[derive(Debug, Default)]
pub struct SumCache {
    file: Option<PathBuf>,
    map: Mutex<Tables>,
    dirty: AtomicBool,
    last_save: Mutex<Option<std::time::Instant>>,
}

/// The default cache file for the tree at `root`.
pub fn default_file(root: &Path) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let canon = std::fs::canonicalize(root).ok()?;
    // FNV-1a of the root's path: one file per tree.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::os::unix::ffi::OsStrExt::as_bytes(canon.as_os_str()) {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    Some(base.join("fleetsync").join(format!("sums-{h:016x}")))
}

impl SumCache {
    /// A cache kept in memory only.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// A cache loaded from (and saved to) `file`; an unreadable file is an empty cache.
    pub fn open(file: PathBuf) -> Self {
        let map = load(&file).unwrap_or_default();
        SumCache {
            file: Some(file),
            map: Mutex::new(map),
            dirty: AtomicBool::new(false),
            last_save: Mutex::new(None),
        }
    }

    /// The cached digest of the file with `key`, if still valid.
    pub fn get(&self, alg: &str, key: &FileKey) -> Option<Vec<u8>> {
        let map = self.map.lock().expect("poisoned");
        map.get(alg)?.get(key).map(<[u8]>::to_vec)
    }

    /// Remembers a digest computed from a file that had `key` before it was
    /// read, unless the file changed too recently to trust its ctime.
    pub fn put(&self, alg: &str, key: FileKey, digest: &[u8], hashed_at: SystemTime) {
        let now = hashed_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if key.ctime.0 + RACY_SECS > now || key.mtime.0 + RACY_SECS > now {
            return;
        }
        let mut map = self.map.lock().expect("poisoned");
        let table = map
            .entry(alg.to_owned())
            .or_insert_with(|| Table::new(digest.len()));
        if table.put(key, digest) {
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Like [`SumCache::save`], but at most once per `interval`.
    pub fn save_if_due(&self, interval: std::time::Duration) -> std::io::Result<()> {
        let last = *self.last_save.lock().expect("poisoned");
        let due = match last {
            None => true,
            Some(t) => t.elapsed() >= interval,
        };
        if due {
            self.save()
        } else {
            Ok(())
        }
    }

    /// Writes the cache file if anything changed (temp file + rename).
    pub fn save(&self) -> std::io::Result<()> {
        *self.last_save.lock().expect("poisoned") = Some(std::time::Instant::now());
        let Some(file) = &self.file else {
            return Ok(());
        };
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let dir = file.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        {
            let map = self.map.lock().expect("poisoned");
            let mut w = BufWriter::new(std::fs::File::create(&tmp)?);
            w.write_all(MAGIC)?;
            for (alg, table) in map.iter() {
                for (k, d) in table.iter() {
                    w.write_all(&[alg.len() as u8])?;
                    w.write_all(alg.as_bytes())?;
                    for v in [k.dev, k.ino, k.size] {
                        w.write_all(&v.to_le_bytes())?;
                    }
                    w.write_all(&k.mtime.0.to_le_bytes())?;
                    w.write_all(&k.mtime.1.to_le_bytes())?;
                    w.write_all(&k.ctime.0.to_le_bytes())?;
                    w.write_all(&k.ctime.1.to_le_bytes())?;
                    w.write_all(&[d.len() as u8])?;
                    w.write_all(d)?;
                }
            }
            w.flush()?;
        }
        std::fs::rename(&tmp, file)
    }
}

/// Per algorithm, its table.
type Tables = HashMap<String, Table>;

/// One cached file: its key (by `(dev, ino)`) and where its digest is.
#[derive(Debug, Clone, Copy)]
struct Slot {
    key: FileKey,
    /// Index of its digest in [`Table::digests`].
    digest: u32,
}

/// The digests of one algorithm (all of one width), compact: a million files cost about
/// 56 bytes each plus the digest (with a map of entries and one heap digest each, they had
/// cost about 130). Sorted by `(dev, ino)` for binary search; new files go to a small map
/// first, merged in when it grows ([`TAIL_MAX`]).
#[derive(Debug, Default)]
struct Table {
    width: usize,
    sorted: Vec<Slot>,
    tail: HashMap<(u64, u64), Slot>,
    /// `width` bytes per slot.
    digests: Vec<u8>,
}

/// Files in a table's unsorted part before it is merged into the sorted one.
const TAIL_MAX: usize = 1 << 16;

impl Table {
    fn new(width: usize) -> Self {
        Table {
            width,
            ..Table::default()
        }
    }

    fn find(&self, dev: u64, ino: u64) -> Option<&Slot> {
        match self
            .sorted
            .binary_search_by_key(&(dev, ino), |s| (s.key.dev, s.key.ino))
        {
            Ok(i) => Some(&self.sorted[i]),
            Err(_) => self.tail.get(&(dev, ino)),
        }
    }

    fn digest(&self, slot: &Slot) -> &[u8] {
        &self.digests[slot.digest as usize * self.width..][..self.width]
    }

    fn get(&self, key: &FileKey) -> Option<&[u8]> {
        let slot = self.find(key.dev, key.ino)?;
        (slot.key == *key).then(|| self.digest(slot))
    }

    /// Sets the digest of the file with `key`; false when nothing was stored (a digest of
    /// another width than the table's, or too many digests).
    fn put(&mut self, key: FileKey, digest: &[u8]) -> bool {
        if digest.len() != self.width {
            return false;
        }
        let w = self.width;
        let pos = self
            .sorted
            .binary_search_by_key(&(key.dev, key.ino), |s| (s.key.dev, s.key.ino));
        let existing = match pos {
            Ok(i) => Some(&mut self.sorted[i]),
            Err(_) => self.tail.get_mut(&(key.dev, key.ino)),
        };
        if let Some(slot) = existing {
            slot.key = key;
            let at = slot.digest as usize * w;
            self.digests[at..at + w].copy_from_slice(digest);
            return true;
        }
        let Ok(n) = u32::try_from(self.digests.len() / w.max(1)) else {
            return false;
        };
        self.digests.extend_from_slice(digest);
        self.tail
            .insert((key.dev, key.ino), Slot { key, digest: n });
        if self.tail.len() >= TAIL_MAX {
            self.merge();
        }
        true
    }

    /// Moves the unsorted part into the sorted one.
    fn merge(&mut self) {
        let mut tail: Vec<Slot> = self.tail.drain().map(|(_, s)| s).collect();
        self.tail = HashMap::new();
        tail.sort_unstable_by_key(|s| (s.key.dev, s.key.ino));
        // Merged from the back, in place: no second copy of the sorted part.
        let old = self.sorted.len();
        self.sorted.reserve_exact(tail.len());
        self.sorted.extend_from_slice(&tail);
        let (mut i, mut j, mut k) = (old, tail.len(), self.sorted.len());
        while j > 0 {
            let take_old = i > 0
                && (self.sorted[i - 1].key.dev, self.sorted[i - 1].key.ino)
                    > (tail[j - 1].key.dev, tail[j - 1].key.ino);
            k -= 1;
            if take_old {
                i -= 1;
                self.sorted[k] = self.sorted[i];
            } else {
                j -= 1;
                self.sorted[k] = tail[j];
            }
        }
    }

    /// Every file with its digest.
    fn iter(&self) -> impl Iterator<Item = (&FileKey, &[u8])> {
        self.sorted
            .iter()
            .chain(self.tail.values())
            .map(|s| (&s.key, self.digest(s)))
    }
}

fn load(file: &Path) -> Option<Tables> {
    let mut r = BufReader::new(std::fs::File::open(file).ok()?);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).ok()?;
    if &magic != MAGIC {
        return None;
    }
    let mut map: Tables = HashMap::new();
    let mut byte = [0u8; 1];
    let u64_ = |r: &mut BufReader<std::fs::File>| -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    };
    let u32_ = |r: &mut BufReader<std::fs::File>| -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    };
    loop {
        match r.read(&mut byte) {
            Ok(0) => {
                for t in map.values_mut() {
                    t.merge();
                }
                return Some(map);
            }
            Ok(_) => {}
            Err(_) => return None,
        }
        let mut alg = vec![0u8; byte[0] as usize];
        r.read_exact(&mut alg).ok()?;
        let alg = String::from_utf8(alg).ok()?;
        let (dev, ino, size) = (u64_(&mut r)?, u64_(&mut r)?, u64_(&mut r)?);
        let mtime = (u64_(&mut r)? as i64, u32_(&mut r)?);
        let ctime = (u64_(&mut r)? as i64, u32_(&mut r)?);
        r.read_exact(&mut byte).ok()?;
        let mut digest = vec![0u8; byte[0] as usize];
        r.read_exact(&mut digest).ok()?;
        let key = FileKey {
            dev,
            ino,
            size,
            mtime,
            ctime,
        };
        map.entry(alg)
            .or_insert_with(|| Table::new(digest.len()))
            .put(key, &digest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(ctime: i64) -> FileKey {
        FileKey {
            dev: 1,
            ino: 2,
            size: 3,
            mtime: (100, 5),
            ctime: (ctime, 7),
        }
    }

    #[test]
    fn hit_only_when_every_field_matches() {
        let c = SumCache::in_memory();
        let at = UNIX_EPOCH + Duration::from_secs(10_000);
        c.put("crc32", key(100), b"abcd", at);
        assert_eq!(c.get("crc32", &key(100)).as_deref(), Some(&b"abcd"[..]));
        assert_eq!(c.get("crc32", &key(101)), None, "ctime changed");
        assert_eq!(c.get("md5", &key(100)), None, "other algorithm");
        let mut k = key(100);
        k.size = 4;
        assert_eq!(c.get("crc32", &k), None);
    }

    #[test]
    fn regression_racy_entries_are_not_cached() {
        let c = SumCache::in_memory();
        let at = UNIX_EPOCH + Duration::from_secs(101);
        c.put("crc32", key(100), b"abcd", at);
        assert_eq!(c.get("crc32", &key(100)), None);
    }

    #[test]
    fn the_compact_table_answers_as_a_map_does_across_merges() {
        let c = SumCache::in_memory();
        let at = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut reference = HashMap::new();
        let mut x: u64 = 0x1234_5678;
        for round in 0..3u32 {
            for i in 0..(TAIL_MAX as u64 + 1000) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let k = FileKey {
                    dev: x % 3,
                    ino: (x >> 8) % 200_000 + i % 2,
                    size: i,
                    mtime: (100, round),
                    ctime: (100, 0),
                };
                let d = (x as u32).to_le_bytes();
                c.put("crc32", k, &d, at);
                reference.insert((k.dev, k.ino), (k, d));
            }
        }
        for (k, d) in reference.values() {
            assert_eq!(c.get("crc32", k).as_deref(), Some(&d[..]), "{k:?}");
            let mut stale = *k;
            stale.size += 1;
            assert_eq!(c.get("crc32", &stale), None);
        }
        // A digest of another width than the algorithm's is not kept.
        let k = FileKey {
            ino: 999_999_999,
            ..key(100)
        };
        c.put("crc32", k, b"toolong", at);
        assert_eq!(c.get("crc32", &k), None);
    }

    #[test]
    fn survives_save_and_load() {
        let dir = std::env::temp_dir().join(format!("fleetsync-sumcache-{}", std::process::id()));
        let file = dir.join("sums");
        let c = SumCache::open(file.clone());
        c.put(
            "crc32",
            key(100),
            b"abcd",
            UNIX_EPOCH + Duration::from_secs(10_000),
        );
        c.save().unwrap();
        let d = SumCache::open(file);
        assert_eq!(d.get("crc32", &key(100)).as_deref(), Some(&b"abcd"[..]));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
