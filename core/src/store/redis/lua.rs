//! The Lua scripts that make each change to a node one atomic step inside Redis.
//!
//! Every key a script touches belongs to one node and carries its `{node}` hash tag, so a
//! script runs on one shard of a Redis Cluster. Keys, in this order: `meta` (hash: config,
//! epoch, created, persist, max_items, last, `g`, `ix`), the base name of the log, `items`
//! (sorted set: item id scored by the offset of its current version), then per script what it
//! names.
//!
//! The log is a stream named `<base>:<g>`: one entry per record, id `0-<offset>`, fields `r`
//! (the encoded record) and `i` (kind letter and item id), capped at `max_items` (at its one
//! newest entry when the node keeps no history) by `XADD MAXLEN`. `g`, the log's generation,
//! changes with the epoch and with every change of `persist` or `max_items` (the log is
//! renamed), so a writer that cached those settings finds its log name gone and reads them
//! again: a publish is one `XADD` and one `SPUBLISH`, with no read of `meta`.
//!
//! The item index follows the log lazily: publishes do not touch it; whatever needs it
//! (items, an item by id, the item count, a retract) first brings it up to the log's tail
//! from `ix`, the offset it reflects, a bounded number of records per call (a call that could
//! not finish answers `behind` and is made again). Index entries below the log's first offset
//! are stale (their record was trimmed) and are swept as it catches up.

/// How many log records one call adds to the item index at most.
const COMMON: &str = r"
local INDEX_STEP = 512
local function logkey(base, g)
  if not g or g == '' then return base end
  return base .. ':' .. g
end
local function offset_of(id) return tonumber(string.sub(id, 3)) end
local function field(f, name)
  for i = 1, #f, 2 do if f[i] == name then return f[i + 1] end end
  return nil
