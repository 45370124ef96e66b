//! The Lua scripts that make each change to a node one atomic step inside Redis.
//!
//! Every key a script touches belongs to one node and carries its `{node}` hash tag, so a
//! script runs on one shard of a Redis Cluster. Keys, in this order: `meta` (hash: config,
//! epoch, created, persist, max_items, last), `log` (stream: one entry per record, id
//! `0-<offset>`, field `r` = the encoded record), `items` (sorted set: item id scored by the
//! offset of its current version), then per script what it names. A stream's entries are
//! contiguous offsets, so its length gives the first offset; index entries below the first
//! offset are stale (their record was trimmed) and are swept now and then.

/// `node_state(meta, log, items)`: `{config, epoch, created, last, first, item_count,
/// persist, max_items}`, or nil when the node does not exist.
const STATE: &str = r"
local function node_state(meta, log, items)
  local m = redis.call('HMGET', meta, 'config', 'epoch', 'created', 'persist', 'max_items', 'last')
  if not m[2] then return nil end
  local last = tonumber(m[6] or '0')
  local first = last + 1
  local count = 0
  if m[4] == '1' then
    local tail = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
    if tail[1] then
      local o = tonumber(string.sub(tail[1][1], 3))
      if o > last then last = o end
    end
    first = last - redis.call('XLEN', log) + 1
    count = redis.call('ZCOUNT', items, first, '+inf')
  end
  return {m[1], m[2], m[3], last, first, count, m[4], m[5]}
end
";

/// KEYS: meta, log, items. Returns the node's state (see [`STATE`]) or nil.
pub(super) fn meta() -> String {
    format!("{STATE}\nreturn node_state(KEYS[1], KEYS[2], KEYS[3])")
}

/// KEYS: meta, log, items. ARGV: after, limit. Returns `{state, entries}` where entries are
/// `[id, [field, value]]` pairs as XRANGE gives them, or nil.
pub(super) fn read() -> String {
    format!(
        r"{STATE}
local st = node_state(KEYS[1], KEYS[2], KEYS[3])
if not st then return nil end
local from = tonumber(ARGV[1]) + 1
if from < st[5] then from = st[5] end
if st[7] ~= '1' or from > st[4] then return {{st, {{}}}} end
return {{st, redis.call('XRANGE', KEYS[2], '0-' .. from, '+', 'COUNT', ARGV[2])}}
"
    )
}

/// KEYS: meta, log, items. ARGV: after, limit. Returns `{state, records}` with the current
/// items after `after` in offset order, each as an XRANGE entry; or nil.
pub(super) fn items() -> String {
    format!(
        r"{STATE}
local st = node_state(KEYS[1], KEYS[2], KEYS[3])
if not st then return nil end
local out = {{}}
if st[7] ~= '1' then return {{st, out}} end
local from = tonumber(ARGV[1])
if from < st[5] - 1 then from = st[5] - 1 end
local ids = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. from, '+inf', 'WITHSCORES', 'LIMIT', 0, ARGV[2])
for i = 2, #ids, 2 do
  local e = redis.call('XRANGE', KEYS[2], '0-' .. ids[i], '0-' .. ids[i])
  if e[1] then out[#out + 1] = e[1] end
end
return {{st, out}}
"
    )
}

/// KEYS: meta, log, items. ARGV: item id. Returns the item's current entry, false when it
/// has none, nil when the node does not exist.
pub(super) const ITEM: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
local o = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not o then return false end
local e = redis.call('XRANGE', KEYS[2], '0-' .. o, '0-' .. o)
return e[1] or false
";

/// KEYS: meta, log, items, channel, then idempotency keys. ARGV: now (unused by Redis, kept
/// for the record), idempotency window in ms, number of operations, announce (`1`: publish
/// the message here; `0`: return it as a third element, for the caller to publish once
/// replicas have the records), then per operation:
/// kind (`p` publish, `r` retract, `x` purge), item id, encoded record, index of its
/// idempotency key in KEYS (0 for none), origin (one letter).
///
/// Returns nil when the node does not exist, else `{epoch, results}` with one result per
/// operation: `{1, offset}`
/// appended, `{2, offset, item id}` a repeated idempotency key, `{3}` no such item. The
/// appended records go out on the node's channel in one message, in offset order:
/// `P<epoch>\n` then per record `<offset> <length> <origin>\n<record>`.
pub(super) const APPEND: &str = r"
local meta, log, items, chan = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local m = redis.call('HMGET', meta, 'epoch', 'persist', 'max_items')
if not m[1] then return false end
local epoch, persist, max = m[1], m[2] == '1', tonumber(m[3])
local ttl, n, announce = ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local function current(items, log, id)
  local o = redis.call('ZSCORE', items, id)
  return o and redis.call('XRANGE', log, '0-' .. o, '0-' .. o)[1]
