//! The sans-IO stream decoder: bytes in, [`Frame`]s out.
//!
//! A stream (RFC 6120 §4) is one XML document that stays open: an optional XML declaration,
//! the `<stream:stream>` start tag, any number of top-level elements ("stanzas" here,
//! including `<auth/>`, `<starttls/>`, `<handshake/>` and `<stream:features/>`), whitespace
//! keep-alives between them and finally `</stream:stream>`. The decoder hands out each of
//! these as soon as it is complete.
//!
//! How: whitespace between stanzas is skipped; the prolog and the closing tag are small and
//! matched directly; a stanza's end is found by the resumable [`crate::scan`] step (which
//! also enforces the size and depth limits while the stanza is incomplete), then the
//! complete stanza is parsed by quick-xml in [`crate::parse`] with the namespaces declared
//! on the stream header in scope. Every decision is taken on a complete prefix of the input,
//! so the frames do not depend on how the input was split.

use crate::element::Element;
use crate::error::{Condition, StreamError};
use crate::ns;
use crate::parse::{self, Scope};
use crate::scan::{Scan, Scanner};

/// Default for [`Limits::max_stanza_bytes`]: 256 KiB.
pub const DEFAULT_MAX_STANZA_BYTES: usize = 256 * 1024;
/// Default for [`Limits::max_depth`].
pub const DEFAULT_MAX_DEPTH: usize = 32;
/// Default for [`Limits::max_attributes`].
pub const DEFAULT_MAX_ATTRIBUTES: usize = 64;
/// Default for [`Limits::max_header_bytes`]: 4 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 4 * 1024;

/// Bounds on what a peer may send; exceeding one is a `policy-violation` stream error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest top-level element, in bytes. This is what bounds the decoder's memory: an
    /// incomplete stanza is refused as soon as it grows past the limit.
    pub max_stanza_bytes: usize,
    /// Deepest nesting inside a stanza (the stanza itself is depth 1). Bounds the parser's
    /// stacks and the recursion of everything that walks the tree later.
    pub max_depth: usize,
    /// Most attributes on one element, namespace declarations included; a cheap guard
    /// against quadratic duplicate checks.
    pub max_attributes: usize,
    /// Largest XML declaration, stream header or closing stream tag, in bytes.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_stanza_bytes: DEFAULT_MAX_STANZA_BYTES,
            max_depth: DEFAULT_MAX_DEPTH,
            max_attributes: DEFAULT_MAX_ATTRIBUTES,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
        }
    }
}

/// The attributes of a `<stream:stream>` start tag (RFC 6120 §4.7), received or to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// The content namespace declared with `xmlns` (e.g. [`ns::JABBER_CLIENT`]); empty when
    /// none was declared. Checking that it is supported is up to the session.
    pub default_ns: String,
    /// `to`: the host the initiator wants to reach.
    pub to: Option<String>,
    /// `from`: the sender's address.
    pub from: Option<String>,
    /// `id`: the stream id, set by the receiving entity.
    pub id: Option<String>,
    /// `version`: `1.0` for RFC 6120 streams.
    pub version: Option<String>,
    /// `xml:lang`: the default language of the stream.
    pub lang: Option<String>,
}

impl StreamHeader {
    /// A header with content namespace `default_ns` and no other attributes.
    pub fn new(default_ns: impl Into<String>) -> Self {
        Self {
            default_ns: default_ns.into(),
            to: None,
            from: None,
            id: None,
            version: None,
            lang: None,
        }
    }
}

/// One item of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The peer opened the stream (`<stream:stream …>`).
    StreamHeader(StreamHeader),
    /// A complete top-level element.
    Stanza(Element),
    /// The peer closed the stream (`</stream:stream>`).
    StreamEnd,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Before the stream header. `start` is true until the first byte of this stream has
    /// been looked at (byte order marks are only recognized there).
    Prolog { start: bool, declaration: bool },
    /// Inside the stream, between or within stanzas.
    Open {
        /// The header's raw qualified name, which the closing tag must repeat.
        qname: String,
        /// Declarations made on the header, in scope for every stanza.
        scope: Scope,
        /// The stanza being received, if its first `<` has been seen.
        stanza: Option<Scanner>,
    },
    /// The stream was opened with an empty-element tag: the end is reported next.
    ClosedAtOnce,
    /// The stream has ended; only whitespace may follow.
    Ended,
    /// A stream error occurred; it is returned again on every call.
    Failed(StreamError),
}

/// The sans-IO decoder of one XMPP stream.
///
/// Call [`Decoder::feed`] with every chunk read from the connection, then
/// [`Decoder::next`] until it returns `Ok(None)`. Memory stays bounded by
/// [`Limits::max_stanza_bytes`] plus one chunk, as long as frames are drained like this
/// before more input is fed.
///
/// ```
/// use juxta_bridge_xmpp::{Decoder, Frame, Limits, ns};
///
/// let mut decoder = Decoder::new(Limits::default());
/// decoder.feed(b"<stream:stream xmlns='jabber:client' \
///     xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0'>\
///     <presence/>");
/// let Ok(Some(Frame::StreamHeader(header))) = decoder.next() else { panic!() };
/// assert_eq!(header.to.as_deref(), Some("example.org"));
/// let Ok(Some(Frame::Stanza(presence))) = decoder.next() else { panic!() };
/// assert!(presence.is("presence", ns::JABBER_CLIENT));
/// assert_eq!(decoder.next(), Ok(None));
/// ```
#[derive(Debug, Clone)]
pub struct Decoder {
    limits: Limits,
    /// Received bytes; `buf[pos..]` is not consumed yet.
    buf: Vec<u8>,
    pos: usize,
    state: State,
}

