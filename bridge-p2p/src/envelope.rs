//! The propagate pipe's message: a versioned, compact CBOR envelope.
//!
//! Two kinds of envelope travel on a pipe (`juxta/<group>/<node>`):
//!
//! - a **stored event**, sent by a gateway after the store appended it: it carries the offset
//!   and epoch the store assigned, so a receiver can tell a gap and fill it with catch-up;
//! - a **publication** by a member peer: no offset yet (the gateway stores it and assigns one,
//!   and then sends the stored event), but the peer's own sequence number, which together with
//!   the peer id is the publication's identity for deduplication.
//!
//! # Wire form (version 1)
//!
//! One definite-length CBOR array; the version comes first so that a receiver can refuse an
//! envelope it does not understand before reading the rest:
//!
//! | # | field | CBOR |
//! |---|---|---|
//! | 0 | version (`1`) | uint |
//! | 1 | node | text |
//! | 2 | kind: 0 published, 1 retracted, 2 purged, 3 deleted | uint |
//! | 3 | item id | text or null |
//! | 4 | offset | uint or null |
//! | 5 | epoch | uint or null |
//! | 6 | content type: 0 JSON, 1 XML, 2 binary | uint or null |
//! | 7 | payload | bytes or null |
//! | 8 | publisher | text |
//! | 9 | time (ms since the Unix epoch) | uint |
//! | 10 | seq | uint or null |
//!
//! Positions instead of map keys keep the per-message overhead to a few dozen bytes.
//!
//! # Batches (version 2)
//!
//! A busy pipe carries several stored events of its node in one message: `[2, [envelope,
//! …]]`, two to [`MAX_BATCH`] version 1 envelopes of one node and epoch, offsets increasing,
//! [`MAX_ENVELOPE_BYTES`] in all. Each message is signed and checked once, so a batch costs
//! a receiver one signature check instead of one per event. Member peers' publications are
//! never batched. [`decode_message`] reads either form.

use bytes::Bytes;
use juxta_core::{Change, ContentType, Epoch, Event, EventKind, ItemId, NodeName, Payload};
use libp2p::PeerId;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, SeqAccess, Visitor};
use sha2::{Digest, Sha256};

/// The envelope format this code writes and reads.
pub const ENVELOPE_VERSION: u8 = 1;

/// Largest encoded envelope accepted or produced (gossipsub's max_transmit_size is set above
/// this).
///
/// The gateway's default payload limit (`juxta_core::bus::DEFAULT_MAX_PAYLOAD_BYTES`, 1 MiB)
/// plus 4 KiB for the rest: a 255-byte node name and item id, a publisher as long as the
/// longest JID (3071 bytes, RFC 7622 §3.1) and the fixed fields come to about 3.6 KiB.
pub const MAX_ENVELOPE_BYTES: usize = 1024 * 1024 + 4096;

/// Number of fields in a version 1 envelope.
const FIELDS_V1: u64 = 11;

/// The version of a batch of envelopes (see the module docs).
pub const BATCH_VERSION: u8 = 2;

/// Most envelopes in one batch.
pub const MAX_BATCH: usize = 64;

/// What an envelope reports: the kind of the event (for a publication, always `Published`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An item was published (or overwritten).
    Published,
    /// An item was retracted.
    Retracted,
    /// All items of the node were removed.
    Purged,
    /// The node was deleted.
    Deleted,
}

impl Kind {
    fn code(self) -> u64 {
        match self {
            Kind::Published => 0,
            Kind::Retracted => 1,
            Kind::Purged => 2,
            Kind::Deleted => 3,
        }
    }

    fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            0 => Kind::Published,
            1 => Kind::Retracted,
            2 => Kind::Purged,
            3 => Kind::Deleted,
            _ => return None,
        })
    }
}

impl From<EventKind> for Kind {
    fn from(kind: EventKind) -> Self {
        match kind {
            EventKind::Published => Kind::Published,
            EventKind::Retracted => Kind::Retracted,
            EventKind::Purged => Kind::Purged,
            EventKind::Deleted => Kind::Deleted,
        }
    }
}

impl From<Kind> for EventKind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Published => EventKind::Published,
            Kind::Retracted => EventKind::Retracted,
            Kind::Purged => EventKind::Purged,
            Kind::Deleted => EventKind::Deleted,
        }
    }
}

/// The wire code of a content type. Ours, not core's, because it is part of the wire format
/// and must never change with core's internals.
fn content_type_code(ct: ContentType) -> u64 {
    match ct {
        ContentType::Json => 0,
        ContentType::Xml => 1,
        ContentType::Binary => 2,
    }
}

fn content_type_from_code(code: u64) -> Option<ContentType> {
    Some(match code {
        0 => ContentType::Json,
        1 => ContentType::Xml,
        2 => ContentType::Binary,
        _ => return None,
    })
}

/// One message on a propagate pipe: a stored event, or a member peer's publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The node (pipe) it belongs to.
    pub node: NodeName,
    /// What happened.
    pub kind: Kind,
    /// The item (Published, Retracted); None for Purged/Deleted.
    pub item_id: Option<ItemId>,
    /// Where the store put it; None on a member peer's publication (the gateway stores it and
    /// assigns one).
    pub offset: Option<u64>,
    /// The node's history id the offset belongs to; None on a member peer's publication.
    pub epoch: Option<Epoch>,
    /// Published only: the payload and its content type.
    pub payload: Option<Payload>,
    /// Who published: for a stored event the item's publisher string; on a peer's
    /// publication, the peer id string (the gateway checks it equals the gossipsub message
    /// source — forged publisher fields are rejected by [`Envelope::check_source`]).
    pub publisher: String,
    /// Milliseconds since the Unix epoch.
    pub time: u64,
    /// A member peer's publication: that peer's sequence number for it (its dedup identity).
    /// None on stored events.
    pub seq: Option<u64>,
}

