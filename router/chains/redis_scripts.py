"""The Redis backend's writes, as Lua scripts: each runs atomically on the server (read-check-write in one
round trip) and is idempotent, so the client may resend it after a lost connection.

Key layout, for chain X under prefix P ({X} is a hash tag: one chain's keys share a cluster slot):
  P:{X}        hash   created_at updated_at status n_turns n_calls, and per turn N: tN:request tN:sampling
                      tN:prompt tN:status tN:reason tN:created tN:updated tN:begin (the begin call's id)
  P:{X}:gN     string turn N's generated tokens, packed uint32 (APPEND keeps them contiguous)
  P:{X}:tc     hash   tool call id -> JSON [turn, name, arguments]
  P:{X}:to     list   tool call ids in transcript order
  P:{X}:tr     hash   r:ID -> result, a:ID -> result time
  P:{X}:lease  string the lease owner, expiring (PX) on the server's clock
  P:index      zset   chain id -> updated_at
Scripts reply {status, ...}; the client maps a non-'ok' status to the store's exception.
"""

from __future__ import annotations

# KEYS[1] = chain hash, KEYS[2] = index; ARGV[1] = chain id, ARGV[2] = now.
_PRELUDE = """
local meta, index, chain, now = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local n = tonumber(redis.call('HGET', meta, 'n_turns'))
local function touch(status)
  redis.call('HSET', meta, 'updated_at', now)
  if status then redis.call('HSET', meta, 'status', status) end
  redis.call('ZADD', index, now, chain)
end
"""

# ARGV[3] tenant.
CREATE = (
    _PRELUDE
    + """
if n then return {'ok'} end
redis.call('HSET', meta, 'created_at', now, 'updated_at', now, 'status', 'idle', 'n_turns', 0, 'n_calls', 0,
           'tenant', ARGV[3])
redis.call('ZADD', index, now, chain)
return {'ok'}
"""
)

# ARGV[3] request, [4] sampling, [5] packed prompt, [6] begin call id.
BEGIN_TURN = (
    _PRELUDE
    + """
if not n then return {'nochain'} end
if n > 0 then
  local last = 't' .. (n - 1) .. ':'
  if redis.call('HGET', meta, last .. 'begin') == ARGV[6] then return {'ok', n - 1} end
  if redis.call('HGET', meta, last .. 'status') == 'running' then return {'running', n - 1} end
end
local p = 't' .. n .. ':'
redis.call('HSET', meta, p .. 'request', ARGV[3], p .. 'sampling', ARGV[4], p .. 'prompt', ARGV[5],
  p .. 'status', 'running', p .. 'created', now, p .. 'updated', now, p .. 'begin', ARGV[6], 'n_turns', n + 1)
touch('running')
return {'ok', n}
"""
)

# KEYS[3] the turn's token string; ARGV[3] turn, [4] start, [5] packed tokens.
APPEND_TOKENS = (
    _PRELUDE
    + """
if not n then return {'nochain'} end
local t = tonumber(ARGV[3])
if t >= n then return {'noturn', n} end
local stored = redis.call('STRLEN', KEYS[3]) / 4
local start, data = tonumber(ARGV[4]), ARGV[5]
local given = #data / 4
if start > stored then return {'gap', stored} end
local overlap = math.min(stored - start, given)
if overlap > 0 then
  local have = redis.call('GETRANGE', KEYS[3], start * 4, (start + overlap) * 4 - 1)
  if have ~= string.sub(data, 1, overlap * 4) then
    for i = 0, overlap - 1 do
      local a = string.sub(have, i * 4 + 1, i * 4 + 4)
      if a ~= string.sub(data, i * 4 + 1, i * 4 + 4) then return {'mismatch', start + i, a} end
    end
  end
end
if given <= overlap then return {'ok', stored} end
local status = redis.call('HGET', meta, 't' .. t .. ':status')
if status ~= 'running' then return {'closed', status} end
redis.call('APPEND', KEYS[3], string.sub(data, overlap * 4 + 1))
redis.call('HSET', meta, 't' .. t .. ':updated', now)
touch(false)
return {'ok', start + given}
"""
)

# ARGV[3] turn, [4] status, [5] finish reason, [6] '1' if there is a reason.
FINISH_TURN = (
    _PRELUDE
    + """
if not n then return {'nochain'} end
local t = tonumber(ARGV[3])
if t >= n then return {'noturn', n} end
local p = 't' .. t .. ':'
local current = redis.call('HGET', meta, p .. 'status')
if current ~= 'running' then
  local reason = redis.call('HGET', meta, p .. 'reason')
  return {'closed', current, reason or '', reason and '1' or '0'}
end
redis.call('HSET', meta, p .. 'status', ARGV[4], p .. 'updated', now)
if ARGV[6] == '1' then redis.call('HSET', meta, p .. 'reason', ARGV[5]) end
if t == n - 1 then touch(ARGV[4]) else touch(false) end
return {'ok'}
"""
)

# KEYS[3] tool call hash, KEYS[4] order list; ARGV[3] turn, then (id, JSON [turn, name, arguments]) pairs.
RECORD_TOOL_CALLS = (
    _PRELUDE
    + """
if not n then return {'nochain'} end
if tonumber(ARGV[3]) >= n then return {'noturn', n} end
for i = 4, #ARGV, 2 do
  local old = redis.call('HGET', KEYS[3], ARGV[i])
  if old and old ~= ARGV[i + 1] then return {'conflict', ARGV[i], old} end
end
local added = 0
for i = 4, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('RPUSH', KEYS[4], ARGV[i])
    added = added + 1
  end
end
if added > 0 then
  redis.call('HINCRBY', meta, 'n_calls', added)
  touch(false)
end
return {'ok'}
"""
)

# KEYS[3] tool call hash, KEYS[4] result hash; ARGV[3] tool call id, [4] result.
RECORD_TOOL_RESULT = (
    _PRELUDE
    + """
if not n then return {'nochain'} end
if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 0 then return {'nocall'} end
local old = redis.call('HGET', KEYS[4], 'r:' .. ARGV[3])
if old then
  if old == ARGV[4] then return {'ok'} end
  return {'conflict'}
end
redis.call('HSET', KEYS[4], 'r:' .. ARGV[3], ARGV[4], 'a:' .. ARGV[3], now)
touch(false)
return {'ok'}
"""
)

# KEYS[3..6] tool calls, order, results, lease; ARGV[3] token key prefix, [4] cutoff ('' deletes
# unconditionally; else only a chain untouched since the cutoff and unleased).
DELETE = (
    _PRELUDE
    + """
if not n then
  redis.call('ZREM', index, chain)
  return {'ok', 0}
end
if ARGV[4] ~= '' then
  if tonumber(redis.call('HGET', meta, 'updated_at')) >= tonumber(ARGV[4]) then return {'ok', 0} end
  if redis.call('EXISTS', KEYS[6]) == 1 then return {'ok', 0} end
end
for t = 0, n - 1 do redis.call('DEL', ARGV[3] .. t) end
redis.call('DEL', meta, KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('ZREM', index, chain)
return {'ok', 1}
"""
)

# KEYS[1] chain hash, KEYS[2] lease; ARGV[1] owner, [2] ttl in ms.
CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS[1] lease; ARGV[1] owner.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""
