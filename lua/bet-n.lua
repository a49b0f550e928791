--[[
  bet-n: settle one user's bets in order, each exactly as one call of the single-bet rules
  below would (stake, nonce, payout, outbox, push, idempotency), atomically as a whole.

  The server sends every bet of a user that arrived during one event-loop tick in one call,
  each with the roll it computed for the nonce it predicts (games/dice.py): the first for
  the stored nonce + 1, the next for + 2, and so on. A bet is only settled when its nonce
  is still the next one of the same seed pair, so a roll is never applied to a nonce other
  than the one it was computed for; when an earlier bet of the call did not use its nonce
  (refused, or a replay), the later ones come back STALE, having changed nothing, and the
  server recomputes them. One call per user instead of one per bet: the fixed cost of a
  script call (argument tables, the Lua VM's entry and exit, the AOF's MULTI/EXEC) is most
  of a bet's Redis time (docs/benchmarks.md).

  Every amount is an integer count of minor units carried as a decimal string and handed to
  HINCRBY untouched (Lua numbers are doubles: no arithmetic on money happens here).

  KEYS[1]      balances hash of the user            (field = currency, value = minor units)
  KEYS[2]      active seed pair hash of the user     (fields pid, ss, sh, cs, n, rid)
  KEYS[3]      outbox stream of the user's bucket
  KEYS[4]      the user's push channel (a shard channel, not a key: SPUBLISH and
               PUBSUB SHARDNUMSUB need it on the user's slot; docs/decisions.md, 7)
  KEYS[5]      the user's heal marker: the run id under which the user's state was last made
               equal to the ledger (lua/heal-n.lua)
  KEYS[5 + i]  idempotency record of bet i's id: a string "<fingerprint>\n<balance after>\n
               <event blob>", expiring after the window

  ARGV[1]  seed pair id every roll was computed with
  ARGV[2]  run id of the Redis server, as the caller read it on connecting (see EPOCH)
  ARGV[3]  idempotency window, milliseconds
  ARGV[4]  how many other sockets of this user the calling instance holds ("0" usually)
  then 7 per bet i, from ARGV[4 + 7 (i - 1) + 1]:
    currency code
    stake, minor units, canonical positive integer string
    balance change if settled: payout - stake (negative on a loss), integer string
    the pair's nonce the server believes is stored when this bet runs (it uses that + 1)
    request fingerprint (currency|amount|target|direction)
    outbox event blob (opaque to this script); the record keeps it too, since it holds every
      field a replay answers with
    id of the socket that placed the bet (pushed so that socket can skip it)
  then, optionally, ARGV[5 + 7 n] (n bets): the outbox limit: when KEYS[3] holds at least
    that many entries (not yet persisted), every bet answers OUTBOX_FULL ("0": no limit)

  For each bet, in order:
  1. a record under its id: REPLAY with the same fingerprint, else CONFLICT;
  2. the heal marker is not ARGV[2]: HEAL (Redis restarted since the user's state was last
     made equal to the ledger, and may have rolled back: nothing of the user may move until
     the server has healed it); no active pair: NO_SEED; a pair installed under another
     Redis run id: EPOCH; another pair id or another stored nonce: STALE;
  3. balance below the stake: INSUFFICIENT_FUNDS;
  4. else SETTLED: the balance and the nonce move, the record is stored, one event is
     appended, and a push is published when someone else can receive it: another socket of
     the user on the calling instance (ARGV[4]), or another instance subscribed to the
     user's channel (the calling instance is subscribed itself while the betting socket is
     open, so more than one subscriber means another instance).

  Returns one reply per bet, in order, each a flat array whose first element is the code
  (games/codes.py: BetCode):
  {0, balance, nonce}          SETTLED: balance after the bet, the nonce used
  {1, balance, blob}           REPLAY: same bet id and fields within the window; blob is the
                               bet's event blob (or, from a record in the earlier format, a
                               result blob: the caller tells them apart; docs/decisions.md,
                               "Formats still read")
  {2}                          CONFLICT: same bet id, other fields
  {3, balance}                 INSUFFICIENT_FUNDS: nothing changed, no nonce used
  {4, pair_id, nonce}          STALE: the stored pair or nonce differs; recompute and retry
  {5}                          NO_SEED: the user has no active seed pair
  {6, pair_id}                 EPOCH: the pair was installed before this Redis (re)started;
                               writes may have been lost, so a nonce already shown could
                               come again: the caller rotates the pair and retries
  {7, error}                   REFUSED: Redis refused the balance change (it would pass
                               2^63 - 1); nothing of this bet changed
  {8}                          OUTBOX_FULL: the outbox is at its limit; nothing changed
  {9}                          HEAL: the user's state is not known to match the ledger
                               (see 2); nothing changed: the caller heals, then retries

  HINCRBY's integer reply becomes a Lua double: below 2^53 it is exact and printed with
  '%d'; from 2^53 the balance is read back with HGET (a double would be inexact there, and
  "%.14g" when concatenated). The nonce (far below 2^53) is counted here and written with
  HSET right after the balance moves (never deferred to the end of the call: should a later
  command fail, the stored nonce must already cover every bet settled, or a nonce would be
  used twice); a currency's balance is read once per call (later bets of the call compare
  against the previous one's result); a record is one string with its expiry (SET PX).
  Redis time per bet is mostly the per-command cost of redis.call, so every call saved
  counts. The balance moves first and its HINCRBY runs protected (pcall), so one that fails
  (overflow) leaves nothing of that bet changed and the call goes on (a script error would
  end the call with the earlier bets applied and their replies lost: Redis does not roll a
  script back).
]]

