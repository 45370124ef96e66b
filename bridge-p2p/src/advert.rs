//! Advertisements with expiry (JXTA's peer, group and pipe advertisements).
//!
//! Every overlay node publishes, for each group it is in, one [`Advertisement`]: who it is
//! (gateway or edge peer), where it listens, which of the group's nodes (pipes) it serves, and
//! until when this holds. It is signed with the node's own identity key, so anyone can check
//! it without asking its author, and it is refreshed before it expires.
//!
//! Where they live:
//!
//! - **Kademlia records**: the signed advertisement under [`advert_key`]`(group, peer)`;
//! - **Kademlia provider records** (the index, JXTA's SRDI): the advertiser provides
//!   [`group_key`]`(group)`, and [`pipe_key`]`(group, node)` for every node it serves;
//! - **rendezvous** (namespace = group): edge peers register there with their addresses
//!   (relayed ones behind NAT), so members find each other.
//!
//! [`discover`] puts the three together: which nodes a group offers and which peers serve
//! them. Gateways check every record other peers store with them (signature, key, expiry)
//! and refuse the rest.
//!
//! # Wire form (version 1)
//!
//! The record: a CBOR array `[1, peer id bytes, group, role (0 gateway, 1 edge), [node…],
//! [multiaddr bytes…], issued_at, expires_at]` (times in unix seconds). The signed form:
//! `[record bytes, public key (libp2p protobuf), signature]`, the signature covering
//! [`ADVERT_DOMAIN`] followed by the record bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use libp2p::identity::{Keypair, PublicKey};
use libp2p::{Multiaddr, PeerId, kad};
use serde::Serialize;

use crate::group::validate_group_name;

/// The advertisement format this code writes and reads.
pub const ADVERT_VERSION: u64 = 1;
/// Domain separation of advertisement signatures.
pub const ADVERT_DOMAIN: &[u8] = b"juxta-advert-v1\0";
/// Default lifetime of an advertisement; it is refreshed at half of it.
pub const DEFAULT_ADVERT_TTL: Duration = Duration::from_secs(3600);
/// Longest lifetime accepted: a record claiming more is refused.
pub const MAX_ADVERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Largest signed advertisement accepted or produced (Kademlia's packets are sized for it).
pub const MAX_ADVERT_BYTES: usize = 512 * 1024;
/// Most nodes one advertisement lists; a gateway serving more advertises the first ones
/// (in name order) and every pipe through its provider records anyway.
pub const MAX_ADVERT_NODES: usize = 2048;
/// Most addresses one advertisement lists.
pub const MAX_ADVERT_ADDRS: usize = 32;

/// Kademlia key of `peer`'s advertisement in `group`.
pub fn advert_key(group: &str, peer: &PeerId) -> kad::RecordKey {
    kad::RecordKey::new(&format!("/juxta/adv/{group}/{peer}"))
}

/// Kademlia provider key of `group`: its providers are the peers that advertise in it.
pub fn group_key(group: &str) -> kad::RecordKey {
    kad::RecordKey::new(&format!("/juxta/group/{group}"))
}

/// Kademlia provider key of the pipe of `node` in `group`: its providers serve that node.
pub fn pipe_key(group: &str, node: &str) -> kad::RecordKey {
    kad::RecordKey::new(&format!("/juxta/pipe/{group}/{node}"))
}

/// Whether `key` is a provider key juxta uses (others are refused).
pub fn is_provider_key(key: &kad::RecordKey) -> bool {
    let k = key.as_ref();
    k.starts_with(b"/juxta/group/") || k.starts_with(b"/juxta/pipe/")
}

/// What the advertiser is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdvertRole {
    /// A gateway: stores the group's nodes, answers catch-up, relays.
    Gateway,
    /// An edge peer.
    Edge,
}

/// One node's advertisement in one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advertisement {
    /// The advertiser (and signer).
    pub peer: PeerId,
    /// The group.
    pub group: String,
    /// What the advertiser is.
    pub role: AdvertRole,
    /// The group's nodes it serves (a gateway) or follows (an edge peer), sorted.
    pub nodes: Vec<String>,
    /// Where it can be reached.
    pub addrs: Vec<Multiaddr>,
    /// When it was made (unix seconds).
    pub issued_at: u64,
    /// When it stops being true (unix seconds, exclusive).
    pub expires_at: u64,
}

/// Why an advertisement was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AdvertError {
    /// Not a well-formed advertisement.
    #[error("malformed advertisement: {0}")]
    Malformed(String),
    /// The signature does not verify, or the key is not the advertiser's.
    #[error("the advertisement's signature is not its advertiser's")]
    BadSignature,
    /// Stored under a key other than its own.
    #[error("the advertisement is stored under another key")]
    WrongKey,
    /// Past its expiry.
    #[error("the advertisement expired at {0} (unix seconds)")]
    Expired(u64),
    /// Claims a lifetime longer than [`MAX_ADVERT_TTL`].
    #[error("the advertisement claims a lifetime longer than allowed")]
    TooLong,
}

