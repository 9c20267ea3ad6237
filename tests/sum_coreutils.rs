//! `fleetsync sum` against GNU coreutils: every output byte must match what
//! `cksum`, `sum -r`, `sum -s`, `md5sum` and `sha*sum` print on the same input.
//! The reference is always coreutils, never our own earlier output.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use proptest::prelude::*;

mod support;
use support::{unhex, BIN};

/// Our algorithm name and the coreutils command it must match.
const REFERENCES: &[(&str, &[&str])] = &[
    ("cksum", &["cksum"]),
    ("bsd", &["sum", "-r"]),
    ("sysv", &["sum", "-s"]),
    ("md5", &["md5sum"]),
    ("sha1", &["sha1sum"]),
    ("sha256", &["sha256sum"]),
    ("sha512", &["sha512sum"]),
];

/// The GNU tools with `--tag` and `-c`.
const DIGEST_TOOLS: &[(&str, &str)] = &[
    ("md5", "md5sum"),
    ("sha1", "sha1sum"),
    ("sha256", "sha256sum"),
    ("sha512", "sha512sum"),
];

fn run(argv: &[&str], args: &[&str], dir: &Path, stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .args(args)
        .current_dir(dir)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", argv[0]));
    if let Some(input) = stdin {
        use std::io::Write;
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn ours(args: &[&str], dir: &Path, stdin: Option<&[u8]>) -> Output {
    run(&[BIN, "sum"], args, dir, stdin)
}

/// `fleetsync sum -a ALG ARGS` and `REFERENCE ARGS` print the same bytes and exit alike.
fn assert_same(alg: &str, reference: &[&str], args: &[&str], dir: &Path, stdin: Option<&[u8]>) {
    let mut with_alg = vec!["-a", alg];
    with_alg.extend_from_slice(args);
    let theirs = run(reference, args, dir, stdin);
    let mine = ours(&with_alg, dir, stdin);
    assert_eq!(
        String::from_utf8_lossy(&mine.stdout),
        String::from_utf8_lossy(&theirs.stdout),
        "stdout of `fleetsync sum -a {alg} {args:?}` vs `{reference:?}`"
    );
    assert_eq!(
        mine.stdout, theirs.stdout,
        "stdout bytes, -a {alg} {args:?}"
    );
    assert_eq!(
        mine.status.code(),
        theirs.status.code(),
        "exit status, -a {alg} {args:?}"
    );
}

/// Deterministic, incompressible bytes.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

const SIZES: &[usize] = &[
    0,
    1,
    511,
    512,
    513,
    4096,
    (1 << 20) - 1,
    1 << 20,
    (1 << 20) + 1,
];

fn sized_files(dir: &Path) -> Vec<String> {
    SIZES
        .iter()
        .map(|&n| {
            let name = format!("size-{n}");
            std::fs::write(dir.join(&name), data(n, n as u64)).unwrap();
            name
        })
        .collect()
}

#[test]
fn every_boundary_size_matches_coreutils_in_one_invocation() {
    let dir = tempfile::tempdir().unwrap();
    let names = sized_files(dir.path());
    let args: Vec<&str> = names.iter().map(String::as_str).collect();
    for (alg, reference) in REFERENCES {
        assert_same(alg, reference, &args, dir.path(), None);
    }
}

#[test]
fn a_single_file_operand_matches_coreutils() {
    let dir = tempfile::tempdir().unwrap();
    let names = sized_files(dir.path());
    for (alg, reference) in REFERENCES {
        for name in [&names[0], &names[4], &names[8]] {
            assert_same(alg, reference, &[name], dir.path(), None);
        }
    }
}

#[test]
fn stdin_matches_coreutils_implicit_and_as_dash() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"file").unwrap();
    for (alg, reference) in REFERENCES {
        for input in [&b""[..], b"abc", &data(70_000, 7)] {
            // No operand: `sum`/`cksum` print no name, md5sum prints "-".
            assert_same(alg, reference, &[], dir.path(), Some(input));
            assert_same(alg, reference, &["-"], dir.path(), Some(input));
            assert_same(alg, reference, &["f", "-"], dir.path(), Some(input));
        }
    }
}

