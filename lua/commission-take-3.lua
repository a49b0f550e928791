--[[
  commission-take-3: take a bucket's pending commissions atomically as a batch, and list the
  batches of the bucket that are taken but not finished (this one included).

  RENAME moves the whole hash in one step: an accrual that runs after it starts a new
  pending hash, so no increment is lost between the read and the delete. The batch id goes
  into the bucket's set of unfinished batches in the same call, so a flusher that dies after
  this point leaves a batch the next flusher finds without SCAN or KEYS.

  KEYS[1]  pending hash of the bucket
  KEYS[2]  batch hash to create: the pending hash renamed, "<batch_id>" in its name
  KEYS[3]  set of unfinished batch ids of the bucket

  ARGV[1]  batch id (unique per flush)

  Returns a flat array {code, id1, id2, ...}: the code, then every unfinished batch id of
  the bucket (SMEMBERS of KEYS[3] after this call). Codes (games/codes.py: TakeCode):
  0  EMPTY: nothing pending
  1  TAKEN: the pending hash is now KEYS[2]
  2  BUSY: KEYS[2] exists already (this batch id was used on this bucket and is not
     finished); nothing was taken, the pending hash waits for the next flush
]]

local code = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    code = 2
  else
    redis.call('RENAME', KEYS[1], KEYS[2])
    redis.call('SADD', KEYS[3], ARGV[1])
    code = 1
  end
end
local reply = redis.call('SMEMBERS', KEYS[3])
table.insert(reply, 1, code)
return reply
