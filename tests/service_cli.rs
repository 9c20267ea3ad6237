//! Running as a service (issue 13), the parts around the stop: `--config` and
//! `--print-config` of real `agent` and `server` processes, systemd readiness over a real
//! `NOTIFY_SOCKET`, `--log-format json` (parsed by serde_json), shell completions (checked by
//! bash itself) and man pages (rendered by man or groff).

mod support;

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{fleetsync, listening, rsync_diff, scratch_home, write_with_mtime, Token};

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    let r = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(r, 0, "kill: {}", std::io::Error::last_os_error());
}

fn sigterm(pid: u32) {
    signal(pid, libc::SIGTERM)
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.to_str().unwrap())
}

#[test]
fn agents_and_a_server_configured_by_files_alone_sync_a_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let (master_root, remote_root) = (tmp.path().join("master"), tmp.path().join("remote"));
    for i in 0..10 {
        let data = format!("file {i}\n").repeat(i * 100 + 1);
        write_with_mtime(
            &master_root.join(format!("d/{i}.txt")),
            data.as_bytes(),
            1_600_000_000,
        );
    }
    write_with_mtime(&remote_root.join("extra.txt"), b"extra", 1_500_000_000);
    let token = Token::new();
    let conf = |name: &str, text: String| {
        let p = tmp.path().join(name);
        fs::write(&p, text).unwrap();
        p
    };
    let agent_conf = |name: &str, root: &Path| {
        conf(
            name,
            format!(
                "# an agent\nroot = {}\nlisten = \"127.0.0.1:0\"\ntoken-file = {}\n\
                 no-checksum-cache = true\nverbose = 1\nlog-format = \"json\"\n",
                toml_str(root),
                toml_str(&token.file)
            ),
        )
    };
    let master_conf = agent_conf("master.toml", &master_root);
    let remote_conf = agent_conf("remote.toml", &remote_root);
    let server_conf = conf(
        "server.toml",
        format!(
            "listen = \"127.0.0.1:0\"\ntoken-file = {}\njobs-db = {}\nidle-timeout = 600\n",
            toml_str(&token.file),
            toml_str(&tmp.path().join("jobs.sqlite"))
        ),
    );
    let start = |conf: &Path, what: &str| {
        listening(
            fleetsync(scratch_home())
                .args([what, "--config"])
                .arg(conf)
                .stderr(Stdio::null()),
        )
    };
    let (_master, master) = start(&master_conf, "agent");
    let (_remote, remote) = start(&remote_conf, "agent");
    let (_server, server) = start(&server_conf, "server");
    let out = token.sync(&server, &master, &[&remote]);
    assert!(out.status.success());
    assert_eq!(rsync_diff(&master_root, &remote_root), "");
}

#[test]
fn print_config_shows_the_file_overridden_by_flags_and_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("agent.toml");
    fs::write(
        &file,
        "root = \"/srv/tree\"\nlisten = \"0.0.0.0:7070\"\nkeep-versions = \"2GiB\"\nread-only = true\n",
    )
    .unwrap();
    let print = |args: &[&str], file: &Path| {
        let out = fleetsync(scratch_home())
            .args(["agent", "--config"])
            .arg(file)
            .args(args)
            .arg("--print-config")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let text = print(&["--listen", "127.0.0.1:9"], &file);
    // The file's settings, the command line's override, and the defaults.
    assert!(text.contains("root = \"/srv/tree\""), "{text}");
    assert!(text.contains("listen = \"127.0.0.1:9\"\n"), "{text}");
    assert!(text.contains("keep-versions = \"2GiB\""), "{text}");
    assert!(text.contains("read-only = true"), "{text}");
    assert!(text.contains("no-fsync = false"), "{text}");
    // Valid TOML, which --config takes back to the same settings.
    let table: toml::Table = text.parse().unwrap();
    assert_eq!(table["listen"].as_str(), Some("127.0.0.1:9"));
    let again = tmp.path().join("again.toml");
    fs::write(&again, &text).unwrap();
    let text2 = print(&[], &again);
    let strip = |t: &str| -> Vec<String> {
        t.lines()
            .skip(1)
            .map(|l| l.split(" # ").next().unwrap().to_owned())
            .collect()
    };
    assert_eq!(strip(&text), strip(&text2));

    let server = fleetsync(scratch_home())
        .args(["server", "--listen", "127.0.0.1:1", "--print-config"])
        .output()
        .unwrap();
    let text = String::from_utf8(server.stdout).unwrap();
    assert!(text.contains("idle-timeout = 3600 # default"), "{text}");
}

#[test]
fn bad_config_files_are_refused_naming_the_key_and_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unknown.toml",
            "listen = \"127.0.0.1:0\"\nlistne = 1\n",
            "`listne`",
        ),
        (
            "type.toml",
            "listen = \"127.0.0.1:0\"\nread-only = \"yes\"\n",
            "`read-only`",
        ),
        (
            "value.toml",
            "listen = \"127.0.0.1:0\"\nkeep-versions = \"much\"\n",
            "`keep-versions`",
        ),
        ("syntax.toml", "listen = \"127.0.0.1:0\n", "syntax.toml"),
    ];
    for (name, text, named) in cases {
        let file = tmp.path().join(name);
        fs::write(&file, text).unwrap();
        let out = fleetsync(scratch_home())
            .args(["agent", "--root"])
            .arg(tmp.path())
            .arg("--config")
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(named) && err.contains(name), "{name}: {err}");
    }
}