impl Envelope {
    /// The envelope of a stored event (offset and epoch set, seq None). Deleted/Purged carry
    /// no item.
    pub fn from_event(event: &Event) -> Self {
        let (kind, item_id, payload, publisher, time) = match &event.change {
            Change::Published(item) => (
                Kind::Published,
                Some(item.id.clone()),
                Some(item.payload.clone()),
                item.publisher.to_string(),
                item.published_at,
            ),
            Change::Retracted(id) => (
                Kind::Retracted,
                Some(id.clone()),
                None,
                String::new(),
                event.at,
            ),
            Change::Purged => (Kind::Purged, None, None, String::new(), event.at),
            Change::Deleted => (Kind::Deleted, None, None, String::new(), event.at),
        };
        Self {
            node: event.node.clone(),
            kind,
            item_id,
            offset: Some(event.offset),
            epoch: Some(event.epoch),
            payload,
            publisher,
            time,
            seq: None,
        }
    }

    /// A member peer's publication of `payload` as `item_id` (offset/epoch None), publisher =
    /// peer.to_string(), time = now.
    pub fn publication(
        node: NodeName,
        item_id: ItemId,
        payload: Payload,
        peer: &PeerId,
        seq: u64,
    ) -> Self {
        Self {
            node,
            kind: Kind::Published,
            item_id: Some(item_id),
            offset: None,
            epoch: None,
            payload: Some(payload),
            publisher: peer.to_string(),
            time: juxta_core::time::now_ms(),
            seq: Some(seq),
        }
    }

    /// Whether this is a stored event (offset and epoch set, no seq) rather than a peer's
    /// publication. Anything else is treated as a publication, the stricter case.
    fn is_stored(&self) -> bool {
        self.offset.is_some() && self.epoch.is_some() && self.seq.is_none()
    }

    /// CBOR, with the version first; never larger than [`MAX_ENVELOPE_BYTES`] for payloads
    /// the gateway accepts (see the constant for the budget).
    pub fn encode(&self) -> Vec<u8> {
        let payload_len = self.payload.as_ref().map_or(0, Payload::len);
        let mut out = Vec::with_capacity(payload_len + 128 + self.publisher.len());
        cbor::array(&mut out, FIELDS_V1);
        cbor::uint(&mut out, u64::from(ENVELOPE_VERSION));
        cbor::text(&mut out, self.node.as_str());
        cbor::uint(&mut out, self.kind.code());
        cbor::opt_text(&mut out, self.item_id.as_ref().map(ItemId::as_str));
        cbor::opt_uint(&mut out, self.offset);
        cbor::opt_uint(&mut out, self.epoch.map(|e| e.0));
        cbor::opt_uint(
            &mut out,
            self.payload
                .as_ref()
                .map(|p| content_type_code(p.content_type)),
        );
        match &self.payload {
            Some(p) => cbor::bytes(&mut out, &p.bytes),
            None => cbor::null(&mut out),
        }
        cbor::text(&mut out, &self.publisher);
        cbor::uint(&mut out, self.time);
        cbor::opt_uint(&mut out, self.seq);
        out
    }

    /// Decodes and validates (version, node name, item id, kind/field consistency: Published
    /// needs item_id and payload, Retracted needs item_id, stored events need offset+epoch,
    /// publications need seq; size limit first). Bad input is an [`EnvelopeError`], never a
    /// panic.
    ///
    /// A publication must be `Published` and name a peer id as its publisher: a member peer
    /// can publish items, not retract, purge or delete through the pipe.
    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge {
                size: bytes.len(),
                limit: MAX_ENVELOPE_BYTES,
            });
        }
        let mut rest = bytes;
        let decoded: Decoded = ciborium::de::from_reader(&mut rest)
            .map_err(|e| EnvelopeError::Undecodable(e.to_string()))?;
        let raw = match decoded {
            Decoded::V1(raw) => raw,
            Decoded::Unknown(v) => {
                return Err(EnvelopeError::UnknownVersion(
                    u8::try_from(v).unwrap_or(u8::MAX),
                ));
            }
        };
        if !rest.is_empty() {
            return Err(EnvelopeError::Undecodable(format!(
                "{} bytes after the envelope",
                rest.len()
            )));
        }
        raw.validate()
    }

    /// The gossipsub message id: the publication's identity, so that every copy of one
    /// publication dedups while an overwrite of the same item id stays a new message.
    ///
    /// Stored event: sha256 over ("stored", node, epoch, offset). Peer publication: sha256
    /// over ("peer", node, item id, publisher, seq). Every field is prefixed by its length
    /// (u64, big-endian) so that different splits of the same bytes never collide.
    pub fn message_id(&self) -> Vec<u8> {
        let mut h = Sha256::new();
        match (self.is_stored(), self.offset, self.epoch) {
            (true, Some(offset), Some(epoch)) => {
                id_field(&mut h, b"stored");
                id_field(&mut h, self.node.as_str().as_bytes());
                id_field(&mut h, &epoch.0.to_be_bytes());
                id_field(&mut h, &offset.to_be_bytes());
            }
            _ => {
                id_field(&mut h, b"peer");
                id_field(&mut h, self.node.as_str().as_bytes());
                id_field(
                    &mut h,
                    self.item_id.as_ref().map_or("", ItemId::as_str).as_bytes(),
                );
                id_field(&mut h, self.publisher.as_bytes());
                id_field(&mut h, &self.seq.unwrap_or(0).to_be_bytes());
            }
        }
        h.finalize().to_vec()
    }

    /// Ok when a peer publication's `publisher` is `source` (the signed gossipsub source);
    /// stored events (from gateways) are always Ok here — whether their sender may speak for
    /// the store is decided by who sent them, not by this check.
    pub fn check_source(&self, source: Option<&PeerId>) -> Result<(), EnvelopeError> {
        if self.is_stored() {
            return Ok(());
        }
        match (source, self.publisher.parse::<PeerId>()) {
            (Some(source), Ok(publisher)) if publisher == *source => Ok(()),
            _ => Err(EnvelopeError::ForgedPublisher),
        }
    }
}

