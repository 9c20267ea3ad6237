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

fn backend(root: &Path) -> PosixBackend {
    PosixBackend::new(root).unwrap().with_checksum_cache(false)
}

/// Every path the listing gives.
fn listed(b: &PosixBackend) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    b.list(&|_, _| Decision::Include, &mut |e| {
        v.push(e.path);
        Ok(())
    })
    .unwrap();
    v
}

/// Names in `dir` (of the real file system) starting with `prefix`.
fn names_with(dir: &Path, prefix: &[u8]) -> Vec<String> {
    use std::os::unix::ffi::OsStrExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.as_bytes().starts_with(prefix))
        .map(|n| n.to_string_lossy().into_owned())
        .collect()
}

fn data(n: usize) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

fn read_file(mut f: File) -> Vec<u8> {
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

fn attrs() -> Attrs {
    Attrs {
        mode: Some(0o644),
        owner: None,
        mtime: Some((1_600_000_000, 0)),
    }
}

#[test]
fn a_cut_temp_kept_as_partial_gives_its_prefix_back() {
    let tree = tempfile::tempdir().unwrap();
    std::fs::create_dir(tree.path().join("d")).unwrap();
    let b = backend(tree.path());
    let all = data(300_000);
    let mut t = b.create_temp(b"d/f").unwrap();
    t.write_all(&all[..200_000]).unwrap();
    assert!(t.keep_as_partial().unwrap());
    let d = tree.path().join("d");
    assert!(!d.join("f").exists(), "nothing under the real name");
    assert!(names_with(&d, TEMP_PREFIX).is_empty());
    assert_eq!(names_with(&d, PARTIAL_PREFIX), [".fleetsync.partial.f"]);
    let (f, len) = b.open_partial(b"d/f").unwrap().unwrap();
    assert_eq!(len, 200_000);
    assert_eq!(read_file(f), &all[..200_000]);
    // Cut again before anything was written: nothing kept, the old partial stays.
    let t = b.create_temp(b"d/f").unwrap();
    assert!(!t.keep_as_partial().unwrap());
    assert!(names_with(&d, TEMP_PREFIX).is_empty());
    assert_eq!(b.open_partial(b"d/f").unwrap().unwrap().1, 200_000);
    b.remove_partial(b"d/f").unwrap();
    assert!(b.open_partial(b"d/f").unwrap().is_none());
    b.remove_partial(b"d/f").unwrap(); // absent: fine
    assert!(b.open_partial(b"nodir/f").unwrap().is_none());
    b.remove_partial(b"nodir/f").unwrap();
    assert!(b.create_temp_from_partial(b"d/f").unwrap().is_none());
}

#[test]
fn a_temp_from_a_partial_appends_the_rest_and_commits_atomically() {
    let tree = tempfile::tempdir().unwrap();
    let b = backend(tree.path());
    std::fs::write(tree.path().join("f"), b"old version").unwrap();
    let all = data(1 << 20);
    let mut t = b.create_temp(b"f").unwrap();
    t.write_all(&all[..900_000]).unwrap();
    assert!(t.keep_as_partial().unwrap());

    let (mut t, len) = b.create_temp_from_partial(b"f").unwrap().unwrap();
    assert_eq!(len, 900_000);
    t.write_all(&all[900_000..]).unwrap();
    // In flight: the old version under the real name; the temp neither listed
    // nor removed by a listing meanwhile; no partial any more.
    assert_eq!(listed(&b), [&b""[..], b"f"]);
    assert_eq!(
        std::fs::read(tree.path().join("f")).unwrap(),
        b"old version"
    );
    assert_eq!(names_with(tree.path(), TEMP_PREFIX).len(), 1);
    assert!(names_with(tree.path(), PARTIAL_PREFIX).is_empty());
    t.commit(&attrs()).unwrap();
    assert_eq!(std::fs::read(tree.path().join("f")).unwrap(), all);
    let md = std::fs::metadata(tree.path().join("f")).unwrap();
    assert_eq!((md.mtime(), md.mode() & 0o7777), (1_600_000_000, 0o644));
    assert!(names_with(tree.path(), TEMP_PREFIX).is_empty());
    assert!(names_with(tree.path(), PARTIAL_PREFIX).is_empty());

    // A resumed temp dropped (e.g. its checksum failed) takes the partial with it.
    let mut t = b.create_temp(b"f").unwrap();
    t.write_all(b"bad prefix").unwrap();
    t.keep_as_partial().unwrap();
    let (t, _) = b.create_temp_from_partial(b"f").unwrap().unwrap();
    drop(t);
    assert!(names_with(tree.path(), b".fleetsync.").is_empty());
    assert_eq!(std::fs::read(tree.path().join("f")).unwrap(), all);

    // Cut again while resumed: the partial is kept with all it holds by then.
    let mut t = b.create_temp(b"f").unwrap();
    t.write_all(b"abc").unwrap();
    t.keep_as_partial().unwrap();
    let (mut t, _) = b.create_temp_from_partial(b"f").unwrap().unwrap();
    t.write_all(b"def").unwrap();
    assert!(t.keep_as_partial().unwrap());
    assert_eq!(
        read_file(b.open_partial(b"f").unwrap().unwrap().0),
        b"abcdef"
    );
}

#[test]
fn a_commit_or_a_delete_removes_the_stale_partial() {
    let tree = tempfile::tempdir().unwrap();
    let b = backend(tree.path());
    for p in [&b"a"[..], b"b"] {
        let mut t = b.create_temp(p).unwrap();
        t.write_all(b"prefix").unwrap();
        t.keep_as_partial().unwrap();
    }
    let mut t = b.create_temp(b"a").unwrap();
    t.write_all(b"whole new content").unwrap();
    t.commit(&attrs()).unwrap();
    assert!(b.open_partial(b"a").unwrap().is_none());
    b.delete(b"b", false).unwrap();
    assert!(b.open_partial(b"b").unwrap().is_none());
    assert!(names_with(tree.path(), b".fleetsync.").is_empty());
}

#[test]
fn the_listing_hides_partials_and_removes_stale_ones() {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path();
    std::fs::create_dir(root.join("d")).unwrap();
    std::fs::write(root.join("d/x"), b"x").unwrap();
    std::fs::write(root.join("d/.fleetsync.partial.x"), b"fresh").unwrap();
    std::fs::write(root.join("d/.fleetsync.partial.y"), b"old").unwrap();
    std::fs::write(root.join("d/.fleetsync.tmp.0123"), b"leftover").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("d/.fleetsync.partial.z")).unwrap();
    let eight_days = std::time::SystemTime::now() - std::time::Duration::from_secs(8 * 86400);
    File::options()
        .write(true)
        .open(root.join("d/.fleetsync.partial.y"))
        .unwrap()
        .set_modified(eight_days)
        .unwrap();
    let b = backend(root);
    assert_eq!(listed(&b), [&b""[..], b"d", b"d/x"]);
    let d = root.join("d");
    assert_eq!(names_with(&d, b".fleetsync."), [".fleetsync.partial.x"]);
    // With a shorter limit the fresh one goes too.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let b = backend(root).with_partial_max_age(std::time::Duration::from_millis(10));
    assert_eq!(listed(&b), [&b""[..], b"d", b"d/x"]);
    assert!(names_with(&d, b".fleetsync.").is_empty());
}

