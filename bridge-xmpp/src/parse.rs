//! Parsing one complete, bounded piece of XML (a stream header or a whole stanza) with
//! quick-xml, resolving namespaces against the declarations in scope.
//!
//! The [`crate::scan`] step has already found where the piece ends and refused comments,
//! processing instructions and DTDs; this step is the well-formedness check proper:
//! names, attributes, references, characters, matching end tags.

use std::borrow::Cow;

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::QName;
use quick_xml::reader::Reader;

use crate::element::Element;
use crate::error::{Condition, StreamError};
use crate::ns;
use crate::writer::is_xml_char;

/// Namespace bindings in scope: `(prefix, uri)`, `None` being the default namespace.
/// Looked up from the end, so inner declarations shadow outer ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Scope {
    bindings: Vec<(Option<String>, String)>,
}

impl Scope {
    fn resolve(&self, prefix: Option<&str>) -> Option<&str> {
        if prefix == Some("xml") {
            return Some(ns::XML);
        }
        let found = self
            .bindings
            .iter()
            .rev()
            .find(|(p, _)| p.as_deref() == prefix)
            .map(|(_, uri)| uri.as_str());
        match (prefix, found) {
            // No default namespace declared: unprefixed elements are in no namespace.
            (None, None) => Some(""),
            (_, found) => found,
        }
    }

    /// Adds a binding, shadowing earlier ones for the same prefix.
    pub(crate) fn declare(&mut self, prefix: Option<String>, uri: String) {
        self.bindings.push((prefix, uri));
    }

    /// The default namespace in scope.
    pub(crate) fn default_ns(&self) -> &str {
        self.resolve(None).unwrap_or("")
    }
}

/// A start tag parsed and resolved: the element (no children yet), the declarations it
/// made and its raw qualified name (for matching the end tag of a stream).
pub(crate) struct StartTag {
    pub(crate) element: Element,
    pub(crate) declarations: Vec<(Option<String>, String)>,
    pub(crate) qname: String,
}

/// The `<stream:stream …>` tag, `raw` ending with `>` (or `/>`).
pub(crate) fn parse_header(
    raw: &[u8],
    max_attributes: usize,
) -> Result<(StartTag, bool), StreamError> {
    let text = utf8(raw)?;
    let mut reader = Reader::from_str(text);
    let (start, empty) = match reader.read_event() {
        Ok(Event::Start(start)) => (start, false),
        Ok(Event::Empty(start)) => (start, true),
        Ok(_) => return Err(StreamError::not_well_formed("expected the stream header")),
        Err(error) => return Err(quick_xml_error(&error)),
    };
    let tag = start_tag(&start, &Scope::default(), max_attributes)?;
    Ok((tag, empty))
}

/// The XML declaration `<?xml …?>`: only version 1.0 and UTF-8 are accepted (RFC 6120
/// §11.3, §11.6).
pub(crate) fn check_declaration(raw: &[u8]) -> Result<(), StreamError> {
    let text = utf8(raw)?;
    let mut reader = Reader::from_str(text);
    let decl = match reader.read_event() {
        Ok(Event::Decl(decl)) => decl,
        Ok(_) => return Err(StreamError::not_well_formed("malformed XML declaration")),
        Err(error) => return Err(quick_xml_error(&error)),
    };
    match decl.version() {
        Ok(version) if version == "1.0" => {}
        _ => return Err(StreamError::not_well_formed("XML version must be 1.0")),
    }
    match decl.encoding() {
        None => Ok(()),
        Some(Ok(encoding))
            if encoding.eq_ignore_ascii_case("UTF-8") || encoding.eq_ignore_ascii_case("UTF8") =>
        {
            Ok(())
        }
        Some(Ok(_)) => Err(StreamError::new(
            Condition::UnsupportedEncoding,
            "the XML declaration names an encoding other than UTF-8",
        )),
        Some(Err(_)) => Err(StreamError::not_well_formed("malformed XML declaration")),
    }
}

