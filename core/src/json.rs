//! The JSON forms of events and items that every HTTP-facing surface (WebSocket, SSE, REST,
//! the edge peer's output) shares. Written by hand around the payload, which is spliced in as
//! it was stored: JSON payloads are never parsed again on the way out.

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};

use crate::model::{Change, ContentType, Event, Item, Offset};
use crate::time;

/// `{"type":"event","node","offset","epoch","kind","item"?}`.
pub(crate) fn event(ev: &Event) -> Bytes {
    let extra = match &ev.change {
        Change::Published(item) => item.payload.len() + 160,
        _ => 64,
    };
    let mut b = BytesMut::with_capacity(96 + ev.node.as_str().len() + extra).writer();
    let w = &mut b;
    raw(w, "{\"type\":\"event\",\"node\":");
    string(w, ev.node.as_str());
    raw(w, ",\"offset\":");
    raw(w, itoa(ev.offset).as_str());
    raw(w, ",\"epoch\":\"");
    raw(w, &ev.epoch.to_string());
    raw(w, "\",\"kind\":\"");
    raw(w, ev.kind().as_str());
    raw(w, "\"");
    match &ev.change {
        Change::Published(item) => {
            raw(w, ",\"item\":");
            write_item(w, item, ev.offset);
        }
        Change::Retracted(id) => {
            raw(w, ",\"item\":{\"id\":");
            string(w, id.as_str());
            raw(w, "}");
        }
        Change::Purged | Change::Deleted => {}
    }
    raw(w, "}");
    b.into_inner().freeze()
}

/// `id: <epoch>:<offset>\nevent: <kind>\ndata: <json>\n\n`. A JSON payload published
/// pretty-printed may contain line breaks; each line becomes its own `data:` line, which an
/// EventSource joins back with `\n` (HTML Living Standard §9.2.6).
pub(crate) fn sse_frame(ev: &Event) -> Bytes {
    let json = ev.json();
    let mut b = BytesMut::with_capacity(json.len() + 64);
    b.put_slice(
        format!(
            "id: {}:{}\nevent: {}\n",
            ev.epoch,
            ev.offset,
            ev.kind().as_str()
        )
        .as_bytes(),
    );
    for line in json.split(|&c| c == b'\n') {
        b.put_slice(b"data: ");
        b.put_slice(line.strip_suffix(b"\r").unwrap_or(line));
        b.put_slice(b"\n");
    }
    b.put_slice(b"\n");
    b.freeze()
}

/// A complete unmasked WebSocket text frame (RFC 6455 §5.2) around `payload`, which must be
/// UTF-8. Servers never mask, so the frame is the same for every recipient.
pub fn ws_text_frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 10);
    b.put_u8(0x81);
    match payload.len() {
        n @ 0..=125 => b.put_u8(n as u8),
        n @ 126..=0xffff => {
            b.put_u8(126);
            b.put_u16(n as u16);
        }
        n => {
            b.put_u8(127);
            b.put_u64(n as u64);
        }
    }
    b.put_slice(payload);
    b.freeze()
}

/// `{"id","offset","payload"|"xml"|"data","publisher","published_at"}`.
pub fn item(item: &Item, offset: Offset) -> Bytes {
    let mut b = BytesMut::with_capacity(item.payload.len() + 160).writer();
    write_item(&mut b, item, offset);
    b.into_inner().freeze()
}

fn write_item(w: &mut impl std::io::Write, item: &Item, offset: Offset) {
    raw(w, "{\"id\":");
    string(w, item.id.as_str());
    raw(w, ",\"offset\":");
    raw(w, itoa(offset).as_str());
    match item.payload.content_type {
        ContentType::Json => {
            raw(w, ",\"payload\":");
            let _ = w.write_all(&item.payload.bytes);
        }
        ContentType::Xml => {
            raw(w, ",\"xml\":");
            // Stored XML passed the UTF-8 check at publish.
            string(w, &String::from_utf8_lossy(&item.payload.bytes));
        }
        ContentType::Binary => {
            raw(
                w,
                ",\"content_type\":\"application/octet-stream\",\"data\":\"",
            );
            raw(
                w,
                &base64::engine::general_purpose::STANDARD.encode(&item.payload.bytes),
            );
            raw(w, "\"");
        }
    }
    raw(w, ",\"publisher\":");
    string(w, &item.publisher);
    raw(w, ",\"published_at\":\"");
    raw(w, &time::rfc3339(item.published_at));
    raw(w, "\"}");
}

