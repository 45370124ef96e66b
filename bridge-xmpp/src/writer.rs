//! Serialization: elements, the stream header, stream errors and per-recipient copies of
//! one serialized stanza.
//!
//! Elements are written unprefixed with `xmlns='…'` only where their namespace differs from
//! the default namespace in scope ([`WriteContext`]), except elements of [`ns::STREAM`]
//! (`<stream:features>`, `<stream:error>`), which use the `stream` prefix that the stream
//! header declares. Attribute values and text are escaped so that the decoder reads back
//! exactly the same strings.

use bytes::{Buf, Bytes};

use crate::codec::StreamHeader;
use crate::element::{Element, Node};
use crate::error::Condition;
use crate::ns;

/// The closing tag of a stream opened with [`stream_header`] (RFC 6120 §4.4).
pub const STREAM_END: &[u8] = b"</stream:stream>";

/// What the receiving parser already has in scope where an element is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteContext<'a> {
    default_ns: &'a str,
    stream_prefix: bool,
}

impl<'a> WriteContext<'a> {
    /// Inside a stream opened with `xmlns=default_ns` and `xmlns:stream` (what
    /// [`stream_header`] writes): top-level stanzas in `default_ns` carry no `xmlns`.
    pub const fn stream(default_ns: &'a str) -> Self {
        Self {
            default_ns,
            stream_prefix: true,
        }
    }

    /// A standalone document with nothing in scope (e.g. one RFC 7395 WebSocket message):
    /// the element declares its own namespace.
    pub const fn standalone() -> Self {
        Self {
            default_ns: "",
            stream_prefix: false,
        }
    }
}

impl Element {
    /// Appends this element, serialized, to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>, context: WriteContext<'_>) {
        write_element(self, out, context, None);
    }

    /// This element, serialized.
    pub fn to_bytes(&self, context: WriteContext<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out, context);
        out
    }
}

/// Writes `element`; with `to` set, its `to` attribute is written first with that value
/// and any `to` of the element itself is skipped.
fn write_element(
    element: &Element,
    out: &mut Vec<u8>,
    context: WriteContext<'_>,
    to: Option<&str>,
) {
    let prefixed = element.ns() == ns::STREAM && context.default_ns != ns::STREAM;
    let mut inner = context;
    out.push(b'<');
    if prefixed {
        out.extend_from_slice(b"stream:");
    }
    out.extend_from_slice(element.name().as_bytes());
    if let Some(to) = to {
        write_attr(out, "to", to);
    }
    if prefixed {
        if !context.stream_prefix {
            write_attr(out, "xmlns:stream", ns::STREAM);
            inner.stream_prefix = true;
        }
    } else if element.ns() != context.default_ns {
        write_attr(out, "xmlns", element.ns());
        inner.default_ns = element.ns();
    }
    write_attributes(element, out, to.is_some());
    if element.nodes().is_empty() {
        out.extend_from_slice(b"/>");
        return;
    }
    out.push(b'>');
    for node in element.nodes() {
        match node {
            Node::Element(child) => write_element(child, out, inner, None),
            Node::Text(text) => escape_text(out, text),
        }
    }
    out.extend_from_slice(b"</");
    if prefixed {
        out.extend_from_slice(b"stream:");
    }
    out.extend_from_slice(element.name().as_bytes());
    out.push(b'>');
}

fn write_attributes(element: &Element, out: &mut Vec<u8>, skip_to: bool) {
    // Prefixes for attribute namespaces other than `xml`, declared on this element.
    let mut declared: Vec<&str> = Vec::new();
    for attr in element.attrs() {
        match attr.ns() {
            None if skip_to && attr.name() == "to" => {}
            None => write_attr(out, attr.name(), attr.value()),
            Some(ns::XML) => {
                out.extend_from_slice(b" xml:");
                write_attr_tail(out, attr.name(), attr.value());
            }
            Some(uri) => {
                let index = match declared.iter().position(|d| *d == uri) {
                    Some(index) => index,
                    None => {
                        declared.push(uri);
                        let index = declared.len() - 1;
                        out.extend_from_slice(format!(" xmlns:a{index}").as_bytes());
                        write_attr_tail(out, "", uri);
                        index
                    }
                };
                out.extend_from_slice(format!(" a{index}:").as_bytes());
                write_attr_tail(out, attr.name(), attr.value());
            }
        }
    }
}

fn write_attr(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(b' ');
    write_attr_tail(out, name, value);
}

fn write_attr_tail(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"='");
    escape_attr(out, value);
    out.push(b'\'');
}

