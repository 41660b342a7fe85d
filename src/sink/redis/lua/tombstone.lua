-- The daemon's delete of a republished key: unlinks the key and its lease and leaves
-- the version as a tombstone, unless Redis holds this version or a newer one.
-- KEYS[1] value key, KEYS[2] version sidecar, KEYS[3] lease sidecar
-- ARGV[1] version (24 hex digits), ARGV[2] version ttl in s
-- Returns 1 written, 0 refused.
local stored = redis.call('GET', KEYS[2])
if stored and stored >= ARGV[1] then return 0 end
redis.call('UNLINK', KEYS[1], KEYS[3])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
return 1
