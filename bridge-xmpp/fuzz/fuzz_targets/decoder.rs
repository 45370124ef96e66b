//! Fuzzes the sans-IO stream decoder.
//!
//! Input: two control bytes, then the stream. The control bytes choose where the stream is
//! cut in two, the size of the small chunks it is also fed in, and whether small limits
//! are in force (so the size, depth and attribute limits are reached often). Checked:
//!
//! - nothing panics;
//! - fed at once, cut in two and fed in chunks, the stream gives the same frames and the
//!   same stream error (the decoder decides on complete prefixes only);
//! - a failed decoder returns the same error again;
//! - every stanza decoded, written out again ([`Element::write_to`], standalone), decodes
//!   to an equal element.
#![no_main]

use juxta_bridge_xmpp::{Decoder, Element, Frame, Limits, StreamError, WriteContext};
use libfuzzer_sys::fuzz_target;

/// Limits small enough for the fuzzer to cross each of them.
const SMALL: Limits = Limits {
    max_stanza_bytes: 512,
    max_depth: 4,
    max_attributes: 4,
    max_header_bytes: 256,
};

/// For reading back what the writer produced: it may add namespace declarations and
/// escapes, so the original limits do not apply.
const GENEROUS: Limits = Limits {
    max_stanza_bytes: 1 << 24,
    max_depth: 1 << 16,
    max_attributes: 1 << 16,
    max_header_bytes: 1 << 16,
};

fuzz_target!(|data: &[u8]| {
    let [a, b, input @ ..] = data else {
        return;
    };
    let control = usize::from(u16::from_le_bytes([*a, *b]));
    let limits = if a & 1 == 1 { SMALL } else { Limits::default() };
    let cut = control % (input.len() + 1);
    let chunk = 1 + usize::from(b >> 4);

    let whole = decode([input], limits);
    let halves = decode([&input[..cut], &input[cut..]], limits);
    assert_eq!(halves, whole, "cut at {cut}");
    let chunks = decode(input.chunks(chunk), limits);
    assert_eq!(chunks, whole, "chunks of {chunk}");

    for frame in &whole.0 {
        if let Frame::Stanza(stanza) = frame {
            round_trip(stanza);
        }
    }
});

/// Feeds `pieces` one after the other, draining the frames after each.
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
                    assert_eq!(decoder.next(), Err(error.clone()));
                    return (frames, Some(error));
                }
            }
        }
    }
    (frames, None)
}

fn round_trip(stanza: &Element) {
    let mut written = b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>".to_vec();
    stanza.write_to(&mut written, WriteContext::standalone());
    let (frames, error) = decode([written.as_slice()], GENEROUS);
    assert_eq!(error, None, "{}", String::from_utf8_lossy(&written));
    match frames.as_slice() {
        [Frame::StreamHeader(_), Frame::Stanza(again)] => {
            assert_eq!(again, stanza, "{}", String::from_utf8_lossy(&written));
        }
        other => panic!("{other:?} from {}", String::from_utf8_lossy(&written)),
    }
}
