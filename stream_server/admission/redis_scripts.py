"""The Redis admission store's atomic steps, one Lua script each.

Redis runs a script to completion before any other command, so each step is atomic across every
node sharing the line. Keys are built from the prefix (``ARGV[1]``) inside the scripts: this needs
one Redis instance (or a cluster with the whole prefix in one hash slot: ``{mts}:``).

Layout, below the prefix:

* ``ver`` (counter): bumped by every change of the line; ``insert`` compares it (join = snapshot,
  policy, conditional insert). ``seq`` (counter): arrival order, the tie-break of equal keys.
* ``log`` (list): what each change did to ``wait``, ``det`` and ``busy``, one JSON entry
  ``[version, [[op, id, member?], ...]]`` per version, the last ``LOG_MAX``; ``epoch``: set anew
  when ``ver`` starts again (an empty Redis). A node keeps a copy of the line at one
  ``(epoch, version)`` and a read brings it the entries since (``line_since``): it reads the whole
  line only when it is further behind than the log.
* ``wait`` (sorted set): waiting tickets, score = the order key, member = ``%015d`` seq + JSON
  ``[id, identity, tier, joined_at, key, avatar, node, resume_key, request, mode]`` (numbers as Python
  reprs, so nothing loses precision), so equal keys sort by seq; ``wm`` (hash): id -> member.
  ``mode`` is the ``start``'s (``clip`` or ``live``): a busy slot's member says how long it is
  expected to be held.
* ``det`` (hash) id -> member, ``detu`` (sorted set) id -> resume deadline, ``park`` (hash)
  resume key -> id: detached tickets, held for a resume on any node.
* ``busy`` (hash) id -> JSON ``[member, since, node]``: reserved slots; ``gexp`` (sorted set)
  id -> deadline of a grant not yet taken up on another node; ``grant:<gid>`` -> id, single use.
* ``ident`` (hash): active tickets (waiting or busy) per identity.
* ``times`` (hash): service-time means per mode and tier (``clip:vip``, ``live:low``) and per
  mode over every tier (``clip:*``); ``off`` (hash): offered work per tier and the time it was
  decayed to (``tier@``).
* ``nodes`` (sorted set) node -> lease deadline; ``nslots``, ``npool``, ``nurl`` (hashes);
  ``drain`` (set): nodes that take no new grants; ``inbox:<node>`` (list): grants made by
  another node for tickets whose clients that node holds.
* ``hot:<avatar>`` (sorted set): the joins that asked for the avatar within the hot window
  (member = ticket id, score = time), so every node sees the same uses; expires with the window.
* ``changed`` (channel): the new version, published on every change, so every node pushes
  positions at once.

The layout is the code's: nodes sharing a prefix run the same version (members without ``mode``
and ``times`` fields without one come from an older version, and fail to decode).
"""

from __future__ import annotations

COMMON = """
local P = ARGV[1]
local function k(name) return P .. name end
local function decode(m) return cjson.decode(string.sub(m, 16)) end
local function count(identity, d)
  local n = redis.call('HINCRBY', k('ident'), identity, d)
  if n <= 0 then redis.call('HDEL', k('ident'), identity) end
end
local LOG_MAX = 1024
local ops = {}
local function op(...) table.insert(ops, {...}) end
local function changed()
  local v = redis.call('INCR', k('ver'))
  if v == 1 or redis.call('EXISTS', k('epoch')) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', k('epoch'), t[1] .. '.' .. t[2])
    redis.call('DEL', k('log'))
  end
  redis.call('RPUSH', k('log'), cjson.encode({v, ops}))
  redis.call('LTRIM', k('log'), -LOG_MAX, -1)
  redis.call('PUBLISH', k('changed'), v)
end
local function wait_add(id, m, key)
  redis.call('ZADD', k('wait'), key, m)
  redis.call('HSET', k('wm'), id, m)
  op('+w', id, m)
end
local function wait_del(id, m)
  redis.call('HDEL', k('wm'), id)
  if redis.call('ZREM', k('wait'), m) == 1 then op('-w', id) end
end
local function det_add(id, m, deadline)
  redis.call('HSET', k('det'), id, m)
  redis.call('ZADD', k('detu'), deadline, id)
  op('+d', id, m)
end
local function det_del(id)
  redis.call('ZREM', k('detu'), id)
  if redis.call('HDEL', k('det'), id) == 1 then op('-d', id) end
end
local function busy_added(id) op('+b', id, redis.call('HGET', k('busy'), id)) end
local function unpark(m, id)
  local rk = decode(m)[8]
  if rk ~= '' and redis.call('HGET', k('park'), rk) == id then redis.call('HDEL', k('park'), rk) end
end
local function park(m, id)
  local rk = decode(m)[8]
  if rk ~= '' then redis.call('HSET', k('park'), rk, id) end
end
local function free_busy(id)
  local e = redis.call('HGET', k('busy'), id)
  if not e then return false end
  local b = cjson.decode(e)
  redis.call('HDEL', k('busy'), id)
  redis.call('ZREM', k('gexp'), id)
  op('-b', id)
  count(decode(b[1])[2], -1)
  return b
end
local function slots_total(now)
  local live = redis.call('ZRANGEBYSCORE', k('nodes'), '(' .. now, '+inf')
  local total = 0
  for _, n in ipairs(live) do total = total + tonumber(redis.call('HGET', k('nslots'), n) or '0') end
  return total, live
end
local function line_since(known_epoch, known_version)
  local epoch = redis.call('GET', k('epoch')) or ''
  local ver = tonumber(redis.call('GET', k('ver')) or '0')
  local known = tonumber(known_version)
  if epoch ~= '' and epoch == known_epoch and known <= ver then
    if known == ver then return {epoch, ver, 'same'} end
    if ver - known <= redis.call('LLEN', k('log')) then
      return {epoch, ver, 'log', redis.call('LRANGE', k('log'), known - ver, -1)}
    end
  end
  return {epoch, ver, 'whole', redis.call('ZRANGE', k('wait'), 0, -1), redis.call('HGETALL', k('det')),
          redis.call('HGETALL', k('busy'))}
end
"""

