//! Who acts, and what they may do.
//!
//! A [`Principal`] is resolved by an adapter (HTTP token, XMPP JID, overlay peer id); the bus
//! asks it before every action. HTTP tokens carry [`Grants`]: node-name patterns for publish and
//! subscribe, and an admin flag for managing nodes.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A node-name pattern: an exact name, or a prefix followed by a trailing `*`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Pattern(String);

impl Pattern {
    /// Wraps a pattern.
    pub fn new(p: impl Into<String>) -> Self {
        Self(p.into())
    }

    /// Whether `node` matches.
    pub fn matches(&self, node: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => node.starts_with(prefix),
            None => self.0 == node,
        }
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// What a token's subject may do (the `juxta` claim of a JWT).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Grants {
    /// Nodes the subject may publish to (and retract from).
    pub publish: Vec<Pattern>,
    /// Nodes the subject may subscribe to and read.
    pub subscribe: Vec<Pattern>,
    /// Whether the subject may create, configure, purge and delete nodes.
    pub admin: bool,
}

/// Who acts.
#[derive(Clone, Debug)]
pub enum Principal {
    /// Holder of an admin key: may do everything.
    Admin,
    /// The subject of a token, with its grants.
    Subject {
        /// The token's `sub`.
        name: Arc<str>,
        /// What it may do.
        grants: Arc<Grants>,
    },
}

impl Principal {
    /// The name recorded as an item's publisher.
    pub fn name(&self) -> Arc<str> {
        match self {
            Principal::Admin => Arc::from("admin"),
            Principal::Subject { name, .. } => name.clone(),
        }
    }

    /// May publish to `node`.
    pub fn can_publish(&self, node: &str) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Subject { grants, .. } => {
                grants.admin || grants.publish.iter().any(|p| p.matches(node))
            }
        }
    }

    /// May subscribe to and read `node`.
    pub fn can_subscribe(&self, node: &str) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Subject { grants, .. } => {
                grants.admin || grants.subscribe.iter().any(|p| p.matches(node))
            }
        }
    }

    /// May manage nodes.
    pub fn is_admin(&self) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Subject { grants, .. } => grants.admin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exact_names_and_trailing_star_prefixes() {
        assert!(Pattern::new("alerts").matches("alerts"));
        assert!(!Pattern::new("alerts").matches("alerts2"));
        assert!(Pattern::new("sensors/*").matches("sensors/temp-7"));
        assert!(!Pattern::new("sensors/*").matches("sensor"));
        assert!(Pattern::new("*").matches("anything"));
    }

    #[test]
    fn subjects_get_only_what_their_grants_say() {
        let p = Principal::Subject {
            name: "bob".into(),
            grants: Arc::new(Grants {
                publish: vec![Pattern::new("x*")],
                subscribe: vec![Pattern::new("*")],
                admin: false,
            }),
        };
        assert!(p.can_publish("x1"));
        assert!(!p.can_publish("y"));
        assert!(p.can_subscribe("y"));
        assert!(!p.is_admin());
        assert!(Principal::Admin.can_publish("y"));
    }
}
