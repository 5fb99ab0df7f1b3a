"""The Lua scripts nodes run in Redis: each check-and-update is one atomic step there.

Time is Redis' own (`TIME`), never a node's clock, so nodes whose clocks disagree still count
the same rate × time + burst. Numbers that may be fractional come back as strings (Redis
truncates Lua numbers to integers).
"""

from __future__ import annotations

# KEYS[1]: the bucket (hash tokens/stamp). ARGV: rate per s, burst.
# Returns {1, "0"} when a token was taken, else {0, seconds until one}.
TOKEN_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1]) or burst
local stamp = tonumber(state[2]) or now
if now > stamp then
  tokens = math.min(burst, tokens + (now - stamp) * rate)
  stamp = now
end
local taken = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'stamp', string.format('%.17g', stamp))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {taken, string.format('%.6f', wait)}
"""

# KEYS[1]: the spend entries (zset, score = time, member = "id:amount"), KEYS[2]: their total.
# ARGV: window s, then "check" or "charge" with amount and a unique id.
# Returns {total spent in the window, seconds until the oldest entry leaves it}.
BUDGET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[1])
local total = tonumber(redis.call('GET', KEYS[2])) or 0
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - window)
for _, member in ipairs(old) do
  total = total - tonumber(string.match(member, ':([^:]+)$'))
end
if #old > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window) end
if ARGV[2] == 'charge' then
  total = total + tonumber(ARGV[3])
  redis.call('ZADD', KEYS[1], now, ARGV[4] .. ':' .. ARGV[3])
end
if total < 0 or redis.call('ZCARD', KEYS[1]) == 0 then total = 0 end
redis.call('SET', KEYS[2], string.format('%.17g', total), 'EX', math.ceil(window) + 60)
redis.call('EXPIRE', KEYS[1], math.ceil(window) + 60)
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local retry = window
if #first > 0 then retry = tonumber(first[2]) + window - now end
return {string.format('%.17g', total), string.format('%.6f', retry)}
"""

# KEYS[1]: a key's live sessions (zset, score = expiry ms). ARGV: member, cap, ttl ms.
# Returns 1 when the member holds a place (new or already held), 0 at the cap.
HOLD_SESSION = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
return 1
"""

# Keep a node's holdings alive. KEYS: cap zsets then directory keys; ARGV: ttl ms, the number
# of cap keys, then a member per cap key, then the node address (directory values).
REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local caps = tonumber(ARGV[2])
for i = 1, caps do
  redis.call('ZADD', KEYS[i], 'XX', now + ttl, ARGV[2 + i])
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
end
for i = caps + 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[3 + caps], 'PX', ttl)
end
return #KEYS
"""

# KEYS[1]: ejections (hash "kind:instance" -> until ms). ARGV: field, seconds (0: lifted).
EJECT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms = math.floor(tonumber(ARGV[2]) * 1000)
if ms <= 0 then return redis.call('HDEL', KEYS[1], ARGV[1]) end
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or 0
if now + ms > current then redis.call('HSET', KEYS[1], ARGV[1], now + ms) end
return 1
"""

# KEYS[1]: ejections. Returns {now ms, field, until ms, ...} for those still in force
# (the rest are deleted), so readers need no clock shared with Redis.
EJECTIONS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', KEYS[1])
local out = {now}
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) <= now then
    redis.call('HDEL', KEYS[1], all[i])
  else
    table.insert(out, all[i])
    table.insert(out, tonumber(all[i + 1]))
  end
end
return out
"""
