--[[
  runid-1: the run id of the Redis that holds KEYS[1] (read from INFO server).

  Sent as a one-key call so that a cluster client routes it by the key's slot and follows
  MOVED: right after a failover the client's slot map may still name the old master, whose
  run id would mark a heal under the wrong server (plumbing/heal.py). Moves nothing.

  KEYS[1]  any key of the user (its heal marker)
  Returns the run id, a 40-character hex string.
]]
return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
