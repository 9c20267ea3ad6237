//! One frame body: `Msg::decode`, the zero-copy list reader and re-encoding
//! agree; received classifications compile and match without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../proto/tests/decode_checks/mod.rs"]
mod checks;

fuzz_target!(|body: &[u8]| {
    checks::msg_body(body);
});
