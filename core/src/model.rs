//! The model: nodes, items, payloads, offsets, epochs and the events the bus fans out.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::time;

/// Longest node name or item id, in bytes (DESIGN.md: XMPP-safe, max 255 bytes).
pub const MAX_NAME_BYTES: usize = 255;

/// A node's name: a named stream of items, the unit of subscription and access control.
///
/// Names are 1..=255 bytes of letters, digits and `-_.~:@+=/`, never starting or ending with
/// `/` and never containing `//`, so that they are safe as XMPP node names, gossipsub topic
/// segments and (percent-encoded) URL path segments alike.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct NodeName(Arc<str>);

impl NodeName {
    /// Checks `s` and wraps it.
    pub fn new(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| Err(Error::InvalidNodeName(format!("{s:?}: {why}")));
        if s.is_empty() {
            return bad("must not be empty");
        }
        if s.len() > MAX_NAME_BYTES {
            return bad("longer than 255 bytes");
        }
        if s.starts_with('/') || s.ends_with('/') || s.contains("//") {
            return bad("must not start or end with '/' or contain '//'");
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_alphanumeric() || "-_.~:@+=/".contains(*c)))
        {
            return bad(&format!("character {c:?} is not allowed"));
        }
        Ok(Self(Arc::from(s)))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl<'de> Deserialize<'de> for NodeName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        NodeName::new(&s).map_err(serde::de::Error::custom)
    }
}

/// An item's id, unique within its node. Publishing an existing id overwrites the item
/// (XEP-0060 §7.1.2): a new offset and a new notification.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ItemId(Arc<str>);

impl ItemId {
    /// Checks `s` (1..=255 bytes, no control characters) and wraps it.
    pub fn new(s: &str) -> Result<Self, Error> {
        if s.is_empty() || s.len() > MAX_NAME_BYTES {
            return Err(Error::InvalidItemId(format!(
                "{s:?}: must be 1 to 255 bytes"
            )));
        }
        if s.chars().any(char::is_control) {
            return Err(Error::InvalidItemId(format!(
                "{s:?}: must not contain control characters"
            )));
        }
        Ok(Self(Arc::from(s)))
    }

    /// A fresh id for an item published without one: 26 characters of Crockford base32
    /// (48 bits of milliseconds, 80 random bits), so service-assigned ids sort by time.
    pub fn generate() -> Self {
        const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        let ms = u128::from(time::now_ms()) & ((1 << 48) - 1);
        let value = (ms << 80) | (rand::random::<u128>() & ((1 << 80) - 1));
        let mut out = [0u8; 26];
        for (i, slot) in out.iter_mut().enumerate() {
            let shift = 125 - 5 * i as u32;
            *slot = ALPHABET[((value >> shift) & 31) as usize];
        }
        // ALPHABET is ASCII, so `out` is valid UTF-8.
        Self(Arc::from(std::str::from_utf8(&out).unwrap_or_default()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// A per-node sequence number, assigned at append and strictly increasing. The first event
/// of a node has offset 1; `0` means "before everything".
pub type Offset = u64;

/// The id of a node's history. It changes whenever the history is lost or reset (the node is
/// deleted and created again, or a non-durable store restarts), so an offset is only
/// meaningful together with its epoch.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch(pub u64);

impl Epoch {
    /// A new random epoch.
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Epoch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        if s.len() != 16 {
            return Err(Error::InvalidEpoch(s.to_owned()));
        }
        u64::from_str_radix(s, 16)
            .map(Epoch)
            .map_err(|_| Error::InvalidEpoch(s.to_owned()))
    }
}

impl Serialize for Epoch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Epoch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a payload is, which decides how each side represents it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentType {
    /// A JSON value; XMPP carries it as XEP-0335 `<json xmlns='urn:xmpp:json:0'>`.
    Json,
    /// One XML element; HTTP clients get it as a string in `xml`.
    Xml,
    /// Opaque bytes; base64 in JSON.
    Binary,
}

impl ContentType {
    /// The MIME type.
    pub fn mime(self) -> &'static str {
        match self {
            ContentType::Json => "application/json",
            ContentType::Xml => "application/xml",
            ContentType::Binary => "application/octet-stream",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            ContentType::Json => 0,
            ContentType::Xml => 1,
            ContentType::Binary => 2,
        }
    }

    pub(crate) fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => ContentType::Json,
            1 => ContentType::Xml,
            2 => ContentType::Binary,
            _ => return None,
        })
    }
}