impl AdvertError {
    /// A stable code, for metrics.
    pub fn code(&self) -> &'static str {
        match self {
            AdvertError::Malformed(_) => "advert_malformed",
            AdvertError::BadSignature => "advert_bad_signature",
            AdvertError::WrongKey => "advert_wrong_key",
            AdvertError::Expired(_) => "advert_expired",
            AdvertError::TooLong => "advert_too_long",
        }
    }
}

type RecordWire = (
    u64,
    serde_bytes::ByteBuf,
    String,
    u8,
    Vec<String>,
    Vec<serde_bytes::ByteBuf>,
    u64,
    u64,
);
type SignedWire = (
    serde_bytes::ByteBuf,
    serde_bytes::ByteBuf,
    serde_bytes::ByteBuf,
);

fn to_cbor<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = ciborium::ser::into_writer(value, &mut out);
    out
}

fn from_cbor<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, AdvertError> {
    let mut rest = b;
    let v = ciborium::de::from_reader(&mut rest)
        .map_err(|e: ciborium::de::Error<std::io::Error>| AdvertError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(AdvertError::Malformed(format!(
            "{} bytes after the record",
            rest.len()
        )));
    }
    Ok(v)
}

impl Advertisement {
    /// `peer`'s advertisement in `group`, valid for `ttl` from `now` (unix seconds). Nodes are
    /// sorted, deduplicated and cut at [`MAX_ADVERT_NODES`]; addresses at
    /// [`MAX_ADVERT_ADDRS`].
    pub fn new(
        peer: PeerId,
        group: &str,
        role: AdvertRole,
        nodes: impl IntoIterator<Item = String>,
        addrs: impl IntoIterator<Item = Multiaddr>,
        now: u64,
        ttl: Duration,
    ) -> Self {
        let nodes: BTreeSet<String> = nodes.into_iter().collect();
        let mut seen = BTreeSet::new();
        let addrs = addrs
            .into_iter()
            .filter(|a| seen.insert(a.to_vec()))
            .take(MAX_ADVERT_ADDRS)
            .collect();
        Self {
            peer,
            group: group.to_owned(),
            role,
            nodes: nodes.into_iter().take(MAX_ADVERT_NODES).collect(),
            addrs,
            issued_at: now,
            expires_at: now.saturating_add(ttl.as_secs().max(1)),
        }
    }

    fn record_bytes(&self) -> Vec<u8> {
        let wire: RecordWire = (
            ADVERT_VERSION,
            serde_bytes::ByteBuf::from(self.peer.to_bytes()),
            self.group.clone(),
            match self.role {
                AdvertRole::Gateway => 0,
                AdvertRole::Edge => 1,
            },
            self.nodes.clone(),
            self.addrs
                .iter()
                .map(|a| serde_bytes::ByteBuf::from(a.to_vec()))
                .collect(),
            self.issued_at,
            self.expires_at,
        );
        to_cbor(&wire)
    }

