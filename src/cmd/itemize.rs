//! Plan items as one-line text, the form `sync -n`/`-i` prints and `verify`
//! reuses: rsync-style path escaping and the action names.

use fleetsync_proto::{Action, PlanItem};

/// rsync-style escaping of a path for one-line output: `\#ooo` for control
/// bytes and backslashes, invalid UTF-8 bytes likewise.
pub fn escape_path(path: &[u8]) -> String {
    let mut out = String::with_capacity(path.len());
    for chunk in path.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() || c == '\\' {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\#{b:03o}"));
                }
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\#{b:03o}"));
        }
    }
    out
}

/// The word for `a` in item lines and in `sync --json`.
pub fn action_name(a: Action) -> &'static str {
    match a {
        Action::Transfer => "send",
        Action::Delete => "delete",
        Action::Mkdir => "mkdir",
        Action::SetAttrs => "attrs",
        Action::Symlink => "symlink",
        Action::HardLink => "hardlink",
        Action::Skip => "skip",
    }
}

/// `[REMOTE: ]ACTION PATH (DETAIL[, N bytes])`, the tree's root being `.`.
pub fn item_line(item: &PlanItem, remote_label: Option<&str>) -> String {
    let mut s = String::new();
    if let Some(l) = remote_label {
        s.push_str(l);
        s.push_str(": ");
    }
    let path = if item.path.is_empty() {
        ".".to_owned()
    } else {
        escape_path(&item.path)
    };
    s.push_str(&format!("{:<8} {path}", action_name(item.action)));
    let mut detail = item.detail.clone();
    if item.action == Action::Transfer {
        detail = format!("{detail}, {} bytes", item.size);
    }
    if !detail.is_empty() {
        s.push_str(&format!(" ({detail})"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_like_rsync() {
        assert_eq!(escape_path(b"a b"), "a b");
        assert_eq!(escape_path(b"a\nb"), "a\\#012b");
        assert_eq!(escape_path(b"\xffx"), "\\#377x");
    }
}