/// Starts `fleetsync ARGS` with `NOTIFY_SOCKET` on a datagram socket of this test; checks
/// READY=1 comes once the port accepts, and STOPPING=1 then exit 0 on signal `sig`.
fn check_notify(args: &[&std::ffi::OsStr], sig: libc::c_int) {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = fleetsync(scratch_home())
        .args(args)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("no READY=1 within 30 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let status = format!("STATUS=listening on {addr}");
    assert!(msg.lines().any(|l| l == status), "{msg:?}");
    // Ready means accepting.
    TcpStream::connect(&addr).expect("READY=1 before the port accepts");
    signal(child.id(), sig);
    let n = sock.recv(&mut buf).expect("no STOPPING=1 within 30 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg:?}");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn agent_and_server_report_readiness_and_stopping_to_systemd() {
    let token = Token::new();
    let root = tempfile::tempdir().unwrap();
    check_notify(
        &[
            "agent".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--root".as_ref(),
            root.path().as_os_str(),
            "--token-file".as_ref(),
            token.file.as_os_str(),
        ],
        libc::SIGTERM,
    );
    // (SIGINT, Ctrl-C in a terminal, stops as cleanly.)
    check_notify(
        &[
            "server".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--token-file".as_ref(),
            token.file.as_os_str(),
        ],
        libc::SIGINT,
    );
}

/// Checks every stderr line is a JSON object with the four fields.
fn check_json_lines(stderr: &[u8]) -> usize {
    let text = String::from_utf8_lossy(stderr);
    let mut n = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(v[field].is_string(), "no {field}: {line}");
        }
        n += 1;
    }
    n
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let tmp = tempfile::tempdir().unwrap();
    write_with_mtime(&tmp.path().join("m/a.txt"), b"a", 1_600_000_000);
    // The embedded sync logs its agents' and server's events.
    let out = fleetsync(scratch_home())
        .args(["sync", "-v", "--log-format", "json"])
        .arg(tmp.path().join("m"))
        .arg(tmp.path().join("r"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Its report (`R: sent 1 files ...`) is output, not a log line: the rest is JSON.
    let logs: Vec<u8> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.contains(": sent "))
        .flat_map(|l| format!("{l}\n").into_bytes())
        .collect();
    assert!(check_json_lines(&logs) > 0, "no log line at all");

    // An agent: its start and its stop.
    let token = Token::new();
    let mut child = token
        .agent_command(tmp.path())
        .args(["-v", "--log-format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    sigterm(child.id());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(check_json_lines(&out.stderr) >= 2, "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("\"message\":\"SIGTERM: stopping\""), "{text}");
}

/// The subcommands, as `fleetsync --help` lists them.
fn subcommands() -> Vec<String> {
    let out = fleetsync(scratch_home()).arg("--help").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let names: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .filter(|n| n != "help")
        .collect();
    assert!(names.len() >= 9, "{names:?}");
    names
}

#[test]
fn the_bash_completion_script_is_valid_and_knows_every_subcommand() {
    let out = fleetsync(scratch_home())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    for sub in subcommands() {
        assert!(
            script.contains(&format!("fleetsync,{sub})")),
            "{sub} missing"
        );
    }
    // bash itself: the script parses and registers a completion for fleetsync.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("fleetsync.bash");
    fs::write(&file, &script).unwrap();
    let check = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p fleetsync",
            file.display()
        ))
        .output()
        .expect("bash");
    let registered = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{check:?}");
    assert!(registered.contains("fleetsync"), "{registered}");
    for shell in ["zsh", "fish"] {
        let out = fleetsync(scratch_home())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
}

/// Renders a man page as plain text with man(1), else groff (one must be installed).
fn render(page: &Path) -> String {
    let man = Command::new("man")
        .arg("-l")
        .arg(page)
        .env("LC_ALL", "C")
        .env("MANWIDTH", "100")
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .output();
    let out = match man {
        Ok(out) if out.status.success() => out,
        _ => Command::new("groff")
            .args(["-man", "-Tascii", "-P", "-c"])
            .arg(page)
            .output()
            .expect("neither man nor groff could render the page: run .ci/setup (groff)"),
    };
    assert!(out.status.success(), "{out:?}");
    // Drop overstrike bold/underline (X\bX).
    let mut text = String::new();
    for c in String::from_utf8_lossy(&out.stdout).chars() {
        if c == '\u{8}' {
            text.pop();
        } else {
            text.push(c);
        }
    }
    text
}

#[test]
fn man_pages_are_written_for_every_subcommand_and_render() {
    let tmp = tempfile::tempdir().unwrap();
    let out = fleetsync(scratch_home())
        .arg("man")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(tmp.path().join("fleetsync.1").is_file());
    for sub in subcommands() {
        let page = tmp.path().join(format!("fleetsync-{sub}.1"));
        assert!(page.is_file(), "{} missing", page.display());
    }
    let sync = render(&tmp.path().join("fleetsync-sync.1"));
    assert!(sync.contains("--delete"), "{sync}");
    let words: Vec<&str> = sync.split_whitespace().collect();
    assert!(
        words.windows(2).any(|w| w == ["fleetsync", "sync"]),
        "{sync}"
    );
    let agent = render(&tmp.path().join("fleetsync-agent.1"));
    assert!(agent.contains("--config"), "{agent}");
    let top = render(&tmp.path().join("fleetsync.1"));
    assert!(top.contains("fleetsync-sync(1)"), "{top}");
}
