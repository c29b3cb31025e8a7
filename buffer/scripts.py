"""The replay buffer's Lua scripts: each is one atomic step on the Redis server.

Redis runs a script without interleaving other commands and logs its effects to the AOF as one
MULTI/EXEC, so a script's writes are all there after a crash or none are. Key names follow the
layout in `buffer/store.py`'s docstring; `buffer.store.ReplayBuffer` registers these scripts
and builds their arguments.

Every key a script touches arrives in KEYS (all in the namespace's hash-tag slot), as Redis
Cluster requires. Which index keys a write touches depends on what is stored (eviction pops
pairs of any fresh category; replacing the anchor drops every anchor category), so the caller
passes the ones it knows and a script first checks that every index key it may touch was
passed; if not it returns `{-1, missing key, ...}` before writing anything and the caller
retries with them. Lua only builds a key name to look it up among KEYS.

A full Redis (`OOM` reply) refuses a script at its first write, before it changed anything;
once a script has written, Redis lets it finish. So each script is all or nothing under OOM too.
"""

from __future__ import annotations

CATKEY_LUA = """
local function catkey(rec)
  local c = rec.pair.category
  if c == nil or c == cjson.null then return 'none' end
  return 'c:' .. c
end
"""

# The index keys passed (KEYS[first..]) as a set, and a check that a list of names is in it.
DECLARED_LUA = """
local function declared_set(first)
  local set = {}
  for i = first, #KEYS do set[KEYS[i]] = true end
  return set
end
local function undeclared(set, names)
  local missing = {-1}
  for _, k in ipairs(names) do
    if not set[k] then missing[#missing + 1] = k end
  end
  if #missing > 1 then return missing end
  return nil
end
local function group_index_names(groups_key, prefix, pool)
  local names = {}
  local raw = redis.call('HGETALL', groups_key)
  for i = 1, #raw, 2 do
    local p, _, cat = string.match(raw[i], '^([^|]*)|([^|]*)|(.*)$')
    if p == pool then names[#names + 1] = prefix .. p .. ':' .. cat end
  end
  return names
end
"""

# Drops the anchor pool: its pairs, indexes, groups, times and the anchor record.
# KEYS[1..5] = anchor, pairs, groups, group_times, version (index keys checked by the caller).
DROP_ANCHOR_LUA = """
local function drop_anchor(prefix, token)
  local M, P, G, T = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
  local removed = 0
  local groups = redis.call('HGETALL', G)
  for i = 1, #groups, 2 do
    local f = groups[i]
    if string.sub(f, 1, 8) == 'anchor||' then
      local key = prefix .. 'anchor:' .. string.sub(f, 9)
      for _, id in ipairs(redis.call('ZRANGE', key, 0, -1)) do
        redis.call('HDEL', P, id)
        removed = removed + 1
      end
      redis.call('DEL', key)
      redis.call('HDEL', G, f)
      redis.call('HDEL', T, f)
    end
  end
  redis.call('DEL', M)
  redis.call('SET', KEYS[5], token)
  return removed
end
"""

