//! Peer groups and their membership service (JXTA's peer group and membership credential).
//!
//! A group is the scope of a set of pipes (gossipsub topics `juxta/<group>/<node>`) and of
//! discovery (the rendezvous namespace). It admits members in one of two ways:
//!
//! - **open**, like JXTA's NetPeerGroup: anyone may join; [`PUBLIC_GROUP`] is one;
//! - **protected**: the group has an ed25519 [`GroupKey`], held by its administrator (the
//!   gateway's data dir, `groups/<name>.key`). A peer is a member when it presents a
//!   [`Credential`]: the group key's signature over (peer id, group, expiry). Anyone who knows
//!   the group's [`GroupPublicKey`] can check it, without asking the administrator.
//!
//! Credentials are checked in gossipsub validation and when pipes (catch-up) open.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use libp2p::PeerId;
use libp2p::identity::ed25519;

use crate::envelope::cbor;
use crate::identity::{create_private_dir, read_secret_file, write_new_secret_file};

/// The group every node belongs to unless configured otherwise; open membership.
pub const PUBLIC_GROUP: &str = "public";

/// Longest group name, in bytes.
pub(crate) const MAX_GROUP_NAME_BYTES: usize = 64;

/// Directory of group keys inside the data dir.
const GROUPS_DIR: &str = "groups";

/// Largest group key file read (the key is 32 bytes).
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// The credential format this code writes and reads.
const CREDENTIAL_VERSION: u64 = 1;

/// Largest credential accepted in its byte form. A real one is about 150 bytes (a 38-byte
/// peer id, a group name of at most 64 bytes, a 64-byte signature).
const MAX_CREDENTIAL_BYTES: usize = 1024;

/// Domain separation for the signed message: a credential signature can never be mistaken
/// for a signature over anything else made with the same key.
const CREDENTIAL_DOMAIN: &[u8] = b"juxta-credential-v1\0";

/// Group names: 1..=64 bytes of [a-z0-9-_.]
pub fn validate_group_name(name: &str) -> Result<(), GroupError> {
    if name.is_empty() || name.len() > MAX_GROUP_NAME_BYTES {
        return Err(GroupError::InvalidName(format!(
            "{name:?}: must be 1 to {MAX_GROUP_NAME_BYTES} bytes"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(*c)))
    {
        return Err(GroupError::InvalidName(format!(
            "{name:?}: character {c:?} is not allowed (use a-z, 0-9, '-', '_', '.')"
        )));
    }
    Ok(())
}

/// Errors of group names, keys and their files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// A group name that breaks the rules.
    #[error("invalid group name {0}")]
    InvalidName(String),
    /// Bytes or text that are not a group key.
    #[error("invalid group key: {0}")]
    InvalidKey(String),
    /// A TTL that is not a positive number followed by `d`, `h`, `m` or `s`.
    #[error("invalid TTL {0}")]
    InvalidTtl(String),
    /// The group already has a key file; it is never overwritten.
    #[error("group key {} already exists", path.display())]
    KeyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// Reading or writing a key file failed.
    #[error("group key {}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
}

/// A protected group's signing key (ed25519), held by its administrator (the gateway's data
/// dir `groups/<name>.key`).
#[derive(Clone)]
pub struct GroupKey(ed25519::Keypair);

impl fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        f.debug_struct("GroupKey")
            .field("public", &self.public().to_base64())
            .finish_non_exhaustive()
    }
}

