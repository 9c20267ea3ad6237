//! `fleetsync sync --lock` (issue 5) against real concurrent processes: a cooperating writer
//! rewriting master files in place under exclusive locks, and a cooperating reader taking shared
//! locks on the remote copies, while `sync --lock` runs again and again.
//!
//! Every version of a file is self-describing (each 64-byte line names the file, the version
//! and its own index; a last line carries the line count and a hash of everything before it),
//! so a torn, truncated or mixed copy is caught by [`check_version`]. What a user relies on:
//!
//! - the remote reader only ever sees complete single versions, never older than one it saw;
//! - while the reader holds its shared lock, the remote path is not replaced under it;
//! - once the writer stops, one more `sync --lock` makes the remote equal to the writer's final
//!   version (rsync `-c` sees no difference);
//! - a writer holding its lock (with the file half rewritten) past `--lock-timeout` makes the
//!   sync fail that file naming the holder's pid, exit 1, and the remote keeps its old version;
//!   the same for a reader holding a shared lock on the remote copy.
//!
//! The writer, the reader and the lock holders are this test binary started again in a helper
//! role ([`helper_process`]); they lock with plain `flock(2)` or OFD `fcntl` calls, as an
//! application would, not with fleetsync's lock module.

mod support;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{fleetsync, rsync_diff, Proc};

/// Bytes per line of a versioned file.
const LINE: usize = 64;

/// The files the writer rewrites: name, body lines at version 0 (a version `v` has
/// `lines + v % 5` body lines, so files grow and shrink). `big.bin` is 4 MiB, so a copy spans
/// five 1 MiB stream chunks; `one.bin` crosses one chunk boundary.
const FILES: [(&str, usize); 4] = [
    ("tiny.conf", 16),
    ("mid.dat", 1024),
    ("one.bin", 16_400),
    ("big.bin", 65_536),
];

fn lines_of(base: usize, version: u64) -> usize {
    base + (version % 5) as usize
}

/// FNV-1a, 64 bits.
fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Version `v` of file `name` with `lines` body lines (see the module docs).
fn version_bytes(name: &str, v: u64, lines: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity((lines + 1) * LINE);
    // One line formatted, then only its line number rewritten (quick in a debug build).
    let mut line = Vec::with_capacity(LINE);
    write!(line, "{name} v{v:010} line").unwrap();
    let digits = line.len();
    write!(line, "00000000 ").unwrap();
    line.resize(LINE - 1, b'a' + (v % 26) as u8);
    line.push(b'\n');
    for i in 0..lines {
        let mut n = i;
        for d in line[digits..digits + 8].iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
        out.extend_from_slice(&line);
    }
    let hash = fnv(&out);
    let start = out.len();
    write!(out, "END {name} v{v:010} lines{lines:08} fnv{hash:016x}").unwrap();
    assert!(out.len() < start + LINE, "name {name:?} too long");
    out.resize(start + LINE - 1, b' ');
    out.push(b'\n');
    out
}

/// The version `data` is a complete copy of, or what is wrong with it.
fn check_version(name: &str, base: usize, data: &[u8]) -> Result<u64, String> {
    check_version_cached(name, base, data, &mut None)
}

