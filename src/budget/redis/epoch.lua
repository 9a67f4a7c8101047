-- KEYS: the epoch key. ARGV: a new epoch value (set only if there is none).
-- Returns the epoch. SET is a write even when NX leaves the key alone, so a read-only replica
-- refuses this script: it also tells whether the connection reaches a master that takes writes.
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
