"""The Lua scripts of the Redis backend: each atomic step of the contract that needs more than
one command, run inside the server. ``_redis_ops`` encodes the calls and decodes the replies.

Every script the cache runs is bounded whatever the number of rows (a script blocks the whole
server while it runs): counts come from the sorted sets, samples are of fixed size, a clear()
deletes its old rows in steps of ``SWEEP_STEP``, listing and re-sealing go in windows. Only
``LIST`` and ``ROWS_NOT_UNDER`` asked for every row at once (no window) and ``PRUNE`` after
many rows expired together still grow with the rows they touch.
"""

from __future__ import annotations

from . import contract

LAST_USED_OFFSET = 18  # byte offset of last_used in a row's header (Touch rewrites it in place)
ROW_PREFIX_BYTES = 164  # enough for the header, a nonce and a key id (ListRows reads no more)

_KID_OF = """
local function kid_of(v)
  if not v or #v < 36 then return nil end
  local n = string.byte(v, 35)
  local k = string.byte(v, 36 + n)
  if not k then return nil end
  return string.sub(v, 37 + n, 36 + n + k)
end
"""

# The clear() generation in a row's header (bytes 3-10, big-endian); -1 for no row of ours.
_GEN_OF = """
local function gen_of(v)
  if #v < 10 then return -1 end
  local gen = 0
  for b = 3, 10 do gen = gen * 256 + string.byte(v, b) end
  return gen
end
"""

_TRIM = """
local function trim(lru, exp, limit, prefix)
  local over = redis.call('ZCARD', lru) - limit
  local n = 0
  if over > 0 then
    local victims = redis.call('ZPOPMIN', lru, over)
    for i = 1, #victims, 2 do
      redis.call('DEL', prefix .. victims[i])
      redis.call('ZREM', exp, victims[i])
      n = n + 1
    end
  end
  return n
end
"""

# KEYS: gen, row, lru(kind), exp, lru(other kind), rows to drop...
# ARGV: expected gen, value, px, hex, last_used, expires_at, limit, row prefix, fence flag,
#       fence nonce, hexes to drop...
# The fence: the write of a fetch is refused when another row of this generation took the
# place of the one it read (a holder frozen past its lease must not overwrite the newer token
# with its older one).
WRITE = (
    _TRIM
    + _GEN_OF
    + """
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then return 0 end
if ARGV[9] == '1' then
  local v = redis.call('GETRANGE', KEYS[2], 0, 98)
  if #v >= 35 and gen_of(v) == tonumber(ARGV[1])
     and (ARGV[10] == '' or string.sub(v, 36, 35 + string.byte(v, 35)) ~= ARGV[10]) then
    return 0
  end
end
for i = 11, #ARGV do
  redis.call('DEL', KEYS[i - 5])
  redis.call('ZREM', KEYS[3], ARGV[i])
  redis.call('ZREM', KEYS[5], ARGV[i])
  redis.call('ZREM', KEYS[4], ARGV[i])
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[4])
trim(KEYS[3], KEYS[4], tonumber(ARGV[7]), ARGV[8])
return 1
"""
)

# KEYS: lru:system, lru:user, exp, rows...   ARGV: with-nonce flag, nonce, hexes...
DELETE = """
local removed = 0
for i = 4, #KEYS do
  local ok = true
  if ARGV[1] == '1' then
    local v = redis.call('GET', KEYS[i])
    ok = false
    if v and #v >= 35 then
      local n = string.byte(v, 35)
      ok = string.sub(v, 36, 35 + n) == ARGV[2]
    end
  end
  if ok then
    removed = removed + redis.call('DEL', KEYS[i])
    for z = 1, 3 do redis.call('ZREM', KEYS[z], ARGV[i - 1]) end
  end
end
return removed
"""

# KEYS: gen, lru:system, lru:user, exp, graves   ARGV: grave prefix. O(1) whatever the size:
# the LRU sets are renamed to graves, whose rows SWEEP deletes in short steps afterwards
# (meanwhile every reader ignores them: their generation is old).
CLEAR = """
local g = redis.call('INCR', KEYS[1])
for z = 2, 3 do
  if redis.call('EXISTS', KEYS[z]) == 1 then
    local n = redis.call('HLEN', KEYS[5])
    while redis.call('EXISTS', ARGV[1] .. n) == 1 do n = n + 1 end
    redis.call('RENAME', KEYS[z], ARGV[1] .. n)
    redis.call('HSET', KEYS[5], ARGV[1] .. n, g)
  end
end
redis.call('UNLINK', KEYS[4])
return g
"""