#[test]
fn a_long_name_gets_a_hashed_partial_name() {
    let tree = tempfile::tempdir().unwrap();
    let b = backend(tree.path());
    let long = vec![b'n'; 250];
    let part = partial_name(&long);
    assert!(
        part.len() <= 255 && part.starts_with(PARTIAL_PREFIX),
        "{}",
        part.len()
    );
    assert_eq!(part, partial_name(&long), "deterministic");
    assert_ne!(part, partial_name(&[b'n'; 251]));
    assert_eq!(partial_name(b"short"), b".fleetsync.partial.short");
    let mut t = b.create_temp(&long).unwrap();
    t.write_all(b"some").unwrap();
    assert!(t.keep_as_partial().unwrap());
    assert_eq!(b.open_partial(&long).unwrap().unwrap().1, 4);
    assert!(listed(&b).len() == 1, "only the root");
    let (mut t, 4) = b.create_temp_from_partial(&long).unwrap().unwrap() else {
        panic!("wrong length");
    };
    t.write_all(b"more").unwrap();
    t.commit(&attrs()).unwrap();
    assert_eq!(
        std::fs::read(tree.path().join(std::str::from_utf8(&long).unwrap())).unwrap(),
        b"somemore"
    );
}

#[test]
fn partials_and_bases_are_refused_outside_the_root() {
    let tree = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let root = tree.path();
    std::fs::create_dir(root.join("real")).unwrap();
    std::fs::write(root.join("real/f"), b"basis").unwrap();
    std::fs::write(root.join("real/.fleetsync.partial.f"), b"part").unwrap();
    std::os::unix::fs::symlink(root.join("real"), root.join("link")).unwrap();
    std::fs::write(outside.path().join("secret"), b"secret").unwrap();
    std::fs::write(outside.path().join(".fleetsync.partial.secret"), b"secret").unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("out")).unwrap();
    // The partial itself a symlink to a file outside.
    std::os::unix::fs::symlink(
        outside.path().join("secret"),
        root.join("real/.fleetsync.partial.g"),
    )
    .unwrap();
    let b = backend(root);
    let refused = |r: Result<(), AgentError>, what: &str| match r {
        Err(AgentError::UnsafePath { .. }) => {}
        other => panic!("{what}: {other:?}"),
    };
    for p in [
        &b"../x"[..],
        b"real/../f",
        b"/etc/passwd",
        b"link/f",
        b"out/secret",
    ] {
        let what = String::from_utf8_lossy(p).into_owned();
        refused(b.open_partial(p).map(|_| ()), &what);
        refused(b.create_temp_from_partial(p).map(|_| ()), &what);
        refused(b.remove_partial(p), &what);
        refused(b.open_basis(p).map(|_| ()), &what);
    }
    assert!(outside.path().join(".fleetsync.partial.secret").exists());
    assert!(root.join("real/.fleetsync.partial.f").exists());
    // A symlinked partial is not followed: no partial (and removed), target untouched.
    assert!(b.open_partial(b"real/g").unwrap().is_none());
    assert!(b.create_temp_from_partial(b"real/g").unwrap().is_none());
    assert!(!root.join("real/.fleetsync.partial.g").exists());
    assert_eq!(
        std::fs::read(outside.path().join("secret")).unwrap(),
        b"secret"
    );
    // A basis must be a regular file, not a symlink to one.
    std::os::unix::fs::symlink("f", root.join("real/sl")).unwrap();
    assert!(b.open_basis(b"real/sl").is_err());
    assert!(b.open_basis(b"real").is_err(), "a directory is no basis");
    assert_eq!(read_file(b.open_basis(b"real/f").unwrap()), b"basis");
}

