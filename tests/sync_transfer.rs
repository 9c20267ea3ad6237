//! End-to-end: how file data travels (issue 11), as a user runs it, with real processes on
//! 127.0.0.1. Deltas of edited files, deltas and copies against a renamed predecessor,
//! patches against the versions the master agent kept (one patch for three remotes), a
//! stream corrupted in transit (whole, zstd, delta, patch), a transfer cut by SIGKILL or by
//! a dropped link and resumed, deltas in `--blocks` syncs, bandwidth limits, bad flag values.
//!
//! Every sync ends with the rsync referee (`rsync -aHc -n -i --delete master/ remote/`
//! prints nothing). Byte counts are checked against references outside fleetsync where
//! there is one: the zstd CLI (`zstd -3`, `zstd -3 --long=27 --patch-from=OLD`) and the
//! bytes a proxy saw cross the connection.
//!
//! The test data is deterministic (xorshift with fixed seeds) and shaped like a release:
//! text-like files (log and source lines over a vocabulary) and binary-like files (code with
//! a skewed opcode distribution, tables of increasing integers, a string table, a compressed
//! section), edited in a few places and appended to, as an upgrade does.
//!
//! The tests take one lock each and so run one at a time: the timing checks (bandwidth
//! limits, the kill moment) must not share the two cores with another test's transfers.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use support::proxy::CorruptingProxy;
use support::{fleetsync, listening, rsync_diff, scratch_home, write_with_mtime, Proc, Rng, Token};

const MIB: usize = 1 << 20;
const OLD_MTIME: u64 = 1_700_000_000;
const NEW_MTIME: u64 = 1_700_086_400;

static SERIAL: Mutex<()> = Mutex::new(());

/// One test at a time (see the crate doc).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// Test data

/// Words for the text-like files, made once from a fixed seed.
fn vocabulary() -> Vec<String> {
    let mut rng = Rng(0x05ee_d0f7_e57f);
    (0..600)
        .map(|_| {
            let len = 2 + rng.below(9) as usize;
            (0..len)
                .map(|_| (b'a' + rng.below(26) as u8) as char)
                .collect()
        })
        .collect()
}

/// `size` bytes of text: log-like and source-like lines over a vocabulary, with numbers
/// (zstd -3 makes about a third of it).
fn text_like(seed: u64, size: usize) -> Vec<u8> {
    let words = vocabulary();
    let mut rng = Rng(seed | 1);
    let mut out = Vec::with_capacity(size + 200);
    let mut line = 0u64;
    while out.len() < size {
        line += 1;
        match rng.below(3) {
            0 => out.extend_from_slice(
                format!(
                    "2026-11-{:02}T{:02}:{:02}:{:02}Z INFO ",
                    1 + rng.below(28),
                    rng.below(24),
                    rng.below(60),
                    rng.below(60)
                )
                .as_bytes(),
            ),
            1 => out.extend_from_slice(&b"        "[..4 * (1 + rng.below(2) as usize)]),
            _ => out.extend_from_slice(format!("{line:6}: ").as_bytes()),
        }
        for w in 0..3 + rng.below(10) {
            if w > 0 {
                out.push(b' ');
            }
            // Zipf-like: the first words far more often.
            let i = (rng.below(600) * rng.below(600) / 600) as usize;
            out.extend_from_slice(words[i].as_bytes());
            if rng.below(8) == 0 {
                out.extend_from_slice(format!("={}", rng.below(100_000)).as_bytes());
            }
        }
        out.push(b'\n');
    }
    out.truncate(size);
    out
}

/// `size` bytes shaped like a shared library: a header, code (a skewed set of instruction
/// patterns with random operands), tables of increasing 32-bit integers, a string table,
/// and a quarter of already-compressed (random) data.
fn binary_like(seed: u64, size: usize) -> Vec<u8> {
    let words = vocabulary();
    let mut rng = Rng(seed | 1);
    let mut out = Vec::with_capacity(size + 64);
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    const OPS: [&[u8]; 8] = [
        b"\x48\x89\xe5",
        b"\x48\x83\xec",
        b"\xe8",
        b"\x48\x8b\x45",
        b"\x89\x45",
        b"\xc3",
        b"\x0f\x1f\x44\x00\x00",
        b"\x48\x8d\x3d",
    ];
    let mut table = 0u32;
    while out.len() < size {
        let section = rng.below(16);
        let len = 4096 + rng.below(60_000) as usize;
        let end = (out.len() + len).min(size);
        match section {
            0..=6 => {
                while out.len() < end {
                    let op = OPS[(rng.below(8) * rng.below(8) / 8) as usize];
                    out.extend_from_slice(op);
                    let operand = rng.next();
                    out.extend_from_slice(&operand.to_le_bytes()[..rng.below(5) as usize]);
                }
            }
            7..=9 => {
                while out.len() < end {
                    table = table.wrapping_add(1 + rng.below(64) as u32);
                    out.extend_from_slice(&table.to_le_bytes());
                    out.extend_from_slice(&(rng.below(16) as u32).to_le_bytes());
                }
            }
            10..=11 => {
                while out.len() < end {
                    let w = &words[rng.below(600) as usize];
                    out.extend_from_slice(b"_ZN");
                    out.extend_from_slice(w.as_bytes());
                    out.extend_from_slice(format!("{}", rng.below(100)).as_bytes());
                    out.push(0);
                }
            }
            _ => {
                while out.len() < end {
                    out.extend_from_slice(&rng.next().to_le_bytes());
                }
            }
        }
    }
    out.truncate(size);
    out
}

/// `size` incompressible bytes.
fn random_bytes(seed: u64, size: usize) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(size);
    out
}

/// An upgrade of `old`: `edits` small changes at spread-out places (some overwrite, some
/// insert, some delete, so that later offsets shift), then `append` appended (new text).
fn edited(old: &[u8], seed: u64, edits: usize, append: usize) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut at: Vec<usize> = (0..edits)
        .map(|_| rng.below(old.len() as u64) as usize)
        .collect();
    at.sort_unstable();
    let mut out = Vec::with_capacity(old.len() + append + edits * 64);
    let mut pos = 0;
    for a in at {
        if a < pos {
            continue;
        }
        out.extend_from_slice(&old[pos..a]);
        let n = 8 + rng.below(120) as usize;
        pos = a;
        match rng.below(3) {
            // Overwrite n bytes.
            0 => {
                out.extend(std::iter::repeat_with(|| rng.next() as u8).take(n));
                pos = (a + n).min(old.len());
            }
            // Insert n bytes.
            1 => out.extend(std::iter::repeat_with(|| rng.next() as u8).take(n)),
            // Delete n bytes.
            _ => pos = (a + n).min(old.len()),
        }
    }
    out.extend_from_slice(&old[pos..]);
    out.extend_from_slice(&text_like(seed ^ 0xa99e, append));
    out
}

// ---------------------------------------------------------------------------------------
// Running syncs

/// A master and some remote directories under one temporary directory.
struct Trees {
    tmp: tempfile::TempDir,
    master: PathBuf,
    remotes: Vec<PathBuf>,
}