/// Names that need care: spaces, newline, backslash, carriage return, leading dash-free oddities.
const AWKWARD: &[&str] = &[
    "with space",
    "new\nline",
    "back\\slash",
    "both\\and\nnewline",
    "carriage\rreturn",
    "trailing space ",
    "it's",
];

fn awkward_files(dir: &Path) -> Vec<&'static str> {
    for (i, name) in AWKWARD.iter().enumerate() {
        std::fs::write(dir.join(name), data(100 + i, i as u64)).unwrap();
    }
    AWKWARD.to_vec()
}

#[test]
fn awkward_names_are_escaped_like_coreutils() {
    let dir = tempfile::tempdir().unwrap();
    let names = awkward_files(dir.path());
    for (alg, reference) in REFERENCES {
        assert_same(alg, reference, &names, dir.path(), None);
    }
}

#[test]
fn tag_matches_coreutils_including_escaped_names() {
    let dir = tempfile::tempdir().unwrap();
    let mut names = awkward_files(dir.path());
    std::fs::write(dir.path().join("plain"), b"plain").unwrap();
    names.push("plain");
    let mut args = vec!["--tag"];
    args.extend_from_slice(&names);
    for (alg, tool) in DIGEST_TOOLS {
        assert_same(alg, &[tool], &args, dir.path(), None);
        assert_same(alg, &[tool], &["--tag"], dir.path(), Some(b"stdin"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn random_contents_match_coreutils(
        len in 0usize..300_000,
        seed in any::<u64>(),
        split in 0usize..3,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let bytes = data(len, seed);
        // One to three files cut from the same random bytes.
        let cut = len / (split + 1);
        let mut names = Vec::new();
        for i in 0..=split {
            let end = if i == split { len } else { (i + 1) * cut };
            let name = format!("r{i}");
            std::fs::write(dir.path().join(&name), &bytes[i * cut..end]).unwrap();
            names.push(name);
        }
        let args: Vec<&str> = names.iter().map(String::as_str).collect();
        for (alg, reference) in REFERENCES {
            assert_same(alg, reference, &args, dir.path(), None);
        }
    }
}

/// `fleetsync sum -c` and `TOOL -c` on the same list: same stdout, same
/// stderr (program name aside), same exit status.
fn assert_check_same(alg: &str, tool: &str, list: &str, flags: &[&str], dir: &Path) {
    let mut theirs_args = vec!["-c"];
    theirs_args.extend_from_slice(flags);
    theirs_args.push(list);
    let theirs = run(&[tool], &theirs_args, dir, None);
    let mut mine_args = vec!["-a", alg];
    mine_args.extend_from_slice(&theirs_args);
    let mine = ours(&mine_args, dir, None);
    let what = format!("sum -c {flags:?} vs {tool} -c");
    assert_eq!(
        String::from_utf8_lossy(&mine.stdout),
        String::from_utf8_lossy(&theirs.stdout),
        "stdout, {what}"
    );
    let their_err =
        String::from_utf8_lossy(&theirs.stderr).replace(&format!("{tool}:"), "fleetsync:");
    assert_eq!(
        String::from_utf8_lossy(&mine.stderr),
        their_err,
        "stderr, {what}"
    );
    assert_eq!(
        mine.status.code(),
        theirs.status.code(),
        "exit status, {what}"
    );
}

#[test]
fn check_verifies_lists_written_by_coreutils_like_coreutils() {
    let dir = tempfile::tempdir().unwrap();
    let mut names = awkward_files(dir.path());
    for name in ["good", "tampered", "gone"] {
        std::fs::write(dir.path().join(name), name).unwrap();
    }
    names.extend(["good", "tampered", "gone"]);
    for (alg, tool) in [("md5", "md5sum"), ("sha256", "sha256sum")] {
        let untagged = run(&[tool], &names, dir.path(), None).stdout;
        let mut tag_args = vec!["--tag"];
        tag_args.extend_from_slice(&names);
        let tagged = run(&[tool], &tag_args, dir.path(), None).stdout;
        let mut list = untagged.clone();
        list.extend_from_slice(&tagged);
        list.extend_from_slice(b"this line is not a checksum\n");
        std::fs::write(dir.path().join("all.list"), &list).unwrap();
        std::fs::write(dir.path().join("clean.list"), &untagged).unwrap();

        // Everything intact: all OK, exit 0.
        assert_check_same(alg, tool, "clean.list", &[], dir.path());
        let ok = ours(&["-c", "clean.list"], dir.path(), None);
        assert_eq!(
            ok.status.code(),
            Some(0),
            "algorithm inferred from the digest length"
        );

        // One file changed, one gone, one bad line.
        std::fs::write(dir.path().join("tampered"), "tampered!").unwrap();
        std::fs::remove_file(dir.path().join("gone")).unwrap();
        for flags in [
            &[][..],
            &["--quiet"],
            &["--status"],
            &["--warn"],
            &["--strict"],
        ] {
            assert_check_same(alg, tool, "all.list", flags, dir.path());
        }
        let out = ours(&["-c", "all.list"], dir.path(), None);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("tampered: FAILED\n"), "{stdout}");
        assert!(stdout.contains("gone: FAILED open or read\n"), "{stdout}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("fleetsync: WARNING: 2 computed checksums did NOT match"),
            "{stderr}"
        );
        assert!(stderr.contains("fleetsync: WARNING: 2 listed files could not be read"));
        assert!(stderr.contains("fleetsync: WARNING: 1 line is improperly formatted"));
        assert_eq!(out.status.code(), Some(1));

        // Restore for the next tool.
        std::fs::write(dir.path().join("tampered"), "tampered").unwrap();
        std::fs::write(dir.path().join("gone"), "gone").unwrap();
    }
}

#[test]
fn check_with_one_mismatch_says_so_in_the_singular() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a"), "a").unwrap();
    std::fs::write(dir.path().join("b"), "b").unwrap();
    let list = run(&["md5sum"], &["a", "b"], dir.path(), None).stdout;
    std::fs::write(dir.path().join("list"), list).unwrap();
    std::fs::write(dir.path().join("b"), "B").unwrap();
    assert_check_same("md5", "md5sum", "list", &[], dir.path());
    let out = ours(&["-c", "list"], dir.path(), None);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "fleetsync: WARNING: 1 computed checksum did NOT match\n"
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn check_reads_the_list_from_stdin() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a"), "a").unwrap();
    let list = run(&["sha1sum"], &["a"], dir.path(), None).stdout;
    let out = ours(&["-c"], dir.path(), Some(&list));
    assert_eq!(out.stdout, b"a: OK\n");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn check_without_checksum_lines_fails_like_coreutils() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("junk"), "nothing to see\n").unwrap();
    assert_check_same("md5", "md5sum", "junk", &[], dir.path());
}