end
local out, msg = {}, {'P', epoch, '\n'}
local a = 5
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
    out[k] = {2, tonumber(string.sub(seen, 1, sep - 1)), string.sub(seen, sep + 1)}
  elseif kind == 'r' and not (persist and current(items, log, id)) then
    out[k] = {3}
  else
    if kind == 'r' then
      redis.call('ZREM', items, id)
    elseif kind == 'x' then
      redis.call('DEL', items)
      if persist then redis.call('XTRIM', log, 'MAXLEN', 0) end
    end
    local off
    if persist then
      off = tonumber(string.sub(redis.call('XADD', log, 'MAXLEN', max, '0-*', 'r', rec), 3))
      if kind == 'p' then redis.call('ZADD', items, off, id) end
      if off % 128 == 0 then redis.call('ZREMRANGEBYSCORE', items, '-inf', '(' .. (off - max + 1)) end
    else
      off = redis.call('HINCRBY', meta, 'last', 1)
    end
    if ik > 0 then redis.call('SET', KEYS[ik], epoch .. ':' .. off .. ':' .. id, 'PX', ttl) end
    out[k] = {1, off}
    msg[#msg + 1] = off .. ' ' .. #rec .. ' ' .. org .. '\n'
    msg[#msg + 1] = rec
  end
end
if #msg > 3 then
  if not announce then return {epoch, out, table.concat(msg)} end
  redis.call('SPUBLISH', chan, table.concat(msg))
end
return {epoch, out}
";

/// KEYS: meta, log, items. ARGV: config JSON, persist (`1`/`0`), max_items, epoch for a new
/// node, now. Returns `{created, state}`.
pub(super) fn put_node() -> String {
    format!(
        r"{STATE}
local meta, log, items = KEYS[1], KEYS[2], KEYS[3]
local st = node_state(meta, log, items)
if not st then
  redis.call('DEL', log, items)
  redis.call('HSET', meta, 'config', ARGV[1], 'epoch', ARGV[4], 'created', ARGV[5],
    'persist', ARGV[2], 'max_items', ARGV[3], 'last', 0)
  return {{1, node_state(meta, log, items)}}
end
local last = st[4]
if st[7] == '1' and ARGV[2] ~= '1' then
  redis.call('DEL', log, items)
  redis.call('HSET', meta, 'last', last)
elseif st[7] ~= '1' and ARGV[2] == '1' then
  redis.call('DEL', log, items)
  if last > 0 then redis.call('XADD', log, 'MAXLEN', 0, '0-' .. last, 'r', '') end
end
if ARGV[2] == '1' then
  redis.call('XTRIM', log, 'MAXLEN', ARGV[3])
  local first = last - redis.call('XLEN', log) + 1
  redis.call('ZREMRANGEBYSCORE', items, '-inf', '(' .. first)
end
redis.call('HSET', meta, 'config', ARGV[1], 'persist', ARGV[2], 'max_items', ARGV[3])
return {{0, node_state(meta, log, items)}}
"
    )
}

/// KEYS: meta, log, items, subscriptions, affiliations, channel. Deletes the node and
/// announces it on the channel as `D<epoch>\n<offset>`. Returns `{epoch, offset}` of the
/// deletion, or nil when there is no such node.
pub(super) fn delete_node() -> String {
    format!(
        r"{STATE}
local st = node_state(KEYS[1], KEYS[2], KEYS[3])
if not st then return nil end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
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

/// KEYS: meta, log, items. ARGV: the epoch the caller saw, a new epoch. Gives the node the new
/// epoch if it still has the one seen (the engine found its history shorter than what it had
/// delivered: Redis lost acknowledged events, and their offsets would be assigned again).
/// Returns the node's epoch afterwards, or nil when the node does not exist.
pub(super) const REBASE: &str = r"
local e = redis.call('HGET', KEYS[1], 'epoch')
if not e then return false end
if e == ARGV[1] then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2])
  return ARGV[2]
end
return e
";
