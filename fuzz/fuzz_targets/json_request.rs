//! Network bytes → JSON multi-event body decoder. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edgerelay::ingest::json::decode_request(data, 1000);
});
