//! XMPP accounts: a username and salted SCRAM credentials (RFC 5802, RFC 7677). The password
//! itself is never stored: only what a SCRAM server needs to verify a client and prove itself.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Longest username, in bytes (RFC 7622 §3.3: localparts are at most 1023 bytes).
pub const MAX_USERNAME_BYTES: usize = 1023;

/// The local part of an account's JID (`username@domain`), stored in lowercase so that
/// `Alice` and `alice` are one account.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Username(Arc<str>);

impl Username {
    /// Checks and normalizes `s`: 1 to 1023 bytes, no whitespace, control characters or any
    /// of `"&'/:<>@` (RFC 7622 §3.3.1).
    pub fn new(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| Err(Error::InvalidUsername(format!("{s:?}: {why}")));
        if s.is_empty() || s.len() > MAX_USERNAME_BYTES {
            return bad("must be 1 to 1023 bytes");
        }
        if let Some(c) = s
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || "\"&'/:<>@".contains(*c))
        {
            return bad(&format!("character {c:?} is not allowed"));
        }
        Ok(Self(Arc::from(s.to_lowercase().as_str())))
    }

    /// The username.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Username {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        Username::new(&s)
    }
}

impl From<Username> for String {
    fn from(u: Username) -> String {
        u.0.to_string()
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// What a SCRAM server keeps for one hash function (RFC 5802 §3): the salt and iteration
/// count it sends, and `StoredKey`/`ServerKey` derived from the password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramKeys {
    /// The salt.
    pub salt: Vec<u8>,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// `H(ClientKey)`.
    pub stored_key: Vec<u8>,
    /// `HMAC(SaltedPassword, "Server Key")`.
    pub server_key: Vec<u8>,
}

impl fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramKeys")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

/// An account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// The username.
    pub username: Username,
    /// SCRAM-SHA-1 credentials.
    pub scram_sha1: ScramKeys,
    /// SCRAM-SHA-256 credentials.
    pub scram_sha256: ScramKeys,
    /// When it was created or its password last set (ms since the Unix epoch).
    pub updated_at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_checked_and_lowercased() {
        assert_eq!(Username::new("Alice").expect("valid").as_str(), "alice");
        for bad in ["", "a b", "a@b", "a/b", "a:b", "<a>", "a\u{0}"] {
            assert!(Username::new(bad).is_err(), "{bad:?}");
        }
        assert!(Username::new(&"x".repeat(1024)).is_err());
    }
}