/// An item's content: its type and its bytes (JSON text, XML text or raw bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload {
    /// How to read `bytes`.
    pub content_type: ContentType,
    /// The content; shared, never copied per subscriber.
    pub bytes: Bytes,
}

impl Payload {
    /// A JSON payload from JSON text, which is checked.
    pub fn json(text: impl Into<Bytes>) -> Result<Self, Error> {
        let bytes = text.into();
        std::str::from_utf8(&bytes)
            .map_err(|_| Error::InvalidPayload("JSON must be UTF-8".into()))?;
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
            .map_err(|e| Error::InvalidPayload(format!("not JSON: {e}")))?;
        Ok(Self {
            content_type: ContentType::Json,
            bytes,
        })
    }

    /// An XML payload: exactly one well-formed element, no DTD, no processing instructions.
    pub fn xml(text: impl Into<Bytes>) -> Result<Self, Error> {
        let bytes = text.into();
        crate::xml::check_single_element(&bytes)?;
        Ok(Self {
            content_type: ContentType::Xml,
            bytes,
        })
    }

    /// Opaque bytes.
    pub fn binary(bytes: impl Into<Bytes>) -> Self {
        Self {
            content_type: ContentType::Binary,
            bytes: bytes.into(),
        }
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// One published entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// Unique within the node.
    pub id: ItemId,
    /// The content.
    pub payload: Payload,
    /// Who published it (a principal's display name: token subject, JID or peer id).
    pub publisher: Arc<str>,
    /// Milliseconds since the Unix epoch, set when the item was appended.
    pub published_at: u64,
}

/// What happened at one offset of a node's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// An item was published (or overwritten).
    Published(Item),
    /// An item was retracted.
    Retracted(ItemId),
    /// All items were removed.
    Purged,
    /// The node was deleted; the last event a subscriber sees.
    Deleted,
}

impl Change {
    /// The event kind's name as the APIs spell it.
    pub fn kind(&self) -> EventKind {
        match self {
            Change::Published(_) => EventKind::Published,
            Change::Retracted(_) => EventKind::Retracted,
            Change::Purged => EventKind::Purged,
            Change::Deleted => EventKind::Deleted,
        }
    }
}

/// The kinds of event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// See [`Change::Published`].
    Published,
    /// See [`Change::Retracted`].
    Retracted,
    /// See [`Change::Purged`].
    Purged,
    /// See [`Change::Deleted`].
    Deleted,
}

impl EventKind {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Published => "published",
            EventKind::Retracted => "retracted",
            EventKind::Purged => "purged",
            EventKind::Deleted => "deleted",
        }
    }
}

/// One entry of a node's history, as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Its position.
    pub offset: Offset,
    /// What happened.
    pub change: Change,
    /// When, in milliseconds since the Unix epoch.
    pub at: u64,
}

/// Which adapter produced an event, so that an adapter never re-emits its own events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// The HTTP front (REST, WebSocket).
    Http,
    /// The XMPP bridge.
    Xmpp,
    /// The overlay bridge.
    Overlay,
    /// Read back from history (replay, catch-up): no adapter emitted it just now.
    History,
}

/// What the bus fans out: one change of one node at one offset.
#[derive(Debug)]
pub struct Event {
    /// The node.
    pub node: NodeName,
    /// The node's history id.
    pub epoch: Epoch,
    /// The position in the node's history.
    pub offset: Offset,
    /// When it happened (ms since the Unix epoch).
    pub at: u64,
    /// What happened.
    pub change: Change,
    /// Who produced it.
    pub origin: Origin,
    /// The JSON form, encoded once per event on first use and shared by every subscriber.
    json: OnceLock<Bytes>,
    /// The Server-Sent Events frame, likewise.
    sse: OnceLock<Bytes>,
    /// The WebSocket text frame, likewise.
    ws: OnceLock<Bytes>,
}

impl Event {
    /// A new event.
    pub fn new(node: NodeName, epoch: Epoch, record: Record, origin: Origin) -> Self {
        Self {
            node,
            epoch,
            offset: record.offset,
            at: record.at,
            change: record.change,
            origin,
            json: OnceLock::new(),
            sse: OnceLock::new(),
            ws: OnceLock::new(),
        }
    }

