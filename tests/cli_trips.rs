//! What a new user trips on (issue 13, "What users trip on today"), with real processes:
//! a token that differs between the parts, a weak token file, colours in redirected logs,
//! and the `-a` hint of `sync`.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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
