//! Property tests of the sans-IO stream decoder.
//!
//! Streams are generated from a model ([`StreamSpec`]): the same model gives the raw bytes
//! (with escapes, character references, CDATA, prefixed namespaces, loose whitespace inside
//! tags and multi-byte UTF-8) and the frames the decoder must return for them, so the
//! properties check the decoded content, not only that two ways of feeding agree.
//!
//! - Split invariance: a stream fed at once, cut at arbitrary points (inside tags, inside
//!   multi-byte characters, into empty pieces) or byte by byte gives the same frames.
//! - Round trip: a parsed stanza written with [`Element::write_to`] parses back equal.
//! - Hostile input: arbitrary bytes, XML-ish token soup and mutated streams never panic,
//!   and give the same frames and the same stream error however they are split.
//! - Limits: a stanza over `max_stanza_bytes` or deeper than `max_depth` is a
//!   `policy-violation` however it is split, and every stanza before it is still returned.
//!
//! `cargo +nightly fuzz run decoder` (in `bridge-xmpp/fuzz/`) explores the hostile-input
//! property further, guided by coverage.

use juxta_bridge_xmpp::{
    Condition, Decoder, Element, Frame, Limits, StreamError, StreamHeader, WriteContext, ns,
    stream_header,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::FileFailurePersistence;

/// Prefixes the generated elements declare (one of them non-ASCII).
const PREFIXES: &[&str] = &["p", "q", "é"];
/// Namespaces; the empty one only as a default namespace (`xmlns=''` undeclares it), the
/// others with characters that must be escaped in the declaration.
const URIS: &[&str] = &[
    "",
    "urn:example:a",
    "urn:example:b",
    "http://example.org/<&>\"'",
    "urn:数据",
];
const ELEMENT_NAMES: &[&str] = &[
    "message", "iq", "body", "x", "item", "ñame", "数据", "a-b.c_d",
];
const ATTRIBUTE_NAMES: &[&str] = &["id", "type", "to", "n", "ä", "k-1"];
const LANGS: &[&str] = &["en", "de-CH", "zh-Hant"];
/// Characters written literally in text: no `<`, `&` or `]` (so no `]]>`), no `\r`
/// (end-of-line normalization would change it); `>` and quotes are fine.
const TEXT_CHARS: &[char] = &[
    'a',
    'z',
    ' ',
    '\n',
    '\t',
    '"',
    '\'',
    '>',
    '/',
    '=',
    '?',
    '!',
    '-',
    '[',
    'é',
    'ß',
    '中',
    '🌹',
    '\u{FFFD}',
    '\u{10FFFF}',
];
/// Characters written literally in attribute values; the enclosing quote is written as a
/// reference instead, and literal tab and line feed are read back as spaces (XML §3.3.3).
const ATTRIBUTE_CHARS: &[char] = &[
    'a', 'z', ' ', '>', '/', '=', 'é', '中', '🌹', '\t', '\n', '"', '\'',
];
/// Characters inside CDATA sections (`]]>` is taken out afterwards).
const CDATA_CHARS: &[char] = &['a', '<', '&', ']', '>', ' ', '\n', 'é', '🌹', '\'', '"'];
/// Characters written as references.
const REFERENCE_CHARS: &[char] = &[
    '<', '>', '&', '\'', '"', '\t', '\n', '\r', ' ', 'a', 'é', '🌹', '\u{E000}',
];
const STREAM_LEVEL_WHITESPACE: &[&str] = &["", " ", "\n", "\r\n", "\t"];
/// Declared on the generated stream headers with prefix `h`, so it is in scope in stanzas.
const HEADER_URI: &str = "urn:example:h&header";

#[derive(Debug, Clone, Copy)]
enum ReferenceStyle {
    Named,
    Decimal,
    Hex,
}

/// A piece of text or of an attribute value.
#[derive(Debug, Clone)]
enum Segment {
    /// Characters written as they are.
    Plain(String),
    /// One character written as a reference (a predefined entity where `Named` allows).
    Reference(char, ReferenceStyle),
    /// A CDATA section; only in content.
    CData(String),
}

/// Where an element's namespace comes from.
#[derive(Debug, Clone)]
enum NsChoice {
    /// The default namespace in scope.
    Inherit,
    /// `xmlns='…'` on the element itself.
    Default(usize),
    /// `<p:name xmlns:p='…'>`.
    Prefix(usize, usize),
    /// A prefix declared by an ancestor or the stream header (`stream`, `h`, …).
    InScope(Index),
}

#[derive(Debug, Clone)]
struct AttributeSpec {
    name: usize,
    /// A prefix in scope, resolved at rendering.
    prefix: Option<Index>,
    value: Vec<Segment>,
    double_quoted: bool,
}

#[derive(Debug, Clone)]
struct ElementSpec {
    name: usize,
    ns: NsChoice,
    /// A prefix declared here for descendants (and this element's attributes).
    extra_prefix: Option<(usize, usize)>,
    attributes: Vec<AttributeSpec>,
    lang: Option<usize>,
    /// Namespace declarations after the other attributes rather than before.
    declarations_last: bool,
    /// Whitespace around `=`, before `>`, `/>` and in the end tag.
    loose: bool,
    /// `<x/>` rather than `<x></x>` when there are no children.
    self_closing: bool,
    children: Vec<Content>,
}

#[derive(Debug, Clone)]
enum Content {
    Text(Vec<Segment>),
    Element(ElementSpec),
}

#[derive(Debug, Clone)]
struct StreamSpec {
    bom: bool,
    /// `<?xml version='1.0'?>`, with `encoding='UTF-8'` when `Some(true)`.
    declaration: Option<bool>,
    lang: Option<usize>,
    /// Each stanza with the keep-alive whitespace sent before it.
    stanzas: Vec<(String, ElementSpec)>,
    end: bool,
}

/// A stream rendered to bytes, with what the decoder must make of it.
struct Rendered {
    bytes: Vec<u8>,
    frames: Vec<Frame>,
    /// Per stanza: its length in bytes and its depth (the stanza itself is depth 1).
    stanza_sizes: Vec<(usize, usize)>,
}

// Strategies.

fn chars(pool: &'static [char], max: usize) -> impl Strategy<Value = String> {
    vec(select(pool), 0..max).prop_map(|chars| chars.into_iter().collect())
}

fn reference() -> impl Strategy<Value = Segment> {
    let style = prop_oneof![
        Just(ReferenceStyle::Named),
        Just(ReferenceStyle::Decimal),
        Just(ReferenceStyle::Hex),
    ];
    (select(REFERENCE_CHARS), style).prop_map(|(c, style)| Segment::Reference(c, style))
}

fn text() -> impl Strategy<Value = Vec<Segment>> {
    let segment = prop_oneof![
        3 => chars(TEXT_CHARS, 12).prop_map(Segment::Plain),
        2 => reference(),
        1 => chars(CDATA_CHARS, 10).prop_map(|s| {
            let mut s = s;
            while s.contains("]]>") {
                s = s.replace("]]>", "]>");
            }
            Segment::CData(s)
        }),
    ];
    vec(segment, 0..5)
}

fn attribute_value() -> impl Strategy<Value = Vec<Segment>> {
    let segment = prop_oneof![
        3 => chars(ATTRIBUTE_CHARS, 10).prop_map(Segment::Plain),
        1 => reference(),
    ];
    vec(segment, 0..4)
}

fn attribute() -> impl Strategy<Value = AttributeSpec> {
    (
        0..ATTRIBUTE_NAMES.len(),
        prop::option::weighted(0.3, any::<Index>()),
        attribute_value(),
        any::<bool>(),
    )
        .prop_map(|(name, prefix, value, double_quoted)| AttributeSpec {
            name,
            prefix,
            value,
            double_quoted,
        })
}

fn ns_choice() -> impl Strategy<Value = NsChoice> {
    prop_oneof![
        4 => Just(NsChoice::Inherit),
        1 => (0..URIS.len()).prop_map(NsChoice::Default),
        1 => (0..PREFIXES.len(), 1..URIS.len()).prop_map(|(p, u)| NsChoice::Prefix(p, u)),
        1 => any::<Index>().prop_map(NsChoice::InScope),
    ]
}

fn element_with(children: BoxedStrategy<Vec<Content>>) -> impl Strategy<Value = ElementSpec> {
    (
        (
            0..ELEMENT_NAMES.len(),
            ns_choice(),
            prop::option::weighted(0.2, (0..PREFIXES.len(), 1..URIS.len())),
            vec(attribute(), 0..4),
            prop::option::weighted(0.2, 0..LANGS.len()),
        ),
        (any::<bool>(), any::<bool>(), any::<bool>()),
        children,
    )
        .prop_map(
            |(
                (name, ns, extra_prefix, attributes, lang),
                (declarations_last, loose, self_closing),
                children,
            )| ElementSpec {
                name,
                ns,
                extra_prefix,
                attributes,
                lang,
                declarations_last,
                loose,
                self_closing,
                children,
            },
        )
}

/// Elements nested up to five deep, with text between the children.
fn element() -> impl Strategy<Value = ElementSpec> {
    let leaf = element_with(vec(text().prop_map(Content::Text), 0..2).boxed());
    leaf.prop_recursive(4, 40, 5, |inner| {
        let content = prop_oneof![
            text().prop_map(Content::Text),
            inner.prop_map(Content::Element),
        ];
        element_with(vec(content, 0..5).boxed())
    })
}

fn stream() -> impl Strategy<Value = StreamSpec> {
    let keep_alive = vec(select(STREAM_LEVEL_WHITESPACE), 0..3).prop_map(|w| w.concat());
    (
        any::<bool>(),
        prop::option::of(any::<bool>()),
        prop::option::of(0..LANGS.len()),
        vec((keep_alive, element()), 1..5),
        any::<bool>(),
    )
        .prop_map(|(bom, declaration, lang, stanzas, end)| StreamSpec {
            bom,
            declaration,
            lang,
            stanzas,
            end,
        })
}

// Rendering: the raw XML and, built independently, the element the decoder must return.

/// Namespace bindings in scope, innermost last.
type Scope = Vec<(Option<String>, String)>;

fn resolve<'a>(scope: &'a Scope, prefix: Option<&str>) -> &'a str {
    scope
        .iter()
        .rev()
        .find(|(p, _)| p.as_deref() == prefix)
        .map_or("", |(_, uri)| uri.as_str())
}