/// What a SIGKILL leaves of a file in flight: its temp, written, never
/// committed nor dropped (the agent that owned it is gone).
fn killed_mid_file(root: &Path, path: &[u8], content: &[u8]) -> Vec<u8> {
    let b = backend(root);
    let mut t = b.create_temp(path).unwrap();
    t.write_all(content).unwrap();
    std::mem::forget(t);
    let (parent, _) = path::split(path);
    let dir = root.join(std::str::from_utf8(parent).unwrap());
    let mut temps = names_with(&dir, TEMP_PREFIX);
    assert_eq!(temps.len(), 1, "{temps:?}");
    temps.pop().unwrap().into_bytes()
}

#[test]
fn a_file_temp_names_its_destination_and_a_link_temp_does_not() {
    let tree = tempfile::tempdir().unwrap();
    let b = backend(tree.path());
    let (n, rel) = b.temp_name(b"d", Some(b"f.txt"));
    assert_eq!(n.len(), TEMP_PREFIX.len() + 16 + 1 + 5);
    assert!(n.ends_with(b".f.txt") && rel.starts_with(b"d/.fleetsync.tmp."));
    assert_eq!(temp_key(&n), Some(&b"f.txt"[..]));
    let (n, _) = b.temp_name(b"", None);
    assert_eq!(temp_key(&n), None, "no destination");
    for n in [
        &b".fleetsync.tmp.0123456789abcdef"[..], // an older agent's
        b".fleetsync.tmp.0123456789abcdef.",
        b".fleetsync.tmp.0123456789abcdeg.f",
        b".fleetsync.tmp.0123456789abcdef_f",
        b".fleetsync.partial.f",
    ] {
        assert_eq!(temp_key(n), None, "{}", String::from_utf8_lossy(n));
    }
    // The longest names: temp and partial names stay within NAME_MAX, and
    // carry the same key.
    for len in [KEY_MAX, KEY_MAX + 1, 255] {
        let d = vec![b'n'; len];
        let (n, _) = b.temp_name(b"", Some(&d));
        assert!(n.len() <= 255, "{len}: {}", n.len());
        let key = temp_key(&n).unwrap();
        assert_eq!(key.len(), if len == KEY_MAX { len } else { 33 });
        assert_eq!([PARTIAL_PREFIX, key].concat(), partial_name(&d));
    }
}

