//! Authentication: admin keys and JWTs (HS256 with a shared secret, or EdDSA with an Ed25519
//! public key). A token's `juxta` claim lists what its subject may do.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use juxta_core::{Grants, Principal};
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// File, in the data directory, holding the generated admin key.
pub const ADMIN_KEY_FILE: &str = "admin.key";
/// File, in the data directory, holding the generated HS256 secret.
pub const JWT_SECRET_FILE: &str = "jwt.secret";

/// The claims of a juxta token.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The subject.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at.
    #[serde(default)]
    pub iat: u64,
    /// What the subject may do.
    #[serde(default)]
    pub juxta: Grants,
}

/// Why a credential was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No credential at all.
    Missing,
    /// Not an admin key and not a valid token.
    Invalid,
    /// A valid token past its expiry.
    Expired,
}

impl AuthError {
    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Invalid => "invalid_token",
            AuthError::Expired => "token_expired",
        }
    }

    /// A sentence for humans.
    pub fn message(self) -> &'static str {
        match self {
            AuthError::Missing => "send `Authorization: Bearer <admin key or token>`",
            AuthError::Invalid => "the credential is neither an admin key nor a valid token",
            AuthError::Expired => "the token has expired",
        }
    }
}

/// Checks credentials.
#[derive(Clone)]
pub struct Authenticator {
    admin_keys: Arc<[String]>,
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("admin_keys", &self.admin_keys.len())
            .field("algorithms", &self.validation.algorithms)
            .finish()
    }
}

/// Constant-time comparison, so that response timing does not reveal a key's prefix.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Reads `path`, or writes a fresh random secret there (mode 0600) and returns it with `true`.
fn read_or_generate(path: &Path) -> anyhow::Result<(String, bool)> {
    if path.exists() {
        let s =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        return Ok((s.trim().to_owned(), false));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let secret = random_hex(32);
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{secret}")?;
    f.sync_all()?;
    Ok((secret, true))
}

/// The HS256 secret in force: configured, or the one in the data directory.
pub fn jwt_secret(cfg: &Config) -> anyhow::Result<String> {
    match &cfg.auth.jwt_secret {
        Some(s) => Ok(s.clone()),
        None => Ok(read_or_generate(&cfg.data_dir.join(JWT_SECRET_FILE))?.0),
    }
}

impl Authenticator {
    /// Builds the authenticator from configuration, generating the admin key and JWT secret
    /// into the data directory when none is configured.
    pub fn from_config(cfg: &Config) -> anyhow::Result<Self> {
        let mut admin_keys = cfg.auth.admin_keys.clone();
        if admin_keys.is_empty() {
            let path = cfg.data_dir.join(ADMIN_KEY_FILE);
            let (key, generated) = read_or_generate(&path)?;
            if generated {
                eprintln!("juxta: generated an admin key into {}", path.display());
            } else {
                tracing::info!(path = %path.display(), "using the admin key in the data directory");
            }
            admin_keys.push(key);
        }
        let (key, alg) = match &cfg.auth.jwt_public_key {
            Some(pem_path) => {
                let pem = std::fs::read(pem_path)
                    .with_context(|| format!("reading {}", pem_path.display()))?;
                let key = DecodingKey::from_ed_pem(&pem).with_context(|| {
                    format!("{} is not an Ed25519 public key", pem_path.display())
                })?;
                (key, Algorithm::EdDSA)
            }
            None => (
                DecodingKey::from_secret(jwt_secret(cfg)?.as_bytes()),
                Algorithm::HS256,
            ),
        };
        let mut validation = Validation::new(alg);
        validation.leeway = cfg.auth.leeway_secs;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Self {
            admin_keys: admin_keys.into(),
            key,
            validation,
        })
    }

    /// Resolves a credential to a principal.
    pub fn authenticate(&self, credential: Option<&str>) -> Result<Principal, AuthError> {
        let Some(cred) = credential.map(str::trim).filter(|c| !c.is_empty()) else {
            return Err(AuthError::Missing);
        };
        // Check every key, so that timing does not tell which one nearly matched.
        let admin = self
            .admin_keys
            .iter()
            .fold(false, |hit, k| hit | ct_eq(k.as_bytes(), cred.as_bytes()));
        if admin {
            return Ok(Principal::Admin);
        }
        match jsonwebtoken::decode::<Claims>(cred, &self.key, &self.validation) {
            Ok(data) => Ok(Principal::Subject {
                name: Arc::from(data.claims.sub.as_str()),
                grants: Arc::new(data.claims.juxta),
            }),
            Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => Err(AuthError::Expired),
            Err(_) => Err(AuthError::Invalid),
        }
    }
}