fn reference_text(c: char, style: ReferenceStyle) -> String {
    let named = match c {
        '<' => Some("&lt;"),
        '>' => Some("&gt;"),
        '&' => Some("&amp;"),
        '\'' => Some("&apos;"),
        '"' => Some("&quot;"),
        _ => None,
    };
    match (style, named) {
        (ReferenceStyle::Named, Some(named)) => named.to_owned(),
        (ReferenceStyle::Decimal, _) => format!("&#{};", u32::from(c)),
        // Upper-case hex digits for odd code points, lower-case for even ones.
        _ if u32::from(c) % 2 == 1 => format!("&#x{:X};", u32::from(c)),
        _ => format!("&#x{:x};", u32::from(c)),
    }
}

/// Writes `segments` as content; returns the text they stand for.
fn render_text(segments: &[Segment], out: &mut String) -> String {
    let mut text = String::new();
    for segment in segments {
        match segment {
            Segment::Plain(plain) => {
                out.push_str(plain);
                text.push_str(plain);
            }
            Segment::Reference(c, style) => {
                out.push_str(&reference_text(*c, *style));
                text.push(*c);
            }
            Segment::CData(cdata) => {
                out.push_str("<![CDATA[");
                out.push_str(cdata);
                out.push_str("]]>");
                text.push_str(cdata);
            }
        }
    }
    text
}