    /// The kind.
    pub fn kind(&self) -> EventKind {
        self.change.kind()
    }

    /// The event as the WebSocket, SSE and edge-peer APIs spell it:
    /// `{"type":"event","node","offset","epoch","kind","item"?}`. Encoded once, then shared.
    pub fn json(&self) -> &Bytes {
        self.json.get_or_init(|| crate::json::event(self))
    }

    /// The event as one Server-Sent Events frame: `id: <epoch>:<offset>`, `event: <kind>`,
    /// `data:` lines carrying [`Event::json`]. Encoded once, then shared.
    pub fn sse_frame(&self) -> &Bytes {
        self.sse.get_or_init(|| crate::json::sse_frame(self))
    }

    /// The event as one complete server-to-client WebSocket text frame (RFC 6455 §5.2: FIN,
    /// opcode 1, unmasked) carrying [`Event::json`]. Encoded once, then copied as-is into
    /// every subscriber's socket.
    pub fn ws_frame(&self) -> &Bytes {
        self.ws
            .get_or_init(|| crate::json::ws_text_frame(self.json()))
    }
}

/// Who may access a node through the XMPP side (XEP-0060 §4.5). HTTP and overlay access is
/// decided by token grants and group membership.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessModel {
    /// Anyone may subscribe and retrieve items.
    #[default]
    Open,
    /// Contacts with a presence subscription to the owner.
    Presence,
    /// Subscriptions must be approved by an owner.
    Authorize,
    /// Only entities on the node's whitelist.
    Whitelist,
}

/// Who may publish (XEP-0060 `pubsub#publish_model`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishModel {
    /// Owners and publishers only.
    #[default]
    Publishers,
    /// Subscribers too.
    Subscribers,
    /// Anyone.
    Open,
}

/// What happens to a subscriber that falls further behind than its queue holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Refill the subscriber from history, by offset, and go on; it is told about a gap only
    /// if history no longer holds the events it missed.
    #[default]
    CatchUp,
    /// Skip what was missed and tell the subscriber which offsets it lost.
    Drop,
    /// Close the subscription with `slow_consumer`; the client resubscribes with its offset.
    Disconnect,
}

/// When a new subscriber gets the node's newest item without asking (XEP-0060
/// `pubsub#send_last_published_item`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SendLastPublished {
    /// Never.
    Never,
    /// Right after it subscribes.
    OnSub,
    /// Right after it subscribes, and whenever it becomes available again.
    #[default]
    OnSubAndPresence,
}

impl SendLastPublished {
    /// The XEP-0060 form value.
    pub fn as_str(self) -> &'static str {
        match self {
            SendLastPublished::Never => "never",
            SendLastPublished::OnSub => "on_sub",
            SendLastPublished::OnSubAndPresence => "on_sub_and_presence",
        }
    }
}

/// Default history size of a node.
pub const DEFAULT_MAX_ITEMS: u64 = 1000;
/// Largest history a node may keep.
pub const MAX_MAX_ITEMS: u64 = 10_000_000;

/// A node's configuration. Unknown fields are refused so that a typo is an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// The peer group the node belongs to; its overlay pipe lives in that group.
    pub group: String,
    /// How many history entries the node keeps (XEP-0060 `pubsub#max_items`): the newest
    /// `max_items` events; items are those among them not retracted or overwritten since.
    pub max_items: u64,
    /// Whether items are stored. A node with `persist = false` only fans out: its offsets
    /// still count up, but a subscriber that reconnects learns it missed what it missed.
    pub persist: bool,
    /// XMPP access model.
    pub access_model: AccessModel,
    /// XMPP publish model.
    pub publish_model: PublishModel,
    /// What happens to subscribers that fall behind.
    pub overflow: OverflowPolicy,
    /// Whether notifications carry the payload (XEP-0060 `pubsub#deliver_payloads`).
    pub deliver_payloads: bool,
    /// Whether retractions are notified (XEP-0060 `pubsub#notify_retract`).
    pub notify_retract: bool,
    /// Whether deletion is notified (XEP-0060 `pubsub#notify_delete`).
    pub notify_delete: bool,
    /// Whether XMPP notifications go only to available resources of a subscriber (XEP-0060
    /// `pubsub#presence_based_delivery`); otherwise a subscribed bare JID with no available
    /// resource still gets them at every connected resource.
    pub presence_based_delivery: bool,
    /// When an XMPP subscriber gets the newest item without asking.
    pub send_last_published_item: SendLastPublished,
    /// A human-readable title.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            group: "public".to_owned(),
            max_items: DEFAULT_MAX_ITEMS,
            persist: true,
            access_model: AccessModel::default(),
            publish_model: PublishModel::default(),
            overflow: OverflowPolicy::default(),
            deliver_payloads: true,
            notify_retract: true,
            notify_delete: true,
            presence_based_delivery: false,
            send_last_published_item: SendLastPublished::default(),
            title: None,
        }
    }
}