/// One complete top-level element of the stream.
pub(crate) fn parse_stanza(
    raw: &[u8],
    scope: &Scope,
    max_depth: usize,
    max_attributes: usize,
) -> Result<Element, StreamError> {
    let text = utf8(raw)?;
    let mut reader = Reader::from_str(text);
    let config = reader.config_mut();
    config.expand_empty_elements = true;
    config.check_end_names = true;
    config.trim_text_start = false;
    config.trim_text_end = false;
    config.allow_dangling_amp = false;
    config.allow_unmatched_ends = false;

    let mut scope = scope.clone();
    // Per open element: the element and how many bindings it pushed onto `scope`.
    let mut open: Vec<(Element, usize)> = Vec::new();
    loop {
        let event = reader.read_event().map_err(|e| quick_xml_error(&e))?;
        match event {
            Event::Start(start) => {
                if open.len() >= max_depth {
                    return Err(StreamError::policy("stanza nested too deeply"));
                }
                let tag = start_tag(&start, &scope, max_attributes)?;
                let pushed = tag.declarations.len();
                scope.bindings.extend(tag.declarations);
                open.push((tag.element, pushed));
            }
            Event::End(_) => {
                let Some((element, pushed)) = open.pop() else {
                    return Err(StreamError::not_well_formed("unexpected end tag"));
                };
                let keep = scope.bindings.len().saturating_sub(pushed);
                scope.bindings.truncate(keep);
                match open.last_mut() {
                    Some((parent, _)) => {
                        parent.append_child(element);
                    }
                    None => {
                        // The scanner cut the input right after this end tag.
                        return match reader.read_event() {
                            Ok(Event::Eof) => Ok(element),
                            _ => Err(StreamError::not_well_formed("data after the stanza")),
                        };
                    }
                }
            }
            Event::Text(text) => {
                let text = text.xml10_content();
                check_chars(&text)?;
                if text.contains("]]>") {
                    return Err(StreamError::not_well_formed("']]>' in character data"));
                }
                append_text(&mut open, &text)?;
            }
            Event::CData(cdata) => {
                let text = cdata.xml10_content();
                check_chars(&text)?;
                append_text(&mut open, &text)?;
            }
            Event::GeneralRef(reference) => {
                let c = resolve_reference(&reference)?;
                append_text(&mut open, c.encode_utf8(&mut [0; 4]))?;
            }
            Event::Empty(_) => {
                // `expand_empty_elements` turns these into Start + End.
                return Err(StreamError::not_well_formed(
                    "unexpected empty element event",
                ));
            }
            Event::Comment(_) => return Err(StreamError::restricted("comment")),
            Event::PI(_) | Event::Decl(_) => {
                return Err(StreamError::restricted("processing instruction"));
            }
            Event::DocType(_) => return Err(StreamError::restricted("document type declaration")),
            Event::Eof => return Err(StreamError::not_well_formed("unclosed element")),
        }
    }
}

fn append_text(open: &mut [(Element, usize)], text: &str) -> Result<(), StreamError> {
    match open.last_mut() {
        Some((element, _)) => {
            element.append_text(text);
            Ok(())
        }
        None => Err(StreamError::new(
            Condition::BadFormat,
            "character data at stream level",
        )),
    }
}

fn utf8(raw: &[u8]) -> Result<&str, StreamError> {
    std::str::from_utf8(raw).map_err(|_| {
        StreamError::new(
            Condition::UnsupportedEncoding,
            "input is not valid UTF-8 (RFC 6120 §11.6)",
        )
    })
}

fn quick_xml_error(error: &quick_xml::Error) -> StreamError {
    StreamError::not_well_formed(format!("XML syntax error: {error}"))
}

fn check_chars(text: &str) -> Result<(), StreamError> {
    if text.chars().all(is_xml_char) {
        Ok(())
    } else {
        Err(StreamError::not_well_formed("character not allowed in XML"))
    }
}

/// RFC 6120 §11.1: only the five predefined entities and character references.
fn resolve_reference(name: &str) -> Result<char, StreamError> {
    let c = match name {
        "lt" => '<',
        "gt" => '>',
        "amp" => '&',
        "apos" => '\'',
        "quot" => '"',
        _ => {
            let Some(number) = name.strip_prefix('#') else {
                return Err(StreamError::restricted(
                    "entity reference other than the predefined ones",
                ));
            };
            let code = match number.strip_prefix('x') {
                Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    u32::from_str_radix(hex, 16).ok()
                }
                None if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) => {
                    number.parse::<u32>().ok()
                }
                _ => None,
            };
            match code.and_then(char::from_u32) {
                Some(c) if is_xml_char(c) => c,
                _ => return Err(StreamError::not_well_formed("invalid character reference")),
            }
        }
    };
    Ok(c)
}