/// Writes an attribute value (without quotes); returns the value it stands for.
fn render_value(segments: &[Segment], quote: char, out: &mut String) -> String {
    let mut value = String::new();
    for segment in segments {
        match segment {
            Segment::Plain(plain) | Segment::CData(plain) => {
                for c in plain.chars() {
                    if c == quote {
                        out.push_str(&reference_text(c, ReferenceStyle::Named));
                        value.push(c);
                    } else {
                        out.push(c);
                        // Attribute-value normalization.
                        value.push(if matches!(c, '\t' | '\n') { ' ' } else { c });
                    }
                }
            }
            Segment::Reference(c, style) => {
                out.push_str(&reference_text(*c, *style));
                value.push(*c);
            }
        }
    }
    value
}

/// A literal string as an attribute value, every special character escaped.
fn escaped(value: &str) -> String {
    let segments: Vec<Segment> = value
        .chars()
        .map(|c| match c {
            '<' | '>' | '&' | '\'' | '"' => Segment::Reference(c, ReferenceStyle::Named),
            c => Segment::Plain(c.to_string()),
        })
        .collect();
    let mut out = String::new();
    render_value(&segments, '\'', &mut out);
    out
}

/// Writes `spec` in `scope`; returns the element it stands for and its depth.
fn render_element(spec: &ElementSpec, scope: &Scope, out: &mut String) -> (Element, usize) {
    let name = ELEMENT_NAMES[spec.name];
    let mut declarations: Vec<(Option<&str>, &str)> = Vec::new();
    let mut prefix = None;
    match &spec.ns {
        NsChoice::Inherit | NsChoice::InScope(_) => {}
        NsChoice::Default(uri) => declarations.push((None, URIS[*uri])),
        NsChoice::Prefix(p, uri) => {
            prefix = Some(PREFIXES[*p].to_owned());
            declarations.push((Some(PREFIXES[*p]), URIS[*uri]));
        }
    }
    if let Some((p, uri)) = spec.extra_prefix
        && !declarations.iter().any(|(d, _)| *d == Some(PREFIXES[p]))
    {
        declarations.push((Some(PREFIXES[p]), URIS[uri]));
    }
    let mut inner = scope.clone();
    inner.extend(
        declarations
            .iter()
            .map(|(p, uri)| (p.map(str::to_owned), (*uri).to_owned())),
    );
    let mut in_scope: Vec<&str> = Vec::new();
    for (p, _) in &inner {
        if let Some(p) = p.as_deref().filter(|p| !in_scope.contains(p)) {
            in_scope.push(p);
        }
    }
    if let NsChoice::InScope(index) = &spec.ns {
        prefix = Some((*index.get(&in_scope)).to_owned());
    }
    let element_ns = resolve(&inner, prefix.as_deref()).to_owned();
    let qname = match &prefix {
        Some(prefix) => format!("{prefix}:{name}"),
        None => name.to_owned(),
    };
    let mut element = Element::new(name, element_ns);

    let eq = if spec.loose { " = " } else { "=" };
    let mut declared = String::new();
    for (p, uri) in &declarations {
        match p {
            Some(p) => declared.push_str(&format!(" xmlns:{p}{eq}'{}'", escaped(uri))),
            None => declared.push_str(&format!(" xmlns{eq}'{}'", escaped(uri))),
        }
    }
    let mut attributes = String::new();
    let mut seen: Vec<(Option<String>, &str)> = Vec::new();
    for attribute in &spec.attributes {
        let local = ATTRIBUTE_NAMES[attribute.name];
        let prefix = attribute.prefix.as_ref().map(|index| *index.get(&in_scope));
        let attribute_ns = prefix.map(|p| resolve(&inner, Some(p)).to_owned());
        if seen.contains(&(attribute_ns.clone(), local)) {
            continue;
        }
        seen.push((attribute_ns.clone(), local));
        let quote = if attribute.double_quoted { '"' } else { '\'' };
        attributes.push(' ');
        if let Some(prefix) = prefix {
            attributes.push_str(prefix);
            attributes.push(':');
        }
        attributes.push_str(local);
        attributes.push_str(eq);
        attributes.push(quote);
        let value = render_value(&attribute.value, quote, &mut attributes);
        attributes.push(quote);
        match attribute_ns {
            Some(attribute_ns) => element.set_attr_ns(local, attribute_ns, value),
            None => element.set_attr(local, value),
        }
    }
    if let Some(lang) = spec.lang {
        attributes.push_str(&format!(" xml:lang{eq}\"{}\"", LANGS[lang]));
        element.set_attr_ns("lang", ns::XML, LANGS[lang]);
    }

    out.push('<');
    out.push_str(&qname);
    if spec.declarations_last {
        out.push_str(&attributes);
        out.push_str(&declared);
    } else {
        out.push_str(&declared);
        out.push_str(&attributes);
    }
    let space = if spec.loose { " " } else { "" };
    if spec.children.is_empty() && spec.self_closing {
        out.push_str(space);
        out.push_str("/>");
        return (element, 1);
    }
    out.push_str(space);
    out.push('>');
    let mut depth = 1;
    for child in &spec.children {
        match child {
            Content::Text(segments) => {
                let text = render_text(segments, out);
                element.append_text(&text);
            }
            Content::Element(child) => {
                let (child, child_depth) = render_element(child, &inner, out);
                element.append_child(child);
                depth = depth.max(child_depth + 1);
            }
        }
    }
    out.push_str("</");
    out.push_str(&qname);
    out.push_str(space);
    out.push('>');
    (element, depth)
}

