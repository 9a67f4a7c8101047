-- KEYS: the leases sets of one reservation. ARGV: its lease member, the lease's length in
-- seconds. Moves the deadline on where the lease is still held (a swept lease stays gone:
-- its hold was released).
local deadline = tonumber(redis.call('TIME')[1]) + tonumber(ARGV[2])
for _, l in ipairs(KEYS) do
  redis.call('ZADD', l, 'XX', deadline, ARGV[1])
end
return 0
