--[[
  hold-1: take or renew one of a limited number of places (a user's open sockets), each
  held until it expires unless renewed, so the places of a crashed instance come free.

  KEYS[1]  sorted set of the places held: member = holder id, score = expiry (ms, Redis TIME)

  ARGV[1]  holder id (a socket id)
  ARGV[2]  milliseconds the place is held from now
  ARGV[3]  how many places there are, integer string

  Returns {held, count}:
  {1, n}   the holder has a place (taken now or renewed); n places are held
  {0, n}   all n places are held by others: nothing changed but expired places freed
]]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl, places = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local count = redis.call('ZCARD', KEYS[1])
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if count >= places then
    return {0, count}
  end
  count = count + 1
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return {1, count}