impl GroupKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self(ed25519::Keypair::generate())
    }

    /// The public half, which members and gateways use to check credentials.
    pub fn public(&self) -> GroupPublicKey {
        GroupPublicKey(self.0.public())
    }

    /// The 32-byte secret key; the key file holds exactly these bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.secret().as_ref().to_vec()
    }

    /// A key from its 32-byte secret.
    pub fn from_bytes(b: &[u8]) -> Result<Self, GroupError> {
        if b.len() != 32 {
            return Err(GroupError::InvalidKey(format!(
                "{} bytes, expected a 32-byte ed25519 secret key",
                b.len()
            )));
        }
        // `try_from_bytes` zeroes what it is given: hand it a copy.
        let secret = ed25519::SecretKey::try_from_bytes(b.to_vec())
            .map_err(|e| GroupError::InvalidKey(e.to_string()))?;
        Ok(Self(ed25519::Keypair::from(secret)))
    }

    /// Writes `dir/groups/<group>.key` (mode 0600), refusing to overwrite an existing one.
    pub fn create_file(dir: &Path, group: &str) -> Result<Self, GroupError> {
        let path = key_path(dir, group)?;
        let groups = dir.join(GROUPS_DIR);
        create_private_dir(&groups).map_err(|source| GroupError::Io {
            path: groups,
            source,
        })?;
        let key = Self::generate();
        write_new_secret_file(&path, &key.to_bytes()).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                GroupError::KeyExists { path: path.clone() }
            } else {
                GroupError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        Ok(key)
    }

    /// Reads `dir/groups/<group>.key`.
    pub fn load_file(dir: &Path, group: &str) -> Result<Self, GroupError> {
        let path = key_path(dir, group)?;
        let bytes =
            read_secret_file(&path, MAX_KEY_FILE_BYTES).map_err(|source| GroupError::Io {
                path: path.clone(),
                source,
            })?;
        Self::from_bytes(&bytes)
            .map_err(|e| GroupError::InvalidKey(format!("{}: {e}", path.display())))
    }
}

/// `dir/groups/<group>.key`, for a valid group name (which keeps the path inside `groups/`).
fn key_path(dir: &Path, group: &str) -> Result<PathBuf, GroupError> {
    validate_group_name(group)?;
    Ok(dir.join(GROUPS_DIR).join(format!("{group}.key")))
}

/// A protected group's public key: what checks its credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupPublicKey(ed25519::PublicKey);

impl GroupPublicKey {
    /// Standard base64 (with padding) of the 32 key bytes, for configuration files.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0.to_bytes())
    }

    /// Reads [`GroupPublicKey::to_base64`]'s form; surrounding whitespace is ignored.
    pub fn from_base64(s: &str) -> Result<Self, GroupError> {
        let s = s.trim();
        if s.len() > 64 {
            return Err(GroupError::InvalidKey(
                "longer than a base64 ed25519 public key".into(),
            ));
        }
        let bytes = BASE64
            .decode(s)
            .map_err(|e| GroupError::InvalidKey(format!("not base64: {e}")))?;
        ed25519::PublicKey::try_from_bytes(&bytes)
            .map(Self)
            .map_err(|e| GroupError::InvalidKey(e.to_string()))
    }
}

/// A membership credential: the group key's signature over (peer id, group, expiry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    /// The member.
    pub peer: PeerId,
    /// The group it is a member of.
    pub group: String,
    /// When membership ends, in seconds since the Unix epoch (exclusive).
    pub expires_at: u64,
    /// The group key's ed25519 signature over the message `signed_message` builds.
    signature: Vec<u8>,
}

/// What a credential's signature covers: a domain tag, then the length-prefixed peer id
/// bytes and group name, then the expiry as a big-endian u64. Unambiguous: no two different
/// (peer, group, expiry) give the same bytes.
fn signed_message(peer: &PeerId, group: &str, expires_at: u64) -> Vec<u8> {
    let peer = peer.to_bytes();
    let mut m = Vec::with_capacity(CREDENTIAL_DOMAIN.len() + 8 + peer.len() + group.len() + 8);
    m.extend_from_slice(CREDENTIAL_DOMAIN);
    m.extend_from_slice(&(peer.len() as u32).to_be_bytes());
    m.extend_from_slice(&peer);
    m.extend_from_slice(&(group.len() as u32).to_be_bytes());
    m.extend_from_slice(group.as_bytes());
    m.extend_from_slice(&expires_at.to_be_bytes());
    m
}