fn render_stream(spec: &StreamSpec) -> Rendered {
    let mut out = String::new();
    if spec.bom {
        out.push('\u{FEFF}');
    }
    match spec.declaration {
        Some(true) => out.push_str("<?xml version='1.0' encoding='UTF-8'?>\n"),
        Some(false) => out.push_str("<?xml version=\"1.0\"?>"),
        None => {}
    }
    out.push_str(&format!(
        "<stream:stream xmlns='{}' xmlns:stream='{}' xmlns:h='{}' from='a&amp;b@example.org' \
         to='example.org' version='1.0'",
        ns::JABBER_CLIENT,
        ns::STREAM,
        escaped(HEADER_URI),
    ));
    if let Some(lang) = spec.lang {
        out.push_str(&format!(" xml:lang='{}'", LANGS[lang]));
    }
    out.push('>');
    let header = StreamHeader {
        from: Some("a&b@example.org".to_owned()),
        to: Some("example.org".to_owned()),
        version: Some("1.0".to_owned()),
        lang: spec.lang.map(|lang| LANGS[lang].to_owned()),
        ..StreamHeader::new(ns::JABBER_CLIENT)
    };
    let scope: Scope = vec![
        (None, ns::JABBER_CLIENT.to_owned()),
        (Some("stream".to_owned()), ns::STREAM.to_owned()),
        (Some("h".to_owned()), HEADER_URI.to_owned()),
    ];
    let mut frames = vec![Frame::StreamHeader(header)];
    let mut stanza_sizes = Vec::new();
    for (keep_alive, stanza) in &spec.stanzas {
        out.push_str(keep_alive);
        let start = out.len();
        let (element, depth) = render_element(stanza, &scope, &mut out);
        stanza_sizes.push((out.len() - start, depth));
        frames.push(Frame::Stanza(element));
    }
    if spec.end {
        out.push_str("\n</stream:stream>\n");
        frames.push(Frame::StreamEnd);
    }
    Rendered {
        bytes: out.into_bytes(),
        frames,
        stanza_sizes,
    }
}