# KEYS: pairs, groups, group_times, fresh:order, anchor, version, then index keys: those of the
#       records' groups and of every fresh group stored (eviction may pop any of them).
# ARGV: index key prefix '<{ns}>:idx:', fresh_capacity, anchor fingerprint guard ('' = none),
#       seed start (seeded_at: this call may create the anchor record; '' = it must exist),
#       seed finish ('1': mark the seed complete), new version token, the number of groups G,
#       G group fields "<pool>|<cycle>|<catkey>" (cycle '' for anchor), one argument holding a
#       line "<id> <group 1..G> <created_at epoch>" per record, then the records' pair JSONs, one
#       argument each. (Few arguments: packing costs per argument on both sides. But not the
#       JSON inside a longer argument: Lua hashes every byte of every string it makes, and
#       cutting the JSON out would make and hash it twice.)
# Seeding: the first chunk creates the anchor record (fingerprint, seeded_at, complete '0') and
# the last marks it complete, each in the same atomic step as its pairs, so a seed of one chunk
# is all or nothing and a later chunk finding the record gone (or another fingerprint) stops.
# Batched: which ids exist is one HMGET per slice of BATCH ids, and the new pairs go in with one
# HSET per slice and one ZADD per index and slice, so the script makes a few calls per thousand
# pairs instead of three per pair (and the AOF logs a few large commands, still in one
# MULTI/EXEC). unpack() has a C-stack limit (~8k values), hence the slices. Counts and times
# are aggregated per group and written once per group. A pair given twice in one call is added
# once (the second counts as a duplicate).
# Returns {added, duplicates, evicted}, or {-1, missing index keys...} having written nothing.
ADD_LUA = CATKEY_LUA + DECLARED_LUA + """
local prefix, capacity, guard, seed_start, seed_finish = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local P, G, T, O, M, V = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local create = false
if guard ~= '' then
  local fp = redis.call('HGET', M, 'fingerprint')
  if not fp then
    if seed_start == '' then return redis.error_reply('TETHER_ANCHOR_CHANGED (gone)') end
    create = true
  elseif fp ~= guard then
    return redis.error_reply('TETHER_ANCHOR_CHANGED ' .. fp)
  end
end
local BATCH = 1000
local added, dup, evicted = 0, 0, 0
local ng = tonumber(ARGV[7])
local gkey, gscore, gfresh, zs = {}, {}, {}, {}
local touched = group_index_names(G, prefix, 'fresh')
for g = 1, ng do
  local pool, cycle, cat = string.match(ARGV[7 + g], '^([^|]*)|([^|]*)|(.*)$')
  gkey[g] = prefix .. pool .. ':' .. cat
  touched[#touched + 1] = gkey[g]
  gscore[g] = '0'  -- a string: Lua would format a number for every call
  if cycle ~= '' then gscore[g] = cycle end
  gfresh[g] = pool == 'fresh'
  zs[g] = {}
end
local missing = undeclared(declared_set(7), touched)
if missing then return missing end
local first = 8 + ng  -- ARGV[first]: the lines; ARGV[first + k]: record k's JSON
local ids, grp, at = {}, {}, {}
local n = 0
for id, g, t in string.gmatch(ARGV[first], '(%S+) (%d+) (%S+)\\n') do
  n = n + 1
  ids[n], grp[n], at[n] = id, tonumber(g), t
end
if n ~= #ARGV - first then return redis.error_reply('ERR TETHER_BAD_ARGS lines/records mismatch') end
if create then
  redis.call('HSET', M, 'fingerprint', guard, 'seeded_at', seed_start, 'complete', '0')
end
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
batched('ZADD', O, order)
for g, c in pairs(counts) do
  local f = ARGV[7 + g]
  redis.call('HINCRBY', G, f, c)
  local lo, hi = tmin[g], tmax[g]
  local old = redis.call('HGET', T, f)
  if old then
    local a, b = string.match(old, '^(%S+) (%S+)$')
    lo, hi = math.min(lo, tonumber(a)), math.max(hi, tonumber(b))
  end
  redis.call('HSET', T, f, string.format('%.6f %.6f', lo, hi))
end
local over = redis.call('ZCARD', O) - capacity
if over > 0 then
  local popped = redis.call('ZPOPMIN', O, over)
  for j = 1, #popped, 2 do
    local id = popped[j]
    local rec = cjson.decode(redis.call('HGET', P, id))
    local cat = catkey(rec)
    local f = 'fresh|' .. string.format('%d', rec.cycle) .. '|' .. cat
    redis.call('ZREM', prefix .. 'fresh:' .. cat, id)  -- declared: checked above
    redis.call('HDEL', P, id)
    if redis.call('HINCRBY', G, f, -1) <= 0 then
      redis.call('HDEL', G, f)
      redis.call('HDEL', T, f)
    end
    evicted = evicted + 1
  end
end
if seed_finish == '1' then redis.call('HSET', M, 'complete', '1') end
if added > 0 or evicted > 0 then redis.call('SET', V, ARGV[6]) end
return {added, dup, evicted}
"""

