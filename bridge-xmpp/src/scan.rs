//! Finding where a top-level element ends, one byte at a time and resumable, so that the
//! decoder neither waits for `</stream:stream>` nor rescans a growing stanza.
//!
//! The scanner only tracks enough of XML to count depth: start tags (with quoted attribute
//! values, so a `>` inside quotes does not end the tag), `/>`, end tags and CDATA sections.
//! It refuses what RFC 6120 §11.1 restricts (comments, processing instructions, DTDs and
//! other markup declarations) as soon as it sees them, and enforces the size and depth
//! limits while the element is still incomplete. Everything else is checked when the
//! complete element is parsed.

use crate::error::StreamError;

/// Result of scanning more bytes of an element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scan {
    /// The element is not complete yet; feed more bytes.
    Incomplete,
    /// The element is complete and is this many bytes long.
    Complete(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Character data (or, before the first byte, nothing).
    Content,
    /// Just after `<`.
    TagOpen,
    /// Inside a start tag; `quote` is the open quote of an attribute value, `slash` whether
    /// the last byte outside quotes was `/`.
    StartTag { quote: Option<u8>, slash: bool },
    /// Inside an end tag.
    EndTag,
    /// After `<!`, having matched this many bytes of `[CDATA[`.
    Bang { matched: usize },
    /// Inside a CDATA section, having seen this many `]` in a row (at most 2 counted).
    CData { brackets: usize },
}

const CDATA_OPEN: &[u8] = b"[CDATA[";

/// Scans one top-level element whose first byte is `<`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scanner {
    /// Bytes of the element already scanned.
    scanned: usize,
    /// Elements open at `scanned`.
    depth: usize,
    state: State,
}

impl Scanner {
    pub(crate) fn new() -> Self {
        Self {
            scanned: 0,
            depth: 0,
            state: State::Content,
        }
    }

    /// Continues scanning; `element` holds all bytes of the element received so far, from
    /// its `<` on (the same prefix as on earlier calls, possibly longer).
    pub(crate) fn scan(
        &mut self,
        element: &[u8],
        max_bytes: usize,
        max_depth: usize,
    ) -> Result<Scan, StreamError> {
        let end = element.len().min(max_bytes);
        while self.scanned < end {
            let byte = element[self.scanned];
            self.scanned += 1;
            if self.step(byte, max_depth)? {
                return Ok(Scan::Complete(self.scanned));
            }
        }
        if self.scanned >= max_bytes {
            return Err(StreamError::policy(format!(
                "stanza larger than {max_bytes} bytes"
            )));
        }
        Ok(Scan::Incomplete)
    }