// Decoding.

/// Feeds `pieces` one after the other, draining the frames after each; the frames and the
/// error the stream ended with, if any.
fn decode<'a>(
    pieces: impl IntoIterator<Item = &'a [u8]>,
    limits: Limits,
) -> (Vec<Frame>, Option<StreamError>) {
    let mut decoder = Decoder::new(limits);
    let mut frames = Vec::new();
    for piece in pieces {
        decoder.feed(piece);
        loop {
            match decoder.next() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(error) => {
                    assert_eq!(
                        decoder.next(),
                        Err(error.clone()),
                        "a failed decoder returns the same error again"
                    );
                    return (frames, Some(error));
                }
            }
        }
    }
    (frames, None)
}

/// `input` cut at the points `cuts` designate (sorted; repeated points give empty pieces).
fn split<'a>(input: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
    points.sort_unstable();
    let mut pieces = Vec::with_capacity(points.len() + 1);
    let mut start = 0;
    for point in points {
        pieces.push(&input[start..point]);
        start = point;
    }
    pieces.push(&input[start..]);
    pieces
}

fn stanza(frame: &Frame) -> Option<&Element> {
    match frame {
        Frame::Stanza(element) => Some(element),
        _ => None,
    }
}

// Hostile input.

/// Pieces of XML and of broken UTF-8 for token soup.
const TOKENS: &[&[u8]] = &[
    b"<",
    b">",
    b"/",
    b"'",
    b"\"",
    b"=",
    b" ",
    b"\n",
    b"\r",
    b"&",
    b";",
    b"amp",
    b"lt",
    b"#x41",
    b"#0",
    b"#xD800",
    b"a",
    b"p:",
    b"xmlns",
    b"xmlns:p",
    b"='urn:p'",
    b"<![CDATA[",
    b"]]>",
    b"<!--",
    b"-->",
    b"<?",
    b"?>",
    b"<!DOCTYPE",
    b"<!ENTITY",
    b"</",
    b"/>",
    b"stream:stream",
    b"message",
    b"\xC3",
    b"\xA9",
    b"\xF0\x9F",
    b"\xFF",
    b"\0",
    b"\xEF\xBB\xBF",
];
/// Bytes that mutations insert: mostly markup, some invalid UTF-8.
const MUTATION_BYTES: &[u8] = b"<>/'\"&;!?-[]x :=\n#\xC3\xA9\xFF\0";

