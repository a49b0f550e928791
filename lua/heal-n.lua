--[[
  heal-n: make one user's Redis state equal to the ledger again, once per Redis run, after
  Redis may have rolled back (plumbing/heal.py computes the truth; docs/durability.md).

  Only while the user's heal marker differs from the run id: then every money script of the
  user (bet-n, deposit-5, rotate-3, commission-credit-n) refuses, so nothing moved the
  user's money since the caller read the outbox and PostgreSQL. A second heal of the same
  user (another instance computed the same truth) finds the marker set and changes nothing.
  The caller reads the run id (INFO server) before it reads the outbox; should Redis restart
  in between, the marker it sets names the previous run, which no script accepts: the user
  is simply healed again.

  KEYS[1]                 the user's heal marker (a string: the run id)
  KEYS[2]                 the user's balances hash
  KEYS[3]                 the outbox stream of the user's bucket
  KEYS[3 + i]             i = 1 .. nb: a bet idempotency record to restore
  KEYS[3 + nb + j]        j = 1 .. nd: a deposit idempotency record to restore
  KEYS[3 + nb + nd + k]   k = 1 .. nc: a commission credit marker to set

  ARGV[1]  run id of the Redis server, as the caller read it
  ARGV[2]  nb
  ARGV[3]  nd
  ARGV[4]  nc
  ARGV[5]  lifetime of a credit marker, seconds
  ARGV[6]  m: number of currencies of the balance
  ARGV[6 + 2c - 1], ARGV[6 + 2c]   c = 1 .. m: currency, balance (minor units, integer string)
  then per bet record i: its value ("<fingerprint>\n<balance after>\n<event blob>"), its
    remaining lifetime in milliseconds
  then per deposit record j: its fingerprint, its balance, and an outbox event blob: not ""
    when neither store holds the deposit's credit (the row in PostgreSQL is all that is
    left), which this call then credits: the balance passed in includes it, and the event
    carries it to the ledger

  Returns (games/codes.py: HealCode):
  {0}  ALREADY: the marker already held this run id; nothing changed
  {1}  HEALED: balances set (DEL, then HSET: a currency the ledger does not know goes),
       records restored (a bet record overwritten, a deposit record kept when present),
       credit markers set, lost deposits credited through the outbox, marker set

  Amounts are never Lua numbers: the strings go to HSET untouched.
]]

local rid = ARGV[1]
if redis.call('GET', KEYS[1]) == rid then
  return {0}
end
local nb, nd, nc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local m = tonumber(ARGV[6])
redis.call('DEL', KEYS[2])
local a = 6
for _ = 1, m do
  redis.call('HSET', KEYS[2], ARGV[a + 1], ARGV[a + 2])
  a = a + 2
end
for i = 1, nb do
  redis.call('SET', KEYS[3 + i], ARGV[a + 1], 'PX', ARGV[a + 2])
  a = a + 2
end
for j = 1, nd do
  local key = KEYS[3 + nb + j]
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'f', ARGV[a + 1], 'b', ARGV[a + 2])
  end
  if ARGV[a + 3] ~= '' then
    redis.call('XADD', KEYS[3], '*', 'k', 'deposit', 'e', ARGV[a + 3], 'b', ARGV[a + 2])
  end
  a = a + 3
end
for k = 1, nc do
  redis.call('SET', KEYS[3 + nb + nd + k], '1', 'EX', ARGV[5])
end
redis.call('SET', KEYS[1], rid)
return {1}
