"""The replay buffer's Lua scripts: each is one atomic step on the Redis server.

Redis runs a script without interleaving other commands and logs its effects to the AOF as one
MULTI/EXEC, so a script's writes are all there after a crash or none are. Key names follow the
layout in `buffer/store.py`'s docstring; `buffer.store.ReplayBuffer` registers these scripts
and builds their arguments.
"""

from __future__ import annotations

CATKEY_LUA = """
local function catkey(rec)
  local c = rec.pair.category
  if c == nil or c == cjson.null then return 'none' end
  return 'c:' .. c
end
"""

# ARGV: ns, fresh_capacity, anchor fingerprint guard ('' = none), new version token, the number
#       of groups G, G group fields "<pool>|<cycle>|<catkey>" (cycle '' for anchor), one
#       argument holding a line "<id> <group 1..G> <created_at epoch>" per record, then the
#       records' pair JSONs, one argument each. (Few arguments: packing costs per argument on
#       both sides. But not the JSON inside a longer argument: Lua hashes every byte of every
#       string it makes, and cutting the JSON out would make and hash it twice.)
# Batched: which ids exist is one HMGET per slice of BATCH ids, and the new pairs go in with one
# HSET per slice and one ZADD per index and slice, so the script makes a few calls per thousand
# pairs instead of three per pair (and the AOF logs a few large commands, still in one
# MULTI/EXEC). unpack() has a C-stack limit (~8k values), hence the slices. Counts and times
# are aggregated per group and written once per group. A pair given twice in one call is added
# once (the second counts as a duplicate).
ADD_LUA = CATKEY_LUA + """
local ns, capacity, guard = ARGV[1], tonumber(ARGV[2]), ARGV[3]
if guard ~= '' then
  local fp = redis.call('HGET', ns .. ':anchor', 'fingerprint')
  if fp ~= guard then return redis.error_reply('TETHER_ANCHOR_CHANGED ' .. tostring(fp)) end
end
local P, G, T = ns .. ':pairs', ns .. ':groups', ns .. ':group_times'
local BATCH = 1000
local added, dup, evicted = 0, 0, 0
local ng = tonumber(ARGV[5])
local gkey, gscore, gfresh, zs = {}, {}, {}, {}
for g = 1, ng do
  local pool, cycle, cat = string.match(ARGV[5 + g], '^([^|]*)|([^|]*)|(.*)$')
  gkey[g] = ns .. ':idx:' .. pool .. ':' .. cat
  gscore[g] = '0'  -- a string: Lua would format a number for every call
  if cycle ~= '' then gscore[g] = cycle end
  gfresh[g] = pool == 'fresh'
  zs[g] = {}
end
local first = 6 + ng  -- ARGV[first]: the lines; ARGV[first + k]: record k's JSON
local ids, grp, at = {}, {}, {}
local n = 0
for id, g, t in string.gmatch(ARGV[first], '(%S+) (%d+) (%S+)\\n') do
  n = n + 1
  ids[n], grp[n], at[n] = id, tonumber(g), t
end
if n ~= #ARGV - first then return redis.error_reply('ERR TETHER_BAD_ARGS lines/records mismatch') end
local counts, tmin, tmax = {}, {}, {}
local fields, order, seen = {}, {}, {}
for s = 1, #ids, BATCH do
  local e = math.min(s + BATCH - 1, #ids)
  local found = redis.call('HMGET', P, unpack(ids, s, e))
  for k = s, e do
    local id = ids[k]
    if found[k - s + 1] or seen[id] then
      dup = dup + 1
    else
      seen[id] = true
      local g = grp[k]
      fields[#fields + 1] = id
      fields[#fields + 1] = ARGV[first + k]
      local z = zs[g]
      z[#z + 1] = gscore[g]
      z[#z + 1] = id
      if gfresh[g] then
        order[#order + 1] = gscore[g]
        order[#order + 1] = id
      end
      local t = tonumber(at[k])
      counts[g] = (counts[g] or 0) + 1
      if tmin[g] == nil or t < tmin[g] then tmin[g] = t end
      if tmax[g] == nil or t > tmax[g] then tmax[g] = t end
      added = added + 1
    end
  end
end
local function batched(cmd, key, flat)
  for s = 1, #flat, 2 * BATCH do
    redis.call(cmd, key, unpack(flat, s, math.min(s + 2 * BATCH - 1, #flat)))
  end
end
batched('HSET', P, fields)
for g = 1, ng do batched('ZADD', gkey[g], zs[g]) end
batched('ZADD', ns .. ':fresh:order', order)
for g, c in pairs(counts) do
  local f = ARGV[5 + g]
  redis.call('HINCRBY', G, f, c)
  local lo, hi = tmin[g], tmax[g]
  local old = redis.call('HGET', T, f)
  if old then
    local a, b = string.match(old, '^(%S+) (%S+)$')
    lo, hi = math.min(lo, tonumber(a)), math.max(hi, tonumber(b))
  end
  redis.call('HSET', T, f, string.format('%.6f %.6f', lo, hi))
end
local over = redis.call('ZCARD', ns .. ':fresh:order') - capacity
if over > 0 then
  local popped = redis.call('ZPOPMIN', ns .. ':fresh:order', over)
  for j = 1, #popped, 2 do
    local id = popped[j]
    local rec = cjson.decode(redis.call('HGET', P, id))
    local cat = catkey(rec)
    local f = 'fresh|' .. string.format('%d', rec.cycle) .. '|' .. cat
    redis.call('ZREM', ns .. ':idx:fresh:' .. cat, id)
    redis.call('HDEL', P, id)
    if redis.call('HINCRBY', G, f, -1) <= 0 then
      redis.call('HDEL', G, f)
      redis.call('HDEL', T, f)
    end
    evicted = evicted + 1
  end
end
if added > 0 or evicted > 0 then redis.call('SET', ns .. ':version', ARGV[4]) end
return {added, dup, evicted}
"""

