//! Job history (issue 5): every sync is recorded by the server, `fleetsync jobs` lists it and
//! `fleetsync jobs show ID` details it, and a server killed mid-job leaves the job
//! `interrupted`, not lost.

mod support;

use std::fs;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{fleetsync, rsync_diff, scratch_home, Proc, Token};

/// `fleetsync jobs --db DB ARGS... --json`, parsed.
fn jobs_json(db: &Path, args: &[&str]) -> Value {
    let out = jobs(db, args, true);
    assert!(out.status.success(), "fleetsync jobs failed: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn jobs(db: &Path, args: &[&str], json: bool) -> Output {
    let mut cmd = fleetsync(scratch_home());
    cmd.arg("jobs").args(args).arg("--db").arg(db);
    if json {
        cmd.arg("--json");
    }
    cmd.output().unwrap()
}

/// A master with `n` small files (sizes 100, 200, ...) and total bytes.
fn small_master(dir: &Path, n: usize) -> u64 {
    fs::create_dir_all(dir).unwrap();
    let mut total = 0;
    for i in 1..=n {
        let data = vec![b'a' + i as u8; 100 * i];
        total += data.len() as u64;
        fs::write(dir.join(format!("f{i}.txt")), data).unwrap();
    }
    total
}

#[test]
fn a_completed_sync_is_listed_with_its_counts_and_detailed_per_remote() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("state/jobs.sqlite");
    let (master, r1, r2) = (
        tmp.path().join("m"),
        tmp.path().join("r1"),
        tmp.path().join("r2"),
    );
    let bytes = small_master(&master, 5);
    fs::create_dir_all(&r1).unwrap();
    fs::create_dir_all(&r2).unwrap();
    fs::write(r2.join("stale.txt"), b"delete me").unwrap();
    let token = Token::new();
    let (_m, maddr) = token.agent(&master);
    let (_a1, addr1) = token.agent(&r1);
    let (_a2, addr2) = token.agent(&r2);
    let (_s, saddr) = token.server_recording(&db);
    let out = token.sync(&saddr, &maddr, &[&addr1, &addr2]);
    assert!(out.status.success());
    assert_eq!(rsync_diff(&master, &r1), "");
    assert_eq!(rsync_diff(&master, &r2), "");

    let list = jobs_json(&db, &[]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let job = &list[0];
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["master"], maddr.as_str());
    assert_eq!(job["remotes"], serde_json::json!([addr1, addr2]));
    assert_eq!(job["totals"]["sent"], 10);
    assert_eq!(job["totals"]["deleted"], 1);
    assert_eq!(job["totals"]["bytes"], 2 * bytes);
    assert_eq!(job["failed_remotes"], 0);
    assert!(job["finished_ms"].as_i64().unwrap() >= job["started_ms"].as_i64().unwrap());

    let id = job["id"].as_i64().unwrap().to_string();
    let detail = jobs_json(&db, &["show", &id]);
    let results = detail["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (r, addr, deleted) in [(&results[0], &addr1, 0), (&results[1], &addr2, 1)] {
        assert_eq!(r["remote"], addr.as_str());
        assert_eq!(r["counts"]["sent"], 5);
        assert_eq!(r["counts"]["deleted"], deleted);
        assert_eq!(r["counts"]["bytes"], bytes);
        assert_eq!(r["counts"]["rounds"], 1);
        assert!(r["error"].is_null(), "{r:?}");
    }

    // The human forms name the same things.
    let table = String::from_utf8(jobs(&db, &[], false).stdout).unwrap();
    assert!(
        table.contains("succeeded") && table.contains(&maddr),
        "{table}"
    );
    let show = String::from_utf8(jobs(&db, &["show", &id], false).stdout).unwrap();
    assert!(
        show.contains(&addr2) && show.contains("sent 5, deleted 1"),
        "{show}"
    );
    assert_eq!(jobs(&db, &["show", "999"], false).status.code(), Some(1));
}

#[test]
fn a_failed_remote_is_recorded_with_its_error() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("jobs.sqlite");
    let master = tmp.path().join("m");
    small_master(&master, 2);
    let token = Token::new();
    let (_m, maddr) = token.agent(&master);
    let (_s, saddr) = token.server_recording(&db);
    // Nothing listens there.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let out = token.sync(&saddr, &maddr, &[&dead]);
    assert_eq!(out.status.code(), Some(1));
    let list = jobs_json(&db, &[]);
    assert_eq!(list[0]["status"], "failed");
    assert_eq!(list[0]["failed_remotes"], 1);
    let detail = jobs_json(&db, &["show", &list[0]["id"].to_string()]);
    let err = detail["results"][0]["error"].as_str().unwrap();
    assert!(!err.is_empty());
}

