--[[
  rotate-3: replace the active seed pair, revealing the old one.

  With ARGV[1] = "" it only installs a first pair when the user has none (used at sign-in).
  Retrying a rotation that already happened (same new pair id, e.g. after a lost reply)
  answers the same reveal again and changes nothing: the previous pair is kept in the
  hash's p* fields for that.

  KEYS[1]  active seed pair hash of the user
           (pid, ss, sh, cs, n, rid; and ppid, pss, psh, pcs, pn of the previous pair)
  KEYS[2]  outbox stream of the user's bucket
  KEYS[3]  the user's heal marker (lua/heal-n.lua)

  ARGV[1]  pair id the caller believes is active ("" = expect none)
  ARGV[2]  new pair id
  ARGV[3]  new server seed (64 hex)
  ARGV[4]  its SHA-256 commitment
  ARGV[5]  new client seed
  ARGV[6]  time, integer milliseconds since the epoch (for the reveal event)
  ARGV[7]  run id of the Redis server as the caller read it (bet-n checks it: EPOCH; and
           the heal marker must hold it)

  Returns (games/codes.py: RotateCode):
  {0, old_pid, old_ss, old_sh, old_cs, old_n}  ROTATED (all "" when a first pair was installed)
  {4, pid}                                     STALE: another pair is active (or one exists)
  {5}                                          HEAL: the heal marker is not ARGV[7]; nothing
                                               changed: the caller heals, then retries
]]

if redis.call('GET', KEYS[3]) ~= ARGV[7] then
  return {5}
end
local cur = redis.call('HMGET', KEYS[1], 'pid', 'ss', 'sh', 'cs', 'n')
if cur[1] and cur[1] == ARGV[2] then
  local prev = redis.call('HMGET', KEYS[1], 'ppid', 'pss', 'psh', 'pcs', 'pn')
  return {0, prev[1] or '', prev[2] or '', prev[3] or '', prev[4] or '', prev[5] or ''}
end
if (cur[1] or '') ~= ARGV[1] then
  return {4, cur[1] or ''}
end
redis.call('HSET', KEYS[1], 'pid', ARGV[2], 'ss', ARGV[3], 'sh', ARGV[4], 'cs', ARGV[5],
  'n', '0', 'rid', ARGV[7])
if not cur[1] then
  return {0, '', '', '', '', ''}
end
redis.call('HSET', KEYS[1], 'ppid', cur[1], 'pss', cur[2], 'psh', cur[3], 'pcs', cur[4],
  'pn', cur[5])
redis.call('XADD', KEYS[2], '*', 'k', 'reveal', 'pid', cur[1], 'n', cur[5], 'ts', ARGV[6])
return {0, cur[1], cur[2], cur[3], cur[4], cur[5]}
