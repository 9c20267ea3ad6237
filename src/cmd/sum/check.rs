//! `fleetsync sum -c`: verify checksum lists the way `md5sum -c` does.
//!
//! Accepted lines: GNU untagged (`HEX  NAME`, `HEX *NAME`, `HEX NAME`), BSD
//! tagged (`ALG (NAME) = HEX`), either one starting with `\` when the name is
//! escaped, and with a numeric `-a` (`cksum`, `bsd`, `sysv`) the decimal lines
//! `cksum`/`sum` print (`VALUE SIZE NAME`). Blank lines and `#` comments are skipped.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rayon::prelude::*;

use super::format::{os_message, push_name, quote, LineStyle};
use super::reporter::{engine_error_message, Reporter};
use fleetsync_engine::Registry;
use fleetsync_engine::{hash_file, hash_reader, AlgorithmInfo, Error, HashOptions};

/// Flags of check mode.
pub struct CheckOptions<'a> {
    /// Algorithms named with `-a` (empty: inferred from each line).
    pub algorithms: &'a [AlgorithmInfo],
    /// Don't print OK lines.
    pub quiet: bool,
    /// Print nothing; the exit code says it all.
    pub status: bool,
    /// Warn about each improperly formatted line.
    pub warn: bool,
    /// Exit 1 on improperly formatted lines.
    pub strict: bool,
    /// Don't fail or report for files that do not exist.
    pub ignore_missing: bool,
    /// Read options.
    pub hash: &'a HashOptions,
}

/// What a checksum line expects.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expected {
    /// Lowercase hex digest.
    Hex(String),
    /// A `cksum`/`sum` line: the number and the size (bytes for `cksum`, blocks for `sum`).
    Numeric { value: u64, size: u64 },
}

/// One parsed line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    /// Blank or comment.
    Skip,
    /// Not a checksum line.
    Bad,
    /// A file to verify.
    Entry {
        /// The tag of a BSD-style line, lowercased.
        tag: Option<String>,
        expected: Expected,
        name: Vec<u8>,
    },
}

fn is_hex(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(u8::is_ascii_hexdigit)
}

/// Parses one line (without its `\n`). `numeric` tries the `cksum`/`sum` decimal form first.
fn parse_line(line: &[u8], numeric: bool) -> Line {
    let start = line
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(line.len());
    let mut s = &line[start..];
    if s.is_empty() || s[0] == b'#' {
        return Line::Skip;
    }
    let escaped = s[0] == b'\\';
    if escaped {
        s = &s[1..];
    }
    let finish_name = |raw: &[u8]| -> Option<Vec<u8>> {
        if raw.is_empty() {
            return None;
        }
        if escaped {
            super::format::unescape(raw)
        } else {
            Some(raw.to_vec())
        }
    };
    // BSD tagged: ALG (NAME) = HEX
    if let Some(open) = find(s, b" (").or_else(|| find(s, b"(")) {
        let tag = &s[..open];
        if !tag.is_empty()
            && tag
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"/-_".contains(b))
        {
            if let Some(close) = rfind(s, b") = ") {
                let name_start = open + if s[open] == b' ' { 2 } else { 1 };
                let hex = &s[close + 4..];
                if close >= name_start && is_hex(hex) {
                    return match finish_name(&s[name_start..close]) {
                        Some(name) => Line::Entry {
                            tag: Some(String::from_utf8_lossy(tag).to_ascii_lowercase()),
                            expected: Expected::Hex(
                                String::from_utf8_lossy(hex).to_ascii_lowercase(),
                            ),
                            name,
                        },
                        None => Line::Bad,
                    };
                }
            }
        }
    }
    if numeric && !escaped {
        if let Some(entry) = parse_numeric(s) {
            return entry;
        }
    }
    // GNU untagged: HEX, one space, then ' ' (text) or '*' (binary) or the name itself.
    let hex_len = s.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if hex_len == 0 || hex_len + 1 >= s.len() || s[hex_len] != b' ' {
        return Line::Bad;
    }
    let mut rest = &s[hex_len + 1..];
    if rest.len() > 1 && (rest[0] == b' ' || rest[0] == b'*') {
        rest = &rest[1..];
    }
    match finish_name(rest) {
        Some(name) => Line::Entry {
            tag: None,
            expected: Expected::Hex(String::from_utf8_lossy(&s[..hex_len]).to_ascii_lowercase()),
            name,
        },
        None => Line::Bad,
    }
}