/// Unescapes an attribute value and applies attribute-value normalization (XML §3.3.3:
/// literal tab, line feed and carriage return become spaces, `\r\n` one space).
fn attribute_value(raw: &str) -> Result<String, StreamError> {
    let mut value = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(index) = rest.find(['&', '<', '\t', '\n', '\r']) {
        value.push_str(&rest[..index]);
        let special = rest.as_bytes()[index];
        rest = &rest[index + 1..];
        match special {
            b'&' => {
                let Some(end) = rest.find(';') else {
                    return Err(StreamError::not_well_formed("unterminated reference"));
                };
                value.push(resolve_reference(&rest[..end])?);
                rest = &rest[end + 1..];
            }
            b'<' => return Err(StreamError::not_well_formed("'<' in an attribute value")),
            b'\r' => {
                value.push(' ');
                rest = rest.strip_prefix('\n').unwrap_or(rest);
            }
            _ => value.push(' '),
        }
    }
    value.push_str(rest);
    check_chars(&value)?;
    Ok(value)
}

/// XML §3.1: attributes are separated by whitespace (quick-xml accepts `a='1'b='2'`).
fn check_attribute_separation(raw: &str) -> Result<(), StreamError> {
    let mut quote = None;
    let mut after_value = false;
    for byte in raw.bytes() {
        match quote {
            Some(q) if byte == q => {
                quote = None;
                after_value = true;
            }
            Some(_) => {}
            None => {
                if after_value && !matches!(byte, b' ' | b'\t' | b'\r' | b'\n' | b'/') {
                    return Err(StreamError::not_well_formed(
                        "attributes not separated by whitespace",
                    ));
                }
                after_value = false;
                if matches!(byte, b'"' | b'\'') {
                    quote = Some(byte);
                }
            }
        }
    }
    Ok(())
}

/// XML §2.3 `Name` characters, approximately: enough to refuse garbage such as quotes,
/// `=`, `&` or a leading digit, without the full Unicode tables.
fn is_ncname(name: &str) -> bool {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    let start_ok = first.is_alphabetic() || first == '_' || !first.is_ascii() && is_xml_char(first);
    start_ok
        && chars.all(|c| {
            c.is_alphanumeric()
                || matches!(c, '-' | '.' | '_' | '\u{B7}')
                || !c.is_ascii() && is_xml_char(c) && !c.is_whitespace()
        })
}

/// Splits a qualified name into `(prefix, local)`, refusing names that are not QNames.
fn split_qname(qname: &str) -> Result<(Option<&str>, &str), StreamError> {
    let (prefix, local) = match qname.split_once(':') {
        Some((prefix, local)) => (Some(prefix), local),
        None => (None, qname),
    };
    if prefix.is_some_and(|p| !is_ncname(p)) || !is_ncname(local) {
        return Err(StreamError::not_well_formed(
            "invalid element or attribute name",
        ));
    }
    Ok((prefix, local))
}

fn bad_prefix(detail: &'static str) -> StreamError {
    StreamError::new(Condition::BadNamespacePrefix, detail)
}

/// Parses the attributes of a start tag, declares its namespaces and resolves its names.
fn start_tag(
    start: &BytesStart<'_>,
    outer: &Scope,
    max_attributes: usize,
) -> Result<StartTag, StreamError> {
    let qname = start.name().into_inner().to_owned();
    check_attribute_separation(start.attributes_raw())?;
    let mut declarations: Vec<(Option<String>, String)> = Vec::new();
    // Attributes other than declarations: (prefix, local, value).
    let mut plain: Vec<(Option<&str>, &str, String)> = Vec::new();
    let raw: Vec<(QName<'_>, Cow<'_, str>)> = {
        let mut attributes = start.attributes();
        attributes.with_checks(true);
        let mut raw = Vec::new();
        for attribute in attributes {
            if raw.len() == max_attributes {
                return Err(StreamError::policy("too many attributes on one element"));
            }
            let attribute = attribute
                .map_err(|e| StreamError::not_well_formed(format!("malformed attribute: {e}")))?;
            raw.push((attribute.key, attribute.value));
        }
        raw
    };
    for (key, value) in &raw {
        let value = attribute_value(value)?;
        let (prefix, local) = split_qname(key.into_inner())?;
        match (prefix, local) {
            (None, "xmlns") => declarations.push((None, value)),
            (Some("xmlns"), "xmlns") => return Err(bad_prefix("the xmlns prefix is reserved")),
            (Some("xmlns"), "xml") if value == ns::XML => {}
            (Some("xmlns"), "xml") => return Err(bad_prefix("the xml prefix is reserved")),
            (Some("xmlns"), _) if value.is_empty() => {
                return Err(bad_prefix("a prefix cannot be bound to no namespace"));
            }
            (Some("xmlns"), _) if value == ns::XML || value == ns::XMLNS => {
                return Err(bad_prefix("a reserved namespace bound to another prefix"));
            }
            (Some("xmlns"), prefix) => declarations.push((Some(prefix.to_owned()), value)),
            (prefix, local) => plain.push((prefix, local, value)),
        }
    }
    if declarations.iter().any(|(_, uri)| uri == ns::XMLNS) {
        return Err(bad_prefix("the xmlns namespace cannot be declared"));
    }
    let mut scope = outer.clone();
    scope.bindings.extend(declarations.iter().cloned());

    let (prefix, local) = split_qname(&qname)?;
    if prefix == Some("xmlns") {
        return Err(bad_prefix("an element cannot use the xmlns prefix"));
    }
    let Some(element_ns) = scope.resolve(prefix) else {
        return Err(bad_prefix("undeclared namespace prefix on an element"));
    };
    let mut element = Element::new(local, element_ns);
    let mut seen: Vec<(Option<&str>, &str)> = Vec::with_capacity(plain.len());
    for (prefix, local, value) in plain {
        let attr_ns = match prefix {
            None => None,
            Some(prefix) => match scope.resolve(Some(prefix)) {
                Some(uri) => Some(uri),
                None => return Err(bad_prefix("undeclared namespace prefix on an attribute")),
            },
        };
        // XML Namespaces §6.3: no two attributes with the same expanded name.
        if seen.contains(&(attr_ns, local)) {
            return Err(StreamError::not_well_formed("duplicate attribute"));
        }
        seen.push((attr_ns, local));
        element.push_attr(local.to_owned(), attr_ns.map(str::to_owned), value);
    }
    Ok(StartTag {
        element,
        declarations,
        qname,
    })
}