#[test]
fn check_accepts_cksum_and_sum_lines() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x y"), data(3000, 3)).unwrap();
    for (alg, reference) in [
        ("cksum", &["cksum"][..]),
        ("bsd", &["sum", "-r"]),
        ("sysv", &["sum", "-s"]),
    ] {
        let mut args = reference[1..].to_vec();
        args.extend(["x y", "x y"]); // two operands, so the name is printed
        let list = run(&reference[..1], &args, dir.path(), None).stdout;
        std::fs::write(dir.path().join("list"), &list).unwrap();
        let out = ours(&["-a", alg, "-c", "list"], dir.path(), None);
        assert_eq!(
            out.stdout,
            b"x y: OK\nx y: OK\n",
            "{alg}: {}",
            String::from_utf8_lossy(&list)
        );
        assert_eq!(out.status.code(), Some(0));
    }
}

#[test]
fn unreadable_file_is_named_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a"), "a").unwrap();
    std::fs::write(dir.path().join("b"), "b").unwrap();
    let args = ["a", "missing file", "b"];
    for (alg, tool) in DIGEST_TOOLS {
        assert_same(alg, &[tool], &args, dir.path(), None);
    }
    let out = ours(&["-a", "md5", "a", "missing file", "b"], dir.path(), None);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "fleetsync: 'missing file': No such file or directory\n"
    );
    assert_eq!(out.stdout.iter().filter(|b| **b == b'\n').count(), 2);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn directory_without_recursive_is_an_error_like_coreutils() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("a"), "a").unwrap();
    assert_same("md5", &["md5sum"], &["sub", "a"], dir.path(), None);
    let out = ours(&["sub", "a"], dir.path(), None);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "fleetsync: sub: Is a directory\n"
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn recursive_hashes_the_tree_in_sorted_order_like_find_and_md5sum() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    for rel in ["b/z", "b/a", "a", "A", "c/d/e f", "c/d/new\nline"] {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, rel).unwrap();
    }
    std::os::unix::fs::symlink("a", root.join("link")).unwrap();
    // The reference: every regular file, sorted by bytes, through md5sum.
    let mut files: Vec<String> = Vec::new();
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                walk(&e.path(), base, out);
            } else if t.is_file() {
                out.push(
                    e.path()
                        .strip_prefix(base)
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .to_owned(),
                );
            }
        }
    }
    walk(&root, dir.path(), &mut files);
    files.sort();
    let args: Vec<&str> = files.iter().map(String::as_str).collect();
    let theirs = run(&["md5sum"], &args, dir.path(), None);
    let mine = ours(&["-r", "-a", "md5", "tree"], dir.path(), None);
    assert_eq!(
        String::from_utf8_lossy(&mine.stdout),
        String::from_utf8_lossy(&theirs.stdout)
    );
    assert_eq!(
        String::from_utf8_lossy(&mine.stderr),
        "fleetsync: skipping symlink tree/link\n"
    );
    assert_eq!(mine.status.code(), Some(0));
}