/// `VALUE SIZE NAME` with decimal VALUE and SIZE (spaces between them as `sum -r` pads).
fn parse_numeric(s: &[u8]) -> Option<Line> {
    let v_len = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if v_len == 0 || s.get(v_len) != Some(&b' ') {
        return None;
    }
    let rest = &s[v_len..];
    let spaces = rest.iter().take_while(|b| **b == b' ').count();
    let rest = &rest[spaces..];
    let n_len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if n_len == 0 || rest.get(n_len) != Some(&b' ') || rest.len() <= n_len + 1 {
        return None;
    }
    let value = std::str::from_utf8(&s[..v_len]).ok()?.parse().ok()?;
    let size = std::str::from_utf8(&rest[..n_len]).ok()?.parse().ok()?;
    Some(Line::Entry {
        tag: None,
        expected: Expected::Numeric { value, size },
        name: rest[n_len + 1..].to_vec(),
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

/// The algorithm an untagged line of `hex_len` digits means when `-a` is not given.
fn infer_by_length(hex_len: usize) -> Option<&'static str> {
    Some(match hex_len {
        8 => "crc32",
        32 => "md5",
        40 => "sha1",
        56 => "sha224",
        64 => "sha256",
        96 => "sha384",
        128 => "sha512",
        _ => return None,
    })
}

/// An algorithm resolved for a line, with its digest width in hex digits.
#[derive(Clone)]
struct Resolved {
    info: AlgorithmInfo,
    hex_len: usize,
    style: LineStyle,
}

impl Resolved {
    fn new(info: AlgorithmInfo) -> Self {
        let hex_len = info.instantiate().finish().as_bytes().len() * 2;
        let style = LineStyle::for_algorithm(&info.name);
        Resolved {
            info,
            hex_len,
            style,
        }
    }
}

/// Picks the algorithm of one line, or `None` when the line is improperly formatted.
struct Resolver<'a> {
    given: Vec<Resolved>,
    registry: &'a Registry,
    cache: HashMap<String, Option<Resolved>>,
}

impl Resolver<'_> {
    fn by_name(&mut self, name: &str) -> Option<Resolved> {
        if let Some(r) = self.given.iter().find(|r| r.info.name == name) {
            return Some(r.clone());
        }
        let registry = self.registry;
        self.cache
            .entry(name.to_owned())
            .or_insert_with(|| registry.info(name).ok().map(Resolved::new))
            .clone()
    }

    fn resolve(&mut self, tag: Option<&str>, expected: &Expected) -> Option<Resolved> {
        let r = match (tag, expected) {
            (Some(tag), Expected::Hex(_)) => self.by_name(tag)?,
            (None, Expected::Numeric { .. }) => {
                return self.given.iter().find(|r| r.style.is_numeric()).cloned()
            }
            (None, Expected::Hex(hex)) if !self.given.is_empty() => {
                return self.given.iter().find(|r| r.hex_len == hex.len()).cloned()
            }
            (None, Expected::Hex(hex)) => self.by_name(infer_by_length(hex.len())?)?,
            (Some(_), Expected::Numeric { .. }) => return None,
        };
        match expected {
            Expected::Hex(hex) if hex.len() == r.hex_len => Some(r),
            _ => None,
        }
    }
}

/// One line of a checksum list, in list order: what to verify, or what to warn about.
enum CheckEntry {
    /// A file to hash: its name, algorithm and expected checksum.
    Verify(Vec<u8>, Resolved, Expected),
    /// An improperly formatted line (1-based number).
    Bad(usize),
}

/// The result of verifying one line.
enum Verdict {
    Ok,
    Failed,
    Unreadable(String),
    /// Does not exist, and --ignore-missing is set.
    Missing,
}