# Deletes up to ARGV[1] rows of the graves; only rows older than their grave's generation
# (a digest written again since the clear keeps its new row). Reply: rows left in graves.
# KEYS: graves   ARGV: limit, row prefix
_SWEEP = (
    _GEN_OF
    + """
local function sweep(graves, budget, prefix)
  local left = 0
  for _, grave in ipairs(redis.call('HKEYS', graves)) do
    local cut = tonumber(redis.call('HGET', graves, grave))
    if budget > 0 then
      local victims = redis.call('ZPOPMIN', grave, budget)
      for i = 1, #victims, 2 do
        local row = prefix .. victims[i]
        local gen = gen_of(redis.call('GETRANGE', row, 0, 9))
        if gen >= 0 and gen < cut then redis.call('UNLINK', row) end
      end
      budget = budget - #victims / 2
    end
    local n = redis.call('ZCARD', grave)
    if n == 0 then redis.call('HDEL', graves, grave) end
    left = left + n
  end
  return left
end
"""
)
SWEEP = _SWEEP + "return sweep(KEYS[1], tonumber(ARGV[1]), ARGV[2])\n"
SWEEP_STEP = contract.Sweep().limit
"""Rows one SWEEP (or the sweep inside a PRUNE) deletes at most: about a millisecond."""

# KEYS: gen   ARGV: generation. Never lowers it.
FENCE = """
local g = tonumber(redis.call('GET', KEYS[1]) or '0')
if g == nil or g < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  return tonumber(ARGV[1])
end
return g
"""

# KEYS: exp, lru:system, lru:user, graves   ARGV: now, system limit, user limit, row prefix,
# sweep limit (a clear() whose process died before it finished is completed here).
PRUNE = (
    _TRIM
    + _SWEEP
    + """
local removed = 0
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])) do
  redis.call('DEL', ARGV[4] .. m)
  redis.call('ZREM', KEYS[2], m)
  redis.call('ZREM', KEYS[3], m)
  removed = removed + 1
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
removed = removed + trim(KEYS[2], KEYS[1], tonumber(ARGV[2]), ARGV[4])
removed = removed + trim(KEYS[3], KEYS[1], tonumber(ARGV[3]), ARGV[4])
sweep(KEYS[4], tonumber(ARGV[5]), ARGV[4])
return removed
"""
)

# KEYS: row, lru:system, lru:user   ARGV: packed last_used, last_used, hex
TOUCH = f"""
local kind = redis.call('GETRANGE', KEYS[1], 1, 1)
local lru
if kind == 's' then lru = KEYS[2] elseif kind == 'u' then lru = KEYS[3] else return 0 end
redis.call('SETRANGE', KEYS[1], {LAST_USED_OFFSET}, ARGV[1])
redis.call('ZADD', lru, 'XX', ARGV[2], ARGV[3])
return 1
"""

# KEYS: gen, mark   ARGV: ms, status, cause. Written at the server's TIME, for ms at most: a
# writer's clock never decides how long a mark lasts.
SET_BACKOFF = """
local g = redis.call('GET', KEYS[1]) or '0'
local t = redis.call('TIME')
local now = string.format('%d', t[1] * 1000 + math.floor(t[2] / 1000))
local mark = g .. '|' .. now .. '|' .. ARGV[1] .. '|' .. ARGV[2] .. '|' .. ARGV[3]
redis.call('SET', KEYS[2], mark, 'PX', ARGV[1])
return 1
"""

# KEYS: gen, mark. Reply: gen, mark (or ''), server TIME.
GET_BACKOFF = """
local t = redis.call('TIME')
return {redis.call('GET', KEYS[1]) or '0', redis.call('GET', KEYS[2]) or '', t[1], t[2]}
"""
MARK_CLOCK_SLACK_MS = 1000
"""A mark written later than the server's now by more than this was planted: ignored."""

# The key ids of a sample of the rows in the given LRU sets: the ``stop`` + 1 most recently
# used of each, with ``oldest`` also the least (a rotation's last rows under an old key are
# the least recently used). Bounded whatever the size: a script blocks the server meanwhile.
_KIDS_OF = (
    _KID_OF
    + f"""
local function kids_of(lrus, prefix, stop, oldest)
  local seen, list = {{}}, {{}}
  local ranges = {{'ZREVRANGE'}}
  if oldest then ranges = {{'ZREVRANGE', 'ZRANGE'}} end
  for _, lru in ipairs(lrus) do
    for _, range in ipairs(ranges) do
      for _, m in ipairs(redis.call(range, lru, 0, stop)) do
        local kid = kid_of(redis.call('GETRANGE', prefix .. m, 0, {ROW_PREFIX_BYTES - 1}))
        if kid and not seen[kid] then seen[kid] = true; table.insert(list, kid) end
      end
    end
  end
  return list
end
"""
)
KEY_CHECK_SAMPLE = 16