/// [`check_version`] keeping the last expected version of the file in `cache` (the reader
/// reads the same version many times; building one takes a while in a debug build).
fn check_version_cached(
    name: &str,
    base: usize,
    data: &[u8],
    cache: &mut Option<(u64, Vec<u8>)>,
) -> Result<u64, String> {
    // (A whole number of lines; `is_multiple_of` is newer than our rust-version.)
    if data.len() < 2 * LINE || data.len() / LINE * LINE != data.len() {
        return Err(format!(
            "{name}: torn: {} bytes is not a whole number of lines",
            data.len()
        ));
    }
    let prefix = format!("{name} v");
    let v: u64 = data
        .strip_prefix(prefix.as_bytes())
        .and_then(|rest| std::str::from_utf8(&rest[..10]).ok())
        .and_then(|digits| digits.parse().ok())
        .ok_or_else(|| format!("{name}: first line is not {prefix}NUMBER"))?;
    if cache.as_ref().map(|(cached, _)| *cached) != Some(v) {
        *cache = Some((v, version_bytes(name, v, lines_of(base, v))));
    }
    let want = &cache.as_ref().expect("just filled").1;
    if data == want {
        return Ok(v);
    }
    let common = data.len().min(want.len()) / LINE;
    match (0..common).find(|k| data[k * LINE..][..LINE] != want[k * LINE..][..LINE]) {
        Some(k) => Err(format!(
            "{name}: mixed: starts as v{v} but line {k} is {:?}",
            String::from_utf8_lossy(&data[k * LINE..][..LINE]).trim_end()
        )),
        None => Err(format!(
            "{name}: torn: v{v} is {} bytes, this copy {}",
            want.len(),
            data.len()
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Locks as a cooperating application takes them (blocking).

#[derive(Clone, Copy, Debug)]
enum Family {
    Flock,
    Ofd,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::Flock => "flock",
            Family::Ofd => "ofd",
        }
    }

    fn parse(s: &str) -> Family {
        match s {
            "flock" => Family::Flock,
            "ofd" => Family::Ofd,
            other => panic!("unknown lock family {other:?}"),
        }
    }
}

/// Waits for a whole-file lock of `family` on `file`.
fn lock(file: &File, family: Family, exclusive: bool) {
    loop {
        let r = match family {
            Family::Flock => {
                let op = if exclusive {
                    libc::LOCK_EX
                } else {
                    libc::LOCK_SH
                };
                // SAFETY: flock(2) on a descriptor that `file` keeps open during the call.
                unsafe { libc::flock(file.as_raw_fd(), op) }
            }
            Family::Ofd => {
                // SAFETY: `struct flock` is plain integers; all-zero is a valid value.
                let mut fl: libc::flock = unsafe { std::mem::zeroed() };
                let l_type = if exclusive {
                    libc::F_WRLCK
                } else {
                    libc::F_RDLCK
                };
                fl.l_type = l_type as libc::c_short;
                fl.l_whence = libc::SEEK_SET as libc::c_short;
                // l_start = l_len = 0: the whole file. l_pid must be 0 for OFD locks.
                // SAFETY: F_OFD_SETLKW takes a pointer to a `struct flock`, which `fl` is and
                // which outlives the call; the descriptor is kept open by `file`.
                unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLKW, &mut fl) }
            }
        };
        if r == 0 {
            return;
        }
        let e = io::Error::last_os_error();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted, "{family:?} lock: {e}");
    }
}

