-- The daemon's delete of republished keys: each key and its lease are unlinked and
-- the version stays as a tombstone, unless Redis holds this version or a newer one.
-- One call carries several keys of one server (or one slot).
-- KEYS: for each item, its value key, version sidecar and lease sidecar
-- ARGV: for each item, its version (24 hex digits) and the version's ttl in s
-- Returns how many items Redis refused.
local refused = 0
for i = 1, #KEYS, 3 do
  local a = 2 * (i - 1) / 3 + 1
  local version = ARGV[a]
  local stored = redis.call('GET', KEYS[i + 1])
  if stored and stored >= version then
    refused = refused + 1
  else
    redis.call('UNLINK', KEYS[i], KEYS[i + 2])
    redis.call('SET', KEYS[i + 1], version, 'EX', ARGV[a + 1])
  end
end
return refused
