//! Authentication and authorization: the one stage every request passes through, whatever
//! protocol it came in on. It turns credentials into an [`Identity`], and an identity plus a
//! subject into yes or no. Publishing is the only thing the edge can ever be allowed to do.
//!
//! - [`rules`]: allow/deny subject patterns (sans-IO).
//! - [`static_tokens`]: bearer tokens from the config (development and tests).

pub mod rules;
pub mod static_tokens;

use std::sync::Arc;

pub use rules::Rules;

use crate::config::AuthConfig;
use crate::error::{ErrorCode, Refusal};

/// What a request presents to prove who it is.
#[derive(Clone, Copy, Debug, Default)]
pub struct Credentials<'a> {
    /// The token of an `Authorization: Bearer …` header.
    pub bearer: Option<&'a str>,
}

/// Who is publishing, and where they may.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Recorded as `publisher` on each event.
    pub name: Arc<str>,
    pub rules: Arc<Rules>,
}

/// The authentication and authorization stage.
#[derive(Debug)]
pub struct Auth {
    static_tokens: static_tokens::StaticTokens,
}

impl Auth {
    /// Builds the stage from (validated) configuration.
    pub fn new(cfg: &AuthConfig) -> Self {
        Self { static_tokens: static_tokens::StaticTokens::new(&cfg.static_tokens) }
    }

    /// Checks the credentials. Asynchronous because identity providers may need a key fetch.
    pub async fn authenticate(&self, creds: Credentials<'_>) -> Result<Identity, Refusal> {
        let Some(token) = creds.bearer else {
            return Err(Refusal::new(
                ErrorCode::Unauthorized,
                "missing credentials: send Authorization: Bearer <token>",
            ));
        };
        self.static_tokens
            .identify(token)
            .ok_or_else(|| Refusal::new(ErrorCode::Unauthorized, "unknown or expired token"))
    }

    /// May `identity` publish on `subject` (an already valid subject)?
    pub fn authorize(&self, identity: &Identity, subject: &str) -> Result<(), Refusal> {
        if identity.rules.permits(subject) {
            Ok(())
        } else {
            Err(Refusal::new(
                ErrorCode::Forbidden,
                format!("{} may not publish on this subject", identity.name),
            ))
        }
    }
}

/// Extracts the token of an `Authorization` header value (`Bearer <token>`, case-insensitive
/// scheme). `None` for any other form.
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
