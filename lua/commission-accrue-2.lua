--[[
  commission-accrue-2: add one settled bet's commissions to its bucket's pending aggregate,
  exactly once per bet however often the bet event is replayed.

  Runs on the PLAYER's bucket: the marker and the pending hash share its hash tag. Amounts
  are integer minor units carried as decimal strings and handed to HINCRBY untouched (no
  Lua arithmetic on money).

  KEYS[1]  per-bet marker "commission accrued" (SET NX with a TTL; value unused)
  KEYS[2]  pending hash of the bucket (field "<ancestor_id>|<currency>" = minor units)

  ARGV[1]  marker lifetime, seconds (longer than any replay of the bet event can arrive)
  ARGV[2k], ARGV[2k+1]  for k = 1 ... n: field "<ancestor_id>|<currency>", amount (> 0)

  Returns (server/scripts.py: AccrueCode):
  1  ACCRUED: the marker was new, every field was incremented
  0  DUPLICATE: this bet was accrued before; nothing changed
]]

if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
end
return 1