/// What a batch adds to its envelopes' encoded sizes: `[2, [` and the array's head.
pub const BATCH_OVERHEAD: usize = 4;

/// One pipe message from encoded envelopes ([`Envelope::encode`]) of stored events of one node,
/// in offset order: the envelope itself when there is one, else a batch. The caller keeps the
/// total, with [`BATCH_OVERHEAD`], within [`MAX_ENVELOPE_BYTES`] and the count within
/// [`MAX_BATCH`].
pub fn encode_message(mut encoded: Vec<Vec<u8>>) -> Vec<u8> {
    if encoded.len() == 1 {
        return encoded.pop().unwrap_or_default();
    }
    let total: usize = encoded.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(total + BATCH_OVERHEAD);
    cbor::array(&mut out, 2);
    cbor::uint(&mut out, u64::from(BATCH_VERSION));
    cbor::array(&mut out, encoded.len() as u64);
    for e in &encoded {
        out.extend_from_slice(e);
    }
    out
}

/// Decodes a pipe message: one envelope ([`Envelope::decode`]) or a batch of stored events
/// (see the module docs), checked as a whole: two to [`MAX_BATCH`] valid stored events of one
/// node and epoch with increasing offsets, nothing after them.
pub fn decode_message(bytes: &[u8]) -> Result<Vec<Envelope>, EnvelopeError> {
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(EnvelopeError::TooLarge {
            size: bytes.len(),
            limit: MAX_ENVELOPE_BYTES,
        });
    }
    // `[2, [` in the shortest form: 0x82 0x02, then an array head.
    let Some(mut rest) = bytes.strip_prefix(&[0x82, BATCH_VERSION]) else {
        return Envelope::decode(bytes).map(|e| vec![e]);
    };
    let invalid = |why: &str| EnvelopeError::Invalid(format!("batch: {why}"));
    let count = match cbor::read_array_head(&mut rest) {
        Some(n) if (2..=MAX_BATCH as u64).contains(&n) => n as usize,
        Some(n) => return Err(invalid(&format!("{n} envelopes (2 to {MAX_BATCH})"))),
        None => {
            return Err(EnvelopeError::Undecodable(
                "batch: no array of envelopes".into(),
            ));
        }
    };
    let mut envelopes: Vec<Envelope> = Vec::with_capacity(count);
    for _ in 0..count {
        let decoded: Decoded = ciborium::de::from_reader(&mut rest)
            .map_err(|e| EnvelopeError::Undecodable(format!("batch: {e}")))?;
        let envelope = match decoded {
            Decoded::V1(raw) => raw.validate()?,
            Decoded::Unknown(v) => {
                return Err(EnvelopeError::UnknownVersion(
                    u8::try_from(v).unwrap_or(u8::MAX),
                ));
            }
        };
        if !envelope.is_stored() {
            return Err(invalid("only stored events travel in batches"));
        }
        if let Some(prev) = envelopes.last()
            && (prev.node != envelope.node
                || prev.epoch != envelope.epoch
                || prev.offset >= envelope.offset)
        {
            return Err(invalid("one node and epoch, offsets increasing"));
        }
        envelopes.push(envelope);
    }
    if !rest.is_empty() {
        return Err(EnvelopeError::Undecodable(format!(
            "{} bytes after the batch",
            rest.len()
        )));
    }
    Ok(envelopes)
}

/// The gossipsub message id of a pipe message holding `envelopes` ([`decode_message`]): the
/// envelope's own ([`Envelope::message_id`]) for one; for a batch, sha256 over ("batch", node,
/// epoch, first offset, last offset).
pub fn message_id(envelopes: &[Envelope]) -> Vec<u8> {
    match envelopes {
        [one] => one.message_id(),
        [first, .., last] => {
            let mut h = Sha256::new();
            id_field(&mut h, b"batch");
            id_field(&mut h, first.node.as_str().as_bytes());
            id_field(&mut h, &first.epoch.map_or(0, |e| e.0).to_be_bytes());
            id_field(&mut h, &first.offset.unwrap_or(0).to_be_bytes());
            id_field(&mut h, &last.offset.unwrap_or(0).to_be_bytes());
            h.finalize().to_vec()
        }
        [] => Sha256::digest(b"empty").to_vec(),
    }
}

/// Hashes one length-prefixed field.
fn id_field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

/// Why an envelope was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Larger than [`MAX_ENVELOPE_BYTES`]; refused before parsing.
    #[error("envelope of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The envelope's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A format version this code does not know (255 stands for anything above).
    #[error("unknown envelope version {0}")]
    UnknownVersion(u8),
    /// Not CBOR, or not shaped like an envelope.
    #[error("undecodable envelope: {0}")]
    Undecodable(String),
    /// Well-formed, but its fields break the rules.
    #[error("invalid envelope: {0}")]
    Invalid(String),
    /// A peer's publication whose publisher is not the peer that signed the message.
    #[error("the envelope's publisher is not the message's source")]
    ForgedPublisher,
}

impl EnvelopeError {
    /// A stable short code, for metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            EnvelopeError::TooLarge { .. } => "too_large",
            EnvelopeError::UnknownVersion(_) => "version",
            EnvelopeError::Undecodable(_) => "undecodable",
            EnvelopeError::Invalid(_) => "invalid",
            EnvelopeError::ForgedPublisher => "forged_publisher",
        }
    }
}

/// A decoded array: version 1's fields, or just the version of one we do not know.
enum Decoded {
    V1(Raw),
    Unknown(u64),
}

/// Version 1's fields as they came off the wire, before validation.
struct Raw {
    node: String,
    kind: u64,
    item_id: Option<String>,
    offset: Option<u64>,
    epoch: Option<u64>,
    content_type: Option<u64>,
    payload: Option<serde_bytes::ByteBuf>,
    publisher: String,
    time: u64,
    seq: Option<u64>,
}

