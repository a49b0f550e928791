--[[
  Prototype A (docs/decisions.md): settle one dice bet with the roll computed INSIDE Redis.

  HMAC-SHA256(server_seed, client_seed .. ":" .. nonce) is computed here in Lua 5.1 with the
  `bit` library (Redis has no native SHA-256 for scripts), then PROTOCOL.md's roll rule
  (12 windows of 5 hex characters, accept v < 1040104, roll = v mod 10001) decides the bet.
  Apart from that, it does what design C's script did for one bet when they were measured
  (lua/bet-5.lua then, lua/bet-n.lua now: idempotency record, stake and payout, nonce,
  outbox, push), so the two can be compared like for like.

  Money: the stake and the balance stay decimal strings (exact comparison, HINCRBY). The
  payout is floor(stake * multiplier_bp / 10000) computed in doubles, exact only while
  stake * multiplier_bp < 2^53; the script refuses larger products ({6}). With the default
  limits the product is at most (max_bet + max_profit) * 10^4 (1.1e11 for USDT, 1.1e13 for
  BTC), well below 2^53 ~ 9.007e15, because Python validates BET_LIMIT before calling.

  KEYS[1]  balances hash of the user            (field = currency, value = minor units)
  KEYS[2]  active seed pair hash of the user     (fields pid, ss, sh, cs, n)
  KEYS[3]  idempotency record of this bet id     (fields f, b, r)
  KEYS[4]  outbox stream of the user's bucket
  KEYS[5]  the user's push channel

  ARGV[1]  currency code
  ARGV[2]  stake, minor units, canonical positive integer string
  ARGV[3]  target, hundredths (integer string)
  ARGV[4]  direction: "under" or "over"
  ARGV[5]  multiplier, units of 1e-4 (integer string)
  ARGV[6]  request fingerprint
  ARGV[7]  idempotency window, milliseconds
  ARGV[8]  id of the socket that placed the bet
  ARGV[9]  user id
  ARGV[10] time, integer milliseconds since the epoch

  Returns:
  {0, balance, nonce, roll, payout}   SETTLED
  {1, balance, result_blob}           REPLAY
  {2}                                 CONFLICT
  {3, balance}                        INSUFFICIENT_FUNDS (no nonce used)
  {5}                                 NO_SEED
  {6}                                 TOO_LARGE: stake * multiplier_bp >= 2^53
]]

-- BEGIN sha256 (the bench's micro-benchmark reuses the text between these markers)
local band, bor, bxor, bnot = bit.band, bit.bor, bit.bxor, bit.bnot
local rshift, lshift, ror, tobit, tohex = bit.rshift, bit.lshift, bit.ror, bit.tobit, bit.tohex
local sbyte = string.byte

local K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}
for i = 1, 64 do K[i] = tobit(K[i]) end

local function initial()
  return {tobit(0x6a09e667), tobit(0xbb67ae85), tobit(0x3c6ef372), tobit(0xa54ff53a),
          tobit(0x510e527f), tobit(0x9b05688c), tobit(0x1f83d9ab), tobit(0x5be0cd19)}
end

-- One compression: H (8 words) is updated in place with the 16 words w[1..16].
-- Sums of up to 5 signed 32-bit words stay far below 2^51, where bit.tobit is exact.
local function compress(H, w)
  for j = 17, 64 do
    local x, y = w[j - 15], w[j - 2]
    w[j] = tobit(w[j - 16] + bxor(ror(x, 7), ror(x, 18), rshift(x, 3)) + w[j - 7]
                 + bxor(ror(y, 17), ror(y, 19), rshift(y, 10)))
  end
  local a, b, c, d, e, f, g, h = H[1], H[2], H[3], H[4], H[5], H[6], H[7], H[8]
  for j = 1, 64 do
    local t1 = h + bxor(ror(e, 6), ror(e, 11), ror(e, 25)) + bxor(band(e, f), band(bnot(e), g))
               + K[j] + w[j]
    local t2 = bxor(ror(a, 2), ror(a, 13), ror(a, 22)) + bxor(band(a, b), band(a, c), band(b, c))
    h, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + t2)
  end
  H[1], H[2], H[3], H[4] = tobit(H[1] + a), tobit(H[2] + b), tobit(H[3] + c), tobit(H[4] + d)
  H[5], H[6], H[7], H[8] = tobit(H[5] + e), tobit(H[6] + f), tobit(H[7] + g), tobit(H[8] + h)
end

