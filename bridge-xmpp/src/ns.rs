//! XML namespace names used on XMPP streams, one constant per namespace.

/// RFC 6120 §4.8.3: content namespace of client-to-server streams.
pub const JABBER_CLIENT: &str = "jabber:client";
/// XEP-0114: content namespace of an external component's stream.
pub const JABBER_COMPONENT_ACCEPT: &str = "jabber:component:accept";
/// RFC 6120 §4.8.1: namespace of `<stream:stream>`, `<stream:features>` and `<stream:error>`.
pub const STREAM: &str = "http://etherx.jabber.org/streams";
/// RFC 6120 §4.9.3: stream error conditions and the stream error `<text/>`.
pub const STREAMS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
/// RFC 6120 §5: STARTTLS negotiation.
pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
/// RFC 6120 §6: SASL negotiation.
pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
/// RFC 6120 §7: resource binding.
pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
/// RFC 3921 §3 (obsolete, still probed by some clients): session establishment.
pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
/// RFC 6120 §8.3: stanza error conditions.
pub const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
/// RFC 7395 §3.3: `<open/>` and `<close/>` framing of XMPP over WebSocket.
pub const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
/// XEP-0198: stream management.
pub const SM: &str = "urn:xmpp:sm:3";
/// XEP-0199: XMPP ping.
pub const PING: &str = "urn:xmpp:ping";
/// XEP-0030: service discovery, information about an entity.
pub const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
/// XEP-0030: service discovery, items of an entity.
pub const DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
/// RFC 6121 §2: roster management.
pub const ROSTER: &str = "jabber:iq:roster";
/// XEP-0060: publish-subscribe, publisher and subscriber use cases.
pub const PUBSUB: &str = "http://jabber.org/protocol/pubsub";
/// XEP-0060: publish-subscribe event notifications.
pub const PUBSUB_EVENT: &str = "http://jabber.org/protocol/pubsub#event";
/// XEP-0060: publish-subscribe owner use cases.
pub const PUBSUB_OWNER: &str = "http://jabber.org/protocol/pubsub#owner";
/// XEP-0060 §14.2: publish-subscribe application-specific error conditions.
pub const PUBSUB_ERRORS: &str = "http://jabber.org/protocol/pubsub#errors";
/// XEP-0004: data forms.
pub const DATA_FORMS: &str = "jabber:x:data";
/// XEP-0203: delayed delivery timestamps.
pub const DELAY: &str = "urn:xmpp:delay";
/// XEP-0335: JSON containers (`<json xmlns='urn:xmpp:json:0'>`).
pub const JSON: &str = "urn:xmpp:json:0";
/// juxta: an item payload of raw bytes, base64 in the element's text.
pub const JUXTA_BINARY: &str = "urn:xmpp:juxta:binary:0";
/// XEP-0059: result set management (a `<set/>` that may accompany items).
pub const RSM: &str = "http://jabber.org/protocol/rsm";
/// XML Namespaces §3: the namespace bound to the reserved `xml` prefix (`xml:lang`).
pub const XML: &str = "http://www.w3.org/XML/1998/namespace";
/// XML Namespaces §3: the namespace of `xmlns` declarations; never bound to another prefix.
pub const XMLNS: &str = "http://www.w3.org/2000/xmlns/";
