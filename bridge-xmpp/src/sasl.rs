//! RFC 6120 §6 SASL, server side, without I/O: SCRAM-SHA-256 and SCRAM-SHA-1 (RFC 5802,
//! RFC 7677) against stored [`ScramKeys`], and PLAIN (RFC 4616), which the c2s session offers
//! only over TLS.
//!
//! A SCRAM exchange is two steps of [`Scram`]: `handle_client_first` names the user (the
//! driver looks the account up), `server_first` answers with salt and iterations, and
//! `handle_client_final` checks the proof and returns the server's signature. An unknown user
//! gets a believable salt derived from the name, so the exchange does not reveal which
//! accounts exist (RFC 5802 §9); it fails only at the proof.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use juxta_core::{ScramKeys, Username};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// Default PBKDF2 iterations for new credentials (RFC 7677 recommends at least 4096).
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Longest SASL message accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// The hash function of a SCRAM mechanism.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScramHash {
    /// SCRAM-SHA-1.
    Sha1,
    /// SCRAM-SHA-256.
    Sha256,
}

impl ScramHash {
    /// The mechanism name as advertised in stream features.
    pub fn mechanism(self) -> &'static str {
        match self {
            ScramHash::Sha1 => "SCRAM-SHA-1",
            ScramHash::Sha256 => "SCRAM-SHA-256",
        }
    }

    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => {
                // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
                let mut m = <Hmac<Sha1>>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
            ScramHash::Sha256 => {
                let mut m = <Hmac<Sha256>>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
        }
    }

    fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            ScramHash::Sha1 => Sha1::digest(data).to_vec(),
            ScramHash::Sha256 => Sha256::digest(data).to_vec(),
        }
    }

    /// `Hi()` of RFC 5802 §2.2: PBKDF2 with HMAC and one output block.
    fn hi(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        let mut block = salt.to_vec();
        block.extend_from_slice(&1u32.to_be_bytes());
        let mut u = self.hmac(password, &block);
        let mut out = u.clone();
        for _ in 1..iterations {
            u = self.hmac(password, &u);
            for (o, x) in out.iter_mut().zip(&u) {
                *o ^= x;
            }
        }
        out
    }
}

/// Derives the stored credentials for `password`.
pub fn derive_keys(hash: ScramHash, password: &str, salt: &[u8], iterations: u32) -> ScramKeys {
    let salted = hash.hi(password.as_bytes(), salt, iterations);
    let client_key = hash.hmac(&salted, b"Client Key");
    ScramKeys {
        salt: salt.to_vec(),
        iterations,
        stored_key: hash.hash(&client_key),
        server_key: hash.hmac(&salted, b"Server Key"),
    }
}

/// Why an exchange failed, as the RFC 6120 §6.5 condition a client expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// Bad credentials.
    #[error("not-authorized")]
    NotAuthorized,
    /// The message does not follow the mechanism's syntax.
    #[error("malformed-request")]
    MalformedRequest,
    /// Base64 that does not decode.
    #[error("incorrect-encoding")]
    IncorrectEncoding,
    /// An authorization identity other than the authenticated user.
    #[error("invalid-authzid")]
    InvalidAuthzid,
    /// A mechanism this server does not offer (or channel binding, which it does not support).
    #[error("invalid-mechanism")]
    InvalidMechanism,
}

impl SaslError {
    /// The condition element's name.
    pub fn condition(self) -> &'static str {
        match self {
            SaslError::NotAuthorized => "not-authorized",
            SaslError::MalformedRequest => "malformed-request",
            SaslError::IncorrectEncoding => "incorrect-encoding",
            SaslError::InvalidAuthzid => "invalid-authzid",
            SaslError::InvalidMechanism => "invalid-mechanism",
        }
    }
}

/// Decodes the base64 text of an `<auth/>` or `<response/>` element (`=` means empty).
pub fn decode_b64(text: &str) -> Result<Vec<u8>, SaslError> {
    let t = text.trim();
    if t == "=" || t.is_empty() {
        return Ok(Vec::new());
    }
    if t.len() > MAX_MESSAGE_BYTES * 2 {
        return Err(SaslError::MalformedRequest);
    }
    B64.decode(t).map_err(|_| SaslError::IncorrectEncoding)
}

/// Encodes a challenge or success payload.
pub fn encode_b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// `saslname` of RFC 5802 §5.1: `=2C` is `,` and `=3D` is `=`; any other `=` is an error.
fn decode_saslname(s: &str) -> Result<String, SaslError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(SaslError::MalformedRequest),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