impl<'de> Deserialize<'de> for Decoded {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(DecodedVisitor)
    }
}

struct DecodedVisitor;

impl<'de> Visitor<'de> for DecodedVisitor {
    type Value = Decoded;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an envelope: an array starting with its version")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Decoded, A::Error> {
        let version: u64 = next(&mut seq, "version")?;
        if version != u64::from(ENVELOPE_VERSION) {
            // Stop here: the rest may be laid out in a way we cannot read.
            return Ok(Decoded::Unknown(version));
        }
        let raw = Raw {
            node: next(&mut seq, "node")?,
            kind: next(&mut seq, "kind")?,
            item_id: next(&mut seq, "item id")?,
            offset: next(&mut seq, "offset")?,
            epoch: next(&mut seq, "epoch")?,
            content_type: next(&mut seq, "content type")?,
            payload: next(&mut seq, "payload")?,
            publisher: next(&mut seq, "publisher")?,
            time: next(&mut seq, "time")?,
            seq: next(&mut seq, "seq")?,
        };
        if seq.next_element::<IgnoredAny>()?.is_some() {
            return Err(de::Error::custom(format_args!(
                "more than the {FIELDS_V1} fields of version 1"
            )));
        }
        Ok(Decoded::V1(raw))
    }
}

/// The next array element, which must be there.
fn next<'de, T: Deserialize<'de>, A: SeqAccess<'de>>(
    seq: &mut A,
    what: &'static str,
) -> Result<T, A::Error> {
    seq.next_element()?
        .ok_or_else(|| de::Error::custom(format_args!("missing field: {what}")))
}

impl Raw {
    fn validate(self) -> Result<Envelope, EnvelopeError> {
        let invalid = EnvelopeError::Invalid;
        let node = NodeName::new(&self.node).map_err(|e| invalid(e.to_string()))?;
        let kind = Kind::from_code(self.kind)
            .ok_or_else(|| invalid(format!("unknown kind {}", self.kind)))?;
        let item_id = self
            .item_id
            .as_deref()
            .map(ItemId::new)
            .transpose()
            .map_err(|e| invalid(e.to_string()))?;
        let payload = match (self.content_type, self.payload) {
            (None, None) => None,
            (Some(code), Some(bytes)) => Some(Payload {
                content_type: content_type_from_code(code)
                    .ok_or_else(|| invalid(format!("unknown content type {code}")))?,
                bytes: Bytes::from(bytes.into_vec()),
            }),
            _ => {
                return Err(invalid(
                    "content type and payload must come together".into(),
                ));
            }
        };

        match kind {
            Kind::Published if item_id.is_none() || payload.is_none() => {
                return Err(invalid("published needs an item id and a payload".into()));
            }
            Kind::Retracted if item_id.is_none() => {
                return Err(invalid("retracted needs an item id".into()));
            }
            Kind::Retracted if payload.is_some() => {
                return Err(invalid("retracted carries no payload".into()));
            }
            Kind::Purged | Kind::Deleted if item_id.is_some() || payload.is_some() => {
                return Err(invalid("purged and deleted carry no item".into()));
            }
            _ => {}
        }

        match (self.offset, self.epoch, self.seq) {
            // A stored event.
            (Some(_), Some(_), None) => {}
            // A member peer's publication.
            (None, None, Some(_)) => {
                if kind != Kind::Published {
                    return Err(invalid("a peer may only publish items".into()));
                }
                if self.publisher.parse::<PeerId>().is_err() {
                    return Err(invalid(
                        "a peer's publication must name its peer id as publisher".into(),
                    ));
                }
            }
            _ => {
                return Err(invalid(
                    "needs either offset and epoch (stored event) or seq (publication)".into(),
                ));
            }
        }

        Ok(Envelope {
            node,
            kind,
            item_id,
            offset: self.offset,
            epoch: self.epoch.map(Epoch),
            payload,
            publisher: self.publisher,
            time: self.time,
            seq: self.seq,
        })
    }
}

/// The few CBOR (RFC 8949) items the wire forms need, written by hand: encoding into a
/// `Vec` cannot fail this way, and the output is the shortest form of each head.
pub(crate) mod cbor {
    const UINT: u8 = 0;
    const BYTES: u8 = 2;
    const TEXT: u8 = 3;
    const ARRAY: u8 = 4;
    /// Major type 7, simple value 22.
    const NULL: u8 = 0xf6;

    /// A head: major type and argument, in its shortest form (RFC 8949 §3, §4.2.1).
    fn head(out: &mut Vec<u8>, major: u8, n: u64) {
        let m = major << 5;
        if n < 24 {
            out.push(m | n as u8);
        } else if let Ok(n) = u8::try_from(n) {
            out.push(m | 24);
            out.push(n);
        } else if let Ok(n) = u16::try_from(n) {
            out.push(m | 25);
            out.extend_from_slice(&n.to_be_bytes());
        } else if let Ok(n) = u32::try_from(n) {
            out.push(m | 26);
            out.extend_from_slice(&n.to_be_bytes());
        } else {
            out.push(m | 27);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }

    pub(crate) fn uint(out: &mut Vec<u8>, n: u64) {
        head(out, UINT, n);
    }

    pub(crate) fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        head(out, BYTES, b.len() as u64);
        out.extend_from_slice(b);
    }

