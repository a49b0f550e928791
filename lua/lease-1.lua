--[[
  lease-1: renew or release a lease taken with SET key token NX PX ttl, only while it is ours.
  Money-free: it guards who drains an outbox shard and who flushes a commission window
  (plumbing/lease.py), nothing else.

  KEYS[1]  the lease key
  ARGV[1]  "renew" or "release"
  ARGV[2]  the holder's token
  ARGV[3]  new time to live, milliseconds (renew only)

  Returns 1 done, 0 not ours (expired, or taken by another holder since).
]]

if redis.call('GET', KEYS[1]) ~= ARGV[2] then
  return 0
end
if ARGV[1] == 'renew' then
  return redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return redis.call('DEL', KEYS[1])
