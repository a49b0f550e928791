--[[
  commission-credit-n: credit one ancestor's commissions of some flushes to its live
  balance, exactly once per (flush, ancestor), and push the new balances.

  Runs on the ANCESTOR's bucket: its balances, its push channel and its markers share the
  ancestor's hash tag. Called only after PostgreSQL holds the ledger rows of these flushes
  (workers/commissions.py), so no outbox event is written: the ledger already has them.
  The number of keys varies: one marker per flush this ancestor appears in. The marker and
  the credit are one atomic call, so a Redis that rolls back loses both or neither: a
  credit whose marker is missing is missing too, and may be made (again).

  KEYS[1]     balances hash of the ancestor
  KEYS[2]     push channel of the ancestor (a shard channel, not a key: SPUBLISH routes by it)
  KEYS[3]     heal marker of the ancestor (lua/heal-n.lua)
  KEYS[3+i]   for i = 1 ... m: the "credited" marker of flush i for this ancestor
              (plumbing/keys.py: Keys.credit_marker)

  ARGV[1]     marker lifetime, seconds
  ARGV[2]     c: number of currencies in this call
  ARGV[2+j]   for j = 1 ... c: currency code j
  ARGV[2+c+(i-1)*c+j]  amount of currency j in flush i, minor units ("0" = none)

  Money never becomes a Lua number: amounts go to HINCRBY as strings and the pushed balance
  is read back with HGET (a Lua number would print 1e14 and above in exponent form).
  Pushes "commission|-|<currency>|<balance>" once per currency credited.

  Returns the number of flushes credited by this call (0: all were credited before), or -1
  (HEAL) when the heal marker does not hold this Redis's run id: Redis restarted since the
  ancestor's balance was last made equal to the ledger, so nothing is credited until the
  ancestor is healed (the heal sets the markers of every credit PostgreSQL already paid).
]]

if redis.call('GET', KEYS[3]) ~= string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') then
  return -1
end
local c = tonumber(ARGV[2])
local m = #KEYS - 3
local credited = 0
local touched = {}
for i = 1, m do
  if redis.call('SET', KEYS[3 + i], '1', 'NX', 'EX', ARGV[1]) then
    credited = credited + 1
    local base = 2 + c + (i - 1) * c
    for j = 1, c do
      local amount = ARGV[base + j]
      if amount ~= '0' then
        redis.call('HINCRBY', KEYS[1], ARGV[2 + j], amount)
        touched[j] = true
      end
    end
  end
end
for j = 1, c do
  if touched[j] then
    local balance = redis.call('HGET', KEYS[1], ARGV[2 + j])
    redis.call('SPUBLISH', KEYS[2], 'commission|-|' .. ARGV[2 + j] .. '|' .. balance)
  end
end
return credited