impl Credential {
    /// Signs membership of `peer` in `group` (a valid group name) until `expires_at` (unix
    /// seconds).
    pub fn issue(key: &GroupKey, group: &str, peer: PeerId, expires_at: u64) -> Self {
        let signature = key.0.sign(&signed_message(&peer, group, expires_at));
        Self {
            peer,
            group: group.to_owned(),
            expires_at,
            signature,
        }
    }

    /// Checks signature, group, peer and expiry (now = unix seconds).
    ///
    /// A credential for another group or peer is [`CredentialError::WrongGroup`] /
    /// [`CredentialError::WrongPeer`]; one whose fields were changed after signing is
    /// [`CredentialError::BadSignature`]; a genuine one past its expiry is
    /// [`CredentialError::Expired`].
    pub fn verify(
        &self,
        key: &GroupPublicKey,
        group: &str,
        peer: &PeerId,
        now: u64,
    ) -> Result<(), CredentialError> {
        if self.group != group {
            return Err(CredentialError::WrongGroup);
        }
        if self.peer != *peer {
            return Err(CredentialError::WrongPeer);
        }
        let message = signed_message(&self.peer, &self.group, self.expires_at);
        if !key.0.verify(&message, &self.signature) {
            return Err(CredentialError::BadSignature);
        }
        if now >= self.expires_at {
            return Err(CredentialError::Expired {
                expired_at: self.expires_at,
            });
        }
        Ok(())
    }

    /// Compact CBOR bytes (for catch-up requests): `[1, peer id bytes, group, expires_at,
    /// signature]`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        cbor::array(&mut out, 5);
        cbor::uint(&mut out, CREDENTIAL_VERSION);
        cbor::bytes(&mut out, &self.peer.to_bytes());
        cbor::text(&mut out, &self.group);
        cbor::uint(&mut out, self.expires_at);
        cbor::bytes(&mut out, &self.signature);
        out
    }

    /// Reads [`Credential::to_bytes`]' form. This checks the form only; [`Credential::verify`]
    /// checks what it claims.
    pub fn from_bytes(b: &[u8]) -> Result<Self, CredentialError> {
        let malformed = CredentialError::Malformed;
        if b.len() > MAX_CREDENTIAL_BYTES {
            return Err(malformed(format!(
                "{} bytes, more than the {MAX_CREDENTIAL_BYTES} a credential may have",
                b.len()
            )));
        }
        let mut rest = b;
        type Wire = (u64, serde_bytes::ByteBuf, String, u64, serde_bytes::ByteBuf);
        let (version, peer, group, expires_at, signature): Wire =
            ciborium::de::from_reader(&mut rest).map_err(|e| malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(malformed(format!(
                "{} bytes after the credential",
                rest.len()
            )));
        }
        if version != CREDENTIAL_VERSION {
            return Err(malformed(format!("unknown credential version {version}")));
        }
        let peer = PeerId::from_bytes(&peer).map_err(|e| malformed(format!("peer id: {e}")))?;
        validate_group_name(&group).map_err(|e| malformed(e.to_string()))?;
        if signature.len() != 64 {
            return Err(malformed(format!(
                "signature of {} bytes, expected 64",
                signature.len()
            )));
        }
        Ok(Self {
            peer,
            group,
            expires_at,
            signature: signature.into_vec(),
        })
    }

    /// A text form for files: standard base64 of [`Credential::to_bytes`].
    pub fn to_text(&self) -> String {
        BASE64.encode(self.to_bytes())
    }

    /// Reads [`Credential::to_text`]'s form; surrounding whitespace (a file's trailing
    /// newline) is ignored.
    pub fn from_text(s: &str) -> Result<Self, CredentialError> {
        let s = s.trim();
        if s.len() > MAX_CREDENTIAL_BYTES.div_ceil(3) * 4 {
            return Err(CredentialError::Malformed(
                "longer than a credential can be".into(),
            ));
        }
        let bytes = BASE64
            .decode(s)
            .map_err(|e| CredentialError::Malformed(format!("not base64: {e}")))?;
        Self::from_bytes(&bytes)
    }
}

