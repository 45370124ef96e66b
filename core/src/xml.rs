//! The check an XML payload must pass before it is stored: exactly one well-formed element,
//! UTF-8, with no DTD, processing instruction or entity other than the predefined ones and
//! character references (RFC 6120 §11.1 restricts XMPP's XML the same way).

use quick_xml::events::Event as XmlEvent;
use quick_xml::reader::Reader;

use crate::error::Error;

/// Deepest nesting accepted in a payload.
const MAX_DEPTH: usize = 64;

/// Checks that `bytes` is exactly one well-formed XML element.
pub(crate) fn check_single_element(bytes: &[u8]) -> Result<(), Error> {
    let bad = |why: String| Err(Error::InvalidPayload(format!("xml: {why}")));
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(_) => return bad("not UTF-8".into()),
    };
    let mut reader = Reader::from_str(text);
    reader.config_mut().check_end_names = true;
    let mut depth = 0usize;
    let mut roots = 0usize;
    loop {
        let ev = match reader.read_event() {
            Ok(ev) => ev,
            Err(e) => return bad(e.to_string()),
        };
        match ev {
            XmlEvent::Start(_) => {
                if depth == 0 {
                    roots += 1;
                }
                depth += 1;
                if depth > MAX_DEPTH {
                    return bad(format!("nested deeper than {MAX_DEPTH}"));
                }
            }
            XmlEvent::End(_) => depth = depth.saturating_sub(1),
            XmlEvent::Empty(_) => {
                if depth == 0 {
                    roots += 1;
                }
            }
            XmlEvent::Text(t) => {
                if depth == 0 && !AsRef::<str>::as_ref(&t).chars().all(char::is_whitespace) {
                    return bad("text outside the element".into());
                }
            }
            XmlEvent::GeneralRef(r) => {
                let name: &str = r.as_ref();
                let predefined = matches!(name, "lt" | "gt" | "amp" | "apos" | "quot");
                if !predefined && !name.starts_with('#') {
                    return bad(format!("undeclared entity &{name};"));
                }
                if depth == 0 {
                    return bad("text outside the element".into());
                }
            }
            XmlEvent::CData(_) | XmlEvent::Comment(_) => {}
            XmlEvent::Decl(_) => {}
            XmlEvent::DocType(_) => return bad("DTDs are not allowed".into()),
            XmlEvent::PI(_) => return bad("processing instructions are not allowed".into()),
            XmlEvent::Eof => break,
        }
        if roots > 1 {
            return bad("more than one root element".into());
        }
    }
    if depth != 0 {
        return bad("unclosed element".into());
    }
    if roots != 1 {
        return bad("no element".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_one_element_and_refuses_everything_else() {
        for ok in [
            "<a/>",
            "<entry xmlns='urn:x'><t>1 &amp; 2 &#x41;</t></entry>",
            "  <a>x</a>\n",
        ] {
            assert!(check_single_element(ok.as_bytes()).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "text",
            "<a>",
            "<a></b>",
            "<a/><b/>",
            "<!DOCTYPE lol [<!ENTITY a 'aaa'>]><a>&a;</a>",
            "<a>&lol;</a>",
            "<?pi x?><a/>",
            "<a/>tail",
        ] {
            assert!(check_single_element(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(check_single_element(&[0x3c, 0x61, 0xff, 0x2f, 0x3e]).is_err());
    }
}
