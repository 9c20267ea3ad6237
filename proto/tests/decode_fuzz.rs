//! Stable-toolchain twin of the cargo-fuzz targets in `fuzz/`: the same
//! oracles (`decode_checks`) fed with random and mutated-valid input by
//! proptest. Crashing inputs found by either are pinned below as
//! `regression_*` tests.

mod decode_checks;

use decode_checks as checks;
use fleetsync_proto::frame::{MAX_FRAME, MAX_HANDSHAKE_FRAME};
use fleetsync_proto::{
    ClassificationSpec, FileEntry, FileKind, FilterRule, Msg, Selector, SyncRequest,
};
use fleetsync_select::{parse_expr, Classification};
use proptest::prelude::*;

/// Valid messages of several shapes, to mutate.
fn seeds() -> Vec<Msg> {
    let entry = |path: &[u8], kind| FileEntry {
        path: path.to_vec(),
        kind,
        mode: 0o755,
        uid: 1000,
        gid: 1000,
        inode: 42,
        dev: 7,
        nlink: 2,
        size: 4096,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 5,
        link_target: (kind == FileKind::Symlink).then(|| b"../t".to_vec()),
        rdev: 0,
        digest: None,
    };
    let classification = ClassificationSpec {
        rules: vec![
            FilterRule {
                exclude: true,
                pattern: "*.o".into(),
            },
            FilterRule {
                exclude: false,
                pattern: "src/**".into(),
            },
        ],
        select: Some(Selector::Or(vec![
            Selector::Ext("rs".into()),
            Selector::Not(Box::new(Selector::Name("b*".into()))),
        ])),
    };
    vec![
        Msg::Hello {
            protocol: 1,
            nonce: vec![9; 32],
        },
        Msg::Error {
            request_id: 3,
            message: "gone".into(),
        },
        Msg::ListRequest {
            request_id: 1,
            classification: classification.clone(),
            batch_size: 100,
            sweep_partials: false,
            cached_digests: String::new(),
        },
        Msg::ListBatch {
            request_id: 1,
            entries: vec![
                entry(b"", FileKind::Dir),
                entry(b"a b/c", FileKind::File),
                entry(b"l\xff", FileKind::Symlink),
            ],
            last: true,
        },
        Msg::ChecksumRequest {
            request_id: 2,
            algorithm: "crc32".into(),
            paths: vec![b"a".to_vec(), b"b/c".to_vec()],
            fresh: false,
        },
        Msg::SyncRequest(SyncRequest {
            master: "127.0.0.1:1".into(),
            remotes: vec!["127.0.0.1:2".into(), "h:3".into()],
            algorithm: "crc32".into(),
            classification,
            ..Default::default()
        }),
    ]
}

fn seed_frames() -> Vec<Vec<u8>> {
    seeds().iter().map(|m| m.to_frame().unwrap()).collect()
}

/// Flips, overwrites, inserts and deletes bytes of `f`.
fn mutate(mut f: Vec<u8>, edits: &[(prop::sample::Index, u8, u8)]) -> Vec<u8> {
    for (i, op, b) in edits {
        if f.is_empty() {
            f.push(*b);
            continue;
        }
        let k = i.index(f.len());
        match op % 4 {
            0 => f[k] ^= *b,
            1 => f[k] = *b,
            2 => f.insert(k, *b),
            _ => {
                f.remove(k);
            }
        }
    }
    f
}

