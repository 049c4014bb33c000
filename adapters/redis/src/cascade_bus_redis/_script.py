"""The one Lua script behind every publish, stream route and retained read (EVALSHA, 0 keys).

Key layout (``P`` is the ``prefix`` option, ``cascade_bus:`` by default):

- ``P retained`` (hash): topic -> last retained body (plain bytes, readable by any client).
- ``P retained:seq`` (hash): topic -> the sequence number of that body.
- ``P seq`` (string): the global retained sequence (INCR on every retained publish or clear).
- ``P routes`` (hash): stream key -> ``"<lease expiry ms> <portable pattern>"``; every publish
  appends to the streams whose pattern matches its topic (fan-out on publish).
- ``P q:<queue>/<pattern>`` (stream, group ``cascade_bus``): one per queue group.
- ``P s:<client_id>:<n>/<pattern>`` (stream, group ``cascade_bus``): one per QoS 1 subscription.
- channel ``P ctl``: ``r<seq>`` just before a retained publish's PUBLISH and ``e`` just after it,
  so a subscriber learns the sequence number of the message in between (the body itself travels
  unchanged on the topic's channel).

Stream entries hold ``t`` (topic), ``d`` (body) and, for retained publishes, ``s`` (sequence);
barrier entries written by a subscriber to itself hold only ``b`` (a token).

The script touches keys it does not declare, which standalone Redis allows and Redis Cluster does
not (the transport refuses cluster URLs).
"""

from __future__ import annotations

__all__ = ["SCRIPT"]

SCRIPT = r"""
local op = ARGV[1]
local P = ARGV[2]

local function split(s)
  local out = {}
  local start = 1
  while true do
    local i = string.find(s, '/', start, true)
    if not i then
      out[#out + 1] = string.sub(s, start)
      return out
    end
    out[#out + 1] = string.sub(s, start, i - 1)
    start = i + 1
  end
end

local function matches(pattern, topic)
  if pattern == topic then return true end
  if not string.find(pattern, '[+#]') then return false end
  local pc = string.byte(pattern, 1)
  if string.byte(topic, 1) == 36 and (pc == 43 or pc == 35) then return false end
  local p = split(pattern)
  local t = split(topic)
  for i = 1, #p do
    local level = p[i]
    if level == '#' then return true end
    if i > #t then return false end
    if level ~= '+' and level ~= t[i] then return false end
  end
  return #p == #t
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

if op == 'p' then
  local topic, body, retain, maxlen = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
  local seq = false
  if retain == '1' then
    seq = redis.call('INCR', P .. 'seq')
    if body == '' then
      redis.call('HDEL', P .. 'retained', topic)
      redis.call('HDEL', P .. 'retained:seq', topic)
    else
      redis.call('HSET', P .. 'retained', topic, body)
      redis.call('HSET', P .. 'retained:seq', topic, seq)
    end
    redis.call('PUBLISH', P .. 'ctl', 'r' .. seq)
  end
  local n = redis.call('PUBLISH', topic, body)
  if seq then redis.call('PUBLISH', P .. 'ctl', 'e') end
  local routes = redis.call('HGETALL', P .. 'routes')
  if #routes > 0 then
    local now = false
    for i = 1, #routes, 2 do
      local value = routes[i + 1]
      local sp = string.find(value, ' ', 1, true)
      if sp and matches(string.sub(value, sp + 1), topic) then
        if not now then now = now_ms() end
        if tonumber(string.sub(value, 1, sp - 1)) < now then
          redis.call('HDEL', P .. 'routes', routes[i])
        elseif seq then
          redis.call('XADD', routes[i], 'MAXLEN', '~', maxlen, '*', 't', topic, 'd', body, 's', seq)
          n = n + 1
        else
          redis.call('XADD', routes[i], 'MAXLEN', '~', maxlen, '*', 't', topic, 'd', body)
          n = n + 1
        end
      end
    end
  end
  return n
elseif op == 'r' then
  -- register or refresh a route: stream, group, pattern, ttl ms
  local stream, group, pattern, ttl = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
  local now = now_ms()
  redis.call('HSET', P .. 'routes', stream, (now + ttl) .. ' ' .. pattern)
  redis.pcall('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
  redis.call('PEXPIRE', stream, ttl)
  local routes = redis.call('HGETALL', P .. 'routes')
  for i = 1, #routes, 2 do
    local value = routes[i + 1]
    local sp = string.find(value, ' ', 1, true)
    if (not sp) or tonumber(string.sub(value, 1, sp - 1)) < now then
      redis.call('HDEL', P .. 'routes', routes[i])
    end
  end
  return 1
elseif op == 'u' then
  -- unregister a route: stream, delete the stream too ('1') or leave it to expire
  redis.call('HDEL', P .. 'routes', ARGV[3])
  if ARGV[4] == '1' then redis.call('DEL', ARGV[3]) end
  return 1
elseif op == 'l' then
  -- a queue member leaves: stream, group, consumer, drop the group's stream when empty ('1')
  local stream, group, consumer = ARGV[3], ARGV[4], ARGV[5]
  if redis.call('EXISTS', stream) == 0 then return 0 end
  local ok, pending = pcall(redis.call, 'XPENDING', stream, group, '-', '+', 1, consumer)
  if not ok then return 0 end
  if #pending == 0 then redis.call('XGROUP', 'DELCONSUMER', stream, group, consumer) end
  if ARGV[6] == '1' and #redis.call('XINFO', 'CONSUMERS', stream, group) == 0 then
    redis.call('HDEL', P .. 'routes', stream)
    redis.call('DEL', stream)
  end
  return 1
elseif op == 'g' then
  -- the retained body and sequence of one topic
  local body = redis.call('HGET', P .. 'retained', ARGV[3])
  return {body, redis.call('HGET', P .. 'retained:seq', ARGV[3])}
elseif op == 's' then
  -- one HSCAN page of retained bodies with their sequences: cursor, glob, count
  local page = redis.call('HSCAN', P .. 'retained', ARGV[3], 'MATCH', ARGV[4], 'COUNT', ARGV[5])
  local out = {page[1]}
  local items = page[2]
  for i = 1, #items, 2 do
    out[#out + 1] = items[i]
    out[#out + 1] = items[i + 1]
    out[#out + 1] = redis.call('HGET', P .. 'retained:seq', items[i]) or '0'
  end
  return out
end
return redis.error_reply('cascade_bus: unknown script operation ' .. tostring(op))
"""