impl Trees {
    fn new(n: usize) -> Trees {
        let tmp = tempfile::tempdir().unwrap();
        let master = tmp.path().join("master");
        fs::create_dir(&master).unwrap();
        let remotes = (0..n)
            .map(|i| {
                let r = tmp.path().join(format!("remote{i}"));
                fs::create_dir(&r).unwrap();
                r
            })
            .collect();
        Trees {
            tmp,
            master,
            remotes,
        }
    }

    /// A directory beside the trees (outside all of them).
    fn aside(&self, name: &str) -> PathBuf {
        let d = self.tmp.path().join(name);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn assert_in_sync(&self) {
        for r in &self.remotes {
            let d = rsync_diff(&self.master, r);
            assert!(
                d.is_empty(),
                "{} differs from the master:\n{d}",
                r.display()
            );
        }
    }
}

/// What one sync printed and how long it took.
struct Run {
    out: Output,
    json: serde_json::Value,
    elapsed: Duration,
}

impl Run {
    fn code(&self) -> Option<i32> {
        self.out.status.code()
    }

    fn assert_ok(&self) {
        assert_eq!(self.code(), Some(0), "the sync failed: {}", self.json);
    }

    fn remote(&self, i: usize) -> &serde_json::Value {
        &self.json["remotes"][i]
    }

    /// File bytes sent to remote `i`.
    fn bytes(&self, i: usize) -> u64 {
        self.remote(i)["bytes"].as_u64().unwrap()
    }

    /// The index of the remote labelled `label` (its address or directory).
    fn index_of(&self, label: &str) -> usize {
        self.json["remotes"]
            .as_array()
            .unwrap()
            .iter()
            .position(|r| r["remote"] == label)
            .unwrap_or_else(|| panic!("no remote {label} in {}", self.json))
    }

    /// Bytes of file data on the wire to remote `i`.
    fn wire(&self, i: usize) -> u64 {
        self.remote(i)["wire_bytes"].as_u64().unwrap()
    }
}

/// Runs `cmd` (a `fleetsync sync --json ...`) to its end; logs and parses its output.
fn run(what: &str, mut cmd: Command) -> Run {
    let t = Instant::now();
    let out = cmd.output().unwrap();
    let elapsed = t.elapsed();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    eprintln!(
        "{what}: {:?} in {elapsed:.2?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Run { out, json, elapsed }
}

/// `fleetsync sync --json --no-fsync EXTRA... MASTER REMOTES...` (embedded mode).
fn sync_embedded(t: &Trees, extra: &[&str]) -> Run {
    let remotes: Vec<&Path> = t.remotes.iter().map(PathBuf::as_path).collect();
    sync_dirs(&t.master, &remotes, extra)
}

/// [`sync_embedded`] of `master` to `remotes`.
fn sync_dirs(master: &Path, remotes: &[&Path], extra: &[&str]) -> Run {
    let mut cmd = fleetsync(scratch_home());
    cmd.args(["sync", "--json", "--no-fsync"])
        .args(extra)
        .arg(master)
        .args(remotes);
    run(&format!("embedded sync {extra:?}"), cmd)
}

/// A server and agents as processes (`--server` mode).
struct Fleet {
    token: Token,
    server: String,
    _server: Proc,
}

impl Fleet {
    fn new() -> Fleet {
        let token = Token::new();
        let (proc, server) = token.server();
        Fleet {
            token,
            server,
            _server: proc,
        }
    }

    /// `fleetsync agent --root ROOT --no-fsync EXTRA...`; its log goes to `log` if given.
    fn agent(&self, root: &Path, extra: &[&str], log: Option<&Path>) -> (Proc, String) {
        let mut cmd = self.token.agent_command(root);
        cmd.arg("--no-fsync").args(extra);
        match log {
            Some(f) => cmd.stderr(fs::File::create(f).unwrap()),
            None => cmd.stderr(Stdio::inherit()),
        };
        listening(&mut cmd)
    }

    fn sync_command(&self, master: &str, remotes: &[&str], extra: &[&str]) -> Command {
        let mut cmd = self.token.sync_command(&self.server, master, remotes);
        cmd.arg("--json").args(extra);
        cmd
    }

    /// `fleetsync sync --server S --master M --delete --json EXTRA... REMOTES...`.
    fn sync(&self, master: &str, remotes: &[&str], extra: &[&str]) -> Run {
        run(
            &format!("server sync {extra:?}"),
            self.sync_command(master, remotes, extra),
        )
    }
}

/// Size of `zstd ARGS... -c FILE` (the zstd CLI as the reference).
fn zstd_size(args: &[&str], file: &Path) -> u64 {
    let out = Command::new("zstd")
        .args(args)
        .args(["-q", "-c"])
        .arg(file)
        .output()
        .expect("the zstd CLI must be installed");
    assert!(out.status.success(), "zstd {args:?} failed: {out:?}");
    out.stdout.len() as u64
}

/// Entries anywhere under `root` whose names start with `.fleetsync.` (temp and partial
/// files).
fn leftovers(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_name().to_string_lossy().starts_with(".fleetsync.") {
                found.push(e.path());
            }
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            }
        }
    }
    found
}

