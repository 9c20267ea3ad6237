//! The checked-in generated code is what `regen.sh` produces from the schema.

use std::path::Path;
use std::process::Command;

#[test]
fn checked_in_generated_code_matches_schema() {
    let have = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    // A missing tool fails the test: a skipped check would pass without checking anything.
    assert!(
        have("capnp"),
        "the Cap'n Proto compiler `capnp` is not installed: run `bash .ci/setup` \
         (Debian package capnproto)"
    );
    let home = std::env::var("HOME").unwrap_or_default();
    let crates =
        std::fs::read_to_string(Path::new(&home).join(".cargo/.crates.toml")).unwrap_or_default();
    assert!(
        crates.contains("capnpc 0.21.4"),
        "capnpc-rust 0.21.4 is not installed: run `bash .ci/setup` \
         (or `cargo install --locked capnpc --version =0.21.4`)"
    );
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("fleetsync-regen-{}", std::process::id()));
    let status = Command::new(crate_dir.join("regen.sh"))
        .arg(&out)
        .status()
        .expect("run regen.sh");
    assert!(status.success(), "regen.sh failed");
    let fresh = std::fs::read(out.join("fleetsync_capnp.rs")).unwrap();
    let checked_in = std::fs::read(crate_dir.join("src/fleetsync_capnp.rs")).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    assert!(
        fresh == checked_in,
        "proto/src/fleetsync_capnp.rs is stale: run proto/regen.sh"
    );
}