#[test]
fn a_leftover_temp_of_a_killed_agent_becomes_the_partial_at_the_next_listing() {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path();
    std::fs::create_dir(root.join("d")).unwrap();
    std::fs::write(root.join("d/f"), b"old version").unwrap();
    let all = data(3 << 20);
    let cut = (3 << 20) / 2 + 12_345;
    killed_mid_file(root, b"d/f", &all[..cut]);
    // The restarted agent: nothing partial under the real name, nor listed.
    let b = backend(root);
    let before = b.open_partial(b"d/f").unwrap();
    assert!(before.is_none(), "a partial only from the listing on");
    assert_eq!(listed(&b), [&b""[..], b"d", b"d/f"]);
    let d = root.join("d");
    assert_eq!(std::fs::read(d.join("f")).unwrap(), b"old version");
    assert!(names_with(&d, TEMP_PREFIX).is_empty());
    assert_eq!(names_with(&d, PARTIAL_PREFIX), [".fleetsync.partial.f"]);
    let (f, len) = b.open_partial(b"d/f").unwrap().unwrap();
    assert_eq!(len, cut as u64);
    assert_eq!(read_file(f), &all[..cut]);
    // Resumed: the rest appended, the whole committed.
    let (mut t, at) = b.create_temp_from_partial(b"d/f").unwrap().unwrap();
    assert_eq!(at, cut as u64);
    t.write_all(&all[cut..]).unwrap();
    t.commit(&attrs()).unwrap();
    assert_eq!(std::fs::read(d.join("f")).unwrap(), all);
    assert!(names_with(&d, b".fleetsync.").is_empty());
}

#[test]
fn a_killed_resume_leaves_all_it_had_as_the_partial() {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path();
    let all = data(3 << 20);
    let b = backend(root);
    let mut t = b.create_temp(b"f").unwrap();
    t.write_all(&all[..1 << 20]).unwrap();
    assert!(t.keep_as_partial().unwrap());
    let (mut t, _) = b.create_temp_from_partial(b"f").unwrap().unwrap();
    t.write_all(&all[1 << 20..2 << 20]).unwrap();
    std::mem::forget(t); // killed while resuming
    let b = backend(root);
    assert_eq!(listed(&b), [&b""[..]]);
    let (f, len) = b.open_partial(b"f").unwrap().unwrap();
    assert_eq!(len, 2 << 20);
    assert_eq!(read_file(f), &all[..2 << 20]);
}

#[test]
fn a_small_leftover_temp_is_removed_and_a_live_one_left_alone() {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path();
    let small = data(LEFTOVER_PARTIAL_MIN as usize - 1);
    killed_mid_file(root, b"small", &small);
    let b = backend(root);
    // In flight in this agent, a big one stays a temp through a listing.
    let mut live = b.create_temp(b"live").unwrap();
    live.write_all(&data(2 << 20)).unwrap();
    assert_eq!(listed(&b), [&b""[..]]);
    let temps = names_with(root, TEMP_PREFIX);
    assert_eq!(temps.len(), 1, "{temps:?}");
    assert!(temps[0].ends_with(".live"), "{temps:?}");
    assert!(names_with(root, PARTIAL_PREFIX).is_empty());
    assert!(b.open_partial(b"small").unwrap().is_none());
    live.commit(&attrs()).unwrap();
    assert!(names_with(root, b".fleetsync.").is_empty());
}