#[test]
fn the_embedded_sync_records_too() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("xdg/fleetsync/jobs.sqlite");
    let (master, remote) = (tmp.path().join("m"), tmp.path().join("r"));
    small_master(&master, 5);
    fs::create_dir_all(&remote).unwrap();
    let out = fleetsync(scratch_home())
        .arg("sync")
        .arg(&master)
        .arg(&remote)
        .env_remove("FLEETSYNC_JOBS_DB")
        .env("XDG_STATE_HOME", tmp.path().join("xdg"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let list = jobs_json(&db, &[]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["status"], "succeeded");
    assert_eq!(list[0]["totals"]["sent"], 5);
    // Recorded under the directories, not the in-process agents' addresses.
    assert_eq!(list[0]["master"], master.display().to_string());
    assert_eq!(
        list[0]["remotes"],
        serde_json::json!([remote.display().to_string()])
    );
}

#[test]
fn a_server_killed_mid_job_leaves_the_job_interrupted_with_what_had_landed() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("jobs.sqlite");
    let (master, remote) = (tmp.path().join("m"), tmp.path().join("r"));
    fs::create_dir_all(&remote).unwrap();
    // Small files first (sends go in path order), then one that takes seconds at the limit.
    small_master(&master, 30);
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let big: Vec<u8> = chunk.iter().cycle().take(48 << 20).copied().collect();
    fs::write(master.join("zz-big.bin"), &big).unwrap();
    drop(big);
    let token = Token::new();
    let (_m, maddr) = token.agent(&master);
    let (_r, raddr) = token.agent(&remote);
    let (mut srv, saddr) = token.server_recording(&db);
    let mut sync = Proc(
        token
            .sync_command(&saddr, &maddr, &[&raddr])
            .args(["--bwlimit", "6M"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Wait until the history shows the 30 small files (all landed) while the big one goes.
    let deadline = Instant::now() + Duration::from_secs(120);
    let landed = |d: &Path| {
        fs::read_dir(d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".txt")
            })
            .count()
    };
    loop {
        let list = jobs_json(&db, &[]);
        if list[0]["totals"]["sent"] == 30 {
            break;
        }
        assert!(sync.alive(), "the sync ended before the transfer was seen");
        assert!(Instant::now() < deadline, "no progress recorded: {list:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    srv.kill_now();
    sync.kill_now();
    assert_eq!(landed(&remote), 30);
    assert!(
        !remote.join("zz-big.bin").exists(),
        "the big file cannot have landed"
    );

    let list = jobs_json(&db, &[]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list:?}");
    assert_eq!(list[0]["status"], "interrupted");
    assert!(list[0]["finished_ms"].is_i64(), "{list:?}");
    assert_eq!(list[0]["totals"]["sent"], 30, "{list:?}");
}

#[test]
fn the_server_log_names_a_job_by_its_history_id() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("jobs.sqlite");
    let (master, remote) = (tmp.path().join("m"), tmp.path().join("r"));
    small_master(&master, 2);
    fs::create_dir_all(&remote).unwrap();
    let token = Token::new();
    let (_m, maddr) = token.agent(&master);
    let (_r, raddr) = token.agent(&remote);
    // Two servers in turn on one history: the second one's first job is the history's second.
    for want in ["1", "2"] {
        let mut cmd = fleetsync(scratch_home());
        cmd.args(["server", "--listen", "127.0.0.1:0", "--token-file"])
            .arg(&token.file)
            .arg("--jobs-db")
            .arg(&db)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped());
        let (mut srv, saddr) = support::listening(&mut cmd);
        let out = token.sync(&saddr, &maddr, &[&raddr]);
        assert!(out.status.success());
        srv.kill_now();
        let mut log = String::new();
        use std::io::Read;
        srv.0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut log)
            .unwrap();
        let list = jobs_json(&db, &[]);
        let ids: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].to_string())
            .collect();
        assert!(ids.contains(&want.to_owned()), "{list:?}");
        assert!(
            log.contains(&format!("job={want}")),
            "log lacks job={want}:\n{log}"
        );
        assert!(
            !log.contains(&format!("job={}", if want == "1" { "2" } else { "1" })),
            "{log}"
        );
    }
}
