-- KEYS: this reservation's settle marker, then per cap: its counter (a hash of spent and
-- reserved pico-USD and tokens) and its leases (a sorted set of "id|pico|tokens" scored by
-- deadline). ARGV: the lease member, worst pico, worst tokens, the lease's length in seconds
-- (timed by Redis' clock, the same for every replica), then per cap:
-- cap pico, cap tokens (-1: none), expire-at (0: never).
-- Returns {0} when reserved; {-1} when this reservation was already cancelled (its settle
-- ran first: the reply of an earlier attempt was lost); otherwise, per cap that would be
-- passed, {index, kind (0 USD, 1 tokens), 1 if settled spend alone passes it}.
-- Lua numbers are doubles: exact to 2^53 pico-USD (9,007 USD) per window; past that the
-- comparison is off by picodollars.
if redis.call('EXISTS', KEYS[1]) == 1 then return {-1} end
local now = tonumber(redis.call('TIME')[1])
local deadline = now + tonumber(ARGV[4])
local wp, wt = tonumber(ARGV[2]), tonumber(ARGV[3])
local n = (#KEYS - 1) / 2
local fails = {}
for i = 1, n do
  local k, l = KEYS[2 * i], KEYS[2 * i + 1]
  -- Leases past their deadline belong to calls whose replica died or lost them: release.
  local gone = redis.call('ZRANGEBYSCORE', l, '-inf', now, 'LIMIT', 0, 1000)
  for _, m in ipairs(gone) do
    local p, t = string.match(m, '|(%d+)|(%d+)$')
    if p and p ~= '0' then redis.call('HINCRBY', k, 'rp', '-' .. p) end
    if t and t ~= '0' then redis.call('HINCRBY', k, 'rt', '-' .. t) end
    redis.call('ZREM', l, m)
  end
  local b = 4 + (i - 1) * 3
  local cp, ct = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local h = redis.call('HMGET', k, 'sp', 'st', 'rp', 'rt')
  local sp, st = tonumber(h[1] or '0'), tonumber(h[2] or '0')
  local rp, rt = tonumber(h[3] or '0'), tonumber(h[4] or '0')
  local ou = cp >= 0 and sp + rp + wp > cp
  local ot = ct >= 0 and st + rt + wt > ct
  if ou or ot then
    local settled = (cp >= 0 and sp + wp > cp) or (ct >= 0 and st + wt > ct)
    table.insert(fails, i)
    table.insert(fails, ou and 0 or 1)
    table.insert(fails, settled and 1 or 0)
  end
end
if #fails > 0 then return fails end
for i = 1, n do
  local k, l = KEYS[2 * i], KEYS[2 * i + 1]
  if ARGV[2] ~= '0' then redis.call('HINCRBY', k, 'rp', ARGV[2]) end
  if ARGV[3] ~= '0' then redis.call('HINCRBY', k, 'rt', ARGV[3]) end
  redis.call('ZADD', l, deadline, ARGV[1])
  local exp = tonumber(ARGV[4 + (i - 1) * 3 + 3])
  if exp > 0 then
    redis.call('EXPIREAT', k, exp)
    redis.call('EXPIREAT', l, exp)
  end
end
return {0}
