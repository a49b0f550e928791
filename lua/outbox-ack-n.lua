--[[
  outbox-ack-n: acknowledge persisted outbox entries and delete them (XACK + XDEL), in one
  atomic call, so an entry is never acknowledged and left in its stream (a stream's length
  is what is not yet persisted).

  Called by workers/outbox.py only after the entries' rows are COMMITted in PostgreSQL. It
  moves no money: what a bet's commissions owe is recorded with the bet row itself and paid
  by the flush (workers/commissions.py), so acknowledging an entry twice, or one another
  consumer acknowledged, or one a Redis rollback brought back and that is persisted again,
  changes nothing that matters.

  Any number of streams per call. On a Redis Cluster the caller sends one call per stream
  (every stream carries its bucket's hash tag {bN}).

  KEYS[k]     outbox stream of the k-th bucket
  ARGV[1]     consumer group
  ARGV[k+1]   ids of the k-th stream's entries to acknowledge, separated by spaces

  Returns the number of entries that were still pending (XACK's count, summed).
]]

local CHUNK = 500
local group = ARGV[1]
local acked = 0
for k = 1, #KEYS do
  local ids = {}
  for word in string.gmatch(ARGV[k + 1], '%S+') do
    ids[#ids + 1] = word
  end
  for i = 1, #ids, CHUNK do
    local j = math.min(i + CHUNK - 1, #ids)
    acked = acked + redis.call('XACK', KEYS[k], group, unpack(ids, i, j))
    redis.call('XDEL', KEYS[k], unpack(ids, i, j))
  end
end
return acked
