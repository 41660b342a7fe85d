-- wal2cache::l2, step 2 of a read that got the lease: store the loaded value, only if
-- the lease is still this token's and the key's version has not changed since it was
-- granted. The daemon unlinks a key's lease whenever it deletes the key (and a tag
-- purge unlinks the leases registered in the tag's set); a republish or a tombstone
-- changes the version sidecar. Either way a value loaded before such a change is never
-- stored.
-- KEYS[1] the cached key, KEYS[2] its lease sidecar, KEYS[3] its version sidecar
-- ARGV[1] the token, ARGV[2] the value (or the not-found marker),
-- ARGV[3] its expiry in ms (0: none)
-- Returns 1 stored; 0 lease lost (removed, expired, another's, or the key changed
--         version): nothing stored; 2 the key holds a value already: left as it is
local version = redis.call('GET', KEYS[3]) or '-'
if redis.call('GET', KEYS[2]) ~= ARGV[1] .. ' ' .. version then return 0 end
redis.call('DEL', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 1 then return 2 end
if ARGV[3] ~= '0' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
