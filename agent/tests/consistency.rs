//! The consistency self-check: every way a received file can drift after it was applied is
//! reported, a clean tree reports nothing, and a deployment can plug in its own check.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use fleetsync_agent::consistency::{
    checksum_file, record_applied, run_checks, ConsistencyCheck, Inconsistency, Problem,
    ReceivedFile, RecordedStateCheck, WriteLog,
};
use fleetsync_agent::journal::RelPath;

const NAMES: [&str; 8] = [
    "same",
    "rewritten",
    "grown",
    "replaced",
    "touched",
    "deleted",
    "symlinked",
    "unlogged",
];

/// A tree whose files were "received": recorded at apply time, and (but one) logged.
fn received_tree(root: &Path, log_path: &Path) -> Vec<ReceivedFile> {
    fs::create_dir(root.join("etc")).unwrap();
    let mut log = WriteLog::open(log_path).unwrap();
    let mut out = Vec::new();
    for name in NAMES {
        let rel = format!("etc/{name}.conf");
        fs::write(root.join(&rel), format!("threads = 4 # {name}\n")).unwrap();
        let path = RelPath::new(&rel).unwrap();
        let sum = checksum_file(&mut fs::File::open(root.join(&rel)).unwrap(), "crc32").unwrap();
        let rec = record_applied(root, &path, "crc32", &sum).unwrap();
        if name != "unlogged" {
            log.append(&rec).unwrap();
        }
        out.push(rec);
    }
    out
}

fn problem_of<'a>(found: &'a [Inconsistency], name: &str) -> Option<&'a Problem> {
    let path = format!("etc/{name}.conf");
    found
        .iter()
        .find(|i| i.path == Path::new(&path))
        .map(|i| &i.problem)
}

fn keep_mtime(path: &Path, f: impl FnOnce()) {
    let before = fs::metadata(path).unwrap().modified().unwrap();
    f();
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(before)
        .unwrap();
}

#[test]
fn every_kind_of_drift_is_reported_and_a_clean_tree_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    fs::create_dir(&root).unwrap();
    let log = dir.path().join("write.log");
    let files = received_tree(&root, &log);
    let check = RecordedStateCheck::new(Some(log.clone()));

    let clean: Vec<_> = files
        .iter()
        .filter(|f| !f.path.as_path().ends_with("unlogged.conf"))
        .cloned()
        .collect();
    assert_eq!(check.check(&root, &clean), []);

    let etc = root.join("etc");
    // Same size, same mtime, different bytes: only the checksum can tell.
    keep_mtime(&etc.join("rewritten.conf"), || {
        let len = fs::metadata(etc.join("rewritten.conf")).unwrap().len() as usize;
        let text = format!("{:<1$}", "threads = 8", len - 1) + "\n";
        fs::write(etc.join("rewritten.conf"), text).unwrap();
    });
    fs::write(etc.join("grown.conf"), "threads = 4 # grown and more\n").unwrap();
    // Same content and mtime, new inode (an editor's save-by-rename).
    let replaced = etc.join("replaced.conf");
    let old_md = fs::metadata(&replaced).unwrap();
    fs::copy(&replaced, etc.join("tmp")).unwrap();
    fs::rename(etc.join("tmp"), &replaced).unwrap();
    fs::File::options()
        .write(true)
        .open(&replaced)
        .unwrap()
        .set_modified(old_md.modified().unwrap())
        .unwrap();
    assert_ne!(fs::metadata(&replaced).unwrap().ino(), old_md.ino());
    fs::File::options()
        .write(true)
        .open(etc.join("touched.conf"))
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH)
        .unwrap();
    fs::remove_file(etc.join("deleted.conf")).unwrap();
    fs::remove_file(etc.join("symlinked.conf")).unwrap();
    std::os::unix::fs::symlink("same.conf", etc.join("symlinked.conf")).unwrap();

    let found = check.check(&root, &files);
    assert_eq!(problem_of(&found, "same"), None);
    assert!(
        matches!(
            problem_of(&found, "rewritten"),
            Some(Problem::ChecksumMismatch { .. })
        ),
        "{found:?}"
    );
    assert!(matches!(
        problem_of(&found, "grown"),
        Some(Problem::SizeChanged { .. })
    ));
    assert!(matches!(
        problem_of(&found, "replaced"),
        Some(Problem::InodeChanged { .. })
    ));
    assert!(matches!(
        problem_of(&found, "touched"),
        Some(Problem::MtimeChanged { .. })
    ));
    assert_eq!(problem_of(&found, "deleted"), Some(&Problem::Missing));
    assert_eq!(
        problem_of(&found, "symlinked"),
        Some(&Problem::NotRegularFile)
    );
    assert_eq!(
        problem_of(&found, "unlogged"),
        Some(&Problem::NotInWriteLog)
    );
    assert_eq!(found.len(), 7);
    let line = found[0].to_string();
    assert!(
        line.contains("etc/") && line.contains("[recorded-state]"),
        "{line}"
    );
}

