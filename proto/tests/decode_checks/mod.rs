//! Oracles for decoding untrusted bytes, shared by the cargo-fuzz targets in
//! `fuzz/` and the stable property tests in `decode_fuzz.rs`.
//!
//! Each function takes arbitrary input, drives one decoder with it and panics
//! only if the decoder misbehaves: a panic inside the decoder, two decoding
//! paths that disagree, or a decoded value that does not survive re-encoding.
#![allow(dead_code)]

use fleetsync_proto::frame::{self, FrameDecoder};
use fleetsync_proto::{ClassificationSpec, FileEntry, Msg};
use fleetsync_select::{self as select, Classification, Rule};

/// Paths every compiled classification is asked about, besides input-derived ones.
const SAMPLE_PATHS: &[&[u8]] = &[
    b"",
    b"a",
    b"a/b",
    b"src/main.rs",
    b"target/debug/x.o",
    b"dir/sub/arch.tar.gz",
    b".hidden/.x",
    b"\xff\xfe/bad utf8",
];

/// Feeds `stream` to a [`FrameDecoder`] in pieces sized by `cuts` and checks
/// that it yields exactly the frames the blocking [`frame::read_frame_limited`]
/// yields, and fails where it fails; then decodes every frame body.
pub fn frame_stream(stream: &[u8], cuts: &[u16], max: usize) {
    let mut r = stream;
    let mut reference = Vec::new();
    let reference_failed = loop {
        match frame::read_frame_limited(&mut r, max) {
            Ok(Some(body)) => reference.push(body),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };

    let mut dec = FrameDecoder::with_max(max);
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut failed = false;
    let (mut pos, mut k) = (0usize, 0usize);
    'feed: while pos < stream.len() {
        let rest = stream.len() - pos;
        let n = cuts
            .get(k)
            .map_or(rest, |&c| (c as usize % 4096) + 1)
            .min(rest);
        k += 1;
        dec.push(&stream[pos..pos + n]);
        pos += n;
        loop {
            match dec.next_frame() {
                Ok(Some(body)) => {
                    assert!(body.len() <= max, "frame above the maximum");
                    got.push(body);
                }
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(got, reference, "FrameDecoder and read_frame disagree");
    if failed {
        assert!(
            reference_failed,
            "FrameDecoder failed where read_frame did not"
        );
    } else {
        // read_frame fails on a truncated tail; the decoder just waits for more.
        assert_eq!(
            reference_failed,
            dec.buffered() > 0,
            "truncated tail: read_frame and FrameDecoder disagree"
        );
    }
    for body in &got {
        msg_body(body);
    }
}

/// Decodes one frame body every way the agent and the server do, and checks
/// that the ways agree and that a decoded message re-encodes to itself.
pub fn msg_body(body: &[u8]) {
    let decoded = Msg::decode(body);

    // The server reads list batches without copying: it must agree.
    if let Ok(reader) = frame::parse(body) {
        if let Ok(Some((id, last, entries))) = fleetsync_proto::list_batch_entries(&reader) {
            let entries: Result<Vec<FileEntry>, _> =
                entries.map(|e| e.map(|e| e.to_owned())).collect();
            match (&decoded, entries) {
                (
                    Ok(Msg::ListBatch {
                        request_id,
                        entries: owned,
                        last: l,
                    }),
                    Ok(zero_copy),
                ) => {
                    assert_eq!((*request_id, *l), (id, last));
                    assert_eq!(owned, &zero_copy, "zero-copy entries differ");
                }
                (Ok(Msg::ListBatch { .. }), Err(e)) => {
                    panic!("Msg::decode accepted a batch whose entry fails zero-copy: {e}")
                }
                (Ok(other), _) => panic!("zero-copy saw a listBatch, Msg::decode saw {other:?}"),
                (Err(_), _) => {}
            }
        }
    }

    let Ok(msg) = decoded else { return };
    let _ = msg.kind_name();
    if let Ok(f) = msg.to_frame() {
        let again = Msg::decode(&f[4..]).expect("a decoded message re-encodes to a decodable one");
        assert_eq!(again, msg, "decode(encode(decode(x))) != decode(x)");
    }
    match &msg {
        Msg::ListRequest { classification, .. } => wire_classification(classification, &[]),
        Msg::SyncRequest(req) => wire_classification(&req.classification, &[]),
        Msg::ListBatch { entries, .. } => {
            let paths: Vec<&[u8]> = entries.iter().map(|e| e.path.as_slice()).collect();
            wire_classification(&ClassificationSpec::default(), &paths);
        }
        _ => {}
    }
}

/// What an agent does with a classification received on the wire.
pub fn wire_classification(spec: &ClassificationSpec, extra_paths: &[&[u8]]) {
    let c = Classification::from(spec);
    if let Ok(m) = c.compile() {
        for p in SAMPLE_PATHS.iter().chain(extra_paths) {
            let _ = m.decide(p, false);
            let _ = m.decide(p, true);
            let _ = m.explain(p);
        }
    }
}

/// The `--select` parser and everything downstream of it: display, compile,
/// match, and the trip over the wire to an agent.
pub fn select_expr(s: &str) {
    let as_rule = Classification {
        rules: vec![Rule::exclude(s), Rule::include(s)],
        select: None,
    };
    if let Ok(m) = as_rule.compile() {
        for p in SAMPLE_PATHS.iter().chain([&s.as_bytes()]) {
            let _ = m.decide(p, true);
            let _ = m.explain(p);
        }
    }

    let Ok(e) = select::parse_expr(s) else { return };
    let shown = e.to_string();
    let c = Classification {
        rules: vec![],
        select: Some(e),
    };
    if let Ok(m) = c.compile() {
        for p in SAMPLE_PATHS.iter().chain([&s.as_bytes()]) {
            let _ = m.decide(p, false);
            let _ = m.decide(p, true);
            let _ = m.explain(p);
        }
    }
    // What the control client sends and the agent receives.
    let spec = ClassificationSpec::from(&c);
    let msg = Msg::ListRequest {
        request_id: 1,
        classification: spec,
        batch_size: 0,
        sweep_partials: false,
        cached_digests: String::new(),
    };
    if let Ok(f) = msg.to_frame() {
        if let Ok(Msg::ListRequest { classification, .. }) = Msg::decode(&f[4..]) {
            assert_eq!(
                Classification::from(&classification),
                c,
                "classification changed on the wire"
            );
        }
    }
    // `--explain` and logs print expressions; what they print reads back the same.
    let back = select::parse_expr(&shown)
        .unwrap_or_else(|err| panic!("{s:?} displays as {shown:?}, which does not parse: {err}"));
    assert_eq!(
        Some(back),
        c.select,
        "{s:?} displays as {shown:?}, which parses differently"
    );
}