# KEYS: gen, lru:system, lru:user, exp   ARGV: now, row prefix. O(log n): counts kept by the
# sorted sets, a sample of key ids (stats() and every OpenTelemetry collection ask).
FACTS = (
    _KIDS_OF
    + f"""
local list = kids_of({{KEYS[2], KEYS[3]}}, ARGV[2], {KEY_CHECK_SAMPLE - 1}, true)
local lo = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
local hi = redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')
return {{redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3]),
        redis.call('ZCOUNT', KEYS[4], '-inf', ARGV[1]), lo[2] or '', hi[2] or '', list}}
"""
)

# KEYS: lru:system, lru:user   ARGV: row prefix. Reply: rows, key ids of a sample of rows.
# Bounded whatever the size (a process's first miss asks; a script blocks the server).
KEY_CHECKS = (
    _KIDS_OF
    + f"""
local rows = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2])
return {{rows, kids_of({{KEYS[1], KEYS[2]}}, ARGV[1], {KEY_CHECK_SAMPLE - 1})}}
"""
)

# The members at positions ``skip``.. (``count`` of them, -1: to the end) of the given sorted
# sets one after the other, each read with ``range`` (ZRANGE: least recently used first).
_WINDOW = """
local function window(sets, range, skip, count)
  local out = {}
  for _, set in ipairs(sets) do
    local n = redis.call('ZCARD', set)
    if skip >= n then
      skip = skip - n
    elseif count ~= 0 then
      local stop = -1
      if count > 0 then stop = skip + count - 1 end
      for _, m in ipairs(redis.call(range, set, skip, stop)) do
        table.insert(out, m)
        count = count - 1
      end
      skip = 0
    end
  end
  return out
end
"""

# KEYS: gen, lru:system, lru:user   ARGV: row prefix, start, count (-1: all). Reply: gen, then
# hex, head pairs of the rows at those positions, most recently used first.
LIST = (
    _WINDOW
    + f"""
local out = {{redis.call('GET', KEYS[1]) or '0'}}
local members = window({{KEYS[2], KEYS[3]}}, 'ZREVRANGE', tonumber(ARGV[2]), tonumber(ARGV[3]))
for _, m in ipairs(members) do
  local head = redis.call('GETRANGE', ARGV[1] .. m, 0, {ROW_PREFIX_BYTES - 1})
  if #head > 0 then table.insert(out, m); table.insert(out, head) end
end
return out
"""
)

# KEYS: lru:system, lru:user   ARGV: kid, how many, row prefix, start, positions (-1: all).
# Reply: hex, value pairs of rows at those positions (least recently used first) not under kid.
ROWS_NOT_UNDER = (
    _KID_OF
    + _WINDOW
    + """
local out, want = {}, tonumber(ARGV[2])
for _, m in ipairs(window({KEYS[1], KEYS[2]}, 'ZRANGE', tonumber(ARGV[4]), tonumber(ARGV[5]))) do
  if #out >= 2 * want then return out end
  local v = redis.call('GET', ARGV[3] .. m)
  if v and kid_of(v) ~= ARGV[1] then table.insert(out, m); table.insert(out, v) end
end
return out
"""
)

# KEYS: old row, new row, lru:system, lru:user, exp, lru(new kind)
# ARGV: old hex, new hex, value, px, last_used, expires_at. The old row's time left wins.
REPLACE = """
local px = redis.call('PTTL', KEYS[1])
if px > 0 then ARGV[4] = px end
redis.call('DEL', KEYS[1])
for z = 3, 5 do redis.call('ZREM', KEYS[z], ARGV[1]) end
if not redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[6], ARGV[5], ARGV[2])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[2])
return 1
"""

# KEYS: lock   ARGV: token, lease ms. A lock with no expiry is none of ours (every lock here
# is leased): treated as expired, not waited for.
LOCK_TRY = """
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('DEL', KEYS[1]) end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

# KEYS: lock   ARGV: token, lease ms
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lock   ARGV: token, channel, hex
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""