/// Whether `c` may appear in an XML 1.0 document (XML §2.2 `Char`).
pub(crate) fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Escapes character data. `&`, `<` and `>` (the latter so `]]>` cannot appear) become
/// references; quotes are left alone because JSON payloads are full of them. `\r` becomes
/// `&#xD;` so end-of-line normalization (XML §2.11) does not turn it into `\n`.
/// Characters XML 1.0 cannot carry at all (most C0 controls, U+FFFE, U+FFFF) are written
/// as U+FFFD: there is no way to send them, and writing them raw would break the stream.
pub(crate) fn escape_text(out: &mut Vec<u8>, text: &str) {
    escape(out, text, false);
}

/// Escapes an attribute value for single or double quotes: the five predefined entities,
/// and tab, line feed and carriage return as character references so attribute-value
/// normalization (XML §3.3.3) gives them back unchanged.
pub(crate) fn escape_attr(out: &mut Vec<u8>, value: &str) {
    escape(out, value, true);
}

fn escape(out: &mut Vec<u8>, input: &str, attribute: bool) {
    let mut start = 0;
    for (index, c) in input.char_indices() {
        let replacement: &[u8] = match c {
            '&' => b"&amp;",
            '<' => b"&lt;",
            '>' => b"&gt;",
            '\r' => b"&#xD;",
            '"' if attribute => b"&quot;",
            '\'' if attribute => b"&apos;",
            '\t' if attribute => b"&#x9;",
            '\n' if attribute => b"&#xA;",
            c if !is_xml_char(c) => "\u{FFFD}".as_bytes(),
            _ => continue,
        };
        out.extend_from_slice(&input.as_bytes()[start..index]);
        out.extend_from_slice(replacement);
        start = index + c.len_utf8();
    }
    out.extend_from_slice(&input.as_bytes()[start..]);
}

/// The opening of a stream we initiate or answer (RFC 6120 §4.7): the XML declaration and
/// `<stream:stream xmlns=… xmlns:stream=… id=… from=… to=… version=… xml:lang=…>` with the
/// attributes that are set in `header`.
pub fn stream_header(header: &StreamHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"<?xml version='1.0'?><stream:stream");
    write_attr(&mut out, "xmlns", &header.default_ns);
    write_attr(&mut out, "xmlns:stream", ns::STREAM);
    let attrs = [
        ("id", &header.id),
        ("from", &header.from),
        ("to", &header.to),
        ("version", &header.version),
        ("xml:lang", &header.lang),
    ];
    for (name, value) in attrs {
        if let Some(value) = value {
            write_attr(&mut out, name, value);
        }
    }
    out.push(b'>');
    out
}

/// A stream error (RFC 6120 §4.9.2) for a stream opened with [`stream_header`]:
/// `<stream:error><condition xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>` and, if given, a
/// `<text/>`. Send [`STREAM_END`] after it and close the connection.
pub fn stream_error(condition: Condition, text: Option<&str>) -> Vec<u8> {
    let mut error =
        Element::builder("error", ns::STREAM).append(Element::new(condition.as_str(), ns::STREAMS));
    if let Some(text) = text {
        error = error.append(Element::builder("text", ns::STREAMS).append(text));
    }
    error.build().to_bytes(WriteContext::stream(""))
}

/// A stanza serialized once and addressed to many recipients (pubsub fan-out): only the
/// `to` attribute differs per recipient, the rest of the bytes are shared.
///
/// ```
/// use juxta_bridge_xmpp::{Element, SharedStanza, WriteContext, ns};
///
/// let message = Element::builder("message", ns::JABBER_CLIENT)
///     .attr("from", "pubsub.example.org")
///     .append(Element::new("event", ns::PUBSUB_EVENT))
///     .build();
/// let shared = SharedStanza::new(&message, WriteContext::stream(ns::JABBER_CLIENT));
/// let copy = shared.addressed_to("juliet@example.com/balcony");
/// assert_eq!(
///     copy.to_vec(),
///     b"<message to='juliet@example.com/balcony' from='pubsub.example.org'>\
///       <event xmlns='http://jabber.org/protocol/pubsub#event'/></message>"
/// );
/// ```
#[derive(Debug, Clone)]
pub struct SharedStanza {
    /// `<message to='`: everything before the recipient.
    head: Bytes,
    /// `'` and everything after the recipient, shared by every copy.
    tail: Bytes,
}

