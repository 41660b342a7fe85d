-- The daemon's tag purge on one server: for each tag set, unlinks every member, then
-- the sets. Applications register a key and its lease sidecar in the set (see
-- src/l2/lua/fetch.lua), so a load under a purged tag loses its lease here.
-- KEYS: tag sets. Returns the number of members unlinked.
local total = 0
for k = 1, #KEYS do
  local members = redis.call('SMEMBERS', KEYS[k])
  for i = 1, #members, 500 do
    redis.call('UNLINK', unpack(members, i, math.min(i + 499, #members)))
  end
  total = total + #members
end
redis.call('UNLINK', unpack(KEYS))
return total
