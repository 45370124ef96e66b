//! Binary encoding of history records and idempotency entries for the file store.
//!
//! Record: `kind:u8 at:u64` then, for a publish, `id_len:u16 id ctype:u8 publisher_len:u16
//! publisher payload…`; for a retraction, `id_len:u16 id`. Integers are little-endian.
//! Version 0 is implied by the kind byte's high bits being zero.

use std::sync::Arc;

use bytes::Bytes;

use crate::error::Error;
use crate::model::{Change, ContentType, Epoch, Item, ItemId, Offset, Payload, Record};

const PUBLISHED: u8 = 1;
const RETRACTED: u8 = 2;
const PURGED: u8 = 3;

pub(crate) fn encode_record(r: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    match &r.change {
        Change::Published(item) => {
            out.push(PUBLISHED);
            out.extend_from_slice(&r.at.to_le_bytes());
            put_str(&mut out, item.id.as_str());
            out.push(item.payload.content_type.code());
            put_str(&mut out, &item.publisher);
            out.extend_from_slice(&item.payload.bytes);
        }
        Change::Retracted(id) => {
            out.push(RETRACTED);
            out.extend_from_slice(&r.at.to_le_bytes());
            put_str(&mut out, id.as_str());
        }
        // Deletions are never stored: the node's history goes with it.
        Change::Purged | Change::Deleted => {
            out.push(PURGED);
            out.extend_from_slice(&r.at.to_le_bytes());
        }
    }
    out
}

pub(crate) fn decode_record(offset: Offset, b: &[u8]) -> Result<Record, Error> {
    let mut c = Cursor { b, pos: 0 };
    let kind = c.u8()?;
    let at = c.u64()?;
    let change = match kind {
        PUBLISHED => {
            let id = ItemId::new(c.str()?)?;
            let ctype = ContentType::from_code(c.u8()?).ok_or_else(corrupt)?;
            let publisher: Arc<str> = Arc::from(c.str()?);
            let payload = Payload {
                content_type: ctype,
                bytes: Bytes::copy_from_slice(c.rest()),
            };
            Change::Published(Item {
                id,
                payload,
                publisher,
                published_at: at,
            })
        }
        RETRACTED => Change::Retracted(ItemId::new(c.str()?)?),
        PURGED => Change::Purged,
        _ => return Err(corrupt()),
    };
    Ok(Record { offset, change, at })
}

/// An idempotency entry: when it expires and what the first append returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IdemEntry {
    pub(crate) expires_at: u64,
    pub(crate) offset: Offset,
    pub(crate) epoch: Epoch,
    pub(crate) item_id: Option<ItemId>,
}

pub(crate) fn encode_idem(e: &IdemEntry) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(&e.expires_at.to_le_bytes());
    out.extend_from_slice(&e.offset.to_le_bytes());
    out.extend_from_slice(&e.epoch.0.to_le_bytes());
    if let Some(id) = &e.item_id {
        out.extend_from_slice(id.as_str().as_bytes());
    }
    out
}

pub(crate) fn decode_idem(b: &[u8]) -> Result<IdemEntry, Error> {
    let mut c = Cursor { b, pos: 0 };
    let expires_at = c.u64()?;
    let offset = c.u64()?;
    let epoch = Epoch(c.u64()?);
    let rest = c.rest();
    let item_id = if rest.is_empty() {
        None
    } else {
        Some(ItemId::new(
            std::str::from_utf8(rest).map_err(|_| corrupt())?,
        )?)
    };
    Ok(IdemEntry {
        expires_at,
        offset,
        epoch,
        item_id,
    })
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Ids and publisher names are at most 255 bytes by construction; clamp defensively.
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

fn corrupt() -> Error {
    Error::Storage("corrupt record".into())
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let s = self.b.get(self.pos..self.pos + n).ok_or_else(corrupt)?;
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, Error> {
        let s = self.take(8)?;
        Ok(u64::from_le_bytes(s.try_into().map_err(|_| corrupt())?))
    }
    fn str(&mut self) -> Result<&'a str, Error> {
        let s = self.take(2)?;
        let n = u16::from_le_bytes([s[0], s[1]]) as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| corrupt())
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.pos.min(self.b.len())..];
        self.pos = self.b.len();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let item = Item {
            id: ItemId::new("x").expect("id"),
            payload: Payload::json(&b"[1]"[..]).expect("json"),
            publisher: "p".into(),
            published_at: 42,
        };
        for change in [
            Change::Published(item),
            Change::Retracted(ItemId::new("y").expect("id")),
            Change::Purged,
        ] {
            let r = Record {
                offset: 9,
                change,
                at: 42,
            };
            assert_eq!(decode_record(9, &encode_record(&r)).expect("decodes"), r);
        }
    }

    #[test]
    fn truncated_records_are_errors_not_panics() {
        let r = Record {
            offset: 1,
            change: Change::Retracted(ItemId::new("abc").expect("id")),
            at: 1,
        };
        let b = encode_record(&r);
        for n in 0..b.len() {
            assert!(decode_record(1, &b[..n]).is_err());
        }
    }

    #[test]
    fn idempotency_entries_round_trip() {
        let e = IdemEntry {
            expires_at: 5,
            offset: 6,
            epoch: Epoch(7),
            item_id: Some(ItemId::new("i").expect("id")),
        };
        assert_eq!(decode_idem(&encode_idem(&e)).expect("decodes"), e);
    }
}
