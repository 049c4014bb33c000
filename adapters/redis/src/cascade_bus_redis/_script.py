r"""The one Lua script behind every publish, stream route and retained read (EVALSHA).

Its cost per publish is the server's share of the adapter's throughput (the server shares the
machine's cores with the clients), so the common path, a QoS 0 publish no stream route matches,
must stay cheap: see ``bench/bench_redis.py`` and its server columns.

Both transports load the same script; every operation takes its *namespace* ``N`` as
``ARGV[2]`` and builds its key names from it. Standalone (``redis://``): ``N`` is the ``prefix``
option (``cascade_bus:``) and the script is called with 0 keys. Redis Cluster
(``redis+cluster://``): ``N`` is ``<prefix>{<shard key>}`` (a hash tag, see ``_topics.hash_tag``),
so every key below lives in the shard key's slot, and the call declares one of them (two for
``P``) so that the cluster client routes it to the node owning that slot; the keys the script
builds itself are in the same slot, which Redis Cluster allows.

Key layout (``N`` the namespace):

- ``N retained`` (hash): topic -> last retained body (plain bytes, readable by any client).
- ``N retained:seq`` (hash): topic -> the sequence number of that body.
- ``N seq`` (string): the retained sequence (INCR on every retained publish or clear). Numbers
  are compared per topic only, so one counter per namespace is enough.
- ``N routes`` (hash): stream key -> ``"<lease expiry ms> <portable pattern>"``; every publish
  appends to the streams whose pattern matches its topic (fan-out on publish).
- ``N q:<queue>/<pattern>`` (stream, group ``cascade_bus``): one per queue group.
- ``N s:<client_id>:<n>/<pattern>`` (stream, group ``cascade_bus``): one per QoS 1 subscription.

Standalone only (op ``p``): one call carries many publishes, run in order, each atomically:
``ARGV[3]`` is the streams' MAXLEN, then ``retain, topic, body`` per message. The routes hash is
read once per call (scanned directly for a single message); the reply is the number of messages,
or ``{index, error, ...}`` for those that failed (each runs under ``pcall``, so one refused
message does not stop the others). Channel ``N ctl`` carries ``r<seq>`` just before a retained
publish's PUBLISH (on the channel named exactly like the topic) and ``e`` just after it, so a
subscriber learns the sequence number of the message in between without any change to the body.

Cluster only (op ``P``): the body travels in a *frame* ``<seq>\0<topic>\0<body>`` (``seq``
empty unless retained) by SPUBLISH on the topic's shard channel ``N t:<topic>`` and on
``N p:<pattern>`` for every pattern leased in ``N patterns`` (hash: ``"<bus> <pattern>"`` ->
``"<lease expiry ms> <pattern>"``) that matches, and by classic PUBLISH (which Redis Cluster
broadcasts to every node) on ``<prefix>p:<pattern>`` for every *broad* pattern (one whose
wildcards cover the shard-key levels) leased in the slot's ``broad`` hash, passed as ``ARGV[7]``.

Stream entries hold ``t`` (topic), ``d`` (body) and, for retained publishes, ``s`` (sequence);
barrier entries written by a subscriber to itself hold only ``b`` (a token).

Junk another client wrote into the lease hashes (an expiry that is no number, a route to a key
that is no stream) is deleted when met, never fails a publish.
"""

from __future__ import annotations

__all__ = ["BROAD_SCRIPT", "SCRIPT"]

