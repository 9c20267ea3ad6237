//! The agent's side of the consistency loop (see [`crate::consistency`]): it records every
//! file it commits from a sync stream, and answers the server's `consistencyRequest` with the
//! files its checks find inconsistent.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fleetsync_proto::{ExpectedFile, InconsistentFile, Msg};
use tracing::{debug, warn};

use crate::consistency::{
    record_applied, ConsistencyCheck, Inconsistency, Problem, ReceivedFile, RecordedStateCheck,
    WriteLog,
};
use crate::error::show;
use crate::journal::RelPath;
use crate::server::{send, send_flush, Shared, SharedWriter};
use crate::{path, AgentError};

/// Inconsistent files per `consistencyReply` frame.
const PER_REPLY: usize = 4096;

/// What the agent wrote, and how it checks it.
pub(crate) struct ConsistState {
    root: PathBuf,
    /// The persistent write log (`None`: records are kept in memory only).
    log: Option<Mutex<WriteLog>>,
    /// The last record of each file committed and not yet found consistent.
    records: Mutex<HashMap<RelPath, ReceivedFile>>,
    /// Run [`RecordedStateCheck`] (on the write log) before `checks`.
    builtin: bool,
    /// Further checks (a deployment's own).
    checks: Vec<Box<dyn ConsistencyCheck>>,
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
            builtin: true,
            checks: Vec::new(),
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
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| bad(format!("creating its directory: {e}")))?;
        }
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let dir = std::fs::canonicalize(dir).map_err(|e| bad(e.to_string()))?;
        let root = std::fs::canonicalize(&self.root).map_err(|e| bad(e.to_string()))?;
        if dir.starts_with(&root) {
            return Err(bad(format!(
                "must be outside the served tree {}",
                root.display()
            )));
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
        if let Some(log) = &self.log {
            if let Err(e) = log.lock().expect("poisoned").append_unsynced(&rec) {
                warn!("{e}");
            }
        }
        self.records.lock().expect("poisoned").insert(rel, rec);
    }

    /// Makes the write log durable (end of a sync stream).
    pub(crate) fn sync_log(&self) {
        if let Some(log) = &self.log {
            if let Err(e) = log.lock().expect("poisoned").sync() {
                warn!("{e}");
            }
        }
    }

    /// Checks `files` (with the master's digests in `algorithm`); returns the inconsistent
    /// ones, sorted by path.
    pub(crate) fn check(&self, algorithm: &str, files: &[ExpectedFile]) -> Vec<InconsistentFile> {
        let mut out = Vec::new();
        let mut recs = Vec::with_capacity(files.len());
        {
            let records = self.records.lock().expect("poisoned");
            for f in files {
                let bad = |check: &str, message: String| InconsistentFile {
                    path: f.path.clone(),
                    check: check.to_owned(),
                    message,
                };
                let rel = path::check(&f.path)
                    .map_err(|e| e.to_string())
                    .and_then(|()| {
                        RelPath::new(OsStr::from_bytes(&f.path)).map_err(|e| e.to_string())
                    });
                let rel = match rel {
                    Ok(r) => r,
                    Err(e) => {
                        out.push(bad("request", e));
                        continue;
                    }
                };
                match records.get(&rel) {
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
                    Some(r) => recs.push(r.clone()),
                }
            }
        }
        let mut found: Vec<Inconsistency> = Vec::new();
        if self.builtin {
            found.extend(RecordedStateCheck::new(self.log_path()).check(&self.root, &recs));
        }
        for c in &self.checks {
            found.extend(c.check(&self.root, &recs));
        }
        {
            // A file found consistent needs its record no more (memory stays bounded).
            let bad: std::collections::HashSet<&Path> =
                found.iter().map(|i| i.path.as_path()).collect();
            let mut records = self.records.lock().expect("poisoned");
            for r in &recs {
                if !bad.contains(r.path.as_path()) && records.get(&r.path) == Some(r) {
                    records.remove(&r.path);
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

/// Answers a `consistencyRequest`.
pub(crate) fn serve(
    w: &SharedWriter,
    shared: &Shared,
    request_id: u64,
    algorithm: &str,
    files: &[ExpectedFile],
) -> Result<(), AgentError> {
    if let Err(e) = shared.registry.info(algorithm) {
        return send_flush(
            w,
            &Msg::Error {
                request_id,
                message: e.to_string(),
            },
        );
    }
    let found = shared.consist.check(algorithm, files);
    debug!(
        request_id,
        files = files.len(),
        inconsistent = found.len(),
        "consistency check"
    );
    let mut chunks = found.chunks(PER_REPLY).peekable();
    if chunks.peek().is_none() {
        return send_flush(
            w,
            &Msg::ConsistencyReply {
                request_id,
                inconsistent: Vec::new(),
                checked: files.len() as u64,
                last: true,
            },
        );
    }
    let mut first = true;
    while let Some(chunk) = chunks.next() {
        let msg = Msg::ConsistencyReply {
            request_id,
            inconsistent: chunk.to_vec(),
            checked: if first { files.len() as u64 } else { 0 },
            last: chunks.peek().is_none(),
        };
        first = false;
        send(w, &msg)?;
    }
    crate::server::flush(w)
}
