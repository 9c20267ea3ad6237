//! Job history: every sync job the server runs, in an embedded SQLite database.
//!
//! ```no_run
//! use fleetsync_server::jobs::{JobStatus, JobStore, RemoteCounts};
//! # fn main() -> Result<(), fleetsync_server::jobs::JobStoreError> {
//! let mut store = JobStore::open("/var/lib/fleetsync/jobs.sqlite".as_ref())?;
//! let job = store.start_job("master:7000", &["r1:7000", "r2:7000"], "ext:conf", "crc32")?;
//! let counts = RemoteCounts { sent: 12, bytes: 4096, rounds: 1, ..RemoteCounts::default() };
//! store.record_remote(job, "r1:7000", &counts, None)?;
//! store.record_remote(job, "r2:7000", &RemoteCounts::default(), Some("connection refused"))?;
//! store.finish_job(job, JobStatus::Failed, None)?;
//! for summary in store.list(20)? {
//!     println!("{}", serde_json::to_string(&summary).unwrap());
//! }
//! # Ok(()) }
//! ```
//!
//! # Crash behaviour
//!
//! Each job row records its owner: the server's pid and an identity string made of the kernel
//! boot id and the process start time (from `/proc/PID/stat`), so that a reused pid, or a pid
//! from before a reboot, is not mistaken for the owner. [`JobStore::open`] marks every job
//! still `running` whose owner is gone as `interrupted` (with the time it noticed): a crash of
//! the server mid-job leaves the job marked interrupted, not lost. Per-remote results recorded
//! before the crash are kept.
//!
//! # Storage
//!
//! WAL journal mode (readers such as `fleetsync jobs` do not block the server),
//! `synchronous = NORMAL` (a committed row survives a process crash; a power loss may drop the
//! last few), a 5 s busy timeout, and a schema versioned with `PRAGMA user_version`: each
//! migration in `MIGRATIONS` runs once, in a transaction. A database written by a newer
//! version is refused rather than misread.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

/// Schema migrations; `MIGRATIONS[i]` brings `user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: jobs and their per-remote results.
    "CREATE TABLE jobs (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        started_ms     INTEGER NOT NULL,
        finished_ms    INTEGER,
        master         TEXT NOT NULL,
        classification TEXT NOT NULL,
        algorithm      TEXT NOT NULL,
        status         TEXT NOT NULL,
        error          TEXT,
        owner_pid      INTEGER NOT NULL,
        owner_identity TEXT NOT NULL
    );
    CREATE INDEX jobs_running ON jobs(status) WHERE status = 'running';
    CREATE TABLE job_remotes (
        job_id      INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        position    INTEGER NOT NULL,
        remote      TEXT NOT NULL,
        sent        INTEGER NOT NULL DEFAULT 0,
        deleted     INTEGER NOT NULL DEFAULT 0,
        fixed       INTEGER NOT NULL DEFAULT 0,
        bytes       INTEGER NOT NULL DEFAULT 0,
        rounds      INTEGER NOT NULL DEFAULT 0,
        error       TEXT,
        recorded_ms INTEGER,
        PRIMARY KEY (job_id, remote)
    );",
    // 2: bytes of file data on the wire (after compression and deltas).
    "ALTER TABLE job_remotes ADD COLUMN wire_bytes INTEGER NOT NULL DEFAULT 0;",
    // 3: who sent the remote its files (a relay of a fan-out tree; NULL: the master).
    "ALTER TABLE job_remotes ADD COLUMN source TEXT;",
];

/// Errors of the job store, naming the database and what was being done.
#[derive(Debug)]
#[non_exhaustive]
pub enum JobStoreError {
    /// The database could not be opened or set up.
    Open {
        /// The database file.
        path: PathBuf,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// The database was written by a newer fleetsync.
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// Its `user_version`.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// A query failed.
    Sql {
        /// What was being done.
        action: &'static str,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// No job has this id.
    UnknownJob(JobId),
    /// The job has no such remote.
    UnknownRemote {
        /// The job.
        job: JobId,
        /// The remote named.
        remote: String,
    },
}

impl fmt::Display for JobStoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open { path, source } => {
                write!(f, "cannot open job database {}: {source}", path.display())
            }
            Self::NewerSchema {
                path,
                found,
                supported,
            } => write!(
                f,
                "job database {} has schema version {found}, this build knows up to {supported}",
                path.display()
            ),
            Self::Sql { action, source } => write!(f, "job database: {action}: {source}"),
            Self::UnknownJob(id) => write!(f, "no job {id}"),
            Self::UnknownRemote { job, remote } => write!(f, "job {job} has no remote {remote}"),
        }
    }
}

