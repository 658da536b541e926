"""How device state is written as JSON, shared by the Redis values and the memory snapshot.

A track is one JSON array, `[last_ts, next_due, stays, recent]`: `stays` rows of the Stay
fields in order, `recent` rows of [ts, lat, lon]. Arrays rather than objects because Redis
reads and writes a track for every device of every batch: no key names to encode, parse and
store, and the rows map onto the dataclasses positionally. Tracks written by earlier versions
(`{"state": DeviceState.to_dict(), "next_due": …}`) are still read.
"""

from __future__ import annotations

from typing import Any

import orjson

from geopush.geo.model import DeviceState, Stay, Visit


def track_to_json(state: DeviceState, next_due: float | None) -> list[Any]:
    # next_due is kept with the state so a store can tell whether its timers entry is current;
    # orjson writes the (ts, lat, lon) tuples of `recent` as arrays itself
    return [
        state.last_ts,
        next_due,
        [[s.geofence_id, s.store_id, s.enter_ts, s.confirmed_ts, s.lat, s.lon, s.distance_m,
          s.speed_mps, s.dwells_fired] for s in state.stays.values()],
        state.recent,
    ]


def track_from_json(data: Any) -> tuple[DeviceState, float | None]:
    """Raises ValueError, TypeError, KeyError or IndexError on what is not a track."""
    if type(data) is dict:  # the format before arrays
        return DeviceState.from_dict(data["state"]), data.get("next_due")
    last_ts, next_due, rows, recent = data
    stays = {}
    for row in rows:
        # a row of 9 or a TypeError; orjson made every list fresh, so dwells_fired is ours
        stay = Stay(*row)
        if type(stay.dwells_fired) is not list:
            raise TypeError(f"stay {row!r}: expected a list of fired dwells last")
        stays[stay.geofence_id] = stay
    return DeviceState(last_ts, stays, list(map(tuple, recent))), next_due


def encode_track(state: DeviceState, next_due: float | None) -> bytes:
    return orjson.dumps(track_to_json(state, next_due))


def decode_track(raw: bytes | str) -> tuple[DeviceState, float | None]:
    return track_from_json(orjson.loads(raw))


def visit_to_json(visit: Visit) -> list[Any]:
    # the device id is the key's; leaving it out keeps erased ids out of any copied value
    return [visit.store_id, visit.geofence_id, visit.start, visit.end]


def visit_from_json(device_id: str, row: Any) -> Visit:
    return Visit(device_id, str(row[0]), str(row[1]), float(row[2]), float(row[3]))


def encode_visit(visit: Visit) -> bytes:
    return orjson.dumps(visit_to_json(visit))


def decode_visit(device_id: str, raw: bytes | str) -> Visit:
    return visit_from_json(device_id, orjson.loads(raw))