fn verify(
    name: &[u8],
    alg: &Resolved,
    expected: &Expected,
    opts: &HashOptions,
    ignore_missing: bool,
) -> Verdict {
    let result = if name == b"-" {
        hash_reader(io::stdin().lock(), std::slice::from_ref(&alg.info))
            .map_err(|e| engine_error_message(&e))
    } else {
        let path = Path::new(OsStr::from_bytes(name));
        match hash_file(path, std::slice::from_ref(&alg.info), opts) {
            Err(Error::Io { source, .. })
                if ignore_missing && source.kind() == io::ErrorKind::NotFound =>
            {
                return Verdict::Missing
            }
            other => other.map_err(|e| engine_error_message(&e)),
        }
    };
    let hash = match result {
        Ok(h) => h,
        Err(msg) => return Verdict::Unreadable(msg),
    };
    let digest = &hash.digests[0];
    let matches = match expected {
        Expected::Hex(hex) => digest.to_hex() == *hex,
        Expected::Numeric { value, size } => {
            let blocks = match alg.style {
                LineStyle::Bsd => hash.size.div_ceil(1024),
                LineStyle::Sysv => hash.size.div_ceil(512),
                _ => hash.size,
            };
            digest.value() == Some(*value) && blocks == *size
        }
    };
    if matches {
        Verdict::Ok
    } else {
        Verdict::Failed
    }
}