_HELPERS = r"""
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

-- Whether a pattern known to hold a wildcard matches the topic (MQTT rules, `$` included).
local function wild_matches(pattern, topic)
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

-- Store (or clear, for an empty body) the retained body of a topic; return its sequence number.
local function retain_body(topic, body)
  local seq = redis.call('INCR', P .. 'seq')
  if body == '' then
    redis.call('HDEL', P .. 'retained', topic)
    redis.call('HDEL', P .. 'retained:seq', topic)
  else
    redis.call('HSET', P .. 'retained', topic, body)
    redis.call('HSET', P .. 'retained:seq', topic, seq)
  end
  return seq
end

-- The leases {field, pattern} in hash `key` ("<expiry ms> <pattern>" values) whose pattern
-- matches the topic (each pattern once if `distinct`); expired ones are deleted on the way.
-- Each lease costs a few plain string operations unless its pattern's literal start matches.
local function leased(key, topic, distinct)
  local out = {}
  local entries = redis.call('HGETALL', key)
  if #entries == 0 then return out end
  local now = false
  local seen = {}
  local find, sub = string.find, string.sub
  for i = 1, #entries, 2 do
    local value = entries[i + 1]
    local sp = find(value, ' ', 1, true)
    local hit = false
    if sp then
      -- plain finds: '+' comes before any '#' (which ends a pattern)
      local w = find(value, '+', sp, true) or find(value, '#', sp, true)
      if not w then
        hit = #value - sp == #topic and sub(value, sp + 1) == topic
      else
        local e = w - 1  -- the literal start ends here ('a/#' also matches 'a': no slash)
        if e > sp and string.byte(value, w) == 35 then e = e - 1 end
        hit = sub(value, sp + 1, e) == sub(topic, 1, e - sp)
          and wild_matches(sub(value, sp + 1), topic)
      end
    end
    if hit then
      local pattern = sub(value, sp + 1)
      if not now then now = now_ms() end
      local expiry = tonumber(sub(value, 1, sp - 1))
      if not expiry or expiry < now then  -- expired, or junk another client wrote
        redis.call('HDEL', key, entries[i])
      elseif not (distinct and seen[pattern]) then
        seen[pattern] = true
        out[#out + 1] = {entries[i], pattern}
      end
    end
  end
  return out
end

-- XADD one message to a route's stream. A route naming a key that is no stream (or, in a
-- cluster, a key of another slot) was written by another client: junk, deleted instead of
-- failing the publish.
local function add(stream, maxlen, topic, body, seq)
  local r
  if seq then
    r = redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, '*', 't', topic, 'd', body, 's', seq)
  else
    r = redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, '*', 't', topic, 'd', body)
  end
  if type(r) == 'table' and r.err then
    local find = string.find
    if find(r.err, 'WRONGTYPE', 1, true) or find(r.err, 'attempted to access', 1, true) then
      redis.call('HDEL', P .. 'routes', stream)
      return 0
    end
    error(r.err)
  end
  return 1
end

-- XADD the message to every stream route whose pattern matches; return how many.
local function fan_out(topic, body, seq, maxlen)
  local n = 0
  for _, route in ipairs(leased(P .. 'routes', topic, false)) do
    n = n + add(route[1], maxlen, topic, body, seq)
  end
  return n
end

-- The stream routes in hash `key`, parsed once per publish call (the common case: none, or
-- none that matches, must stay cheap). Returns a table with parallel arrays: stream key, pattern,
-- the pattern's literal start before its first wildcard (false: no wildcard) and the raw lease
-- value (its expiry is read only when the route matches).
local function routes_of(key)
  local entries = redis.call('HGETALL', key)
  local routes = {n = 0, stream = {}, pattern = {}, lit = {}, value = {}, key = key}
  local find, sub = string.find, string.sub
  local n = 0
  for i = 1, #entries, 2 do
    local value = entries[i + 1]
    local sp = find(value, ' ', 1, true)
    if sp then
      n = n + 1
      local pattern = sub(value, sp + 1)
      -- plain finds: '+' comes before any '#' (which ends a pattern)
      local w = find(pattern, '+', 1, true) or find(pattern, '#', 1, true)
      local lit = false
      if w then
        local e = w - 1  -- the literal start ends here ('a/#' also matches 'a': no slash)
        if e > 0 and string.byte(pattern, w) == 35 then e = e - 1 end
        lit = sub(pattern, 1, e)
      end
      routes.stream[n] = entries[i]
      routes.pattern[n] = pattern
      routes.lit[n] = lit
      routes.value[n] = value
    end
  end
  routes.n = n
  return routes
end

-- Whether route r is leased still; an expired one is deleted (and skipped from now on).
local function route_live(routes, r)
  if not routes.now then routes.now = now_ms() end
  local value = routes.value[r]
  local expiry = tonumber(string.sub(value, 1, string.find(value, ' ', 1, true) - 1))
  if expiry and expiry >= routes.now then return true end
  redis.call('HDEL', routes.key, routes.stream[r])
  routes.pattern[r] = false
  routes.lit[r] = false
  return false
end

-- One standalone publish: the retained update with its markers, the PUBLISH, the XADDs
-- (`routes` parsed by `routes_of` for a batch; false for a single message: scanned directly).
local function publish_one(retain, topic, body, maxlen, routes)
  local seq = false
  if retain == '1' then
    seq = retain_body(topic, body)
    redis.call('PUBLISH', P .. 'ctl', 'r' .. seq)
  end
  redis.call('PUBLISH', topic, body)
  if seq then redis.call('PUBLISH', P .. 'ctl', 'e') end
  if not routes then
    fan_out(topic, body, seq, maxlen)
    return
  end
  local lits, patterns = routes.lit, routes.pattern
  for r = 1, routes.n do
    local lit = lits[r]
    local hit
    if lit then
      -- the literal start rules out most routes before any splitting
      hit = string.sub(topic, 1, #lit) == lit and wild_matches(patterns[r], topic)
    else
      hit = patterns[r] == topic
    end
    if hit and route_live(routes, r) then
      if add(routes.stream[r], maxlen, topic, body, seq) == 0 then
        routes.pattern[r] = false  -- junk: deleted by `add`, skipped from now on
        routes.lit[r] = false
      end
    end
  end
end

-- Write a lease "<now + ttl> <pattern>" and drop the expired ones; the key outlives the lease.
local function lease(key, field, pattern, ttl)
  local now = now_ms()
  redis.call('HSET', key, field, (now + ttl) .. ' ' .. pattern)
  local entries = redis.call('HGETALL', key)
  for i = 1, #entries, 2 do
    local value = entries[i + 1]
    local sp = string.find(value, ' ', 1, true)
    local expiry = sp and tonumber(string.sub(value, 1, sp - 1))
    if not expiry or expiry < now then
      redis.call('HDEL', key, entries[i])
    end
  end
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
"""