impl SharedStanza {
    /// Serializes `stanza` once; its own `to` attribute, if any, is ignored.
    pub fn new(stanza: &Element, context: WriteContext<'_>) -> Self {
        // The marker is a value that cannot occur in the output: after escaping no value
        // contains a raw `'`, so the first `'` after the name is the one opening `to`.
        let mut out = Vec::new();
        write_element(stanza, &mut out, context, Some(""));
        let split = out
            .iter()
            .position(|b| *b == b'\'')
            .map_or(out.len(), |quote| quote + 1);
        let mut bytes = Bytes::from(out);
        let head = bytes.split_to(split);
        Self { head, tail: bytes }
    }

    /// The bytes for one recipient; cheap (reference counts, and the escaped `to`).
    pub fn addressed_to(&self, to: &str) -> AddressedStanza {
        let mut escaped = Vec::with_capacity(to.len());
        escape_attr(&mut escaped, to);
        AddressedStanza {
            parts: [self.head.clone(), Bytes::from(escaped), self.tail.clone()],
            index: 0,
        }
    }

    /// The length of the shared bytes (without any recipient).
    pub fn shared_len(&self) -> usize {
        self.head.len() + self.tail.len()
    }
}

/// One recipient's copy of a [`SharedStanza`]: three chunks, written with vectored I/O or
/// through its [`Buf`] implementation.
#[derive(Debug, Clone)]
pub struct AddressedStanza {
    parts: [Bytes; 3],
    /// The first part not yet fully consumed through [`Buf::advance`].
    index: usize,
}

impl AddressedStanza {
    /// The chunks still to be written, in order.
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> {
        self.parts[self.index.min(3)..]
            .iter()
            .map(|part| part.as_ref())
    }

    /// The remaining bytes, copied into one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.remaining());
        for chunk in self.chunks() {
            out.extend_from_slice(chunk);
        }
        out
    }
}

impl Buf for AddressedStanza {
    fn remaining(&self) -> usize {
        self.chunks().map(<[u8]>::len).sum()
    }

