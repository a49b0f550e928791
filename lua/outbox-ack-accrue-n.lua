--[[
  outbox-ack-accrue-n: acknowledge (XACK + XDEL) persisted outbox entries and add their bets'
  commissions to the pending hash of their bucket, atomically: a bet's commissions are
  accrued exactly when its entry stops being pending, which happens once.

  Called by workers/outbox.py only after the entries' rows are COMMITted in PostgreSQL. A
  crash before this call leaves the entries pending: the replay writes the rows again
  (nothing new) and makes this call. Two consumers holding the same entries (a reclaim of a
  slow consumer, a lease that failed to exclude): the first call acknowledges and accrues,
  the second finds them no longer pending and changes nothing. Amounts are integer minor
  units as decimal strings handed to HINCRBY untouched (no Lua arithmetic on money).

  Any number of buckets per call, two keys each. A bucket's stream and hash carry the same
  hash tag {bN}; on a Redis Cluster the caller sends one call per bucket (like XREADGROUP).

  KEYS[2k-1]  outbox stream of the k-th bucket
  KEYS[2k]    pending commission hash of that bucket (field "<ancestor_id>|<currency>")

  ARGV[1]     consumer group
  ARGV[2]     consumer (the caller)
  ARGV[3k]    ids of the k-th stream's entries whose commissions this call accrues,
              separated by spaces
  ARGV[3k+1]  ids of its other entries to acknowledge (nothing to accrue)
  ARGV[3k+2]  the k-th bucket's commissions, the sum over its first ids: a msgpack array
              [field, amount, field, amount, ...], every one a string (amounts > 0, as
              decimal strings: a Lua number would round past 2^53); "" for none

  Returns:
  {1}                 done: every id acknowledged and deleted, every amount added
  {0, ids_1, ...}     some of the first ids were no longer pending (another consumer
                      acknowledged them): NOTHING was acknowledged or added; ids_k are the
                      k-th stream's first ids still pending (now claimed by this consumer),
                      the ones to call again with
]]

local CHUNK = 500
local group, consumer = ARGV[1], ARGV[2]
local buckets = #KEYS / 2

local function split(s)
  local out = {}
  for word in string.gmatch(s, '%S+') do
    out[#out + 1] = word
  end
  return out
end

local accruing, missing = {}, false
local claimed = {0}
for k = 1, buckets do
  local ids = split(ARGV[3 * k])
  accruing[k] = ids
  local got = {}
  for i = 1, #ids, CHUNK do
    local args = {unpack(ids, i, math.min(i + CHUNK - 1, #ids))}
    args[#args + 1] = 'JUSTID'
    for _, id in ipairs(redis.call('XCLAIM', KEYS[2 * k - 1], group, consumer, 0,
                                   unpack(args))) do
      got[#got + 1] = id
    end
  end
  if #got < #ids then
    missing = true
  end
  claimed[k + 1] = table.concat(got, ' ')
end
if missing then
  return claimed
end

local function ack(stream, ids)
  for i = 1, #ids, CHUNK do
    local j = math.min(i + CHUNK - 1, #ids)
    redis.call('XACK', stream, group, unpack(ids, i, j))
    redis.call('XDEL', stream, unpack(ids, i, j))
  end
end
for k = 1, buckets do
  ack(KEYS[2 * k - 1], accruing[k])
  ack(KEYS[2 * k - 1], split(ARGV[3 * k + 1]))
  if ARGV[3 * k + 2] ~= '' then
    local amounts = cmsgpack.unpack(ARGV[3 * k + 2])
    for i = 1, #amounts, 2 do
      redis.call('HINCRBY', KEYS[2 * k], amounts[i], amounts[i + 1])
    end
  end
end
return {1}
