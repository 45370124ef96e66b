//! RFC 7622: XMPP addresses
//!
//! A JID is `[localpart@]domainpart[/resourcepart]`. Parsing follows RFC 7622 §3.1: the
//! resourcepart is everything after the first `/` (so it may itself contain `@` and `/`),
//! and the localpart is everything before the first `@` of what remains.
//!
//! Normalization is deliberately partial: the localpart and the domainpart are lowercased
//! with ASCII rules only, and the resourcepart is kept as given. Full PRECIS
//! (RFC 8264/8265: Unicode case folding, width mapping, NFC) and IDNA are out of scope, so two
//! JIDs that differ only in non-ASCII case compare unequal here.

use std::fmt;
use std::str::FromStr;

/// The largest size of each part of a JID, in bytes (RFC 7622 §3.2–3.4).
pub const MAX_JID_PART_BYTES: usize = 1023;

/// Characters that RFC 7622 §3.3.1 forbids in a localpart (besides whitespace and controls).
const FORBIDDEN_LOCAL: &[char] = &['"', '&', '\'', '/', ':', '<', '>', '@'];

/// An XMPP address: `[local@]domain[/resource]`, validated and with its localpart and
/// domainpart lowercased (ASCII only, see the module documentation).
///
/// Ordering compares the localpart, then the domainpart, then the resourcepart (a missing
/// part sorts first).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Jid {
    local: Option<String>,
    domain: String,
    resource: Option<String>,
}

/// The part of a JID that a [`JidError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JidPart {
    /// The part before `@`.
    Local,
    /// The host part.
    Domain,
    /// The part after the first `/`.
    Resource,
}

impl fmt::Display for JidPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Local => "localpart",
            Self::Domain => "domainpart",
            Self::Resource => "resourcepart",
        })
    }
}

/// Why a string is not a valid JID. The message names the part, never the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JidError {
    /// A part is present but empty (`@example.com`, `example.com/`, ``).
    #[error("the {0} of the JID is empty")]
    Empty(JidPart),
    /// A part is longer than [`MAX_JID_PART_BYTES`].
    #[error("the {0} of the JID is longer than 1023 bytes")]
    TooLong(JidPart),
    /// A part contains a character it may not contain.
    #[error("the {0} of the JID contains a forbidden character")]
    ForbiddenChar(JidPart),
}

impl Jid {
    /// A JID from its parts, validated and normalized like [`Jid::from_str`].
    pub fn new(
        local: Option<&str>,
        domain: &str,
        resource: Option<&str>,
    ) -> Result<Self, JidError> {
        Ok(Self {
            local: local.map(check_local).transpose()?,
            domain: check_domain(domain)?,
            resource: resource.map(check_resource).transpose()?,
        })
    }

    /// A domain JID (`example.com`), e.g. the address of a server or component.
    pub fn domain_jid(domain: &str) -> Result<Self, JidError> {
        Self::new(None, domain, None)
    }

    /// The localpart, lowercased.
    pub fn local(&self) -> Option<&str> {
        self.local.as_deref()
    }

    /// The domainpart, lowercased and without a trailing dot.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The resourcepart, as given.
    pub fn resource(&self) -> Option<&str> {
        self.resource.as_deref()
    }

    /// Whether this JID has no resourcepart.
    pub fn is_bare(&self) -> bool {
        self.resource.is_none()
    }

    /// This JID without its resourcepart.
    #[must_use]
    pub fn bare(&self) -> Self {
        Self {
            local: self.local.clone(),
            domain: self.domain.clone(),
            resource: None,
        }
    }

    /// This JID with its resourcepart replaced by `resource` (validated).
    pub fn with_resource(&self, resource: &str) -> Result<Self, JidError> {
        Ok(Self {
            local: self.local.clone(),
            domain: self.domain.clone(),
            resource: Some(check_resource(resource)?),
        })
    }
}

impl FromStr for Jid {
    type Err = JidError;

