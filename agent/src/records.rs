//! What the agent wrote, for the consistency loop (see [`crate::consistency`]): it records
//! every file it commits from a sync stream, and checks them on a `consistencyRequest`
//! (answered by [`crate::check`]).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fleetsync_proto::{ExpectedFile, InconsistentFile};
use tracing::{debug, warn};

use crate::consistency::{
    record_applied, ConsistencyCheck, Inconsistency, Problem, ReceivedFile, RecordedStateCheck,
    WriteLog,
};
use crate::error::show;
use crate::journal::RelPath;
use crate::{path, AgentError};

/// Records kept in memory at most (each file's is dropped once found consistent; beyond this,
/// with the check off, they are forgotten and looked up in the write log instead).
const MAX_RECORDS: usize = 1 << 20;

/// What the agent wrote, and how it checks it.
pub(crate) struct ConsistState {
    root: PathBuf,
    /// The persistent write log (`None`: records are kept in memory only).
    log: Option<Mutex<WriteLog>>,
    /// The last record of each file committed and not yet found consistent, when it could
    /// not go to a write log (none, or an append failed).
    records: Mutex<HashMap<RelPath, ReceivedFile>>,
    /// With a write log: the offset in it of the last record of each file committed and not
    /// yet found consistent, by a 64-bit hash of the path ([`rel_hash`]).
    logged: Mutex<HashMap<u64, u64>>,
    /// Run [`RecordedStateCheck`] (on the write log) before `checks`.
    builtin: bool,
    /// Further checks (a deployment's own).
    checks: Vec<Box<dyn ConsistencyCheck>>,
    /// Files received into a block transaction (`--blocks`), by transaction: path, algorithm,
    /// digest. Recorded when the block commits (the files are then in place), dropped if not.
    staged: Mutex<HashMap<String, Vec<StagedRecord>>>,
}

/// A file verified into a block transaction: path, algorithm, digest.
type StagedRecord = (Vec<u8>, String, Vec<u8>);