EXPIRE = COMMON + """
local now, grace = tonumber(ARGV[2]), tonumber(ARGV[3])
local any = false
local dead = redis.call('ZRANGEBYSCORE', k('nodes'), '-inf', ARGV[2])
if #dead > 0 then
  local gone = {}
  for _, n in ipairs(dead) do
    gone[n] = true
    redis.call('ZREM', k('nodes'), n)
    redis.call('HDEL', k('nslots'), n)
    redis.call('HDEL', k('npool'), n)
    redis.call('HDEL', k('nurl'), n)
    redis.call('SREM', k('drain'), n)
    redis.call('DEL', k('inbox:' .. n))
  end
  local busy = redis.call('HGETALL', k('busy'))
  for i = 1, #busy, 2 do
    if gone[cjson.decode(busy[i + 1])[3]] then free_busy(busy[i]) end
  end
  local wm = redis.call('HGETALL', k('wm'))
  for i = 1, #wm, 2 do
    local id, m = wm[i], wm[i + 1]
    local t = decode(m)
    if gone[t[7]] then
      wait_del(id, m)
      count(t[2], -1)
      det_add(id, m, now + grace)
      park(m, id)
    end
  end
  any = true
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', k('gexp'), '-inf', ARGV[2])) do
  free_busy(id)
  any = true
end
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', k('detu'), '-inf', ARGV[2])) do
  local m = redis.call('HGET', k('det'), id)
  det_del(id)
  if m then
    unpark(m, id)
    table.insert(out, m)
  end
  any = true
end
if any then changed() end
return out
"""

# ARGV: prefix, identity, tier, now, offered-work horizon, the line's (epoch, version) the node
# has, the joining ticket's id and avatar, the hot window in seconds (0: not counted here), mode.
JOIN_SNAPSHOT = COMMON + """
local tier, now, horizon, mode = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[11]
local mean = redis.call('HGET', k('times'), mode .. ':' .. tier)
  or redis.call('HGET', k('times'), mode .. ':*') or '0'
local value = tonumber(redis.call('HGET', k('off'), tier) or '0')
local since = tonumber(redis.call('HGET', k('off'), tier .. '@') or ARGV[4])
value = value * math.exp(-math.max(0, now - since) / horizon) + tonumber(mean)
redis.call('HSET', k('off'), tier, string.format('%.17g', value), tier .. '@', ARGV[4])
local total = slots_total(ARGV[4])
local uses, window = 0, tonumber(ARGV[10])
if window > 0 then
  local hot = k('hot:' .. ARGV[9])
  redis.call('ZADD', hot, ARGV[4], ARGV[8])
  redis.call('ZREMRANGEBYSCORE', hot, '-inf', string.format('%.17g', now - window))
  redis.call('PEXPIRE', hot, math.ceil(window * 1000))
  uses = redis.call('ZCARD', hot)
end
return {
  line_since(ARGV[6], ARGV[7]),
  total,
  redis.call('HGET', k('ident'), ARGV[2]) or '0',
  redis.call('HGETALL', k('times')),
  redis.call('HGETALL', k('off')),
  uses,
}
"""