    /// Consumes one byte; returns whether the top-level element just ended.
    fn step(&mut self, byte: u8, max_depth: usize) -> Result<bool, StreamError> {
        self.state = match self.state {
            State::Content => match byte {
                b'<' => State::TagOpen,
                _ => State::Content,
            },
            State::TagOpen => match byte {
                b'/' => State::EndTag,
                b'!' => State::Bang { matched: 0 },
                b'?' => return Err(StreamError::restricted("processing instruction")),
                _ => State::StartTag {
                    quote: None,
                    slash: false,
                },
            },
            State::StartTag {
                quote: Some(quote),
                slash,
            } => State::StartTag {
                quote: (byte != quote).then_some(quote),
                slash,
            },
            State::StartTag { quote: None, slash } => match byte {
                b'"' | b'\'' => State::StartTag {
                    quote: Some(byte),
                    slash: false,
                },
                b'>' if slash => {
                    if self.depth == 0 {
                        self.state = State::Content;
                        return Ok(true);
                    }
                    State::Content
                }
                b'>' => {
                    self.depth += 1;
                    if self.depth > max_depth {
                        return Err(StreamError::policy("stanza nested too deeply"));
                    }
                    State::Content
                }
                _ => State::StartTag {
                    quote: None,
                    slash: byte == b'/',
                },
            },
            State::EndTag => match byte {
                b'>' => {
                    let Some(depth) = self.depth.checked_sub(1) else {
                        return Err(StreamError::not_well_formed("unexpected end tag"));
                    };
                    self.depth = depth;
                    self.state = State::Content;
                    return Ok(depth == 0);
                }
                _ => State::EndTag,
            },
            State::Bang { matched } => {
                if CDATA_OPEN.get(matched) == Some(&byte) {
                    if matched + 1 == CDATA_OPEN.len() {
                        State::CData { brackets: 0 }
                    } else {
                        State::Bang {
                            matched: matched + 1,
                        }
                    }
                } else if matched > 0 {
                    return Err(StreamError::not_well_formed("malformed CDATA section"));
                } else if byte == b'-' {
                    return Err(StreamError::restricted("comment"));
                } else {
                    return Err(StreamError::restricted(
                        "document type or markup declaration",
                    ));
                }
            }
            State::CData { brackets } => match byte {
                b']' => State::CData {
                    brackets: (brackets + 1).min(2),
                },
                b'>' if brackets == 2 => State::Content,
                _ => State::CData { brackets: 0 },
            },
        };
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Condition;

    /// Scans `input` fed in pieces of `step` bytes.
    fn scan_in_steps(input: &[u8], step: usize) -> Result<Scan, StreamError> {
        let mut scanner = Scanner::new();
        let mut fed = 0;
        loop {
            fed = (fed + step).min(input.len());
            match scanner.scan(&input[..fed], 1024, 8)? {
                Scan::Incomplete if fed == input.len() => return Ok(Scan::Incomplete),
                Scan::Incomplete => {}
                complete => return Ok(complete),
            }
        }
    }

    #[test]
    fn the_end_of_an_element_is_found_however_the_input_is_split() {
        let cases: [(&str, usize); 7] = [
            ("<a/>", 4),
            ("<a b='/>'/>rest", 11),
            ("<a b=\"x'>\">t>ext</a>rest", 20),
            ("<a><b/><c></c></a><d/>", 18),
            ("<a><![CDATA[</a>]]]></a>", 24),
            ("<a x='1' / ></a>", 16),
            ("<a><b>text</b></a >", 19),
        ];
        for (input, expected) in cases {
            for step in 1..=input.len() {
                assert_eq!(
                    scan_in_steps(input.as_bytes(), step),
                    Ok(Scan::Complete(expected)),
                    "{input} in steps of {step}"
                );
            }
        }
    }

    #[test]
    fn an_unfinished_element_is_incomplete() {
        for input in [
            "<a",
            "<a b='>'",
            "<a>",
            "<a><b/>",
            "<a><![CDATA[</a>]]",
            "<a></a",
        ] {
            assert_eq!(scan_in_steps(input.as_bytes(), 1), Ok(Scan::Incomplete));
        }
    }

    #[test]
    fn restricted_markup_is_refused_as_soon_as_it_is_recognized() {
        for input in ["<a><!--", "<a><?pi", "<a><!DOCTYPE", "<a><!ENTITY"] {
            let result = scan_in_steps(input.as_bytes(), 1);
            assert_eq!(
                result.map_err(|e| e.condition()),
                Err(Condition::RestrictedXml),
                "{input}"
            );
        }
        assert_eq!(
            scan_in_steps(b"<a><![CDATX", 1).map_err(|e| e.condition()),
            Err(Condition::NotWellFormed)
        );
    }

    #[test]
    fn size_and_depth_limits_are_enforced_before_the_element_ends() {
        let mut scanner = Scanner::new();
        let big = vec![b'x'; 2000];
        let mut input = b"<a>".to_vec();
        input.extend_from_slice(&big);
        assert_eq!(
            scanner.scan(&input, 1024, 8).map_err(|e| e.condition()),
            Err(Condition::PolicyViolation)
        );
        let exact = format!("<a>{}</a>", "x".repeat(1024 - 7));
        assert_eq!(
            Scanner::new().scan(exact.as_bytes(), 1024, 8),
            Ok(Scan::Complete(1024))
        );
        let deep = "<a>".repeat(9);
        assert_eq!(
            scan_in_steps(deep.as_bytes(), 1).map_err(|e| e.condition()),
            Err(Condition::PolicyViolation)
        );
        assert_eq!(
            scan_in_steps("<a>".repeat(8).as_bytes(), 1),
            Ok(Scan::Incomplete)
        );
    }
}
