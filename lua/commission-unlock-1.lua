--[[
  commission-unlock-1: release the flush lease, only if this flusher still holds it.

  KEYS[1]  the lease key (SET NX PX <token> by the flusher)
  ARGV[1]  the flusher's token

  Returns 1 released, 0 not ours (expired, or taken by another flusher since).
]]

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
