-- KEYS: this replica's shipped marker, then one per-day totals hash per day shipped.
-- ARGV: the last row id the replica believes Redis has, the last row id of this batch, the
-- marker's time to live in seconds (0: none), then per day hash: its expire-at (0: never),
-- its number of fields N, then N pairs of field and amount (integer strings made in Rust).
-- Applies a batch only on top of exactly the rows Redis has: a batch whose first reply was
-- lost, or one sent after Redis lost its data, is answered with the marker instead (the row
-- id to ship after), so no row is ever added twice.
-- Returns -1 when applied, else the marker (0 when there is none).
local have = tonumber(redis.call('GET', KEYS[1]) or '0')
if have ~= tonumber(ARGV[1]) then return have end
local a = 4
for i = 2, #KEYS do
  local exp, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, n do
    redis.call('HINCRBY', KEYS[i], ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  if exp > 0 then redis.call('EXPIREAT', KEYS[i], exp) end
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return -1
