//! The rules of a node's log, shared by every backend: offset assignment, item index upkeep,
//! retention (`max_items`), purge and transient (`persist = false`) nodes.
//!
//! A backend supplies [`LogTx`], the handful of primitive reads and writes of one
//! transaction; [`apply`] decides what to write. History is always contiguous: every offset
//! from `first_offset` to `last_offset` has a record.

use crate::error::Error;
use crate::model::{Change, Item, ItemId, NodeMeta, Offset, Record};
use crate::store::Op;

/// Primitive operations on one node's log inside a transaction.
pub(crate) trait LogTx {
    fn put_record(&mut self, record: &Record) -> Result<(), Error>;
    fn take_record(&mut self, offset: Offset) -> Result<Option<Record>, Error>;
    fn item_offset(&mut self, id: &ItemId) -> Result<Option<Offset>, Error>;
    /// Points `id` at `offset`; returns the previous offset.
    fn set_item(&mut self, id: &ItemId, offset: Offset) -> Result<Option<Offset>, Error>;
    fn remove_item(&mut self, id: &ItemId) -> Result<(), Error>;
}

/// Applies `op` to a node whose state is `meta`, at time `now`. On success `meta` is updated
/// and the new record is returned; on error nothing was written.
pub(crate) fn apply(
    meta: &mut NodeMeta,
    op: Op,
    now: u64,
    tx: &mut impl LogTx,
) -> Result<Record, Error> {
    let persist = meta.config.persist;
    let offset = meta.last_offset + 1;
    let change = match op {
        Op::Publish {
            id,
            payload,
            publisher,
        } => {
            if persist && tx.set_item(&id, offset)?.is_none() {
                meta.item_count += 1;
            }
            Change::Published(Item {
                id,
                payload,
                publisher,
                published_at: now,
            })
        }
        Op::Retract(id) => {
            if !persist || tx.item_offset(&id)?.is_none() {
                return Err(Error::ItemNotFound(id.to_string()));
            }
            tx.remove_item(&id)?;
            meta.item_count = meta.item_count.saturating_sub(1);
            Change::Retracted(id)
        }
        Op::Purge => {
            clear(meta, tx)?;
            Change::Purged
        }
    };
    let record = Record {
        offset,
        change,
        at: now,
    };
    meta.last_offset = offset;
    if persist {
        tx.put_record(&record)?;
        trim(meta, tx)?;
    } else {
        meta.first_offset = offset + 1;
    }
    Ok(record)
}

/// Drops the oldest records until at most `max_items` remain.
pub(crate) fn trim(meta: &mut NodeMeta, tx: &mut impl LogTx) -> Result<(), Error> {
    while meta.last_offset + 1 - meta.first_offset > meta.config.max_items {
        drop_record(meta, meta.first_offset, tx)?;
        meta.first_offset += 1;
    }
    Ok(())
}

/// Removes every record and item.
pub(crate) fn clear(meta: &mut NodeMeta, tx: &mut impl LogTx) -> Result<(), Error> {
    for offset in meta.first_offset..=meta.last_offset {
        drop_record(meta, offset, tx)?;
    }
    meta.first_offset = meta.last_offset + 1;
    meta.item_count = 0;
    Ok(())
}

fn drop_record(meta: &mut NodeMeta, offset: Offset, tx: &mut impl LogTx) -> Result<(), Error> {
    if let Some(Record {
        change: Change::Published(item),
        ..
    }) = tx.take_record(offset)?
        && tx.item_offset(&item.id)? == Some(offset)
    {
        tx.remove_item(&item.id)?;
        meta.item_count = meta.item_count.saturating_sub(1);
    }
    Ok(())
}