    /// Parses `[local@]domain[/resource]` (RFC 7622 §3.1).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (rest, resource) = match s.split_once('/') {
            Some((rest, resource)) => (rest, Some(resource)),
            None => (s, None),
        };
        let (local, domain) = match rest.split_once('@') {
            Some((local, domain)) => (Some(local), domain),
            None => (None, rest),
        };
        Self::new(local, domain, resource)
    }
}

impl TryFrom<&str> for Jid {
    type Error = JidError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for Jid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(local) = &self.local {
            write!(f, "{local}@")?;
        }
        f.write_str(&self.domain)?;
        if let Some(resource) = &self.resource {
            write!(f, "/{resource}")?;
        }
        Ok(())
    }
}

fn check_len(part: &str, which: JidPart) -> Result<(), JidError> {
    if part.is_empty() {
        Err(JidError::Empty(which))
    } else if part.len() > MAX_JID_PART_BYTES {
        Err(JidError::TooLong(which))
    } else {
        Ok(())
    }
}

fn check_local(local: &str) -> Result<String, JidError> {
    check_len(local, JidPart::Local)?;
    if local
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || FORBIDDEN_LOCAL.contains(&c))
    {
        return Err(JidError::ForbiddenChar(JidPart::Local));
    }
    Ok(local.to_ascii_lowercase())
}

fn check_domain(domain: &str) -> Result<String, JidError> {
    // RFC 7622 §3.2: a final label separator is stripped before anything else.
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    check_len(domain, JidPart::Domain)?;
    if domain.chars().any(|c| {
        c.is_whitespace() || c.is_control() || matches!(c, '@' | '/' | '"' | '&' | '\'' | '<' | '>')
    }) || domain.starts_with('.')
        || domain.contains("..")
    {
        return Err(JidError::ForbiddenChar(JidPart::Domain));
    }
    Ok(domain.to_ascii_lowercase())
}

