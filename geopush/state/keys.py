"""Every Redis key name geopush uses, in one place.

All keys of one device share the hash tag `{d:<device_id>}` so they live in one Redis Cluster
slot: the profile script touches one device's keys, the batch commit script those of devices
of one slot (`group_by_slot`) on a cluster. The global timers sorted set and the erasure hash
are in slots of their own; nothing writes them in the same script as device keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from redis.crc import key_slot

DEFAULT_PREFIX = "geopush"
VISITS_KEPT = 1000  # visits remembered per device (when.visits looks back 90 days at most)


class DeviceKeys(NamedTuple):  # a tuple: built for every device of every batch, ~4x cheaper
    profile: str  # JSON of DeviceProfile
    consent: str  # list of JSON ConsentChange, oldest first
    track: str  # JSON [format, last_ts, next_due, stays, recent] (geopush.state.codec)
    visits: str  # list of JSON [store_id, geofence_id, start, end], oldest first
    version: str  # integer, INCR'd by every write of the device (the CAS of `track`)

    def all(self) -> tuple[str, str, str, str, str]:
        return self


class Keys:
    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.timers = f"{prefix}:timers"  # sorted set: device_id -> due epoch seconds
        self.erasures = f"{prefix}:erasures"  # hash: device_hash -> JSON ErasureRecord
        # the configuration a reload published: its serial (INCR'd) and its payload, under one
        # hash tag so that one script writes both and one MGET reads both on a cluster
        self.config_serial = f"{prefix}:{{config}}:serial"
        self.config_payload = f"{prefix}:{{config}}:payload"

    def device(self, device_id: str) -> DeviceKeys:
        base = f"{self.prefix}:{{d:{device_id}}}"
        return DeviceKeys(f"{base}:profile", f"{base}:consent", f"{base}:track",
                          f"{base}:visits", f"{base}:ver")


def group_by_slot(keys: Keys, device_ids: Iterable[str]) -> dict[int, list[str]]:
    """Devices by the Redis Cluster hash slot of their keys (a script may touch one slot only),
    in the order given within each slot."""
    groups: dict[int, list[str]] = {}
    for device_id in device_ids:
        slot = key_slot(keys.device(device_id).version.encode())
        groups.setdefault(slot, []).append(device_id)
    return groups
