//! Job history against real processes: a server killed mid-job leaves the job `interrupted`,
//! with what it had recorded; a live server's job stays `running`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetsync_server::jobs::{JobId, JobStatus, JobStore, RemoteCounts};

const CHILD_DB_ENV: &str = "FLEETSYNC_TEST_JOBS_DB";
const CHILD_READY_ENV: &str = "FLEETSYNC_TEST_JOBS_READY";

/// Kills the child on drop, so that a failing test does not leave it hanging.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Child mode: start a job, record one remote, print the job id, then hang until killed.
#[test]
fn child_mode() {
    let Some(db) = std::env::var_os(CHILD_DB_ENV) else {
        return;
    };
    let mut store = JobStore::open(&PathBuf::from(db)).unwrap();
    let job = store
        .start_job("master:1", &["r1:1", "r2:1"], "path:etc/**", "crc32")
        .unwrap();
    let counts = RemoteCounts {
        sent: 3,
        bytes: 300,
        rounds: 1,
        ..RemoteCounts::default()
    };
    store.record_remote(job, "r1:1", &counts, None).unwrap();
    // Tell the parent through a file (the test harness may capture stdout).
    let ready = PathBuf::from(std::env::var_os(CHILD_READY_ENV).unwrap());
    std::fs::write(ready.with_extension("tmp"), job.0.to_string()).unwrap();
    std::fs::rename(ready.with_extension("tmp"), &ready).unwrap();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

#[test]
fn a_server_killed_mid_job_leaves_it_interrupted_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("jobs.sqlite");
    let ready = dir.path().join("ready");
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_mode", "--test-threads=1"])
            .env(CHILD_DB_ENV, &db)
            .env(CHILD_READY_ENV, &ready)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            break JobId(text.trim().parse().unwrap());
        }
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "child exited before starting a job"
        );
        assert!(Instant::now() < deadline, "child did not start a job");
        std::thread::sleep(Duration::from_millis(10));
    };

    // While the owner lives, another opener (e.g. `fleetsync jobs`) sees it running.
    let store = JobStore::open(&db).unwrap();
    let detail = store.get(job).unwrap().unwrap();
    assert_eq!(detail.summary.status, JobStatus::Running);
    assert_eq!(detail.owner_pid, child.0.id());
    drop(store);

    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();

    let store = JobStore::open(&db).unwrap();
    let detail = store.get(job).unwrap().unwrap();
    assert_eq!(detail.summary.status, JobStatus::Interrupted);
    assert!(detail.summary.finished_ms.is_some());
    assert_eq!(detail.summary.remotes, ["r1:1", "r2:1"]);
    assert_eq!(detail.results[0].counts.sent, 3);
    assert!(detail.results[0].recorded_ms.is_some());
    assert!(detail.results[1].recorded_ms.is_none(), "r2 never reported");
    let listed = store.list(10).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].status, JobStatus::Interrupted);
}

#[test]
fn jobs_are_listed_newest_first_with_totals_and_serialize_to_json() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = JobStore::open(&dir.path().join("jobs.sqlite")).unwrap();
    let a = store.start_job("m", &["r1", "r2"], "all", "crc32").unwrap();
    let counts = RemoteCounts {
        sent: 2,
        deleted: 1,
        fixed: 4,
        bytes: 1000,
        wire_bytes: 300,
        rounds: 2,
    };
    store.record_remote(a, "r1", &counts, None).unwrap();
    store
        .record_remote(a, "r2", &counts, Some("connection reset"))
        .unwrap();
    store
        .finish_job(a, JobStatus::Failed, Some("1 remote failed"))
        .unwrap();
    let b = store.start_job("m", &["r1"], "ext:conf", "md5").unwrap();
    store.finish_job(b, JobStatus::Succeeded, None).unwrap();

    let list = store.list(10).unwrap();
    assert_eq!(list.iter().map(|j| j.id).collect::<Vec<_>>(), [b, a]);
    assert_eq!(list[1].totals.sent, 4);
    assert_eq!(list[1].totals.bytes, 2000);
    assert_eq!(list[1].totals.rounds, 2);
    assert_eq!(list[1].failed_remotes, 1);
    assert_eq!(store.list(1).unwrap().len(), 1);

    let detail = store.get(a).unwrap().unwrap();
    assert_eq!(detail.error.as_deref(), Some("1 remote failed"));
    assert_eq!(detail.results[1].error.as_deref(), Some("connection reset"));
    let json = serde_json::to_value(&detail).unwrap();
    assert_eq!(json["status"], "failed");
    assert_eq!(json["id"], a.0);
    assert_eq!(json["results"][1]["remote"], "r2");
    let back: fleetsync_server::jobs::JobDetail = serde_json::from_value(json).unwrap();
    assert_eq!(back, detail);

    assert!(store.get(JobId(999)).unwrap().is_none());
    assert!(store
        .finish_job(JobId(999), JobStatus::Failed, None)
        .is_err());
    let err = store
        .record_remote(a, "nope", &RemoteCounts::default(), None)
        .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}