fn raw(w: &mut impl std::io::Write, s: &str) {
    // Writing into memory cannot fail.
    let _ = w.write_all(s.as_bytes());
}

fn string(w: &mut impl std::io::Write, s: &str) {
    let _ = serde_json::to_writer(w, s);
}

fn itoa(n: u64) -> String {
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Epoch, ItemId, NodeName, Origin, Payload, Record};

    fn published(payload: Payload) -> Event {
        let item = Item {
            id: ItemId::new("i\"1").expect("id"),
            payload,
            publisher: "alice".into(),
            published_at: 0,
        };
        Event::new(
            NodeName::new("n/1").expect("name"),
            Epoch(1),
            Record {
                offset: 7,
                change: Change::Published(item),
                at: 0,
            },
            Origin::Http,
        )
    }

    #[test]
    fn event_json_is_valid_and_carries_the_payload_unchanged() {
        let ev = published(Payload::json(&br#"{"t": [1, 2]}"#[..]).expect("json"));
        let v: serde_json::Value = serde_json::from_slice(ev.json()).expect("valid JSON");
        assert_eq!(v["type"], "event");
        assert_eq!(v["node"], "n/1");
        assert_eq!(v["offset"], 7);
        assert_eq!(v["epoch"], "0000000000000001");
        assert_eq!(v["kind"], "published");
        assert_eq!(v["item"]["id"], "i\"1");
        assert_eq!(v["item"]["payload"]["t"][1], 2);
        assert_eq!(v["item"]["published_at"], "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn sse_frames_split_multi_line_json_into_data_lines() {
        let ev = published(Payload::json(&b"{\n \"a\": 1\r\n}"[..]).expect("json"));
        let frame = String::from_utf8(ev.sse_frame().to_vec()).expect("utf-8");
        assert!(
            frame.starts_with("id: 0000000000000001:7\nevent: published\ndata: {"),
            "{frame}"
        );
        assert!(frame.ends_with("}\n\n"), "{frame}");
        assert_eq!(frame.matches("\ndata: ").count(), 3, "{frame}");
        let data: String = frame
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect::<Vec<_>>()
            .join("\n");
        let v: serde_json::Value = serde_json::from_str(&data).expect("joined data is the JSON");
        assert_eq!(v["item"]["payload"]["a"], 1);
    }

    #[test]
    fn websocket_frames_use_the_shortest_length_encoding() {
        let f = ws_text_frame(b"hi");
        assert_eq!(&f[..], &[0x81, 2, b'h', b'i']);
        let f = ws_text_frame(&[b'a'; 126]);
        assert_eq!(&f[..4], &[0x81, 126, 0, 126]);
        assert_eq!(f.len(), 4 + 126);
        let f = ws_text_frame(&vec![b'a'; 70_000]);
        assert_eq!(&f[..2], &[0x81, 127]);
        assert_eq!(
            u64::from_be_bytes(f[2..10].try_into().expect("8 bytes")),
            70_000
        );
    }

    #[test]
    fn xml_and_binary_payloads_become_strings() {
        let ev = published(Payload::xml(&b"<a x='\"'>&amp;</a>"[..]).expect("xml"));
        let v: serde_json::Value = serde_json::from_slice(ev.json()).expect("valid JSON");
        assert_eq!(v["item"]["xml"], "<a x='\"'>&amp;</a>");
        let ev = published(Payload::binary(vec![0u8, 255]));
        let v: serde_json::Value = serde_json::from_slice(ev.json()).expect("valid JSON");
        assert_eq!(v["item"]["data"], "AP8=");
    }
}