fn edits() -> impl Strategy<Value = Vec<(prop::sample::Index, u8, u8)>> {
    proptest::collection::vec(
        (any::<prop::sample::Index>(), any::<u8>(), any::<u8>()),
        1..6,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn random_streams_decode_alike_in_any_pieces(
        stream in proptest::collection::vec(any::<u8>(), 0..600),
        cuts in proptest::collection::vec(any::<u16>(), 0..20),
        small in any::<bool>(),
    ) {
        checks::frame_stream(&stream, &cuts, if small { MAX_HANDSHAKE_FRAME } else { MAX_FRAME });
    }

    #[test]
    fn mutated_frame_streams_decode_alike_in_any_pieces(
        picks in proptest::collection::vec(any::<prop::sample::Index>(), 1..4),
        edits in edits(),
        cuts in proptest::collection::vec(any::<u16>(), 0..20),
    ) {
        let frames = seed_frames();
        let mut stream = Vec::new();
        for p in &picks {
            stream.extend_from_slice(&frames[p.index(frames.len())]);
        }
        let stream = mutate(stream, &edits);
        checks::frame_stream(&stream, &cuts, MAX_FRAME);
    }

    #[test]
    fn mutated_bodies_decode_consistently(
        pick in any::<prop::sample::Index>(),
        edits in edits(),
    ) {
        let frames = seed_frames();
        let f = &frames[pick.index(frames.len())];
        checks::msg_body(&mutate(f[4..].to_vec(), &edits));
    }

    #[test]
    fn random_select_text_never_panics(s in ".{0,40}") {
        checks::select_expr(&s);
    }

    #[test]
    fn select_like_text_never_panics(
        s in r#"(( |\(|\)|not |and |or |name:|path:|ext:|"|'|\*|\*\*|/|\.|\[|\]|\{|\}|,|\\|a|b\.rs)){0,16}"#,
    ) {
        checks::select_expr(&s);
    }
}

/// Runs `f` on a thread with a small stack, as agent and server connection
/// threads have, so that unbounded recursion fails the test.
fn on_small_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

fn wire_round_trip(c: &Classification) -> Result<Msg, fleetsync_proto::ProtoError> {
    let m = Msg::ListRequest {
        request_id: 1,
        classification: ClassificationSpec::from(c),
        batch_size: 0,
        sweep_partials: false,
        cached_digests: String::new(),
    };
    Msg::decode(&m.to_frame().unwrap()[4..])
}

/// `path:/` parsed to an empty glob that displayed as `path:""`, which did
/// not parse back.
#[test]
fn regression_select_path_of_only_slashes_is_an_error() {
    assert!(parse_expr("path:/").is_err());
    assert!(parse_expr("path://").is_err());
    checks::select_expr("path:/");
}

/// Values with quote characters displayed unquoted (`name:a'b`), which
/// read back as an unterminated quote.
#[test]
fn regression_select_values_with_quotes_display_round_trip() {
    for s in [
        r#"name:"a'b""#,
        r#"name:'a"b'"#,
        r#"name:"a b"'"'"#,
        r#"ext:''"#,
        r#"path:"x y"/z"#,
    ] {
        checks::select_expr(s);
    }
}

/// `ext:a or ext:b or ...` with 31 or more terms nested one wire level per
/// term and every agent rejected the list request (nesting limit).
#[test]
fn regression_select_long_or_chain_crosses_the_wire() {
    let s = (0..200)
        .map(|i| format!("ext:e{i}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let c = Classification {
        rules: vec![],
        select: Some(parse_expr(&s).unwrap()),
    };
    match wire_round_trip(&c).unwrap() {
        Msg::ListRequest { classification, .. } => {
            let back = Classification::from(&classification);
            let m = back.compile().unwrap();
            assert!(m.is_included(b"x.e199", false));
            assert!(!m.is_included(b"x.f", false));
        }
        other => panic!("{other:?}"),
    }
}

/// Deeply nested `(`/`not` overflowed the stack of the parser (a crash,
/// not an error) from a command-line argument.
#[test]
fn regression_select_deep_nesting_is_an_error_not_a_stack_overflow() {
    on_small_stack(|| {
        let parens = format!("{}name:a{}", "(".repeat(100_000), ")".repeat(100_000));
        let e = parse_expr(&parens).unwrap_err();
        assert!(e.message.contains("nested"), "{e}");
        assert!(parse_expr(&format!("{}name:a", "not ".repeat(100_000))).is_err());
        // What people write stays fine.
        let ok = format!("{}name:a{}", "(not ".repeat(10), ")".repeat(10));
        parse_expr(&ok).unwrap();
    });
}

/// A list request whose selector is one `or` of 100,000 operands (≈1 MiB,
/// well within the frame and traversal limits) became a 100,000-deep tree
/// on the agent, whose compile/match/drop recursion overflowed the stack:
/// one authenticated message crashed the agent.
#[test]
fn regression_wide_wire_selector_does_not_overflow_the_agent_stack() {
    let wide = Selector::Or(
        (0..100_000)
            .map(|i| Selector::Ext(format!("e{i}")))
            .collect(),
    );
    let m = Msg::ListRequest {
        request_id: 1,
        classification: ClassificationSpec {
            rules: vec![],
            select: Some(wide),
        },
        batch_size: 0,
        sweep_partials: false,
        cached_digests: String::new(),
    };
    let frame = m.to_frame().unwrap();
    on_small_stack(move || {
        let Msg::ListRequest { classification, .. } = Msg::decode(&frame[4..]).unwrap() else {
            panic!("not a list request");
        };
        checks::wire_classification(&classification, &[b"x.e99999"]);
        let m = Classification::from(&classification).compile().unwrap();
        assert!(m.is_included(b"x.e99999", false));
    });
}

/// Writes seed inputs for the cargo-fuzz targets:
/// `FLEETSYNC_FUZZ_CORPUS=fuzz/corpus cargo test -p fleetsync-proto --test decode_fuzz -- --ignored write_fuzz_seeds`
#[test]
#[ignore = "writes the fuzz seed corpus; run by hand"]
fn write_fuzz_seeds() {
    let Some(dir) = std::env::var_os("FLEETSYNC_FUZZ_CORPUS") else {
        panic!("set FLEETSYNC_FUZZ_CORPUS to the corpus directory (fuzz/corpus)");
    };
    let dir = std::path::PathBuf::from(dir);
    let put = |target: &str, name: String, data: &[u8]| {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), data).unwrap();
    };
    let frames = seed_frames();
    let mut all = vec![0u8, 7];
    for (k, f) in frames.iter().enumerate() {
        put("msg_decode", format!("seed-{k}"), &f[4..]);
        put(
            "frame_decoder",
            format!("seed-{k}"),
            &[&[0u8, k as u8][..], f].concat(),
        );
        all.extend_from_slice(f);
    }
    put("frame_decoder", "seed-all".into(), &all);
    for (k, s) in [
        "ext:rs and not path:target/**",
        "(name:\"a b\" or name:'x\"y') and not ext:tar.gz",
        "not (path:src/** or name:*.{c,h}) || ext:o && !name:[ab]*",
    ]
    .iter()
    .enumerate()
    {
        put("select_expr", format!("seed-{k}"), s.as_bytes());
    }
}