enum State {
    Start,
    /// The user is named; waiting for the driver's credentials.
    Named {
        username: Username,
        client_first_bare: String,
        gs2_header: String,
        client_nonce: String,
    },
    /// `server-first` was sent.
    Challenged {
        username: Username,
        keys: Option<ScramKeys>,
        auth_prefix: String,
        gs2_header: String,
        nonce: String,
    },
    Done,
}

/// One server-side SCRAM exchange.
pub struct Scram {
    hash: ScramHash,
    server_nonce: String,
    /// Keys fake salts for unknown users, so they stay stable per name and server.
    secret: [u8; 32],
    state: State,
}

impl std::fmt::Debug for Scram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scram")
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

impl Scram {
    /// A new exchange. `server_nonce` must be fresh and random for every exchange (it is what
    /// makes a replayed client-final useless); `secret` is a per-server key for fake salts.
    pub fn new(hash: ScramHash, server_nonce: String, secret: [u8; 32]) -> Self {
        Self {
            hash,
            server_nonce,
            secret,
            state: State::Start,
        }
    }

    /// Parses `client-first-message`; returns the user the driver must look up.
    pub fn handle_client_first(&mut self, msg: &[u8]) -> Result<Username, SaslError> {
        if !matches!(self.state, State::Start) || msg.len() > MAX_MESSAGE_BYTES {
            return Err(SaslError::MalformedRequest);
        }
        let text = std::str::from_utf8(msg).map_err(|_| SaslError::MalformedRequest)?;
        // gs2-header: cbind-flag "," [authzid] ","
        let mut parts = text.splitn(3, ',');
        let (flag, authzid, bare) = match (parts.next(), parts.next(), parts.next()) {
            (Some(f), Some(a), Some(b)) => (f, a, b),
            _ => return Err(SaslError::MalformedRequest),
        };
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(SaslError::InvalidMechanism),
            _ => return Err(SaslError::MalformedRequest),
        }
        let mut attrs = bare.split(',');
        let user = attrs
            .next()
            .and_then(|a| a.strip_prefix("n="))
            .ok_or(SaslError::MalformedRequest)?;
        let client_nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or(SaslError::MalformedRequest)?;
        let username =
            Username::new(&decode_saslname(user)?).map_err(|_| SaslError::NotAuthorized)?;
        if !authzid.is_empty() {
            let z = authzid
                .strip_prefix("a=")
                .ok_or(SaslError::MalformedRequest)?;
            let z = decode_saslname(z)?;
            let local = z.split('@').next().unwrap_or_default();
            if Username::new(local).ok().as_ref() != Some(&username) {
                return Err(SaslError::InvalidAuthzid);
            }
        }
        self.state = State::Named {
            username: username.clone(),
            client_first_bare: bare.to_owned(),
            gs2_header: format!("{flag},{authzid},"),
            client_nonce: client_nonce.to_owned(),
        };
        Ok(username)
    }

    /// Given the account's credentials for this mechanism (`None` for an unknown user),
    /// returns `server-first-message`.
    pub fn server_first(&mut self, keys: Option<ScramKeys>) -> Result<Vec<u8>, SaslError> {
        let State::Named {
            username,
            client_first_bare,
            gs2_header,
            client_nonce,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(SaslError::MalformedRequest);
        };
        let (salt, iterations) = match &keys {
            Some(k) => (k.salt.clone(), k.iterations),
            None => {
                let mut fake = self.hash.hmac(&self.secret, username.as_str().as_bytes());
                fake.truncate(16);
                (fake, DEFAULT_ITERATIONS)
            }
        };
        let nonce = format!("{client_nonce}{}", self.server_nonce);
        let server_first = format!("r={nonce},s={},i={iterations}", B64.encode(&salt));
        self.state = State::Challenged {
            username,
            keys,
            auth_prefix: format!("{client_first_bare},{server_first}"),
            gs2_header,
            nonce,
        };
        Ok(server_first.into_bytes())
    }

    /// Checks `client-final-message`; on success returns the user and
    /// `server-final-message` (`v=<signature>`), to send in `<success/>`.
    pub fn handle_client_final(&mut self, msg: &[u8]) -> Result<(Username, Vec<u8>), SaslError> {
        let State::Challenged {
            username,
            keys,
            auth_prefix,
            gs2_header,
            nonce,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(SaslError::MalformedRequest);
        };
        if msg.len() > MAX_MESSAGE_BYTES {
            return Err(SaslError::MalformedRequest);
        }
        let text = std::str::from_utf8(msg).map_err(|_| SaslError::MalformedRequest)?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(SaslError::MalformedRequest)?;
        let mut attrs = without_proof.split(',');
        let cbind = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(SaslError::MalformedRequest)?;
        let got_nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(SaslError::MalformedRequest)?;
        if B64
            .decode(cbind)
            .map_err(|_| SaslError::IncorrectEncoding)?
            != gs2_header.as_bytes()
        {
            return Err(SaslError::NotAuthorized);
        }
        if got_nonce != nonce {
            return Err(SaslError::NotAuthorized);
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| SaslError::IncorrectEncoding)?;
        let keys = keys.ok_or(SaslError::NotAuthorized)?;
        let auth_message = format!("{auth_prefix},{without_proof}");
        let client_signature = self.hash.hmac(&keys.stored_key, auth_message.as_bytes());
        if proof.len() != client_signature.len() {
            return Err(SaslError::NotAuthorized);
        }
        let client_key: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(p, s)| p ^ s)
            .collect();
        let computed = self.hash.hash(&client_key);
        let same = computed
            .iter()
            .zip(&keys.stored_key)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
            && computed.len() == keys.stored_key.len();
        if !same {
            return Err(SaslError::NotAuthorized);
        }
        let server_signature = self.hash.hmac(&keys.server_key, auth_message.as_bytes());
        Ok((
            username,
            format!("v={}", B64.encode(server_signature)).into_bytes(),
        ))
    }
}

