//! What a new user trips on (issue 13, "What users trip on today"), with real processes:
//! a token that differs between the parts, a weak token file, colours in redirected logs,
//! and the `-a` hint of `sync`.

use std::process::Output;

mod support;

use support::{fleetsync, logged, scratch_home};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn sync_and_verify_with_an_unknown_algorithm_point_to_the_list_as_sum_does() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, r) = (tmp.path().join("m"), tmp.path().join("r"));
    std::fs::create_dir(&m).unwrap();
    std::fs::create_dir(&r).unwrap();
    let sum = logged(
        "sum",
        fleetsync(scratch_home())
            .args(["sum", "-a", "no-such-alg"])
            .arg(tmp.path())
            .output()
            .unwrap(),
    );
    assert_eq!(sum.status.code(), Some(2));
    assert!(stderr(&sum).contains("(see --list)"), "{}", stderr(&sum));
    for command in ["sync", "verify"] {
        let out = logged(
            command,
            fleetsync(scratch_home())
                .args([command, "-a", "no-such-alg"])
                .arg(&m)
                .arg(&r)
                .output()
                .unwrap(),
        );
        assert_eq!(out.status.code(), Some(2), "{command}");
        let err = stderr(&out);
        assert!(
            err.contains("unknown checksum algorithm 'no-such-alg'"),
            "{err}"
        );
        assert!(err.contains("--list"), "{command}: {err}");
    }
}
