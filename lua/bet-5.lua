--[[
  bet-5: settle one dice bet atomically (stake, nonce, payout, outbox, push, idempotency).

  The roll is computed by the server (games/dice.py) for the nonce it expects; this script
  only accepts it when that nonce is still the next one of the same seed pair, so a roll is
  never applied to a nonce other than the one it was computed for. Every amount is an
  integer count of minor units carried as a decimal string and handed to HINCRBY untouched
  (Lua numbers are doubles: no arithmetic on money happens here).

  KEYS[1]  balances hash of the user            (field = currency, value = minor units)
  KEYS[2]  active seed pair hash of the user     (fields pid, ss, sh, cs, n)
  KEYS[3]  idempotency record of this bet id     (fields f, b, r; expires after the window)
  KEYS[4]  outbox stream of the user's bucket
  KEYS[5]  the user's push channel (a channel, not a key; listed for cluster routing)

  ARGV[1]  currency code
  ARGV[2]  stake, minor units, canonical positive integer string
  ARGV[3]  balance change if settled: payout - stake (negative on a loss), integer string
  ARGV[4]  seed pair id the roll was computed with
  ARGV[5]  the pair's nonce the server believes is stored (the bet uses ARGV[5] + 1)
  ARGV[6]  request fingerprint (currency|amount|target|direction)
  ARGV[7]  idempotency window, milliseconds
  ARGV[8]  result blob, stored for replays (opaque to this script)
  ARGV[9]  outbox event blob (opaque to this script)
  ARGV[10] id of the socket that placed the bet (pushed so that socket can skip it)
  ARGV[11] run id of the Redis server, as the caller read it on connecting (see EPOCH)
  ARGV[12] how many other sockets of this user the calling instance holds ("0" usually)

  The push is published only when someone else can receive it: another socket of the user
  on the calling instance (ARGV[12]), or another instance subscribed to the user's channel
  (the calling instance is subscribed itself while the betting socket is open, so more than
  one subscriber means another instance).

  Returns a flat array, first element the code (server/scripts.py: BetCode):
  {0, balance, nonce}          SETTLED: balance after the bet, the nonce used
  {1, balance, result_blob}    REPLAY: same bet id and fields within the window
  {2}                          CONFLICT: same bet id, other fields
  {3, balance}                 INSUFFICIENT_FUNDS: nothing changed, no nonce used
  {4, pair_id, nonce}          STALE: the stored pair or nonce differs; recompute and retry
  {5}                          NO_SEED: the user has no active seed pair
  {6, pair_id}                 EPOCH: the pair was installed before this Redis (re)started;
                               writes may have been lost, so a nonce already shown could
                               come again: the caller rotates the pair and retries

  The balance after a change is read back with HGET: HINCRBY's integer reply would become a
  Lua double (inexact past 2^53, "%.14g" when concatenated). The balance moves before the
  nonce, so an HINCRBY that fails (overflow) leaves nothing changed.
]]

local rec = redis.call('HMGET', KEYS[3], 'f', 'b', 'r')
if rec[1] then
  if rec[1] == ARGV[6] then
    return {1, rec[2], rec[3]}
  end
  return {2}
end

local seed = redis.call('HMGET', KEYS[2], 'pid', 'n', 'rid')
if not seed[1] then
  return {5}
end
if seed[3] ~= ARGV[11] then
  return {6, seed[1]}
end
if seed[1] ~= ARGV[4] or seed[2] ~= ARGV[5] then
  return {4, seed[1], seed[2]}
end

-- Exact comparison of canonical non-negative integer strings (no float rounding).
local balance = redis.call('HGET', KEYS[1], ARGV[1]) or '0'
local stake = ARGV[2]
if #balance < #stake or (#balance == #stake and balance < stake) then
  return {3, balance}
end

redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[3])
local after = redis.call('HGET', KEYS[1], ARGV[1])
local nonce = redis.call('HINCRBY', KEYS[2], 'n', 1)
redis.call('HSET', KEYS[3], 'f', ARGV[6], 'b', after, 'r', ARGV[8])
redis.call('PEXPIRE', KEYS[3], ARGV[7])
redis.call('XADD', KEYS[4], '*', 'k', 'bet', 'e', ARGV[9], 'b', after)
if ARGV[12] ~= '0' or redis.call('PUBSUB', 'NUMSUB', KEYS[5])[2] > 1 then
  redis.call('PUBLISH', KEYS[5], 'bet|' .. ARGV[10] .. '|' .. ARGV[1] .. '|' .. after)
end
return {0, after, nonce}
