//! `--metrics-listen` (issue 13, "Metrics and health"): agents and server serve Prometheus
//! text on /metrics and `ok` on /healthz; a sync is scraped while it runs and after.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{fleetsync, scratch_home, Proc, Token};

/// Starts `cmd` with `--metrics-listen 127.0.0.1:0`; returns it, its address and the
/// metrics address (the first two stdout lines).
fn spawn_with_metrics(cmd: &mut std::process::Command) -> (Proc, String, String) {
    let mut child = cmd
        .args(["--metrics-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = lines.next().unwrap().unwrap();
    let metrics = lines.next().unwrap().unwrap();
    let addr = addr
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_owned();
    let metrics = metrics
        .strip_prefix("metrics on ")
        .expect("metrics line")
        .to_owned();
    (Proc(child), addr, metrics)
}

/// GET `path` over HTTP/1.0; returns status line and body.
fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// The value of the sample `name` (with its labels, as rendered), if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn agent(token: &Token, root: &Path) -> (Proc, String, String) {
    spawn_with_metrics(&mut token.agent_command(root))
}

#[test]
fn agents_and_server_count_a_sync_and_answer_healthz() {
    let tmp = tempfile::tempdir().unwrap();
    let (master, remote) = (tmp.path().join("m"), tmp.path().join("r"));
    std::fs::create_dir_all(&master).unwrap();
    std::fs::create_dir_all(&remote).unwrap();
    let mut total = 0u64;
    for i in 0..20u64 {
        let data = vec![b'a' + (i % 26) as u8; 1000 * (i as usize + 1)];
        total += data.len() as u64;
        std::fs::write(master.join(format!("f{i:02}")), data).unwrap();
    }
    // One big file so that the sync is still running when we first look.
    let big: Vec<u8> = (0..6u32 << 20).map(|i| (i * 31 % 251) as u8).collect();
    total += big.len() as u64;
    std::fs::write(master.join("zz-big"), &big).unwrap();
    let token = Token::new();
    let (_m, maddr, m_metrics) = agent(&token, &master);
    let (_r, raddr, r_metrics) = agent(&token, &remote);
    let mut cmd = fleetsync(scratch_home());
    cmd.args(["server", "--listen", "127.0.0.1:0", "--token-file"])
        .arg(&token.file);
    let (_s, saddr, s_metrics) = spawn_with_metrics(&mut cmd);

    for a in [&m_metrics, &r_metrics, &s_metrics] {
        assert_eq!(
            get(a, "/healthz"),
            ("HTTP/1.0 200 OK".into(), "ok\n".into())
        );
        assert!(get(a, "/nope").0.contains("404"));
    }
    let (status, before) = get(&s_metrics, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert_eq!(
        sample(&before, "fleetsync_server_jobs_running"),
        Some(0.0),
        "{before}"
    );

    let mut sync = Proc(
        token
            .sync_command(&saddr, &maddr, &[&raddr])
            .args(["--bwlimit", "2M"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    // While it runs: the server has a job and agent connections.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = get(&s_metrics, "/metrics").1;
        if sample(&text, "fleetsync_server_jobs_running") == Some(1.0) {
            assert!(sample(&text, "fleetsync_server_agents_connected").unwrap() >= 1.0);
            break;
        }
        assert!(Instant::now() < deadline, "the job was never seen running");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(sync.0.wait().unwrap().success());

    let server = get(&s_metrics, "/metrics").1;
    let label = format!("{{remote=\"{raddr}\"}}");
    assert_eq!(
        sample(
            &server,
            &format!("fleetsync_server_files_sent_total{label}")
        ),
        Some(21.0),
        "{server}"
    );
    assert_eq!(
        sample(
            &server,
            &format!("fleetsync_server_bytes_sent_total{label}")
        ),
        Some(total as f64),
        "{server}"
    );
    assert_eq!(
        sample(
            &server,
            "fleetsync_server_jobs_finished_total{status=\"succeeded\"}"
        ),
        Some(1.0),
        "{server}"
    );
    assert_eq!(sample(&server, "fleetsync_server_jobs_running"), Some(0.0));
    let remote_text = get(&r_metrics, "/metrics").1;
    assert_eq!(
        sample(&remote_text, "fleetsync_agent_files_received_total"),
        Some(21.0),
        "{remote_text}"
    );
    assert_eq!(
        sample(&remote_text, "fleetsync_agent_bytes_received_total"),
        Some(total as f64)
    );
    let master_text = get(&m_metrics, "/metrics").1;
    assert_eq!(
        sample(&master_text, "fleetsync_agent_files_sent_total"),
        Some(21.0),
        "{master_text}"
    );
    assert!(sample(&master_text, "fleetsync_agent_checksums_total").is_some());
    assert!(master_text.ends_with("# EOF\n"), "{master_text}");
}

/// Issue 12 ("a no-change re-sync ... while still judging content by checksum"): agents
/// list each file with the digest their checksum cache holds for it as listed, so a warm
/// re-sync asks neither agent for a checksum, and a file whose content changed under the
/// same size and mtime (a new ctime: no listed digest) is still checksummed and sent.
#[test]
fn a_warm_resync_judges_files_by_their_listed_digests_and_asks_for_no_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let (master, remote) = (tmp.path().join("m"), tmp.path().join("r"));
    let names: Vec<String> = (0..30).map(|i| format!("d{}/f{i:02}", i % 3)).collect();
    for (i, n) in names.iter().enumerate() {
        let data = vec![b'a' + i as u8 % 26; 100 + i * 37];
        support::write_with_mtime(&master.join(n), &data, 1_700_000_000 + i as u64);
        support::write_with_mtime(&remote.join(n), &data, 1_700_000_000 + i as u64);
    }
    // Past the checksum cache's "racy" window, so that the first digests are cached.
    std::thread::sleep(Duration::from_millis(2300));
    let token = Token::new();
    let (_m, maddr, m_metrics) = agent(&token, &master);
    let (_r, raddr, r_metrics) = agent(&token, &remote);
    let (_s, saddr) = token.server();
    let checksums = |metrics: &str| {
        sample(
            &get(metrics, "/metrics").1,
            "fleetsync_agent_checksums_total",
        )
        .unwrap_or(0.0)
    };
    let sync = || {
        let out = token.sync(&saddr, &maddr, &[&raddr]);
        assert!(out.status.success());
        assert_eq!(support::rsync_diff(&master, &remote), "");
        (checksums(&m_metrics), checksums(&r_metrics))
    };
    // The first sync computes (and caches) every digest on both sides.
    assert_eq!(sync(), (30.0, 30.0));
    // The re-sync takes them from the listings.
    assert_eq!(sync(), (30.0, 30.0), "a warm re-sync asked for checksums");
    // New content, same size and mtime on the remote: only that file is asked for
    // (the master's digest is listed) and sent.
    let n = &names[7];
    let old = std::fs::read(master.join(n)).unwrap();
    let new: Vec<u8> = old.iter().map(|b| b ^ 1).collect();
    support::write_with_mtime(&remote.join(n), &new, 1_700_000_007);
    assert_ne!(support::rsync_diff(&master, &remote), "");
    assert_eq!(sync(), (30.0, 31.0));
}