/// Parses a PLAIN message (`[authzid] NUL authcid NUL passwd`, RFC 4616 §2).
pub fn parse_plain(msg: &[u8]) -> Result<(Username, String), SaslError> {
    if msg.len() > MAX_MESSAGE_BYTES {
        return Err(SaslError::MalformedRequest);
    }
    let text = std::str::from_utf8(msg).map_err(|_| SaslError::MalformedRequest)?;
    let mut parts = text.split('\0');
    let (authzid, authcid, password) =
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(z), Some(c), Some(p), None) => (z, c, p),
            _ => return Err(SaslError::MalformedRequest),
        };
    let username = Username::new(authcid).map_err(|_| SaslError::NotAuthorized)?;
    if !authzid.is_empty() {
        let local = authzid.split('@').next().unwrap_or_default();
        if Username::new(local).ok().as_ref() != Some(&username) {
            return Err(SaslError::InvalidAuthzid);
        }
    }
    Ok((username, password.to_owned()))
}

/// Checks a PLAIN password against stored SCRAM credentials.
pub fn verify_password(hash: ScramHash, keys: &ScramKeys, password: &str) -> bool {
    let derived = derive_keys(hash, password, &keys.salt, keys.iterations);
    derived.stored_key.len() == keys.stored_key.len()
        && derived
            .stored_key
            .iter()
            .zip(&keys.stored_key)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the exchange of an RFC example against keys derived from its password.
    fn rfc_exchange(
        hash: ScramHash,
        cnonce: &str,
        snonce_suffix: &str,
        salt_b64: &str,
        proof: &str,
        verifier: &str,
    ) {
        let salt = B64.decode(salt_b64).expect("salt");
        let keys = derive_keys(hash, "pencil", &salt, 4096);
        let mut s = Scram::new(hash, snonce_suffix.to_owned(), [7; 32]);
        let user = s
            .handle_client_first(format!("n,,n=user,r={cnonce}").as_bytes())
            .expect("client-first");
        assert_eq!(user.as_str(), "user");
        let first =
            String::from_utf8(s.server_first(Some(keys)).expect("server-first")).expect("utf-8");
        assert_eq!(
            first,
            format!("r={cnonce}{snonce_suffix},s={salt_b64},i=4096")
        );
        let final_msg = format!("c=biws,r={cnonce}{snonce_suffix},p={proof}");
        let (_, v) = s
            .handle_client_final(final_msg.as_bytes())
            .expect("proof accepted");
        assert_eq!(
            String::from_utf8(v).expect("utf-8"),
            format!("v={verifier}")
        );
    }

    #[test]
    fn scram_sha1_matches_the_rfc_5802_example() {
        rfc_exchange(
            ScramHash::Sha1,
            "fyko+d2lbbFgONRv9qkxdawL",
            "3rfcNHYJY1ZVvWVs7j",
            "QSXCR+Q6sek8bf92",
            "v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
            "rmF9pqV8S7suAoZWja4dJRkFsKQ=",
        );
    }

    #[test]
    fn scram_sha256_matches_the_rfc_7677_example() {
        rfc_exchange(
            ScramHash::Sha256,
            "rOprNGfwEbeRWgbNEkqO",
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            "W22ZaJ0SNY7soEsUEjb6gQ==",
            "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        );
    }

    fn challenged(keys: Option<ScramKeys>, snonce: &str) -> Scram {
        let mut s = Scram::new(ScramHash::Sha256, snonce.to_owned(), [7; 32]);
        s.handle_client_first(b"n,,n=user,r=abc")
            .expect("client-first");
        s.server_first(keys).expect("server-first");
        s
    }

    #[test]
    fn a_wrong_proof_a_replayed_nonce_or_an_unknown_user_is_not_authorized() {
        let keys = derive_keys(ScramHash::Sha256, "pencil", b"salt", 4096);
        let mut s = challenged(Some(keys.clone()), "server1");
        let bogus = format!("c=biws,r=abcserver1,p={}", B64.encode([0u8; 32]));
        assert_eq!(
            s.handle_client_final(bogus.as_bytes()).err(),
            Some(SaslError::NotAuthorized)
        );
        // A final message made for another exchange's nonce.
        let mut s = challenged(Some(keys), "server2");
        let replay = format!("c=biws,r=abcserver1,p={}", B64.encode([0u8; 32]));
        assert_eq!(
            s.handle_client_final(replay.as_bytes()).err(),
            Some(SaslError::NotAuthorized)
        );
        let mut s = challenged(None, "server3");
        let unknown = format!("c=biws,r=abcserver3,p={}", B64.encode([0u8; 32]));
        assert_eq!(
            s.handle_client_final(unknown.as_bytes()).err(),
            Some(SaslError::NotAuthorized)
        );
    }

    #[test]
    fn unknown_users_get_a_stable_believable_salt() {
        let mut a = Scram::new(ScramHash::Sha256, "n1".into(), [9; 32]);
        a.handle_client_first(b"n,,n=ghost,r=x")
            .expect("client-first");
        let fa = String::from_utf8(a.server_first(None).expect("first")).expect("utf-8");
        let mut b = Scram::new(ScramHash::Sha256, "n2".into(), [9; 32]);
        b.handle_client_first(b"n,,n=ghost,r=x")
            .expect("client-first");
        let fb = String::from_utf8(b.server_first(None).expect("first")).expect("utf-8");
        let salt = |f: &str| f.split(',').nth(1).map(str::to_owned);
        assert_eq!(salt(&fa), salt(&fb));
        assert!(fa.ends_with(",i=4096"));
    }

    #[test]
    fn malformed_messages_are_refused_with_the_right_condition() {
        let mut s = Scram::new(ScramHash::Sha256, "n".into(), [0; 32]);
        assert_eq!(
            s.handle_client_first(b"garbage").err(),
            Some(SaslError::MalformedRequest)
        );
        let mut s = Scram::new(ScramHash::Sha256, "n".into(), [0; 32]);
        assert_eq!(
            s.handle_client_first(b"p=tls-unique,,n=u,r=x").err(),
            Some(SaslError::InvalidMechanism)
        );
        let mut s = Scram::new(ScramHash::Sha256, "n".into(), [0; 32]);
        assert_eq!(
            s.handle_client_first(b"n,a=bob,n=alice,r=x").err(),
            Some(SaslError::InvalidAuthzid)
        );
        let mut s = challenged(None, "n");
        assert_eq!(
            s.handle_client_final(b"c=biws,r=abcn,p=!!!").err(),
            Some(SaslError::IncorrectEncoding)
        );
        assert_eq!(
            decode_b64("not base64!").err(),
            Some(SaslError::IncorrectEncoding)
        );
        assert_eq!(decode_b64("=").ok(), Some(Vec::new()));
    }

    #[test]
    fn plain_checks_the_password_against_scram_credentials() {
        let keys = derive_keys(ScramHash::Sha256, "s3cret", b"salt", 4096);
        let (user, pw) = parse_plain(b"\0alice\0s3cret").expect("parses");
        assert_eq!(user.as_str(), "alice");
        assert!(verify_password(ScramHash::Sha256, &keys, &pw));
        assert!(!verify_password(ScramHash::Sha256, &keys, "wrong"));
        assert_eq!(
            parse_plain(b"alice\0s3cret").err(),
            Some(SaslError::MalformedRequest)
        );
        assert_eq!(
            parse_plain(b"bob\0alice\0x").err(),
            Some(SaslError::InvalidAuthzid)
        );
    }
}
