"""Every Redis key name geopush uses, in one place.

All keys of one device share the hash tag `{d:<device_id>}` so they live in one Redis Cluster
slot: the profile script touches one device's keys, the batch commit script those of devices
of one slot (`group_by_slot`) on a cluster. The global timers sorted set and the erasure hash
are in slots of their own; nothing writes them in the same script as device keys.

Each state-changing script call leaves a short-lived record `<prefix>:{<tag>}:once:<id>` of its
outcome (geopush.state.redis). It must be in the slot of the keys the call writes, yet must not
name a device (an erasure leaves no key naming the device, and cannot find records by name): on a
cluster its tag is one that hashes to that slot (`slot_tag`), from a table built once.
"""

from __future__ import annotations

import functools
from binascii import crc_hqx
from collections.abc import Iterable
from typing import NamedTuple

from redis.crc import key_slot

DEFAULT_PREFIX = "geopush"
VISITS_KEPT = 1000  # visits remembered per device (when.visits looks back 90 days at most)
DECISIONS_KEPT = 100  # a device's latest decisions, for support ("why did I (not) get it?")


class DeviceKeys(NamedTuple):  # a tuple: built for every device of every batch, ~4x cheaper
    profile: str  # JSON of DeviceProfile
    consent: str  # list of JSON ConsentChange, oldest first
    track: str  # JSON [format, last_ts, next_due, stays, recent] (geopush.state.codec)
    visits: str  # list of JSON [store_id, geofence_id, start, end], oldest first
    version: str  # integer, INCR'd by every write of the device (the CAS of `track`)
    # JSON {nonce, issued_at} of the device's current device token; apart from the profile,
    # so that a PUT or PATCH never revokes it, yet read in the batch's one MGET
    token: str
    # hash push_id → JSON push record (geopush.state.codec): what caps, gaps and fatigue count
    pushes: str
    opens: str  # hash push_id → epoch seconds of the first open reported
    decisions: str  # list of JSON decision records, oldest first (DECISIONS_KEPT)
    # hash push_id → JSON outbox entry (geopush.delivery.outbox): written in the commit of its
    # decision, kept (final ones too, for stats and the export) as long as its push record
    outbox: str

    def all(self) -> tuple[str, ...]:
        return self


class Keys:
    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.timers = f"{prefix}:timers"  # sorted set: device_id -> due epoch seconds
        self.erasures = f"{prefix}:erasures"  # hash: device_hash -> JSON ErasureRecord
        # sorted set: "<push_id> <device_id>" -> when the push is due (an attempt, or the end of
        # a claim's lease). A hint, as timers are: the entry in the device's outbox decides
        # (geopush.state.redis, "the outbox")
        self.outbox_due = f"{prefix}:outbox:due"
        # hash per bucket (a report window): counter name -> count, with a TTL
        self.counts_prefix = f"{prefix}:counts:"
        # string per flag name: ops controls every instance follows (a pause of marketing)
        self.flag_prefix = f"{prefix}:flag:"
        # string per lease name: the holder's id, with a TTL (jobs that run once per cluster)
        self.lease_prefix = f"{prefix}:lease:"
        # hash: weather cell ("481:115") -> JSON {temperature_c, condition, at}
        self.weather = f"{prefix}:weather"
        # the configuration a reload published: its serial (INCR'd) and its payload, under one
        # hash tag so that one script writes both and one MGET reads both on a cluster
        self.config_serial = f"{prefix}:{{config}}:serial"
        self.config_payload = f"{prefix}:{{config}}:payload"

    def record(self, tag: str, call_id: str) -> str:
        """Where a call with hash tag `tag` keeps its outcome (see the module's docstring)."""
        return f"{self.prefix}:{{{tag}}}:once:{call_id}"

    def device(self, device_id: str) -> DeviceKeys:
        base = f"{self.prefix}:{{d:{device_id}}}"
        return DeviceKeys(f"{base}:profile", f"{base}:consent", f"{base}:track",
                          f"{base}:visits", f"{base}:ver", f"{base}:token", f"{base}:pushes",
                          f"{base}:opens", f"{base}:decisions", f"{base}:outbox")


def due_member(push_id: str, device_id: str) -> str:
    """The outbox due set's member of a push (device ids hold no space)."""
    return f"{push_id} {device_id}"


def parse_due_member(member: str) -> tuple[str, str]:
    push_id, _, device_id = member.partition(" ")
    return push_id, device_id


def group_by_slot(keys: Keys, device_ids: Iterable[str]) -> dict[int, list[str]]:
    """Devices by the Redis Cluster hash slot of their keys (a script may touch one slot only),
    in the order given within each slot."""
    groups: dict[int, list[str]] = {}
    for device_id in device_ids:
        slot = key_slot(keys.device(device_id).version.encode())
        groups.setdefault(slot, []).append(device_id)
    return groups


CONFIG_TAG = "config"  # the hash tag of the published configuration's keys
SINGLE_TAG = "calls"  # any tag does on a single Redis


def slot_tag(slot: int) -> str:
    """A short hash tag whose keys live in cluster hash slot `slot`."""
    return _slot_tags()[slot]


@functools.cache
def _slot_tags() -> tuple[str, ...]:
    # ~150k CRCs, ~0.3 s once per process; only Redis Cluster deployments ask
    tags: list[str | None] = [None] * 16384
    missing, n = 16384, 0
    while missing:
        tag = f"s{n}"
        slot = crc_hqx(tag.encode(), 0) % 16384  # redis.crc.key_slot of a key without braces
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
        n += 1
    return tuple(t for t in tags if t is not None)