/// Size of the biggest `.fleetsync.*` file under `root` (the transfer in flight).
fn in_flight(root: &Path) -> u64 {
    leftovers(root)
        .iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

fn percent(part: u64, whole: u64) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

// ---------------------------------------------------------------------------------------
// 1. Deltas of edited files

/// The old release of test 1: a binary-like and a text-like file.
fn old_pair() -> [(&'static str, Vec<u8>); 2] {
    [
        ("lib/libengine.so", binary_like(11, 6 * MIB)),
        ("share/doc/history.log", text_like(12, 2 * MIB)),
    ]
}

#[test]
fn delta_of_an_edited_file() {
    let _serial = serial();
    let old = old_pair();
    let make = |t: &Trees| {
        for (p, data) in &old {
            write_with_mtime(
                &t.master.join(p),
                &edited(data, 13, 6, 64 * 1024),
                NEW_MTIME,
            );
            write_with_mtime(&t.remotes[0].join(p), data, OLD_MTIME);
        }
    };

    let t = Trees::new(1);
    make(&t);
    let delta = sync_embedded(&t, &[]);
    delta.assert_ok();
    t.assert_in_sync();
    let (bytes, wire) = (delta.bytes(0), delta.wire(0));
    let master_bytes: u64 = old
        .iter()
        .map(|(p, _)| fs::metadata(t.master.join(p)).unwrap().len())
        .sum();
    assert_eq!(bytes, master_bytes, "bytes counts the files' bytes");
    eprintln!(
        "delta: {bytes} bytes, {wire} on the wire ({:.2}%)",
        percent(wire, bytes)
    );
    assert!(wire > 0, "the appended and edited bytes must travel");
    assert!(
        wire * 10 <= bytes,
        "delta: {wire} bytes on the wire for {bytes} file bytes (> 10%)"
    );

    // The same update sent whole and compressed: about what zstd -3 makes of the files.
    let t = Trees::new(1);
    make(&t);
    let whole = sync_embedded(&t, &["--no-delta", "--compress", "zstd:3"]);
    whole.assert_ok();
    t.assert_in_sync();
    let reference: u64 = old
        .iter()
        .map(|(p, _)| zstd_size(&["-3"], &t.master.join(p)))
        .sum();
    let whole_wire = whole.wire(0);
    eprintln!(
        "--no-delta --compress zstd:3: {} bytes, {whole_wire} on the wire; zstd -3 CLI: \
         {reference}; delta: {wire}",
        whole.bytes(0)
    );
    assert_eq!(whole.bytes(0), bytes);
    assert!(
        whole_wire as f64 >= 0.8 * reference as f64 && whole_wire as f64 <= 1.25 * reference as f64,
        "--no-delta: {whole_wire} bytes on the wire, zstd -3 makes {reference}"
    );
    assert!(
        whole_wire > 5 * wire,
        "--no-delta ({whole_wire}) must cost far more than the delta ({wire})"
    );

    // With --compress zstd the delta's literals (mostly the appended text) are compressed;
    // the summary line a user reads says what --json says.
    let t = Trees::new(1);
    make(&t);
    let mut cmd = fleetsync(scratch_home());
    cmd.args(["sync", "--no-fsync", "--compress", "zstd"])
        .arg(&t.master)
        .arg(&t.remotes[0]);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("sync --compress zstd: {:?}\n{err}", out.status);
    assert_eq!(out.status.code(), Some(0));
    t.assert_in_sync();
    let (b, w) = summary_counts(&err).unwrap_or_else(|| panic!("no summary line in {err:?}"));
    eprintln!("delta with --compress zstd: {b} bytes, {w} on the wire; uncompressed delta: {wire}");
    assert_eq!(b, bytes, "the summary line's bytes");
    assert!(
        w > 0 && w < wire * 3 / 4,
        "compressed literals: {w} bytes vs {wire} raw"
    );
}

/// The counts in a summary line `LABEL: sent N files (B bytes, W on the wire), ...`.
fn summary_counts(stderr: &str) -> Option<(u64, u64)> {
    let line = stderr.lines().find(|l| l.contains(" on the wire)"))?;
    let inner = line.split_once(" files (")?.1;
    let (b, rest) = inner.split_once(" bytes, ")?;
    let w = rest.split_once(" on the wire")?.0;
    Some((b.parse().ok()?, w.parse().ok()?))
}

// ---------------------------------------------------------------------------------------
// 2. and 3. A renamed file is deltaed against, or copied from, its predecessor

#[test]
fn renamed_versioned_file_uses_its_predecessor() {
    let _serial = serial();
    let t = Trees::new(1);
    let (m, r) = (&t.master, &t.remotes[0]);
    let old = binary_like(21, 5 * MIB);
    let new = edited(&old, 22, 5, 32 * 1024);
    write_with_mtime(&r.join("lib/libfoo-ab12cd34.so.3.26"), &old, OLD_MTIME);
    write_with_mtime(&m.join("lib/libfoo-9f8e7d6c.so.3.27"), &new, NEW_MTIME);
    // The rest of the tree is the same on both sides.
    for (p, data) in [
        ("bin/foo", binary_like(23, 300 * 1024)),
        ("share/foo/README", text_like(24, 20 * 1024)),
    ] {
        write_with_mtime(&m.join(p), &data, OLD_MTIME);
        write_with_mtime(&r.join(p), &data, OLD_MTIME);
    }

    let s = sync_embedded(&t, &["--delete"]);
    s.assert_ok();
    t.assert_in_sync();
    assert!(
        !r.join("lib/libfoo-ab12cd34.so.3.26").exists(),
        "old name stays"
    );
    assert_eq!(
        fs::read(r.join("lib/libfoo-9f8e7d6c.so.3.27")).unwrap(),
        new
    );
    let (bytes, wire) = (s.bytes(0), s.wire(0));
    eprintln!(
        "renamed and edited: {bytes} bytes, {wire} on the wire ({:.2}%)",
        percent(wire, bytes)
    );
    assert_eq!(bytes, new.len() as u64, "only the new library is sent");
    assert!(
        wire * 10 <= bytes,
        "{wire} bytes on the wire for a renamed, lightly edited {bytes}-byte file"
    );
}

#[test]
fn renamed_identical_file_is_copied() {
    let _serial = serial();
    let t = Trees::new(1);
    let (m, r) = (&t.master, &t.remotes[0]);
    let font = binary_like(31, 3 * MIB);
    let table = text_like(32, MIB + 4321);
    write_with_mtime(&r.join("share/fonts/Sans-2.37.ttf"), &font, OLD_MTIME);
    write_with_mtime(&m.join("share/fonts/Sans-2.38.ttf"), &font, NEW_MTIME);
    // One with an unrelated name: the same content is found by size and checksum.
    write_with_mtime(&r.join("data/table-old.csv"), &table, OLD_MTIME);
    write_with_mtime(&m.join("share/tables/words.csv"), &table, NEW_MTIME);

    // With a collision-resistant checksum the copy is trusted: nothing travels.
    let s = sync_embedded(&t, &["--delete", "-a", "blake3"]);
    s.assert_ok();
    t.assert_in_sync();
    assert!(!r.join("share/fonts/Sans-2.37.ttf").exists());
    assert!(!r.join("data/table-old.csv").exists());
    eprintln!(
        "renamed, identical (blake3): {} bytes, {} on the wire, {} files",
        s.bytes(0),
        s.wire(0),
        s.remote(0)["transferred"]
    );
    assert_eq!(s.bytes(0), (font.len() + table.len()) as u64);
    assert_eq!(
        s.wire(0),
        0,
        "identical content already on the remote travels for nothing"
    );

    // With the default CRC-32 a same-checksum file is not proof of the same content: it
    // goes as a delta against it (a few bytes), which the checksum verifies.
    let t = Trees::new(1);
    let (m, r) = (&t.master, &t.remotes[0]);
    write_with_mtime(&r.join("share/fonts/Sans-2.37.ttf"), &font, OLD_MTIME);
    write_with_mtime(&m.join("share/fonts/Sans-2.38.ttf"), &font, NEW_MTIME);
    let s = sync_embedded(&t, &["--delete"]);
    s.assert_ok();
    t.assert_in_sync();
    eprintln!("renamed, identical (crc32): {} on the wire", s.wire(0));
    assert!(
        s.wire(0) * 100 <= font.len() as u64,
        "{} on the wire for {} identical bytes",
        s.wire(0),
        font.len()
    );
}

/// CRC-32 (IEEE 802.3, zlib's) register update, bit by bit: the reference the collision below
/// is built with.
fn crc32_update(mut s: u32, data: &[u8]) -> u32 {
    for &b in data {
        s ^= b as u32;
        for _ in 0..8 {
            s = if s & 1 != 0 {
                (s >> 1) ^ 0xedb8_8320
            } else {
                s >> 1
            };
        }
    }
    s
}

/// `data` with its last 4 bytes replaced so that its CRC-32 is `target`. CRC-32 is affine
/// over GF(2) in those 32 bits: solve for them by Gaussian elimination.
fn force_crc32(data: &mut [u8], target: u32) {
    let n = data.len() - 4;
    let state = crc32_update(0xffff_ffff, &data[..n]);
    let crc_of = |x: u32| crc32_update(state, &x.to_le_bytes()) ^ 0xffff_ffff;
    let base = crc_of(0);
    // Row i: the CRC bits bit i of the 4 bytes flips, with the bit itself marked at 32 + i.
    let mut rows: Vec<u64> = (0..32)
        .map(|i| (crc_of(1 << i) ^ base) as u64 | 1 << (32 + i))
        .collect();
    let mut want = (target ^ base) as u64;
    let mut x = 0u32;
    for bit in 0..32 {
        let p = (bit..32)
            .find(|&r| rows[r] >> bit & 1 == 1)
            .expect("CRC-32 reaches every value through 4 bytes");
        rows.swap(bit, p);
        for r in 0..32 {
            if r != bit && rows[r] >> bit & 1 == 1 {
                rows[r] ^= rows[bit];
            }
        }
    }
    for (bit, row) in rows.iter().enumerate() {
        if want >> bit & 1 == 1 {
            x ^= (row >> 32) as u32;
            want ^= row & 0xffff_ffff;
        }
    }
    assert_eq!(want, 0);
    data[n..].copy_from_slice(&x.to_le_bytes());
    assert_eq!(crc32_update(0xffff_ffff, data) ^ 0xffff_ffff, target);
}

/// `fleetsync sum -a ALG FILE` (its digest).
fn digest_of(alg: &str, file: &Path) -> String {
    let out = fleetsync(scratch_home())
        .args(["sum", "-a", alg])
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "fleetsync sum: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn renamed_file_with_the_same_crc32_but_other_content_is_not_copied() {
    let _serial = serial();
    let t = Trees::new(1);
    let (m, r) = (&t.master, &t.remotes[0]);
    let old = binary_like(35, MIB);
    let mut new = old.clone();
    new[1000..2000].copy_from_slice(&text_like(36, 1000));
    let crc = crc32_update(0xffff_ffff, &old) ^ 0xffff_ffff;
    force_crc32(&mut new, crc);
    assert_ne!(new, old);
    write_with_mtime(&r.join("share/fonts/Sans-2.37.ttf"), &old, OLD_MTIME);
    write_with_mtime(&m.join("share/fonts/Sans-2.38.ttf"), &new, NEW_MTIME);
    // The tool agrees: same size, same CRC-32, different content.
    assert_eq!(
        digest_of("crc32", &r.join("share/fonts/Sans-2.37.ttf")),
        digest_of("crc32", &m.join("share/fonts/Sans-2.38.ttf"))
    );

    let s = sync_embedded(&t, &["--delete"]);
    s.assert_ok();
    eprintln!("same CRC-32, other content: {} on the wire", s.wire(0));
    assert_eq!(
        fs::read(r.join("share/fonts/Sans-2.38.ttf")).unwrap(),
        new,
        "the remote got its old file's content under the new name"
    );
    t.assert_in_sync();
}

// ---------------------------------------------------------------------------------------
// 4. Patches against the versions the master agent kept

/// A small release: (path, content) of version 0 (old) or 1 (the upgrade).
fn release(version: u64) -> Vec<(String, Vec<u8>)> {
    let lib = |v: u64| match v {
        0 => "lib/libcore-ab12cd34.so.3.26",
        _ => "lib/libcore-9f8e7d6c.so.3.27",
    };
    let old = vec![
        ("bin/fleetd".to_owned(), binary_like(41, 2 * MIB)),
        (lib(0).to_owned(), binary_like(42, 3 * MIB)),
        ("share/doc/CHANGELOG".to_owned(), text_like(43, MIB)),
        ("share/data/tables.dat".to_owned(), binary_like(44, 2 * MIB)),
        ("etc/fleetd.toml".to_owned(), text_like(45, 3000)),
    ];
    if version == 0 {
        return old;
    }
    old.into_iter()
        .map(|(p, data)| match p.as_str() {
            "bin/fleetd" => (p, edited(&data, 51, 8, 16 * 1024)),
            "share/doc/CHANGELOG" => (p, edited(&data, 52, 0, 40 * 1024)),
            "etc/fleetd.toml" => (p, edited(&data, 53, 2, 100)),
            "share/data/tables.dat" => (p, data),
            _ => (lib(1).to_owned(), edited(&data, 54, 6, 8 * 1024)),
        })
        .collect()
}

#[test]
fn kept_versions_patch_in_server_mode() {
    let _serial = serial();
    let t = Trees::new(3);
    let old = release(0);
    for (p, data) in &old {
        write_with_mtime(&t.master.join(p), data, OLD_MTIME);
    }
    let versions = t.aside("versions");
    let fleet = Fleet::new();
    let versions_arg = versions.to_str().unwrap();
    let (_master, master) = fleet.agent(
        &t.master,
        &["--keep-versions", "64MiB", "--versions-dir", versions_arg],
        None,
    );
    let remotes: Vec<(Proc, String)> = t
        .remotes
        .iter()
        .map(|r| fleet.agent(r, &[], None))
        .collect();
    let addrs: Vec<&str> = remotes.iter().map(|(_, a)| a.as_str()).collect();

    let first = fleet.sync(&master, &addrs, &[]);
    first.assert_ok();
    t.assert_in_sync();
    let kept: u64 = walk_files(&versions)
        .iter()
        .map(|f| fs::metadata(f).unwrap().len())
        .sum();
    eprintln!("after the first sync the master keeps {kept} bytes of versions");
    assert!(
        kept > 0,
        "--keep-versions kept nothing in {}",
        versions.display()
    );

    // The installer upgrades the master tree in place.
    let old_dir = t.aside("old-release");
    for (p, data) in &old {
        write_with_mtime(&old_dir.join(p.replace('/', "_")), data, OLD_MTIME);
        fs::remove_file(t.master.join(p)).unwrap();
    }
    let new = release(1);
    for (p, data) in &new {
        write_with_mtime(&t.master.join(p), data, NEW_MTIME);
    }

    let second = fleet.sync(&master, &addrs, &[]);
    second.assert_ok();
    t.assert_in_sync();

    // The reference: what `zstd -3 --long=27 --patch-from=OLD NEW` makes of each changed file
    // whose predecessor (same path, or the renamed library) the remotes hold.
    let mut reference = 0;
    let mut changed_bytes = 0;
    for ((op, od), (np, nd)) in old.iter().zip(&new) {
        if od == nd {
            continue;
        }
        changed_bytes += nd.len() as u64;
        let old_file = old_dir.join(op.replace('/', "_"));
        reference += if nd.len() < 64 * 1024 {
            zstd_size(&["-3"], &t.master.join(np))
        } else {
            let patch_from = format!("--patch-from={}", old_file.display());
            zstd_size(&["-3", "--long=27", &patch_from], &t.master.join(np))
        };
    }
    let wires: Vec<u64> = (0..3).map(|i| second.wire(i)).collect();
    for i in 0..3 {
        let (bytes, wire) = (second.bytes(i), second.wire(i));
        eprintln!(
            "remote {i}: {bytes} bytes, {wire} on the wire ({:.2}%); zstd --patch-from \
             reference {reference}",
            percent(wire, bytes)
        );
        assert_eq!(bytes, changed_bytes, "remote {i}: the changed files' bytes");
        assert!(
            wire * 10 <= bytes,
            "remote {i}: {wire} bytes on the wire for {bytes} (> 10%)"
        );
    }
    assert!(
        wires.iter().all(|&w| w == wires[0]),
        "one delta, many remotes: the same bytes to each, got {wires:?}"
    );
    assert!(
        wires[0] as f64 <= 1.5 * reference as f64 + 8192.0,
        "patches against kept versions: {} bytes on the wire, zstd --patch-from makes {reference}",
        wires[0]
    );
}

/// Regular files under `dir`, recursively.
fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                todo.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// 5. A stream corrupted in transit

/// The master's log says it sent a file again whole.
fn logged_resend(log: &Path) -> bool {
    fs::read_to_string(log)
        .unwrap_or_default()
        .contains("sending it again whole")
}

#[test]
fn corrupted_stream_is_detected_and_resent_whole() {
    let _serial = serial();
    // Whole: a 4 MiB file the remote lacks, uncompressed and zstd-compressed; the byte at
    // 1 MiB + 777 of the stream is inside its data (the compressed file is about 2.4 MiB).
    for compress in ["off", "zstd"] {
        let t = Trees::new(1);
        let data = binary_like(61, 4 * MIB);
        write_with_mtime(&t.master.join("lib/libwhole.so"), &data, NEW_MTIME);
        let log = t.aside("logs").join("master.log");
        let fleet = Fleet::new();
        let (_m, master) = fleet.agent(&t.master, &["-vv"], Some(&log));
        let (_r, remote) = fleet.agent(&t.remotes[0], &[], None);
        let proxy = CorruptingProxy::start(&remote, MIB as u64 + 777);
        let s = fleet.sync(&master, &[&proxy.addr], &["--compress", compress]);
        let carried = proxy.carried();
        eprintln!(
            "whole, --compress {compress}: {} flip(s); bytes per connection {carried:?}; {} \
             bytes, {} on the wire",
            proxy.faults(),
            s.bytes(0),
            s.wire(0)
        );
        s.assert_ok();
        t.assert_in_sync();
        assert_eq!(proxy.faults(), 1, "one stream must have been corrupted");
        assert!(logged_resend(&log), "the master's log shows no resend");
        // What crossed the proxy: the file twice (the corrupted copy and the resend), and the
        // reported wire bytes count both tries.
        let data_conn = carried.iter().copied().max().unwrap();
        assert!(
            data_conn >= s.wire(0) && s.wire(0) > 2 * MIB as u64,
            "the file crossed once only ({data_conn} bytes through the proxy, {} on the wire)",
            s.wire(0)
        );
        if compress == "off" {
            assert_eq!(s.wire(0), 2 * data.len() as u64, "both tries, uncompressed");
        }
    }
    // Delta: the remote holds the old version; the update inserts 256 KiB of new data, so
    // the delta's literals cover the byte at 128 KiB of the stream.
    {
        let t = Trees::new(2);
        let old = binary_like(62, 4 * MIB);
        let mut new = old.clone();
        let mid = 2 * MIB;
        new.splice(mid..mid, random_bytes(63, 256 * 1024));
        let new = edited(&new, 64, 3, 4096);
        write_with_mtime(&t.master.join("lib/libdelta.so"), &new, NEW_MTIME);
        for r in &t.remotes {
            write_with_mtime(&r.join("lib/libdelta.so"), &old, OLD_MTIME);
        }
        let log = t.aside("logs").join("master.log");
        let fleet = Fleet::new();
        let (_m, master) = fleet.agent(&t.master, &["-vv"], Some(&log));
        let (_r0, clean) = fleet.agent(&t.remotes[0], &[], None);
        let (_r1, remote) = fleet.agent(&t.remotes[1], &[], None);

        // Without corruption: a delta.
        let s = fleet.sync(&master, &[&clean], &[]);
        s.assert_ok();
        let clean_wire = s.wire(0);
        eprintln!(
            "delta, clean: {} bytes, {clean_wire} on the wire",
            s.bytes(0)
        );
        assert!(
            clean_wire * 4 < new.len() as u64,
            "no delta: {clean_wire} bytes"
        );
        assert!(!logged_resend(&log), "a clean delta was sent again");

        let proxy = CorruptingProxy::start(&remote, 128 * 1024);
        let s = fleet.sync(&master, &[&proxy.addr], &[]);
        eprintln!(
            "delta, corrupted: {} flip(s); bytes per connection {:?}; {} bytes, {} on the wire",
            proxy.faults(),
            proxy.carried(),
            s.bytes(0),
            s.wire(0)
        );
        s.assert_ok();
        t.assert_in_sync();
        assert_eq!(proxy.faults(), 1, "one stream must have been corrupted");
        assert!(logged_resend(&log), "the master's log shows no resend");
        assert!(
            s.wire(0) >= s.bytes(0) && s.wire(0) > clean_wire,
            "the corrupted delta must be followed by the whole file ({} on the wire)",
            s.wire(0)
        );
    }
}

#[test]
fn corrupted_patch_is_detected_and_resent_whole() {
    let _serial = serial();
    let t = Trees::new(2);
    let old = binary_like(65, 4 * MIB);
    let new = edited(&old, 66, 6, 64 * 1024);
    let path = "lib/libpatch.so";
    write_with_mtime(&t.master.join(path), &old, OLD_MTIME);
    let log = t.aside("logs").join("master.log");
    let versions = t.aside("versions");
    let fleet = Fleet::new();
    let (_m, master) = fleet.agent(
        &t.master,
        &[
            "-vv",
            "--keep-versions",
            "64MiB",
            "--versions-dir",
            versions.to_str().unwrap(),
        ],
        Some(&log),
    );
    let (_r0, clean) = fleet.agent(&t.remotes[0], &[], None);
    let (_r1, remote) = fleet.agent(&t.remotes[1], &[], None);
    fleet.sync(&master, &[&clean, &remote], &[]).assert_ok();
    t.assert_in_sync();

    // The upgrade goes to both remotes as one patch; the stream to the second is corrupted
    // 4 KiB in, inside the patch (a few tens of KiB, after a few hundred bytes of handshake,
    // basis query and file start).
    write_with_mtime(&t.master.join(path), &new, NEW_MTIME);
    let proxy = CorruptingProxy::start(&remote, 4096);
    // Direct streams (no relay): the master makes the patch once for both.
    let s = fleet.sync(&master, &[&clean, &proxy.addr], &["--fanout", "0"]);
    let i = s.index_of(&proxy.addr);
    let c = s.index_of(&clean);
    eprintln!(
        "patch: {} flip(s); bytes per connection {:?}; clean remote {} on the wire, corrupted \
         remote {} for {} bytes",
        proxy.faults(),
        proxy.carried(),
        s.wire(c),
        s.wire(i),
        s.bytes(i)
    );
    s.assert_ok();
    t.assert_in_sync();
    assert_eq!(proxy.faults(), 1, "one stream must have been corrupted");
    assert!(s.wire(c) * 20 < new.len() as u64, "no patch: {}", s.wire(c));
    assert!(logged_resend(&log), "the master's log shows no resend");
    assert!(
        s.wire(i) >= new.len() as u64,
        "the corrupted patch must be followed by the whole file ({} on the wire)",
        s.wire(i)
    );
}

// ---------------------------------------------------------------------------------------
// 6. A transfer cut by SIGKILL resumes from the partial file

/// Starts `fleetsync sync --bwlimit RATE` of `master` (whose agent is `master_proc`) to
/// `remote` (serving `remote_root`), SIGKILLs the master agent once `frac` of `size` bytes
/// reached the remote's temp file, and waits for the sync to end (it must fail) and the
/// remote to keep what arrived as a partial file. Returns the bytes the remote held at the
/// kill.
#[allow(clippy::too_many_arguments)]
fn kill_master_mid_file(
    fleet: &Fleet,
    master_proc: &mut Proc,
    master: &str,
    remote: &str,
    remote_root: &Path,
    size: u64,
    rate: &str,
    frac: f64,
) -> u64 {
    let mut cmd = fleet.sync_command(master, &[remote], &["--bwlimit", rate]);
    let started = Instant::now();
    let mut sync = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = started + Duration::from_secs(20);
    while (in_flight(remote_root) as f64) < frac * size as f64 && Instant::now() < deadline {
        assert!(
            sync.try_wait().unwrap().is_none(),
            "the sync ended before the kill"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let at_kill = in_flight(remote_root);
    let kill_time = started.elapsed();
    master_proc.kill_now();
    let out = sync.wait_with_output().unwrap();
    eprintln!(
        "killed the master agent after {kill_time:.2?} with {at_kill} bytes on the remote; \
         the sync: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(at_kill >= size / 2 && at_kill < size, "no cut mid-file");
    assert_ne!(
        out.status.code(),
        Some(0),
        "a sync whose master died succeeded"
    );
    wait_for_partial(remote_root);
    at_kill
}

/// Waits (at most 5 s) until the only `.fleetsync.*` file under `root` is a partial file.
fn wait_for_partial(root: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let is_partial = |p: &PathBuf| {
        p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".fleetsync.partial.")
    };
    loop {
        let l = leftovers(root);
        if l.len() == 1 && is_partial(&l[0]) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the remote kept no partial file, only {l:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn interrupted_transfer_resumes() {
    let _serial = serial();
    const SIZE: usize = 48 * MIB;
    let t = Trees::new(1);
    let data = random_bytes(71, SIZE);
    write_with_mtime(&t.master.join("images/disk.img"), &data, NEW_MTIME);
    drop(data);
    let remote_root = &t.remotes[0];
    let fleet = Fleet::new();
    let (mut master_proc, master) = fleet.agent(&t.master, &[], None);
    let (_r, remote) = fleet.agent(remote_root, &[], None);

    // Cut a little after the middle (about 1.5 s in at 16 MiB/s).
    let at_kill = kill_master_mid_file(
        &fleet,
        &mut master_proc,
        &master,
        &remote,
        remote_root,
        SIZE as u64,
        "16MiB/s",
        0.55,
    );
    assert!(
        !remote_root.join("images/disk.img").exists(),
        "a partial file is visible under the real name"
    );

    let (_master_proc, master) = fleet.agent(&t.master, &[], None);
    let s = fleet.sync(&master, &[&remote], &[]);
    s.assert_ok();
    t.assert_in_sync();
    let (bytes, wire) = (s.bytes(0), s.wire(0));
    eprintln!(
        "resumed: {bytes} bytes, {wire} on the wire ({:.1}% of the file)",
        percent(wire, SIZE as u64)
    );
    assert_eq!(bytes, SIZE as u64);
    assert!(
        wire as f64 <= 0.6 * SIZE as f64,
        "the resumed sync sent {wire} bytes of a {SIZE}-byte file cut at {at_kill}"
    );
    assert_eq!(
        leftovers(remote_root),
        Vec::<PathBuf>::new(),
        "temp or partial files left"
    );
}

#[test]
fn interrupted_transfer_resumes_with_deltas_off_too() {
    let _serial = serial();
    const SIZE: usize = 16 * MIB;
    let t = Trees::new(1);
    write_with_mtime(
        &t.master.join("disk.img"),
        &random_bytes(74, SIZE),
        NEW_MTIME,
    );
    let remote_root = &t.remotes[0];
    let fleet = Fleet::new();
    let (mut master_proc, master) = fleet.agent(&t.master, &[], None);
    let (_r, remote) = fleet.agent(remote_root, &[], None);
    kill_master_mid_file(
        &fleet,
        &mut master_proc,
        &master,
        &remote,
        remote_root,
        SIZE as u64,
        "8MiB/s",
        0.55,
    );
    let (_master_proc, master) = fleet.agent(&t.master, &[], None);
    let s = fleet.sync(&master, &[&remote], &["--no-delta"]);
    s.assert_ok();
    t.assert_in_sync();
    let wire = s.wire(0);
    assert!(
        wire as f64 <= 0.6 * SIZE as f64,
        "--no-delta sent {wire} bytes again of a {SIZE}-byte file cut past half"
    );
    assert_eq!(leftovers(remote_root), Vec::<PathBuf>::new());
}

#[test]
fn resume_of_a_file_changed_meanwhile_is_corrected() {
    let _serial = serial();
    const SIZE: usize = 16 * MIB;
    let t = Trees::new(1);
    let path = "images/disk.img";
    write_with_mtime(&t.master.join(path), &random_bytes(72, SIZE), NEW_MTIME);
    let remote_root = &t.remotes[0];
    let fleet = Fleet::new();
    let (mut master_proc, master) = fleet.agent(&t.master, &[], None);
    let (_r, remote) = fleet.agent(remote_root, &[], None);
    kill_master_mid_file(
        &fleet,
        &mut master_proc,
        &master,
        &remote,
        remote_root,
        SIZE as u64,
        "8MiB/s",
        0.55,
    );

    // The master's file changes within the part the remote already holds (same size).
    let mut data = fs::read(t.master.join(path)).unwrap();
    data[1000..5000].copy_from_slice(&random_bytes(73, 4000));
    write_with_mtime(&t.master.join(path), &data, NEW_MTIME + 60);

    let (_master_proc, master) = fleet.agent(&t.master, &[], None);
    let s = fleet.sync(&master, &[&remote], &[]);
    eprintln!(
        "resumed after a change: {} bytes, {} on the wire",
        s.bytes(0),
        s.wire(0)
    );
    s.assert_ok();
    t.assert_in_sync();
    assert_eq!(fs::read(remote_root.join(path)).unwrap(), data);
    assert_eq!(
        leftovers(remote_root),
        Vec::<PathBuf>::new(),
        "temp or partial files left"
    );
}

#[test]
fn partial_of_a_file_gone_from_the_master_is_removed() {
    let _serial = serial();
    const SIZE: usize = 16 * MIB;
    let t = Trees::new(1);
    let path = "images/disk.img";
    write_with_mtime(&t.master.join(path), &random_bytes(76, SIZE), NEW_MTIME);
    write_with_mtime(&t.master.join("images/README"), b"disk images\n", NEW_MTIME);
    let remote_root = &t.remotes[0];
    let fleet = Fleet::new();
    let (mut master_proc, master) = fleet.agent(&t.master, &[], None);
    let (_r, remote) = fleet.agent(remote_root, &[], None);
    kill_master_mid_file(
        &fleet,
        &mut master_proc,
        &master,
        &remote,
        remote_root,
        SIZE as u64,
        "8MiB/s",
        0.55,
    );

    // The release is withdrawn before the next sync: the partial file is of no more use.
    fs::remove_file(t.master.join(path)).unwrap();
    let (_master_proc, master) = fleet.agent(&t.master, &[], None);
    let s = fleet.sync(&master, &[&remote], &[]);
    s.assert_ok();
    // The remote sweeps the partials a sync listed and did not use when the server's
    // connection to it closes, which may be a moment after the client has its reply.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !leftovers(remote_root).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        leftovers(remote_root),
        Vec::<PathBuf>::new(),
        "temp or partial files left"
    );
    t.assert_in_sync();
}

#[test]
fn dropped_link_resumes() {
    let _serial = serial();
    const SIZE: usize = 16 * MIB;
    const CUT: u64 = 10 * MIB as u64;
    let t = Trees::new(1);
    write_with_mtime(
        &t.master.join("data/big.bin"),
        &random_bytes(74, SIZE),
        NEW_MTIME,
    );
    let remote_root = &t.remotes[0];
    let fleet = Fleet::new();
    let (_m, master) = fleet.agent(&t.master, &[], None);
    let (_r, remote) = fleet.agent(remote_root, &[], None);

    // The link to the remote drops after 10 MiB of the stream.
    let proxy = CorruptingProxy::cutting(&remote, CUT);
    let cut = fleet.sync(&master, &[&proxy.addr], &[]);
    eprintln!(
        "cut: {} cut(s); bytes per connection {:?}",
        proxy.faults(),
        proxy.carried()
    );
    assert_eq!(proxy.faults(), 1, "the link was not cut");
    assert_ne!(cut.code(), Some(0), "a sync whose link dropped succeeded");
    wait_for_partial(remote_root);
    assert!(!remote_root.join("data/big.bin").exists());
    drop(proxy);

    let s = fleet.sync(&master, &[&remote], &[]);
    s.assert_ok();
    t.assert_in_sync();
    let (bytes, wire) = (s.bytes(0), s.wire(0));
    eprintln!(
        "resumed after the drop: {bytes} bytes, {wire} on the wire ({:.1}% of the file)",
        percent(wire, SIZE as u64)
    );
    assert_eq!(bytes, SIZE as u64);
    assert!(
        wire <= SIZE as u64 - CUT + MIB as u64,
        "{wire} bytes sent again after a cut at {CUT} of {SIZE}"
    );
    assert_eq!(leftovers(remote_root), Vec::<PathBuf>::new());
}

#[test]
fn killed_remote_agent_resumes() {
    let _serial = serial();
    const SIZE: usize = 16 * MIB;
    let t = Trees::new(1);
    write_with_mtime(
        &t.master.join("images/disk.img"),
        &random_bytes(75, SIZE),
        NEW_MTIME,
    );
    let remote_root = &t.remotes[0];
    let fleet = Fleet::new();
    let (_m, master) = fleet.agent(&t.master, &[], None);
    let (mut remote_proc, remote) = fleet.agent(remote_root, &[], None);
    let mut cmd = fleet.sync_command(&master, &[&remote], &["--bwlimit", "8MiB/s"]);
    let mut sync = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while in_flight(remote_root) < SIZE as u64 * 55 / 100 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let at_kill = in_flight(remote_root);
    remote_proc.kill_now();
    assert_ne!(
        sync.wait().unwrap().code(),
        Some(0),
        "a sync whose remote died succeeded"
    );
    assert!(at_kill >= SIZE as u64 / 2, "no cut mid-file");

    let (_remote_proc, remote) = fleet.agent(remote_root, &[], None);
    let s = fleet.sync(&master, &[&remote], &[]);
    s.assert_ok();
    t.assert_in_sync();
    assert_eq!(leftovers(remote_root), Vec::<PathBuf>::new());
    eprintln!(
        "after a remote kill at {at_kill}: {} bytes, {} on the wire",
        s.bytes(0),
        s.wire(0)
    );
    assert!(
        s.wire(0) as f64 <= 0.6 * SIZE as f64,
        "the remote held {at_kill} bytes of the file, yet {} were sent again",
        s.wire(0)
    );
}

// ---------------------------------------------------------------------------------------
// Dependency blocks

/// A master upgraded in two dependency blocks, remotes on the old version, served by
/// agents; the remote is reached through a proxy that only counts the bytes. Returns the
/// sync, the bytes that crossed the link to the remote, and the master files' bytes.
fn blocks_update() -> (Trees, Run, u64, u64) {
    let t = Trees::new(1);
    let files = [
        ("app/bin/tool", binary_like(101, 3 * MIB)),
        ("app/share/manual.txt", text_like(102, MIB)),
        ("lib/libdep.so", binary_like(103, 2 * MIB)),
    ];
    for (p, old) in &files {
        write_with_mtime(&t.master.join(p), &edited(old, 104, 4, 8 * 1024), NEW_MTIME);
        write_with_mtime(&t.remotes[0].join(p), old, OLD_MTIME);
    }
    let blocks = t.aside("conf").join("blocks.toml");
    fs::write(
        &blocks,
        "[block.lib]\nselect = \"path:lib/**\"\n\n[block.app]\nselect = \"path:app/**\"\nafter = [\"lib\"]\n",
    )
    .unwrap();
    let fleet = Fleet::new();
    let (_m, master) = fleet.agent(&t.master, &[], None);
    let (_r, remote) = fleet.agent(&t.remotes[0], &[], None);
    let proxy = CorruptingProxy::start(&remote, u64::MAX);
    let s = fleet.sync(
        &master,
        &[&proxy.addr],
        &["--blocks", blocks.to_str().unwrap()],
    );
    let carried = proxy.carried();
    eprintln!(
        "--blocks: {} bytes, {} on the wire; bytes per connection through the proxy {carried:?}",
        s.bytes(0),
        s.wire(0)
    );
    s.assert_ok();
    t.assert_in_sync();
    // Every connection the proxy carried: the server's and one file stream per block.
    let stream = carried.iter().sum();
    let master_bytes = files
        .iter()
        .map(|(p, _)| fs::metadata(t.master.join(p)).unwrap().len())
        .sum();
    (t, s, stream, master_bytes)
}

#[test]
fn blocks_sync_sends_deltas() {
    let _serial = serial();
    let (_t, s, stream, master_bytes) = blocks_update();
    let bytes = s.bytes(0);
    assert_eq!(bytes, master_bytes, "the files' bytes");
    assert!(
        stream * 10 <= bytes,
        "--blocks: {stream} bytes crossed the link for {bytes} file bytes (> 10%)"
    );
}

#[test]
fn blocks_sync_reports_wire_bytes() {
    let _serial = serial();
    let (_t, s, stream, _) = blocks_update();
    let wire = s.wire(0);
    assert!(
        wire > 0 && wire <= stream && wire + 64 * 1024 >= stream,
        "--blocks: wire_bytes {wire}, while {stream} bytes crossed the link"
    );
}

// ---------------------------------------------------------------------------------------
// 7. Bandwidth limits

#[test]
fn bwlimit_is_honoured() {
    let _serial = serial();
    const SIZE: usize = 16 * MIB;
    let rate = 8.0 * MIB as f64;
    let t = Trees::new(2);
    let a = random_bytes(81, SIZE / 2);
    let b = random_bytes(82, SIZE / 2);
    write_with_mtime(&t.master.join("data/a.bin"), &a, NEW_MTIME);
    write_with_mtime(&t.master.join("data/b.bin"), &b, NEW_MTIME);
    let (r0, r1) = (&t.remotes[0], &t.remotes[1]);
    let empty = |r: &Path| {
        fs::remove_dir_all(r).unwrap();
        fs::create_dir(r).unwrap();
    };

    // Unlimited, to know what the rest of a sync costs on this (shared) machine: the upper
    // bounds allow for it.
    let base = sync_dirs(&t.master, &[r0], &["--compress", "off"]);
    base.assert_ok();
    let base_secs = base.elapsed.as_secs_f64();
    eprintln!(
        "unlimited: {} bytes on the wire in {base_secs:.2} s",
        base.wire(0)
    );

    // One remote, --bwlimit 8MiB/s: 16 MiB take 2 s.
    let s = sync_dirs(
        &t.master,
        &[r1],
        &["--bwlimit", "8MiB/s", "--compress", "off"],
    );
    s.assert_ok();
    t.assert_in_sync();
    let secs = s.elapsed.as_secs_f64();
    let ideal = s.wire(0) as f64 / rate;
    eprintln!(
        "--bwlimit 8MiB/s: {} bytes on the wire in {secs:.2} s ({:.2} MiB/s; ideal {ideal:.2} s)",
        s.wire(0),
        s.wire(0) as f64 / secs / MIB as f64
    );
    assert!(
        s.wire(0) >= SIZE as u64,
        "incompressible data with --compress off"
    );
    assert!(
        secs >= 0.9 * ideal,
        "--bwlimit 8MiB/s: {secs:.2} s for {ideal:.2} s of data"
    );
    assert!(
        secs <= 1.5 * ideal + base_secs,
        "--bwlimit 8MiB/s: {secs:.2} s for {ideal:.2} s of data (unlimited: {base_secs:.2} s)"
    );

    // Two empty remotes: --master-bwlimit shares 8 MiB/s between both streams, 32 MiB in 4 s.
    empty(r0);
    empty(r1);
    let s = sync_dirs(
        &t.master,
        &[r0, r1],
        // Two streams from the master (no relay) share the limit.
        &[
            "--master-bwlimit",
            "8MiB/s",
            "--compress",
            "off",
            "--fanout",
            "0",
        ],
    );
    s.assert_ok();
    t.assert_in_sync();
    let secs = s.elapsed.as_secs_f64();
    let total = s.wire(0) + s.wire(1);
    let ideal = total as f64 / rate;
    eprintln!(
        "--master-bwlimit 8MiB/s, 2 remotes: {total} bytes on the wire in {secs:.2} s \
         ({:.2} MiB/s; ideal {ideal:.2} s)",
        total as f64 / secs / MIB as f64
    );
    assert!(total >= 2 * SIZE as u64);
    assert!(
        secs >= 0.9 * ideal,
        "--master-bwlimit: {secs:.2} s for {ideal:.2} s of data"
    );
    assert!(
        secs <= 1.5 * ideal + base_secs,
        "--master-bwlimit: {secs:.2} s for {ideal:.2} s of data (unlimited: {base_secs:.2} s)"
    );
}

#[test]
fn master_bwlimit_ends_with_its_sync() {
    let _serial = serial();
    let t = Trees::new(1);
    write_with_mtime(
        &t.master.join("a.bin"),
        &random_bytes(91, 4 * MIB),
        NEW_MTIME,
    );
    let fleet = Fleet::new();
    let (_m, master) = fleet.agent(&t.master, &[], None);
    let (_r, remote) = fleet.agent(&t.remotes[0], &[], None);
    let limited = fleet.sync(&master, &[&remote], &["--master-bwlimit", "4MiB/s"]);
    limited.assert_ok();
    assert!(
        limited.elapsed >= Duration::from_millis(900),
        "the limit was not applied"
    );

    // The next sync of the same master agent asks for no limit.
    write_with_mtime(
        &t.master.join("b.bin"),
        &random_bytes(92, 16 * MIB),
        NEW_MTIME,
    );
    let free = fleet.sync(&master, &[&remote], &[]);
    free.assert_ok();
    t.assert_in_sync();
    let at_old_limit = free.wire(0) as f64 / (4.0 * MIB as f64);
    eprintln!(
        "the sync after a --master-bwlimit one: {} bytes in {:.2?} ({at_old_limit:.1} s at the \
         old limit)",
        free.wire(0),
        free.elapsed
    );
    assert!(
        free.elapsed.as_secs_f64() < 0.5 * at_old_limit,
        "a sync without --master-bwlimit ran at the previous sync's limit: {:.2?} for {} bytes",
        free.elapsed,
        free.wire(0)
    );
}

// ---------------------------------------------------------------------------------------
// 8. Bad flag values

#[test]
fn bad_flag_values_are_named() {
    let _serial = serial();
    let t = Trees::new(1);
    write_with_mtime(&t.master.join("f"), b"x", NEW_MTIME);
    for (flag, value) in [
        ("--compress", "zstd:99"),
        ("--compress", "lz4"),
        ("--bwlimit", "10furlongs"),
        ("--master-bwlimit", "fast"),
    ] {
        let s = sync_embedded(&t, &[flag, value]);
        let err = String::from_utf8_lossy(&s.out.stderr);
        assert_eq!(s.code(), Some(2), "{flag} {value}: exit code");
        assert!(
            err.contains(flag) && err.contains(value),
            "{flag} {value}: the message names neither: {err}"
        );
        assert!(
            !t.remotes[0].join("f").exists(),
            "{flag} {value}: synced anyway"
        );
    }
}
