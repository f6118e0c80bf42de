//! Subject templates of roles: a subject pattern with `{claims.<path>}` placeholders, filled
//! in from a token's claims (sans-IO). [`super::rbac`] grants them; the `[auth]` config
//! section checks them with [`Template::parse`] at load.
//!
//! A claim filled into a subject must be one subject token (`[A-Za-z0-9_-]`, at most
//! [`MAX_CLAIM_TOKEN_BYTES`] bytes), so a claim can never smuggle in a `.`, `*` or `>`.

use serde_json::{Map, Value};

use crate::subject::{Pattern, SubjectError};

/// Longest claim value filled into a subject pattern.
pub const MAX_CLAIM_TOKEN_BYTES: usize = 64;

/// A subject pattern with `{claims.<path>}` placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// A claim, by its path (`org.id` → `{"org": {"id": …}}`).
    Claim(Vec<String>),
}

/// A role or template that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    #[error("unclosed or empty placeholder in {0:?}")]
    Placeholder(String),
    #[error("placeholder {0:?} must be {{claims.<name>}}")]
    NotAClaim(String),
    #[error("pattern {pattern:?} is not a valid subject pattern: {error}")]
    Pattern { pattern: String, error: SubjectError },
}

impl Template {
    pub fn parse(s: &str) -> Result<Self, RoleError> {
        let mut pieces = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or_else(|| RoleError::Placeholder(s.to_owned()))?;
            let inner = &after[..close];
            let path = inner
                .strip_prefix("claims.")
                .ok_or_else(|| RoleError::NotAClaim(inner.to_owned()))?;
            let path: Vec<String> = path.split('.').map(str::to_owned).collect();
            if path.iter().any(|p| p.is_empty()) {
                return Err(RoleError::Placeholder(s.to_owned()));
            }
            pieces.push(Piece::Claim(path));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(RoleError::Placeholder(s.to_owned()));
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        let template = Self { pieces };
        // Filled with a valid token everywhere, it must be a valid pattern.
        let sample = template.render(|_| Some("x")).unwrap_or_default();
        Pattern::parse(&sample)
            .map_err(|error| RoleError::Pattern { pattern: s.to_owned(), error })?;
        Ok(template)
    }

    /// The pattern with the token's claims filled in; `None` when a claim is missing or not
    /// a single subject token.
    pub fn fill(&self, claims: &Map<String, Value>) -> Option<Pattern> {
        let rendered = self.render(|path| lookup(claims, path).and_then(as_subject_token))?;
        Pattern::parse(&rendered).ok()
    }

    fn render<'a>(&self, mut claim: impl FnMut(&[String]) -> Option<&'a str>) -> Option<String> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Claim(path) => out.push_str(claim(path)?),
            }
        }
        Some(out)
    }
}

/// The claim at `path`.
pub(super) fn lookup<'a>(claims: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    rest.iter().try_fold(claims.get(first)?, |v, p| v.as_object()?.get(p))
}

/// A claim value usable inside a subject: a string of one subject token.
fn as_subject_token(v: &Value) -> Option<&str> {
    let s = v.as_str()?;
    let ok = !s.is_empty()
        && s.len() <= MAX_CLAIM_TOKEN_BYTES
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_templates_are_refused_at_load() {
        for bad in [
            "edge.{claims.tenant",
            "edge.{tenant}.>",
            "edge.{claims.}.x",
            "edge.}.x",
            "edge..{claims.t}",
            "edge.{claims.t}x>",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
        assert!(Template::parse("edge.{claims.t}.>").is_ok());
    }
}