# ARGV: prefix, version, then the member's fields from id to mode (the layout above).
INSERT = COMMON + """
local id, identity = ARGV[3], ARGV[4]
if redis.call('HEXISTS', k('wm'), id) == 1 or redis.call('HEXISTS', k('busy'), id) == 1 then
  return redis.error_reply('ticket ' .. id .. ' is already active')
end
if (redis.call('GET', k('ver')) or '0') ~= ARGV[2] then return {'stale'} end
local out = {'ok', ''}
local det = redis.call('HGETALL', k('det'))
for i = 1, #det, 2 do
  if decode(det[i + 1])[2] == identity then
    det_del(det[i])
    unpark(det[i + 1], det[i])
    table.insert(out, det[i + 1])
  end
end
local seq = redis.call('INCR', k('seq'))
local fields = {id, identity, ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12]}
local m = string.format('%015d', seq) .. cjson.encode(fields)
wait_add(id, m, ARGV[7])
count(identity, 1)
changed()
out[2] = m
return out
"""

REMOVE = COMMON + """
local id = ARGV[2]
local d = redis.call('HGET', k('det'), id)
if d then
  det_del(id)
  unpark(d, id)
end
local m = redis.call('HGET', k('wm'), id)
if m then
  wait_del(id, m)
  count(decode(m)[2], -1)
end
if d or m then changed() end
return m
"""

DETACH = COMMON + """
local id = ARGV[2]
local m = redis.call('HGET', k('wm'), id)
if not m then return false end
wait_del(id, m)
count(decode(m)[2], -1)
det_add(id, m, ARGV[3])
park(m, id)
changed()
return m
"""

# ARGV: prefix, ticket id, identity, this node (which holds the ticket's client from now on).
REATTACH = COMMON + """
local id = ARGV[2]
local m = redis.call('HGET', k('det'), id)
if not m then return false end
local t = decode(m)
if t[2] ~= ARGV[3] then return false end
det_del(id)
unpark(m, id)
t[7] = ARGV[4]
m = string.sub(m, 1, 15) .. cjson.encode(t)
wait_add(id, m, t[5])
count(t[2], 1)
changed()
return m
"""

# ARGV: prefix, now, this node, grant id, grant deadline, grant ttl (ms), tier -> pools (JSON),
# tier -> overflow pools (JSON). The first waiting ticket that a free slot may serve is granted:
# a slot of one of its tier's pools (any pool for a tier not mapped), else of one of its overflow
# pools to which no waiting ticket's tier is mapped; on its own node if that has one. Returns the
# grant: member, since, node, handoff id, tickets still waiting, the node's URL, and the slots
# still free (on the nodes taking grants).
POP_AND_RESERVE = COMMON + """
local now, me = ARGV[2], ARGV[3]
local primary, overflow = cjson.decode(ARGV[7]), cjson.decode(ARGV[8])
local _, live = slots_total(now)
local used = {}
for _, e in ipairs(redis.call('HVALS', k('busy'))) do
  local n = cjson.decode(e)[3]
  used[n] = (used[n] or 0) + 1
end
local free, pool_of, nodes = {}, {}, {}
for _, n in ipairs(live) do
  if redis.call('SISMEMBER', k('drain'), n) == 0 then
    local f = tonumber(redis.call('HGET', k('nslots'), n) or '0') - (used[n] or 0)
    if f > 0 then
      free[n] = f
      pool_of[n] = redis.call('HGET', k('npool'), n) or ''
      table.insert(nodes, n)
    end
  end
end
if #nodes == 0 then return false end
table.sort(nodes)
local function pick(owner, allowed)
  local best, best_free = false, 0
  for _, n in ipairs(nodes) do
    if allowed == nil or allowed[pool_of[n]] then
      if n == owner then return n end
      if free[n] > best_free then best, best_free = n, free[n] end
    end
  end
  return best
end
local function set_of(list)
  local out = {}
  for _, x in ipairs(list) do out[x] = true end
  return out
end
local function in_order()
  -- the waiting members a page at a time: a grant mostly takes one of the first
  local page, i, from = {}, 0, 0
  return function()
    i = i + 1
    if i > #page then
      page = redis.call('ZRANGE', k('wait'), from, from + 63)
      from, i = from + 64, 1
    end
    return page[i]
  end
end
local demanded = false
local m, t, best = false, false, false
local full = {}
for candidate in in_order() do
  local c = decode(candidate)
  local tier = c[3]
  if not full[tier] then
    local prim = primary[tier]
    local node = pick(c[7], prim and set_of(prim) or nil)
    if not node and overflow[tier] then
      if not demanded then
        demanded = {}
        for _, other in ipairs(redis.call('ZRANGE', k('wait'), 0, -1)) do
          for _, p in ipairs(primary[decode(other)[3]] or {}) do demanded[p] = true end
        end
      end
      local allowed = {}
      for _, p in ipairs(overflow[tier]) do
        if not demanded[p] then allowed[p] = true end
      end
      node = pick(c[7], allowed)
    end
    if node then
      m, t, best = candidate, c, node
      break
    end
    full[tier] = true
  end
end
if not m then return false end
wait_del(t[1], m)
redis.call('HSET', k('busy'), t[1], cjson.encode({m, now, best}))
busy_added(t[1])
local handoff = ''
if best ~= t[7] then
  handoff = ARGV[4]
  redis.call('SET', k('grant:' .. handoff), t[1], 'PX', ARGV[6])
  redis.call('ZADD', k('gexp'), ARGV[5], t[1])
end
local size = redis.call('ZCARD', k('wait'))
local left = -1
for _, n in ipairs(nodes) do left = left + free[n] end
local grant = {m, now, best, handoff, tostring(size), redis.call('HGET', k('nurl'), best) or '', tostring(left)}
if t[7] ~= me then redis.call('RPUSH', k('inbox:' .. t[7]), cjson.encode(grant)) end
changed()
return grant
"""