_OPS = r"""
if op == 'p' then
  -- standalone publishes, in order: maxlen, then (retain, topic, body) per message. Returns
  -- the number of messages, or {index, error, ...} (1-based) for those that failed.
  local maxlen = ARGV[3]
  local routes = #ARGV > 6 and routes_of(P .. 'routes')
  local failed = {}
  for i = 4, #ARGV, 3 do
    local ok, err = pcall(publish_one, ARGV[i], ARGV[i + 1], ARGV[i + 2], maxlen, routes)
    if not ok then
      failed[#failed + 1] = (i - 1) / 3
      failed[#failed + 1] = type(err) == 'table' and tostring(err.err) or tostring(err)
    end
  end
  if #failed == 0 then return (#ARGV - 3) / 3 end
  return failed
elseif op == 'P' then
  -- cluster publish: topic, body, retain, maxlen, broad hash of the slot, classic prefix
  local topic, body, retain, maxlen = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
  local broad, C = ARGV[7], ARGV[8]
  local seq = false
  if retain == '1' then seq = retain_body(topic, body) end
  local frame = (seq or '') .. '\0' .. topic .. '\0' .. body
  local n = redis.call('SPUBLISH', P .. 't:' .. topic, frame)
  for _, entry in ipairs(leased(P .. 'patterns', topic, true)) do
    n = n + redis.call('SPUBLISH', P .. 'p:' .. entry[2], frame)
  end
  for _, entry in ipairs(leased(broad, topic, true)) do
    n = n + redis.call('PUBLISH', C .. 'p:' .. entry[2], frame)
  end
  return n + fan_out(topic, body, seq, maxlen)
elseif op == 'r' then
  -- register or refresh a route: stream, group, pattern, ttl ms
  local stream, group, pattern, ttl = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
  lease(P .. 'routes', stream, pattern, ttl)
  redis.pcall('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
  redis.call('PEXPIRE', stream, ttl)
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
elseif op == 'a' then
  -- lease a pattern (cluster pub/sub): hash, field, pattern, ttl ms
  lease(ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]))
  return 1
elseif op == 'd' then
  -- drop a pattern lease: hash, field
  return redis.call('HDEL', ARGV[3], ARGV[4])
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

SCRIPT = _HELPERS + _OPS
"""The script text (``SCRIPT LOAD``); the first argument is the operation, the second ``N``."""

BROAD_SCRIPT = r"""#!lua flags=allow-cross-slot-keys
-- Redis Cluster: write (op 'a') or drop (op 'd') broad-pattern leases in the `broad` hashes of
-- many slots at once. Called with 0 keys on one master, for the slots it owns; the hash names
-- come last in ARGV. ARGV: op, ttl ms, n, field 1, pattern 1, ..., field n, pattern n, hash...
local op, ttl, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local first = 4 + 2 * n
local expiry = false
if op == 'a' then
  local t = redis.call('TIME')
  expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
end
for k = first, #ARGV do
  local key = ARGV[k]
  for i = 0, n - 1 do
    local field = ARGV[4 + 2 * i]
    if expiry then
      redis.call('HSET', key, field, expiry .. ' ' .. ARGV[5 + 2 * i])
    else
      redis.call('HDEL', key, field)
    end
  end
  if expiry and redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
return #ARGV - first + 1
"""
"""Broad leases for all the slots of one master in one call (Redis 7's cross-slot flag lets a
script touch keys of several slots when all are local; they cannot be declared as keys)."""