#[test]
fn the_write_log_keeps_the_last_entry_and_ignores_a_torn_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    fs::create_dir(&root).unwrap();
    let log_path = dir.path().join("write.log");
    let files = received_tree(&root, &log_path);
    // A later write by the agent itself, recorded in its log, supersedes the sync's record.
    let mut newer = files[0].clone();
    newer.checksum = "00000000".into();
    WriteLog::open(&log_path).unwrap().append(&newer).unwrap();
    // A crash mid-append leaves a torn last line.
    use std::io::Write;
    fs::File::options()
        .append(true)
        .open(&log_path)
        .unwrap()
        .write_all(b"v1 etc/torn")
        .unwrap();
    let log = WriteLog::read(&log_path).unwrap();
    assert_eq!(log.len(), NAMES.len() - 1);
    assert_eq!(log[&files[0].path].checksum, "00000000");
    let found = RecordedStateCheck::new(Some(log_path)).check(&root, &files[..1]);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].problem, Problem::WriteLogDiffers);
}

#[test]
fn odd_names_round_trip_through_the_write_log() {
    let dir = tempfile::tempdir().unwrap();
    let name = std::ffi::OsStr::new("we ird\nname%");
    fs::write(dir.path().join(name), "x").unwrap();
    let path = RelPath::new(name).unwrap();
    let rec = record_applied(dir.path(), &path, "crc32", "8CDC1683").unwrap();
    assert_eq!(rec.checksum, "8cdc1683");
    let log_path = dir.path().join("log");
    WriteLog::open(&log_path).unwrap().append(&rec).unwrap();
    assert_eq!(WriteLog::read(&log_path).unwrap()[&path], rec);
}

/// A deployment's own check: the application's validator, run once over the whole block.
struct ExternalValidator {
    /// Shell snippet; the block's files are its arguments ("$@"), run in the root.
    script: String,
}

impl ConsistencyCheck for ExternalValidator {
    fn name(&self) -> &str {
        "app-validator"
    }

    fn check(&self, root: &Path, files: &[ReceivedFile]) -> Vec<Inconsistency> {
        let out = Command::new("sh")
            .arg("-c")
            .arg(&self.script)
            .arg("validator")
            .args(files.iter().map(|f| f.path.as_path()))
            .current_dir(root)
            .output()
            .expect("run sh");
        if out.status.success() {
            return Vec::new();
        }
        // The validator judges the block as a whole: every file of it is to be synced again.
        let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        files
            .iter()
            .map(|f| Inconsistency {
                path: f.path.as_path().to_owned(),
                check: self.name().to_owned(),
                problem: Problem::Other(why.clone()),
            })
            .collect()
    }
}

#[test]
fn a_deployment_check_plugs_in_beside_the_builtin_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    fs::create_dir(&root).unwrap();
    let log = dir.path().join("write.log");
    let files: Vec<_> = received_tree(&root, &log).into_iter().take(3).collect();
    let validator = ExternalValidator {
        script: r#"for f in "$@"; do grep -q '^threads = [0-9]*' "$f" || { echo "$f: no thread count" >&2; exit 1; }; done"#.into(),
    };
    let checks: Vec<Box<dyn ConsistencyCheck>> = vec![
        Box::new(RecordedStateCheck::new(Some(log))),
        Box::new(validator),
    ];
    assert_eq!(run_checks(&checks, &root, &files), []);

    // Break one file's syntax: the built-in check sees the change, the validator the block.
    fs::write(root.join("etc/grown.conf"), "garbage\n").unwrap();
    let found = run_checks(&checks, &root, &files);
    let by_check = |c: &str| found.iter().filter(|i| i.check == c).count();
    assert_eq!(by_check("recorded-state"), 1);
    assert_eq!(by_check("app-validator"), 3);
    let msg = found
        .iter()
        .find(|i| i.check == "app-validator")
        .unwrap()
        .to_string();
    assert!(msg.contains("etc/grown.conf: no thread count"), "{msg}");
}