impl std::error::Error for JobStoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Open { source, .. } | Self::Sql { source, .. } => Some(source),
            _ => None,
        }
    }
}

type Result<T, E = JobStoreError> = std::result::Result<T, E>;

fn sql(action: &'static str) -> impl FnOnce(rusqlite::Error) -> JobStoreError {
    move |source| JobStoreError::Sql { action, source }
}

/// A job's id (the database row id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub i64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The state of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Started and not finished; its owner process is alive.
    Running,
    /// Every remote is in sync.
    Succeeded,
    /// At least one remote failed.
    Failed,
    /// The owning server process went away before finishing it.
    Interrupted,
}

impl JobStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Interrupted => "interrupted",
        }
    }

    fn parse(s: &str) -> Result<Self, rusqlite::Error> {
        Ok(match s {
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "interrupted" => Self::Interrupted,
            other => {
                return Err(rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Text,
                    format!("unknown job status {other:?}").into(),
                ))
            }
        })
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a job did on one remote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteCounts {
    /// Files sent.
    pub sent: u64,
    /// Files deleted.
    pub deleted: u64,
    /// Attribute / link fixes.
    pub fixed: u64,
    /// Bytes transferred.
    pub bytes: u64,
    /// Bytes of file data on the wire (after compression and deltas).
    #[serde(default)]
    pub wire_bytes: u64,
    /// Consistency rounds run.
    pub rounds: u32,
}

impl RemoteCounts {
    /// The counts of a remote's result (so far, while it runs).
    pub fn of(r: &fleetsync_proto::RemoteResult) -> RemoteCounts {
        RemoteCounts {
            sent: r.transferred,
            deleted: r.deleted,
            fixed: r.changed,
            bytes: r.bytes,
            wire_bytes: r.wire_bytes,
            rounds: r.rounds,
        }
    }

    fn add(&mut self, o: &RemoteCounts) {
        self.sent += o.sent;
        self.deleted += o.deleted;
        self.fixed += o.fixed;
        self.bytes += o.bytes;
        self.wire_bytes += o.wire_bytes;
        self.rounds = self.rounds.max(o.rounds);
    }
}

/// One line of `fleetsync jobs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    /// The job.
    pub id: JobId,
    /// Start, milliseconds since the Unix epoch.
    pub started_ms: i64,
    /// End (finish or detected interruption), milliseconds since the Unix epoch.
    pub finished_ms: Option<i64>,
    /// The master agent.
    pub master: String,
    /// The remote agents, in the order given.
    pub remotes: Vec<String>,
    /// The classification expression.
    pub classification: String,
    /// The checksum algorithm.
    pub algorithm: String,
    /// Its state.
    pub status: JobStatus,
    /// Counts summed over remotes (`rounds` is the maximum).
    pub totals: RemoteCounts,
    /// How many remotes reported an error.
    pub failed_remotes: usize,
}

/// One remote's record in a [`JobDetail`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRecord {
    /// The remote agent.
    pub remote: String,
    /// What was done there.
    pub counts: RemoteCounts,
    /// Its error, if it failed.
    pub error: Option<String>,
    /// When its result was recorded (`None`: never, e.g. interrupted before it finished).
    pub recorded_ms: Option<i64>,
    /// The relay that sent it its files (`--fanout`); `None`: the master.
    #[serde(default)]
    pub source: Option<String>,
}

/// Everything recorded about one job: `fleetsync jobs show ID`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDetail {
    /// The summary line.
    #[serde(flatten)]
    pub summary: JobSummary,
    /// Job-level error (e.g. the master could not be reached).
    pub error: Option<String>,
    /// The server process that ran it.
    pub owner_pid: u32,
    /// Per-remote results, in remote order (`summary.remotes` lists just the names).
    pub results: Vec<RemoteRecord>,
}

