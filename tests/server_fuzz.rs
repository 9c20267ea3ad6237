//! Stable-toolchain twin of the `blocks_file` and `server_plan` cargo-fuzz
//! targets in `fuzz/`: the same oracles (`fuzz_checks`) fed by proptest.

mod fuzz_checks;

use fuzz_checks::Entry;
use proptest::prelude::*;

fn entry() -> impl Strategy<Value = Entry> {
    (
        proptest::collection::vec(any::<u8>(), 0..4),
        any::<u8>(),
        any::<u16>(),
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
        any::<u8>(),
    )
        .prop_map(
            |(comps, kind, mode, owner, size, mtime, nlink, inode, target)| Entry {
                comps,
                kind,
                mode,
                owner,
                size,
                mtime,
                nlink,
                inode,
                target,
            },
        )
}

const VALID_BLOCKS: &str = r#"
# Binaries first.
[block.binaries]
select = "path:usr/lib/app/** or path:usr/bin/app"

[block.config]
select = "path:etc/app/** and ext:conf"
after = ["binaries"]

[block.data-1]
select = 'not name:"*.tmp"'
after = "config"
"#;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn plans_of_arbitrary_lists_never_panic(
        master in proptest::collection::vec(entry(), 0..24),
        remote in proptest::collection::vec(entry(), 0..24),
        delete in any::<bool>(),
        owner in any::<bool>(),
        same in proptest::collection::vec(any::<bool>(), 0..24),
    ) {
        fuzz_checks::plan(&master, &remote, delete, owner, &same);
    }

    #[test]
    fn random_blocks_files_never_panic(s in ".{0,200}") {
        fuzz_checks::blocks_file(&s);
    }

    #[test]
    fn block_like_files_never_panic(
        s in r#"((\[block\.(a|b|c-1|_x|)\]|select = |after = |"|'|\[|\]|,|a|b|c-1|path:\*\*|ext:rs| or | and |not |\(|\)|#|\n)){0,40}"#,
    ) {
        fuzz_checks::blocks_file(&s);
    }

    #[test]
    fn mutated_valid_blocks_files_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
    ) {
        let mut b = VALID_BLOCKS.as_bytes().to_vec();
        for (i, c, op) in edits {
            let k = i.index(b.len());
            match op {
                0 => b[k] = c,
                1 => b.insert(k, c),
                2 => { b.remove(k); }
                _ => b[k] = b"[]\"'=,.\n#"[c as usize % 9],
            }
        }
        fuzz_checks::blocks_file(&String::from_utf8_lossy(&b));
    }
}

#[test]
fn the_documented_blocks_file_is_accepted() {
    fleetsync_server::blocks::BlocksFile::parse(VALID_BLOCKS).unwrap();
    fuzz_checks::blocks_file(VALID_BLOCKS);
}