impl Decoder {
    /// A decoder expecting a new stream (an optional XML declaration, then the header).
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            buf: Vec::new(),
            pos: 0,
            state: State::Prolog {
                start: true,
                declaration: false,
            },
        }
    }

    /// The limits this decoder enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Appends received bytes. After a stream error the input is dropped: the stream is
    /// over, and keeping it would let the peer grow the buffer.
    pub fn feed(&mut self, bytes: &[u8]) {
        if matches!(self.state, State::Failed(_)) {
            return;
        }
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received and not yet returned as part of a frame.
    pub fn buffered_len(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next complete frame, `Ok(None)` when more input is needed, or the stream error
    /// that ended the stream (returned again on every later call).
    #[allow(
        clippy::should_implement_trait,
        reason = "a fallible, resumable poll: `Ok(None)` means \"feed more\", not the end"
    )]
    pub fn next(&mut self) -> Result<Option<Frame>, StreamError> {
        let result = self.decode();
        if let Err(error) = &result {
            self.state = State::Failed(error.clone());
            self.buf = Vec::new();
            self.pos = 0;
        }
        if self.pos == self.buf.len() {
            // Given back when empty: an idle connection holds no buffer, and one large
            // stanza does not pin its size for the rest of the connection. (A busy one pays
            // one allocation per read, next to a system call.)
            self.buf = Vec::new();
            self.pos = 0;
        }
        result
    }

    /// Expects a new stream from here on (RFC 6120 §5.4.3.3 after STARTTLS, §6.4.6 after
    /// SASL): the next frame is a fresh stream header, optionally preceded by an XML
    /// declaration. Bytes already buffered are kept and read as the new stream; a failed
    /// decoder stays failed.
    pub fn reset(&mut self) {
        if matches!(self.state, State::Failed(_)) {
            return;
        }
        self.state = State::Prolog {
            start: true,
            declaration: false,
        };
    }

    /// Takes every byte not yet returned as part of a frame, including a partly received
    /// stanza, which is forgotten. Before STARTTLS (RFC 6120 §5.4.3.3) this must come back
    /// empty: bytes pipelined after `<starttls/>` arrived in plaintext and must not be
    /// read as if they had come through TLS.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        let rest = self.buf.split_off(self.pos);
        self.buf.clear();
        self.pos = 0;
        if let State::Open { stanza, .. } = &mut self.state {
            *stanza = None;
        }
        rest
    }

    fn decode(&mut self) -> Result<Option<Frame>, StreamError> {
        loop {
            match &mut self.state {
                State::Failed(error) => return Err(error.clone()),
                State::ClosedAtOnce => {
                    self.state = State::Ended;
                    return Ok(Some(Frame::StreamEnd));
                }
                State::Ended => {
                    self.skip_whitespace();
                    if self.pos < self.buf.len() {
                        return Err(StreamError::not_well_formed("data after the end of stream"));
                    }
                    return Ok(None);
                }
                State::Prolog { start, declaration } => {
                    let (start, declaration) = (*start, *declaration);
                    match self.prolog(start, declaration)? {
                        Prolog::NeedMore => return Ok(None),
                        Prolog::Continue { declaration } => {
                            self.state = State::Prolog {
                                start: false,
                                declaration,
                            };
                        }
                        Prolog::Header(frame) => return Ok(Some(frame)),
                    }
                }
                State::Open { .. } => return self.open(),
            }
        }
    }

    fn skip_whitespace(&mut self) {
        while self
            .buf
            .get(self.pos)
            .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        {
            self.pos += 1;
        }
    }

    /// Looks for the header of a new stream (RFC 6120 §4.7, §11.5 and §11.6).
    fn prolog(&mut self, start: bool, declaration: bool) -> Result<Prolog, StreamError> {
        let rest = &self.buf[self.pos..];
        if start {
            const BOM: &[u8] = b"\xEF\xBB\xBF";
            // Wait while the input could still be the start of a byte order mark, UTF-8's
            // or UTF-16's: deciding on a lone `\xFE` would make the error depend on where
            // the input was split.
            let undecided = [BOM, b"\xFE\xFF", b"\xFF\xFE"]
                .iter()
                .any(|bom| rest.len() < bom.len() && bom.starts_with(rest));
            if undecided {
                return Ok(Prolog::NeedMore);
            }
            if rest.starts_with(BOM) {
                self.pos += BOM.len();
            } else if rest.starts_with(b"\xFE\xFF")
                || rest.starts_with(b"\xFF\xFE")
                || rest.first() == Some(&0)
            {
                return Err(StreamError::new(
                    Condition::UnsupportedEncoding,
                    "the stream is not encoded in UTF-8 (RFC 6120 §11.6)",
                ));
            }
            return Ok(Prolog::Continue { declaration });
        }
        self.skip_whitespace();
        let rest = &self.buf[self.pos..];
        let max = self.limits.max_header_bytes;
        match rest {
            [] | [b'<'] => Ok(Prolog::NeedMore),
            [b'<', b'?', ..] => {
                let Some(end) = find(rest, b"?>", max) else {
                    check_pending(rest, max, "XML declaration")?;
                    return Ok(Prolog::NeedMore);
                };
                let pi = &rest[..end];
                let target_end = pi[2..]
                    .iter()
                    .position(|b| b.is_ascii_whitespace() || *b == b'?')
                    .map_or(pi.len(), |i| i + 2);
                if &pi[2..target_end] != b"xml" {
                    return Err(StreamError::restricted("processing instruction"));
                }
                if declaration {
                    return Err(StreamError::not_well_formed("second XML declaration"));
                }
                parse::check_declaration(pi)?;
                self.pos += end;
                Ok(Prolog::Continue { declaration: true })
            }
            [b'<', b'!', ..] => Err(StreamError::restricted(
                "document type declaration or comment",
            )),
            [b'<', b'/', ..] => Err(StreamError::not_well_formed("end tag before the stream")),
            [b'<', ..] => {
                let Some(end) = find_tag_end(rest, max) else {
                    check_pending(rest, max, "stream header")?;
                    return Ok(Prolog::NeedMore);
                };
                let (tag, empty) = parse::parse_header(&rest[..end], self.limits.max_attributes)?;
                self.pos += end;
                let frame = self.open_stream(tag, empty)?;
                Ok(Prolog::Header(frame))
            }
            _ => Err(StreamError::not_well_formed(
                "character data before the stream header",
            )),
        }
    }

    /// Checks the stream header (RFC 6120 §4.8) and enters the stream.
    fn open_stream(&mut self, tag: parse::StartTag, empty: bool) -> Result<Frame, StreamError> {
        let element = &tag.element;
        if element.ns() != ns::STREAM {
            return Err(StreamError::new(
                Condition::InvalidNamespace,
                "the stream namespace is not http://etherx.jabber.org/streams",
            ));
        }
        if element.name() != "stream" {
            return Err(StreamError::new(
                Condition::BadFormat,
                "the stream must open with <stream:stream>",
            ));
        }
        let mut scope = Scope::default();
        for (prefix, uri) in tag.declarations {
            scope.declare(prefix, uri);
        }
        let header = StreamHeader {
            default_ns: scope.default_ns().to_owned(),
            to: element.attr("to").map(str::to_owned),
            from: element.attr("from").map(str::to_owned),
            id: element.attr("id").map(str::to_owned),
            version: element.attr("version").map(str::to_owned),
            lang: element.lang().map(str::to_owned),
        };
        self.state = if empty {
            State::ClosedAtOnce
        } else {
            State::Open {
                qname: tag.qname,
                scope,
                stanza: None,
            }
        };
        Ok(Frame::StreamHeader(header))
    }

    /// Inside the stream: the next stanza or the end of the stream.
    fn open(&mut self) -> Result<Option<Frame>, StreamError> {
        if matches!(self.state, State::Open { stanza: None, .. }) {
            // Whitespace keep-alives (RFC 6120 §4.6.1) between stanzas.
            self.skip_whitespace();
        }
        let State::Open {
            qname,
            scope,
            stanza,
        } = &mut self.state
        else {
            return Ok(None);
        };
        if stanza.is_none() {
            let rest = &self.buf[self.pos..];
            match rest {
                [] | [b'<'] => return Ok(None),
                [b'<', b'/', ..] => {
                    let max = self.limits.max_header_bytes;
                    let Some(end) = find(rest, b">", max) else {
                        check_pending(rest, max, "closing stream tag")?;
                        return Ok(None);
                    };
                    let name = rest[2..end - 1].trim_ascii_end();
                    if name != qname.as_bytes() {
                        return Err(StreamError::not_well_formed(
                            "the closing tag does not match the stream header",
                        ));
                    }
                    self.pos += end;
                    self.state = State::Ended;
                    return Ok(Some(Frame::StreamEnd));
                }
                [b'<', b'!', ..] => {
                    return Err(StreamError::restricted(
                        "comment or markup declaration at stream level",
                    ));
                }
                [b'<', b'?', ..] => {
                    return Err(StreamError::restricted(
                        "processing instruction at stream level",
                    ));
                }
                [b'<', ..] => *stanza = Some(Scanner::new()),
                _ => {
                    return Err(StreamError::new(
                        Condition::BadFormat,
                        "character data at stream level",
                    ));
                }
            }
        }
        let Some(scanner) = stanza else {
            return Ok(None);
        };
        let rest = &self.buf[self.pos..];
        match scanner.scan(rest, self.limits.max_stanza_bytes, self.limits.max_depth)? {
            Scan::Incomplete => Ok(None),
            Scan::Complete(len) => {
                let element = parse::parse_stanza(
                    &rest[..len],
                    scope,
                    self.limits.max_depth,
                    self.limits.max_attributes,
                )?;
                *stanza = None;
                self.pos += len;
                Ok(Some(Frame::Stanza(element)))
            }
        }
    }
}

