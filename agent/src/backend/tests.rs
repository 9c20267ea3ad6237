//! Unit tests of the POSIX backend that need its private fields.

use super::*;
use std::os::unix::fs::MetadataExt;

#[test]
fn fresh_checksum_reads_the_data_even_when_a_digest_is_cached() {
    let tree = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    std::fs::write(tree.path().join("f"), b"abc").unwrap();
    let b = PosixBackend::new(tree.path())
        .unwrap()
        .with_checksum_cache_file(cache.path().join("sums"));
    let info = fleetsync_engine::Registry::with_builtins()
        .info("crc32")
        .unwrap();
    let real = b.checksum(b"f", &info, true).unwrap().0;
    // A stale digest for the unchanged key: what a cache-trusting read would return.
    let md = std::fs::metadata(tree.path().join("f")).unwrap();
    let key = FileKey {
        dev: md.dev(),
        ino: md.ino(),
        size: md.size(),
        mtime: (md.mtime(), md.mtime_nsec() as u32),
        ctime: (md.ctime(), md.ctime_nsec() as u32),
    };
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
    b.sums
        .as_ref()
        .unwrap()
        .put(&info.name, key, b"bad!", later);
    assert_eq!(b.checksum(b"f", &info, false).unwrap().0, b"bad!");
    assert_eq!(b.checksum(b"f", &info, true).unwrap().0, real);
}
