//! Network bytes → the token-first scan of a native frame (`edgerelay_proto::request`): the
//! token and the event count the relay reads before decoding any event. Must never panic, must
//! agree with prost wherever both accept the bytes, and must find in any head of a frame only a
//! token prost would also see.
#![no_main]

use edgerelay::proto::request::{scan, token_in_head, ScanError};
use edgerelay::proto::PublishRequest;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let scanned = scan(data, 64);
    if let (Ok(s), Ok(req)) = (&scanned, PublishRequest::decode(data)) {
        assert_eq!(s.events, req.events.len());
        assert_eq!(s.token.unwrap_or(""), req.token);
    }
    if let Err(ScanError::TooManyEvents { max }) = scanned {
        assert_eq!(max, 64);
    }
    for cut in [0, data.len().min(1), data.len() / 2, data.len()] {
        if let Some(token) = token_in_head(&data[..cut]) {
            assert!(!token.is_empty() && token.len() <= cut);
        }
    }
});