/// Writes `data` at `offset` in 64 KiB pieces with a pause after each, so that an in-place
/// rewrite is visibly half done for a while (to anyone not honouring the lock): 4 MiB take
/// over 64 ms.
fn write_slowly(file: &File, offset: usize, data: &[u8]) {
    const PIECE: usize = 64 * 1024;
    for (k, piece) in data.chunks(PIECE).enumerate() {
        file.write_all_at(piece, (offset + k * PIECE) as u64)
            .unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Rewrites `path` in place (same inode) as version `v`, under an exclusive lock: open without
/// truncating, lock, write, cut to length, unlock by closing.
fn rewrite_in_place(path: &Path, name: &str, base: usize, v: u64, family: Family) {
    let data = version_bytes(name, v, lines_of(base, v));
    let file = File::options().read(true).write(true).open(path).unwrap();
    lock(&file, family, true);
    write_slowly(&file, 0, &data);
    file.set_len(data.len() as u64).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Helper processes.

const ROLE_ENV: &str = "FLEETSYNC_TEST_LOCK_ROLE";
const DIR_ENV: &str = "FLEETSYNC_TEST_LOCK_DIR";
const CTL_ENV: &str = "FLEETSYNC_TEST_LOCK_CTL";
const FILE_ENV: &str = "FLEETSYNC_TEST_LOCK_FILE";
const FAMILY_ENV: &str = "FLEETSYNC_TEST_LOCK_FAMILY";
const VERSION_ENV: &str = "FLEETSYNC_TEST_LOCK_VERSION";

/// Not a test: the entry point of the helper processes the tests start (this binary run
/// again with `FLEETSYNC_TEST_LOCK_ROLE` set). Without that variable it does nothing.
#[test]
fn helper_process() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    let ctl = PathBuf::from(std::env::var_os(CTL_ENV).unwrap());
    match role.as_str() {
        "writer" => writer(&PathBuf::from(std::env::var_os(DIR_ENV).unwrap()), &ctl),
        "reader" => reader(&PathBuf::from(std::env::var_os(DIR_ENV).unwrap()), &ctl),
        "hold" => hold(&ctl),
        other => panic!("unknown role {other:?}"),
    }
}

fn start_helper(role: &str, envs: &[(&str, &std::ffi::OsStr)]) -> Proc {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "helper_process",
        "--test-threads=1",
        "--nocapture",
    ])
    .env(ROLE_ENV, role)
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Proc(cmd.spawn().unwrap())
}

