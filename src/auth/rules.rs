//! Publish rules of one identity: allow patterns, deny patterns; deny wins, and nothing is
//! allowed that no allow pattern matches.

use crate::subject::{Pattern, SubjectError};

#[derive(Clone, Debug, Default)]
pub struct Rules {
    allow: Vec<Pattern>,
    deny: Vec<Pattern>,
}

impl Rules {
    pub fn new(allow: Vec<Pattern>, deny: Vec<Pattern>) -> Self {
        Self { allow, deny }
    }

    pub fn parse(allow: &[String], deny: &[String]) -> Result<Self, SubjectError> {
        let parse =
            |v: &[String]| v.iter().map(|p| Pattern::parse(p)).collect::<Result<Vec<_>, _>>();
        Ok(Self { allow: parse(allow)?, deny: parse(deny)? })
    }

    /// Whether a valid, wildcard-free subject may be published on.
    pub fn permits(&self, subject: &str) -> bool {
        !self.deny.iter().any(|p| p.matches(subject))
            && self.allow.iter().any(|p| p.matches(subject))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_wins_and_default_is_deny() {
        let r = Rules::parse(&["edge.>".into()], &["edge.admin.>".into()]).unwrap();
        assert!(r.permits("edge.click"));
        assert!(!r.permits("edge.admin.x"));
        assert!(!r.permits("other.x"));
        assert!(!Rules::default().permits("edge.click"));
    }
}