#[test]
fn several_algorithms_print_one_line_each_in_the_order_given() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("one"), data(5000, 1)).unwrap();
    std::fs::write(dir.path().join("two"), data(7000, 2)).unwrap();
    let mine = ours(&["-a", "sha256,cksum,md5", "one", "two"], dir.path(), None);
    let mut expected = Vec::new();
    for f in ["one", "two"] {
        expected.extend(run(&["sha256sum"], &[f], dir.path(), None).stdout);
        expected.extend(run(&["cksum"], &[f], dir.path(), None).stdout);
        expected.extend(run(&["md5sum"], &[f], dir.path(), None).stdout);
    }
    assert_eq!(
        String::from_utf8_lossy(&mine.stdout),
        String::from_utf8_lossy(&expected)
    );
}

#[test]
fn json_lines_parse_and_match_md5sum() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("j"), data(12345, 9)).unwrap();
    let mine = ours(&["--json", "-a", "md5", "j", "nope"], dir.path(), None);
    assert_eq!(mine.status.code(), Some(1));
    let lines: Vec<serde_json::Value> = String::from_utf8(mine.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let md5 = String::from_utf8(run(&["md5sum"], &["j"], dir.path(), None).stdout).unwrap();
    assert_eq!(lines[0]["path"], "j");
    assert_eq!(lines[0]["size"], 12345);
    assert_eq!(lines[0]["algorithm"], "md5");
    assert_eq!(lines[0]["digest"], md5.split_whitespace().next().unwrap());
    assert!(lines[0]["error"].is_null());
    assert_eq!(lines[1]["path"], "nope");
    assert!(lines[1]["digest"].is_null());
    assert_eq!(lines[1]["error"], "No such file or directory");
}