/// The job database. One per server; readers may open it concurrently.
#[derive(Debug)]
pub struct JobStore {
    conn: Connection,
    owner_pid: u32,
    owner_identity: String,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The kernel boot id: changes at every boot.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Start time of a process in clock ticks since boot (field 22 of `/proc/PID/stat`).
fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts with field 3 (state); start time is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Identity of a live process: boot id + start time, or `None` if it does not exist.
fn process_identity(pid: u32) -> Option<String> {
    process_start_ticks(pid).map(|t| format!("{}:{t}", boot_id()))
}

impl JobStore {
    /// Opens (creating if needed) the database at `path`, migrates its schema, and marks jobs
    /// left `running` by a server process that is gone as `interrupted`.
    pub fn open(path: &Path) -> Result<Self> {
        // Several processes opening a new database at once (servers started together, or a
        // server and `fleetsync jobs`): switching it to WAL and the first migration can get
        // SQLITE_BUSY without SQLite's busy handler being called, so the whole setup is
        // retried for a while before giving up.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match Self::open_once(path) {
                Err(JobStoreError::Open { source, .. })
                    if is_busy(&source) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => return r,
            }
        }
    }

    fn open_once(path: &Path) -> Result<Self> {
        let open_err = |source| JobStoreError::Open {
            path: path.to_owned(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        // In-memory databases cannot use WAL; anything else must.
        debug_assert!(mode.eq_ignore_ascii_case("wal") || mode.eq_ignore_ascii_case("memory"));
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
            .map_err(open_err)?;
        migrate(&mut conn, path)?;
        let owner_pid = std::process::id();
        let owner_identity = process_identity(owner_pid).unwrap_or_default();
        let store = Self {
            conn,
            owner_pid,
            owner_identity,
        };
        store.mark_interrupted()?;
        Ok(store)
    }

    /// Marks `running` jobs whose owner process is gone (or is another process with the same
    /// pid) as `interrupted`. Returns the jobs marked. Called by [`open`](Self::open).
    pub fn mark_interrupted(&self) -> Result<Vec<JobId>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, owner_pid, owner_identity FROM jobs WHERE status = 'running'")
            .map_err(sql("list running jobs"))?;
        let running = stmt
            .query_map([], |r| {
                Ok((
                    JobId(r.get(0)?),
                    r.get::<_, u32>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(sql("list running jobs"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("list running jobs"))?;
        let mut marked = Vec::new();
        for (id, pid, identity) in running {
            let alive = process_identity(pid).is_some_and(|now| now == identity);
            if !alive {
                self.conn
                    .execute(
                        "UPDATE jobs SET status = 'interrupted', finished_ms = ?2
                         WHERE id = ?1 AND status = 'running'",
                        params![id.0, now_ms()],
                    )
                    .map_err(sql("mark job interrupted"))?;
                marked.push(id);
            }
        }
        Ok(marked)
    }

    /// Records the start of a job owned by this process and returns its id.
    pub fn start_job(
        &mut self,
        master: &str,
        remotes: &[&str],
        classification: &str,
        algorithm: &str,
    ) -> Result<JobId> {
        let tx = self.conn.transaction().map_err(sql("begin"))?;
        tx.execute(
            "INSERT INTO jobs (started_ms, master, classification, algorithm, status,
                               owner_pid, owner_identity)
             VALUES (?1, ?2, ?3, ?4, 'running', ?5, ?6)",
            params![
                now_ms(),
                master,
                classification,
                algorithm,
                self.owner_pid,
                self.owner_identity
            ],
        )
        .map_err(sql("insert job"))?;
        let id = JobId(tx.last_insert_rowid());
        for (position, remote) in remotes.iter().enumerate() {
            tx.execute(
                "INSERT OR IGNORE INTO job_remotes (job_id, position, remote) VALUES (?1, ?2, ?3)",
                params![id.0, position as i64, remote],
            )
            .map_err(sql("insert job remote"))?;
        }
        tx.commit().map_err(sql("commit job start"))?;
        Ok(id)
    }

    /// Records the relay that sent `remote` its files in `job` (`--fanout`).
    pub fn record_source(&mut self, job: JobId, remote: &str, source: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE job_remotes SET source = ?3 WHERE job_id = ?1 AND remote = ?2",
                params![job.0, remote, source],
            )
            .map_err(sql("record remote source"))?;
        Ok(())
    }

    /// Records (or replaces) the result of one remote of a job.
    pub fn record_remote(
        &mut self,
        job: JobId,
        remote: &str,
        counts: &RemoteCounts,
        error: Option<&str>,
    ) -> Result<()> {
        let n = self
            .conn
            .execute(
                "UPDATE job_remotes SET sent = ?3, deleted = ?4, fixed = ?5, bytes = ?6,
                        rounds = ?7, error = ?8, recorded_ms = ?9, wire_bytes = ?10
                 WHERE job_id = ?1 AND remote = ?2",
                params![
                    job.0,
                    remote,
                    counts.sent as i64,
                    counts.deleted as i64,
                    counts.fixed as i64,
                    counts.bytes as i64,
                    counts.rounds,
                    error,
                    now_ms(),
                    counts.wire_bytes as i64
                ],
            )
            .map_err(sql("record remote result"))?;
        if n == 0 {
            self.job_exists(job)?;
            return Err(JobStoreError::UnknownRemote {
                job,
                remote: remote.to_owned(),
            });
        }
        Ok(())
    }

    /// Records the end of a job with its final status and an optional job-level error.
    pub fn finish_job(&mut self, job: JobId, status: JobStatus, error: Option<&str>) -> Result<()> {
        let n = self
            .conn
            .execute(
                "UPDATE jobs SET status = ?2, finished_ms = ?3, error = coalesce(?4, error)
                 WHERE id = ?1",
                params![job.0, status.as_str(), now_ms(), error],
            )
            .map_err(sql("finish job"))?;
        if n == 0 {
            return Err(JobStoreError::UnknownJob(job));
        }
        Ok(())
    }

    fn job_exists(&self, job: JobId) -> Result<()> {
        self.conn
            .query_row("SELECT 1 FROM jobs WHERE id = ?1", [job.0], |_| Ok(()))
            .optional()
            .map_err(sql("look up job"))?
            .ok_or(JobStoreError::UnknownJob(job))
    }

    /// The most recent `limit` jobs, newest first.
    pub fn list(&self, limit: usize) -> Result<Vec<JobSummary>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, started_ms, finished_ms, master, classification, algorithm, status
                 FROM jobs ORDER BY id DESC LIMIT ?1",
            )
            .map_err(sql("list jobs"))?;
        let mut jobs: Vec<JobSummary> = stmt
            .query_map([limit as i64], summary_from_row)
            .map_err(sql("list jobs"))?
            .collect::<Result<_, _>>()
            .map_err(sql("list jobs"))?;
        let Some(oldest) = jobs.last().map(|j| j.id) else {
            return Ok(jobs);
        };
        let remotes = self.remotes_since(oldest)?;
        for job in &mut jobs {
            if let Some(records) = remotes.get(&job.id) {
                fill_summary(job, records);
            }
        }
        Ok(jobs)
    }

    /// Everything recorded about job `id`, or `None` if there is no such job.
    pub fn get(&self, id: JobId) -> Result<Option<JobDetail>> {
        let row = self
            .conn
            .query_row(
                "SELECT id, started_ms, finished_ms, master, classification, algorithm, status,
                        error, owner_pid
                 FROM jobs WHERE id = ?1",
                [id.0],
                |r| Ok((summary_from_row(r)?, r.get(7)?, r.get(8)?)),
            )
            .optional()
            .map_err(sql("get job"))?;
        let Some((mut summary, error, owner_pid)) = row else {
            return Ok(None);
        };
        let mut remotes = self.remotes_since(id)?;
        let records = remotes.remove(&id).unwrap_or_default();
        fill_summary(&mut summary, &records);
        Ok(Some(JobDetail {
            summary,
            error,
            owner_pid,
            results: records,
        }))
    }

    /// Per-remote records of every job with id >= `first`, by job, in remote order.
    fn remotes_since(&self, first: JobId) -> Result<BTreeMap<JobId, Vec<RemoteRecord>>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT job_id, remote, sent, deleted, fixed, bytes, rounds, error, recorded_ms,
                        wire_bytes, source
                 FROM job_remotes WHERE job_id >= ?1 ORDER BY job_id, position",
            )
            .map_err(sql("list job remotes"))?;
        let rows = stmt
            .query_map([first.0], |r| {
                Ok((
                    JobId(r.get(0)?),
                    RemoteRecord {
                        remote: r.get(1)?,
                        counts: RemoteCounts {
                            sent: r.get::<_, i64>(2)? as u64,
                            deleted: r.get::<_, i64>(3)? as u64,
                            fixed: r.get::<_, i64>(4)? as u64,
                            bytes: r.get::<_, i64>(5)? as u64,
                            wire_bytes: r.get::<_, i64>(9)? as u64,
                            rounds: r.get(6)?,
                        },
                        error: r.get(7)?,
                        recorded_ms: r.get(8)?,
                        source: r.get(10)?,
                    },
                ))
            })
            .map_err(sql("list job remotes"))?;
        let mut map: BTreeMap<JobId, Vec<RemoteRecord>> = BTreeMap::new();
        for row in rows {
            let (id, rec) = row.map_err(sql("list job remotes"))?;
            map.entry(id).or_default().push(rec);
        }
        Ok(map)
    }
}

