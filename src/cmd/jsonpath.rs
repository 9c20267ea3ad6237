//! Paths in `--json` output. JSON strings hold Unicode text, while file names are bytes: a
//! name that is not valid UTF-8 keeps a readable `"path"` (invalid bytes become U+FFFD) and
//! gets `"path_hex"`, its exact bytes in lowercase hex, so two such names never look alike.

use serde_json::{Map, Value};

/// Adds `"path"` (and `"path_hex"` when `path` is not valid UTF-8) to the JSON object `v`.
pub fn with_path(mut v: Value, path: &[u8]) -> Value {
    if let Value::Object(obj) = &mut v {
        insert(obj, path);
    }
    v
}

fn insert(obj: &mut Map<String, Value>, path: &[u8]) {
    match std::str::from_utf8(path) {
        Ok(s) => {
            obj.insert("path".into(), Value::String(s.to_owned()));
        }
        Err(_) => {
            obj.insert(
                "path".into(),
                Value::String(String::from_utf8_lossy(path).into_owned()),
            );
            obj.insert("path_hex".into(), Value::String(hex(path)));
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_names_have_no_hex() {
        let v = with_path(serde_json::json!({"size": 1}), "café/x".as_bytes());
        assert_eq!(v["path"], "café/x");
        assert!(v.get("path_hex").is_none());
    }

    #[test]
    fn non_utf8_names_keep_their_bytes() {
        let a = with_path(serde_json::json!({}), b"caf\xe9");
        let b = with_path(serde_json::json!({}), b"caf\xff");
        assert_eq!(a["path"], b["path"]);
        assert_eq!(a["path_hex"], "636166e9");
        assert_eq!(b["path_hex"], "636166ff");
    }
}
