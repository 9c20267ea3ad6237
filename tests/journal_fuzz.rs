//! The agent's block journal is a decoder too: after a crash, `recover` reads
//! `ROOT/.fleetsync-staging/<txn>/journal` and replays it. A corrupted,
//! truncated or hostile journal must give an error or a replay confined to
//! the root — never a panic, never a write outside the root (through `..`,
//! an absolute path, an escaped `%2F..`, or a symlink on the way).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use fleetsync_agent::journal::{recover, STAGING_DIR};
use proptest::prelude::*;

const VALID: &str = "fleetsync-journal 1
block blk
put 1 a.txt = 644 1600000000.5 - -
put 2 dir/b.txt = 600 - - -
symlink 3 l =a.txt - - - -
delete 4 old.txt = - - - -
mkdir 5 newdir = 755 - - -
attrs 6 dir = 755 - - -
end 6
";

/// Path fields a hostile or corrupted journal could hold.
const HOSTILE: &[&str] = &[
    "../x",
    "/tmp/x",
    "esc/x",
    "esc",
    "dir/../../x",
    "%2E%2E/x",
    "a%2F..%2F..%2Fx",
    ".fleetsync-staging/x",
    "",
    "a%00b",
    "%",
    "%G1",
    "%e9",
];

/// A root with a committing transaction whose journal is `journal`, and a
/// sibling `outside` directory that must never change.
fn setup(tmp: &Path, journal: &[u8]) -> std::path::PathBuf {
    let root = tmp.join("root");
    let outside = tmp.join("outside");
    fs::create_dir_all(root.join("dir")).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("secret"), b"secret").unwrap();
    fs::write(root.join("a.txt"), b"old a").unwrap();
    fs::write(root.join("dir/b.txt"), b"old b").unwrap();
    fs::write(root.join("old.txt"), b"old").unwrap();
    symlink("../outside", root.join("esc")).unwrap();
    let txn = root.join(STAGING_DIR).join("t1");
    fs::create_dir_all(txn.join("new")).unwrap();
    fs::create_dir_all(txn.join("backup")).unwrap();
    fs::write(txn.join("new/1"), b"new a").unwrap();
    fs::write(txn.join("new/2"), b"new b").unwrap();
    symlink("a.txt", txn.join("new/3")).unwrap();
    fs::create_dir(txn.join("new/5")).unwrap();
    fs::write(txn.join("journal"), journal).unwrap();
    fs::write(txn.join("COMMITTING"), b"").unwrap();
    root
}

fn assert_outside_untouched(tmp: &Path) {
    let outside = tmp.join("outside");
    let names: Vec<_> = fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("secret")],
        "a file appeared outside the root"
    );
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"secret");
    for p in ["x", "tmp/x"] {
        assert!(!tmp.join(p).exists(), "{p} was created outside the root");
    }
}

fn recover_mutated(journal: &[u8]) {
    let tmp = tempfile::tempdir().unwrap();
    let root = setup(tmp.path(), journal);
    let _ = recover(&root);
    assert_outside_untouched(tmp.path());
}

#[test]
fn the_valid_journal_rolls_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let root = setup(tmp.path(), VALID.as_bytes());
    let report = recover(&root).unwrap();
    assert_eq!(report.rolled_forward, vec!["t1".to_owned()], "{report:?}");
    assert_eq!(fs::read(root.join("a.txt")).unwrap(), b"new a");
    assert_eq!(fs::read(root.join("dir/b.txt")).unwrap(), b"new b");
    assert_eq!(fs::read_link(root.join("l")).unwrap(), Path::new("a.txt"));
    assert!(!root.join("old.txt").exists());
    assert!(root.join("newdir").is_dir());
    assert_outside_untouched(tmp.path());
}

#[test]
fn every_truncation_is_an_error_or_a_replay() {
    for cut in 0..VALID.len() {
        recover_mutated(&VALID.as_bytes()[..cut]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn hostile_paths_stay_beneath_the_root(
        line in 2usize..8,
        field in prop::sample::select(vec![2usize, 3]),
        bad in prop::sample::select(HOSTILE.to_vec()),
    ) {
        let mut lines: Vec<String> = VALID.lines().map(str::to_owned).collect();
        let mut f: Vec<String> = lines[line].split(' ').map(str::to_owned).collect();
        if f.len() > field {
            f[field] = if field == 3 { format!("={bad}") } else { bad.to_owned() };
        }
        lines[line] = f.join(" ");
        recover_mutated((lines.join("\n") + "\n").as_bytes());
    }

    #[test]
    fn mutated_journals_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..5),
    ) {
        let mut b = VALID.as_bytes().to_vec();
        for (i, c, op) in edits {
            let k = i.index(b.len());
            match op {
                0 => b[k] = c,
                1 => b.insert(k, c),
                2 => { b.remove(k); }
                _ => b[k] = b" \n%=-.0123456789/"[c as usize % 17],
            }
        }
        recover_mutated(&b);
    }
}