/// Verifies every list in `lists` (`-` is standard input); returns the exit code.
pub fn run(lists: &[std::ffi::OsString], opts: &CheckOptions<'_>, rep: &mut Reporter) -> u8 {
    let registry = Registry::with_builtins();
    let mut resolver = Resolver {
        given: opts.algorithms.iter().cloned().map(Resolved::new).collect(),
        registry: &registry,
        cache: HashMap::new(),
    };
    let numeric = resolver.given.iter().any(|r| r.style.is_numeric());
    // GNU names the algorithm in --warn messages ("improperly formatted MD5 checksum line").
    let kind = match opts.algorithms {
        [one] => format!("{} ", super::format::tag_of(&one.name)),
        _ => String::new(),
    };
    let stdin_list = [std::ffi::OsString::from("-")];
    let lists = if lists.is_empty() {
        &stdin_list[..]
    } else {
        lists
    };
    let mut failed = false;
    for list in lists {
        let list_name = list.as_bytes();
        // GNU names standard input "'standard input'" in these messages.
        let shown = if list_name == b"-" {
            "'standard input'".to_owned()
        } else {
            quote(list_name)
        };
        let content = if list_name == b"-" {
            let mut v = Vec::new();
            io::stdin().lock().read_to_end(&mut v).map(|_| v)
        } else {
            std::fs::read(list)
        };
        let content = match content {
            Ok(c) => c,
            Err(e) => {
                rep.error(&format!("{}: {}", shown, os_message(&e)));
                failed = true;
                continue;
            }
        };
        let mut bad_lines = 0usize;
        let mut mismatched = 0usize;
        let mut unreadable = 0usize;
        let mut properly = 0usize;
        let mut verified = 0usize;
        // Each line becomes an entry (a file to verify, or a bad line to warn
        // about), hashed in parallel batches and reported in list order.
        let mut entries: Vec<CheckEntry> = Vec::new();
        let body = content.strip_suffix(b"\n").unwrap_or(&content);
        for (i, line) in body.split(|b| *b == b'\n').enumerate() {
            let parsed = parse_line(line, numeric);
            let resolved = match &parsed {
                Line::Skip => continue,
                Line::Bad => None,
                Line::Entry { tag, expected, .. } => resolver.resolve(tag.as_deref(), expected),
            };
            match (parsed, resolved) {
                (Line::Entry { expected, name, .. }, Some(alg)) => {
                    properly += 1;
                    entries.push(CheckEntry::Verify(name, alg, expected));
                }
                _ => {
                    bad_lines += 1;
                    entries.push(CheckEntry::Bad(i + 1));
                }
            }
        }
        let batch = 4 * rayon::current_num_threads().max(1);
        for chunk in entries.chunks(batch) {
            let run_one = |entry: &CheckEntry| match entry {
                CheckEntry::Verify(n, a, e) => {
                    Some(verify(n, a, e, opts.hash, opts.ignore_missing))
                }
                CheckEntry::Bad(_) => None,
            };
            let reads_stdin = chunk
                .iter()
                .any(|e| matches!(e, CheckEntry::Verify(n, ..) if n == b"-"));
            let verdicts: Vec<Option<Verdict>> = if reads_stdin {
                chunk.iter().map(run_one).collect()
            } else {
                chunk.par_iter().map(run_one).collect()
            };
            for (entry, verdict) in chunk.iter().zip(verdicts) {
                let (name, verdict) = match (entry, verdict) {
                    (CheckEntry::Verify(name, ..), Some(v)) => {
                        if matches!(v, Verdict::Ok | Verdict::Failed) {
                            verified += 1;
                        }
                        (name, v)
                    }
                    (CheckEntry::Bad(line_no), _) => {
                        if opts.warn && !opts.status {
                            rep.error(&format!(
                                "{}: {line_no}: improperly formatted {kind}checksum line",
                                shown,
                            ));
                        }
                        continue;
                    }
                    (CheckEntry::Verify(..), None) => continue,
                };
                let word = match &verdict {
                    Verdict::Missing => continue,
                    Verdict::Ok => "OK",
                    Verdict::Failed => {
                        mismatched += 1;
                        "FAILED"
                    }
                    Verdict::Unreadable(msg) => {
                        unreadable += 1;
                        rep.error(&format!("{}: {msg}", quote(name)));
                        "FAILED open or read"
                    }
                };
                if opts.status || (opts.quiet && matches!(verdict, Verdict::Ok)) {
                    continue;
                }
                let escape = name.contains(&b'\n');
                let mut out = Vec::with_capacity(name.len() + 24);
                if escape {
                    out.push(b'\\');
                }
                push_name(&mut out, name, escape);
                out.extend_from_slice(b": ");
                out.extend_from_slice(word.as_bytes());
                out.push(b'\n');
                rep.out(&out);
            }
        }
        if properly == 0 {
            rep.error(&format!(
                "{}: no properly formatted checksum lines found",
                shown
            ));
            failed = true;
            continue;
        }
        if !opts.status {
            // GNU's summary lines, singular or plural.
            let counts = [
                (
                    bad_lines,
                    "",
                    "line is",
                    "lines are",
                    "improperly formatted",
                ),
                (
                    unreadable,
                    "listed ",
                    "file could",
                    "files could",
                    "not be read",
                ),
                (
                    mismatched,
                    "computed ",
                    "checksum",
                    "checksums",
                    "did NOT match",
                ),
            ];
            for (n, before, one, many, after) in counts {
                if n > 0 {
                    let noun = if n == 1 { one } else { many };
                    rep.error(&format!("WARNING: {n} {before}{noun} {after}"));
                }
            }
        }
        if mismatched > 0 || unreadable > 0 || (opts.strict && bad_lines > 0) {
            failed = true;
        }
        if opts.ignore_missing && verified == 0 {
            rep.error(&format!("{}: no file was verified", shown));
            failed = true;
        }
    }
    let _ = io::stdout().flush();
    u8::from(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: Option<&str>, hex: &str, name: &[u8]) -> Line {
        Line::Entry {
            tag: tag.map(str::to_owned),
            expected: Expected::Hex(hex.to_owned()),
            name: name.to_vec(),
        }
    }

    #[test]
    fn parses_gnu_and_bsd_lines() {
        assert_eq!(parse_line(b"abcd  a b", false), entry(None, "abcd", b"a b"));
        assert_eq!(parse_line(b"ABCD *x", false), entry(None, "abcd", b"x"));
        assert_eq!(parse_line(b"abcd x", false), entry(None, "abcd", b"x"));
        assert_eq!(
            parse_line(b"\\abcd  n\\nl\\\\", false),
            entry(None, "abcd", b"n\nl\\")
        );
        assert_eq!(
            parse_line(b"MD5 (a (b) = c) = ab12", false),
            entry(Some("md5"), "ab12", b"a (b) = c")
        );
        assert_eq!(
            parse_line(b"\\SHA256 (n\\nl) = ab12", false),
            entry(Some("sha256"), "ab12", b"n\nl")
        );
        assert_eq!(parse_line(b"# comment", false), Line::Skip);
        assert_eq!(parse_line(b"", false), Line::Skip);
        assert_eq!(parse_line(b"garbage line", false), Line::Bad);
        assert_eq!(parse_line(b"\\abcd  bad\\q", false), Line::Bad);
    }

    #[test]
    fn parses_numeric_lines() {
        assert_eq!(
            parse_line(b"16556     1 a b", true),
            Line::Entry {
                tag: None,
                expected: Expected::Numeric {
                    value: 16556,
                    size: 1
                },
                name: b"a b".to_vec()
            }
        );
    }
}
