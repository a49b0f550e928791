--[[
  rotate-2: replace the active seed pair, revealing the old one.

  With ARGV[1] = "" it only installs a first pair when the user has none (used at sign-in).

  KEYS[1]  active seed pair hash of the user (fields pid, ss, sh, cs, n)
  KEYS[2]  outbox stream of the user's bucket

  ARGV[1]  pair id the caller believes is active ("" = expect none)
  ARGV[2]  new pair id
  ARGV[3]  new server seed (64 hex)
  ARGV[4]  its SHA-256 commitment
  ARGV[5]  new client seed
  ARGV[6]  time, integer milliseconds since the epoch (for the reveal event)

  Returns (server/scripts.py: RotateCode):
  {0, old_pid, old_ss, old_sh, old_cs, old_n}  ROTATED (all "" when a first pair was installed)
  {4, pid}                                     STALE: another pair is active (or one exists)
]]

local cur = redis.call('HMGET', KEYS[1], 'pid', 'ss', 'sh', 'cs', 'n')
if (cur[1] or '') ~= ARGV[1] then
  return {4, cur[1] or ''}
end
redis.call('HSET', KEYS[1], 'pid', ARGV[2], 'ss', ARGV[3], 'sh', ARGV[4], 'cs', ARGV[5], 'n', '0')
if not cur[1] then
  return {0, '', '', '', '', ''}
end
redis.call('XADD', KEYS[2], '*', 'k', 'reveal', 'pid', cur[1], 'n', cur[5], 'ts', ARGV[6])
return {0, cur[1], cur[2], cur[3], cur[4], cur[5]}
