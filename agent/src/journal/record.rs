//! The journal file: the operations of a block, with their staging slots, as text.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use super::*;

/// An operation with the staging slot that holds its prepared object and its backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SlotOp {
    pub(super) slot: u32,
    pub(super) op: JournalOp,
}

// ---- journal encoding -------------------------------------------------------------------
//
// Text, one operation per line, fields separated by single spaces, every byte string escaped
// so that it holds no space, newline or `%` (`%XX`):
//
//   fleetsync-journal 1
//   block <name>
//   <kind> <slot> <path> <target or => <mode> <mtime> <uid> <gid>
//   end <count>
//
// kind is put|symlink|hardlink|delete|attrs|mkdir; the target field is `=` followed by the
// escaped target (or just `=` for none); attributes are octal / `secs.nanos` / decimal, `-`
// for none. The trailing `end` line makes a torn journal detectable.

pub(crate) fn escape(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"._-/+~,:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

pub(crate) fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("truncated escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad escape %{hex}"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

pub(super) fn encode_journal(block: &str, ops: &[SlotOp]) -> String {
    let mut s = String::new();
    s.push_str(JOURNAL_MAGIC);
    s.push_str("\nblock ");
    escape(&mut s, block.as_bytes());
    s.push('\n');
    let none = JournalAttrs::default();
    for SlotOp { slot, op } in ops {
        let (kind, target, attrs): (&str, Option<&[u8]>, &JournalAttrs) = match op {
            JournalOp::Put { attrs, .. } => ("put", None, attrs),
            JournalOp::Symlink { target, attrs, .. } => {
                ("symlink", Some(target.as_os_str().as_bytes()), attrs)
            }
            JournalOp::HardLink { target, .. } => ("hardlink", Some(&target.0), &none),
            JournalOp::Delete { .. } => ("delete", None, &none),
            JournalOp::SetAttrs { attrs, .. } => ("attrs", None, attrs),
            JournalOp::Mkdir { attrs, .. } => ("mkdir", None, attrs),
        };
        s.push_str(&format!("{kind} {slot} "));
        escape(&mut s, &op.path().0);
        s.push_str(" =");
        if let Some(t) = target {
            escape(&mut s, t);
        }
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            " {} {} {} {}\n",
            opt(attrs.mode.map(|m| format!("{m:o}"))),
            opt(attrs.mtime.map(|m| format!("{}.{}", m.secs, m.nanos))),
            opt(attrs.uid.map(|u| u.to_string())),
            opt(attrs.gid.map(|g| g.to_string())),
        ));
    }
    s.push_str(&format!("end {}\n", ops.len()));
    s
}

pub(super) fn decode_journal(bytes: &[u8]) -> Result<(String, Vec<SlotOp>), String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 (escaping broken)")?;
    let mut lines = text.lines();
    if lines.next() != Some(JOURNAL_MAGIC) {
        return Err("missing header".into());
    }
    let block = lines
        .next()
        .and_then(|l| l.strip_prefix("block "))
        .ok_or("missing block line")?;
    let block = String::from_utf8_lossy(&unescape(block)?).into_owned();
    let mut ops = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split(' ').collect();
        if f.first() == Some(&"end") {
            let n: usize = f
                .get(1)
                .and_then(|n| n.parse().ok())
                .ok_or("bad end line")?;
            if n != ops.len() {
                return Err(format!("end line says {n} operations, found {}", ops.len()));
            }
            return Ok((block, ops));
        }
        let [kind, slot, path, target, mode, mtime, uid, gid] = f[..] else {
            return Err(format!("malformed line {line:?}"));
        };
        let slot: u32 = slot.parse().map_err(|_| format!("bad slot {slot:?}"))?;
        let path = rel_from_bytes(unescape(path)?)?;
        let target = match target.strip_prefix('=') {
            Some("") => None,
            Some(t) => Some(unescape(t)?),
            None => return Err(format!("bad target field {target:?}")),
        };
        let num = |v: &str, radix| -> Result<Option<u32>, String> {
            if v == "-" {
                Ok(None)
            } else {
                u32::from_str_radix(v, radix)
                    .map(Some)
                    .map_err(|_| format!("bad number {v:?}"))
            }
        };
        let mtime = if mtime == "-" {
            None
        } else {
            let (s, n) = mtime.split_once('.').ok_or("bad mtime")?;
            Some(Mtime {
                secs: s.parse().map_err(|_| "bad mtime seconds")?,
                nanos: n.parse().map_err(|_| "bad mtime nanoseconds")?,
            })
        };
        let attrs = JournalAttrs {
            mode: num(mode, 8)?,
            mtime,
            uid: num(uid, 10)?,
            gid: num(gid, 10)?,
        };
        let need_target = || {
            target
                .clone()
                .ok_or_else(|| format!("{kind} without target"))
        };
        let op = match kind {
            "put" => JournalOp::Put { path, attrs },
            "symlink" => JournalOp::Symlink {
                path,
                target: PathBuf::from(OsString::from_vec(need_target()?)),
                attrs,
            },
            "hardlink" => JournalOp::HardLink {
                path,
                target: rel_from_bytes(need_target()?)?,
            },
            "delete" => JournalOp::Delete { path },
            "attrs" => JournalOp::SetAttrs { path, attrs },
            "mkdir" => JournalOp::Mkdir { path, attrs },
            other => return Err(format!("unknown operation {other:?}")),
        };
        ops.push(SlotOp { slot, op });
    }
    Err("missing end line (torn journal)".into())
}

pub(super) fn rel_from_bytes(b: Vec<u8>) -> Result<RelPath, String> {
    RelPath::new(OsString::from_vec(b)).map_err(|e| e.to_string())
}
