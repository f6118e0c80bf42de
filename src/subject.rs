//! NATS subjects: validation of the subjects events are published on, and matching of the
//! wildcard patterns (`*`, `>`) that authorization rules and stream subjects are written in.
//!
//! Sans-IO and allocation-free on the hot path: a published subject is checked once at ingest,
//! and every rule match walks both strings token by token.

use std::fmt;

/// Why a subject or pattern was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// The subject is empty.
    #[error("subject is empty")]
    Empty,
    /// The subject is longer than the configured limit.
    #[error("subject is {len} bytes, more than the limit of {max}")]
    TooLong { len: usize, max: usize },
    /// Two dots in a row, or a leading or trailing dot.
    #[error("subject has an empty token")]
    EmptyToken,
    /// A wildcard in a subject that is to be published on.
    #[error("wildcards ('*', '>') cannot be published to")]
    Wildcard,
    /// A character outside `[A-Za-z0-9_-]` in a token.
    #[error("subject has a character outside [A-Za-z0-9_-] in a token")]
    BadCharacter,
    /// A pattern with `>` anywhere but as its last token, or a wildcard inside a token.
    #[error("'>' must be the last token and wildcards must be whole tokens")]
    BadWildcard,
}

/// A subject pattern in NATS wildcard syntax: `*` matches one token, a final `>` matches one or
/// more tokens. Used in authorization rules and stream subjects, never published to.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern(String);

/// Checks that `subject` may be published on: tokens of `[A-Za-z0-9_-]` separated by `.`, no
/// empty token, no wildcard, at most `max_len` bytes.
pub fn validate(subject: &str, max_len: usize) -> Result<(), SubjectError> {
    check(subject, max_len, false)
}

fn check(s: &str, max_len: usize, wildcards: bool) -> Result<(), SubjectError> {
    if s.is_empty() {
        return Err(SubjectError::Empty);
    }
    if s.len() > max_len {
        return Err(SubjectError::TooLong { len: s.len(), max: max_len });
    }
    let mut tokens = s.split('.').peekable();
    while let Some(token) = tokens.next() {
        match token {
            "" => return Err(SubjectError::EmptyToken),
            "*" | ">" if !wildcards => return Err(SubjectError::Wildcard),
            "*" => {}
            ">" if tokens.peek().is_none() => {}
            ">" => return Err(SubjectError::BadWildcard),
            _ => {
                for b in token.bytes() {
                    match b {
                        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' => {}
                        b'*' | b'>' if wildcards => return Err(SubjectError::BadWildcard),
                        b'*' | b'>' => return Err(SubjectError::Wildcard),
                        _ => return Err(SubjectError::BadCharacter),
                    }
                }
            }
        }
    }
    Ok(())
}

impl Pattern {
    /// Longest pattern accepted in configuration.
    pub const MAX_LEN: usize = 1024;

    /// Parses a pattern; wildcards must be whole tokens and `>` only last.
    pub fn parse(s: &str) -> Result<Self, SubjectError> {
        check(s, Self::MAX_LEN, true)?;
        Ok(Self(s.to_owned()))
    }

    /// `>`: every subject.
    pub fn everything() -> Self {
        Self(">".to_owned())
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the (already validated, wildcard-free) `subject` falls under this pattern.
    pub fn matches(&self, subject: &str) -> bool {
        let mut subject_tokens = subject.split('.');
        for p in self.0.split('.') {
            match (p, subject_tokens.next()) {
                (">", Some(_)) => return true,
                ("*", Some(_)) => {}
                (p, Some(s)) if p == s => {}
                _ => return false,
            }
        }
        subject_tokens.next().is_none()
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({})", self.0)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_subjects() {
        for s in ["a", "edge.events", "A-b_c.0.x-y", "edge.tenant-1.click"] {
            assert_eq!(validate(s, 256), Ok(()), "{s}");
        }
    }

    #[test]
    fn invalid_subjects() {
        let cases = [
            ("", SubjectError::Empty),
            ("a..b", SubjectError::EmptyToken),
            (".a", SubjectError::EmptyToken),
            ("a.", SubjectError::EmptyToken),
            ("a.*", SubjectError::Wildcard),
            ("a.>", SubjectError::Wildcard),
            ("a.b*", SubjectError::Wildcard),
            ("a b", SubjectError::BadCharacter),
            ("a.é", SubjectError::BadCharacter),
            ("a/b", SubjectError::BadCharacter),
            ("a\u{0}", SubjectError::BadCharacter),
        ];
        for (s, want) in cases {
            assert_eq!(validate(s, 256), Err(want), "{s:?}");
        }
        assert_eq!(validate("abcd", 3), Err(SubjectError::TooLong { len: 4, max: 3 }));
    }

    #[test]
    fn patterns_parse() {
        assert!(Pattern::parse("edge.>").is_ok());
        assert!(Pattern::parse("edge.*.click").is_ok());
        assert!(Pattern::parse(">").is_ok());
        assert_eq!(Pattern::parse("edge.>.x"), Err(SubjectError::BadWildcard));
        assert_eq!(Pattern::parse("edge.a*"), Err(SubjectError::BadWildcard));
        assert_eq!(Pattern::parse("edge..x"), Err(SubjectError::EmptyToken));
    }

    #[test]
    fn pattern_matching() {
        let m = |p: &str, s: &str| Pattern::parse(p).unwrap().matches(s);
        assert!(m("edge.>", "edge.a"));
        assert!(m("edge.>", "edge.a.b.c"));
        assert!(!m("edge.>", "edge"));
        assert!(!m("edge.>", "edgex.a"));
        assert!(m("edge.*.click", "edge.t1.click"));
        assert!(!m("edge.*.click", "edge.t1.view"));
        assert!(!m("edge.*.click", "edge.t1.click.x"));
        assert!(!m("edge.*", "edge.a.b"));
        assert!(m("edge.a", "edge.a"));
        assert!(!m("edge.a", "edge.a.b"));
        assert!(!m("edge.a.b", "edge.a"));
        assert!(m(">", "x.y"));
    }
}