DELIVERED = COMMON + """
local box = k('inbox:' .. ARGV[2])
local out = redis.call('LRANGE', box, 0, -1)
redis.call('DEL', box)
return out
"""

# ARGV: prefix, ticket id, now, served ('1'/'0'), alpha.
RELEASE = COMMON + """
local b = free_busy(ARGV[2])
if not b then return false end
if ARGV[4] == '1' then
  local t = decode(b[1])
  local alpha = tonumber(ARGV[5])
  local s = math.max(0, tonumber(ARGV[3]) - tonumber(b[2]))
  for _, field in ipairs({t[10] .. ':' .. t[3], t[10] .. ':*'}) do
    local prev = redis.call('HGET', k('times'), field)
    local v = s
    if prev then v = tonumber(prev) + alpha * (s - tonumber(prev)) end
    redis.call('HSET', k('times'), field, string.format('%.17g', v))
  end
end
changed()
return b[1]
"""

# ARGV: prefix, now, the line's (epoch, version) the node has.
LINE = COMMON + """
local total, live = slots_total(ARGV[2])
local pools = {}
for _, n in ipairs(live) do
  table.insert(pools, n)
  table.insert(pools, redis.call('HGET', k('npool'), n) or '')
  table.insert(pools, redis.call('HGET', k('nslots'), n) or '0')
end
return {
  line_since(ARGV[3], ARGV[4]),
  total,
  redis.call('HGETALL', k('times')),
  pools,
}
"""

SET_SLOTS = COMMON + """
redis.call('HSET', k('nslots'), ARGV[2], ARGV[3])
changed()
return 1
"""

# ARGV: prefix, node, lease deadline, slots, pool, url. Returns 1 if the node was not registered
# (first heartbeat, Redis restarted empty, or its lease had run out).
HEARTBEAT = COMMON + """
local new = redis.call('ZADD', k('nodes'), ARGV[3], ARGV[2])
redis.call('HSET', k('nslots'), ARGV[2], ARGV[4])
redis.call('HSET', k('npool'), ARGV[2], ARGV[5])
redis.call('HSET', k('nurl'), ARGV[2], ARGV[6])
if new == 1 then changed() end
return new
"""

# ARGV: prefix, grant id, this node, now. The grant's ticket member if it was valid for this
# node and not used before (then it never is again); false otherwise.
CONSUME_GRANT = COMMON + """
local key = k('grant:' .. ARGV[2])
local id = redis.call('GET', key)
if not id then return false end
redis.call('DEL', key)
local deadline = redis.call('ZSCORE', k('gexp'), id)
local e = redis.call('HGET', k('busy'), id)
if not deadline or not e or tonumber(deadline) <= tonumber(ARGV[4]) then return false end
local b = cjson.decode(e)
if b[3] ~= ARGV[3] then return false end
redis.call('ZREM', k('gexp'), id)
return b[1]
"""

DRAIN = COMMON + """
redis.call('SADD', k('drain'), ARGV[2])
changed()
return 1
"""

FIND_DETACHED = COMMON + """
return redis.call('HGET', k('park'), ARGV[2])
"""

# ARGV: prefix, this node, then (ticket member, since) pairs: this node's sessions, reserved
# again after the store lost them.
RESTORE_BUSY = COMMON + """
for i = 3, #ARGV, 2 do
  local m = ARGV[i]
  local t = decode(m)
  if redis.call('HEXISTS', k('busy'), t[1]) == 0 then
    redis.call('HSET', k('busy'), t[1], cjson.encode({m, ARGV[i + 1], ARGV[2]}))
    busy_added(t[1])
    count(t[2], 1)
  end
end
changed()
return 1
"""