#[test]
fn a_leftover_temp_replaces_an_older_partial_but_not_a_newer_one() {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path();
    let set_mtime = |p: &Path, ago: u64| {
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(ago);
        File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    };
    let leftover = data(1 << 20);
    // Older partial (an hour): the leftover, written since, replaces it.
    std::fs::write(root.join(".fleetsync.partial.a"), b"older partial").unwrap();
    set_mtime(&root.join(".fleetsync.partial.a"), 3600);
    killed_mid_file(root, b"a", &leftover);
    listed(&backend(root));
    assert_eq!(
        std::fs::read(root.join(".fleetsync.partial.a")).unwrap(),
        leftover
    );
    // Newer partial: the leftover (an hour old) goes, the partial stays.
    let t = killed_mid_file(root, b"b", &leftover);
    set_mtime(&root.join(std::str::from_utf8(&t).unwrap()), 3600);
    std::fs::write(root.join(".fleetsync.partial.b"), b"newer partial").unwrap();
    listed(&backend(root));
    assert_eq!(
        std::fs::read(root.join(".fleetsync.partial.b")).unwrap(),
        b"newer partial"
    );
    assert!(names_with(root, TEMP_PREFIX).is_empty());
    // Older than the partial age limit: removed.
    let t = killed_mid_file(root, b"c", &leftover);
    set_mtime(&root.join(std::str::from_utf8(&t).unwrap()), 8 * 86400);
    listed(&backend(root));
    assert!(names_with(root, TEMP_PREFIX).is_empty());
    assert!(!root.join(".fleetsync.partial.c").exists());
}

#[test]
fn a_leftover_that_is_a_link_never_becomes_a_partial() {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path();
    let big = data(2 << 20);
    std::fs::write(root.join("other"), &big).unwrap();
    // Named as a file temp of `x`, but a second link of `other` (appending to
    // it would change `other`), and a symlink named as one of `y`.
    std::fs::hard_link(
        root.join("other"),
        root.join(".fleetsync.tmp.0123456789abcdef.x"),
    )
    .unwrap();
    std::os::unix::fs::symlink("other", root.join(".fleetsync.tmp.0123456789abcdef.y")).unwrap();
    let b = backend(root);
    assert_eq!(listed(&b), [&b""[..], b"other"]);
    assert!(names_with(root, b".fleetsync.").is_empty());
    assert_eq!(std::fs::read(root.join("other")).unwrap(), big);
    assert_eq!(std::fs::metadata(root.join("other")).unwrap().nlink(), 1);
}

#[test]
fn a_leftover_temp_of_a_long_name_finds_its_hashed_partial() {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path();
    let all = data(1 << 20);
    for len in [KEY_MAX, KEY_MAX + 1, 255] {
        let long = vec![b'l'; len];
        killed_mid_file(root, &long, &all);
        let b = backend(root);
        assert_eq!(listed(&b), [&b""[..]]);
        let (f, n) = b.open_partial(&long).unwrap().unwrap();
        assert_eq!((n, read_file(f)), (1 << 20, all.clone()), "{len}");
        b.remove_partial(&long).unwrap();
        assert!(names_with(root, b".fleetsync.").is_empty());
    }
}

#[test]
fn a_commit_removes_a_stale_partial_whenever_one_may_be_there() {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path();
    let stale = |n: &str| root.join(format!(".fleetsync.partial.{n}"));
    let commit = |b: &PosixBackend, p: &[u8]| {
        let mut t = b.create_temp(p).unwrap();
        t.write_all(b"new").unwrap();
        t.commit(&attrs()).unwrap();
    };
    // Left by an earlier agent: a new agent removes it before any listing.
    std::fs::write(stale("a"), b"old prefix").unwrap();
    let b = backend(root);
    commit(&b, b"a");
    assert!(!stale("a").exists());
    // A listing that sees one keeps the removal on.
    std::fs::write(stale("b"), b"old prefix").unwrap();
    listed(&b);
    commit(&b, b"b");
    assert!(!stale("b").exists());
    // After a whole listing that found none, a partial made since is still removed.
    listed(&b);
    assert!(!b.partials.may_exist());
    let mut t = b.create_temp(b"c").unwrap();
    t.write_all(b"cut").unwrap();
    assert!(t.keep_as_partial().unwrap());
    assert!(b.partials.may_exist());
    commit(&b, b"c");
    assert!(!stale("c").exists());
    // A listing that excluded something does not vouch for the whole tree.
    let b = backend(root);
    let mut none = |_| Ok(());
    b.list(
        &|p, _| {
            if p == b"a" {
                Decision::Exclude
            } else {
                Decision::Include
            }
        },
        &mut none,
    )
    .unwrap();
    assert!(b.partials.may_exist());
    // Nor one that met a killed agent's temp (it may become a partial).
    std::fs::write(root.join(".fleetsync.tmp.x"), b"left").unwrap();
    listed(&b);
    assert!(b.partials.may_exist());
    listed(&b);
    assert!(!b.partials.may_exist());
}

