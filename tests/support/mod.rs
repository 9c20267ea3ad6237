//! Real `fleetsync` processes on 127.0.0.1 for end-to-end tests, and rsync
//! as the referee. (Same approach as `sync_rsync.rs`, shared by the
//! kill and malformed-frame tests.)
#![allow(dead_code)]

pub mod lab;
pub mod proxy;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The shared token written by [`Token::new`].
pub const TOKEN: &[u8] = b"test-token-0123456789";

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_fleetsync");

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc(pub Child);

impl Proc {
    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }

    /// SIGKILL now and reap (dropping does it too).
    pub fn kill_now(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Points the per-user state a `fleetsync` process keeps outside the trees (the job history
/// database, the agents' checksum cache; see README) into `home`, so that tests never read or
/// write the invoking user's `~`. Settings made on `cmd` afterwards win (a test of the
/// default paths sets its own `XDG_STATE_HOME`).
pub fn isolate<'a>(cmd: &'a mut Command, home: &Path) -> &'a mut Command {
    cmd.env("HOME", home)
        .env("XDG_STATE_HOME", home.join(".local/state"))
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env("FLEETSYNC_JOBS_DB", home.join("jobs.sqlite"))
}

/// `fleetsync` with its per-user state in `home` (see [`isolate`]).
pub fn fleetsync(home: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    isolate(&mut cmd, home);
    cmd
}

static SCRATCH_HOME: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_scratch_home() {
    if let Some(dir) = SCRATCH_HOME.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The home of the processes this test binary starts without one of their own: a temporary
/// directory, removed when the test binary exits.
pub fn scratch_home() -> &'static Path {
    SCRATCH_HOME.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("fleetsync-test-home-")
            .tempdir()
            .unwrap()
            .keep();
        // SAFETY: registers a function without arguments or captured state, which only
        // removes a directory; atexit(3) has no other preconditions.
        unsafe { libc::atexit(remove_scratch_home) };
        dir
    })
}

/// Starts `fleetsync ARGS...` (its home in [`scratch_home`]) and reads its `listening on ADDR`
/// line.
pub fn spawn_listening(args: &[&OsStr]) -> (Proc, String) {
    listening(
        fleetsync(scratch_home())
            .args(args)
            .stderr(Stdio::inherit()),
    )
}

/// Starts `cmd` (a `fleetsync agent` or `server`; its stdout is piped here) and reads its
/// `listening on ADDR` line.
pub fn listening(cmd: &mut Command) -> (Proc, String) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn fleetsync");
    let stdout = child.stdout.take().unwrap();
    let proc = Proc(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (proc, addr)
}

/// A token file in a directory of its own.
pub struct Token {
    _dir: tempfile::TempDir,
    /// Path of the token file.
    pub file: PathBuf,
}

impl Token {
    pub fn new() -> Token {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "test-token-0123456789\n").unwrap();
        // As an operator keeps it (a file others can read gets a warning).
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        Token { _dir: dir, file }
    }

    /// `fleetsync agent` serving `root` (fsync on, as in production).
    pub fn agent(&self, root: &Path) -> (Proc, String) {
        listening(self.agent_command(root).stderr(Stdio::inherit()))
    }

    /// `fleetsync agent` serving `root` on 127.0.0.1 (its home in [`scratch_home`]), not yet
    /// started: for [`listening`] after the caller's own settings.
    pub fn agent_command(&self, root: &Path) -> Command {
        let mut cmd = fleetsync(scratch_home());
        cmd.arg("agent")
            .arg("--root")
            .arg(root)
            .args(["--listen", "127.0.0.1:0", "--token-file"])
            .arg(&self.file);
        cmd
    }

    /// `fleetsync server`.
    pub fn server(&self) -> (Proc, String) {
        spawn_listening(&[
            "server".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--token-file".as_ref(),
            self.file.as_os_str(),
        ])
    }

    /// `fleetsync server` recording its job history into `db`.
    pub fn server_recording(&self, db: &Path) -> (Proc, String) {
        spawn_listening(&[
            "server".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--token-file".as_ref(),
            self.file.as_os_str(),
            "--jobs-db".as_ref(),
            db.as_os_str(),
        ])
    }

    /// `fleetsync sync --server S --master M REMOTES...`, not yet started.
    pub fn sync_command(&self, server: &str, master: &str, remotes: &[&str]) -> Command {
        let mut cmd = fleetsync(scratch_home());
        cmd.arg("sync")
            .arg("--server")
            .arg(server)
            .arg("--master")
            .arg(master)
            .arg("--token-file")
            .arg(&self.file)
            .arg("--delete")
            .args(remotes);
        cmd
    }

    /// Runs a sync to the end and logs its output.
    pub fn sync(&self, server: &str, master: &str, remotes: &[&str]) -> Output {
        let out = self.sync_command(server, master, remotes).output().unwrap();
        eprintln!(
            "sync: {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            tail(&out.stdout),
            tail(&out.stderr)
        );
        out
    }
}

/// Logs a finished command's status and whole output under `what`; returns the output.
pub fn logged(what: &str, out: Output) -> Output {
    eprintln!(
        "{what}: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A small deterministic generator (xorshift64*) for test contents and kill moments.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// `n` bytes from `rng`.
pub fn random(rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(n);
    v
}

/// Writes `data` to `path`, creating its directories.
pub fn write(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

/// The seed of a randomized kill test: `FLEETSYNC_KILL_SEED` to replay a run, else the
/// clock; printed so that a failing run can be replayed. Never 0 (xorshift's fixed point).
pub fn kill_seed() -> u64 {
    let seed = std::env::var("FLEETSYNC_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1;
    eprintln!("FLEETSYNC_KILL_SEED={seed}");
    seed
}

/// Writes `data` to `path` (creating its directories) with modification time `mtime`
/// (seconds since the epoch).
pub fn write_with_mtime(path: &Path, data: &[u8], mtime: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(mtime))
        .unwrap();
}

fn tail(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Runs the referee; returns its itemized output (empty = identical).
pub fn rsync_diff(master: &Path, remote: &Path) -> String {
    let out = Command::new("rsync")
        .args(["-aHc", "-n", "-i", "--delete"])
        .arg(format!("{}/", master.display()))
        .arg(format!("{}/", remote.display()))
        .output()
        .expect("rsync, the referee, must be installed (`bash .ci/setup` installs it)");
    assert!(out.status.success(), "rsync failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Decodes `--json`'s `"path_hex"` (lowercase hex) back to the name's bytes; panics on
/// anything else, so a wrong encoding fails the test.
pub fn unhex(hex: &str) -> Vec<u8> {
    assert!(
        hex.len().is_multiple_of(2) && hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
        "not lowercase hex: {hex:?}"
    );
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}
