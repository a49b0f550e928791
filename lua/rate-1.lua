--[[
  rate-1: one rate limit (GCRA, the generic cell rate algorithm), checked and taken at once.

  The key holds the limit's "theoretical arrival time" (TAT): when the subject's budget will
  be whole again, in microseconds of the Redis clock (TIME, so every server instance shares
  one clock). A request of cost c moves it c * interval on; it passes while the new TAT lies
  at most burst * interval ahead of now. The key expires when the budget is whole again, so
  an idle subject costs no memory.

  KEYS[1]  the limit's key (one subject of one limit: an address, a user)

  ARGV[1]  interval, microseconds per unit (1e6 / rate per second), integer string
  ARGV[2]  burst, units that may pass at once, integer string
  ARGV[3]  cost of this request, units, integer string
  ARGV[4]  "check": refuse without taking anything when over the limit;
           "charge": take the cost even when over (usage already served, counted after
           the fact), and say whether the subject is now over

  Returns {allowed, retry_after_ms}:
  {1, 0}     within the limit (the cost was taken)
  {0, ms}    over the limit: retry after ms milliseconds
]]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then
  tat = now
end
local new = tat + cost * interval
local ahead = new - now - burst * interval
if ahead > 0 and ARGV[4] == 'check' then
  return {0, math.ceil(ahead / 1000)}
end
redis.call('SET', KEYS[1], string.format('%d', new), 'PX', math.ceil((new - now) / 1000) + 1)
if ahead > 0 then
  return {0, math.ceil(ahead / 1000)}
end
return {1, 0}
