-- The first step of a tag purge in a Redis Cluster, where a tag set's members live in
-- other slots and one script cannot unlink them: moves the set's members into its
-- purge sidecar ({SET}:w2c:p, same slot) and deletes the set, atomically. Keys an
-- application registers from now on go into a new set, for the next purge; what was
-- registered before is in the sidecar, whose members the daemon unlinks next (keys
-- and their leases), then the sidecar. Merging into the sidecar (not renaming over
-- it) keeps the members of a purge that a crash interrupted: the replay unlinks them.
-- KEYS[1] tag set, KEYS[2] its purge sidecar. Returns the members to unlink.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SUNIONSTORE', KEYS[2], KEYS[2], KEYS[1])
  redis.call('UNLINK', KEYS[1])
end
return redis.call('SMEMBERS', KEYS[2])
