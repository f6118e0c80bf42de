//! Network bytes → subject validation and pattern parsing and matching. Must never panic, and
//! a subject that validates never contains a wildcard or an empty token.
#![no_main]

use edgerelay::subject::{validate, Pattern};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Split the input into a pattern and a subject at the first newline.
    let (pattern, subject) = text.split_once('\n').unwrap_or((text, text));
    if validate(subject, 256).is_ok() {
        assert!(!subject.split('.').any(|t| t.is_empty() || t == "*" || t == ">"));
        if let Ok(p) = Pattern::parse(pattern) {
            let _ = p.matches(subject);
            assert!(Pattern::everything().matches(subject));
        }
    }
});
