//! What a new user trips on (issue 13, "What users trip on today"), with real processes:
//! a token that differs between the parts, a weak token file, colours in redirected logs,
//! and the `-a` hint of `sync`.

use std::fs::File;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fleetsync_proto::{auth, ProtoError, Role};

mod support;

use support::{fleetsync, listening, logged, scratch_home, Proc};

/// A token file holding `token`, with permissions `mode`.
fn token_file(dir: &Path, name: &str, token: &str, mode: u32) -> PathBuf {
    let f = dir.join(name);
    std::fs::write(&f, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
    f
}

/// `fleetsync ARGS...` (`agent` or `server`) listening on 127.0.0.1, its stderr into `log`.
fn spawn_logging(args: &[&str], token: &Path, log: &Path) -> (Proc, String) {
    listening(
        fleetsync(scratch_home())
            .args(args)
            .args(["--listen", "127.0.0.1:0", "--token-file"])
            .arg(token)
            .env_remove("FLEETSYNC_TOKEN")
            .env_remove("RUST_LOG")
            .stderr(Stdio::from(File::create(log).unwrap())),
    )
}

/// Waits (up to 20 s) until the file `log` contains `what`; returns its text.
fn wait_for_log(log: &Path, what: &str) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(what) || start.elapsed() > Duration::from_secs(20) {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `sync` through a server that is not there (port 1 refuses): it reads the token first.
fn sync_against_nothing(configure: impl FnOnce(&mut Command)) -> Output {
    let mut cmd = fleetsync(scratch_home());
    cmd.args([
        "sync",
        "--server",
        "127.0.0.1:1",
        "--master",
        "127.0.0.1:1",
        "127.0.0.1:1",
    ])
    .env_remove("FLEETSYNC_TOKEN");
    configure(&mut cmd);
    logged("sync", cmd.output().unwrap())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn regression_agent_with_another_token_says_authentication_failed_on_the_client_and_in_the_server_log(
) {
    let tmp = tempfile::tempdir().unwrap();
    let (master, remote) = (tmp.path().join("m"), tmp.path().join("r"));
    std::fs::create_dir(&master).unwrap();
    std::fs::create_dir(&remote).unwrap();
    std::fs::write(master.join("f"), b"payload").unwrap();
    let right = token_file(tmp.path(), "right", "right-token-0123456789", 0o600);
    let other = token_file(tmp.path(), "other", "other-token-0123456789", 0o600);

    let root_arg = |p: &Path| p.to_str().unwrap().to_owned();
    let (m_root, r_root) = (root_arg(&master), root_arg(&remote));
    let (_m, m_addr) = spawn_logging(
        &["agent", "--root", &m_root],
        &right,
        &tmp.path().join("m.log"),
    );
    let r_log = tmp.path().join("r.log");
    let (_r, r_addr) = spawn_logging(&["agent", "--root", &r_root], &other, &r_log);
    let s_log = tmp.path().join("s.log");
    let (mut server, s_addr) = spawn_logging(&["server"], &right, &s_log);

    let out = logged(
        "sync",
        fleetsync(scratch_home())
            .args([
                "sync",
                "--server",
                &s_addr,
                "--master",
                &m_addr,
                "--token-file",
            ])
            .arg(&right)
            .arg(&r_addr)
            .env_remove("FLEETSYNC_TOKEN")
            .output()
            .unwrap(),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&r_addr) && err.contains("authentication failed"),
        "{err}"
    );
    assert!(!err.contains("connection closed by peer"), "{err}");
    assert!(!remote.join("f").exists(), "nothing may land");

    // The server, which failed to authenticate with the agent, logs it.
    let s_text = wait_for_log(&s_log, "authentication failed");
    assert!(
        s_text.contains("authentication failed"),
        "server log:\n{s_text}"
    );
    // The agent logs the refusal too, and keeps serving the right token.
    let r_text = wait_for_log(&r_log, "authentication failed");
    assert!(
        r_text.contains("authentication failed"),
        "agent log:\n{r_text}"
    );
    let mut s = TcpStream::connect(&r_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    auth::connect(&mut s, Some(b"other-token-0123456789"), Role::Server).unwrap();
    assert!(server.alive());
}

#[test]
fn a_control_client_with_the_wrong_token_is_told_so_by_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let right = token_file(tmp.path(), "right", "server-token-0123456789", 0o600);
    let other = token_file(tmp.path(), "other", "client-token-0123456789", 0o600);
    let s_log = tmp.path().join("s.log");
    let (mut server, s_addr) = spawn_logging(&["server"], &right, &s_log);
    let out = logged(
        "sync",
        fleetsync(scratch_home())
            .args(["sync", "--server", &s_addr, "--master", "127.0.0.1:9"])
            .arg("--token-file")
            .arg(&other)
            .arg("127.0.0.1:9")
            .env_remove("FLEETSYNC_TOKEN")
            .output()
            .unwrap(),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("authentication failed"), "{err}");
    assert!(err.contains("token differs"), "{err}");
    assert!(!err.contains("closed by peer"), "{err}");
    wait_for_log(&s_log, "authentication failed");
    assert!(server.alive());
}

#[test]
fn a_connector_with_the_wrong_token_is_told_that_the_tokens_differ() {
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path(), "token", "agent-token-0123456789", 0o600);
    let root = tmp.path().to_str().unwrap().to_owned();
    let log = tmp.path().join("agent.log");
    let (mut agent, addr) = spawn_logging(&["agent", "--root", &root], &token, &log);

    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let e = auth::connect(&mut s, Some(b"guessed-token-0123456789"), Role::Server).unwrap_err();
    assert!(matches!(e, ProtoError::AuthFailed(_)), "{e:?}");
    assert!(e.to_string().contains("token differs"), "{e}");

    // Without a token at all against an agent that has one.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let e = auth::connect(&mut s, None, Role::Server).unwrap_err();
    assert!(e.to_string().contains("requires a token"), "{e}");
    assert!(agent.alive());
}

#[test]
fn a_token_shorter_than_16_bytes_is_refused_naming_its_file() {
    let tmp = tempfile::tempdir().unwrap();
    // 15 bytes (the trailing newline does not count): one short.
    let f = token_file(tmp.path(), "short-token", "0123456789abcde", 0o600);
    let out = sync_against_nothing(|c| {
        c.arg("--token-file").arg(&f);
    });
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains(&f.display().to_string()) && err.contains("16"),
        "{err}"
    );

    // The agent refuses to start with it, too.
    let out = logged(
        "agent",
        fleetsync(scratch_home())
            .args(["agent", "--listen", "127.0.0.1:0", "--root"])
            .arg(tmp.path())
            .arg("--token-file")
            .arg(&f)
            .env_remove("FLEETSYNC_TOKEN")
            .output()
            .unwrap(),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("short-token"), "{}", stderr(&out));

    // From the environment: the message names the variable.
    let out = sync_against_nothing(|c| {
        c.env("FLEETSYNC_TOKEN", "six-by");
    });
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("FLEETSYNC_TOKEN"), "{}", stderr(&out));

    // 16 bytes are enough: the command gets as far as connecting.
    let ok = token_file(tmp.path(), "ok-token", "0123456789abcdef", 0o600);
    let out = sync_against_nothing(|c| {
        c.arg("--token-file").arg(&ok);
    });
    assert!(
        stderr(&out).contains("connecting to the server"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_token_file_others_may_read_gets_a_warning_naming_it_and_chmod_600() {
    let tmp = tempfile::tempdir().unwrap();
    for mode in [0o644, 0o640, 0o604] {
        let f = token_file(tmp.path(), "open-token", "open-token-0123456789", mode);
        let out = sync_against_nothing(|c| {
            c.arg("--token-file").arg(&f);
        });
        let err = stderr(&out);
        assert!(err.contains("warning"), "mode {mode:o}: {err}");
        assert!(err.contains(&f.display().to_string()), "{err}");
        assert!(err.contains("chmod 600"), "{err}");
        // A warning, not a refusal: the command went on to connect.
        assert!(err.contains("connecting to the server"), "{err}");
    }
    let f = token_file(tmp.path(), "closed-token", "closed-token-0123456789", 0o600);
    let out = sync_against_nothing(|c| {
        c.arg("--token-file").arg(&f);
    });
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
}

#[test]
fn regression_log_lines_have_no_ansi_colours_when_stderr_is_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let token = token_file(tmp.path(), "token", "log-token-0123456789", 0o600);
    let root = tmp.path().to_str().unwrap().to_owned();
    let log = tmp.path().join("agent.log");
    let (_agent, _addr) = spawn_logging(&["agent", "-v", "--root", &root], &token, &log);
    let text = wait_for_log(&log, "agent listening");
    assert!(
        text.contains("INFO") && text.contains("agent listening"),
        "{text}"
    );
    assert!(
        !text.contains('\x1b'),
        "ANSI escapes in a redirected log: {text:?}"
    );
}

#[test]
fn sync_and_verify_with_an_unknown_algorithm_point_to_the_list_as_sum_does() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, r) = (tmp.path().join("m"), tmp.path().join("r"));
    std::fs::create_dir(&m).unwrap();
    std::fs::create_dir(&r).unwrap();
    let sum = logged(
        "sum",
        fleetsync(scratch_home())
            .args(["sum", "-a", "no-such-alg"])
            .arg(tmp.path())
            .output()
            .unwrap(),
    );
    assert_eq!(sum.status.code(), Some(2));
    assert!(stderr(&sum).contains("(see --list)"), "{}", stderr(&sum));
    for command in ["sync", "verify"] {
        let out = logged(
            command,
            fleetsync(scratch_home())
                .args([command, "-a", "no-such-alg"])
                .arg(&m)
                .arg(&r)
                .output()
                .unwrap(),
        );
        assert_eq!(out.status.code(), Some(2), "{command}");
        let err = stderr(&out);
        assert!(
            err.contains("unknown checksum algorithm 'no-such-alg'"),
            "{err}"
        );
        assert!(err.contains("--list"), "{command}: {err}");
    }
}

#[test]
fn a_bad_glob_names_the_option_it_came_from() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, r) = (tmp.path().join("m"), tmp.path().join("r"));
    std::fs::create_dir_all(&m).unwrap();
    for (args, want) in [
        (vec!["--include", "a["], "--include 'a[': invalid pattern"),
        (
            vec!["--exclude", "*.o", "--exclude", "[z"],
            "--exclude '[z': invalid pattern",
        ),
        (
            vec!["--select", "name:x["],
            "--select: invalid pattern 'x['",
        ),
        (vec!["--select", "ext:rs and"], "--select: column 11"),
    ] {
        let out = fleetsync(scratch_home())
            .arg("sync")
            .args(&args)
            .arg(&m)
            .arg(&r)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!r.exists(), "{args:?}: the remote was created");
    }
}