/// Why a peer is not (or cannot be shown to be) a member.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// The credential could not be read.
    #[error("malformed credential: {0}")]
    Malformed(String),
    /// The signature is not the group key's over the credential's fields.
    #[error("credential signature does not verify against the group key")]
    BadSignature,
    /// The credential is for another group.
    #[error("credential is for another group")]
    WrongGroup,
    /// The credential is for another peer.
    #[error("credential is for another peer")]
    WrongPeer,
    /// The credential has expired.
    #[error("credential expired at {expired_at} (unix seconds)")]
    Expired {
        /// When it expired, in seconds since the Unix epoch.
        expired_at: u64,
    },
    /// The group is protected and no credential was presented.
    #[error("the group is protected and no credential was presented")]
    Missing,
}

impl CredentialError {
    /// A stable short code, for metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            CredentialError::Malformed(_) => "malformed",
            CredentialError::BadSignature => "bad_signature",
            CredentialError::WrongGroup => "wrong_group",
            CredentialError::WrongPeer => "wrong_peer",
            CredentialError::Expired { .. } => "expired",
            CredentialError::Missing => "missing",
        }
    }
}

/// How a group admits members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Membership {
    /// Anyone may join.
    Open,
    /// Members present a credential signed by the group key whose public half this is.
    Protected(GroupPublicKey),
}

/// A peer group: a name and its membership policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The name (see [`validate_group_name`]).
    pub name: String,
    /// How it admits members.
    pub membership: Membership,
}

impl Group {
    /// The [`PUBLIC_GROUP`], open to anyone.
    pub fn public() -> Self {
        Self {
            name: PUBLIC_GROUP.to_owned(),
            membership: Membership::Open,
        }
    }

    /// Whether `peer` may act in this group given its presented credential (None for Open
    /// groups is fine; a credential presented to an open group is ignored).
    pub fn admits(
        &self,
        peer: &PeerId,
        credential: Option<&Credential>,
        now: u64,
    ) -> Result<(), CredentialError> {
        match &self.membership {
            Membership::Open => Ok(()),
            Membership::Protected(key) => credential
                .ok_or(CredentialError::Missing)?
                .verify(key, &self.name, peer, now),
        }
    }
}