fn summary_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobSummary> {
    Ok(JobSummary {
        id: JobId(r.get(0)?),
        started_ms: r.get(1)?,
        finished_ms: r.get(2)?,
        master: r.get(3)?,
        classification: r.get(4)?,
        algorithm: r.get(5)?,
        status: JobStatus::parse(&r.get::<_, String>(6)?)?,
        remotes: Vec::new(),
        totals: RemoteCounts::default(),
        failed_remotes: 0,
    })
}

fn fill_summary(job: &mut JobSummary, records: &[RemoteRecord]) {
    for rec in records {
        job.remotes.push(rec.remote.clone());
        job.totals.add(&rec.counts);
        job.failed_remotes += usize::from(rec.error.is_some());
    }
}

/// SQLITE_BUSY or SQLITE_LOCKED: another connection holds a lock.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let open_err = |source| JobStoreError::Open {
        path: path.to_owned(),
        source,
    };
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(open_err)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(open_err)?;
    let supported = MIGRATIONS.len() as i64;
    if version > supported {
        return Err(JobStoreError::NewerSchema {
            path: path.to_owned(),
            found: version,
            supported,
        });
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(migration).map_err(open_err)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(open_err)?;
    }
    tx.commit().map_err(open_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_opening_a_new_database_at_once_all_succeed() {
        // Regression: two servers started together on a fresh jobs database; one failed
        // with "database is locked" (no busy handler while switching to WAL).
        for round in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("jobs.sqlite");
            let threads: Vec<_> = (0..6)
                .map(|_| {
                    let db = db.clone();
                    std::thread::spawn(move || JobStore::open(&db).map(drop))
                })
                .collect();
            for t in threads {
                if let Err(e) = t.join().unwrap() {
                    panic!("round {round}: {e}");
                }
            }
        }
    }

    #[test]
    fn a_reused_pid_is_not_mistaken_for_the_owner() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("jobs.sqlite");
        let mut store = JobStore::open(&db).unwrap();
        let job = store.start_job("m", &["r"], "all", "crc32").unwrap();
        // Our own pid, but a different start time: another process with the same pid.
        store
            .conn
            .execute(
                "UPDATE jobs SET owner_identity = ?1 WHERE id = ?2",
                params![format!("{}:1", boot_id()), job.0],
            )
            .unwrap();
        assert_eq!(store.mark_interrupted().unwrap(), vec![job]);
        assert_eq!(
            store.get(job).unwrap().unwrap().summary.status,
            JobStatus::Interrupted
        );
    }

    #[test]
    fn a_job_of_this_live_process_stays_running() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("jobs.sqlite");
        let mut store = JobStore::open(&db).unwrap();
        let job = store.start_job("m", &["r"], "all", "crc32").unwrap();
        drop(store);
        let store = JobStore::open(&db).unwrap();
        assert_eq!(
            store.get(job).unwrap().unwrap().summary.status,
            JobStatus::Running
        );
    }

    #[test]
    fn process_start_time_parses_odd_command_names() {
        assert!(process_start_ticks(std::process::id()).is_some());
        assert!(process_identity(u32::MAX).is_none());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("jobs.sqlite");
        drop(JobStore::open(&db).unwrap());
        Connection::open(&db)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = JobStore::open(&db).unwrap_err();
        assert!(
            matches!(err, JobStoreError::NewerSchema { found: 99, .. }),
            "{err}"
        );
    }
}
