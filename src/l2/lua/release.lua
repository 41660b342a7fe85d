-- wal2cache::l2: give a lease back without storing (the loader failed), so that a
-- waiting reader takes it at once instead of after its expiry.
-- KEYS[1] the lease sidecar; ARGV[1] the token
-- Returns 1 released, 0 it was not this token's (nothing done)
local lease = redis.call('GET', KEYS[1])
if lease and string.sub(lease, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
