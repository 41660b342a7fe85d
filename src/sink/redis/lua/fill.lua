-- A backfill's values once the stream has moved past their version (see `settled` in
-- src/backfill/mod.rs): each value is written only when no version as new as its own
-- is stored beside its key (a change or a delete the stream applied since the
-- snapshot), as the republish script does, but the value leaves no version of its
-- own: the stream will never again apply a change older than it, and a change newer
-- than it writes its own version. One SET a key instead of two.
-- KEYS: for each item, its value key then its version sidecar
-- ARGV: the version of every item (24 hex digits), their ttl in s (0: none), then
-- each item's value
-- Returns how many items Redis refused (it held their version or a newer one).
local n = #KEYS / 2
local sidecars = {}
for j = 1, n do
  sidecars[j] = KEYS[2 * j]
end
local stored = redis.call('MGET', unpack(sidecars))
local version, ttl = ARGV[1], ARGV[2]
local refused = 0
for j = 1, n do
  local s = stored[j]
  if s and s >= version then
    refused = refused + 1
  elseif ttl ~= '0' then
    redis.call('SET', KEYS[2 * j - 1], ARGV[j + 2], 'EX', ttl)
  else
    redis.call('SET', KEYS[2 * j - 1], ARGV[j + 2])
  end
end
return refused
