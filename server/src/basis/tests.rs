use super::*;
use crate::list::{Kind, Meta};

fn norm(name: &str) -> String {
    let mut out = Vec::new();
    normalize_path(name.as_bytes(), &mut out);
    String::from_utf8(out).unwrap().replace(MARKER as char, "#")
}

fn shape(name: &str) -> NameShape {
    normalize_name(name.as_bytes(), &mut Vec::new())
}

#[test]
fn normalized_forms() {
    let table = [
        ("libfoo-ab12cd34.3.26.so", "libfoo-#.so"),
        ("numpy-1.26.4.dist-info/RECORD", "numpy-#.dist-info/RECORD"),
        (
            "pkg/_core.cpython-311-x86_64-linux-gnu.so",
            "pkg/_core.cpython-#-x86_#-linux-gnu.so",
        ),
        (
            "numpy.libs/libopenblas64_p-r0-0cf96a72.3.23.dev.so",
            "numpy.libs/libopenblas64_p-#.so",
        ),
        ("foo-1.0-SNAPSHOT.jar", "foo-#.jar"),
        ("libssl.so.1.1", "libssl.so.#"),
        ("python3.11", "python3.#"),
        ("static/js/main.8f3a2b1c.js", "static/js/main.#.js"),
        ("decade.txt", "decade.txt"),
        ("md5.h", "md5.h"),
        ("foo.tar.bz2", "foo.tar.bz2"),
        ("..hidden-", "..hidden-"),
        ("1234", "#"),
        ("", ""),
        ("a//b", "a//b"),
    ];
    for (name, want) in table {
        assert_eq!(norm(name), want, "{name}");
    }
}

#[test]
fn names_that_match_once_versions_and_hashes_are_stripped() {
    let pairs = [
        ("libfoo-ab12cd34.3.26.so", "libfoo-9f8e7d6c.3.27.so"),
        (
            "numpy-1.26.4.dist-info/RECORD",
            "numpy-2.0.0.dist-info/RECORD",
        ),
        (
            "numpy-1.26.4.dist-info/RECORD",
            "numpy-2.0.0rc1.dist-info/RECORD",
        ),
        (
            "numpy.libs/libopenblas64_p-r0-0cf96a72.3.23.dev.so",
            "numpy.libs/libopenblas64_p-r0-5007b62f.3.27.so",
        ),
        (
            "pkg/_core.cpython-311-x86_64-linux-gnu.so",
            "pkg/_core.cpython-312-x86_64-linux-gnu.so",
        ),
        ("main.8f3a2b1c.js", "main.1d2e3f4a.js"),
        ("foo-1.0-SNAPSHOT.jar", "foo-1.1.jar"),
        ("libssl.so.1.1", "libssl.so.1.0.2"),
        (
            "node_modules/.pnpm/foo@1.2.3/x.js",
            "node_modules/.pnpm/foo@1.10.0/x.js",
        ),
        ("lib/v1.2/a.py", "lib/v2/a.py"),
        ("DEADBEEF01.bin", "0123456789ABCDEF.bin"),
        (
            "store/0c2pq3yk6jflbxdd1jih9n5ikzdkqkmm-bash/bin",
            "store/7w5hlwgrxyvb3gb1pj8n0fhnrbpc3b7r-bash/bin",
        ),
    ];
    for (a, b) in pairs {
        assert_eq!(norm(a), norm(b), "{a} ~ {b}");
    }
}

#[test]
fn names_that_must_not_match() {
    let pairs = [
        ("libfoo-1.2.so", "libbar-1.2.so"),
        (
            "pkg/_core.cpython-311-x86_64-linux-gnu.so",
            "pkg/_core.cpython-311-aarch64-linux-gnu.so",
        ),
        ("libssl1.so", "libssl3.so"),
        ("python3.11", "python2.7"),
        ("md5.h", "md4.h"),
        ("foo.tar.gz", "foo.tar.bz2"),
        ("foo.c", "foo.h"),
        ("decade.txt", "facade.txt"),
        ("data.txt", "data.json"),
        ("a/libfoo-1.so", "b/libfoo-2.so"),
        ("foo-1.2.so", "foo_1.2.so"),
        ("foo.dev.js", "foo.js"),
    ];
    for (a, b) in pairs {
        assert_ne!(norm(a), norm(b), "{a} !~ {b}");
    }
}

