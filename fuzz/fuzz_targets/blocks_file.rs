//! `--blocks FILE` text: parsing never panics; an accepted file orders every
//! block after the blocks it names, and its selects compile and assign.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/fuzz_checks/mod.rs"]
mod checks;

fuzz_target!(|text: &str| {
    checks::blocks_file(text);
});