# KEYS: anchor, pairs, groups, group_times, version, then every anchor index key.
# ARGV: index key prefix, fingerprint, replace ('1'/'0'), new version token.
# Reads where the anchor stands; with replace, drops an anchor of another fingerprint. Creates
# nothing: the first ADD chunk of the seed creates the anchor record with its pairs.
# Returns {'ok', removed, complete ('1', '0' or nil)}, {'mismatch', fingerprint, pairs}, or
# {-1, missing index keys...} having written nothing.
SEED_BEGIN_LUA = DECLARED_LUA + DROP_ANCHOR_LUA + """
local M, G = KEYS[1], KEYS[3]
local cur = redis.call('HGET', M, 'fingerprint')
local anchor_count = 0
local groups = redis.call('HGETALL', G)
for i = 1, #groups, 2 do
  if string.sub(groups[i], 1, 8) == 'anchor||' then anchor_count = anchor_count + tonumber(groups[i + 1]) end
end
local removed = 0
if cur and cur ~= ARGV[2] then
  if ARGV[3] ~= '1' then return {'mismatch', cur, anchor_count} end
  local missing = undeclared(declared_set(6), group_index_names(G, ARGV[1], 'anchor'))
  if missing then return missing end
  removed = drop_anchor(ARGV[1], ARGV[4])
end
return {'ok', removed, redis.call('HGET', M, 'complete')}
"""

# KEYS: as SEED_BEGIN. ARGV: index key prefix, fingerprint, new version token.
# Undoes a seed that a full Redis stopped part way: drops the anchor if it is still this
# fingerprint's and incomplete. (Deleting is allowed while Redis is over maxmemory.)
# Returns the pairs removed, or {-1, missing index keys...} having written nothing.
SEED_ABORT_LUA = DECLARED_LUA + DROP_ANCHOR_LUA + """
local M = KEYS[1]
if redis.call('HGET', M, 'fingerprint') ~= ARGV[2] or redis.call('HGET', M, 'complete') ~= '0' then return 0 end
local missing = undeclared(declared_set(6), group_index_names(KEYS[3], ARGV[1], 'anchor'))
if missing then return missing end
return drop_anchor(ARGV[1], ARGV[3])
"""

# KEYS: groups, version. Returns {groups as HGETALL gives them, version or nil}: one consistent
# read. (Not a MULTI: Redis refuses to queue even reads inside MULTI while it is over
# maxmemory, and a full buffer must stay readable for training.)
GROUPS_LUA = """
return {redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[2])}
"""

# KEYS: version, groups, pairs, then the index keys that picks' k (1-based) refers to.
# ARGV: expected version, picks "<k>,<rank>;<k>,<rank>;..." (few, flat arguments: packing costs
#       per argument). The JSON blobs come back as HMGET returns them: joining them in Lua would
#       double the script's CPU, and Redis's one thread serves every trainer.
# Returns {1, pair JSONs}; or {0, version, groups} when the buffer changed since the caller's
# plan, so it can re-plan without another round trip.
FETCH_LUA = """
local version = redis.call('GET', KEYS[1]) or '0'
if version ~= ARGV[1] then return {0, version, redis.call('HGETALL', KEYS[2])} end
local ids = {}
for k, rank in string.gmatch(ARGV[2], '(%d+),(%d+)') do
  local r = redis.call('ZRANGE', KEYS[3 + tonumber(k)], rank, rank)
  if #r == 0 then return {0, version, redis.call('HGETALL', KEYS[2])} end
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
return {1, hmget(KEYS[3])}
"""
