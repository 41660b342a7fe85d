-- The daemon's republish of a row: writes the value only when its version is newer
-- than the one stored in the version sidecar. (An application's load of the key that
-- began before this cannot store: its lease recorded the older version, see
-- src/l2/lua/store.lua.)
-- KEYS[1] value key, KEYS[2] version sidecar
-- ARGV[1] version (24 hex digits), ARGV[2] value, ARGV[3] ttl in s (0: none),
-- ARGV[4] version ttl in s (0: none)
-- Returns 1 written, 0 refused (Redis holds this version or a newer one).
local stored = redis.call('GET', KEYS[2])
if stored and stored >= ARGV[1] then return 0 end
if ARGV[3] ~= '0' then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
if ARGV[4] ~= '0' then
  redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[4])
else
  redis.call('SET', KEYS[2], ARGV[1])
end
return 1
