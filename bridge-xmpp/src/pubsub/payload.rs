//! Item payloads between the bus and XMPP (DESIGN.md, payload mapping): JSON travels as a
//! XEP-0335 `<json xmlns='urn:xmpp:json:0'>` container, XML passes through as the item's
//! child element, other bytes are base64 in `<data xmlns='urn:xmpp:juxta:binary:0'>`.

use base64::Engine as _;
use juxta_core::{ContentType, Payload};

use crate::element::Element;
use crate::ns;
use crate::parse::parse_fragment;
use crate::writer::WriteContext;

/// The element that carries `payload` inside `<item/>`. `None` if stored XML does not
/// parse (it was checked when published, so only a damaged store gets here).
pub(crate) fn to_element(payload: &Payload) -> Option<Element> {
    match payload.content_type {
        ContentType::Json => {
            let text = std::str::from_utf8(&payload.bytes).ok()?;
            Some(Element::builder("json", ns::JSON).append(text).build())
        }
        ContentType::Xml => {
            let text = std::str::from_utf8(&payload.bytes).ok()?;
            parse_fragment(text).ok()
        }
        ContentType::Binary => Some(
            Element::builder("data", ns::JUXTA_BINARY)
                .append(base64::engine::general_purpose::STANDARD.encode(&payload.bytes))
                .build(),
        ),
    }
}

/// The payload an `<item/>`'s child carries; an error message when it is not acceptable
/// (invalid JSON in a XEP-0335 container, bad base64).
pub(crate) fn from_element(element: &Element) -> Result<Payload, String> {
    if element.is("json", ns::JSON) {
        Payload::json(element.text()).map_err(|e| e.to_string())
    } else if element.is("data", ns::JUXTA_BINARY) {
        base64::engine::general_purpose::STANDARD
            .decode(element.text().trim())
            .map(Payload::binary)
            .map_err(|e| format!("bad base64: {e}"))
    } else if element.ns().is_empty() {
        Err("an item payload must be in a namespace".into())
    } else {
        Payload::xml(element.to_bytes(WriteContext::standalone())).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_of_each_kind_survive_the_trip_to_xmpp_and_back() {
        for p in [
            Payload::json(&br#"{"t":21.5,"s":"<&>"}"#[..]).expect("json"),
            Payload::xml(&b"<entry xmlns='urn:x'><t a='1'>hi &amp; bye</t></entry>"[..])
                .expect("xml"),
            Payload::binary(&b"\x00\x01\xff"[..]),
        ] {
            let el = to_element(&p).expect("converts");
            let back = from_element(&el).expect("converts back");
            assert_eq!(back.content_type, p.content_type);
            if p.content_type == ContentType::Xml {
                assert_eq!(to_element(&back), Some(el), "same XML tree");
            } else {
                assert_eq!(back.bytes, p.bytes);
            }
        }
        let bad = Element::builder("json", ns::JSON).append("{").build();
        assert!(from_element(&bad).is_err());
        assert!(from_element(&Element::new("x", "")).is_err());
    }
}
