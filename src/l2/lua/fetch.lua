-- wal2cache::l2, step 1 of a read: the cached value, or a lease to load it.
-- KEYS[1] the cached key
-- KEYS[2] its lease sidecar ({KEY}:w2c:l, see the README's "Redis layout")
-- KEYS[3] its version sidecar ({KEY}:w2c:v, written by the daemon's republish and
--         tombstone scripts)
-- KEYS[4..] tag sets (tag_prefix + tag) to register the key in, on one server only;
--           in a Redis Cluster they live in other slots: after a grant the client
--           runs SADD SET KEY LEASE on each itself, before it loads
-- ARGV[1] a random token (this load's, without spaces), ARGV[2] the lease's expiry in ms
-- The lease holds "TOKEN VERSION" (VERSION: the version sidecar now, or "-"), so that
-- store.lua can tell whether the daemon republished or tombstoned the key meanwhile.
-- Returns {1, value}  a hit (the value may be the not-found marker)
--         {2}         the lease is this token's: load, then store.lua
--         {3, pttl}   another load holds the lease (pttl ms left): wait and retry
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
local version = redis.call('GET', KEYS[3]) or '-'
if redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. version, 'NX', 'PX', ARGV[2]) then
  -- Registered before the load, with the lease: a tag purge from now on unlinks
  -- both, so a value read before the purge's commit cannot be stored.
  for i = 4, #KEYS do
    redis.call('SADD', KEYS[i], KEYS[1], KEYS[2])
  end
  return {2}
end
return {3, redis.call('PTTL', KEYS[2])}
