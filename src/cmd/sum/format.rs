//! Output lines byte-identical to GNU coreutils 9.1 (`sum`, `cksum`, `md5sum`, `sha*sum`).

use fleetsync_engine::Digest;

/// How one algorithm's result is printed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineStyle {
    /// `sum -r`: `%05d %5d NAME`, size in 1024-byte blocks.
    Bsd,
    /// `sum -s`: `%d %d NAME`, size in 512-byte blocks.
    Sysv,
    /// `cksum`: `CRC SIZE NAME`.
    Cksum,
    /// `md5sum` and friends: `HEX  NAME`, or with `--tag` `TAG (NAME) = HEX`.
    Digest {
        /// The BSD tag, e.g. `MD5`, `SHA256`.
        tag: String,
    },
}

impl LineStyle {
    /// The style of the algorithm called `name`.
    pub fn for_algorithm(name: &str) -> LineStyle {
        match name {
            "bsd" => LineStyle::Bsd,
            "sysv" => LineStyle::Sysv,
            "cksum" => LineStyle::Cksum,
            other => LineStyle::Digest { tag: tag_of(other) },
        }
    }

    /// Whether the digest prints in decimal with a block count (the `sum`/`cksum` formats).
    pub fn is_numeric(&self) -> bool {
        !matches!(self, LineStyle::Digest { .. })
    }
}

/// The BSD `--tag` name of an algorithm: `MD5`, `SHA256`, `BLAKE3`, `CRC16/XMODEM`.
pub fn tag_of(name: &str) -> String {
    name.to_ascii_uppercase()
}

/// A file name as printed: its bytes, and whether it is the implicit standard
/// input (no FILE operand), which the `sum`/`cksum` formats print without a name.
#[derive(Clone, Debug)]
pub struct DisplayName<'a> {
    /// The name's bytes (`-` for standard input).
    pub bytes: &'a [u8],
    /// Standard input read because no FILE was given.
    pub implicit_stdin: bool,
}

/// Flags that shape every output line.
#[derive(Clone, Copy, Debug, Default)]
pub struct LineOptions {
    /// BSD-style `TAG (NAME) = HEX` lines.
    pub tag: bool,
    /// End lines with NUL and never escape names (`-z`).
    pub zero: bool,
    /// `HEX *NAME` rather than `HEX  NAME` in untagged digest lines (`-b`).
    pub binary: bool,
}

/// Appends the output line (with its `\n`, or NUL with `-z`) for one file and one algorithm.
pub fn write_line(
    out: &mut Vec<u8>,
    style: &LineStyle,
    opts: LineOptions,
    name: &DisplayName<'_>,
    size: u64,
    digest: &Digest,
) {
    let end = if opts.zero { b'\0' } else { b'\n' };
    let value = digest.value().unwrap_or(0);
    let numeric_tail = |out: &mut Vec<u8>| {
        if !name.implicit_stdin {
            out.push(b' ');
            out.extend_from_slice(name.bytes);
        }
        out.push(end);
    };
    match style {
        LineStyle::Bsd => {
            out.extend_from_slice(format!("{:05} {:5}", value, size.div_ceil(1024)).as_bytes());
            numeric_tail(out);
        }
        LineStyle::Sysv => {
            out.extend_from_slice(format!("{} {}", value, size.div_ceil(512)).as_bytes());
            numeric_tail(out);
        }
        LineStyle::Cksum => {
            out.extend_from_slice(format!("{value} {size}").as_bytes());
            numeric_tail(out);
        }
        LineStyle::Digest { tag: tag_name } => {
            let escape = !opts.zero && needs_escape(name.bytes);
            if escape {
                out.push(b'\\');
            }
            if opts.tag {
                out.extend_from_slice(tag_name.as_bytes());
                out.extend_from_slice(b" (");
                push_name(out, name.bytes, escape);
                out.extend_from_slice(b") = ");
                out.extend_from_slice(digest.to_hex().as_bytes());
            } else {
                out.extend_from_slice(digest.to_hex().as_bytes());
                out.extend_from_slice(if opts.binary { b" *" } else { b"  " });
                push_name(out, name.bytes, escape);
            }
            out.push(end);
        }
    }
}

/// Whether GNU 9.1 escapes this name in a checksum line (it has `\`, `\n` or `\r`).
pub fn needs_escape(name: &[u8]) -> bool {
    name.iter().any(|&b| matches!(b, b'\\' | b'\n' | b'\r'))
}

/// Appends `name`, escaping `\`, `\n`, `\r` as GNU does when `escape` is set.
pub fn push_name(out: &mut Vec<u8>, name: &[u8], escape: bool) {
    if !escape {
        out.extend_from_slice(name);
        return;
    }
    for &b in name {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

/// Undoes [`push_name`]'s escaping; `None` on an unknown escape sequence.
pub fn unescape(name: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(name.len());
    let mut it = name.iter();
    while let Some(&b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match it.next()? {
            b'\\' => out.push(b'\\'),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            _ => return None,
        }
    }
    Some(out)
}

/// Quotes a file name for a diagnostic the way GNU's `quotef` does
/// (shell-escape style): bare when harmless, else in quotes.
pub fn quote(name: &[u8]) -> String {
    let safe = |b: u8| b.is_ascii_alphanumeric() || b"%+,-./:=@_^".contains(&b);
    if !name.is_empty() && name.iter().all(|&b| safe(b)) {
        return String::from_utf8_lossy(name).into_owned();
    }
    let has_control = name.iter().any(|b| b.is_ascii_control());
    let s = String::from_utf8_lossy(name);
    if !has_control && s.contains('\'') && !s.contains(['"', '$', '`', '\\']) {
        return format!("\"{s}\"");
    }
    let mut out = String::from("'");
    for c in s.chars() {
        match c {
            '\'' => out.push_str("'\\''"),
            '\n' => out.push_str("'$'\\n''"),
            '\t' => out.push_str("'$'\\t''"),
            '\r' => out.push_str("'$'\\r''"),
            c if c.is_ascii_control() => out.push_str(&format!("'$'\\{:03o}''", c as u32)),
            c => out.push(c),
        }
    }
    out.push('\'');
    // Drop the empty '' a leading or trailing control character leaves.
    if out.starts_with("''$") {
        out.drain(..2);
    }
    if out.ends_with("'''") {
        out.truncate(out.len() - 2);
    }
    out
}

/// An OS error's message without Rust's ` (os error N)` suffix, as C's `strerror`.
pub fn os_message(err: &std::io::Error) -> String {
    let s = err.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_matches_gnu() {
        assert_eq!(quote(b"plain.txt"), "plain.txt");
        assert_eq!(quote(b"no such"), "'no such'");
        assert_eq!(quote(b"x\\y"), "'x\\y'");
        assert_eq!(quote(b"it's"), "\"it's\"");
        assert_eq!(quote(b"n\nz"), "'n'$'\\n''z'");
    }

    #[test]
    fn escape_round_trips() {
        let mut v = Vec::new();
        push_name(&mut v, b"a\\b\nc\rd", true);
        assert_eq!(v, b"a\\\\b\\nc\\rd");
        assert_eq!(unescape(&v).unwrap(), b"a\\b\nc\rd");
        assert!(unescape(b"bad\\q").is_none());
    }
}
