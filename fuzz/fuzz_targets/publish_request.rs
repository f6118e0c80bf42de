//! Network bytes → protobuf `PublishRequest` decoder (HTTP bodies now, QUIC frames later).
//! Must never panic; whatever decodes must be bounded by the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(events) =
        edgerelay::ingest::decode_publish_request(bytes::Bytes::copy_from_slice(data), 1000)
    {
        let total: usize = events.iter().map(|e| e.payload.len() + e.subject.len()).sum();
        assert!(total <= data.len());
    }
});