-- Hash `data` (with SHA-256 padding) into H, `done` bytes having been hashed before it.
local function update_final(H, data, done)
  local total = done + #data
  local tail = data .. '\128' .. string.rep('\0', (55 - total) % 64) .. '\0\0\0\0'
  local bits = total * 8
  tail = tail .. string.char(band(rshift(bits, 24), 255), band(rshift(bits, 16), 255),
                             band(rshift(bits, 8), 255), band(bits, 255))
  for off = 1, #tail, 64 do
    local w = {}
    for i = 0, 15 do
      local b1, b2, b3, b4 = sbyte(tail, off + 4 * i, off + 4 * i + 3)
      w[i + 1] = bor(lshift(b1, 24), lshift(b2, 16), lshift(b3, 8), b4)
    end
    compress(H, w)
  end
end

local function sha256_words(data)
  local H = initial()
  update_final(H, data, 0)
  return H
end

local function hmac_sha256_hex(key, msg)
  if #key > 64 then
    local kh = sha256_words(key)
    local parts = {}
    for i = 1, 8 do parts[i] = string.char(band(rshift(kh[i], 24), 255),
      band(rshift(kh[i], 16), 255), band(rshift(kh[i], 8), 255), band(kh[i], 255)) end
    key = table.concat(parts)
  end
  key = key .. string.rep('\0', 64 - #key)
  local iw, ow = {}, {}
  for i = 0, 15 do
    local b1, b2, b3, b4 = sbyte(key, 4 * i + 1, 4 * i + 4)
    local word = bor(lshift(b1, 24), lshift(b2, 16), lshift(b3, 8), b4)
    iw[i + 1] = bxor(word, 0x36363636)
    ow[i + 1] = bxor(word, 0x5c5c5c5c)
  end
  local inner = initial()
  compress(inner, iw)
  update_final(inner, msg, 64)
  local outer = initial()
  compress(outer, ow)
  -- The outer message is the 32-byte inner digest: one padded block, length 96 bytes.
  local w = {inner[1], inner[2], inner[3], inner[4], inner[5], inner[6], inner[7], inner[8],
             tobit(0x80000000), 0, 0, 0, 0, 0, 0, 768}
  compress(outer, w)
  return tohex(outer[1]) .. tohex(outer[2]) .. tohex(outer[3]) .. tohex(outer[4])
      .. tohex(outer[5]) .. tohex(outer[6]) .. tohex(outer[7]) .. tohex(outer[8])
end

-- PROTOCOL.md: first of 12 five-character windows below 1040104, mod 10001.
local function roll_from_hmac(h)
  local v = 0
  for i = 1, 56, 5 do
    v = tonumber(string.sub(h, i, i + 4), 16)
    if v < 1040104 then break end
  end
  return v % 10001
end
-- END sha256

local rec = redis.call('HMGET', KEYS[3], 'f', 'b', 'r')
if rec[1] then
  if rec[1] == ARGV[6] then
    return {1, rec[2], rec[3]}
  end
  return {2}
end

local seed = redis.call('HMGET', KEYS[2], 'pid', 'ss', 'sh', 'cs')
if not seed[1] then
  return {5}
end

local balance = redis.call('HGET', KEYS[1], ARGV[1]) or '0'
local stake = ARGV[2]
if #balance < #stake or (#balance == #stake and balance < stake) then
  return {3, balance}
end

local amount, mult = tonumber(stake), tonumber(ARGV[5])
local product = amount * mult
if product >= 9007199254740992 then
  return {6}
end

local nonce = redis.call('HINCRBY', KEYS[2], 'n', 1)
local roll = roll_from_hmac(hmac_sha256_hex(seed[2], seed[4] .. ':' .. string.format('%d', nonce)))
local target = tonumber(ARGV[3])
local win
if ARGV[4] == 'under' then win = roll < target else win = roll > target end
local payout = 0
if win then
  -- floor(product / 10000) exactly: product - fmod is an exact multiple of 10000.
  payout = (product - math.fmod(product, 10000)) / 10000
end

local after = redis.call('HINCRBY', KEYS[1], ARGV[1], string.format('%d', payout - amount))
local bet_id = seed[1] .. '-' .. string.format('%d', nonce)
local stored = cmsgpack.pack({bet_id, roll, win, mult, payout, nonce, seed[3], seed[4]})
local event = cmsgpack.pack({
  bet_id = bet_id, user_id = tonumber(ARGV[9]), pair_id = tonumber(seed[1]),
  currency = ARGV[1], amount = amount, payout = payout, roll = roll, target = target,
  direction = ARGV[4], nonce = nonce, multiplier = mult, server_seed_hash = seed[3],
  client_seed = seed[4], ts = tonumber(ARGV[10]),
})
redis.call('HSET', KEYS[3], 'f', ARGV[6], 'b', after, 'r', stored)
redis.call('PEXPIRE', KEYS[3], ARGV[7])
redis.call('XADD', KEYS[4], '*', 'k', 'bet', 'e', event, 'b', after)
redis.call('PUBLISH', KEYS[5], 'bet|' .. ARGV[8] .. '|' .. ARGV[1] .. '|' .. after)
return {0, after, nonce, roll, payout}