fn check_resource(resource: &str) -> Result<String, JidError> {
    check_len(resource, JidPart::Resource)?;
    // PRECIS OpaqueString (RFC 8264 §4.2) disallows control characters.
    if resource.chars().any(char::is_control) {
        return Err(JidError::ForbiddenChar(JidPart::Resource));
    }
    Ok(resource.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Jid, JidError> {
        s.parse()
    }

    fn ok(s: &str) -> Jid {
        match s.parse() {
            Ok(jid) => jid,
            Err(error) => panic!("{s:?} was refused: {error}"),
        }
    }

    #[test]
    fn a_full_jid_splits_into_its_three_parts() {
        let jid = ok("juliet@example.com/balcony");
        assert_eq!(jid.local(), Some("juliet"));
        assert_eq!(jid.domain(), "example.com");
        assert_eq!(jid.resource(), Some("balcony"));
        assert!(!jid.is_bare());
        assert_eq!(jid.to_string(), "juliet@example.com/balcony");
    }

    #[test]
    fn the_resource_may_contain_at_signs_and_slashes() {
        let jid = ok("juliet@example.com/foo@bar/baz");
        assert_eq!(jid.local(), Some("juliet"));
        assert_eq!(jid.domain(), "example.com");
        assert_eq!(jid.resource(), Some("foo@bar/baz"));
        let jid = ok("example.com/a@b");
        assert_eq!(jid.local(), None);
        assert_eq!(jid.resource(), Some("a@b"));
        assert_eq!(jid.to_string(), "example.com/a@b");
    }

    #[test]
    fn a_domain_with_a_resource_has_no_localpart() {
        let jid = ok("pubsub.example.com/res");
        assert_eq!(jid.local(), None);
        assert_eq!(jid.domain(), "pubsub.example.com");
        assert_eq!(jid.resource(), Some("res"));
    }

    #[test]
    fn a_local_and_domain_without_resource_is_bare() {
        let jid = ok("a@b");
        assert_eq!(jid.local(), Some("a"));
        assert_eq!(jid.domain(), "b");
        assert!(jid.is_bare());
        assert_eq!(jid.to_string(), "a@b");
    }

    #[test]
    fn empty_parts_are_refused() {
        assert_eq!(parse("@example.com"), Err(JidError::Empty(JidPart::Local)));
        assert_eq!(
            parse("a@example.com/"),
            Err(JidError::Empty(JidPart::Resource))
        );
        assert_eq!(parse(""), Err(JidError::Empty(JidPart::Domain)));
        assert_eq!(parse("a@/r"), Err(JidError::Empty(JidPart::Domain)));
        assert_eq!(parse("."), Err(JidError::Empty(JidPart::Domain)));
    }

    #[test]
    fn parts_longer_than_1023_bytes_are_refused() {
        let long = "a".repeat(1024);
        let max = "a".repeat(1023);
        assert_eq!(
            parse(&format!("{long}@b")),
            Err(JidError::TooLong(JidPart::Local))
        );
        assert_eq!(parse(&long), Err(JidError::TooLong(JidPart::Domain)));
        assert_eq!(
            parse(&format!("b/{long}")),
            Err(JidError::TooLong(JidPart::Resource))
        );
        assert!(parse(&format!("{max}@{max}/{max}")).is_ok());
    }

    #[test]
    fn forbidden_localpart_characters_are_refused() {
        for local in [
            "a\"b",
            "a&b",
            "a'b",
            "a:b",
            "a<b",
            "a>b",
            "a b",
            "a\tb",
            "a\u{3000}b",
        ] {
            assert_eq!(
                parse(&format!("{local}@example.com")),
                Err(JidError::ForbiddenChar(JidPart::Local)),
                "{local:?}"
            );
        }
        // `a@b@c`: the localpart is `a`, and `@` is not allowed in the domainpart.
        assert_eq!(
            parse("a@b@c"),
            Err(JidError::ForbiddenChar(JidPart::Domain))
        );
        assert_eq!(
            parse("exa mple.com"),
            Err(JidError::ForbiddenChar(JidPart::Domain))
        );
        assert_eq!(
            parse("a@b/x\u{0}y"),
            Err(JidError::ForbiddenChar(JidPart::Resource))
        );
    }

    #[test]
    fn local_and_domain_are_lowercased_but_the_resource_keeps_its_case() {
        let jid = ok("Juliet@Example.COM/Balcony");
        assert_eq!(jid.to_string(), "juliet@example.com/Balcony");
        assert_eq!(jid, ok("juliet@example.com/Balcony"));
        assert_ne!(jid, ok("juliet@example.com/balcony"));
    }

    #[test]
    fn a_trailing_dot_of_the_domain_is_stripped() {
        assert_eq!(ok("a@example.com.").domain(), "example.com");
    }

    #[test]
    fn bare_and_with_resource_replace_the_resource() {
        let full = ok("a@b/r1");
        let bare = full.bare();
        assert_eq!(bare.to_string(), "a@b");
        assert!(bare.is_bare());
        assert_eq!(
            bare.with_resource("r2").map(|jid| jid.to_string()),
            Ok("a@b/r2".to_owned())
        );
        assert_eq!(
            bare.with_resource(""),
            Err(JidError::Empty(JidPart::Resource))
        );
    }

    #[test]
    fn jids_order_by_local_then_domain_then_resource() {
        let mut jids: Vec<Jid> = ["b@a", "a@b/r", "a@b", "a"].into_iter().map(ok).collect();
        jids.sort();
        let sorted: Vec<String> = jids.iter().map(Jid::to_string).collect();
        assert_eq!(sorted, ["a", "a@b", "a@b/r", "b@a"]);
    }

    #[test]
    fn errors_name_the_part_without_quoting_the_input() {
        assert_eq!(
            JidError::ForbiddenChar(JidPart::Local).to_string(),
            "the localpart of the JID contains a forbidden character"
        );
    }
}