/// A standalone XML fragment (an item payload kept as text): one element that declares its
/// own namespaces, under the default depth and attribute limits.
pub(crate) fn parse_fragment(text: &str) -> Result<Element, StreamError> {
    parse_stanza(
        text.as_bytes(),
        &Scope::default(),
        crate::codec::DEFAULT_MAX_DEPTH,
        crate::codec::DEFAULT_MAX_ATTRIBUTES,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_scope() -> Scope {
        Scope {
            bindings: vec![
                (None, ns::JABBER_CLIENT.to_owned()),
                (Some("stream".to_owned()), ns::STREAM.to_owned()),
            ],
        }
    }

    fn parse(xml: &str) -> Result<Element, StreamError> {
        parse_stanza(xml.as_bytes(), &client_scope(), 32, 64)
    }

    fn condition(xml: &str) -> Option<Condition> {
        parse(xml).err().map(|e| e.condition())
    }

    #[test]
    fn the_default_namespace_of_the_stream_applies_to_stanzas() {
        let iq = parse("<iq type='get'><ping xmlns='urn:xmpp:ping'/></iq>");
        let iq = iq.as_ref().map(|e| (e.name(), e.ns()));
        assert_eq!(iq, Ok(("iq", ns::JABBER_CLIENT)));
    }

    #[test]
    fn prefixes_declared_on_the_stream_and_on_the_stanza_resolve() {
        let features = parse(
            "<stream:features><p:x xmlns:p='urn:p' p:a='1' b='2'><p:y/><z/></p:x>\
             </stream:features>",
        );
        let Ok(features) = features else {
            panic!("parse failed: {features:?}");
        };
        assert!(features.is("features", ns::STREAM));
        let x = features.get_child("x", "urn:p");
        assert_eq!(x.and_then(|x| x.attr_ns("a", "urn:p")), Some("1"));
        assert_eq!(x.and_then(|x| x.attr("b")), Some("2"));
        assert_eq!(x.and_then(|x| x.attr("a")), None);
        assert!(x.is_some_and(|x| x.has_child("y", "urn:p")));
        assert!(x.is_some_and(|x| x.has_child("z", ns::JABBER_CLIENT)));
    }

    #[test]
    fn an_empty_default_namespace_declaration_undeclares_it() {
        let x = parse("<x><y xmlns=''/></x>");
        assert_eq!(
            x.ok()
                .and_then(|x| x.get_child("y", "").map(|y| y.ns().to_owned())),
            Some(String::new())
        );
    }

    #[test]
    fn references_and_cdata_become_text_and_line_ends_are_normalized() {
        let body = parse("<body>a &lt;&#x41;&#66;&amp;<![CDATA[<&>]]>\r\nz\r</body>");
        assert_eq!(body.map(|b| b.text()), Ok("a <AB&<&>\nz\n".to_owned()));
    }

    #[test]
    fn attribute_values_are_unescaped_and_normalized() {
        let x = parse("<x a='1&amp;2&#x9;&#xA;' b=\"t\tl\nc\r\nd\" c='&quot;&apos;'/>");
        let Ok(x) = x else { panic!("{x:?}") };
        assert_eq!(x.attr("a"), Some("1&2\t\n"));
        assert_eq!(x.attr("b"), Some("t l c d"));
        assert_eq!(x.attr("c"), Some("\"'"));
    }

    #[test]
    fn undeclared_prefixes_are_refused() {
        assert_eq!(condition("<foo:bar/>"), Some(Condition::BadNamespacePrefix));
        assert_eq!(
            condition("<x foo:a='1'/>"),
            Some(Condition::BadNamespacePrefix)
        );
        assert_eq!(
            condition("<x><p:y xmlns:p='urn:p'/><p:z/></x>"),
            Some(Condition::BadNamespacePrefix)
        );
    }

    #[test]
    fn misuse_of_reserved_prefixes_is_refused() {
        for xml in [
            "<x xmlns:xml='urn:other'/>",
            "<x xmlns:xmlns='urn:other'/>",
            "<x xmlns:p=''/>",
            "<x xmlns:p='http://www.w3.org/XML/1998/namespace'/>",
            "<xmlns:x/>",
        ] {
            assert_eq!(condition(xml), Some(Condition::BadNamespacePrefix), "{xml}");
        }
        assert!(parse("<x xmlns:xml='http://www.w3.org/XML/1998/namespace'/>").is_ok());
    }

    #[test]
    fn duplicate_attributes_are_refused_also_through_different_prefixes() {
        assert_eq!(
            condition("<x a='1' a='2'/>"),
            Some(Condition::NotWellFormed)
        );
        assert_eq!(
            condition("<x xmlns:p='urn:p' xmlns:q='urn:p' p:a='1' q:a='2'/>"),
            Some(Condition::NotWellFormed)
        );
    }

    #[test]
    fn entities_other_than_the_predefined_ones_are_restricted() {
        assert_eq!(condition("<x>&lol9;</x>"), Some(Condition::RestrictedXml));
        assert_eq!(condition("<x a='&ent;'/>"), Some(Condition::RestrictedXml));
    }

    #[test]
    fn invalid_characters_and_character_references_are_refused() {
        for xml in [
            "<x>&#0;</x>",
            "<x>&#x1;</x>",
            "<x>&#xFFFE;</x>",
            "<x>&#xD800;</x>",
            "<x>&#;</x>",
            "<x>&#x;</x>",
            "<x>&#12a;</x>",
            "<x>&#99999999999;</x>",
            "<x>\u{1}</x>",
            "<x a='\u{8}'/>",
            "<x a='&#0;'/>",
        ] {
            assert_eq!(condition(xml), Some(Condition::NotWellFormed), "{xml:?}");
        }
    }

    #[test]
    fn malformed_markup_is_not_well_formed() {
        for xml in [
            "<a><b></a></b>",
            "<a></b>",
            "<a>x & y</a>",
            "<a b='<'/>",
            "<a b='1'c='2'/>",
            "<1a/>",
            "<a b/>",
            "<a>]]></a>",
            "<a:b:c xmlns:a='urn:a'/>",
        ] {
            assert_eq!(condition(xml), Some(Condition::NotWellFormed), "{xml:?}");
        }
    }

    #[test]
    fn the_attribute_limit_counts_declarations_too() {
        let attrs: String = (0..64).map(|i| format!(" a{i}='v'")).collect();
        assert!(parse(&format!("<x{attrs}/>")).is_ok());
        assert_eq!(
            condition(&format!("<x xmlns:p='urn:p'{attrs}/>")),
            Some(Condition::PolicyViolation)
        );
    }

    #[test]
    fn the_depth_limit_is_enforced() {
        let ok = format!("{}{}", "<a>".repeat(32), "</a>".repeat(32));
        assert!(parse(&ok).is_ok());
        let deep = format!("{}{}", "<a>".repeat(33), "</a>".repeat(33));
        assert_eq!(condition(&deep), Some(Condition::PolicyViolation));
    }

    #[test]
    fn declarations_other_than_utf_8_are_refused() {
        assert!(check_declaration(b"<?xml version='1.0'?>").is_ok());
        assert!(check_declaration(b"<?xml version=\"1.0\" encoding=\"utf-8\"?>").is_ok());
        assert_eq!(
            check_declaration(b"<?xml version='1.0' encoding='ISO-8859-1'?>")
                .err()
                .map(|e| e.condition()),
            Some(Condition::UnsupportedEncoding)
        );
        assert_eq!(
            check_declaration(b"<?xml version='1.1'?>")
                .err()
                .map(|e| e.condition()),
            Some(Condition::NotWellFormed)
        );
    }
}
