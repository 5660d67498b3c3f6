"""The Lua scripts of the Redis budget ledger (``storage/redis_ledger.py``): check and
reserve, settle, and the rebuild from the log. Each runs as one step in Redis, so the
check and the reservation stay atomic across workers and machines.

What the keys hold (P is ``budgets.redis_prefix``):

- ``P:c:SCOPE:TAG:PERIOD:END`` — one hash per dimension and calendar period (END: the
  period's end in ms; 0 for sessions): ``s:VALUE`` spent, ``r:VALUE`` held by calls in
  progress, ``w:MARK:VALUE`` / ``l:MARK:VALUE`` the warning and the limit already
  announced this period. It expires at the period's end (a relative PEXPIRE from the
  proxy's clock); a session hash a session window after its last use, and each
  session's fields once idle that long (``…:idle``, a sorted set of last uses).
- ``P:holds`` — a sorted set of reservations by deadline (ms); ``P:hold`` their
  units and counters (JSON), so an expired one is released by the next reserve.
- ``P:built`` — a hash naming each dimension rebuilt from the log since Redis last
  started empty: a dimension missing here makes a reserve answer -1 (rebuild first).

Money stays exact: amounts travel as decimal strings and are added by HINCRBY (64-bit).
The comparisons are Lua numbers (doubles): exact to the unit below 2^53 units, about
$900,000, which no budget period comes near.
"""

from __future__ import annotations

# Releases one reservation: its units off each counter's "r:" field (only where the
# counter still exists: an ended period's hash is gone and must not come back).
_RELEASE = """
local function release(holds, info, id)
  local h = redis.call('HGET', info, id)
  if h then
    h = cjson.decode(h)
    if h.u ~= '0' then
      for i, key in ipairs(h.k) do
        local f = 'r:' .. h.v[i]
        if redis.call('HEXISTS', key, f) == 1 then
          if redis.call('HINCRBY', key, f, '-' .. h.u) <= 0 then redis.call('HDEL', key, f) end
        end
      end
    end
    redis.call('HDEL', info, id)
  end
  redis.call('ZREM', holds, id)
end

-- A session's last use, and the forgetting of sessions idle for a whole window
-- (a few at a time; one still holding a reservation is kept).
local function touch_idle(key, v, now, ttl, window)
  local idle = key .. ':idle'
  local old = redis.call('ZRANGEBYSCORE', idle, '-inf', now - window, 'LIMIT', 0, 16)
  for _, o in ipairs(old) do
    if o ~= v and redis.call('HEXISTS', key, 'r:' .. o) == 0 then
      redis.call('HDEL', key, 's:' .. o)
      redis.call('ZREM', idle, o)
    end
  end
  redis.call('ZADD', idle, now, v)
  redis.call('PEXPIRE', idle, ttl)
end
"""

# KEYS: built, holds, hold info, then one counter hash per dimension reserved on.
# ARGV: now (ms), worst (units), override (0/1), warn_at, hold id, deadline (ms),
#   number of dimensions, number of checks, session window (ms);
#   per dimension: value, ttl (ms), idle (0/1), its name in ``built``; per check (an applicable limit):
#   dimension index, limit (units), mark, period end (ms, for ties).
# Returns {-1} when a dimension was never rebuilt, else {status (0 admitted, 1 refused,
# 2 admitted by an override), refused check (0: none), new limit (0/1), the refused
# budget's spent and reserved before this call, then per check after this call:
# spent, reserved, warning (0/1), new warning (0/1)}.
RESERVE = (
    _RELEASE
    + """
local now = tonumber(ARGV[1])
local worst = ARGV[2]
local worst_n = tonumber(worst)
local override = ARGV[3] == '1'
local warn_at = tonumber(ARGV[4])
local n_dims, n_checks, window = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local D, C = 9, 9 + 4 * n_dims
local function arg(d, k) return ARGV[D + 4 * (d - 1) + k] end

for d = 1, n_dims do
  if redis.call('HEXISTS', KEYS[1], arg(d, 4)) == 0 then return {-1} end
end

local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 64)
for _, id in ipairs(expired) do release(KEYS[2], KEYS[3], id) end

local function check(i)
  local o = C + 4 * (i - 1)
  local d = tonumber(ARGV[o + 1])
  return KEYS[3 + d], arg(d, 1), tonumber(ARGV[o + 2]), ARGV[o + 3], tonumber(ARGV[o + 4]), d
end
local function counts(key, v)
  return redis.call('HGET', key, 's:' .. v) or '0', redis.call('HGET', key, 'r:' .. v) or '0'
end

-- Refused if this call could cross the limit, or the limit is already reached (so a
-- call of unknown price cannot slip past an exhausted budget); of several, the one
-- with the least headroom, then the earliest reset, then the first.
local refused, room_min, end_min, before_s, before_r = 0, 0, 0, '0', '0'
for i = 1, n_checks do
  local key, v, units, _, ends = check(i)
  local s, r = counts(key, v)
  local used = tonumber(s) + tonumber(r)
  if used + worst_n > units or used >= units then
    local room = units - used
    if refused == 0 or room < room_min or (room == room_min and ends < end_min) then
      refused, room_min, end_min, before_s, before_r = i, room, ends, s, r
    end
  end
end

local status, new_limit = 0, 0
if refused > 0 then
  if not override then
    local key, v, _, mark, _, d = check(refused)
    new_limit = redis.call('HSETNX', key, 'l:' .. mark .. ':' .. v, '1')
    redis.call('PEXPIRE', key, arg(d, 2))
    return {1, refused, new_limit, before_s, before_r}
  end
  status = 2
end

for d = 1, n_dims do
  local key, v, ttl = KEYS[3 + d], arg(d, 1), arg(d, 2)
  if worst_n > 0 then redis.call('HINCRBY', key, 'r:' .. v, worst) end
  redis.call('PEXPIRE', key, ttl)
  if arg(d, 3) == '1' then touch_idle(key, v, now, ttl, window) end
end
if worst_n > 0 and n_dims > 0 then
  local keys, vals = {}, {}
  for d = 1, n_dims do keys[d] = KEYS[3 + d]; vals[d] = arg(d, 1) end
  redis.call('HSET', KEYS[3], ARGV[5], cjson.encode({u = worst, k = keys, v = vals}))
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
end

local out = {status, refused, 0, before_s, before_r}
for i = 1, n_checks do
  local key, v, units, mark = check(i)
  local s, r = counts(key, v)
  local used = tonumber(s) + tonumber(r)
  local fraction
  if units <= 0 then
    if used > 0 then fraction = math.huge else fraction = 1.0 end
  else
    fraction = used / units
  end
  local warn, new = 0, 0
  if fraction >= warn_at then
    warn = 1
    new = redis.call('HSETNX', key, 'w:' .. mark .. ':' .. v, '1')
  end
  out[#out + 1] = s
  out[#out + 1] = r
  out[#out + 1] = warn
  out[#out + 1] = new
end
return out
"""
)

