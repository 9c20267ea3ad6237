//! The staging transactions of dependency blocks (`--blocks`, see [`crate::blocks`]): which
//! are open, for which server connection, and the files received into each.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fleetsync_proto::Attrs;
use tracing::{info, warn};

use crate::backend::{owner_ids, Applied, FinishedTemp, TempFile};
use crate::journal::{BlockTxn, JournalError, RelPath};
use crate::AgentError;

/// The open staging transactions of an agent, by their server-chosen name.
#[derive(Default)]
pub(crate) struct Stages {
    open: Mutex<HashMap<String, Arc<Mutex<Staged>>>>,
    next_owner: AtomicU64,
}

/// One open staging transaction.
pub(crate) struct Staged {
    /// The server connection that opened it.
    owner: u64,
    /// `None` once committed or aborted.
    pub(crate) txn: Option<BlockTxn>,
    /// The files received (or being received) into it.
    pub(crate) files: HashMap<Vec<u8>, Arrival>,
}

/// How far a staged file has come.
pub(crate) enum Arrival {
    Receiving,
    Arrived { size: u64 },
}

impl Stages {
    /// A new owner id for a server connection.
    pub(crate) fn new_owner(&self) -> u64 {
        self.next_owner.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Transaction `stage`, if open.
    pub(crate) fn get(&self, stage: &str) -> Option<Arc<Mutex<Staged>>> {
        self.open.lock().expect("poisoned").get(stage).cloned()
    }

    /// Records `txn` as open under `stage`, for server connection `owner`.
    pub(crate) fn insert(&self, stage: &str, owner: u64, txn: BlockTxn) {
        let staged = Staged {
            owner,
            txn: Some(txn),
            files: HashMap::new(),
        };
        self.open
            .lock()
            .expect("poisoned")
            .insert(stage.to_owned(), Arc::new(Mutex::new(staged)));
    }

    /// Takes transaction `stage` out of the open ones (to commit or abort it).
    pub(crate) fn remove(&self, stage: &str) -> Option<Arc<Mutex<Staged>>> {
        self.open.lock().expect("poisoned").remove(stage)
    }

    /// Aborts the transactions a closed server connection left open.
    pub(crate) fn drop_owner(&self, owner: u64) {
        let gone: Vec<(String, Arc<Mutex<Staged>>)> = {
            let mut open = self.open.lock().expect("poisoned");
            let names: Vec<String> = open
                .iter()
                .filter(|(_, s)| s.lock().expect("poisoned").owner == owner)
                .map(|(n, _)| n.clone())
                .collect();
            names
                .into_iter()
                .filter_map(|n| open.remove(&n).map(|s| (n, s)))
                .collect()
        };
        for (name, staged) in gone {
            if let Some(txn) = staged.lock().expect("poisoned").txn.take() {
                info!(stage = %name, block = txn.block_name(), "server connection gone: block transaction aborted");
                if let Err(e) = txn.abort() {
                    warn!(stage = %name, "cannot remove the staging directory: {e}");
                }
            }
        }
    }

    /// Starts receiving `path` into transaction `stage`; the result goes where the receiver's
    /// temporary file would.
    pub(crate) fn stage_file(
        &self,
        stage: &str,
        path: &[u8],
        can_chown: bool,
    ) -> Result<Box<dyn TempFile>, AgentError> {
        let refuse = |why: String| AgentError::Verify {
            path: path.to_vec(),
            why,
        };
        let staged = self
            .get(stage)
            .ok_or_else(|| refuse(format!("no open block transaction {stage:?}")))?;
        let rel = rel(path).map_err(|e| refuse(e.to_string()))?;
        let file = {
            let mut st = staged.lock().expect("poisoned");
            if st.files.contains_key(path) {
                return Err(refuse("sent twice in one block".into()));
            }
            let txn = st
                .txn
                .as_mut()
                .ok_or_else(|| refuse("the block transaction is closed".into()))?;
            let file = txn.stage_file(&rel).map_err(|e| refuse(e.to_string()))?;
            st.files.insert(path.to_vec(), Arrival::Receiving);
            file
        };
        Ok(Box::new(StagedFile {
            file,
            staged,
            path: path.to_vec(),
            written: 0,
            can_chown,
        }))
    }
}

/// A file being received into a staging transaction (`fileStart.stage`).
struct StagedFile {
    file: File,
    staged: Arc<Mutex<Staged>>,
    path: Vec<u8>,
    written: u64,
    can_chown: bool,
}

impl Write for StagedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl StagedFile {
    /// Applies the sender's attributes (normally those of the commit's `put`: the journal
    /// then applies only what differs).
    fn apply_attrs(&self, attrs: &Attrs) -> Result<(), AgentError> {
        if let (Some((uid, gid)), true) = (attrs.owner, self.can_chown) {
            let (uid, gid) = owner_ids(uid, gid);
            rustix::fs::fchown(&self.file, uid, gid)
                .map_err(io_err("chown staged file for", &self.path))?;
        }
        if let Some(mode) = attrs.mode {
            rustix::fs::fchmod(&self.file, rustix::fs::Mode::from_raw_mode(mode & 0o7777))
                .map_err(io_err("chmod staged file for", &self.path))?;
        }
        if let Some((sec, nsec)) = attrs.mtime {
            let t = rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_OMIT,
                },
                last_modification: rustix::fs::Timespec {
                    tv_sec: sec,
                    tv_nsec: nsec.into(),
                },
            };
            rustix::fs::futimens(&self.file, &t)
                .map_err(io_err("set mtime of staged file for", &self.path))?;
        }
        Ok(())
    }
}

