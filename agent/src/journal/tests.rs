//! Unit tests of the journal.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use super::record::{decode_journal, encode_journal, SlotOp};
use super::*;

#[test]
fn relpath_rejects_escapes() {
    for bad in [
        "",
        "/etc/passwd",
        "../x",
        "a/../b",
        "a/./b",
        "a//b",
        "a/",
        ".fleetsync-staging/x",
        "a/\0b",
    ] {
        assert!(RelPath::new(bad).is_err(), "{bad:?} accepted");
    }
    assert!(RelPath::new("a/b c/..d").is_ok());
}

#[test]
fn journal_round_trips_odd_names() {
    let odd = OsString::from_vec(b"dir/na me\n%\xff".to_vec());
    let ops = vec![
        SlotOp {
            slot: 1,
            op: JournalOp::Put {
                path: RelPath::new(&odd).unwrap(),
                attrs: JournalAttrs {
                    mode: Some(0o4755),
                    mtime: Some(Mtime { secs: -5, nanos: 7 }),
                    uid: Some(0),
                    gid: None,
                },
            },
        },
        SlotOp {
            slot: 2,
            op: JournalOp::Symlink {
                path: RelPath::new("l").unwrap(),
                target: PathBuf::from(" ../x y"),
                attrs: JournalAttrs::default(),
            },
        },
        SlotOp {
            slot: 3,
            op: JournalOp::HardLink {
                path: RelPath::new("h").unwrap(),
                target: RelPath::new(&odd).unwrap(),
            },
        },
        SlotOp {
            slot: 4,
            op: JournalOp::Delete {
                path: RelPath::new("-").unwrap(),
            },
        },
    ];
    let text = encode_journal("blk one", &ops);
    let (block, back) = decode_journal(text.as_bytes()).unwrap();
    assert_eq!(block, "blk one");
    assert_eq!(back, ops);
    // A torn journal is detected.
    let torn = &text[..text.len() - 6];
    assert!(decode_journal(torn.as_bytes()).is_err());
}