/// Writes `text` to `path` atomically (temp + rename), so a poller never reads half of it.
fn publish(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// The writer: round after round, rewrites every file in place as the next version (even
/// files under `flock`, odd ones under OFD locks), until `ctl/stop` exists; then publishes the
/// last version in `ctl/writer.final` (every file is at that version). `ctl/writer.progress`
/// holds the last completed version.
fn writer(dir: &Path, ctl: &Path) {
    let mut v = 0;
    while !ctl.join("stop").exists() {
        v += 1;
        for (i, (name, base)) in FILES.iter().enumerate() {
            let family = [Family::Flock, Family::Ofd][i % 2];
            rewrite_in_place(&dir.join(name), name, *base, v, family);
            std::thread::sleep(Duration::from_millis(1));
        }
        publish(&ctl.join("writer.progress"), &v.to_string());
    }
    publish(&ctl.join("writer.final"), &v.to_string());
}

/// What the reader found, published in `ctl/reader.progress` and, at the end,
/// `ctl/reader.final`.
#[derive(Debug, Default)]
struct ReaderReport {
    /// Complete, verified reads.
    reads: u64,
    /// Reads given up because the path was replaced between open and lock (the reader then
    /// opens it again: the usual lock-then-check idiom).
    stale: u64,
    /// Files not there yet.
    absent: u64,
    /// Per file: how many times the version seen changed.
    changes: [u64; FILES.len()],
    violations: Vec<String>,
}

impl ReaderReport {
    fn text(&self) -> String {
        let mut s = format!(
            "reads {}\nstale {}\nabsent {}\n",
            self.reads, self.stale, self.absent
        );
        for (i, (name, _)) in FILES.iter().enumerate() {
            s += &format!("changes {name} {}\n", self.changes[i]);
        }
        for v in &self.violations {
            s += &format!("violation {v}\n");
        }
        s
    }

    fn parse(text: &str) -> ReaderReport {
        let mut r = ReaderReport::default();
        for line in text.lines() {
            let (key, rest) = line.split_once(' ').unwrap();
            match key {
                "reads" => r.reads = rest.parse().unwrap(),
                "stale" => r.stale = rest.parse().unwrap(),
                "absent" => r.absent = rest.parse().unwrap(),
                "changes" => {
                    let (name, n) = rest.split_once(' ').unwrap();
                    let i = FILES.iter().position(|(f, _)| *f == name).unwrap();
                    r.changes[i] = n.parse().unwrap();
                }
                "violation" => r.violations.push(rest.to_owned()),
                other => panic!("bad report line {other:?}"),
            }
        }
        r
    }
}

/// The remote reader: until `ctl/stop-reader` exists, for each file: open it, wait for a shared
/// lock (odd files `flock`, even ones OFD: the other family than the writer's), check that the
/// path still names the file locked (else count it stale and move on), read it whole, check it
/// is one complete version not older than the last one seen, hold the lock 5 ms longer
/// and check that the path was not replaced meanwhile.
fn reader(dir: &Path, ctl: &Path) {
    let mut report = ReaderReport::default();
    let mut last: [Option<u64>; FILES.len()] = [None; FILES.len()];
    let mut expected: [Option<(u64, Vec<u8>)>; FILES.len()] = Default::default();
    let mut buf = Vec::new();
    while !ctl.join("stop-reader").exists() {
        for (i, (name, base)) in FILES.iter().enumerate() {
            let family = [Family::Ofd, Family::Flock][i % 2];
            let path = dir.join(name);
            let mut file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    report.absent += 1;
                    continue;
                }
                Err(e) => panic!("{}: {e}", path.display()),
            };
            lock(&file, family, false);
            let same_file = |file: &File| {
                let (a, b) = (
                    file.metadata().unwrap(),
                    fs::symlink_metadata(&path).unwrap(),
                );
                (a.dev(), a.ino()) == (b.dev(), b.ino())
            };
            if !same_file(&file) {
                report.stale += 1;
                continue;
            }
            buf.clear();
            file.read_to_end(&mut buf).unwrap();
            match check_version_cached(name, *base, &buf, &mut expected[i]) {
                Ok(v) => {
                    report.reads += 1;
                    match last[i] {
                        Some(prev) if v < prev => report
                            .violations
                            .push(format!("{name}: went back from v{prev} to v{v}")),
                        Some(prev) if v != prev => report.changes[i] += 1,
                        _ => {}
                    }
                    last[i] = Some(v);
                }
                Err(e) => report.violations.push(e),
            }
            std::thread::sleep(Duration::from_millis(5));
            if !same_file(&file) {
                report.violations.push(format!(
                    "{name}: replaced while the reader held a shared lock"
                ));
            }
            drop(file);
            publish(&ctl.join("reader.progress"), &report.text());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    publish(&ctl.join("reader.final"), &report.text());
}

/// A lock holder: opens `FILE`, waits for its lock (`FAMILY`), and — when `VERSION` is set —
/// rewrites the first half of the file in place as that version (leaving it torn); creates
/// `ctl/held`; waits for `ctl/release`; finishes the rewrite; unlocks and creates
/// `ctl/released`. Without `VERSION` it takes a shared lock (a reader).
fn hold(ctl: &Path) {
    let path = PathBuf::from(std::env::var_os(FILE_ENV).unwrap());
    let family = Family::parse(&std::env::var(FAMILY_ENV).unwrap());
    let version: Option<u64> = std::env::var(VERSION_ENV).ok().map(|v| v.parse().unwrap());
    let file = File::options()
        .read(true)
        .write(version.is_some())
        .open(&path)
        .unwrap();
    lock(&file, family, version.is_some());
    let data = version.map(|v| {
        let name = path.file_name().unwrap().to_str().unwrap();
        let base = FILES.iter().find(|(f, _)| *f == name).unwrap().1;
        let data = version_bytes(name, v, lines_of(base, v));
        write_slowly(&file, 0, &data[..data.len() / 2]);
        data
    });
    fs::write(ctl.join("held"), "").unwrap();
    wait_for("the release", || ctl.join("release").exists());
    if let Some(data) = data {
        write_slowly(&file, data.len() / 2, &data[data.len() / 2..]);
        file.set_len(data.len() as u64).unwrap();
    }
    drop(file);
    fs::write(ctl.join("released"), "").unwrap();
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for a helper to exit by itself; it must succeed.
fn wait_exit(proc: &mut Proc, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = proc.0.try_wait().unwrap() {
            assert!(status.success(), "{what} failed: {status}");
            return;
        }
        assert!(Instant::now() < deadline, "{what} did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// Syncs.

/// One `fleetsync sync --json ARGS MASTER REMOTE` (embedded); its exit code and the remote's
/// JSON result.
fn sync(home: &Path, master: &Path, remote: &Path, args: &[&str]) -> (i32, Value) {
    let out = fleetsync(home)
        .arg("sync")
        .arg("--json")
        .args(args)
        .arg(master)
        .arg(remote)
        .output()
        .unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "sync {args:?}: {e}; {:?}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let remote = json["remotes"][0].clone();
    (out.status.code().unwrap(), remote)
}

fn failures(result: &Value) -> Vec<(String, String)> {
    result["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_owned(),
                f["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn write_version(dir: &Path, name: &str, v: u64) {
    let base = FILES.iter().find(|(f, _)| *f == name).unwrap().1;
    fs::write(dir.join(name), version_bytes(name, v, lines_of(base, v))).unwrap();
}

fn version_on(dir: &Path, name: &str) -> Result<u64, String> {
    let base = FILES.iter().find(|(f, _)| *f == name).unwrap().1;
    check_version(name, base, &fs::read(dir.join(name)).unwrap())
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn the_version_check_catches_torn_mixed_and_shifted_copies() {
    let (name, base) = FILES[1];
    let v7 = version_bytes(name, 7, lines_of(base, 7));
    let v8 = version_bytes(name, 8, lines_of(base, 8));
    assert_eq!(check_version(name, base, &v7), Ok(7));
    assert_eq!(check_version(name, base, &v8), Ok(8));
    // Torn: cut short, mid-line or at a line boundary.
    assert!(check_version(name, base, &v7[..v7.len() - 10]).is_err());
    assert!(check_version(name, base, &v7[..v7.len() - LINE]).is_err());
    // Mixed: the first half of v8 over v7 (an in-place rewrite caught midway).
    let mut mixed = v7.clone();
    mixed[..LINE * 100].copy_from_slice(&v8[..LINE * 100]);
    let e = check_version(name, base, &mixed).unwrap_err();
    assert!(e.contains("mixed") && e.contains("line 100"), "{e}");
    // v7 with a line of v8 (one line longer) left behind: a shrinking rewrite not yet cut.
    let mut long = v7.clone();
    long.extend_from_slice(&v8[v7.len()..]);
    assert!(check_version(name, base, &long).is_err());
    // One flipped byte in the body, or a line of another file.
    let mut flipped = v7.clone();
    flipped[LINE * 3 + 40] ^= 1;
    assert!(check_version(name, base, &flipped).is_err());
    let other = version_bytes(FILES[0].0, 7, lines_of(base, 7));
    assert!(check_version(name, base, &other).is_err());
}

/// The race: the writer rewrites master files in place while `sync --lock` copies them and a
/// reader reads the remote copies under shared locks.
#[test]
fn concurrent_writer_and_reader_never_see_a_torn_copy_and_the_last_version_wins() {
    /// Syncs that must have sent files while the writer was writing.
    const MIN_SYNCS_WITH_SENDS: usize = 12;
    /// Versions the writer must have written meanwhile.
    const MIN_VERSIONS: u64 = 12;
    /// Verified reads the remote reader must have made.
    const MIN_READS: u64 = 100;

    let tmp = tempfile::tempdir().unwrap();
    let (master, remote, ctl, home) = (
        tmp.path().join("m"),
        tmp.path().join("r"),
        tmp.path().join("ctl"),
        tmp.path().join("home"),
    );
    for d in [&master, &remote, &ctl] {
        fs::create_dir_all(d).unwrap();
    }
    for (name, _) in FILES {
        write_version(&master, name, 0);
    }
    let lock_args = ["--lock", "--lock-timeout", "10"];
    let mut reader = start_helper(
        "reader",
        &[(DIR_ENV, remote.as_os_str()), (CTL_ENV, ctl.as_os_str())],
    );
    let mut writer = start_helper(
        "writer",
        &[(DIR_ENV, master.as_os_str()), (CTL_ENV, ctl.as_os_str())],
    );

    let reads = || {
        fs::read_to_string(ctl.join("reader.progress"))
            .map(|t| ReaderReport::parse(&t).reads)
            .unwrap_or(0)
    };
    let versions = || -> u64 {
        fs::read_to_string(ctl.join("writer.progress"))
            .map(|t| t.parse().unwrap())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let (mut syncs, mut with_sends, mut sent) = (0, 0, 0);
    while with_sends < MIN_SYNCS_WITH_SENDS || reads() < MIN_READS || versions() < MIN_VERSIONS {
        assert!(
            Instant::now() < deadline,
            "too slow: {with_sends} syncs sent files, {} reads, {} versions",
            reads(),
            versions()
        );
        let (code, result) = sync(&home, &master, &remote, &lock_args);
        // Nothing may fail: the locks are only ever held briefly, and what is read under the
        // shared lock is one version (a mixed read would still arrive intact, so the sync
        // itself could not tell).
        assert_eq!((code, failures(&result)), (0, vec![]), "{result}");
        syncs += 1;
        let n = result["transferred"].as_u64().unwrap();
        sent += n;
        with_sends += usize::from(n > 0);
        assert!(writer.alive(), "the writer stopped early");
    }
    eprintln!(
        "{syncs} syncs ({with_sends} sending, {sent} files) while the writer made {} versions \
         and the reader {} reads",
        versions(),
        reads()
    );

    // The writer stops (after a complete round); one more sync, the reader still reading.
    fs::write(ctl.join("stop"), "").unwrap();
    wait_exit(&mut writer, "the writer");
    let last: u64 = fs::read_to_string(ctl.join("writer.final"))
        .unwrap()
        .parse()
        .unwrap();
    let (code, result) = sync(&home, &master, &remote, &lock_args);
    assert_eq!((code, failures(&result)), (0, vec![]), "{result}");
    assert_eq!(rsync_diff(&master, &remote), "");
    for (name, _) in FILES {
        assert_eq!(version_on(&master, name), Ok(last), "master {name}");
        assert_eq!(version_on(&remote, name), Ok(last), "remote {name}");
    }

    fs::write(ctl.join("stop-reader"), "").unwrap();
    wait_exit(&mut reader, "the reader");
    let report = ReaderReport::parse(&fs::read_to_string(ctl.join("reader.final")).unwrap());
    eprintln!("reader: {report:?}");
    assert_eq!(report.violations, Vec::<String>::new());
    assert!(report.reads >= MIN_READS, "{report:?}");
    // The remote copies changed under the reader, the multi-chunk one included.
    let big = FILES.iter().position(|(f, _)| *f == "big.bin").unwrap();
    assert!(report.changes[big] >= 2, "{report:?}");
    assert!(last >= 2, "the writer made only {last} versions");
}

/// Holds a lock on `file` in a helper process until [`Held::release`]; with `version`, an
/// exclusive lock and the file half rewritten as that version.
struct Held {
    proc: Proc,
    ctl: PathBuf,
}

impl Held {
    fn start(ctl: &Path, file: &Path, family: Family, version: Option<u64>) -> Held {
        fs::create_dir_all(ctl).unwrap();
        let v = version.map(|v| v.to_string());
        let mut envs = vec![
            (CTL_ENV, ctl.as_os_str()),
            (FILE_ENV, file.as_os_str()),
            (FAMILY_ENV, family.name().as_ref()),
        ];
        if let Some(v) = &v {
            envs.push((VERSION_ENV, v.as_ref()));
        }
        let proc = start_helper("hold", &envs);
        wait_for("the lock holder", || ctl.join("held").exists());
        Held {
            proc,
            ctl: ctl.to_owned(),
        }
    }

    fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    fn release(mut self) {
        fs::write(self.ctl.join("release"), "").unwrap();
        wait_exit(&mut self.proc, "the lock holder");
        assert!(self.ctl.join("released").exists());
    }
}

/// The one failure of a sync that could not lock `name`; it must name `pid`.
fn assert_lock_failure(code: i32, result: &Value, name: &str, pid: u32) {
    assert_eq!(code, 1, "{result}");
    let f = failures(result);
    assert_eq!(f.len(), 1, "{result}");
    let (path, message) = &f[0];
    assert_eq!(path, name);
    assert!(
        message.contains("lock") && message.contains(&format!("pid {pid} ")),
        "{message}"
    );
}

#[test]
fn a_writer_holding_its_lock_past_the_timeout_fails_the_file_naming_it_and_the_remote_keeps_the_old_version(
) {
    for family in [Family::Ofd, Family::Flock] {
        let tmp = tempfile::tempdir().unwrap();
        let (master, remote, home) = (
            tmp.path().join("m"),
            tmp.path().join("r"),
            tmp.path().join("home"),
        );
        fs::create_dir_all(&master).unwrap();
        fs::create_dir_all(&remote).unwrap();
        for (name, _) in FILES {
            write_version(&master, name, 1);
        }
        let (code, result) = sync(&home, &master, &remote, &[]);
        assert_eq!(code, 0, "{result}");
        let old = fs::read(remote.join("big.bin")).unwrap();

        // The writer is midway through rewriting big.bin as v2; tiny.conf is at v2 already.
        write_version(&master, "tiny.conf", 2);
        let writer = Held::start(
            &tmp.path().join("ctl"),
            &master.join("big.bin"),
            family,
            Some(2),
        );
        let torn = version_on(&master, "big.bin").unwrap_err();
        assert!(torn.contains("mixed"), "{torn}");
        let (code, result) = sync(&home, &master, &remote, &["--lock", "--lock-timeout", "1"]);
        assert_lock_failure(code, &result, "big.bin", writer.pid());
        assert_eq!(fs::read(remote.join("big.bin")).unwrap(), old, "{family:?}");
        assert_eq!(version_on(&remote, "tiny.conf"), Ok(2));

        writer.release();
        let (code, result) = sync(&home, &master, &remote, &["--lock", "--lock-timeout", "1"]);
        assert_eq!(code, 0, "{result}");
        assert_eq!(rsync_diff(&master, &remote), "");
        assert_eq!(version_on(&remote, "big.bin"), Ok(2));
    }
}

#[test]
fn a_remote_reader_holding_its_lock_past_the_timeout_keeps_its_version_and_is_named() {
    for family in [Family::Ofd, Family::Flock] {
        let tmp = tempfile::tempdir().unwrap();
        let (master, remote, home) = (
            tmp.path().join("m"),
            tmp.path().join("r"),
            tmp.path().join("home"),
        );
        fs::create_dir_all(&master).unwrap();
        fs::create_dir_all(&remote).unwrap();
        for (name, _) in FILES {
            write_version(&master, name, 1);
            write_version(&remote, name, 0);
        }
        let reader = Held::start(
            &tmp.path().join("ctl"),
            &remote.join("one.bin"),
            family,
            None,
        );
        let (code, result) = sync(&home, &master, &remote, &["--lock", "--lock-timeout", "1"]);
        assert_lock_failure(code, &result, "one.bin", reader.pid());
        assert_eq!(version_on(&remote, "one.bin"), Ok(0), "{family:?}");
        assert_eq!(version_on(&remote, "big.bin"), Ok(1));

        reader.release();
        let (code, result) = sync(&home, &master, &remote, &["--lock", "--lock-timeout", "1"]);
        assert_eq!(code, 0, "{result}");
        assert_eq!(rsync_diff(&master, &remote), "");
    }
}