# ARGV: ns, fingerprint, replace ('1'/'0'), seeded_at, new version token
SEED_BEGIN_LUA = """
local ns, fp, replace = ARGV[1], ARGV[2], ARGV[3]
local M, P, G = ns .. ':anchor', ns .. ':pairs', ns .. ':groups'
local cur = redis.call('HGET', M, 'fingerprint')
local anchor_fields = {}
local anchor_count = 0
local groups = redis.call('HGETALL', G)
for i = 1, #groups, 2 do
  if string.sub(groups[i], 1, 8) == 'anchor||' then
    anchor_fields[#anchor_fields + 1] = groups[i]
    anchor_count = anchor_count + tonumber(groups[i + 1])
  end
end
local removed = 0
if cur and cur ~= fp then
  if replace ~= '1' then return {'mismatch', cur, anchor_count} end
  for _, f in ipairs(anchor_fields) do
    local key = ns .. ':idx:anchor:' .. string.sub(f, 9)
    for _, id in ipairs(redis.call('ZRANGE', key, 0, -1)) do
      redis.call('HDEL', P, id)
      removed = removed + 1
    end
    redis.call('DEL', key)
    redis.call('HDEL', G, f)
    redis.call('HDEL', ns .. ':group_times', f)
  end
  redis.call('DEL', M)
  redis.call('SET', ns .. ':version', ARGV[5])
end
if cur ~= fp then
  redis.call('HSET', M, 'fingerprint', fp, 'seeded_at', ARGV[4], 'complete', '0')
end
return {'ok', removed, redis.call('HGET', M, 'complete')}
"""

# ARGV: ns, fingerprint
SEED_DONE_LUA = """
if redis.call('HGET', ARGV[1] .. ':anchor', 'fingerprint') == ARGV[2] then
  redis.call('HSET', ARGV[1] .. ':anchor', 'complete', '1')
end
return 1
"""

# ARGV: ns, expected version, picks "<k>,<rank>;<k>,<rank>;...", then the index suffixes
#       '<pool>:<catkey>' that k (1-based) refers to (few, flat arguments: packing costs per
#       argument). The JSON blobs come back as HMGET returns them: joining them in Lua would
#       double the script's CPU, and Redis's one thread serves every trainer.
# Returns {1, pair JSONs}; or {0, version, groups} when the buffer changed since the caller's
# plan, so it can re-plan without another round trip.
FETCH_LUA = """
local ns = ARGV[1]
local version = redis.call('GET', ns .. ':version') or '0'
if version ~= ARGV[2] then return {0, version, redis.call('HGETALL', ns .. ':groups')} end
local keys = {}
for i = 4, #ARGV do keys[i - 3] = ns .. ':idx:' .. ARGV[i] end
local ids = {}
for k, rank in string.gmatch(ARGV[3], '(%d+),(%d+)') do
  local r = redis.call('ZRANGE', keys[tonumber(k)], rank, rank)
  if #r == 0 then return {0, version, redis.call('HGETALL', ns .. ':groups')} end
  ids[#ids + 1] = r[1]
end
local function hmget(key)
  if #ids <= 1000 then return redis.call('HMGET', key, unpack(ids)) end
  local out = {}  -- in slices: unpack() has a C-stack limit (~8k)
  for s = 1, #ids, 1000 do
    local part = redis.call('HMGET', key, unpack(ids, s, math.min(s + 999, #ids)))
    for k = 1, #part do out[#out + 1] = part[k] end
  end
  return out
end
return {1, hmget(ns .. ':pairs')}
"""