#[test]
fn json_names_that_are_not_utf8_carry_their_bytes_in_hex() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    // Two names that print alike as lossy UTF-8, and one UTF-8 name.
    let names: [&[u8]; 3] = [b"caf\xe9", b"caf\xff", "café".as_bytes()];
    for n in names {
        std::fs::write(dir.path().join(std::ffi::OsStr::from_bytes(n)), n).unwrap();
    }
    let mine = ours(&["--json", "-r", "-a", "md5", "."], dir.path(), None);
    assert_eq!(mine.status.code(), Some(0));
    let lines: Vec<serde_json::Value> = String::from_utf8(mine.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), names.len());
    for n in names {
        let mut path = b"./".to_vec();
        path.extend_from_slice(n);
        let line = lines
            .iter()
            .find(|l| match l.get("path_hex") {
                Some(hex) => unhex(hex.as_str().unwrap()) == path,
                None => l["path"].as_str().unwrap().as_bytes() == path,
            })
            .unwrap_or_else(|| panic!("{:?} missing: {lines:?}", String::from_utf8_lossy(n)));
        assert_eq!(line["path"], String::from_utf8_lossy(&path).as_ref());
        assert_eq!(
            line.get("path_hex").is_some(),
            std::str::from_utf8(n).is_err()
        );
        // Each file holds its own name: the digest proves the line is that file's.
        let md5 = run(&["md5sum"], &[], dir.path(), Some(n));
        let md5 = String::from_utf8(md5.stdout).unwrap();
        assert_eq!(line["digest"], md5.split_whitespace().next().unwrap());
    }
}

#[test]
fn list_names_every_algorithm_and_the_crc16_catalog() {
    let out = ours(&["--list"], Path::new("."), None);
    let text = String::from_utf8(out.stdout).unwrap();
    for name in [
        "crc32",
        "crc32c",
        "adler32",
        "bsd",
        "sysv",
        "cksum",
        "crc16",
        "crc16/xmodem",
        "md5",
        "sha1",
        "sha256",
        "sha512",
        "blake3",
        "xxh3",
        "xxh128",
    ] {
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().next() == Some(name)),
            "{name} missing from --list:\n{text}"
        );
    }
}

#[test]
fn unknown_algorithm_is_a_usage_error() {
    let out = ours(&["-a", "nonesuch", "x"], Path::new("."), None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nonesuch"));
}

#[test]
fn check_ignore_missing_like_coreutils() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("here"), "here").unwrap();
    std::fs::create_dir(dir.path().join("subdir")).unwrap();
    let mut some = run(&["md5sum"], &["here"], dir.path(), None).stdout;
    some.extend_from_slice(b"d41d8cd98f00b204e9800998ecf8427e  not-here\n");
    std::fs::write(dir.path().join("some"), some).unwrap();
    std::fs::write(
        dir.path().join("none"),
        "d41d8cd98f00b204e9800998ecf8427e  not-here\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("dir"),
        "d41d8cd98f00b204e9800998ecf8427e  subdir\n",
    )
    .unwrap();
    for list in ["some", "none", "dir"] {
        assert_check_same("md5", "md5sum", list, &["--ignore-missing"], dir.path());
    }
}

#[test]
fn binary_mark_and_zero_terminated_lines_match_coreutils() {
    let dir = tempfile::tempdir().unwrap();
    let names = awkward_files(dir.path());
    for (alg, tool) in DIGEST_TOOLS {
        for extra in [
            &["-z"][..],
            &["-z", "--tag"],
            &["-b"],
            &["-b", "-z"],
            &["-b", "-t"],
        ] {
            let mut args = extra.to_vec();
            args.extend_from_slice(&names);
            assert_same(alg, &[tool], &args, dir.path(), None);
        }
    }
}