end
-- Brings the index from `ix` towards `last`; returns the offset it reflects afterwards.
local function catch_up(meta, log, items, ix, first, last)
  local from = ix + 1
  if from < first then from = first end
  local es = {}
  if from <= last then
    es = redis.call('XRANGE', log, '0-' .. from, '+', 'COUNT', INDEX_STEP)
  end
  local upto = last
  if #es == INDEX_STEP then upto = offset_of(es[#es][1]) end
  local final, purged = {}, false
  for _, e in ipairs(es) do
    local k = field(e[2], 'i') or ''
    local kind, id = string.sub(k, 1, 1), string.sub(k, 2)
    if kind == 'p' then final[id] = offset_of(e[1])
    elseif kind == 'r' then final[id] = false
    elseif kind == 'x' then final, purged = {}, true end
  end
  if purged then redis.call('DEL', items) end
  local add, del = {}, {}
  for id, o in pairs(final) do
    if o then add[#add + 1] = o; add[#add + 1] = id else del[#del + 1] = id end
  end
  if #add > 0 then redis.call('ZADD', items, unpack(add)) end
  if #del > 0 then redis.call('ZREM', items, unpack(del)) end
  redis.call('ZREMRANGEBYSCORE', items, '-inf', '(' .. first)
  redis.call('HSET', meta, 'ix', upto)
  return upto
end
-- `{config, epoch, created, last, first, item_count, persist, max_items, log, g}`, nil when
-- the node does not exist, 'behind' when `count` needs more index than one call adds.
local function node_state(meta, base, items, count)
  local m = redis.call('HMGET', meta, 'config', 'epoch', 'created', 'persist', 'max_items', 'last', 'g', 'ix')
  if not m[2] then return nil end
  local log = logkey(base, m[7])
  local last = tonumber(m[6] or '0')
  local tail = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
  if tail[1] then
    local o = offset_of(tail[1][1])
    if o > last then last = o end
  end
  if not m[8] then
    -- Written by a build that indexed every publish as it went.
    redis.call('HSET', meta, 'ix', last)
    m[8] = last
  end
  local first, n = last + 1, 0
  if m[4] == '1' then
    first = last - redis.call('XLEN', log) + 1
    if count then
      local ix = tonumber(m[8])
      if ix < last and catch_up(meta, log, items, ix, first, last) < last then return 'behind' end
      n = redis.call('ZCOUNT', items, first, '+inf')
    end
  end
  return {m[1], m[2], m[3], last, first, n, m[4], m[5], log, m[7] or ''}
end
-- Makes `log` an empty stream whose next offset is last + 1.
local function fresh_log(log, last)
  redis.call('DEL', log)
  if last > 0 then
    redis.call('XADD', log, 'MAXLEN', 0, '0-' .. last, 'i', '')
  else
    redis.call('XGROUP', 'CREATE', log, 'new', '$', 'MKSTREAM')
    redis.call('XGROUP', 'DESTROY', log, 'new')
  end
end
";

/// KEYS: meta, log base, items. ARGV: `1` to count items (brings the index up to date).
/// Returns the node's state (see `node_state` above), nil, or `behind`.
pub(super) fn meta() -> String {
    format!("{COMMON}\nreturn node_state(KEYS[1], KEYS[2], KEYS[3], ARGV[1] == '1')")
}

/// KEYS: meta, log base, items. ARGV: after, limit, `1` to count items. Returns `{state,
/// entries}` where entries are `[id, [field, value]]` pairs as XRANGE gives them, nil, or
/// `behind`.
pub(super) fn read() -> String {
    format!(
        r"{COMMON}
local st = node_state(KEYS[1], KEYS[2], KEYS[3], ARGV[3] == '1')
if type(st) ~= 'table' then return st end
local from = tonumber(ARGV[1]) + 1
if from < st[5] then from = st[5] end
if st[7] ~= '1' or from > st[4] then return {{st, {{}}}} end
return {{st, redis.call('XRANGE', st[9], '0-' .. from, '+', 'COUNT', ARGV[2])}}
"
    )
}

/// KEYS: meta, log base, items. ARGV: after, limit. Returns `{state, records}` with the
/// current items after `after` in offset order, each as an XRANGE entry; nil, or `behind`.
pub(super) fn items() -> String {
    format!(
        r"{COMMON}
local st = node_state(KEYS[1], KEYS[2], KEYS[3], true)
if type(st) ~= 'table' then return st end
local out = {{}}
if st[7] ~= '1' then return {{st, out}} end
local from = tonumber(ARGV[1])
if from < st[5] - 1 then from = st[5] - 1 end
local ids = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. from, '+inf', 'WITHSCORES', 'LIMIT', 0, ARGV[2])
for i = 2, #ids, 2 do
  local e = redis.call('XRANGE', st[9], '0-' .. ids[i], '0-' .. ids[i])
  if e[1] then out[#out + 1] = e[1] end
end
return {{st, out}}
"
    )
}

/// KEYS: meta, log base, items. ARGV: item id. Returns the item's current entry, 0 when it
/// has none, nil when the node does not exist, or `behind`.
pub(super) fn item() -> String {
    format!(
        r"{COMMON}
local st = node_state(KEYS[1], KEYS[2], KEYS[3], true)
if type(st) ~= 'table' then return st end
if st[7] ~= '1' then return 0 end
local o = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not o or tonumber(o) < st[5] then return 0 end
local e = redis.call('XRANGE', st[9], '0-' .. o, '0-' .. o)
return e[1] or 0
"
    )
}

/// KEYS: meta, log base, items, channel, then idempotency keys. ARGV: now (unused by Redis,
/// kept for the record), idempotency window in ms, number of operations, announce (`1`:
/// publish the message here; `0`: return it, for the caller to publish once replicas have
/// the records), then what the caller knows of the node — the log's generation, epoch,
/// persist (`1`/`0`) and max_items, all empty when it knows nothing — then `1` when the
/// batch retracts or purges (it needs the index), then per operation:
/// kind (`p` publish, `r` retract, `x` purge), item id, encoded record, index of its
/// idempotency key in KEYS (0 for none), origin (one letter).
///
/// Returns nil when the node does not exist, `behind` when its index is too far behind for
/// one call (nothing was changed), else `{epoch, results, g, persist, max_items, message}`:
/// the node's settings as this call found them (for the caller to cache), one result per
/// operation — `{1, offset}` appended, `{2, offset, item id}` a repeated idempotency key,
/// `{3}` no such item — and the message when it was not announced here (else false). The
/// appended records go out on the node's channel in one message, in offset order:
/// `P<epoch>\n` then per record `<offset> <length> <origin>\n<record>`.
pub(super) fn append() -> String {
    format!(
        r"{COMMON}
local meta, base, items, chan = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ttl, n, announce = ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local g, epoch, persist, max = ARGV[5], ARGV[6], ARGV[7] == '1', tonumber(ARGV[8])
local indexed = ARGV[9] == '1'
local log = logkey(base, g)
local first, loaded = 0, false
local function load()
  local st = node_state(meta, base, items, indexed)
  if type(st) ~= 'table' then return st end
  epoch, persist, max, g, log = st[2], st[7] == '1', tonumber(st[8]), st[10], st[9]
  first, loaded = st[5], true
  return st
end
local keyed = false
for k = 1, n do
  if ARGV[9 + 5 * k - 1] ~= '0' then keyed = true end
end
if indexed or epoch == '' or (keyed and redis.call('EXISTS', log) == 0) then
  local st = load()
  if type(st) ~= 'table' then return st end
end
local function add(rec, key)
  local cap = persist and max or 1
  local id = redis.call('XADD', log, 'NOMKSTREAM', 'MAXLEN', cap, '0-*', 'r', rec, 'i', key)
  if id then return offset_of(id) end
  if not loaded then
    -- What the caller knew is out of date: the log was renamed or the node deleted.
    local st = load()
    if type(st) ~= 'table' then return st end
    cap = persist and max or 1
    id = redis.call('XADD', log, 'NOMKSTREAM', 'MAXLEN', cap, '0-*', 'r', rec, 'i', key)
    if id then return offset_of(id) end
  end
  -- The node has no log (lost, or from an older layout): start one after its last offset.
  local st = node_state(meta, base, items, false)
  fresh_log(log, st[4])
  return offset_of(redis.call('XADD', log, 'MAXLEN', cap, '0-*', 'r', rec, 'i', key))
end
local function current(id)
  local o = redis.call('ZSCORE', items, id)
  return o and tonumber(o) >= first and redis.call('XRANGE', log, '0-' .. o, '0-' .. o)[1]
end
local out, msg, wrote = {{}}, {{'P', epoch, '\n'}}, nil
local a = 10
for k = 1, n do
  local kind, id, rec, ik, org = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3]), ARGV[a + 4]
  a = a + 5
  local seen = nil
  if ik > 0 then
    local v = redis.call('GET', KEYS[ik])
    if v and string.sub(v, 1, #epoch + 1) == epoch .. ':' then seen = string.sub(v, #epoch + 2) end
  end
  if seen then
    local sep = string.find(seen, ':', 1, true)
    out[k] = {{2, tonumber(string.sub(seen, 1, sep - 1)), string.sub(seen, sep + 1)}}
  elseif kind == 'r' and not (persist and current(id)) then
    out[k] = {{3}}
  else
    if kind == 'x' then
      redis.call('DEL', items)
      redis.call('XTRIM', log, 'MAXLEN', 0)
    end
    local off = add(rec, kind .. id)
    if type(off) ~= 'number' then return off end
    msg[2] = epoch
    if indexed and persist then
      if kind == 'p' then redis.call('ZADD', items, off, id)
      elseif kind == 'r' then redis.call('ZREM', items, id) end
    end
    wrote = off
    if ik > 0 then redis.call('SET', KEYS[ik], epoch .. ':' .. off .. ':' .. id, 'PX', ttl) end
    out[k] = {{1, off}}
    msg[#msg + 1] = off .. ' ' .. #rec .. ' ' .. org .. '\n'
    msg[#msg + 1] = rec
  end
end
if indexed and persist and wrote then redis.call('HSET', meta, 'ix', wrote) end
local m = false
if #msg > 3 then
  m = table.concat(msg)
  if announce then
    redis.call('SPUBLISH', chan, m)
    m = false
  end
end
return {{epoch, out, g, persist and '1' or '0', max, m}}
"
    )
}

/// KEYS: meta, log base, items. ARGV: config JSON, persist (`1`/`0`), max_items, epoch for a
/// new node, now, a new log generation. Returns `{created, state}` (without the item count).
pub(super) fn put_node() -> String {
    format!(
        r"{COMMON}
local meta, base, items = KEYS[1], KEYS[2], KEYS[3]
local st = node_state(meta, base, items, false)
if not st then
  redis.call('DEL', items)
  fresh_log(logkey(base, ARGV[6]), 0)
  redis.call('HSET', meta, 'config', ARGV[1], 'epoch', ARGV[4], 'created', ARGV[5],
    'persist', ARGV[2], 'max_items', ARGV[3], 'last', 0, 'g', ARGV[6], 'ix', 0)
  return {{1, node_state(meta, base, items, false)}}
end
local last, log = st[4], st[9]
if st[7] ~= ARGV[2] or st[8] ~= ARGV[3] then
  -- A new generation: writers that cached the old settings find their log gone.
  local new = logkey(base, ARGV[6])
  if st[7] ~= ARGV[2] or redis.call('EXISTS', log) == 0 then
    -- History starts afresh after the last offset (kept or dropped as a whole).
    redis.call('DEL', log, items)
    fresh_log(new, last)
    redis.call('HSET', meta, 'ix', last)
  else
    redis.call('RENAME', log, new)
    if ARGV[2] == '1' then redis.call('XTRIM', new, 'MAXLEN', ARGV[3]) end
  end
  redis.call('HSET', meta, 'g', ARGV[6], 'last', last)
end
redis.call('HSET', meta, 'config', ARGV[1], 'persist', ARGV[2], 'max_items', ARGV[3])
return {{0, node_state(meta, base, items, false)}}
"
    )
}

/// KEYS: meta, log base, items, subscriptions, affiliations, channel. Deletes the node and
/// announces it on the channel as `D<epoch>\n<offset>`. Returns `{epoch, offset}` of the
/// deletion, or nil when there is no such node.
pub(super) fn delete_node() -> String {
    format!(
        r"{COMMON}
local st = node_state(KEYS[1], KEYS[2], KEYS[3], false)
if not st then return nil end
redis.call('DEL', KEYS[1], st[9], KEYS[3], KEYS[4], KEYS[5])
local off = st[4] + 1
redis.call('SPUBLISH', KEYS[6], 'D' .. st[2] .. '\n' .. off)
return {{st[2], off}}
"
    )
}

/// KEYS: meta, then a hash of the node's (affiliations or subscriptions). ARGV: field, value
/// (an empty value deletes the field). Returns 1 if the field existed before, 0 if not,
/// -1 when the node does not exist.
pub(super) const SET_MEMBER: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local had = redis.call('HEXISTS', KEYS[2], ARGV[1])
if ARGV[2] == '' then redis.call('HDEL', KEYS[2], ARGV[1])
else redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
return had
";

/// KEYS: meta, then a hash of the node's. Returns its fields and values, or nil when the
/// node does not exist.
pub(super) const MEMBERS: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
return redis.call('HGETALL', KEYS[2])
";

/// KEYS: meta, log base, items. ARGV: the epoch the caller saw, a new epoch, a new log
/// generation. Gives the node the new epoch if it still has the one seen (the engine found
/// its history shorter than what it had delivered: Redis lost acknowledged events, and their
/// offsets would be assigned again). Returns the node's epoch afterwards, or nil when the
/// node does not exist.
pub(super) fn rebase() -> String {
    format!(
        r"{COMMON}
local m = redis.call('HMGET', KEYS[1], 'epoch', 'g')
if not m[1] then return false end
if m[1] ~= ARGV[1] then return m[1] end
local log, new = logkey(KEYS[2], m[2]), logkey(KEYS[2], ARGV[3])
if redis.call('EXISTS', log) == 1 then redis.call('RENAME', log, new) end
redis.call('HSET', KEYS[1], 'epoch', ARGV[2], 'g', ARGV[3])
return ARGV[2]
"
    )
}
