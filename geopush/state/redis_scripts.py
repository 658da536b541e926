"""The Lua that geopush runs in Redis, apart from the Python that calls it (as arq keeps lua.py).

Each script touches the keys of one device, or of one Redis Cluster hash slot, so a cluster can
run it; geopush.state.redis says which keys and arguments each gets and why.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# Every state-changing script runs at most once, and says so (geopush.state.redis: "commits that
# are safe to retry"). KEYS[1] is the call's record, a key named after a random id the call
# carries; ARGV[1] its deadline (Redis clock, ms), ARGV[2] how long the record is kept (ms). A call
# that comes after its deadline, or finds its record (RESOLVE fenced it while it was in flight),
# writes nothing and fails; one that runs keeps its result in the record, where RESOLVE finds it.
# The script then returns the same string: one parser for both ways of learning the outcome.
_ONCE = """
local clock = redis.call('TIME')
if tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000) > tonumber(ARGV[1]) then
  return redis.error_reply('GEOPUSH_LATE the call came after its deadline; nothing written')
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('GEOPUSH_FENCED the call was resolved in flight; nothing written')
end
local function done(result)
  redis.call('SET', KEYS[1], '=' .. result, 'PX', ARGV[2])
  return result
end
"""

# KEYS: the record, then track, ver, visits of each device in turn. ARGV: deadline, record ttl,
# visits kept, then for each device: expected version ('' = none), the version to set ('' =
# leave it: a device with no version and nothing to write), track JSON ('' = leave it), number
# of visits n, n visit JSONs. Each device is checked and written on its own (a conflict on one
# does not hold back the others). Returns the 1-based positions of the devices whose version
# was not the one expected, comma-separated ('' = none). Versions are read with one MGET and
# written with the tracks by MSET: a few calls for the whole batch instead of three per
# device. `unpack` is bounded by Lua's stack, hence chunks.
_COMMIT = _ONCE + """
local kept = -tonumber(ARGV[3])
local count = (#KEYS - 1) / 3
local versions = {}
for first = 1, count, 1000 do
  local names = {}
  for i = first, math.min(first + 999, count) do names[i - first + 1] = KEYS[3 * i] end
  local got = redis.call('MGET', unpack(names))
  for j = 1, #got do versions[first + j - 1] = got[j] end
end
local conflicts, sets, c, s, a = {}, {}, 0, 0, 4
for i = 1, count do
  local n = tonumber(ARGV[a + 3])
  if (versions[i] or '') ~= ARGV[a] then
    c = c + 1
    conflicts[c] = i
  elseif ARGV[a + 1] ~= '' then
    if ARGV[a + 2] ~= '' then
      sets[s + 1], sets[s + 2], s = KEYS[3 * i - 1], ARGV[a + 2], s + 2
    end
    sets[s + 1], sets[s + 2], s = KEYS[3 * i], ARGV[a + 1], s + 2
    if n > 0 then
      redis.call('RPUSH', KEYS[3 * i + 1], unpack(ARGV, a + 4, a + 3 + n))
      redis.call('LTRIM', KEYS[3 * i + 1], kept, -1)
    end
    if s >= 1000 then
      redis.call('MSET', unpack(sets, 1, s))
      s = 0
    end
  end
  a = a + 4 + n
end
if s > 0 then redis.call('MSET', unpack(sets, 1, s)) end
return done(table.concat(conflicts, ','))
"""

# The commit of devices whose outcome holds decisions (geopush.engine, DECISIONS IN TWO STEPS):
# COMMIT's compare-and-set, and with it what the policy reads next time. KEYS: the record,
# then track, ver, visits, pushes, opens, decisions, outbox of each device in turn. ARGV:
# deadline, record ttl, visits kept, decisions kept, then for each device: expected version,
# the version to set, track JSON, how many of the oldest stored visits to drop (past
# retention.history), n visits and their JSONs, n pushes reserved and (push_id, JSON) pairs,
# n pushes forgotten (past retention) and their ids, n decisions and their JSONs, n outbox
# entries and (push_id, JSON) pairs. Returns the 1-based positions of the devices whose version
# moved, comma-separated ('' = none). Few devices per call (a decision is rare), so no
# chunking. The outbox entries are written here, so a push is queued if and only if its
# reservation stands; HSETNX: a push already queued (and perhaps sent) is never put back.
_COMMIT_DECIDED = _ONCE + """
local visits_kept = -tonumber(ARGV[3])
local decisions_kept = -tonumber(ARGV[4])
local count = (#KEYS - 1) / 7
local conflicts, c, a = {}, 0, 5
for i = 1, count do
  local k = 7 * (i - 1) + 1
  local drop = tonumber(ARGV[a + 3])
  local nv = tonumber(ARGV[a + 4])
  local p = a + 5 + nv
  local np = tonumber(ARGV[p])
  local f = p + 1 + 2 * np
  local nf = tonumber(ARGV[f])
  local d = f + 1 + nf
  local nd = tonumber(ARGV[d])
  local o = d + 1 + nd
  local no = tonumber(ARGV[o])
  if (redis.call('GET', KEYS[k + 2]) or '') ~= ARGV[a] then
    c = c + 1
    conflicts[c] = i
  else
    redis.call('SET', KEYS[k + 1], ARGV[a + 2])
    redis.call('SET', KEYS[k + 2], ARGV[a + 1])
    if drop > 0 then redis.call('LTRIM', KEYS[k + 3], drop, -1) end
    if nv > 0 then
      redis.call('RPUSH', KEYS[k + 3], unpack(ARGV, a + 5, a + 4 + nv))
      redis.call('LTRIM', KEYS[k + 3], visits_kept, -1)
    end
    if nf > 0 then
      redis.call('HDEL', KEYS[k + 4], unpack(ARGV, f + 1, f + nf))
      redis.call('HDEL', KEYS[k + 5], unpack(ARGV, f + 1, f + nf))
      redis.call('HDEL', KEYS[k + 7], unpack(ARGV, f + 1, f + nf))
    end
    if np > 0 then redis.call('HSET', KEYS[k + 4], unpack(ARGV, p + 1, p + 2 * np)) end
    if nd > 0 then
      redis.call('RPUSH', KEYS[k + 6], unpack(ARGV, d + 1, d + nd))
      redis.call('LTRIM', KEYS[k + 6], decisions_kept, -1)
    end
    for j = 1, no do
      redis.call('HSETNX', KEYS[k + 7], ARGV[o + 2 * j - 1], ARGV[o + 2 * j])
    end
  end
  a = o + 1 + 2 * no
end
return done(table.concat(conflicts, ','))
"""

# KEYS: the record, pushes, opens, ver. ARGV: deadline, record ttl, push_id, time of the open.
# The first open reported is kept (an app may report it again); a new one moves the version, so
# a decision computed on the history before it is computed again. Returns the open's time as
# stored, '' when the device has no such push (a holdout was never sent: it cannot be opened).
_OPENED = _ONCE + """
local record = redis.call('HGET', KEYS[2], ARGV[3])
if not record or cjson.decode(record)[6] ~= 'push' then return done('') end
if redis.call('HSETNX', KEYS[3], ARGV[3], ARGV[4]) == 1 then redis.call('INCR', KEYS[4]) end
return done(redis.call('HGET', KEYS[3], ARGV[3]))
"""

# The outbox's scripts (geopush.state.redis, "the outbox"). An entry is a flat JSON object
# (geopush.delivery.outbox): the scripts change its state with cjson, which keeps nulls, numbers
# to 14 digits and an empty `data` as {}.

# KEYS: the record, outbox, profile. ARGV: deadline, record ttl, push_id, now, the lease's end.
# An attempt begins: a due entry (queued and due, or sending under a lease that ran out) becomes
# sending under a new lease, one attempt more. Returns '' when there is no such entry ('E' when the
# device is not registered either: erased, and the member names it, so it goes now), 'F' when
# it is final, 'N<when>' when it is not due yet (another caller holds it, or its next attempt
# is later), else the entry as it is now, a newline, and the profile's JSON ('' if none).
_BEGIN_PUSH = _ONCE + """
local raw = redis.call('HGET', KEYS[2], ARGV[3])
if not raw then
  if redis.call('EXISTS', KEYS[3]) == 0 then return done('E') end
  return done('')
end
local entry = cjson.decode(raw)
local state = entry['state']
if state ~= 'queued' and state ~= 'sending' then return done('F') end
local now = tonumber(ARGV[4])
if tonumber(entry['next_attempt_at']) > now then
  return done('N' .. tostring(entry['next_attempt_at']))
end
entry['state'] = 'sending'
entry['attempts'] = tonumber(entry['attempts']) + 1
entry['next_attempt_at'] = tonumber(ARGV[5])
entry['updated_at'] = now
raw = cjson.encode(entry)
redis.call('HSET', KEYS[2], ARGV[3], raw)
return done(raw .. '\\n' .. (redis.call('GET', KEYS[3]) or ''))
"""

# KEYS: the record, outbox. ARGV: deadline, record ttl, push_id, attempts, entry JSON. An
# attempt's end is written only while the entry is still that attempt's ('1'): sending with the
# same attempts. Else '0' and nothing written: another caller took it over, or it was
# cancelled or erased meanwhile.
_FINISH_PUSH = _ONCE + """
local raw = redis.call('HGET', KEYS[2], ARGV[3])
if not raw then return done('0') end
local entry = cjson.decode(raw)
if entry['state'] ~= 'sending' or tonumber(entry['attempts']) ~= tonumber(ARGV[4]) then
  return done('0')
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[5])
return done('1')
"""

# KEYS: the record, outbox. ARGV: deadline, record ttl, now, category ('' = any), rule id
# ('' = any), reason. Queued entries that match become cancelled; returns their ids,
# comma-separated.
_CANCEL_PUSHES = _ONCE + """
local cancelled = {}
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local entry = cjson.decode(all[i + 1])
  if entry['state'] == 'queued' and (ARGV[4] == '' or entry['category'] == ARGV[4])
      and (ARGV[5] == '' or entry['rule_id'] == ARGV[5]) then
    entry['state'] = 'cancelled'
    entry['reason'] = ARGV[6]
    entry['updated_at'] = tonumber(ARGV[3])
    redis.call('HSET', KEYS[2], all[i], cjson.encode(entry))
    cancelled[#cancelled + 1] = all[i]
  end
end
return done(table.concat(cancelled, ','))
"""

# KEYS: the record, outbox, profile. ARGV: deadline, record ttl, push_id, entry JSON. An ops
# test push for a registered device ('1'), else '0'.
_PUT_PUSH = _ONCE + """
if redis.call('EXISTS', KEYS[3]) == 0 then return done('0') end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return done('1')
"""

# KEYS: the record, ver, visits, pushes, opens, decisions, outbox. ARGV: deadline, record ttl,
# cutoff (epoch s). The retention purge of one device (contract §8): visits that ended, pushes
# (and holdouts, their opens and outbox entries) and decisions older than the cutoff go, and
# so do ops test pushes created before it. Visits and decisions are stored oldest first, so a
# prefix goes. When anything went the version moves: a commit computed meanwhile on the old
# history (COMMIT_DECIDED drops visits by count) fails its compare-and-set and is computed
# again. Returns how many records went.
_PURGE = _ONCE + """
local cutoff = tonumber(ARGV[3])
local gone = 0
local function prefix(key, older)
  local rows = redis.call('LRANGE', KEYS[key], 0, -1)
  local n = 0
  for i = 1, #rows do
    if older(cjson.decode(rows[i])) then n = i else break end
  end
  if n > 0 then redis.call('LTRIM', KEYS[key], n, -1) end
  return n
end
gone = gone + prefix(3, function(v) return tonumber(v[4]) < cutoff end)
gone = gone + prefix(6, function(d) return tonumber(d['ts']) < cutoff end)
local ids = {}
local pushes = redis.call('HGETALL', KEYS[4])
for i = 1, #pushes, 2 do
  if tonumber(cjson.decode(pushes[i + 1])[2]) < cutoff then ids[#ids + 1] = pushes[i] end
end
local outbox = redis.call('HGETALL', KEYS[7])
for i = 1, #outbox, 2 do
  local entry = cjson.decode(outbox[i + 1])
  if entry['test'] == true and tonumber(entry['created_at']) < cutoff then
    ids[#ids + 1] = outbox[i]
  end
end
if #ids > 0 then
  redis.call('HDEL', KEYS[4], unpack(ids))
  redis.call('HDEL', KEYS[5], unpack(ids))
  redis.call('HDEL', KEYS[7], unpack(ids))
  gone = gone + #ids
end
if gone > 0 and redis.call('EXISTS', KEYS[2]) == 1 then redis.call('INCR', KEYS[2]) end
return done(tostring(gone))
"""

# KEYS: the lease. ARGV: holder, ttl ms. Taken when free or already the holder's (renewed).
# Not once-only: taking a lease twice is taking it.
_TAKE_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: the lease. ARGV: holder.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: the record, profile, consent, track, ver. ARGV: deadline, record ttl, the version the
# profile was read at ('' = none), profile JSON, consent change JSON or '', '1' to drop the
# track (location consent revoked: stays end without events). A compare-and-set like the
# commit's: when the version moved since the read (a ping, another profile write), nothing is
# written and '-1' comes back, so the caller edits the fresh profile again; a PATCH never
# writes back a profile read before another write. Else the new version.
_PUT_PROFILE = _ONCE + """
if (redis.call('GET', KEYS[5]) or '') ~= ARGV[3] then return done('-1') end
redis.call('SET', KEYS[2], ARGV[4])
if ARGV[5] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[5]) end
if ARGV[6] == '1' then redis.call('DEL', KEYS[4]) end
return done(tostring(redis.call('INCR', KEYS[5])))
"""

# KEYS: the record, profile, token, ver. ARGV: deadline, record ttl, token JSON ('' = remove the
# token). A device token is issued to registered devices only: '0' and nothing written when the
# profile is missing (never registered, or erased). Else the token is replaced and the version
# moves, so a batch computed with the old nonce fails its compare-and-set and is computed again
# (its pings are then refused): a revoked token is refused from its revocation's answer on.
_SET_TOKEN = _ONCE + """
if redis.call('EXISTS', KEYS[2]) == 0 then return done('0') end
if ARGV[3] == '' then redis.call('DEL', KEYS[3]) else redis.call('SET', KEYS[3], ARGV[3]) end
redis.call('INCR', KEYS[4])
return done('1')
"""

# KEYS: timers. ARGV: now, limit, now + lease. Claimed members are re-scored, not removed, so
# a crashed claimer's timers come back when the lease runs out; so do those of a claim whose
# answer was lost (it is never sent twice).
_CLAIM_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[3], member) end
return due
"""


# KEYS: the record, erasures, timers, the outbox due set, then the device's keys (its outbox
# last). ARGV: deadline, record ttl, device id, device hash, erasure record JSON. One script so
# that an erasure is whole or not at all: the data never goes without its erasure record (proof
# of consent), and a retry after a failure finds the data still there to erase. The due set's
# members of its pushes name the device: they go too. '1' if there was anything to erase (the
# record is written only then), else '0'.
_ERASE = _ONCE + """
local erased = 0
for _, push_id in ipairs(redis.call('HKEYS', KEYS[#KEYS])) do
  erased = erased + redis.call('ZREM', KEYS[4], push_id .. ' ' .. ARGV[3])
end
erased = erased + redis.call('DEL', unpack(KEYS, 5))
erased = erased + redis.call('ZREM', KEYS[3], ARGV[3])
if erased == 0 then return done('0') end
redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
return done('1')
"""

# KEYS: the record, then the device's keys (a Redis Cluster, where the erasure record and the
# timer are in other slots). ARGV: deadline, record ttl. '1' if there was anything, else '0'.
_ERASE_DEVICE = _ONCE + """
if redis.call('DEL', unpack(KEYS, 2)) == 0 then return done('0') end
return done('1')
"""


# KEYS: the record, config serial, config payload. ARGV: deadline, record ttl, payload. Both
# together, or neither; the new serial.
_PUBLISH_CONFIG = _ONCE + """
local serial = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[3], ARGV[3])
return done(tostring(serial))
"""

# KEYS: a record. ARGV: record ttl. What became of a call whose answer was lost: '=<result>'
# when it ran; else '!' and the call is fenced, so that it writes nothing if it still comes.
# Sending this again is harmless, so it may be retried until Redis answers.
_RESOLVE = """
local got = redis.call('GET', KEYS[1])
if got then return got end
redis.call('SET', KEYS[1], '!', 'PX', ARGV[1])
return '!'
"""


@dataclass(frozen=True, slots=True)
class Script:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> Script:
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


COMMIT = Script.of(_COMMIT)
COMMIT_DECIDED = Script.of(_COMMIT_DECIDED)
OPENED = Script.of(_OPENED)
PUT_PROFILE = Script.of(_PUT_PROFILE)
SET_TOKEN = Script.of(_SET_TOKEN)
CLAIM_DUE = Script.of(_CLAIM_DUE)
ERASE = Script.of(_ERASE)
ERASE_DEVICE = Script.of(_ERASE_DEVICE)
PUBLISH_CONFIG = Script.of(_PUBLISH_CONFIG)
RESOLVE = Script.of(_RESOLVE)
BEGIN_PUSH = Script.of(_BEGIN_PUSH)
FINISH_PUSH = Script.of(_FINISH_PUSH)
CANCEL_PUSHES = Script.of(_CANCEL_PUSHES)
PUT_PUSH = Script.of(_PUT_PUSH)
PURGE = Script.of(_PURGE)
TAKE_LEASE = Script.of(_TAKE_LEASE)
RELEASE_LEASE = Script.of(_RELEASE_LEASE)
SCRIPTS = (COMMIT, COMMIT_DECIDED, OPENED, PUT_PROFILE, SET_TOKEN, CLAIM_DUE, ERASE,
           ERASE_DEVICE, PUBLISH_CONFIG, RESOLVE, BEGIN_PUSH, FINISH_PUSH, CANCEL_PUSHES,
           PUT_PUSH, PURGE, TAKE_LEASE, RELEASE_LEASE)
# take a record and deadline
ONCE = (COMMIT, COMMIT_DECIDED, OPENED, PUT_PROFILE, SET_TOKEN, ERASE, ERASE_DEVICE,
        PUBLISH_CONFIG, BEGIN_PUSH, FINISH_PUSH, CANCEL_PUSHES, PUT_PUSH, PURGE)
