//! Decoding arbitrary bytes never panics: it returns a message or an error.

use fleetsync_proto::frame::{self, FrameDecoder};
use fleetsync_proto::Msg;
use proptest::prelude::*;

fn decode_all(bytes: &[u8]) {
    let mut dec = FrameDecoder::new();
    dec.push(bytes);
    while let Ok(Some(body)) = dec.next_frame() {
        let _ = Msg::decode(&body);
        if let Ok(r) = frame::parse(&body) {
            if let Ok(Some((_, _, it))) = fleetsync_proto::list_batch_entries(&r) {
                for e in it {
                    let _ = e;
                }
            }
        }
    }
    let _ = Msg::decode(bytes);
    let _ = frame::read_frame(&mut &bytes[..]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        idx in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let msgs = [
            Msg::Error { request_id: 1, message: "x".into() },
            Msg::ListBatch { request_id: 1, entries: vec![fleetsync_proto::FileEntry {
                path: b"p".to_vec(), kind: fleetsync_proto::FileKind::File, mode: 0o644, uid: 0, gid: 0,
                inode: 1, dev: 1, nlink: 1, size: 1, mtime_sec: 0, mtime_nsec: 0,
                link_target: Some(b"t".to_vec()), rdev: 0, digest: None, }], last: true },
            Msg::SyncRequest(fleetsync_proto::SyncRequest {
                master: "m".into(), remotes: vec!["r".into()], algorithm: "crc32".into(),
                classification: fleetsync_proto::ClassificationSpec {
                    rules: vec![],
                    select: Some(fleetsync_proto::Selector::Not(Box::new(fleetsync_proto::Selector::Ext("c".into())))),
                },
                ..Default::default()
            }),
        ];
        let mut f = msgs[idx.index(msgs.len())].to_frame().unwrap();
        for (i, b) in flips {
            let n = f.len();
            f[i.index(n)] ^= b;
        }
        decode_all(&f);
    }
}

/// Deeply nested selectors hit the nesting limit instead of the stack.
#[test]
fn regression_deep_selector_nesting_is_an_error() {
    use fleetsync_proto::{ClassificationSpec, Selector};
    let mut s = Selector::All;
    for _ in 0..200 {
        s = Selector::Not(Box::new(s));
    }
    let m = Msg::ListRequest {
        request_id: 1,
        classification: ClassificationSpec {
            rules: vec![],
            select: Some(s),
        },
        batch_size: 0,
        sweep_partials: false,
        cached_digests: String::new(),
    };
    let f = m.to_frame().unwrap();
    assert!(Msg::decode(&f[4..]).is_err());
}

proptest! {
    #[test]
    fn frame_buf_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut r = &bytes[..];
        let mut buf = frame::FrameBuf::new();
        while let Ok(true) = buf.read(&mut r, frame::MAX_FRAME) {
            if let Ok(reader) = buf.parse() {
                if let Ok(root) = reader.get_root() {
                    let _ = Msg::from_reader(root);
                }
            }
        }
    }
}