#[test]
fn distinctive_names_are_versioned_and_keep_a_word_besides_the_extension() {
    assert!(shape("libfoo-ab12cd34.3.26.so").distinctive());
    assert!(shape("main.8f3a2b1c.js").distinctive());
    assert!(!shape("RECORD").distinctive());
    assert!(!shape("libfoo.so").distinctive());
    assert!(!shape("1234.dat").distinctive());
    assert!(!shape("20240101.csv").distinctive());
}

fn remote(files: &[(&str, u64)]) -> FileList {
    let mut l = FileList::new();
    for &(p, size) in files {
        let m = Meta {
            kind: Some(Kind::File),
            mode: 0o644,
            size,
            nlink: 1,
            ..Meta::default()
        };
        l.push(p.as_bytes(), &m, b"").unwrap();
    }
    l.finish().unwrap();
    l
}

/// The path of the basis chosen for `path` of `size`, all remote files candidates.
fn choose(files: &[(&str, u64)], path: &str, size: u64) -> Option<String> {
    let r = remote(files);
    let mut ix = BasisIndex::new(&r, 0..r.len() as u32);
    ix.choose(&r, path.as_bytes(), size)
        .map(|i| String::from_utf8(r.path(i).to_vec()).unwrap())
}

#[test]
fn similar_name_of_close_size_is_chosen_same_directory_first() {
    let files = [
        ("a/libfoo-def456.3.26.so", 900),
        ("b/libfoo-0123ab.3.25.so", 1000),
        ("a/other.so", 5000),
    ];
    assert_eq!(
        choose(&files, "a/libfoo-abc123.3.27.so", 1000).as_deref(),
        Some("b/libfoo-0123ab.3.25.so"), // the same size wins over the same directory
    );
    assert_eq!(
        choose(&files, "a/libfoo-abc123.3.27.so", 1100).as_deref(),
        Some("a/libfoo-def456.3.26.so"),
    );
    // Another directory: a distinctive name still matches.
    assert_eq!(
        choose(&files[1..], "c/libfoo-abc123.3.27.so", 1100).as_deref(),
        Some("b/libfoo-0123ab.3.25.so"),
    );
}

#[test]
fn a_size_more_than_twice_off_is_no_basis() {
    let files = [("libfoo-1.2.so", 1000)];
    assert_eq!(choose(&files, "libfoo-1.3.so", 2001), None);
    assert_eq!(choose(&files, "libfoo-1.3.so", 499), None);
    assert!(choose(&files, "libfoo-1.3.so", 2000).is_some());
    assert!(choose(&files, "libfoo-1.3.so", 500).is_some());
}

#[test]
fn closest_size_wins_among_similar_names() {
    let files = [("d/x-1.bin", 100), ("d/x-2.bin", 180), ("d/x-3.bin", 260)];
    assert_eq!(
        choose(&files, "d/x-9.bin", 200).as_deref(),
        Some("d/x-2.bin")
    );
    assert_eq!(
        choose(&files, "d/x-9.bin", 120).as_deref(),
        Some("d/x-1.bin")
    );
    assert_eq!(
        choose(&files, "d/x-9.bin", 250).as_deref(),
        Some("d/x-3.bin")
    );
}

#[test]
fn same_size_unrelated_name_nearest_in_path_order() {
    let files = [("a/one", 77), ("m/two", 77), ("z/three", 77), ("m/big", 78)];
    assert_eq!(choose(&files, "m/new", 77).as_deref(), Some("m/two"));
    assert_eq!(choose(&files, "a/new", 77).as_deref(), Some("a/one"));
    assert_eq!(choose(&files, "zz", 77).as_deref(), Some("z/three"));
}

#[test]
fn plain_names_do_not_match_across_directories() {
    let files = [("scipy-1.11.dist-info/RECORD", 1000)];
    assert_eq!(choose(&files, "numpy-2.0.0.dist-info/RECORD", 1100), None);
    assert_eq!(
        choose(&files, "scipy-1.12.dist-info/RECORD", 1100).as_deref(),
        Some("scipy-1.11.dist-info/RECORD"),
    );
}

#[test]
fn unrelated_names_and_empty_files_get_no_basis() {
    let files = [("libbar-1.2.so", 1000), ("empty-1.txt", 0)];
    assert_eq!(choose(&files, "libfoo-1.3.so", 1000 + 1), None);
    assert_eq!(choose(&files, "empty-2.txt", 0), None);
    assert_eq!(choose(&files, "libbar-1.3.so", 0), None);
    assert_eq!(BasisIndex::new(&remote(&files), 0..2).len(), 1);
}