const VALID_HEADER: &[u8] = b"<stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

#[derive(Debug, Clone)]
enum Mutation {
    Replace(Index, u8),
    Insert(Index, u8),
    Delete(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let byte = prop_oneof![3 => select(MUTATION_BYTES), 1 => any::<u8>()];
    prop_oneof![
        (any::<Index>(), byte.clone()).prop_map(|(at, b)| Mutation::Replace(at, b)),
        (any::<Index>(), byte).prop_map(|(at, b)| Mutation::Insert(at, b)),
        any::<Index>().prop_map(Mutation::Delete),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        if bytes.is_empty() {
            break;
        }
        match mutation {
            Mutation::Replace(at, b) => {
                let at = at.index(bytes.len());
                bytes[at] = *b;
            }
            Mutation::Insert(at, b) => bytes.insert(at.index(bytes.len() + 1), *b),
            Mutation::Delete(at) => {
                bytes.remove(at.index(bytes.len()));
            }
        }
    }
    bytes
}

fn hostile_input() -> impl Strategy<Value = Vec<u8>> {
    // Mostly inside an open stream, where the stanza scanner and parser are reached;
    // random bytes before a header rarely get past the first byte.
    let prefix = prop_oneof![
        1 => Just(Vec::new()),
        3 => Just(VALID_HEADER.to_vec()),
        2 => Just([VALID_HEADER, b"<message>"].concat()),
    ];
    let body = prop_oneof![
        1 => vec(any::<u8>(), 0..256),
        2 => vec(select(TOKENS), 0..48).prop_map(|tokens| tokens.concat()),
    ];
    prop_oneof![
        1 => (prefix, body).prop_map(|(prefix, body)| [prefix, body].concat()),
        1 => (stream(), vec(mutation(), 1..4))
            .prop_map(|(spec, mutations)| mutate(render_stream(&spec).bytes, &mutations)),
    ]
}

proptest! {
    // Regressions go beside this file (`codec_properties.proptest-regressions`): an
    // integration test has no lib.rs for the default location to be found from.
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::with_cases(256)
    })]

    #[test]
    fn a_generated_stream_gives_the_same_frames_however_it_is_split(
        spec in stream(),
        cuts in vec(any::<Index>(), 1..12),
    ) {
        let rendered = render_stream(&spec);
        let input = rendered.bytes.as_slice();
        let (whole, error) = decode([input], Limits::default());
        prop_assert_eq!(error, None);
        prop_assert_eq!(&whole, &rendered.frames);

        let (pieces, error) = decode(split(input, &cuts), Limits::default());
        prop_assert_eq!(error, None);
        prop_assert_eq!(&pieces, &rendered.frames);

        let (bytes, error) = decode(input.chunks(1), Limits::default());
        prop_assert_eq!(error, None);
        prop_assert_eq!(&bytes, &rendered.frames);
    }

    #[test]
    fn a_parsed_stanza_written_out_and_parsed_again_is_the_same_element(spec in stream()) {
        let rendered = render_stream(&spec);
        let (frames, error) = decode([rendered.bytes.as_slice()], Limits::default());
        prop_assert_eq!(error, None);
        for parsed in frames.iter().filter_map(stanza) {
            // Inside a stream we opened, and as a standalone document (RFC 7395 style)
            // after a header that declares no default namespace.
            let in_stream = {
                let mut bytes = stream_header(&StreamHeader::new(ns::JABBER_CLIENT));
                parsed.write_to(&mut bytes, WriteContext::stream(ns::JABBER_CLIENT));
                bytes
            };
            let standalone = {
                let mut bytes = format!("<stream:stream xmlns:stream='{}'>", ns::STREAM)
                    .into_bytes();
                bytes.extend(parsed.to_bytes(WriteContext::standalone()));
                bytes
            };
            for written in [in_stream, standalone] {
                let (again, error) = decode([written.as_slice()], Limits::default());
                prop_assert_eq!(error, None, "{}", String::from_utf8_lossy(&written));
                prop_assert_eq!(again.get(1).and_then(stanza), Some(parsed));
                prop_assert_eq!(again.len(), 2);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_fail_the_same_way_however_they_are_split(
        input in hostile_input(),
        cuts in vec(any::<Index>(), 1..8),
    ) {
        let (frames, error) = decode([input.as_slice()], Limits::default());
        let shown = String::from_utf8_lossy(&input);
        let (pieces, piece_error) = decode(split(&input, &cuts), Limits::default());
        prop_assert_eq!(&piece_error, &error, "{}", shown);
        prop_assert_eq!(&pieces, &frames, "{}", shown);
        let (bytes, byte_error) = decode(input.chunks(1), Limits::default());
        prop_assert_eq!(&byte_error, &error, "{}", shown);
        prop_assert_eq!(&bytes, &frames, "{}", shown);
    }

    #[test]
    fn a_stanza_over_the_size_limit_is_a_policy_violation_however_it_is_split(
        spec in stream(),
        limit in any::<Index>(),
        cuts in vec(any::<Index>(), 0..8),
    ) {
        let rendered = render_stream(&spec);
        let largest = rendered.stanza_sizes.iter().map(|(len, _)| *len).max().unwrap_or(0);
        // Every stanza is at least `<x/>`, so a limit below the largest exists.
        let max_stanza_bytes = 1 + limit.index(largest - 1);
        let limits = Limits { max_stanza_bytes, ..Limits::default() };
        let accepted = rendered
            .stanza_sizes
            .iter()
            .take_while(|(len, _)| *len <= max_stanza_bytes)
            .count();
        let expected = &rendered.frames[..1 + accepted];
        let input = rendered.bytes.as_slice();
        for (frames, error) in [
            decode([input], limits),
            decode(split(input, &cuts), limits),
            decode(input.chunks(1), limits),
        ] {
            prop_assert_eq!(error.map(|e| e.condition()), Some(Condition::PolicyViolation));
            prop_assert_eq!(frames.as_slice(), expected);
        }
    }

    #[test]
    fn a_stanza_nested_deeper_than_the_limit_is_a_policy_violation_however_it_is_split(
        spec in stream(),
        (outer, inner) in (element(), element()),
        limit in any::<Index>(),
        cuts in vec(any::<Index>(), 0..8),
    ) {
        // One more stanza, with a child, so that some stanza is at least two deep.
        let mut spec = spec;
        let outer = ElementSpec { children: vec![Content::Element(inner)], ..outer };
        spec.stanzas.push(("\n".to_owned(), outer));
        let rendered = render_stream(&spec);
        let deepest = rendered.stanza_sizes.iter().map(|(_, depth)| *depth).max().unwrap_or(0);
        let max_depth = 1 + limit.index(deepest - 1);
        let limits = Limits { max_depth, ..Limits::default() };
        let accepted = rendered
            .stanza_sizes
            .iter()
            .take_while(|(_, depth)| *depth <= max_depth)
            .count();
        let expected = &rendered.frames[..1 + accepted];
        let input = rendered.bytes.as_slice();
        for (frames, error) in [
            decode([input], limits),
            decode(split(input, &cuts), limits),
            decode(input.chunks(1), limits),
        ] {
            prop_assert_eq!(error.map(|e| e.condition()), Some(Condition::PolicyViolation));
            prop_assert_eq!(frames.as_slice(), expected);
        }
    }
}