/// Progress through the prolog.
enum Prolog {
    NeedMore,
    Continue { declaration: bool },
    Header(Frame),
}

/// Refuses a piece of prolog or epilog that is already `max` bytes long and still
/// incomplete; otherwise the caller waits for more input.
fn check_pending(rest: &[u8], max: usize, what: &str) -> Result<(), StreamError> {
    if rest.len() >= max {
        Err(StreamError::policy(format!(
            "{what} larger than {max} bytes"
        )))
    } else {
        Ok(())
    }
}

/// The end (exclusive) of the first `needle` in the first `max` bytes of `haystack`.
fn find(haystack: &[u8], needle: &[u8], max: usize) -> Option<usize> {
    let window = &haystack[..haystack.len().min(max)];
    window
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + needle.len())
}

/// The end (exclusive) of a start tag beginning at `tag[0]`: the first `>` outside quoted
/// attribute values, within the first `max` bytes.
fn find_tag_end(tag: &[u8], max: usize) -> Option<usize> {
    let mut quote = None;
    for (index, byte) in tag.iter().take(max).enumerate() {
        match (quote, byte) {
            (Some(q), b) if *b == q => quote = None,
            (Some(_), _) => {}
            (None, b'"' | b'\'') => quote = Some(*byte),
            (None, b'>') => return Some(index + 1),
            (None, _) => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::{WriteContext, stream_header};

    const HEADER: &str = "<?xml version='1.0'?>\
        <stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' \
        to='example.org' version='1.0' xml:lang='en'>";

    /// A client stream after authentication: header, bind, a pubsub publish with a JSON
    /// payload, keep-alives, a message with references and CDATA, presence, end.
    const STREAM: &str = "<?xml version='1.0' encoding='UTF-8'?>\n\
        <stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' \
        to='example.org' version=\"1.0\" xml:lang='en' from='juliet@example.org'>\n  \
        <iq type='set' id='bind_1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
        <resource>balcony</resource></bind></iq>\r\n\
        <iq type='set' from='juliet@example.org/balcony' to='pubsub.example.org' id='pub1'>\
        <pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='princely_musings'>\
        <item id='ae890ac52d0df67ed7cfdf51b644e901'>\
        <json xmlns='urn:xmpp:json:0'>{\"title\":\"a &lt; b &amp;&amp; c &gt; d\",\
        \"quote\":\"'\\\"\",\"n\":[1,2,3]}</json>\
        </item></publish></pubsub></iq> \n \t \n\
        <message to='romeo@example.net' type='chat' xml:lang='en' id='m&amp;1'>\
        <body>Wherefore art thou, Romeo? &#x1F339;&#233; <![CDATA[<3 & ]]]]>\
        </body><x xmlns:e='urn:example' e:flag='1'/></message>\
        <stream:features xmlns:p='urn:p'><p:x/></stream:features>\
        <presence/>     </stream:stream>";

    /// Moves every available frame into `frames`.
    fn drain(decoder: &mut Decoder, frames: &mut Vec<Frame>) -> Result<(), StreamError> {
        while let Some(frame) = decoder.next()? {
            frames.push(frame);
        }
        Ok(())
    }

    /// Feeds `input` in `chunk`-byte pieces, draining after each; the frames and the error
    /// the stream ended with, if any.
    fn decode_in_chunks(
        input: &[u8],
        chunk: usize,
        limits: Limits,
    ) -> (Vec<Frame>, Option<StreamError>) {
        let mut decoder = Decoder::new(limits);
        let mut frames = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            decoder.feed(piece);
            if let Err(error) = drain(&mut decoder, &mut frames) {
                return (frames, Some(error));
            }
        }
        (frames, None)
    }

    fn decode_all(input: &[u8]) -> (Vec<Frame>, Option<StreamError>) {
        decode_in_chunks(input, input.len(), Limits::default())
    }

    /// The condition `stanza` is refused with, sent after [`HEADER`], checked to be the
    /// same whether the input comes at once or byte by byte.
    fn refusal(stanza: &[u8]) -> Option<Condition> {
        let mut input = HEADER.as_bytes().to_vec();
        input.extend_from_slice(stanza);
        let (_, at_once) = decode_all(&input);
        let (_, byte_by_byte) = decode_in_chunks(&input, 1, Limits::default());
        assert_eq!(
            at_once.as_ref().map(StreamError::condition),
            byte_by_byte.as_ref().map(StreamError::condition),
            "the refusal depends on how the input is split"
        );
        at_once.map(|e| e.condition())
    }

    fn stanzas(frames: &[Frame]) -> Vec<&Element> {
        frames
            .iter()
            .filter_map(|frame| match frame {
                Frame::Stanza(element) => Some(element),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_realistic_stream_decodes_into_header_stanzas_and_end() {
        let (frames, error) = decode_all(STREAM.as_bytes());
        assert_eq!(error, None);
        assert_eq!(frames.len(), 7);
        let Frame::StreamHeader(header) = &frames[0] else {
            panic!("first frame is {:?}", frames[0]);
        };
        assert_eq!(
            header,
            &StreamHeader {
                default_ns: ns::JABBER_CLIENT.to_owned(),
                to: Some("example.org".to_owned()),
                from: Some("juliet@example.org".to_owned()),
                id: None,
                version: Some("1.0".to_owned()),
                lang: Some("en".to_owned()),
            }
        );
        assert_eq!(frames[6], Frame::StreamEnd);
        let stanzas = stanzas(&frames);
        let names: Vec<(&str, &str)> = stanzas.iter().map(|s| (s.name(), s.ns())).collect();
        assert_eq!(
            names,
            [
                ("iq", ns::JABBER_CLIENT),
                ("iq", ns::JABBER_CLIENT),
                ("message", ns::JABBER_CLIENT),
                ("features", ns::STREAM),
                ("presence", ns::JABBER_CLIENT),
            ]
        );
        let resource = stanzas[0]
            .get_child("bind", ns::BIND)
            .and_then(|b| b.get_child("resource", ns::BIND))
            .map(Element::text);
        assert_eq!(resource.as_deref(), Some("balcony"));
        let json = stanzas[1]
            .get_child("pubsub", ns::PUBSUB)
            .and_then(|p| p.get_child("publish", ns::PUBSUB))
            .and_then(|p| p.get_child("item", ns::PUBSUB))
            .and_then(|i| i.get_child("json", ns::JSON))
            .map(Element::text);
        assert_eq!(
            json.as_deref(),
            Some(r#"{"title":"a < b && c > d","quote":"'\"","n":[1,2,3]}"#)
        );
        let message = stanzas[2];
        assert_eq!(message.attr("id"), Some("m&1"));
        assert_eq!(message.lang(), Some("en"));
        assert_eq!(
            message
                .get_child("body", ns::JABBER_CLIENT)
                .map(Element::text)
                .as_deref(),
            Some("Wherefore art thou, Romeo? 🌹é <3 & ]]")
        );
        let flag = message
            .get_child("x", ns::JABBER_CLIENT)
            .and_then(|x| x.attr_ns("flag", "urn:example"));
        assert_eq!(flag, Some("1"));
        assert!(stanzas[3].has_child("x", "urn:p"));
    }

    #[test]
    fn every_split_point_of_a_stream_yields_the_same_frames_as_feeding_it_at_once() {
        let input = STREAM.as_bytes();
        let (expected, error) = decode_all(input);
        assert_eq!(error, None);
        for split in 0..=input.len() {
            let mut decoder = Decoder::new(Limits::default());
            let mut frames = Vec::new();
            for part in [&input[..split], &input[split..]] {
                decoder.feed(part);
                if let Err(error) = drain(&mut decoder, &mut frames) {
                    panic!("split at {split}: {error}");
                }
            }
            assert_eq!(frames, expected, "split at {split}");
        }
    }

    #[test]
    fn feeding_in_chunks_of_any_size_including_single_bytes_yields_the_same_frames() {
        let input = STREAM.as_bytes();
        let (expected, _) = decode_all(input);
        for chunk in (1..=64).chain([100, 333, 1000]) {
            let (frames, error) = decode_in_chunks(input, chunk, Limits::default());
            assert_eq!(error, None, "chunks of {chunk}");
            assert_eq!(frames, expected, "chunks of {chunk}");
        }
    }

    #[test]
    fn a_stanza_is_returned_as_soon_as_it_is_complete_without_waiting_for_the_stream_end() {
        let mut decoder = Decoder::new(Limits::default());
        decoder.feed(HEADER.as_bytes());
        assert!(matches!(decoder.next(), Ok(Some(Frame::StreamHeader(_)))));
        decoder.feed(b"<message><body>hi</body></mess");
        assert_eq!(decoder.next(), Ok(None));
        decoder.feed(b"age>");
        assert!(matches!(decoder.next(), Ok(Some(Frame::Stanza(m))) if m.name() == "message"));
        assert_eq!(decoder.next(), Ok(None));
        assert_eq!(decoder.buffered_len(), 0);
    }

    #[test]
    fn whitespace_keep_alives_produce_no_frames() {
        let mut decoder = Decoder::new(Limits::default());
        decoder.feed(HEADER.as_bytes());
        assert!(matches!(decoder.next(), Ok(Some(Frame::StreamHeader(_)))));
        for _ in 0..1000 {
            decoder.feed(b" ");
            assert_eq!(decoder.next(), Ok(None));
        }
        decoder.feed(b"\n\r\t<presence/>");
        assert!(matches!(decoder.next(), Ok(Some(Frame::Stanza(_)))));
        assert_eq!(decoder.buffered_len(), 0);
    }

    #[test]
    fn a_component_stream_decodes_the_handshake_in_the_accept_namespace() {
        let input = "<stream:stream xmlns='jabber:component:accept' \
            xmlns:stream='http://etherx.jabber.org/streams' to='pubsub.example.org'>\
            <handshake>aaee83c26aeeafcbabeabfcbcd50df997e0a2a1e</handshake>";
        let (frames, error) = decode_all(input.as_bytes());
        assert_eq!(error, None);
        assert!(
            matches!(&frames[0], Frame::StreamHeader(h) if h.default_ns == ns::JABBER_COMPONENT_ACCEPT)
        );
        assert!(matches!(
            &frames[1],
            Frame::Stanza(h) if h.is("handshake", ns::JABBER_COMPONENT_ACCEPT)
        ));
    }

    #[test]
    fn a_stream_may_use_another_prefix_and_must_close_with_the_same_name() {
        let open = "<s:stream xmlns:s='http://etherx.jabber.org/streams' xmlns='jabber:client'>\
            <s:features/>";
        let (frames, error) = decode_all(format!("{open}</s:stream >").as_bytes());
        assert_eq!(error, None);
        assert!(matches!(&frames[1], Frame::Stanza(f) if f.is("features", ns::STREAM)));
        assert_eq!(frames.last(), Some(&Frame::StreamEnd));
        let (_, error) = decode_all(format!("{open}</stream:stream>").as_bytes());
        assert_eq!(error.map(|e| e.condition()), Some(Condition::NotWellFormed));
    }

    #[test]
    fn an_empty_stream_header_opens_and_closes_the_stream() {
        let input = b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'/>";
        let (frames, error) = decode_all(input);
        assert_eq!(error, None);
        assert!(matches!(&frames[0], Frame::StreamHeader(h) if h.default_ns.is_empty()));
        assert_eq!(frames[1], Frame::StreamEnd);
    }

    #[test]
    fn a_utf_8_byte_order_mark_is_skipped() {
        let mut input = b"\xEF\xBB\xBF".to_vec();
        input.extend_from_slice(HEADER.as_bytes());
        for chunk in [1, 2, input.len()] {
            let (frames, error) = decode_in_chunks(&input, chunk, Limits::default());
            assert_eq!(error, None);
            assert_eq!(frames.len(), 1);
        }
    }

    #[test]
    fn only_whitespace_may_follow_the_end_of_the_stream() {
        let input = format!("{HEADER}</stream:stream>\n ");
        let (frames, error) = decode_all(input.as_bytes());
        assert_eq!(error, None);
        assert_eq!(frames.last(), Some(&Frame::StreamEnd));
        let (_, error) = decode_all(format!("{input}<presence/>").as_bytes());
        assert_eq!(error.map(|e| e.condition()), Some(Condition::NotWellFormed));
    }

    #[test]
    fn a_billion_laughs_document_is_refused_at_its_doctype_without_expansion() {
        let mut input = String::from(
            "<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol \"lol\">\
             <!ENTITY lol1 \"&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;\">",
        );
        for level in 2..=9 {
            let previous = format!("&lol{};", level - 1).repeat(10);
            input.push_str(&format!("<!ENTITY lol{level} \"{previous}\">"));
        }
        input.push_str("]><stream:stream xmlns:stream='http://etherx.jabber.org/streams'>");
        input.push_str("<message><body>&lol9;</body></message>");
        let (frames, error) = decode_all(input.as_bytes());
        assert!(frames.is_empty());
        assert_eq!(error.map(|e| e.condition()), Some(Condition::RestrictedXml));
        // Without the DTD, the reference alone is refused as well.
        assert_eq!(
            refusal(b"<message><body>&lol9;</body></message>"),
            Some(Condition::RestrictedXml)
        );
    }

    #[test]
    fn a_doctype_or_entity_declaration_anywhere_is_restricted_xml() {
        let (_, error) = decode_all(
            b"<!DOCTYPE stream><stream:stream xmlns:stream='http://etherx.jabber.org/streams'>",
        );
        assert_eq!(error.map(|e| e.condition()), Some(Condition::RestrictedXml));
        assert_eq!(refusal(b"<!DOCTYPE x>"), Some(Condition::RestrictedXml));
        assert_eq!(
            refusal(b"<iq><!ENTITY x 'y'></iq>"),
            Some(Condition::RestrictedXml)
        );
    }

    #[test]
    fn comments_are_restricted_xml_before_between_and_inside_stanzas() {
        let (_, error) = decode_all(format!("<!-- hi -->{HEADER}").as_bytes());
        assert_eq!(error.map(|e| e.condition()), Some(Condition::RestrictedXml));
        assert_eq!(refusal(b"<!-- between -->"), Some(Condition::RestrictedXml));
        assert_eq!(
            refusal(b"<message><!-- inside --></message>"),
            Some(Condition::RestrictedXml)
        );
    }

    #[test]
    fn processing_instructions_other_than_the_initial_declaration_are_restricted_xml() {
        let (_, error) = decode_all(format!("<?xml-stylesheet href='x'?>{HEADER}").as_bytes());
        assert_eq!(error.map(|e| e.condition()), Some(Condition::RestrictedXml));
        assert_eq!(refusal(b"<?pi data?>"), Some(Condition::RestrictedXml));
        assert_eq!(
            refusal(b"<message><?pi data?></message>"),
            Some(Condition::RestrictedXml)
        );
        assert_eq!(
            refusal(b"<?xml version='1.0'?>"),
            Some(Condition::RestrictedXml)
        );
        let twice = format!("<?xml version='1.0'?>{HEADER}");
        let (_, error) = decode_all(twice.as_bytes());
        assert_eq!(error.map(|e| e.condition()), Some(Condition::NotWellFormed));
    }

    #[test]
    fn an_unterminated_10_mb_stanza_fed_in_4_kib_chunks_is_refused_at_the_limit() {
        let limits = Limits::default();
        let mut decoder = Decoder::new(limits);
        decoder.feed(HEADER.as_bytes());
        assert!(matches!(decoder.next(), Ok(Some(Frame::StreamHeader(_)))));
        decoder.feed(b"<message><body>");
        let chunk = [b'a'; 4096];
        let mut fed = 0;
        let mut refused = None;
        while fed < 10 * 1024 * 1024 {
            decoder.feed(&chunk);
            fed += chunk.len();
            assert!(decoder.buffered_len() <= limits.max_stanza_bytes + chunk.len());
            if let Err(error) = decoder.next() {
                refused = Some((fed, error));
                break;
            }
        }
        let Some((fed, error)) = refused else {
            panic!("10 MB were buffered without a refusal");
        };
        assert_eq!(error.condition(), Condition::PolicyViolation);
        assert!(
            fed <= limits.max_stanza_bytes + chunk.len(),
            "refused after {fed} bytes"
        );
        assert!(fed >= limits.max_stanza_bytes - chunk.len());
        // The refusal is final and the decoder holds on to nothing more.
        assert_eq!(decoder.buffered_len(), 0);
        decoder.feed(&chunk);
        assert_eq!(decoder.buffered_len(), 0);
        assert_eq!(decoder.next(), Err(error));
    }

    #[test]
    fn a_stanza_exactly_at_the_size_limit_is_accepted_and_one_byte_more_is_refused() {
        let limits = Limits {
            max_stanza_bytes: 100,
            ..Limits::default()
        };
        let at_limit = format!("<body>{}</body>", "x".repeat(100 - 13));
        assert_eq!(at_limit.len(), 100);
        let over = format!("<body>{}</body>", "x".repeat(100 - 12));
        for (stanza, ok) in [(at_limit, true), (over, false)] {
            let input = format!("{HEADER}{stanza}");
            for chunk in [1, 7, input.len()] {
                let (frames, error) = decode_in_chunks(input.as_bytes(), chunk, limits);
                assert_eq!(error.is_none(), ok, "{stanza} in chunks of {chunk}");
                assert_eq!(frames.len(), if ok { 2 } else { 1 });
                if let Some(error) = error {
                    assert_eq!(error.condition(), Condition::PolicyViolation);
                }
            }
        }
    }

    #[test]
    fn a_depth_bomb_is_refused_once_it_is_deeper_than_the_limit() {
        let limits = Limits::default();
        let mut decoder = Decoder::new(limits);
        decoder.feed(HEADER.as_bytes());
        assert!(matches!(decoder.next(), Ok(Some(Frame::StreamHeader(_)))));
        let mut opened = 0;
        let error = loop {
            decoder.feed(b"<a>");
            opened += 1;
            match decoder.next() {
                Ok(None) => assert!(opened <= limits.max_depth),
                other => break other,
            }
        };
        assert_eq!(opened, limits.max_depth + 1);
        assert_eq!(
            error.map_err(|e| e.condition()),
            Err(Condition::PolicyViolation)
        );
    }

    #[test]
    fn too_many_attributes_are_a_policy_violation() {
        let attrs: String = (0..65).map(|i| format!(" a{i}='{i}'")).collect();
        assert_eq!(
            refusal(format!("<message{attrs}/>").as_bytes()),
            Some(Condition::PolicyViolation)
        );
        let header =
            format!("<stream:stream xmlns:stream='http://etherx.jabber.org/streams'{attrs}>");
        let (_, error) = decode_all(header.as_bytes());
        assert_eq!(
            error.map(|e| e.condition()),
            Some(Condition::PolicyViolation)
        );
    }

    #[test]
    fn an_undeclared_prefix_is_a_bad_namespace_prefix() {
        assert_eq!(
            refusal(b"<foo:message/>"),
            Some(Condition::BadNamespacePrefix)
        );
        assert_eq!(
            refusal(b"<message foo:x='1'/>"),
            Some(Condition::BadNamespacePrefix)
        );
        let (_, error) = decode_all(b"<stream:stream xmlns='jabber:client'>");
        assert_eq!(
            error.map(|e| e.condition()),
            Some(Condition::BadNamespacePrefix)
        );
    }

    #[test]
    fn a_declaration_naming_latin_1_is_an_unsupported_encoding() {
        let input = format!(
            "<?xml version='1.0' encoding='ISO-8859-1'?>{}",
            &HEADER[21..]
        );
        let (frames, error) = decode_all(input.as_bytes());
        assert!(frames.is_empty());
        assert_eq!(
            error.map(|e| e.condition()),
            Some(Condition::UnsupportedEncoding)
        );
    }

    #[test]
    fn invalid_utf_8_is_an_unsupported_encoding() {
        assert_eq!(
            refusal(b"<message><body>caf\xE9</body></message>"),
            Some(Condition::UnsupportedEncoding)
        );
        assert_eq!(
            refusal(b"<message to='\xC3\x28'/>"),
            Some(Condition::UnsupportedEncoding)
        );
        let mut header =
            b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' to='\xFF'>".to_vec();
        let (_, error) = decode_all(&header);
        assert_eq!(
            error.map(|e| e.condition()),
            Some(Condition::UnsupportedEncoding)
        );
        header.clear();
        for utf16 in [&b"\xFF\xFE<\0"[..], b"\xFE\xFF\0<", b"\0<\0s"] {
            let (_, error) = decode_all(utf16);
            assert_eq!(
                error.map(|e| e.condition()),
                Some(Condition::UnsupportedEncoding)
            );
        }
    }

    #[test]
    fn a_utf_16_byte_order_mark_split_after_its_first_byte_is_still_an_unsupported_encoding() {
        // Found by the fuzzer: a lone `\xFE` was taken for character data before the header.
        for input in [&b"\xFE\xFF\0<"[..], b"\xFF\xFE<\0"] {
            let (_, at_once) = decode_all(input);
            let (_, byte_by_byte) = decode_in_chunks(input, 1, Limits::default());
            assert_eq!(at_once, byte_by_byte);
            assert_eq!(
                at_once.map(|e| e.condition()),
                Some(Condition::UnsupportedEncoding)
            );
        }
    }

    #[test]
    fn a_wrong_stream_namespace_is_an_invalid_namespace() {
        let (frames, error) = decode_all(
            b"<stream:stream xmlns='jabber:client' xmlns:stream='http://wrong.example/streams'>",
        );
        assert!(frames.is_empty());
        assert_eq!(
            error.map(|e| e.condition()),
            Some(Condition::InvalidNamespace)
        );
        let (_, error) = decode_all(b"<stream xmlns='jabber:client'>");
        assert_eq!(
            error.map(|e| e.condition()),
            Some(Condition::InvalidNamespace)
        );
        let (_, error) =
            decode_all(b"<stream:features xmlns:stream='http://etherx.jabber.org/streams'>");
        assert_eq!(error.map(|e| e.condition()), Some(Condition::BadFormat));
    }

    #[test]
    fn mismatched_end_tags_are_not_well_formed() {
        assert_eq!(
            refusal(b"<message><body></message></body>"),
            Some(Condition::NotWellFormed)
        );
        assert_eq!(refusal(b"<iq><a></b></iq>"), Some(Condition::NotWellFormed));
        assert_eq!(refusal(b"</stream:foo>"), Some(Condition::NotWellFormed));
    }

    #[test]
    fn namespace_declarations_of_one_stanza_do_not_leak_into_the_next() {
        assert_eq!(
            refusal(b"<message xmlns:p='urn:p'><p:x/></message><p:x/>"),
            Some(Condition::BadNamespacePrefix)
        );
    }

    #[test]
    fn a_stanza_may_redeclare_the_default_namespace_and_the_session_decides() {
        let input = format!("{HEADER}<iq xmlns='jabber:server' type='get'/><iq type='get'/>");
        let (frames, error) = decode_all(input.as_bytes());
        assert_eq!(error, None);
        let namespaces: Vec<&str> = stanzas(&frames).iter().map(|s| s.ns()).collect();
        assert_eq!(namespaces, ["jabber:server", ns::JABBER_CLIENT]);
    }

    #[test]
    fn character_data_at_stream_level_is_a_bad_format() {
        assert_eq!(refusal(b"hello"), Some(Condition::BadFormat));
        assert_eq!(refusal(b"<presence/>&amp;"), Some(Condition::BadFormat));
    }

    #[test]
    fn an_oversized_stream_header_is_a_policy_violation() {
        let limits = Limits::default();
        let header = format!(
            "<stream:stream xmlns:stream='http://etherx.jabber.org/streams' to='{}'>",
            "x".repeat(limits.max_header_bytes)
        );
        for chunk in [1, 100, header.len()] {
            let (_, error) = decode_in_chunks(header.as_bytes(), chunk, limits);
            assert_eq!(
                error.map(|e| e.condition()),
                Some(Condition::PolicyViolation)
            );
        }
    }

    #[test]
    fn after_an_error_the_decoder_stays_failed_with_the_same_error() {
        let mut decoder = Decoder::new(Limits::default());
        decoder.feed(HEADER.as_bytes());
        decoder.feed(b"<!-- no --><presence/>");
        assert!(matches!(decoder.next(), Ok(Some(Frame::StreamHeader(_)))));
        let first = decoder.next();
        assert_eq!(
            first.as_ref().map_err(StreamError::condition),
            Err(Condition::RestrictedXml)
        );
        decoder.feed(b"<presence/>");
        decoder.reset();
        decoder.feed(HEADER.as_bytes());
        assert_eq!(decoder.next(), first);
        assert_eq!(decoder.next(), first);
    }

    #[test]
    fn reset_expects_a_new_stream_header_and_reads_bytes_already_buffered_as_that_stream() {
        let mut decoder = Decoder::new(Limits::default());
        decoder.feed(HEADER.as_bytes());
        decoder.feed(
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGp1bGlldABy</auth>",
        );
        assert!(matches!(decoder.next(), Ok(Some(Frame::StreamHeader(_)))));
        let auth = decoder.next();
        assert!(matches!(&auth, Ok(Some(Frame::Stanza(a))) if a.is("auth", ns::SASL)));
        // After <success/> the client restarts the stream; here it was pipelined.
        decoder.feed(HEADER.as_bytes());
        decoder.feed(b"<iq type='set' id='b'/>");
        decoder.reset();
        assert!(matches!(decoder.next(), Ok(Some(Frame::StreamHeader(_)))));
        assert!(
            matches!(decoder.next(), Ok(Some(Frame::Stanza(iq))) if iq.attr("id") == Some("b"))
        );
        assert_eq!(decoder.next(), Ok(None));
        // A reset with nothing buffered waits for the header.
        decoder.reset();
        assert_eq!(decoder.next(), Ok(None));
        decoder.feed(b"<presence/>");
        assert_eq!(
            decoder.next().map_err(|e| e.condition()),
            Err(Condition::InvalidNamespace)
        );
    }

    #[test]
    fn take_buffered_returns_bytes_pipelined_after_starttls() {
        let mut decoder = Decoder::new(Limits::default());
        decoder.feed(HEADER.as_bytes());
        decoder.feed(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><iq type='get' id='x'/>");
        assert!(matches!(decoder.next(), Ok(Some(Frame::StreamHeader(_)))));
        assert!(matches!(decoder.next(), Ok(Some(Frame::Stanza(s))) if s.is("starttls", ns::TLS)));
        // The driver stops reading frames here; anything buffered was sent in plaintext.
        assert_eq!(decoder.take_buffered(), b"<iq type='get' id='x'/>");
        assert_eq!(decoder.buffered_len(), 0);
        assert_eq!(decoder.take_buffered(), b"");
    }

    #[test]
    fn take_buffered_after_a_clean_starttls_is_empty_and_the_decoder_restarts_over_tls() {
        let mut decoder = Decoder::new(Limits::default());
        decoder.feed(HEADER.as_bytes());
        decoder.feed(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
        assert!(matches!(decoder.next(), Ok(Some(Frame::StreamHeader(_)))));
        assert!(matches!(decoder.next(), Ok(Some(Frame::Stanza(_)))));
        assert!(decoder.take_buffered().is_empty());
        decoder.reset();
        decoder.feed(HEADER.as_bytes());
        assert!(matches!(decoder.next(), Ok(Some(Frame::StreamHeader(_)))));
    }

    #[test]
    fn take_buffered_also_returns_and_forgets_a_partial_stanza() {
        let mut decoder = Decoder::new(Limits::default());
        decoder.feed(HEADER.as_bytes());
        assert!(matches!(decoder.next(), Ok(Some(Frame::StreamHeader(_)))));
        decoder.feed(b"<message><bo");
        assert_eq!(decoder.next(), Ok(None));
        assert_eq!(decoder.take_buffered(), b"<message><bo");
        decoder.feed(b"<presence/>");
        assert!(matches!(decoder.next(), Ok(Some(Frame::Stanza(p))) if p.name() == "presence"));
    }

    #[test]
    fn a_large_stanza_does_not_keep_its_buffer_after_it_was_returned() {
        let mut decoder = Decoder::new(Limits::default());
        decoder.feed(HEADER.as_bytes());
        assert!(matches!(decoder.next(), Ok(Some(Frame::StreamHeader(_)))));
        let body = "x".repeat(200 * 1024);
        decoder.feed(format!("<message><body>{body}</body></message>").as_bytes());
        assert!(matches!(decoder.next(), Ok(Some(Frame::Stanza(_)))));
        assert_eq!(decoder.buffered_len(), 0);
        assert_eq!(decoder.buf.capacity(), 0);
    }

    #[test]
    fn what_the_writer_produces_the_decoder_reads_back() {
        let header = StreamHeader {
            id: Some("s1".to_owned()),
            ..StreamHeader::new(ns::JABBER_CLIENT)
        };
        let message = Element::builder("message", ns::JABBER_CLIENT)
            .attr("to", "a@b")
            .attr_ns("lang", ns::XML, "de")
            .append(Element::builder("body", ns::JABBER_CLIENT).append("<&>\"'\r\n"))
            .append(Element::builder("json", ns::JSON).append(r#"{"k":"a<b"}"#))
            .build();
        let mut input = stream_header(&header);
        message.write_to(&mut input, WriteContext::stream(ns::JABBER_CLIENT));
        input.extend_from_slice(crate::writer::STREAM_END);
        let (frames, error) = decode_in_chunks(&input, 1, Limits::default());
        assert_eq!(error, None);
        assert_eq!(
            frames,
            [
                Frame::StreamHeader(header),
                Frame::Stanza(message),
                Frame::StreamEnd
            ]
        );
    }

    #[test]
    fn mutated_streams_give_the_same_frames_and_error_however_they_are_split() {
        // Deterministic mutations (an LCG, fixed seed) of the realistic stream, each decoded
        // at once and in pieces: split invariance must hold for refusals too, and nothing
        // may panic.
        let alphabet = b"<>/'\"&;!?-[]x :=\n#\xC3\xFF";
        let mut seed: u64 = 0x1234_5678;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            usize::try_from(seed >> 33).unwrap_or(0)
        };
        let mut refused = 0;
        for _ in 0..500 {
            let mut input = STREAM.as_bytes().to_vec();
            for _ in 0..1 + next() % 3 {
                let at = next() % input.len();
                input[at] = alphabet[next() % alphabet.len()];
            }
            let (frames, error) = decode_all(&input);
            refused += usize::from(error.is_some());
            for chunk in [1, 2, 5, 13] {
                let (pieces, piece_error) = decode_in_chunks(&input, chunk, Limits::default());
                let shown = String::from_utf8_lossy(&input);
                assert_eq!(piece_error, error, "chunks of {chunk}: {shown}");
                assert_eq!(pieces, frames, "chunks of {chunk}: {shown}");
            }
        }
        assert!(
            refused > 100,
            "only {refused} of 500 mutations were refused"
        );
    }
}