#[test]
fn every_io_backend_and_thread_count_matches_coreutils() {
    let dir = tempfile::tempdir().unwrap();
    // Big enough to be split into parallel chunks with a small --chunk-size.
    std::fs::write(dir.path().join("big"), data((3 << 20) + 12345, 42)).unwrap();
    std::fs::write(dir.path().join("small"), data(777, 43)).unwrap();
    let algs = [REFERENCES[0], REFERENCES[2], REFERENCES[3]];
    let expected: Vec<Output> = algs
        .iter()
        .map(|(_, reference)| run(reference, &["big", "small"], dir.path(), None))
        .collect();
    for io in ["auto", "pread", "mmap"] {
        for jobs in ["1", "3"] {
            for chunking in [
                &[][..],
                &["--chunk-size", "64K", "--parallel-threshold", "100K"],
            ] {
                let mut args = vec!["--io", io, "-j", jobs];
                args.extend_from_slice(chunking);
                args.extend(["big", "small"]);
                for ((alg, _), theirs) in algs.iter().zip(&expected) {
                    let mut with_alg = vec!["-a", alg];
                    with_alg.extend_from_slice(&args);
                    let mine = ours(&with_alg, dir.path(), None);
                    assert_eq!(
                        String::from_utf8_lossy(&mine.stdout),
                        String::from_utf8_lossy(&theirs.stdout),
                        "{alg} {args:?}: {}",
                        String::from_utf8_lossy(&mine.stderr)
                    );
                }
            }
        }
    }
}

#[test]
fn check_names_standard_input_like_coreutils() {
    let dir = tempfile::tempdir().unwrap();
    let junk = b"junk\n";
    let theirs = run(&["md5sum"], &["-c", "--warn"], dir.path(), Some(junk));
    let mine = ours(&["-a", "md5", "-c", "--warn"], dir.path(), Some(junk));
    assert_eq!(
        String::from_utf8_lossy(&mine.stderr),
        String::from_utf8_lossy(&theirs.stderr).replace("md5sum:", "fleetsync:")
    );
    assert_eq!(mine.status.code(), theirs.status.code());
}

#[test]
fn check_accepts_hex_and_tagged_lines_for_cksum_and_sum() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), data(5000, 5)).unwrap();
    for (alg, reference, width) in [
        ("cksum", &["cksum"][..], 8),
        ("bsd", &["sum", "-r"], 4),
        ("sysv", &["sum", "-s"], 4),
    ] {
        // The checksum as coreutils prints it (decimal), written in hex.
        let mut args = reference[1..].to_vec();
        args.push("f");
        let out = String::from_utf8(run(&reference[..1], &args, dir.path(), None).stdout).unwrap();
        let value: u64 = out.split_whitespace().next().unwrap().parse().unwrap();
        let hex = format!("{value:0width$x}");
        let tag = alg.to_ascii_uppercase();
        let list = format!("{hex}  f\n{tag} (f) = {hex}\n");
        std::fs::write(dir.path().join("list"), list).unwrap();
        let mine = ours(&["-a", alg, "-c", "list"], dir.path(), None);
        assert_eq!(
            String::from_utf8_lossy(&mine.stdout),
            "f: OK\nf: OK\n",
            "{alg}"
        );
        assert_eq!(mine.status.code(), Some(0));
        // A wrong value fails.
        let bad = format!("{:0width$x}  f\n", value ^ 1);
        std::fs::write(dir.path().join("bad"), bad).unwrap();
        let mine = ours(&["-a", alg, "-c", "bad"], dir.path(), None);
        assert_eq!(
            String::from_utf8_lossy(&mine.stdout),
            "f: FAILED\n",
            "{alg}"
        );
        assert_eq!(mine.status.code(), Some(1));
    }
}