    pub(crate) fn text(out: &mut Vec<u8>, s: &str) {
        head(out, TEXT, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }

    pub(crate) fn array(out: &mut Vec<u8>, len: u64) {
        head(out, ARRAY, len);
    }

    pub(crate) fn null(out: &mut Vec<u8>) {
        out.push(NULL);
    }

    pub(crate) fn opt_uint(out: &mut Vec<u8>, n: Option<u64>) {
        match n {
            Some(n) => uint(out, n),
            None => null(out),
        }
    }

    /// Reads a definite-length array head off the front of `input`: its length.
    pub(crate) fn read_array_head(input: &mut &[u8]) -> Option<u64> {
        let (&first, rest) = input.split_first()?;
        if first >> 5 != ARRAY {
            return None;
        }
        let (n, used) = match first & 0x1f {
            n @ 0..24 => (u64::from(n), 0),
            24 => (u64::from(*rest.first()?), 1),
            25 => (
                u64::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
                2,
            ),
            26 => (
                u64::from(u32::from_be_bytes(rest.get(..4)?.try_into().ok()?)),
                4,
            ),
            27 => (u64::from_be_bytes(rest.get(..8)?.try_into().ok()?), 8),
            _ => return None,
        };
        *input = &rest[used..];
        Some(n)
    }

    pub(crate) fn opt_text(out: &mut Vec<u8>, s: Option<&str>) {
        match s {
            Some(s) => text(out, s),
            None => null(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use juxta_core::{Item, Origin, Record};
    use proptest::prelude::*;

    use super::*;

    fn node(s: &str) -> NodeName {
        NodeName::new(s).expect("valid node name")
    }

    fn item(s: &str) -> ItemId {
        ItemId::new(s).expect("valid item id")
    }

    fn event(offset: u64, change: Change) -> Event {
        Event::new(
            node("sensors/temp-7"),
            Epoch(0x0123_4567_89ab_cdef),
            Record {
                offset,
                change,
                at: 1_795_311_825_678,
            },
            Origin::Http,
        )
    }

    fn published(offset: u64, id: &str) -> Event {
        event(
            offset,
            Change::Published(Item {
                id: item(id),
                payload: Payload::json(&b"{\"t\":21.5}"[..]).expect("json"),
                publisher: Arc::from("alice@example.org"),
                published_at: 1_795_311_825_600,
            }),
        )
    }

    fn peer(seed: u8) -> PeerId {
        libp2p::identity::Keypair::ed25519_from_bytes([seed; 32])
            .expect("any 32 bytes are an ed25519 secret")
            .public()
            .to_peer_id()
    }

    fn round_trip(e: &Envelope) -> Envelope {
        Envelope::decode(&e.encode()).expect("decodes")
    }

    #[test]
    fn every_kind_of_stored_event_round_trips() {
        let events = [
            published(7, "a"),
            event(8, Change::Retracted(item("a"))),
            event(9, Change::Purged),
            event(10, Change::Deleted),
        ];
        let kinds = [
            Kind::Published,
            Kind::Retracted,
            Kind::Purged,
            Kind::Deleted,
        ];
        for (ev, kind) in events.iter().zip(kinds) {
            let env = Envelope::from_event(ev);
            assert_eq!(env.kind, kind);
            assert_eq!(env.offset, Some(ev.offset));
            assert_eq!(env.epoch, Some(ev.epoch));
            assert_eq!(env.seq, None);
            assert_eq!(round_trip(&env), env, "{kind:?}");
        }
    }

    #[test]
    fn a_stored_publication_carries_the_item() {
        let env = Envelope::from_event(&published(7, "a"));
        assert_eq!(env.item_id, Some(item("a")));
        assert_eq!(env.publisher, "alice@example.org");
        assert_eq!(env.time, 1_795_311_825_600);
        let payload = env.payload.expect("payload");
        assert_eq!(payload.content_type, ContentType::Json);
        assert_eq!(&payload.bytes[..], b"{\"t\":21.5}");
    }

    #[test]
    fn purged_and_deleted_carry_no_item() {
        for ev in [event(9, Change::Purged), event(10, Change::Deleted)] {
            let env = Envelope::from_event(&ev);
            assert_eq!(env.item_id, None);
            assert_eq!(env.payload, None);
        }
    }

    #[test]
    fn a_peer_publication_round_trips_with_every_content_type() {
        let payloads = [
            Payload::json(&b"[1,2]"[..]).expect("json"),
            Payload::xml(&b"<e xmlns='urn:x'/>"[..]).expect("xml"),
            Payload::binary(vec![0u8, 255, 7]),
        ];
        for (seq, payload) in payloads.into_iter().enumerate() {
            let env =
                Envelope::publication(node("alerts"), item("i"), payload, &peer(1), seq as u64);
            assert_eq!(env.offset, None);
            assert_eq!(env.epoch, None);
            assert_eq!(env.publisher, peer(1).to_string());
            assert!(env.time > 0);
            assert_eq!(round_trip(&env), env);
        }
    }

    #[test]
    fn the_encoding_starts_with_the_version() {
        let bytes = Envelope::from_event(&event(1, Change::Purged)).encode();
        assert_eq!(bytes[0], 0x80 | FIELDS_V1 as u8, "an array of 11");
        assert_eq!(bytes[1], ENVELOPE_VERSION);
    }

    #[test]
    fn given_an_unknown_version_then_decoding_says_so() {
        let mut bytes = Envelope::from_event(&event(1, Change::Purged)).encode();
        bytes[1] = 2;
        assert_eq!(
            Envelope::decode(&bytes),
            Err(EnvelopeError::UnknownVersion(2))
        );
        // A future layout that version 1 could not read is still reported by its version.
        let mut future = Vec::new();
        cbor::array(&mut future, 2);
        cbor::uint(&mut future, 9);
        cbor::text(&mut future, "whatever comes next");
        assert_eq!(
            Envelope::decode(&future),
            Err(EnvelopeError::UnknownVersion(9))
        );
        assert_eq!(
            Envelope::decode(&future).map_err(|e| e.code()),
            Err("version")
        );
    }

    #[test]
    fn given_an_oversize_envelope_then_it_is_rejected_before_parsing() {
        // Bytes that are not CBOR at all: parsing them would say Undecodable.
        let huge = vec![0xffu8; MAX_ENVELOPE_BYTES + 1];
        assert_eq!(
            Envelope::decode(&huge),
            Err(EnvelopeError::TooLarge {
                size: MAX_ENVELOPE_BYTES + 1,
                limit: MAX_ENVELOPE_BYTES
            })
        );
        assert_eq!(
            Envelope::decode(&huge[..10]).map_err(|e| e.code()),
            Err("undecodable")
        );
    }

    #[test]
    fn the_largest_accepted_payload_fits_in_an_envelope() {
        let max_payload = juxta_core::bus::DEFAULT_MAX_PAYLOAD_BYTES;
        let long_node = "n".repeat(255);
        let long_item = "i".repeat(255);
        let ev = Event::new(
            node(&long_node),
            Epoch(u64::MAX),
            Record {
                offset: u64::MAX,
                change: Change::Published(Item {
                    id: item(&long_item),
                    payload: Payload::binary(vec![7u8; max_payload]),
                    publisher: Arc::from("p".repeat(3071).as_str()),
                    published_at: u64::MAX,
                }),
                at: u64::MAX,
            },
            Origin::Xmpp,
        );
        let env = Envelope::from_event(&ev);
        let bytes = env.encode();
        assert!(bytes.len() <= MAX_ENVELOPE_BYTES, "{} bytes", bytes.len());
        assert_eq!(Envelope::decode(&bytes), Ok(env));
    }

    #[test]
    fn trailing_bytes_after_the_envelope_are_refused() {
        let mut bytes = Envelope::from_event(&event(1, Change::Deleted)).encode();
        bytes.push(0);
        assert!(matches!(
            Envelope::decode(&bytes),
            Err(EnvelopeError::Undecodable(_))
        ));
    }

    /// Encodes a version 1 array with the given fields, for hand-made bad envelopes.
    struct Fields<'a> {
        node: &'a str,
        kind: u64,
        item_id: Option<&'a str>,
        offset: Option<u64>,
        epoch: Option<u64>,
        content_type: Option<u64>,
        payload: Option<&'a [u8]>,
        publisher: &'a str,
        seq: Option<u64>,
    }

    impl Fields<'_> {
        fn stored_published() -> Self {
            Fields {
                node: "alerts",
                kind: 0,
                item_id: Some("a"),
                offset: Some(1),
                epoch: Some(2),
                content_type: Some(2),
                payload: Some(b"x"),
                publisher: "alice",
                seq: None,
            }
        }

        fn encode(&self) -> Vec<u8> {
            let mut out = Vec::new();
            cbor::array(&mut out, FIELDS_V1);
            cbor::uint(&mut out, 1);
            cbor::text(&mut out, self.node);
            cbor::uint(&mut out, self.kind);
            cbor::opt_text(&mut out, self.item_id);
            cbor::opt_uint(&mut out, self.offset);
            cbor::opt_uint(&mut out, self.epoch);
            cbor::opt_uint(&mut out, self.content_type);
            match self.payload {
                Some(p) => cbor::bytes(&mut out, p),
                None => cbor::null(&mut out),
            }
            cbor::text(&mut out, self.publisher);
            cbor::uint(&mut out, 5);
            cbor::opt_uint(&mut out, self.seq);
            out
        }
    }

    #[test]
    fn the_hand_made_baseline_envelope_is_valid() {
        let env = Envelope::decode(&Fields::stored_published().encode()).expect("valid");
        assert_eq!(env.kind, Kind::Published);
        assert_eq!(env.epoch, Some(Epoch(2)));
    }

    #[test]
    fn envelopes_whose_fields_break_the_rules_are_invalid() {
        let alice_peer = peer(3).to_string();
        let cases: Vec<(&str, Fields<'_>)> = vec![
            (
                "bad node name",
                Fields {
                    node: "a//b",
                    ..Fields::stored_published()
                },
            ),
            (
                "empty item id",
                Fields {
                    item_id: Some(""),
                    ..Fields::stored_published()
                },
            ),
            (
                "unknown kind",
                Fields {
                    kind: 4,
                    ..Fields::stored_published()
                },
            ),
            (
                "unknown content type",
                Fields {
                    content_type: Some(3),
                    ..Fields::stored_published()
                },
            ),
            (
                "published without item",
                Fields {
                    item_id: None,
                    ..Fields::stored_published()
                },
            ),
            (
                "published without payload",
                Fields {
                    content_type: None,
                    payload: None,
                    ..Fields::stored_published()
                },
            ),
            (
                "payload without content type",
                Fields {
                    content_type: None,
                    ..Fields::stored_published()
                },
            ),
            (
                "retracted without item",
                Fields {
                    kind: 1,
                    item_id: None,
                    content_type: None,
                    payload: None,
                    ..Fields::stored_published()
                },
            ),
            (
                "retracted with payload",
                Fields {
                    kind: 1,
                    ..Fields::stored_published()
                },
            ),
            (
                "purged with item",
                Fields {
                    kind: 2,
                    content_type: None,
                    payload: None,
                    ..Fields::stored_published()
                },
            ),
            (
                "stored without epoch",
                Fields {
                    epoch: None,
                    ..Fields::stored_published()
                },
            ),
            (
                "stored with seq too",
                Fields {
                    seq: Some(1),
                    ..Fields::stored_published()
                },
            ),
            (
                "neither stored nor publication",
                Fields {
                    offset: None,
                    epoch: None,
                    ..Fields::stored_published()
                },
            ),
            (
                "publication whose publisher is no peer id",
                Fields {
                    offset: None,
                    epoch: None,
                    seq: Some(1),
                    ..Fields::stored_published()
                },
            ),
            (
                "publication that retracts",
                Fields {
                    kind: 1,
                    content_type: None,
                    payload: None,
                    offset: None,
                    epoch: None,
                    seq: Some(1),
                    publisher: &alice_peer,
                    ..Fields::stored_published()
                },
            ),
        ];
        for (what, fields) in cases {
            let result = Envelope::decode(&fields.encode());
            assert!(
                matches!(result, Err(EnvelopeError::Invalid(_))),
                "{what}: {result:?}"
            );
        }
    }

    #[test]
    fn envelopes_of_the_wrong_shape_are_undecodable() {
        let mut missing_field = Fields::stored_published().encode();
        missing_field[0] = 0x80 | 10; // claims 10 fields: seq is missing
        let mut extra_field = Vec::new();
        cbor::array(&mut extra_field, FIELDS_V1 + 1);
        extra_field.extend_from_slice(&Fields::stored_published().encode()[1..]);
        cbor::uint(&mut extra_field, 0);
        let mut too_few = Vec::new();
        cbor::array(&mut too_few, 3);
        cbor::uint(&mut too_few, 1);
        cbor::text(&mut too_few, "alerts");
        cbor::uint(&mut too_few, 0);
        let mut negative_version = Vec::new();
        cbor::array(&mut negative_version, 1);
        negative_version.push(0x20); // -1
        for (what, bytes) in [
            ("empty", Vec::new()),
            ("a map", vec![0xa0]),
            ("text", b"\x63abc".to_vec()),
            ("missing field", missing_field),
            ("extra field", extra_field),
            ("too few fields", too_few),
            ("negative version", negative_version),
        ] {
            let result = Envelope::decode(&bytes);
            assert!(
                matches!(result, Err(EnvelopeError::Undecodable(_))),
                "{what}: {result:?}"
            );
        }
    }

    #[test]
    fn message_ids_are_equal_for_two_encodings_of_the_same_stored_event() {
        let a = Envelope::from_event(&published(7, "a"));
        let b = round_trip(&Envelope::from_event(&published(7, "a")));
        assert_eq!(a.message_id(), b.message_id());
        assert_eq!(a.message_id().len(), 32);
    }

    #[test]
    fn message_ids_differ_when_the_offset_differs() {
        let a = Envelope::from_event(&event(9, Change::Purged));
        let b = Envelope::from_event(&event(10, Change::Purged));
        assert_ne!(a.message_id(), b.message_id());
    }

    #[test]
    fn given_an_overwrite_of_the_same_item_id_then_the_message_id_is_new() {
        let first = Envelope::from_event(&published(7, "a"));
        let overwrite = Envelope::from_event(&published(8, "a"));
        assert_ne!(first.message_id(), overwrite.message_id());
    }

    #[test]
    fn message_ids_differ_between_epochs() {
        let a = Envelope::from_event(&event(9, Change::Purged));
        let mut b = a.clone();
        b.epoch = Some(Epoch(1));
        assert_ne!(a.message_id(), b.message_id());
    }

    #[test]
    fn peer_publication_ids_follow_the_peers_sequence_number() {
        let p = peer(1);
        let pay = || Payload::binary(vec![1u8]);
        let one = Envelope::publication(node("alerts"), item("a"), pay(), &p, 1);
        let mut copy = round_trip(&one);
        copy.time += 1000; // a later copy of the same publication
        let again = Envelope::publication(node("alerts"), item("a"), pay(), &p, 2);
        let other_peer = Envelope::publication(node("alerts"), item("a"), pay(), &peer(2), 1);
        assert_eq!(one.message_id(), copy.message_id());
        assert_ne!(one.message_id(), again.message_id(), "an overwrite is new");
        assert_ne!(one.message_id(), other_peer.message_id());
    }

    #[test]
    fn message_id_fields_are_length_prefixed_so_splits_do_not_collide() {
        let p = peer(1);
        let pay = || Payload::binary(vec![1u8]);
        let a = Envelope::publication(node("ab"), item("c"), pay(), &p, 1);
        let b = Envelope::publication(node("a"), item("bc"), pay(), &p, 1);
        assert_ne!(a.message_id(), b.message_id());
    }

    #[test]
    fn given_a_publication_whose_publisher_is_not_the_source_then_it_is_rejected() {
        let env = Envelope::publication(
            node("alerts"),
            item("a"),
            Payload::binary(vec![]),
            &peer(1),
            1,
        );
        assert_eq!(env.check_source(Some(&peer(1))), Ok(()));
        assert_eq!(
            env.check_source(Some(&peer(2))),
            Err(EnvelopeError::ForgedPublisher)
        );
        assert_eq!(env.check_source(None), Err(EnvelopeError::ForgedPublisher));
        assert_eq!(EnvelopeError::ForgedPublisher.code(), "forged_publisher");

        let mut forged = env.clone();
        forged.publisher = peer(2).to_string();
        let forged = round_trip(&forged);
        assert_eq!(
            forged.check_source(Some(&peer(1))),
            Err(EnvelopeError::ForgedPublisher)
        );
    }

    #[test]
    fn stored_events_pass_the_source_check_whoever_relays_them() {
        let env = Envelope::from_event(&published(7, "a"));
        assert_eq!(env.check_source(Some(&peer(9))), Ok(()));
        assert_eq!(env.check_source(None), Ok(()));
    }

    #[test]
    fn kinds_convert_to_and_from_core_event_kinds() {
        for k in [
            Kind::Published,
            Kind::Retracted,
            Kind::Purged,
            Kind::Deleted,
        ] {
            assert_eq!(Kind::from(EventKind::from(k)), k);
        }
    }

    fn stored(offset: u64) -> Envelope {
        Envelope::from_event(&published(offset, &format!("i{offset}")))
    }

    fn message_of(envelopes: &[Envelope]) -> Vec<u8> {
        encode_message(envelopes.iter().map(Envelope::encode).collect())
    }

    #[test]
    fn a_message_of_one_event_is_that_envelope_and_a_batch_round_trips() {
        let one = stored(7);
        assert_eq!(message_of(std::slice::from_ref(&one)), one.encode());
        assert_eq!(decode_message(&one.encode()), Ok(vec![one.clone()]));
        let many: Vec<Envelope> = (1..=MAX_BATCH as u64).map(stored).collect();
        let bytes = message_of(&many);
        assert_eq!(&bytes[..2], &[0x82, BATCH_VERSION], "[2, [...]]");
        assert!(
            bytes.len() <= many.iter().map(|e| e.encode().len()).sum::<usize>() + BATCH_OVERHEAD
        );
        assert_eq!(decode_message(&bytes), Ok(many));
        // A receiver that reads single envelopes only says which version it met.
        assert_eq!(
            Envelope::decode(&bytes),
            Err(EnvelopeError::UnknownVersion(BATCH_VERSION))
        );
    }

    #[test]
    fn batches_that_break_the_rules_are_refused() {
        let code =
            |envelopes: &[Envelope]| decode_message(&message_of(envelopes)).map_err(|e| e.code());
        let mut other_node = stored(2);
        other_node.node = node("other");
        let mut other_epoch = stored(2);
        other_epoch.epoch = Some(Epoch(99));
        let publication = Envelope::publication(
            node("sensors/temp-7"),
            item("p"),
            Payload::json(&b"{}"[..]).expect("json"),
            &peer(1),
            1,
        );
        for (what, envelopes) in [
            ("another node", vec![stored(1), other_node]),
            ("another epoch", vec![stored(1), other_epoch]),
            ("offsets going back", vec![stored(2), stored(1)]),
            ("an offset twice", vec![stored(2), stored(2)]),
            ("a peer's publication", vec![stored(1), publication]),
            (
                "too many",
                (1..=MAX_BATCH as u64 + 1).map(stored).collect::<Vec<_>>(),
            ),
        ] {
            assert_eq!(code(&envelopes), Err("invalid"), "{what}");
        }
        // One envelope in a batch, an empty batch, trailing bytes, a cut.
        let mut single = vec![0x82, BATCH_VERSION, 0x81];
        single.extend_from_slice(&stored(1).encode());
        assert_eq!(
            decode_message(&single).map_err(|e| e.code()),
            Err("invalid")
        );
        assert_eq!(
            decode_message(&[0x82, BATCH_VERSION, 0x80]).map_err(|e| e.code()),
            Err("invalid")
        );
        let mut trailing = message_of(&[stored(1), stored(2)]);
        trailing.push(0);
        assert_eq!(
            decode_message(&trailing).map_err(|e| e.code()),
            Err("undecodable")
        );
        let whole = message_of(&[stored(1), stored(2)]);
        for cut in 2..whole.len() {
            assert!(decode_message(&whole[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(
            decode_message(&[0x82, BATCH_VERSION, 0x01]).map_err(|e| e.code()),
            Err("undecodable"),
            "not an array of envelopes"
        );
    }

    #[test]
    fn a_batch_id_names_its_node_epoch_and_offsets() {
        let batch = [stored(1), stored(2), stored(3)];
        let id = message_id(&batch);
        assert_eq!(
            id,
            message_id(&decode_message(&message_of(&batch)).expect("decodes"))
        );
        assert_ne!(id, message_id(&batch[..2]), "another range");
        assert_ne!(id, stored(1).message_id(), "not its first event's");
        assert_eq!(message_id(&batch[..1]), stored(1).message_id());
    }

    fn arb_payload() -> impl Strategy<Value = Payload> {
        (0u64..3, proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(ct, bytes)| Payload {
            content_type: content_type_from_code(ct).unwrap_or(ContentType::Binary),
            bytes: Bytes::from(bytes),
        })
    }

    fn arb_node() -> impl Strategy<Value = NodeName> {
        "[a-zA-Z0-9_.~:@+=-]{1,40}(/[a-z0-9]{1,8}){0,3}"
            .prop_map(|s| NodeName::new(&s).expect("generated names are valid"))
    }

    fn arb_item() -> impl Strategy<Value = ItemId> {
        "\\PC{1,40}".prop_map(|s| ItemId::new(&s).expect("generated ids are valid"))
    }

    fn arb_envelope() -> impl Strategy<Value = Envelope> {
        let stored = (
            arb_node(),
            0u64..4,
            arb_item(),
            arb_payload(),
            any::<u64>(),
            any::<u64>(),
            "\\PC{0,60}",
            any::<u64>(),
        )
            .prop_map(
                |(node, kind, item, payload, offset, epoch, publisher, time)| {
                    let kind = Kind::from_code(kind).unwrap_or(Kind::Purged);
                    let (item_id, payload) = match kind {
                        Kind::Published => (Some(item), Some(payload)),
                        Kind::Retracted => (Some(item), None),
                        Kind::Purged | Kind::Deleted => (None, None),
                    };
                    Envelope {
                        node,
                        kind,
                        item_id,
                        offset: Some(offset),
                        epoch: Some(Epoch(epoch)),
                        payload,
                        publisher,
                        time,
                        seq: None,
                    }
                },
            );
        let publication = (
            arb_node(),
            arb_item(),
            arb_payload(),
            any::<u8>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(node, item, payload, seed, seq, time)| {
                let mut env = Envelope::publication(node, item, payload, &peer(seed), seq);
                env.time = time;
                env
            });
        prop_oneof![stored, publication]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_in_decode(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Envelope::decode(&bytes);
            let _ = decode_message(&bytes);
            let mut batch = vec![0x82, BATCH_VERSION];
            batch.extend_from_slice(&bytes);
            let _ = decode_message(&batch);
        }

        #[test]
        fn arbitrary_bytes_after_a_valid_prefix_never_panic_in_decode(
            env in arb_envelope(),
            cut in any::<prop::sample::Index>(),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut bytes = env.encode();
            bytes.truncate(cut.index(bytes.len() + 1));
            bytes.extend_from_slice(&tail);
            let _ = Envelope::decode(&bytes);
        }

        #[test]
        fn arbitrary_valid_envelopes_round_trip(env in arb_envelope()) {
            let bytes = env.encode();
            prop_assert!(bytes.len() <= MAX_ENVELOPE_BYTES);
            let back = Envelope::decode(&bytes);
            prop_assert_eq!(back.as_ref(), Ok(&env));
            prop_assert_eq!(back.map(|b| b.message_id()), Ok(env.message_id()));
        }
    }
}
