-- Rate limits: counts a call against every check's limits, or refuses it counting nothing.
-- KEYS: per check, its per-second counts (a hash: field 'r<second>' requests, 't<second>'
-- tokens) and its calls in flight (a sorted set: grant id by lease end).
-- ARGV: (unused), grant id, the call's tokens (its worst case), a call in flight's lease
-- (seconds), then per check: requests per minute, tokens per minute, calls in flight (-1: no
-- limit). Seconds are Redis's own (TIME), the same for every replica.
-- A minute is the last 60 whole seconds: a count lives from its second until 60 later.
-- Returns {0, requests, tokens, requests reset, tokens reset, the second counted in} of the
-- first check after counting, or {kind, check index, limit, retry after} when refused (kind
-- 1 requests, 2 tokens, 3 calls in flight).
local now = tonumber(redis.call('TIME')[1])
local id, tokens = ARGV[2], tonumber(ARGV[3])
local lease = now + tonumber(ARGV[4])
local n = #KEYS / 2
local first = nil

-- Seconds until enough of the live counts leave the window for `need` more to fit.
local function wait(live, total, limit, need)
  table.sort(live, function(a, b) return a[1] < b[1] end)
  for _, s in ipairs(live) do
    total = total - s[2]
    if total + need <= limit then return math.max(1, s[1] + 60 - now) end
  end
  return 60
end

for i = 1, n do
  local h, f = KEYS[2 * i - 1], KEYS[2 * i]
  local a = 4 + 3 * (i - 1)
  local rpm, tpm, conc = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local all = redis.call('HGETALL', h)
  local req, tok, lr, lt, stale = 0, 0, {}, {}, {}
  local rmin, tmin = now, now
  for j = 1, #all, 2 do
    local field, v = all[j], tonumber(all[j + 1])
    local sec = tonumber(string.sub(field, 2))
    if sec <= now - 60 then
      table.insert(stale, field)
    elseif string.sub(field, 1, 1) == 'r' then
      req = req + v
      table.insert(lr, {sec, v})
      if v > 0 and sec < rmin then rmin = sec end
    else
      tok = tok + v
      table.insert(lt, {sec, v})
      if v > 0 and sec < tmin then tmin = sec end
    end
  end
  if #stale > 0 then redis.call('HDEL', h, unpack(stale)) end
  if rpm >= 0 and req + 1 > rpm then return {1, i, rpm, wait(lr, req, rpm, 1)} end
  if tpm >= 0 and tok + tokens > tpm then
    if tokens > tpm then return {2, i, tpm, 60} end
    return {2, i, tpm, wait(lt, tok, tpm, tokens)}
  end
  if conc >= 0 then
    redis.call('ZREMRANGEBYSCORE', f, '-inf', now)
    if redis.call('ZCARD', f) + 1 > conc then return {3, i, conc, 1} end
  end
  if i == 1 then
    first = {0, req + 1, tok + tokens, rmin + 60 - now, tmin + 60 - now, now}
  end
end
for i = 1, n do
  local h, f = KEYS[2 * i - 1], KEYS[2 * i]
  redis.call('HINCRBY', h, 'r' .. now, 1)
  if tokens > 0 then redis.call('HINCRBY', h, 't' .. now, tokens) end
  redis.call('EXPIRE', h, 61)
  if tonumber(ARGV[4 + 3 * (i - 1) + 3]) >= 0 then
    redis.call('ZADD', f, lease, id)
    if redis.call('TTL', f) < lease - now + 1 then redis.call('EXPIRE', f, lease - now + 1) end
  end
end
return first
