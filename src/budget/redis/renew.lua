-- KEYS: the leases sets of one reservation (or the calls-in-flight sets of one rate-limit
-- grant). ARGV: its lease member, the lease's length in seconds. Moves the deadline on where
-- the lease is still held (a swept lease stays gone: its hold was released), and keeps a set
-- that would expire before the new deadline until then.
local ttl = tonumber(ARGV[2])
local deadline = tonumber(redis.call('TIME')[1]) + ttl
for _, l in ipairs(KEYS) do
  if redis.call('ZADD', l, 'XX', 'CH', deadline, ARGV[1]) == 1 then
    local t = redis.call('TTL', l)
    if t >= 0 and t < ttl + 1 then redis.call('EXPIRE', l, ttl + 1) end
  end
end
return 0