/// Parses a TTL like "30d", "12h", "90m", "45s" into seconds (for `juxta group admit
/// --ttl`). The number must be positive; a plain number means seconds, as `juxta token
/// --ttl` reads it.
pub fn parse_ttl(s: &str) -> Result<u64, GroupError> {
    let bad = |why: &str| Err(GroupError::InvalidTtl(format!("{s:?}: {why}")));
    let t = s.trim();
    let Some(unit) = t.chars().last() else {
        return bad("empty");
    };
    let (digits, scale): (&str, u64) = match unit {
        'd' => (&t[..t.len() - 1], 86_400),
        'h' => (&t[..t.len() - 1], 3_600),
        'm' => (&t[..t.len() - 1], 60),
        's' => (&t[..t.len() - 1], 1),
        '0'..='9' => (t, 1),
        _ => return bad("expected a number followed by d, h, m or s, like 30d"),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return bad("expected a number followed by d, h, m or s, like 30d");
    }
    let Ok(n) = digits.parse::<u64>() else {
        return bad("too large");
    };
    if n == 0 {
        return bad("must be positive");
    }
    match n.checked_mul(scale) {
        Some(secs) => Ok(secs),
        None => bad("too large"),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const NOW: u64 = 1_795_311_825;

    fn peer(seed: u8) -> PeerId {
        libp2p::identity::Keypair::ed25519_from_bytes([seed; 32])
            .expect("any 32 bytes are an ed25519 secret")
            .public()
            .to_peer_id()
    }

    fn issued() -> (GroupKey, Credential) {
        let key = GroupKey::generate();
        let cred = Credential::issue(&key, "lab", peer(1), NOW + 3600);
        (key, cred)
    }

    #[test]
    fn group_names_are_lowercase_letters_digits_and_dash_underscore_dot() {
        for ok in ["public", "lab-2", "a_b.c", "x", &"a".repeat(64)] {
            assert!(validate_group_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Lab", "a b", "a/b", "../x", "ü", &"a".repeat(65)] {
            assert!(validate_group_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_issued_credential_verifies() {
        let (key, cred) = issued();
        assert_eq!(cred.verify(&key.public(), "lab", &peer(1), NOW), Ok(()));
    }

    #[test]
    fn given_a_tampered_expiry_then_the_signature_fails() {
        let (key, mut cred) = issued();
        cred.expires_at += 86_400;
        assert_eq!(
            cred.verify(&key.public(), "lab", &peer(1), NOW),
            Err(CredentialError::BadSignature)
        );
    }

    #[test]
    fn given_a_tampered_group_then_it_fails_for_either_group() {
        let (key, mut cred) = issued();
        cred.group = "other".into();
        assert_eq!(
            cred.verify(&key.public(), "other", &peer(1), NOW),
            Err(CredentialError::BadSignature)
        );
        assert_eq!(
            cred.verify(&key.public(), "lab", &peer(1), NOW),
            Err(CredentialError::WrongGroup)
        );
    }

    #[test]
    fn given_a_tampered_peer_then_it_fails_for_either_peer() {
        let (key, mut cred) = issued();
        cred.peer = peer(2);
        assert_eq!(
            cred.verify(&key.public(), "lab", &peer(2), NOW),
            Err(CredentialError::BadSignature)
        );
        assert_eq!(
            cred.verify(&key.public(), "lab", &peer(1), NOW),
            Err(CredentialError::WrongPeer)
        );
    }

    #[test]
    fn a_credential_presented_for_another_group_or_peer_is_refused() {
        let (key, cred) = issued();
        assert_eq!(
            cred.verify(&key.public(), "public", &peer(1), NOW),
            Err(CredentialError::WrongGroup)
        );
        assert_eq!(
            cred.verify(&key.public(), "lab", &peer(3), NOW),
            Err(CredentialError::WrongPeer)
        );
        assert_eq!(CredentialError::WrongPeer.code(), "wrong_peer");
    }

    #[test]
    fn given_an_expired_credential_then_it_is_refused_with_its_expiry() {
        let (key, cred) = issued();
        let expired = Err(CredentialError::Expired {
            expired_at: NOW + 3600,
        });
        assert_eq!(
            cred.verify(&key.public(), "lab", &peer(1), NOW + 3599),
            Ok(())
        );
        assert_eq!(
            cred.verify(&key.public(), "lab", &peer(1), NOW + 3600),
            expired
        );
        assert_eq!(
            cred.verify(&key.public(), "lab", &peer(1), u64::MAX),
            expired
        );
    }

    #[test]
    fn a_credential_signed_by_another_key_is_refused() {
        let (_, cred) = issued();
        let other = GroupKey::generate();
        assert_eq!(
            cred.verify(&other.public(), "lab", &peer(1), NOW),
            Err(CredentialError::BadSignature)
        );
    }

    #[test]
    fn credentials_round_trip_through_bytes_and_text() {
        let (key, cred) = issued();
        let from_bytes = Credential::from_bytes(&cred.to_bytes()).expect("bytes");
        assert_eq!(from_bytes, cred);
        let text = cred.to_text();
        assert!(text.is_ascii() && !text.contains(char::is_whitespace));
        let from_text = Credential::from_text(&format!("{text}\n")).expect("text");
        assert_eq!(from_text, cred);
        assert_eq!(
            from_text.verify(&key.public(), "lab", &peer(1), NOW),
            Ok(())
        );
        assert!(
            cred.to_bytes().len() < 200,
            "compact: {}",
            cred.to_bytes().len()
        );
    }

    #[test]
    fn garbage_credentials_are_malformed() {
        let good = issued().1.to_bytes();
        let mut wrong_version = good.clone();
        wrong_version[1] = 2;
        let mut short_signature = Vec::new();
        cbor::array(&mut short_signature, 5);
        cbor::uint(&mut short_signature, 1);
        cbor::bytes(&mut short_signature, &peer(1).to_bytes());
        cbor::text(&mut short_signature, "lab");
        cbor::uint(&mut short_signature, 1);
        cbor::bytes(&mut short_signature, &[0u8; 63]);
        let mut bad_group = Vec::new();
        cbor::array(&mut bad_group, 5);
        cbor::uint(&mut bad_group, 1);
        cbor::bytes(&mut bad_group, &peer(1).to_bytes());
        cbor::text(&mut bad_group, "Not A Group");
        cbor::uint(&mut bad_group, 1);
        cbor::bytes(&mut bad_group, &[0u8; 64]);
        let mut trailing = good.clone();
        trailing.push(0);
        for (what, bytes) in [
            ("empty", Vec::new()),
            ("not cbor", vec![0xff, 0x00]),
            ("truncated", good[..good.len() - 1].to_vec()),
            ("wrong version", wrong_version),
            ("short signature", short_signature),
            ("bad group", bad_group),
            ("trailing", trailing),
            ("huge", vec![0u8; 100_000]),
        ] {
            let result = Credential::from_bytes(&bytes);
            assert!(
                matches!(result, Err(CredentialError::Malformed(_))),
                "{what}: {result:?}"
            );
        }
        for text in ["", "not base64!", "AAAA", &"A".repeat(10_000)] {
            let result = Credential::from_text(text);
            assert!(
                matches!(result, Err(CredentialError::Malformed(_))),
                "{text:?}: {result:?}"
            );
        }
        assert_eq!(
            CredentialError::Malformed(String::new()).code(),
            "malformed"
        );
    }

    #[test]
    fn the_signed_message_is_unambiguous() {
        let p = peer(1);
        assert_ne!(signed_message(&p, "ab", 1), signed_message(&p, "a", 1));
        assert_ne!(signed_message(&p, "a", 1), signed_message(&p, "a", 2));
        assert_ne!(signed_message(&p, "a", 1), signed_message(&peer(2), "a", 1));
        assert!(signed_message(&p, "a", 1).starts_with(CREDENTIAL_DOMAIN));
    }

    #[test]
    fn group_keys_round_trip_and_debug_hides_the_secret() {
        let key = GroupKey::generate();
        let again = GroupKey::from_bytes(&key.to_bytes()).expect("from bytes");
        assert_eq!(again.public(), key.public());
        let debug = format!("{key:?}");
        assert!(debug.contains(&key.public().to_base64()), "{debug}");
        assert!(!debug.contains(&BASE64.encode(key.to_bytes())), "{debug}");
        assert!(matches!(
            GroupKey::from_bytes(&[1u8; 31]),
            Err(GroupError::InvalidKey(_))
        ));
    }

    #[test]
    fn group_public_keys_round_trip_through_base64() {
        let public = GroupKey::generate().public();
        let text = public.to_base64();
        assert_eq!(
            GroupPublicKey::from_base64(&format!(" {text}\n")).ok(),
            Some(public)
        );
        for bad in ["", "!!", "AAAA", &"A".repeat(100)] {
            assert!(GroupPublicKey::from_base64(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn given_an_existing_key_file_then_create_file_refuses_to_overwrite_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let created = GroupKey::create_file(tmp.path(), "lab").expect("created");
        let path = tmp.path().join("groups").join("lab.key");
        let before = std::fs::read(&path).expect("read");
        let err = GroupKey::create_file(tmp.path(), "lab").expect_err("must refuse");
        assert!(matches!(err, GroupError::KeyExists { .. }), "{err:?}");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            before,
            "file untouched"
        );
        let loaded = GroupKey::load_file(tmp.path(), "lab").expect("loaded");
        assert_eq!(loaded.public(), created.public());
    }

    #[cfg(unix)]
    #[test]
    fn a_created_group_key_file_is_readable_only_by_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        GroupKey::create_file(tmp.path(), "lab").expect("created");
        let mode = std::fs::metadata(tmp.path().join("groups").join("lab.key"))
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn key_files_need_a_valid_group_name_and_an_existing_valid_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            GroupKey::create_file(tmp.path(), "../escape"),
            Err(GroupError::InvalidName(_))
        ));
        assert!(matches!(
            GroupKey::load_file(tmp.path(), "absent"),
            Err(GroupError::Io { .. })
        ));
        std::fs::create_dir_all(tmp.path().join("groups")).expect("mkdir");
        std::fs::write(tmp.path().join("groups").join("short.key"), b"abc").expect("write");
        assert!(matches!(
            GroupKey::load_file(tmp.path(), "short"),
            Err(GroupError::InvalidKey(_))
        ));
    }

    #[test]
    fn an_open_group_admits_anyone() {
        let public = Group::public();
        assert_eq!(public.name, PUBLIC_GROUP);
        assert_eq!(public.membership, Membership::Open);
        assert_eq!(public.admits(&peer(1), None, NOW), Ok(()));
        let (_, foreign) = issued();
        assert_eq!(public.admits(&peer(2), Some(&foreign), NOW), Ok(()));
    }

    #[test]
    fn a_protected_group_admits_only_with_a_valid_credential() {
        let (key, cred) = issued();
        let lab = Group {
            name: "lab".into(),
            membership: Membership::Protected(key.public()),
        };
        assert_eq!(lab.admits(&peer(1), Some(&cred), NOW), Ok(()));
        assert_eq!(
            lab.admits(&peer(1), None, NOW),
            Err(CredentialError::Missing)
        );
        assert_eq!(CredentialError::Missing.code(), "missing");
        assert_eq!(
            lab.admits(&peer(2), Some(&cred), NOW),
            Err(CredentialError::WrongPeer)
        );
        assert_eq!(
            lab.admits(&peer(1), Some(&cred), NOW + 7200),
            Err(CredentialError::Expired {
                expired_at: NOW + 3600
            })
        );
        let forged = Credential::issue(&GroupKey::generate(), "lab", peer(1), NOW + 3600);
        assert_eq!(
            lab.admits(&peer(1), Some(&forged), NOW),
            Err(CredentialError::BadSignature)
        );
    }

    #[test]
    fn ttls_parse_into_seconds() {
        assert_eq!(parse_ttl("30d").ok(), Some(30 * 86_400));
        assert_eq!(parse_ttl("12h").ok(), Some(12 * 3600));
        assert_eq!(parse_ttl("90m").ok(), Some(5400));
        assert_eq!(parse_ttl("45s").ok(), Some(45));
        assert_eq!(parse_ttl(" 1d ").ok(), Some(86_400));
        assert_eq!(parse_ttl("90").ok(), Some(90), "plain seconds");
    }

    #[test]
    fn invalid_ttls_are_refused() {
        for bad in [
            "",
            " ",
            "d",
            "0",
            "0d",
            "-1d",
            "+1d",
            "1.5h",
            "30x",
            "30 d",
            "1dd",
            "h1",
            "30é",
            "99999999999999999999s",
            "999999999999999999d",
        ] {
            assert!(
                matches!(parse_ttl(bad), Err(GroupError::InvalidTtl(_))),
                "{bad:?}: {:?}",
                parse_ttl(bad)
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_credential_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Credential::from_bytes(&bytes);
        }

        #[test]
        fn arbitrary_credential_text_never_panics(text in "\\PC{0,300}") {
            let _ = Credential::from_text(&text);
        }

        #[test]
        fn arbitrary_ttl_text_never_panics(text in "\\PC{0,24}") {
            let _ = parse_ttl(&text);
        }
    }
}