impl NodeConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), Error> {
        if self.max_items == 0 || self.max_items > MAX_MAX_ITEMS {
            return Err(Error::InvalidConfig(format!(
                "max_items must be between 1 and {MAX_MAX_ITEMS}"
            )));
        }
        let g = &self.group;
        if g.is_empty()
            || g.len() > 64
            || !g
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(Error::InvalidConfig(
                "group must be 1 to 64 characters of letters, digits, '-', '_' and '.'".into(),
            ));
        }
        if self.title.as_ref().is_some_and(|t| t.len() > 1024) {
            return Err(Error::InvalidConfig(
                "title is longer than 1024 bytes".into(),
            ));
        }
        Ok(())
    }
}

/// A node as the store knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeMeta {
    /// The name.
    pub name: NodeName,
    /// The configuration.
    pub config: NodeConfig,
    /// The history id.
    pub epoch: Epoch,
    /// The offset of the newest event, 0 before the first.
    pub last_offset: Offset,
    /// The oldest offset still in history; `last_offset + 1` when history is empty.
    pub first_offset: Offset,
    /// How many items the node holds now.
    pub item_count: u64,
    /// When it was created (ms since the Unix epoch).
    pub created_at: u64,
}

impl NodeMeta {
    /// A fresh node.
    pub fn new(name: NodeName, config: NodeConfig) -> Self {
        Self {
            name,
            config,
            epoch: Epoch::random(),
            last_offset: 0,
            first_offset: 1,
            item_count: 0,
            created_at: time::now_ms(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_accept_xmpp_style_paths_and_refuse_the_rest() {
        for ok in ["alerts", "sensors/temp-7", "a.b_c~d:e@f+g=h", "ünïcode"] {
            assert!(NodeName::new(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(256);
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "a b",
            "a\nb",
            "<x>",
            "a?b",
            long.as_str(),
        ] {
            assert!(NodeName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn generated_item_ids_are_unique_and_sort_by_time() {
        let a = ItemId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = ItemId::generate();
        assert_eq!(a.as_str().len(), 26);
        assert!(a < b, "{a} < {b}");
    }

    #[test]
    fn epochs_round_trip_through_their_text_form() {
        let e = Epoch::random();
        assert_eq!(e.to_string().parse::<Epoch>().ok(), Some(e));
        assert!("xyz".parse::<Epoch>().is_err());
        assert!("00000000000000zz".parse::<Epoch>().is_err());
    }

    #[test]
    fn node_config_refuses_unknown_fields_and_bad_values() {
        assert!(serde_json::from_str::<NodeConfig>(r#"{"max_itmes":3}"#).is_err());
        let c: NodeConfig = serde_json::from_str(r#"{"max_items":3}"#).expect("valid");
        assert_eq!(c.max_items, 3);
        assert!(c.validate().is_ok());
        let c: NodeConfig = serde_json::from_str(r#"{"max_items":0}"#).expect("parses");
        assert!(c.validate().is_err());
        let c: NodeConfig = serde_json::from_str(r#"{"group":"a b"}"#).expect("parses");
        assert!(c.validate().is_err());
    }

    #[test]
    fn payloads_are_checked() {
        assert!(Payload::json(&b"{\"a\":1}"[..]).is_ok());
        assert!(Payload::json(&b"{\"a\":"[..]).is_err());
        assert!(Payload::xml(&b"<entry xmlns='urn:x'>hi</entry>"[..]).is_ok());
        assert!(Payload::xml(&b"<a></b>"[..]).is_err());
        assert!(Payload::xml(&b"<a/><b/>"[..]).is_err());
    }
}
