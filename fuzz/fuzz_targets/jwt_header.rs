//! Bearer tokens from the network → the JWT header reader that runs before any key lookup.
//! Must never panic, and never accept `none` or an HMAC algorithm.
#![no_main]

use std::sync::OnceLock;

use edgerelay::auth::jwt::Validator;
use edgerelay::auth::rbac::Roles;
use edgerelay::auth::config::JwtConfig;
use libfuzzer_sys::fuzz_target;

fn validator() -> &'static Validator {
    static V: OnceLock<Validator> = OnceLock::new();
    V.get_or_init(|| Validator::new(&JwtConfig::default(), Roles::default(), None))
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    if let Ok(header) = validator().header(token) {
        assert!(!format!("{:?}", header.alg).starts_with("HS"));
    }
});