fn claims(sub: &str, grants: Grants, ttl: Duration) -> Claims {
    let now = juxta_core::time::now_ms() / 1000;
    Claims {
        sub: sub.to_owned(),
        exp: now + ttl.as_secs(),
        iat: now,
        juxta: grants,
    }
}

/// Mints an HS256 token.
pub fn mint_hs256(
    secret: &str,
    sub: &str,
    grants: Grants,
    ttl: Duration,
) -> anyhow::Result<String> {
    let key = EncodingKey::from_secret(secret.as_bytes());
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(sub, grants, ttl),
        &key,
    )?)
}

/// Mints an EdDSA token with an Ed25519 private key (PEM).
pub fn mint_eddsa(
    private_pem: &[u8],
    sub: &str,
    grants: Grants,
    ttl: Duration,
) -> anyhow::Result<String> {
    let key = EncodingKey::from_ed_pem(private_pem).context("not an Ed25519 private key")?;
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::EdDSA),
        &claims(sub, grants, ttl),
        &key,
    )?)
}

/// Parses `30s`, `10m`, `1h`, `30d` (or plain seconds).
pub fn parse_ttl(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => anyhow::bail!("bad duration {s:?}: use s, m, h or d"),
    };
    anyhow::ensure!(secs > 0, "duration must be positive");
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use juxta_core::Pattern;

    fn auth(secret: &str) -> Authenticator {
        let mut cfg = Config::default();
        cfg.auth.admin_keys = vec!["admin-key-0123456789".into()];
        cfg.auth.jwt_secret = Some(secret.into());
        Authenticator::from_config(&cfg).expect("builds")
    }

    #[test]
    fn admin_keys_tokens_and_garbage_resolve_as_they_should() {
        let secret = "s".repeat(32);
        let a = auth(&secret);
        assert!(matches!(
            a.authenticate(Some("admin-key-0123456789")),
            Ok(Principal::Admin)
        ));
        assert_eq!(a.authenticate(None).err(), Some(AuthError::Missing));
        assert_eq!(a.authenticate(Some("nope")).err(), Some(AuthError::Invalid));
        let grants = Grants {
            publish: vec![Pattern::new("x*")],
            ..Grants::default()
        };
        let t = mint_hs256(&secret, "bob", grants, Duration::from_secs(60)).expect("mint");
        let p = a.authenticate(Some(&t)).expect("valid");
        assert!(p.can_publish("x1") && !p.can_publish("y"));
        let forged = mint_hs256(
            &"o".repeat(32),
            "bob",
            Grants::default(),
            Duration::from_secs(60),
        )
        .expect("mint");
        assert_eq!(
            a.authenticate(Some(&forged)).err(),
            Some(AuthError::Invalid)
        );
    }

    /// A throwaway key pair for tests only (generated with `openssl genpkey -algorithm ed25519`).
    const TEST_ED25519_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIEgwOUbk1bklFBbsF70/60S4vCE49p7gZsffyU1IHVhe\n-----END PRIVATE KEY-----\n";
    const TEST_ED25519_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEACNGHB5zbJda+IyMc9Sb1/6YgULXHFiIi3fUkDUIStxQ=\n-----END PUBLIC KEY-----\n";

    #[test]
    fn eddsa_tokens_verify_with_the_configured_public_key_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pub_path = dir.path().join("jwt.pub.pem");
        std::fs::write(&pub_path, TEST_ED25519_PUBLIC).expect("write key");
        let mut cfg = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        cfg.auth.admin_keys = vec!["admin-key-0123456789".into()];
        cfg.auth.jwt_public_key = Some(pub_path);
        let a = Authenticator::from_config(&cfg).expect("builds");
        let grants = Grants {
            subscribe: vec![Pattern::new("*")],
            ..Grants::default()
        };
        let t = mint_eddsa(
            TEST_ED25519_PRIVATE.as_bytes(),
            "carol",
            grants,
            Duration::from_secs(60),
        )
        .expect("mint");
        let p = a.authenticate(Some(&t)).expect("valid");
        assert!(p.can_subscribe("anything") && !p.can_publish("anything"));
        let hs = mint_hs256(
            &"s".repeat(32),
            "carol",
            Grants::default(),
            Duration::from_secs(60),
        )
        .expect("mint");
        assert_eq!(
            a.authenticate(Some(&hs)).err(),
            Some(AuthError::Invalid),
            "an HS256 token is refused"
        );
    }

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("30d").expect("ok").as_secs(), 30 * 86_400);
        assert_eq!(parse_ttl("90").expect("ok").as_secs(), 90);
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("0s").is_err());
    }
}
