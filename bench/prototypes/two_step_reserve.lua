--[[
  Prototype B, step 1 of 2 (docs/decisions.md): allocate the nonce and take the stake.

  The roll is not known here. This call checks idempotency and the balance, increments the
  pair's nonce, debits the stake and writes a pending record naming everything the outcome
  depends on (pair id, nonce, stake, target, direction, multiplier). The server then computes
  the roll for (pair, nonce) and calls two_step_settle.lua. If the server dies in between,
  a recovery sweep finds the record in the bucket's pending index and settles it with the
  same deterministic outcome (server seed of the pair + nonce).

  KEYS[1]  balances hash of the user
  KEYS[2]  active seed pair hash of the user     (fields pid, ss, sh, cs, n)
  KEYS[3]  idempotency record of this bet id     (written by the settle step)
  KEYS[4]  pending record of this bet id         (hash; deleted by the settle step)
  KEYS[5]  pending index of the user's bucket    (sorted set: member = KEYS[4], score = ms)

  ARGV[1]  currency code
  ARGV[2]  stake, minor units, canonical positive integer string
  ARGV[3]  request fingerprint
  ARGV[4]  target, hundredths
  ARGV[5]  direction
  ARGV[6]  multiplier, units of 1e-4
  ARGV[7]  time, integer milliseconds since the epoch

  Returns:
  {0, pair_id, nonce, balance}    RESERVED: stake debited, pending record written
  {1, balance, result_blob}       REPLAY: already settled
  {2}                             CONFLICT
  {3, balance}                    INSUFFICIENT_FUNDS (no nonce used)
  {5}                             NO_SEED
  {7, pair_id, nonce}             PENDING: reserved earlier, not settled yet; settle it
]]

local rec = redis.call('HMGET', KEYS[3], 'f', 'b', 'r')
if rec[1] then
  if rec[1] == ARGV[3] then
    return {1, rec[2], rec[3]}
  end
  return {2}
end
local pend = redis.call('HMGET', KEYS[4], 'f', 'pid', 'n')
if pend[1] then
  if pend[1] == ARGV[3] then
    return {7, pend[2], pend[3]}
  end
  return {2}
end

local seed = redis.call('HMGET', KEYS[2], 'pid', 'n')
if not seed[1] then
  return {5}
end

local balance = redis.call('HGET', KEYS[1], ARGV[1]) or '0'
local stake = ARGV[2]
if #balance < #stake or (#balance == #stake and balance < stake) then
  return {3, balance}
end

local nonce = redis.call('HINCRBY', KEYS[2], 'n', 1)
local after = redis.call('HINCRBY', KEYS[1], ARGV[1], '-' .. stake)
redis.call('HSET', KEYS[4], 'f', ARGV[3], 'pid', seed[1], 'n', nonce, 'c', ARGV[1],
  'a', stake, 't', ARGV[4], 'd', ARGV[5], 'm', ARGV[6], 'ts', ARGV[7])
redis.call('ZADD', KEYS[5], ARGV[7], KEYS[4])
return {0, seed[1], nonce, after}
