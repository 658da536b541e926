"""The Lua that geopush runs in Redis, apart from the Python that calls it (as arq keeps lua.py).

Each script touches the keys of one device, or of one Redis Cluster hash slot, so a cluster can
run it; geopush.state.redis says which keys and arguments each gets and why.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# KEYS: track, ver, visits of each device in turn. ARGV: visits kept, then for each device:
# expected version ('' = none), the version to set ('' = leave it: a device with no version
# and nothing to write), track JSON ('' = leave it), number of visits n, n visit JSONs. Each
# device is checked and written on its own (a conflict on one does not hold back the others).
# Returns the 1-based positions of the devices whose version was not the one expected.
# Versions are read with one MGET and written with the tracks by MSET: a few calls for the
# whole batch instead of three per device. `unpack` is bounded by Lua's stack, hence chunks.
_COMMIT = """
local kept = -tonumber(ARGV[1])
local count = #KEYS / 3
local versions = {}
for first = 1, count, 1000 do
  local names = {}
  for i = first, math.min(first + 999, count) do names[i - first + 1] = KEYS[3 * i - 1] end
  local got = redis.call('MGET', unpack(names))
  for j = 1, #got do versions[first + j - 1] = got[j] end
end
local conflicts, sets, c, s, a = {}, {}, 0, 0, 2
for i = 1, count do
  local n = tonumber(ARGV[a + 3])
  if (versions[i] or '') ~= ARGV[a] then
    c = c + 1
    conflicts[c] = i
  elseif ARGV[a + 1] ~= '' then
    if ARGV[a + 2] ~= '' then
      sets[s + 1], sets[s + 2], s = KEYS[3 * i - 2], ARGV[a + 2], s + 2
    end
    sets[s + 1], sets[s + 2], s = KEYS[3 * i - 1], ARGV[a + 1], s + 2
    if n > 0 then
      redis.call('RPUSH', KEYS[3 * i], unpack(ARGV, a + 4, a + 3 + n))
      redis.call('LTRIM', KEYS[3 * i], kept, -1)
    end
    if s >= 1000 then
      redis.call('MSET', unpack(sets, 1, s))
      s = 0
    end
  end
  a = a + 4 + n
end
if s > 0 then redis.call('MSET', unpack(sets, 1, s)) end
return conflicts
"""

# KEYS: profile, consent, track, ver. ARGV: the version the profile was read at ('' = none),
# profile JSON, consent change JSON or '', '1' to drop the track (location consent revoked:
# stays end without events). A compare-and-set like the commit's: when the version moved since
# the read (a ping, another profile write), nothing is written and -1 comes back, so the caller
# edits the fresh profile again; a PATCH never writes back a profile read before another write.
_PUT_PROFILE = """
if (redis.call('GET', KEYS[4]) or '') ~= ARGV[1] then return -1 end
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[3] ~= '' then redis.call('RPUSH', KEYS[2], ARGV[3]) end
if ARGV[4] == '1' then redis.call('DEL', KEYS[3]) end
return redis.call('INCR', KEYS[4])
"""

# KEYS: timers. ARGV: now, limit, now + lease. Claimed members are re-scored, not removed, so
# a crashed claimer's timers come back when the lease runs out.
_CLAIM_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[3], member) end
return due
"""


# KEYS: erasures, timers, then the device's keys. ARGV: device id, device hash, erasure record
# JSON. One script so that an erasure is whole or not at all: the data never goes without
# its erasure record (proof of consent), and a retry after a failure finds the data still
# there to erase. Returns 1 if there was anything to erase (the record is written only then).
_ERASE = """
local erased = redis.call('DEL', unpack(KEYS, 3))
erased = erased + redis.call('ZREM', KEYS[2], ARGV[1])
if erased == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
return 1
"""


# KEYS: config serial, config payload. ARGV: payload. Both together, or neither.
_PUBLISH_CONFIG = """
local serial = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1])
return serial
"""


@dataclass(frozen=True, slots=True)
class Script:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> Script:
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


COMMIT = Script.of(_COMMIT)
PUT_PROFILE = Script.of(_PUT_PROFILE)
CLAIM_DUE = Script.of(_CLAIM_DUE)
ERASE = Script.of(_ERASE)
PUBLISH_CONFIG = Script.of(_PUBLISH_CONFIG)
SCRIPTS = (COMMIT, PUT_PROFILE, CLAIM_DUE, ERASE, PUBLISH_CONFIG)