    /// The signed form, with `keypair` (whose peer id must be [`Advertisement::peer`]).
    pub fn sign(&self, keypair: &Keypair) -> Result<Vec<u8>, AdvertError> {
        if keypair.public().to_peer_id() != self.peer {
            return Err(AdvertError::BadSignature);
        }
        let record = self.record_bytes();
        let mut message = ADVERT_DOMAIN.to_vec();
        message.extend_from_slice(&record);
        let signature = keypair
            .sign(&message)
            .map_err(|e| AdvertError::Malformed(e.to_string()))?;
        let wire: SignedWire = (
            serde_bytes::ByteBuf::from(record),
            serde_bytes::ByteBuf::from(keypair.public().encode_protobuf()),
            serde_bytes::ByteBuf::from(signature),
        );
        let out = to_cbor(&wire);
        if out.len() > MAX_ADVERT_BYTES {
            return Err(AdvertError::Malformed(format!(
                "{} bytes, more than {MAX_ADVERT_BYTES}",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Reads and checks a signed advertisement: its form, that the key that signed it is the
    /// advertiser's and the signature holds, and that it is current at `now` (unix seconds)
    /// without claiming more than [`MAX_ADVERT_TTL`].
    pub fn verify(signed: &[u8], now: u64) -> Result<Self, AdvertError> {
        if signed.len() > MAX_ADVERT_BYTES {
            return Err(AdvertError::Malformed(format!(
                "{} bytes, more than {MAX_ADVERT_BYTES}",
                signed.len()
            )));
        }
        let (record, key, signature): SignedWire = from_cbor(signed)?;
        let key = PublicKey::try_decode_protobuf(&key)
            .map_err(|e| AdvertError::Malformed(format!("public key: {e}")))?;
        let (version, peer, group, role, nodes, addrs, issued_at, expires_at): RecordWire =
            from_cbor(&record)?;
        if version != ADVERT_VERSION {
            return Err(AdvertError::Malformed(format!(
                "unknown advertisement version {version}"
            )));
        }
        let peer = PeerId::from_bytes(&peer)
            .map_err(|e| AdvertError::Malformed(format!("peer id: {e}")))?;
        if key.to_peer_id() != peer {
            return Err(AdvertError::BadSignature);
        }
        let mut message = ADVERT_DOMAIN.to_vec();
        message.extend_from_slice(&record);
        if !key.verify(&message, &signature) {
            return Err(AdvertError::BadSignature);
        }
        validate_group_name(&group).map_err(|e| AdvertError::Malformed(e.to_string()))?;
        let role = match role {
            0 => AdvertRole::Gateway,
            1 => AdvertRole::Edge,
            r => return Err(AdvertError::Malformed(format!("unknown role {r}"))),
        };
        if nodes.len() > MAX_ADVERT_NODES || addrs.len() > MAX_ADVERT_ADDRS {
            return Err(AdvertError::Malformed("too many nodes or addresses".into()));
        }
        let addrs = addrs
            .into_iter()
            .map(|a| {
                Multiaddr::try_from(a.into_vec())
                    .map_err(|e| AdvertError::Malformed(format!("address: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if now >= expires_at {
            return Err(AdvertError::Expired(expires_at));
        }
        if expires_at.saturating_sub(now.max(issued_at)) > MAX_ADVERT_TTL.as_secs() {
            return Err(AdvertError::TooLong);
        }
        Ok(Self {
            peer,
            group,
            role,
            nodes,
            addrs,
            issued_at,
            expires_at,
        })
    }

    /// Checks a Kademlia record holding an advertisement: valid (see
    /// [`Advertisement::verify`]) and stored under its own key.
    pub fn verify_record(record: &kad::Record, now: u64) -> Result<Self, AdvertError> {
        let advert = Self::verify(&record.value, now)?;
        if record.key != advert_key(&advert.group, &advert.peer) {
            return Err(AdvertError::WrongKey);
        }
        Ok(advert)
    }
}

/// One peer found by [`discover`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiscoveredPeer {
    /// Its id.
    pub peer: String,
    /// What it is, when its advertisement was found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<AdvertRole>,
    /// Its addresses (from its advertisement, else from its rendezvous registration).
    pub addrs: Vec<String>,
    /// Nodes it serves or follows.
    pub nodes: Vec<String>,
    /// When its advertisement expires (unix seconds), when one was found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Where it was found: `kademlia`, `rendezvous`, or both.
    pub found_in: Vec<&'static str>,
}

/// What [`discover`] found out about a group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Discovery {
    /// The group.
    pub group: String,
    /// Each node the group offers, with the peers that serve it (gateways first).
    pub nodes: BTreeMap<String, Vec<String>>,
    /// Every peer found.
    pub peers: Vec<DiscoveredPeer>,
    /// Records that were found but refused (forged, expired, misplaced), by reason.
    pub refused: BTreeMap<&'static str, u64>,
}

/// Finds what `group` offers, through `overlay`: the group's providers and rendezvous
/// registrations (at each of `rendezvous` points, usually the bootstrap gateways), then each
/// peer's advertisement, checked.
pub async fn discover(
    overlay: &crate::node::Overlay,
    group: &str,
    rendezvous: &[PeerId],
) -> Result<Discovery, crate::node::OverlayError> {
    let now = crate::node::now_secs();
    let mut found: BTreeMap<PeerId, DiscoveredPeer> = BTreeMap::new();
    let blank = |peer: PeerId| DiscoveredPeer {
        peer: peer.to_string(),
        role: None,
        addrs: Vec::new(),
        nodes: Vec::new(),
        expires_at: None,
        found_in: Vec::new(),
    };
    for peer in overlay.get_providers(group_key(group)).await? {
        found.entry(peer).or_insert_with(|| blank(peer));
    }
    for point in rendezvous {
        match overlay.rendezvous_discover(group, *point).await {
            Ok(registrations) => {
                for (peer, addrs) in registrations {
                    let p = found.entry(peer).or_insert_with(|| blank(peer));
                    p.found_in.push("rendezvous");
                    p.addrs = addrs.iter().map(ToString::to_string).collect();
                }
            }
            Err(e) => tracing::debug!(%point, error = %e, "discover: rendezvous"),
        }
    }
    let mut discovery = Discovery {
        group: group.to_owned(),
        ..Discovery::default()
    };
    let mut serving: BTreeMap<String, Vec<(AdvertRole, String)>> = BTreeMap::new();
    for (peer, entry) in &mut found {
        for record in overlay.get_record(advert_key(group, peer)).await? {
            match Advertisement::verify_record(&record, now) {
                Ok(advert) if advert.peer == *peer && advert.group == group => {
                    entry.found_in.insert(0, "kademlia");
                    entry.role = Some(advert.role);
                    entry.addrs = advert.addrs.iter().map(ToString::to_string).collect();
                    entry.expires_at = Some(advert.expires_at);
                    for node in &advert.nodes {
                        serving
                            .entry(node.clone())
                            .or_default()
                            .push((advert.role, peer.to_string()));
                    }
                    entry.nodes = advert.nodes;
                    break;
                }
                Ok(_) => *discovery.refused.entry("advert_wrong_key").or_default() += 1,
                Err(e) => *discovery.refused.entry(e.code()).or_default() += 1,
            }
        }
        entry.found_in.dedup();
    }
    for (node, mut peers) in serving {
        peers.sort();
        discovery
            .nodes
            .insert(node, peers.into_iter().map(|(_, p)| p).collect());
    }
    // The asking peer itself is no answer.
    let local = overlay.local_peer_id().to_string();
    discovery.peers = found.into_values().filter(|p| p.peer != local).collect();
    Ok(discovery)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advert(keypair: &Keypair, now: u64) -> Advertisement {
        Advertisement::new(
            keypair.public().to_peer_id(),
            "public",
            AdvertRole::Gateway,
            ["b".to_owned(), "a".to_owned(), "a".to_owned()],
            ["/ip4/10.0.0.1/tcp/4001".parse().expect("test value")],
            now,
            Duration::from_secs(60),
        )
    }

    #[test]
    fn a_signed_advertisement_verifies_until_it_expires() {
        let k = Keypair::generate_ed25519();
        let a = advert(&k, 1000);
        assert_eq!(a.nodes, ["a", "b"]);
        let signed = a.sign(&k).expect("test value");
        assert_eq!(Advertisement::verify(&signed, 1000).expect("test value"), a);
        assert_eq!(Advertisement::verify(&signed, 1059).expect("test value"), a);
        assert_eq!(
            Advertisement::verify(&signed, 1060),
            Err(AdvertError::Expired(1060))
        );
    }

    #[test]
    fn forged_and_misplaced_advertisements_are_refused() {
        let k = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let a = advert(&k, 1000);
        // Signed by someone else than the peer it names.
        assert_eq!(a.sign(&other), Err(AdvertError::BadSignature));
        let mut forged = a.clone();
        forged.peer = other.public().to_peer_id();
        let signed = forged.sign(&other).expect("test value");
        // Re-wrap the first advertiser's record with the other's signature and key.
        let (record, _, _): SignedWire =
            from_cbor(&a.sign(&k).expect("test value")).expect("test value");
        let (_, key, sig): SignedWire = from_cbor(&signed).expect("test value");
        let spliced = to_cbor(&(record, key, sig));
        assert_eq!(
            Advertisement::verify(&spliced, 1000),
            Err(AdvertError::BadSignature)
        );
        // A flipped byte in the record.
        let mut bytes = a.sign(&k).expect("test value");
        let n = bytes.len();
        bytes[n / 3] ^= 0x01;
        assert!(Advertisement::verify(&bytes, 1000).is_err());
        // Garbage and an oversized value.
        assert!(matches!(
            Advertisement::verify(b"\xff\x00", 1000),
            Err(AdvertError::Malformed(_))
        ));
        assert!(matches!(
            Advertisement::verify(&vec![0; MAX_ADVERT_BYTES + 1], 1000),
            Err(AdvertError::Malformed(_))
        ));
        // A lifetime beyond the limit.
        let mut long = a.clone();
        long.expires_at = 1000 + MAX_ADVERT_TTL.as_secs() + 1;
        assert_eq!(
            Advertisement::verify(&long.sign(&k).expect("test value"), 1000),
            Err(AdvertError::TooLong)
        );
        // Stored under another peer's key.
        let record = kad::Record::new(
            advert_key("public", &other.public().to_peer_id()),
            a.sign(&k).expect("test value"),
        );
        assert_eq!(
            Advertisement::verify_record(&record, 1000),
            Err(AdvertError::WrongKey)
        );
        let record = kad::Record::new(
            advert_key("public", &a.peer),
            a.sign(&k).expect("test value"),
        );
        assert_eq!(
            Advertisement::verify_record(&record, 1000).expect("test value"),
            a
        );
    }

    #[test]
    fn provider_keys_are_recognised() {
        assert!(is_provider_key(&group_key("public")));
        assert!(is_provider_key(&pipe_key("public", "n")));
        assert!(!is_provider_key(&kad::RecordKey::new(&"/ipfs/x")));
    }
}
