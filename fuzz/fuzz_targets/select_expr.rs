//! `--select` expressions and `--include`/`--exclude` globs: parse, display,
//! compile, match and send over the wire without panicking or changing.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../proto/tests/decode_checks/mod.rs"]
mod checks;

fuzz_target!(|s: &str| {
    checks::select_expr(s);
});