    fn chunk(&self) -> &[u8] {
        self.chunks().find(|c| !c.is_empty()).unwrap_or(&[])
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 {
            let Some(part) = self.parts.get_mut(self.index) else {
                panic!("advance past the end of an AddressedStanza");
            };
            let step = cnt.min(part.len());
            part.advance(step);
            cnt -= step;
            if part.is_empty() {
                self.index += 1;
            }
        }
        while self.parts.get(self.index).is_some_and(Bytes::is_empty) {
            self.index += 1;
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        let mut filled = 0;
        for (slot, chunk) in dst.iter_mut().zip(self.chunks().filter(|c| !c.is_empty())) {
            *slot = std::io::IoSlice::new(chunk);
            filled += 1;
        }
        filled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Decoder, Frame, Limits};

    fn write(element: &Element) -> String {
        String::from_utf8_lossy(&element.to_bytes(WriteContext::stream(ns::JABBER_CLIENT)))
            .into_owned()
    }

    /// Decodes `stanza` as the only stanza of a `jabber:client` stream.
    fn decode_one(stanza: &[u8]) -> Element {
        let mut decoder = Decoder::new(Limits::default());
        decoder.feed(&stream_header(&StreamHeader::new(ns::JABBER_CLIENT)));
        decoder.feed(stanza);
        assert!(matches!(decoder.next(), Ok(Some(Frame::StreamHeader(_)))));
        match decoder.next() {
            Ok(Some(Frame::Stanza(element))) => element,
            other => panic!("expected a stanza, got {other:?}"),
        }
    }

    #[test]
    fn top_level_stanzas_in_the_stream_namespace_omit_xmlns_and_children_declare_theirs() {
        let iq = Element::builder("iq", ns::JABBER_CLIENT)
            .attr("type", "get")
            .attr("id", "p1")
            .append(Element::new("ping", ns::PING))
            .build();
        assert_eq!(
            write(&iq),
            "<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>"
        );
    }

    #[test]
    fn a_child_in_the_parents_namespace_does_not_repeat_it() {
        let pubsub = Element::builder("pubsub", ns::PUBSUB)
            .append(Element::builder("publish", ns::PUBSUB).attr("node", "n"))
            .build();
        assert_eq!(
            write(&pubsub),
            "<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='n'/></pubsub>"
        );
    }

    #[test]
    fn a_standalone_element_declares_its_namespace() {
        let message = Element::new("message", ns::JABBER_CLIENT);
        assert_eq!(
            message.to_bytes(WriteContext::standalone()),
            b"<message xmlns='jabber:client'/>"
        );
    }

    #[test]
    fn an_element_in_no_namespace_under_a_default_namespace_undeclares_it() {
        let outer = Element::builder("x", "urn:example")
            .append(Element::new("y", ""))
            .build();
        assert_eq!(write(&outer), "<x xmlns='urn:example'><y xmlns=''/></x>");
        assert_eq!(decode_one(write(&outer).as_bytes()), outer);
    }

    #[test]
    fn stream_namespace_elements_use_the_stream_prefix() {
        let features = Element::builder("features", ns::STREAM)
            .append(Element::builder("starttls", ns::TLS).append(Element::new("required", ns::TLS)))
            .build();
        assert_eq!(
            write(&features),
            "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>\
             </starttls></stream:features>"
        );
        assert_eq!(
            features.to_bytes(WriteContext::standalone()),
            b"<stream:features xmlns:stream='http://etherx.jabber.org/streams'>\
              <starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>\
              </stream:features>"
        );
        assert_eq!(decode_one(write(&features).as_bytes()), features);
    }

    #[test]
    fn text_escapes_ampersand_and_angle_brackets_but_not_quotes() {
        let body = Element::builder("body", ns::JABBER_CLIENT)
            .append(r#"a < b && c > d ]]> "q" 'a'"#)
            .build();
        assert_eq!(
            write(&body),
            r#"<body>a &lt; b &amp;&amp; c &gt; d ]]&gt; "q" 'a'</body>"#
        );
    }

    #[test]
    fn attribute_values_escape_all_five_specials_and_whitespace_controls() {
        let x = Element::builder("x", ns::JABBER_CLIENT)
            .attr("v", "<&>\"'\t\n\r end")
            .build();
        assert_eq!(
            write(&x),
            "<x v='&lt;&amp;&gt;&quot;&apos;&#x9;&#xA;&#xD; end'/>"
        );
    }

    #[test]
    fn tricky_text_and_attribute_values_survive_a_round_trip_through_the_decoder() {
        let tricky = [
            "plain",
            "<tag attr=\"v\">&amp;</tag>",
            "line\r\nbreaks\rand\nmore\n",
            "tabs\tand  spaces ",
            "]]> and <![CDATA[x]]>",
            "&lt; already escaped &#x41;",
            "emoji 😀 and ünïcödé",
            "'single' \"double\"",
        ];
        for value in tricky {
            let element = Element::builder("x", ns::JABBER_CLIENT)
                .attr("v", value)
                .attr_ns("lang", ns::XML, value)
                .append(value)
                .build();
            let decoded = decode_one(write(&element).as_bytes());
            assert_eq!(decoded, element, "value {value:?}");
            assert_eq!(decoded.attr("v"), Some(value));
            assert_eq!(decoded.text(), value);
        }
    }

    #[test]
    fn characters_xml_cannot_carry_are_replaced() {
        let body = Element::builder("body", ns::JABBER_CLIENT)
            .attr("v", "a\u{1}b")
            .append("x\u{0}y\u{FFFF}z")
            .build();
        assert_eq!(
            write(&body),
            "<body v='a\u{FFFD}b'>x\u{FFFD}y\u{FFFD}z</body>"
        );
    }

    #[test]
    fn attributes_in_other_namespaces_get_a_declared_prefix() {
        let x = Element::builder("x", ns::JABBER_CLIENT)
            .attr_ns("a", "urn:one", "1")
            .attr_ns("b", "urn:two", "2")
            .attr_ns("c", "urn:one", "3")
            .build();
        let written = write(&x);
        assert_eq!(
            written,
            "<x xmlns:a0='urn:one' a0:a='1' xmlns:a1='urn:two' a1:b='2' a0:c='3'/>"
        );
        assert_eq!(decode_one(written.as_bytes()), x);
    }

    #[test]
    fn parse_then_serialize_then_parse_gives_the_same_tree() {
        let source = "<iq type='result' id='d1' from='pubsub.example.org'>\
            <query xmlns='http://jabber.org/protocol/disco#info' node='n'>\
            <identity category='pubsub' type='service'/>\
            <feature var='http://jabber.org/protocol/pubsub'/>\
            <x xmlns='jabber:x:data' type='result'><field var='FORM_TYPE' type='hidden'>\
            <value>http://jabber.org/protocol/pubsub#meta-data</value></field></x>\
            </query></iq>";
        let first = decode_one(source.as_bytes());
        let written = write(&first);
        assert_eq!(written, source);
        assert_eq!(decode_one(written.as_bytes()), first);
    }

    #[test]
    fn the_stream_header_has_the_rfc_6120_shape_and_decodes_back() {
        let header = StreamHeader {
            id: Some("c2s-1".to_owned()),
            from: Some("example.org".to_owned()),
            version: Some("1.0".to_owned()),
            lang: Some("en".to_owned()),
            ..StreamHeader::new(ns::JABBER_CLIENT)
        };
        let bytes = stream_header(&header);
        assert_eq!(
            bytes,
            b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
              xmlns:stream='http://etherx.jabber.org/streams' id='c2s-1' from='example.org' \
              version='1.0' xml:lang='en'>"
        );
        let mut decoder = Decoder::new(Limits::default());
        decoder.feed(&bytes);
        assert_eq!(decoder.next(), Ok(Some(Frame::StreamHeader(header))));
    }

    #[test]
    fn a_stream_error_names_its_condition_in_the_streams_namespace() {
        assert_eq!(
            stream_error(Condition::NotWellFormed, None),
            b"<stream:error><not-well-formed xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
              </stream:error>"
        );
        assert_eq!(
            stream_error(Condition::PolicyViolation, Some("stanza > 256 KiB")),
            b"<stream:error><policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
              <text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>stanza &gt; 256 KiB</text>\
              </stream:error>"
        );
        let decoded = decode_one(&stream_error(Condition::HostUnknown, Some("who?")));
        assert!(decoded.is("error", ns::STREAM));
        assert!(decoded.has_child("host-unknown", ns::STREAMS));
        assert_eq!(
            decoded.get_child("text", ns::STREAMS).map(Element::text),
            Some("who?".to_owned())
        );
    }

    fn event_message() -> Element {
        Element::builder("message", ns::JABBER_CLIENT)
            .attr("from", "pubsub.example.org")
            .attr("to", "ignored@example.org")
            .attr("id", "n1")
            .append(
                Element::builder("event", ns::PUBSUB_EVENT).append(
                    Element::builder("items", ns::PUBSUB_EVENT)
                        .attr("node", "news")
                        .append(
                            Element::builder("item", ns::PUBSUB_EVENT)
                                .attr("id", "i1")
                                .append(
                                    Element::builder("json", ns::JSON).append(r#"{"a":"<b>"}"#),
                                ),
                        ),
                ),
            )
            .build()
    }

    #[test]
    fn a_shared_stanza_gives_each_recipient_the_stanza_with_its_own_to() {
        let message = event_message();
        let shared = SharedStanza::new(&message, WriteContext::stream(ns::JABBER_CLIENT));
        for to in [
            "juliet@example.com",
            "romeo@example.net/orchard",
            "o'hara&co@x",
        ] {
            let bytes = shared.addressed_to(to).to_vec();
            let decoded = decode_one(&bytes);
            let mut expected = message.clone();
            expected.set_attr("to", to);
            assert_eq!(decoded.attr("to"), Some(to));
            // The decoded stanza has `to` first; compare attribute sets and children.
            for attr in expected.attrs() {
                assert_eq!(decoded.attr(attr.name()), Some(attr.value()));
            }
            assert_eq!(decoded.attrs().len(), expected.attrs().len());
            assert_eq!(decoded.nodes(), expected.nodes());
        }
    }

    #[test]
    fn recipients_of_a_shared_stanza_share_the_payload_bytes() {
        let shared = SharedStanza::new(&event_message(), WriteContext::stream(ns::JABBER_CLIENT));
        let a = shared.addressed_to("a@example.org");
        let b = shared.addressed_to("b@example.org");
        let tails: Vec<*const u8> = [&a, &b]
            .iter()
            .filter_map(|copy| copy.chunks().last().map(<[u8]>::as_ptr))
            .collect();
        assert_eq!(tails.len(), 2);
        assert_eq!(tails[0], tails[1]);
        assert_eq!(a.remaining(), shared.shared_len() + "a@example.org".len());
    }

    #[test]
    fn an_addressed_stanza_reads_as_a_buf_across_its_chunks() {
        let shared = SharedStanza::new(&event_message(), WriteContext::stream(ns::JABBER_CLIENT));
        let copy = shared.addressed_to("juliet@example.com");
        let expected = copy.to_vec();
        for step in [1, 3, 7, 64, expected.len()] {
            let mut buf = copy.clone();
            let mut read = Vec::new();
            while buf.has_remaining() {
                let chunk = buf.chunk();
                let n = step.min(chunk.len());
                read.extend_from_slice(&chunk[..n]);
                buf.advance(n);
            }
            assert_eq!(read, expected, "step {step}");
        }
        let mut slices = [std::io::IoSlice::new(&[]); 4];
        assert_eq!(copy.chunks_vectored(&mut slices), 3);
        let total: usize = slices.iter().map(|s| s.len()).sum();
        assert_eq!(total, expected.len());
    }
}
