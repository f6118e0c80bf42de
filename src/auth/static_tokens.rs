//! Static bearer tokens from the configuration. Looked up by their SHA-256, so comparing a
//! presented token never leaks its bytes through timing.

use std::collections::HashMap;
use std::sync::Arc;

use super::config::StaticToken;
use super::jwt::digest;
use super::{Identity, Rules, Source};

#[derive(Debug, Default)]
pub struct StaticTokens {
    by_digest: HashMap<[u8; 32], Identity>,
}

impl StaticTokens {
    /// Builds the table; patterns were checked by config validation, an invalid one (not
    /// possible after validation) makes that token allow nothing.
    pub fn new(tokens: &[StaticToken]) -> Self {
        let by_digest = tokens
            .iter()
            .map(|t| {
                let rules = Rules::parse(&t.allow, &t.deny).unwrap_or_default();
                let identity = Identity {
                    name: Source::Static(&t.name).name(),
                    rules: Arc::new(rules),
                    expires: None,
                    tenant: None,
                };
                (digest(&t.token), identity)
            })
            .collect();
        Self { by_digest }
    }

    pub fn identify(&self, token: &str) -> Option<Identity> {
        self.by_digest.get(&digest(token)).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_map_to_identities() {
        let t = StaticTokens::new(&[StaticToken {
            name: "edge".into(),
            token: "0123456789abcdef".into(),
            allow: vec!["edge.>".into()],
            deny: vec![],
        }]);
        let id = t.identify("0123456789abcdef").unwrap();
        assert_eq!(&*id.name, "static:edge");
        assert!(id.rules.permits("edge.x"));
        assert!(t.identify("0123456789abcdeX").is_none());
    }
}
