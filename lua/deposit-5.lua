--[[
  deposit-5: credit a deposit exactly once per idempotency key.

  KEYS[1]  balances hash of the user
  KEYS[2]  deposit idempotency record (fields f, b; kept: PostgreSQL holds the key too)
  KEYS[3]  outbox stream of the user's bucket
  KEYS[4]  the user's push channel (a shard channel: SPUBLISH)
  KEYS[5]  the user's heal marker (lua/heal-n.lua)

  ARGV[1]  currency code
  ARGV[2]  amount, minor units, canonical positive integer string
  ARGV[3]  request fingerprint (user|currency|amount)
  ARGV[4]  outbox event blob (opaque to this script)
  ARGV[5]  run id of the Redis server as the caller read it
  ARGV[6]  optional outbox limit: at least that many entries in KEYS[3] refuses the credit
           ("0" or absent: no limit)

  Returns (games/codes.py: DepositCode):
  {0, balance}   CREDITED: balance after the deposit
  {1, balance}   REPLAY: this key was credited before; the balance it answered then
  {2}            CONFLICT: this key was used with other fields
  {3}            OUTBOX_FULL: the outbox is at its limit; nothing changed
  {4}            HEAL: the heal marker is not ARGV[5] (Redis restarted since the user's
                 state was last made equal to the ledger); nothing changed: the caller
                 heals the user (which may credit this very deposit), then retries

  The balance is read back with HGET after HINCRBY, so it stays an exact integer string.
]]

if redis.call('GET', KEYS[5]) ~= ARGV[5] then
  return {4}
end
local rec = redis.call('HMGET', KEYS[2], 'f', 'b')
if rec[1] then
  if rec[1] == ARGV[3] then
    return {1, rec[2]}
  end
  return {2}
end
local cap = tonumber(ARGV[6] or '0')
if cap > 0 and redis.call('XLEN', KEYS[3]) >= cap then
  return {3}
end
redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
local after = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'f', ARGV[3], 'b', after)
redis.call('XADD', KEYS[3], '*', 'k', 'deposit', 'e', ARGV[4], 'b', after)
redis.call('SPUBLISH', KEYS[4], 'deposit|-|' .. ARGV[1] .. '|' .. after)
return {0, after}