local pid, rid, window, others = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local cap = tonumber(ARGV[5 + 7 * (#KEYS - 5)] or '0')
if cap > 0 and redis.call('XLEN', KEYS[3]) >= cap then
  local full = {}
  for i = 1, #KEYS - 5 do full[i] = {8} end
  return full
end
local seed = redis.call('HMGET', KEYS[2], 'pid', 'n', 'rid')
local n = seed[2]
local nonce = tonumber(n)
local listened = nil
local healed = nil
-- Balances as this call left them, by currency: a later bet of the call compares against
-- its predecessor's result instead of reading the field again.
local balances = {}
local out = {}
for i = 1, #KEYS - 5 do
  local a = 4 + 7 * (i - 1)
  local idem = KEYS[5 + i]
  local rec = redis.pcall('GET', idem)
  if type(rec) == 'table' and rec.err then
    -- A record in the earlier hash format (f, b, r): docs/decisions.md, "Formats still read".
    local h = redis.call('HMGET', idem, 'f', 'b', 'r')
    rec = h[1] .. '\n' .. h[2] .. '\n' .. h[3]
  end
  if not rec and healed == nil then
    healed = redis.call('GET', KEYS[5]) == rid
  end
  if rec then
    -- "<fingerprint>\n<balance after>\n<blob>" (the blob may hold any byte)
    local f_end = string.find(rec, '\n', 1, true)
    local b_end = string.find(rec, '\n', f_end + 1, true)
    if string.sub(rec, 1, f_end - 1) == ARGV[a + 5] then
      out[i] = {1, string.sub(rec, f_end + 1, b_end - 1), string.sub(rec, b_end + 1)}
    else
      out[i] = {2}
    end
  elseif not healed then
    out[i] = {9}
  elseif not seed[1] then
    out[i] = {5}
  elseif seed[3] ~= rid then
    out[i] = {6, seed[1]}
  elseif seed[1] ~= pid or n ~= ARGV[a + 4] then
    out[i] = {4, seed[1], n}
  else
    local currency, stake = ARGV[a + 1], ARGV[a + 2]
    -- Exact comparison of canonical non-negative integer strings (no float rounding).
    local balance = balances[currency]
    if balance == nil then
      balance = redis.call('HGET', KEYS[1], currency) or '0'
    end
    if #balance < #stake or (#balance == #stake and balance < stake) then
      out[i] = {3, balance}
    else
      local moved = redis.pcall('HINCRBY', KEYS[1], currency, ARGV[a + 3])
      if type(moved) == 'table' and moved.err then
        out[i] = {7, moved.err}
      else
        -- The reply is a double: exact below 2^53, read back as text beyond.
        local after
        if moved < 9007199254740992 then
          after = string.format('%d', moved)
        else
          after = redis.call('HGET', KEYS[1], currency)
        end
        balances[currency] = after
        nonce = nonce + 1
        n = string.format('%d', nonce)
        redis.call('HSET', KEYS[2], 'n', n)
        local event = ARGV[a + 6]
        redis.call('SET', idem, ARGV[a + 5] .. '\n' .. after .. '\n' .. event, 'PX', window)
        redis.call('XADD', KEYS[3], '*', 'k', 'bet', 'e', event, 'b', after)
        if listened == nil then
          listened = others ~= '0' or redis.call('PUBSUB', 'SHARDNUMSUB', KEYS[4])[2] > 1
        end
        if listened then
          redis.call('SPUBLISH', KEYS[4], 'bet|' .. ARGV[a + 7] .. '|' .. currency .. '|' .. after)
        end
        out[i] = {0, after, nonce}
      end
    end
  end
end
return out