/// Found by `cargo fuzz run msg_decode`: a 352-byte listBatch whose entries
/// are a list of zero-sized structs decoded into 2,097,277 file entries
/// (~640 ms and hundreds of MB per frame; 4 KiB frames are accepted before
/// the handshake). The traversal limit now scales with the frame's size.
#[test]
fn regression_zero_sized_struct_list_cannot_amplify_a_small_frame() {
    let hex = "000000002b0000000000000001000100040000000000000000000000020001000100000000000000010000000000000001000000e80300010000000000008f0001000000ed010000e8030000e80300002a0000000000000007000000000000000200000000000000001000000000000000f1536500000000050000000000000000000000000000005d00000002000000000000000000000000000000ed010000e8030000e80300002a0000000000000007000000000000000200000000000000001000000000000000f153650000000005000000000000000000000000000000300000002a000000000000000000000002000000ed010000e8030000e80300002a0000000000000007000000000000000200000000000000001000000000000000f153650000000005000000000000000000000000000000005d00000002000000000000000000000000000000ed010000ff0000000000002e2e2f7400000000";
    let body: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    match Msg::decode(&body) {
        Ok(Msg::ListBatch { entries, .. }) => assert!(
            entries.len() <= body.len(),
            "{} entries from {} bytes",
            entries.len(),
            body.len()
        ),
        Ok(other) => panic!("{}", other.kind_name()),
        Err(_) => {}
    }
    checks::msg_body(&body);
}

/// The size-scaled traversal limit still lets the biggest honest messages
/// through: a full 16 MiB-class list batch and a 1 MiB chunk.
#[test]
fn big_honest_messages_still_decode() {
    let entries: Vec<FileEntry> = (0..60_000)
        .map(|i| FileEntry {
            path: format!("some/fairly/long/directory/name/file-{i:08}.dat").into_bytes(),
            kind: FileKind::File,
            mode: 0o644,
            uid: 1,
            gid: 1,
            inode: i,
            dev: 1,
            nlink: 1,
            size: i,
            mtime_sec: 1,
            mtime_nsec: 2,
            link_target: None,
            rdev: 0,
            digest: None,
        })
        .collect();
    let m = Msg::ListBatch {
        request_id: 9,
        entries,
        last: true,
    };
    let f = m.to_frame().unwrap();
    assert_eq!(Msg::decode(&f[4..]).unwrap(), m);
    let reader = fleetsync_proto::frame::parse(&f[4..]).unwrap();
    let (_, _, it) = fleetsync_proto::list_batch_entries(&reader)
        .unwrap()
        .unwrap();
    let mut n = 0;
    for e in it {
        assert!(e.unwrap().path.starts_with(b"some/"));
        n += 1;
    }
    assert_eq!(n, 60_000);
    let chunk = Msg::FileChunk {
        data: vec![7; fleetsync_proto::frame::MAX_CHUNK],
        zstd: false,
    };
    let f = chunk.to_frame().unwrap();
    assert_eq!(Msg::decode(&f[4..]).unwrap(), chunk);
}
