-- KEYS: this reservation's settle marker, then per hold (the window it reserved in): its
-- counter, its leases, and the top-spenders set of its window. ARGV: the lease member, worst
-- pico and tokens, real pico and tokens (integer strings made in Rust), then per hold: soft
-- pico, soft tokens (-1: none), the subject, expire-at (0: never).
-- Runs at most once per reservation (a retried settle whose first reply was lost must not
-- release or charge twice). A lease already swept is not released again.
-- Returns, per hold: spent pico, spent tokens, 1 if this charge passed a soft threshold.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 604800) then return {} end
local out = {}
local n = (#KEYS - 1) / 3
for i = 1, n do
  local k, l, t = KEYS[3 * i - 1], KEYS[3 * i], KEYS[3 * i + 1]
  local b = 5 + (i - 1) * 4
  if redis.call('ZREM', l, ARGV[1]) == 1 then
    if ARGV[2] ~= '0' then redis.call('HINCRBY', k, 'rp', '-' .. ARGV[2]) end
    if ARGV[3] ~= '0' then redis.call('HINCRBY', k, 'rt', '-' .. ARGV[3]) end
  end
  local h = redis.call('HMGET', k, 'sp', 'st')
  local sp0, st0 = tonumber(h[1] or '0'), tonumber(h[2] or '0')
  local sp1, st1 = sp0, st0
  if ARGV[4] ~= '0' then sp1 = redis.call('HINCRBY', k, 'sp', ARGV[4]) end
  if ARGV[5] ~= '0' then st1 = redis.call('HINCRBY', k, 'st', ARGV[5]) end
  local softp, softt = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local crossed = (softp >= 0 and sp0 <= softp and sp1 > softp)
    or (softt >= 0 and st0 <= softt and st1 > softt)
  if ARGV[4] ~= '0' then redis.call('ZINCRBY', t, ARGV[4], ARGV[b + 3]) end
  local exp = tonumber(ARGV[b + 4])
  if exp > 0 then
    redis.call('EXPIREAT', k, exp)
    redis.call('EXPIREAT', t, exp)
  end
  table.insert(out, sp1)
  table.insert(out, st1)
  table.insert(out, crossed and 1 or 0)
end
return out