# KEYS: holds, hold info, built, then the hold's counter hashes.
# ARGV: hold id ('' when nothing was reserved), actual cost (units), now (ms), session
#   window (ms), when the settle was queued (ms), margin (ms); per counter: value, ttl
#   (ms; 0: its period is over, the cost is not added), idle (0/1), dimension name;
#   last, the settle's token key and how long to keep it (ms).
# A hold already released (expired, or Redis emptied since) only adds the cost. The
# cost is not added to a dimension rebuilt from the log after the call ended (its
# record was in the log by then: a settle held back while Redis was down).
SETTLE = (
    _RELEASE
    + """
local now, window = tonumber(ARGV[3]), tonumber(ARGV[4])
local queued, margin = tonumber(ARGV[5]), tonumber(ARGV[6])
-- The last two: this settle's token and how long to remember it. A settle whose answer
-- was lost is sent again; the second one finds its token and changes nothing.
if not redis.call('SET', ARGV[#ARGV - 1], '1', 'NX', 'PX', ARGV[#ARGV]) then return 0 end
if ARGV[1] ~= '' then release(KEYS[1], KEYS[2], ARGV[1]) end
if ARGV[2] ~= '0' then
  for i = 4, #KEYS do
    local o = 6 + 4 * (i - 4)
    local key, v, ttl = KEYS[i], ARGV[o + 1], ARGV[o + 2]
    local built = tonumber(redis.call('HGET', KEYS[3], ARGV[o + 4]) or '0')
    if ttl ~= '0' and built <= queued + margin then
      redis.call('HINCRBY', key, 's:' .. v, ARGV[2])
      redis.call('PEXPIRE', key, ttl)
      if ARGV[o + 3] == '1' then touch_idle(key, v, now, ttl, window) end
    end
  end
end
return 1
"""
)

# KEYS: built, then one counter hash per dimension.
# ARGV: now (ms), session window (ms); per dimension: its name in ``built``, ttl (ms),
#   idle (0/1); then per counter: dimension index, value, spent (units), last use (ms).
# Applies the spend replayed from the log to each dimension not yet marked built, and
# marks it: a dimension another worker rebuilt meanwhile is left alone. A counter that
# calls settled on meanwhile keeps the larger figure (the log already holds most of
# those calls: adding would count them twice).
REBUILD = """
local n = #KEYS - 1
local todo, done = {}, 0
for d = 1, n do
  todo[d] = redis.call('HEXISTS', KEYS[1], ARGV[2 + 3 * (d - 1) + 1]) == 0
end
for j = 3 + 3 * n, #ARGV, 4 do
  local d = tonumber(ARGV[j])
  if todo[d] then
    local key, v, spent = KEYS[1 + d], ARGV[j + 1], ARGV[j + 2]
    local cur = redis.call('HGET', key, 's:' .. v)
    if not cur or tonumber(cur) < tonumber(spent) then redis.call('HSET', key, 's:' .. v, spent) end
    local ttl = ARGV[2 + 3 * (d - 1) + 2]
    redis.call('PEXPIRE', key, ttl)
    if ARGV[2 + 3 * (d - 1) + 3] == '1' then
      local idle = key .. ':idle'
      local last = tonumber(redis.call('ZSCORE', idle, v) or '0')
      if last < tonumber(ARGV[j + 3]) then redis.call('ZADD', idle, ARGV[j + 3], v) end
      redis.call('PEXPIRE', idle, ttl)
    end
  end
end
for d = 1, n do
  if todo[d] then
    redis.call('HSET', KEYS[1], ARGV[2 + 3 * (d - 1) + 1], ARGV[1])
    done = done + 1
  end
end
return done
"""