#[test]
fn an_attribute_fix_applies_only_what_differs_and_the_mode_after_any_chown() {
    use std::os::unix::fs::PermissionsExt;
    let tree = tempfile::tempdir().unwrap();
    let f = tree.path().join("f");
    std::fs::write(&f, b"x").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
    let b = backend(tree.path());
    b.set_attrs(b"f", &attrs()).unwrap();
    let st = rustix::fs::stat(&f).unwrap();
    let (uid, gid) = (st.st_uid, st.st_gid);
    let same = Attrs {
        mode: Some(0o644),
        owner: Some((uid, gid)),
        mtime: Some((1_600_000_000, 0)),
    };
    assert_eq!(still_to_apply(&same, &st), Attrs::default());
    let later = Attrs {
        mtime: Some((1_600_000_000, 5)),
        ..same
    };
    assert_eq!(
        still_to_apply(&later, &st),
        Attrs {
            mtime: Some((1_600_000_000, 5)),
            ..Attrs::default()
        }
    );
    // Another mode (the mtime the same) is applied.
    b.set_attrs(
        b"f",
        &Attrs {
            mode: Some(0o600),
            ..same
        },
    )
    .unwrap();
    let md = std::fs::metadata(&f).unwrap();
    assert_eq!((md.mode() & 0o7777, md.mtime()), (0o600, 1_600_000_000));
    if !rustix::process::geteuid().is_root() {
        return;
    }
    // A chown clears set-user-ID: a mode the file had before it is applied after it.
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let other = Attrs {
        mode: Some(0o4755),
        owner: Some((uid + 1, gid + 1)),
        mtime: None,
    };
    assert_eq!(
        still_to_apply(&other, &rustix::fs::stat(&f).unwrap()),
        other
    );
    b.set_attrs(b"f", &other).unwrap();
    let md = std::fs::metadata(&f).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid()),
        (0o4755, uid + 1, gid + 1)
    );
}

#[test]
fn a_patch_decodes_straight_into_a_posix_temp_and_commits_as_written() {
    // The receiver decodes patches into a shared mapping of the temp file: the temp must be
    // one that can be mapped for writing (opened read-write), and the commit must see what
    // was written through the mapping (size, content, the mtime set after it).
    use crate::codec::patch::{patch_encode, PatchDecoder};
    let tree = tempfile::tempdir().unwrap();
    let b = backend(tree.path());
    let old = data(400_000);
    let mut new = old.clone();
    new[1000..1100].fill(7);
    new.extend_from_slice(b"appended");
    let patch = patch_encode(&old, &new, 3).unwrap();
    let t = b.create_temp(b"f").unwrap();
    let mut dec = PatchDecoder::from_bytes(old).unwrap();
    dec.decode_into(t.file().expect("a posix temp is a file"), new.len() as u64)
        .unwrap();
    let mut seen = 0;
    dec.feed(&patch, &mut |d| {
        seen += d.len();
        Ok(())
    })
    .unwrap();
    dec.finish().unwrap();
    assert_eq!(seen, new.len());
    let mut a = attrs();
    a.mtime = Some((1_600_000_000, 5));
    t.commit(&a).unwrap();
    let p = tree.path().join("f");
    assert!(std::fs::read(&p).unwrap() == new);
    assert_eq!(std::fs::metadata(&p).unwrap().mtime(), 1_600_000_000);
}
