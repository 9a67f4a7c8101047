-- Settles a call counted by limit.lua: its tokens become what it used, and it leaves the
-- calls in flight; undone, it counts nothing (a later check refused it).
-- KEYS: as limit.lua's. ARGV: the second it was counted in, grant id, tokens counted, tokens
-- used, undo (1 or 0).
local sec, id = ARGV[1], ARGV[2]
local counted, used, undo = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5] == '1'
for i = 1, #KEYS / 2 do
  local h, f = KEYS[2 * i - 1], KEYS[2 * i]
  redis.call('ZREM', f, id)
  -- (Gone with its minute: nothing left to correct.)
  if redis.call('HEXISTS', h, 'r' .. sec) == 1 then
    if undo then redis.call('HINCRBY', h, 'r' .. sec, -1) end
    local delta = undo and -counted or used - counted
    if delta ~= 0 then
      local now = tonumber(redis.call('HGET', h, 't' .. sec) or '0')
      redis.call('HSET', h, 't' .. sec, math.max(0, now + delta))
    end
  end
end
return 0