impl TempFile for StagedFile {
    /// The file arrived complete and verified: it is recorded as such; it is put in place
    /// (with the attributes of the commit's `put`) only when the whole block commits.
    fn commit(self: Box<Self>, attrs: &Attrs) -> Result<Applied, AgentError> {
        // The flush here, so that the journal's fsync at the block's commit finds little
        // to do.
        self.apply_attrs(attrs)?;
        self.file
            .sync_all()
            .map_err(io_err("fsync staged file for", &self.path))?;
        Box::new(StagedArrived::from(*self)).publish()?;
        Ok(Applied::default())
    }

    /// As [`TempFile::commit`], the flush left to the group's ([`Backend::make_durable`]).
    ///
    /// [`Backend::make_durable`]: crate::backend::Backend::make_durable
    fn finish(
        self: Box<Self>,
        attrs: &Attrs,
    ) -> Result<(Box<dyn FinishedTemp>, Applied), AgentError> {
        self.apply_attrs(attrs)?;
        // Closed now: a group of finished files holds no descriptor each.
        Ok((Box::new(StagedArrived::from(*self)), Applied::default()))
    }
}

/// A staged file complete with its attributes; marked arrived when published. Its bytes
/// need no flush of their own: the block's commit fsyncs every staged file before its
/// commit point.
struct StagedArrived {
    staged: Arc<Mutex<Staged>>,
    path: Vec<u8>,
    written: u64,
}

impl From<StagedFile> for StagedArrived {
    fn from(f: StagedFile) -> Self {
        StagedArrived {
            staged: f.staged,
            path: f.path,
            written: f.written,
        }
    }
}

impl FinishedTemp for StagedArrived {
    fn sync_data(&self) -> Result<(), AgentError> {
        Ok(())
    }

    fn publish(self: Box<Self>) -> Result<(), AgentError> {
        let mut st = self.staged.lock().expect("poisoned");
        st.files
            .insert(self.path, Arrival::Arrived { size: self.written });
        Ok(())
    }
}

fn io_err<'p, E: Into<std::io::Error>>(
    op: &'static str,
    path: &'p [u8],
) -> impl FnOnce(E) -> AgentError + 'p {
    move |e| AgentError::io(op, path, e)
}

/// `path` as a journal path.
pub(crate) fn rel(path: &[u8]) -> Result<RelPath, JournalError> {
    RelPath::new(OsStr::from_bytes(path))
}