/// The key of a path in [`ConsistState::logged`]. Two paths of one hash (odds about
/// n^2 / 2^65) are told apart by the record's own path: the one whose record is not found
/// is read from the log, or reported "not in the write log" and synchronized again.
fn rel_hash(rel: &RelPath) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    rel.hash(&mut h);
    h.finish()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ConsistState {
    pub(crate) fn new(root: &Path) -> Self {
        ConsistState {
            root: root.to_owned(),
            log: None,
            records: Mutex::default(),
            logged: Mutex::default(),
            builtin: true,
            checks: Vec::new(),
            staged: Mutex::default(),
        }
    }

    /// Keeps the write log in `file` (`None`: in memory only). The file must not be inside
    /// the served tree: a sync would list, overwrite or delete it.
    pub(crate) fn set_log(&mut self, file: Option<&Path>) -> Result<(), AgentError> {
        let Some(file) = file else {
            self.log = None;
            return Ok(());
        };
        let bad = |why: String| AgentError::Io {
            op: "write log",
            path: file.as_os_str().as_bytes().to_vec(),
            source: std::io::Error::other(why),
        };
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // Where the directory is (or would be), resolved through the part that exists: it
        // is refused before anything is created inside the tree.
        let mut existing = dir;
        let mut missing = Vec::new();
        while !existing.exists() {
            missing.push(existing.file_name().unwrap_or_default());
            existing = existing.parent().unwrap_or(Path::new("."));
        }
        let mut resolved = std::fs::canonicalize(existing).map_err(|e| bad(e.to_string()))?;
        resolved.extend(missing.iter().rev());
        let root = std::fs::canonicalize(&self.root).map_err(|e| bad(e.to_string()))?;
        if resolved.starts_with(&root) {
            return Err(bad(format!(
                "must be outside the served tree {}",
                root.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| bad(format!("creating its directory: {e}")))?;
        match WriteLog::compact(file) {
            Ok(true) => debug!(log = %file.display(), "write log compacted"),
            Ok(false) => {}
            Err(e) => warn!("{e}"),
        }
        let log = WriteLog::open(file).map_err(|e| bad(e.to_string()))?;
        self.log = Some(Mutex::new(log));
        Ok(())
    }

    pub(crate) fn add_check(&mut self, check: Box<dyn ConsistencyCheck>) {
        self.checks.push(check);
    }

    pub(crate) fn set_checks(&mut self, checks: Vec<Box<dyn ConsistencyCheck>>) {
        self.builtin = false;
        self.checks = checks;
    }

    fn log_path(&self) -> Option<PathBuf> {
        self.log
            .as_ref()
            .map(|l| l.lock().expect("poisoned").path().to_owned())
    }

    /// Records a file just committed (renamed into place) with the digest it was verified
    /// against. Failures are logged: the file will then be reported by the check.
    pub(crate) fn record(&self, path: &[u8], algorithm: &str, digest: &[u8]) {
        let rel = match RelPath::new(OsStr::from_bytes(path)) {
            Ok(r) => r,
            Err(e) => {
                warn!("write log: {}: {e}", show(path));
                return;
            }
        };
        let rec = match record_applied(&self.root, &rel, algorithm, &hex(digest)) {
            Ok(r) => r,
            Err(e) => {
                warn!("write log: {}: {e}", show(path));
                return;
            }
        };
        self.keep(rec);
    }

    /// As [`Self::record`], for a file whose inode, size and mtime are known from its commit
    /// (no stat of the file again).
    pub(crate) fn record_finished(
        &self,
        path: &[u8],
        algorithm: &str,
        digest: &[u8],
        st: crate::backend::FinishedStat,
    ) {
        let rel = match RelPath::new(OsStr::from_bytes(path)) {
            Ok(r) => r,
            Err(e) => {
                warn!("write log: {}: {e}", show(path));
                return;
            }
        };
        let rec = ReceivedFile {
            path: rel,
            algorithm: algorithm.to_owned(),
            checksum: hex(digest),
            size: st.size,
            mtime: crate::journal::Mtime {
                secs: st.mtime.0,
                nanos: st.mtime.1,
            },
            inode: st.inode,
        };
        self.keep(rec);
    }

    /// Appends a record to the write log and keeps it in memory.
    fn keep(&self, rec: ReceivedFile) {
        if let Some(log) = &self.log {
            match log.lock().expect("poisoned").append_unsynced(&rec) {
                Ok(at) => {
                    // Only where it is: 16 bytes a file (the record itself, in memory, had
                    // cost some 280).
                    let mut logged = self.logged.lock().expect("poisoned");
                    if logged.len() >= MAX_RECORDS * 4 {
                        logged.clear();
                    }
                    logged.insert(rel_hash(&rec.path), at);
                    drop(logged);
                    // An older record in memory (from before a failed append) is stale.
                    self.records.lock().expect("poisoned").remove(&rec.path);
                    return;
                }
                Err(e) => warn!("{e}"),
            }
        }
        let mut records = self.records.lock().expect("poisoned");
        if records.len() >= MAX_RECORDS {
            records.clear();
        }
        records.insert(rec.path.clone(), rec);
    }

    /// Notes a file verified into block transaction `stage`; see [`Self::block_ended`].
    pub(crate) fn record_staged(&self, stage: &str, path: &[u8], algorithm: &str, digest: &[u8]) {
        self.staged
            .lock()
            .expect("poisoned")
            .entry(stage.to_owned())
            .or_default()
            .push((path.to_vec(), algorithm.to_owned(), digest.to_vec()));
    }

    /// Block transaction `stage` ended: when `committed`, its files are now in place and are
    /// recorded (and the log made durable); otherwise their notes are dropped.
    pub(crate) fn block_ended(&self, stage: &str, committed: bool) {
        let files = self.staged.lock().expect("poisoned").remove(stage);
        if let (Some(files), true) = (files, committed) {
            for (path, algorithm, digest) in files {
                self.record(&path, &algorithm, &digest);
            }
            self.sync_log();
        }
    }

    /// Makes the write log durable (end of a sync stream).
    pub(crate) fn sync_log(&self) {
        if let Some(log) = &self.log {
            if let Err(e) = log.lock().expect("poisoned").sync() {
                warn!("{e}");
            }
        }
    }

    /// The last record of `rel` this agent made and still knows: in memory, or at the
    /// offset in the write log it noted.
    fn known_record(&self, rel: &RelPath) -> Option<ReceivedFile> {
        if let Some(r) = self.records.lock().expect("poisoned").get(rel) {
            return Some(r.clone());
        }
        let log = self.log.as_ref()?;
        let at = *self.logged.lock().expect("poisoned").get(&rel_hash(rel))?;
        match log.lock().expect("poisoned").read_at(at) {
            // Another path of the same hash: not this one's record.
            Ok(r) if r.path == *rel => Some(r),
            Ok(_) => None,
            Err(e) => {
                warn!("{e}");
                None
            }
        }
    }

    /// Checks `files` (with the master's digests in `algorithm`); returns the inconsistent
    /// ones, sorted by path.
    pub(crate) fn check(&self, algorithm: &str, files: &[ExpectedFile]) -> Vec<InconsistentFile> {
        let mut out = Vec::new();
        let mut recs = Vec::with_capacity(files.len());
        let mut asked: Vec<(&ExpectedFile, RelPath, Option<ReceivedFile>)> =
            Vec::with_capacity(files.len());
        for f in files {
            let rel = path::check(&f.path)
                .map_err(|e| e.to_string())
                .and_then(|()| RelPath::new(OsStr::from_bytes(&f.path)).map_err(|e| e.to_string()));
            match rel {
                Ok(rel) => {
                    let rec = self.known_record(&rel);
                    asked.push((f, rel, rec));
                }
                Err(e) => out.push(InconsistentFile {
                    path: f.path.clone(),
                    check: "request".to_owned(),
                    message: e,
                }),
            }
        }
        // Records no longer known (found consistent before, or written by an earlier run of
        // the agent) come from the log, read once for all of them, keeping only theirs.
        let unknown: HashSet<&RelPath> = asked
            .iter()
            .filter(|a| a.2.is_none())
            .map(|a| &a.1)
            .collect();
        let mut from_log = match (unknown.is_empty(), self.log_path()) {
            (false, Some(p)) => {
                WriteLog::read_wanted(&p, |r| unknown.contains(r)).unwrap_or_else(|e| {
                    warn!("{e}");
                    HashMap::new()
                })
            }
            _ => HashMap::new(),
        };
        for (f, rel, rec) in asked {
            let bad = |check: &str, message: String| InconsistentFile {
                path: f.path.clone(),
                check: check.to_owned(),
                message,
            };
            match rec.or_else(|| from_log.remove(&rel)) {
                None => out.push(bad("write-log", Problem::NotInWriteLog.to_string())),
                Some(r)
                    if r.algorithm != algorithm
                        || r.size != f.size
                        || (!f.digest.is_empty() && r.checksum != hex(&f.digest)) =>
                {
                    out.push(bad(
                        "write-log",
                        format!(
                            "the agent's last write ({} bytes, {} {}) is not what the \
                             master sent ({} bytes, {algorithm} {})",
                            r.size,
                            r.algorithm,
                            r.checksum,
                            f.size,
                            hex(&f.digest)
                        ),
                    ))
                }
                Some(r) => recs.push(r),
            }
        }
        let mut found: Vec<Inconsistency> = Vec::new();
        if self.builtin {
            // The records are the log's last entries (read from it, or just appended to it
            // by this agent): the check compares the files with them, not again with the
            // whole log (which it would read whole, every file's entry, at every request).
            found.extend(RecordedStateCheck::new(None).check(&self.root, &recs));
        }
        for c in &self.checks {
            found.extend(c.check(&self.root, &recs));
        }
        {
            // A file found consistent needs its record no more (memory stays bounded).
            let bad: std::collections::HashSet<&Path> =
                found.iter().map(|i| i.path.as_path()).collect();
            let mut records = self.records.lock().expect("poisoned");
            let mut logged = self.logged.lock().expect("poisoned");
            for r in &recs {
                if !bad.contains(r.path.as_path()) {
                    if records.get(&r.path) == Some(r) {
                        records.remove(&r.path);
                    }
                    logged.remove(&rel_hash(&r.path));
                }
            }
        }
        out.extend(found.into_iter().map(|i| InconsistentFile {
            path: i.path.as_os_str().as_bytes().to_vec(),
            check: i.check,
            message: i.problem.to_string(),
        }));
        out.sort_by(|a, b| a.path.cmp(&b.path).then_with(|| a.check.cmp(&b.check)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consistency::checksum_file;
    use std::fs;

    fn crc32_of(p: &Path) -> Vec<u8> {
        let hex = checksum_file(&mut fs::File::open(p).unwrap(), "crc32").unwrap();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    fn expected(root: &Path, path: &str) -> ExpectedFile {
        let p = root.join(path);
        ExpectedFile {
            path: path.as_bytes().to_vec(),
            digest: crc32_of(&p),
            size: fs::metadata(&p).unwrap().len(),
        }
    }

    /// A tree with `a` and `b/c` "received" (recorded as the agent does after a commit).
    fn received(dir: &Path, log: Option<&Path>) -> (PathBuf, ConsistState) {
        let root = dir.join("tree");
        fs::create_dir_all(root.join("b")).unwrap();
        fs::write(root.join("a"), "alpha\n").unwrap();
        fs::write(root.join("b/c"), "gamma gamma\n").unwrap();
        let mut st = ConsistState::new(&root);
        st.set_log(log).unwrap();
        for p in ["a", "b/c"] {
            st.record(p.as_bytes(), "crc32", &crc32_of(&root.join(p)));
        }
        st.sync_log();
        (root, st)
    }

    #[test]
    fn untouched_files_are_consistent_then_served_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("state/writes");
        let (root, st) = received(dir.path(), Some(&log));
        let files = [expected(&root, "a"), expected(&root, "b/c")];
        assert_eq!(st.check("crc32", &files), []);
        // Found consistent: dropped from memory, still known from the log.
        assert!(st.records.lock().unwrap().is_empty());
        assert_eq!(st.check("crc32", &files), []);
        assert_eq!(WriteLog::read(&log).unwrap().len(), 2);
    }

    #[test]
    fn drift_and_a_write_the_master_did_not_send_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (root, st) = received(dir.path(), None);
        let mut files = vec![expected(&root, "a"), expected(&root, "b/c")];
        // The master's digest of `a` is not what the agent wrote.
        files[0].digest = vec![0, 0, 0, 1];
        // `b/c` grows behind the agent's back.
        fs::write(root.join("b/c"), "gamma gamma gamma\n").unwrap();
        // A file the agent never wrote.
        fs::write(root.join("d"), "delta\n").unwrap();
        files.push(expected(&root, "d"));
        let found = st.check("crc32", &files);
        let got: Vec<(&[u8], &str, &str)> = found
            .iter()
            .map(|f| (f.path.as_slice(), f.check.as_str(), f.message.as_str()))
            .collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0].0, b"a");
        assert_eq!(got[0].1, "write-log");
        assert!(
            got[0].2.contains("not what the master sent"),
            "{}",
            got[0].2
        );
        assert_eq!(
            (got[1].0, got[1].1, got[1].2),
            (&b"b/c"[..], "recorded-state", "size changed from 12 to 18")
        );
        assert_eq!(
            (got[2].0, got[2].1, got[2].2),
            (&b"d"[..], "write-log", "not in the agent's write log")
        );
        // An unsafe path is an inconsistency of the request, not a crash or a read.
        let evil = ExpectedFile {
            path: b"../etc/passwd".to_vec(),
            ..ExpectedFile::default()
        };
        let found = st.check("crc32", &[evil]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].check, "request");
    }

    struct Always(&'static str);
    impl ConsistencyCheck for Always {
        fn name(&self) -> &str {
            self.0
        }
        fn check(&self, _: &Path, files: &[ReceivedFile]) -> Vec<Inconsistency> {
            files
                .iter()
                .map(|f| Inconsistency {
                    path: f.path.as_path().to_owned(),
                    check: self.0.to_owned(),
                    problem: Problem::Other("nope".into()),
                })
                .collect()
        }
    }

    #[test]
    fn added_checks_run_after_the_built_in_one_and_can_replace_it() {
        let dir = tempfile::tempdir().unwrap();
        let (root, mut st) = received(dir.path(), None);
        fs::write(root.join("a"), "ALPHA\n").unwrap(); // same size, new content
        st.add_check(Box::new(Always("app")));
        let files = [expected(&dir.path().join("tree"), "b/c")];
        let found = st.check("crc32", &files);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].check.as_str(), found[0].message.as_str()),
            ("app", "nope")
        );
        // A reported file keeps its record: it is checked again next round.
        assert_eq!(st.records.lock().unwrap().len(), 2);

        let mut a = expected(&root, "a");
        a.digest = crc32_of(&root.join("a")); // whatever the master says, the file changed
        st.set_checks(vec![Box::new(Always("only"))]);
        let found = st.check("crc32", &[a]);
        let checks: Vec<&str> = found.iter().map(|f| f.check.as_str()).collect();
        assert_eq!(checks, ["write-log"], "{found:?}");
    }

    #[test]
    fn the_write_log_is_compacted_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("writes");
        let (root, st) = received(dir.path(), Some(&log));
        for _ in 0..3 {
            st.record(b"a", "crc32", &crc32_of(&root.join("a")));
        }
        st.sync_log();
        drop(st);
        let before = WriteLog::read(&log).unwrap();
        assert_eq!(fs::read_to_string(&log).unwrap().lines().count(), 5);
        let mut st = ConsistState::new(&root);
        st.set_log(Some(&log)).unwrap();
        assert_eq!(fs::read_to_string(&log).unwrap().lines().count(), 2);
        assert_eq!(WriteLog::read(&log).unwrap(), before);
    }

    #[test]
    fn a_write_log_inside_the_tree_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        fs::create_dir_all(&root).unwrap();
        let mut st = ConsistState::new(&root);
        let e = st.set_log(Some(&root.join("x/y/writes"))).unwrap_err();
        assert!(e.to_string().contains("outside the served tree"), "{e}");
        // Refused before anything was created in the tree.
        assert!(!root.join("x").exists());
        let e = st.set_log(Some(&root.join("../tree/writes"))).unwrap_err();
        assert!(e.to_string().contains("outside the served tree"), "{e}");
        st.set_log(Some(&dir.path().join("writes"))).unwrap();
    }
}
