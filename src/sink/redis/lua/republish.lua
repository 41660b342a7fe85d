-- The daemon's republish of rows: each value is written only when its version is
-- newer than the one stored in its version sidecar. (An application's load of the key
-- that began before this cannot store: its lease recorded the older version, see
-- src/l2/lua/store.lua.) One call carries several keys of one server (or one slot):
-- a script call costs Redis more than the commands it runs for one key.
-- KEYS: for each item, its value key then its version sidecar
-- ARGV: for each item, its version (24 hex digits), value, ttl in s (0: none) and
-- version ttl in s (0: none)
-- Returns how many items Redis refused (it held their version or a newer one).
local refused = 0
for i = 1, #KEYS, 2 do
  local a = 2 * i - 1
  local version = ARGV[a]
  local stored = redis.call('GET', KEYS[i + 1])
  if stored and stored >= version then
    refused = refused + 1
  else
    if ARGV[a + 2] ~= '0' then
      redis.call('SET', KEYS[i], ARGV[a + 1], 'EX', ARGV[a + 2])
    else
      redis.call('SET', KEYS[i], ARGV[a + 1])
    end
    if ARGV[a + 3] ~= '0' then
      redis.call('SET', KEYS[i + 1], version, 'EX', ARGV[a + 3])
    else
      redis.call('SET', KEYS[i + 1], version)
    end
  end
end
return refused
