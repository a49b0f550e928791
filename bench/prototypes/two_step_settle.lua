--[[
  Prototype B, step 2 of 2 (docs/decisions.md): credit the payout of a reserved bet.

  Idempotent: settles only while the pending record exists, so the server and a recovery
  sweep may both try; the second finds nothing to do. The payout was computed from the
  record's (pair, nonce) by games.dice, by whichever of them calls.

  KEYS[1]  balances hash of the user
  KEYS[2]  pending record of this bet id
  KEYS[3]  idempotency record of this bet id
  KEYS[4]  outbox stream of the user's bucket
  KEYS[5]  pending index of the user's bucket
  KEYS[6]  the user's push channel

  ARGV[1]  currency code
  ARGV[2]  payout, minor units (0 on a loss), canonical integer string
  ARGV[3]  nonce the payout was computed for (must match the record)
  ARGV[4]  result blob, stored for replays
  ARGV[5]  outbox event blob
  ARGV[6]  idempotency window, milliseconds
  ARGV[7]  id of the socket that placed the bet

  Returns:
  {0, balance}     SETTLED
  {1}              NOTHING: no pending record (settled already)
  {4, nonce}       MISMATCH: the record is for another nonce (caller bug); nothing changed
]]

local pend = redis.call('HMGET', KEYS[2], 'f', 'n')
if not pend[1] then
  return {1}
end
if pend[2] ~= ARGV[3] then
  return {4, pend[2]}
end

local after
if ARGV[2] ~= '0' then
  after = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
else
  after = redis.call('HGET', KEYS[1], ARGV[1])
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[5], KEYS[2])
redis.call('HSET', KEYS[3], 'f', pend[1], 'b', after, 'r', ARGV[4])
redis.call('PEXPIRE', KEYS[3], ARGV[6])
redis.call('XADD', KEYS[4], '*', 'k', 'bet', 'e', ARGV[5], 'b', after)
redis.call('PUBLISH', KEYS[6], 'bet|' .. ARGV[7] .. '|' .. ARGV[1] .. '|' .. after)
return {0, after}
