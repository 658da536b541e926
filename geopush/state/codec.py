"""How device state is written as JSON, shared by the Redis values and the memory snapshot.

A track is one JSON array, `[3, last_ts, next_due, stays, recent, bucket_empty_ts]`: its format
number, then `stays` rows of the Stay fields in order, `recent` rows of [ts, lat, lon] and the
ping rate limit's bucket (geopush.geo.transitions, PING RATE LIMIT). Arrays rather
than objects because Redis reads and writes a track for every device of every batch: no key
names to encode, parse and store, and the rows map onto the dataclasses positionally.

Each release reads what the release before it wrote, so instances of both can share one Redis
during a rolling upgrade: the format number says which shape a record has, and the reader
keeps every earlier shape: `[2, last_ts, next_due, stays, recent]` (format 2, before the
bucket), `[last_ts, next_due, stays, recent]` (format 1, no number: its
first element is a time or null, never the integer 2, and it has four elements) and
`{"state": DeviceState.to_dict(), "next_due": …}` (format 0). A change of shape gets the next
number; the reader of format n+1 ships one release before any instance writes it.

Format 3 came with its own reader, so a track without a bucket (no ping counted: the limit is off,
or the device has sent nothing since) is still written as format 2, which the release before reads:
roll an upgrade out with `limits.device_pings_per_minute: 0`, then turn the limit on.
"""

from __future__ import annotations

from typing import Any

import orjson

from geopush.geo.model import DeviceState, Stay, Visit
from geopush.rules.decide import PushRecord

TRACK_FORMAT = 3
_UNBUCKETED_FORMAT = 2  # what a track without a bucket is written as (see above)


def track_to_json(state: DeviceState, next_due: float | None) -> list[Any]:
    # next_due is kept with the state so a store can tell whether its timers entry is current;
    # orjson writes the (ts, lat, lon) tuples of `recent` as arrays itself
    track = [
        TRACK_FORMAT,
        state.last_ts,
        next_due,
        [[s.geofence_id, s.store_id, s.enter_ts, s.confirmed_ts, s.lat, s.lon, s.distance_m,
          s.speed_mps, s.dwells_fired] for s in state.stays.values()],
        state.recent,
    ]
    if state.bucket_empty_ts is None:
        track[0] = _UNBUCKETED_FORMAT
    else:
        track.append(state.bucket_empty_ts)
    return track


def track_from_json(data: Any) -> tuple[DeviceState, float | None]:
    """Raises ValueError, TypeError, KeyError or IndexError on what is not a track."""
    if type(data) is dict:  # format 0, before arrays
        return DeviceState.from_dict(data["state"]), data.get("next_due")
    bucket_empty_ts = None
    if len(data) == 6:
        version, last_ts, next_due, rows, recent, bucket_empty_ts = data
        if version != TRACK_FORMAT or type(version) is not int:
            raise ValueError(f"track format {version!r}: this release reads formats 0 to "
                             f"{TRACK_FORMAT} (a newer release wrote it?)")
    elif len(data) == 5:
        version, last_ts, next_due, rows, recent = data
        if version != _UNBUCKETED_FORMAT or type(version) is not int:
            raise ValueError(f"track format {version!r}: this release reads formats 0 to "
                             f"{TRACK_FORMAT} (a newer release wrote it?)")
    else:  # format 1, the array without a number: four elements or a ValueError
        last_ts, next_due, rows, recent = data
    stays = {}
    for row in rows:
        # a row of 9 or a TypeError; orjson made every list fresh, so dwells_fired is ours
        stay = Stay(*row)
        if type(stay.dwells_fired) is not list:
            raise TypeError(f"stay {row!r}: expected a list of fired dwells last")
        stays[stay.geofence_id] = stay
    return DeviceState(last_ts, stays, list(map(tuple, recent)), bucket_empty_ts), next_due


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


def push_to_json(push: PushRecord) -> list[Any]:
    """A push (or holdout) the policy counts: [push_id, ts, rule_id, store_id, category,
    outcome, opened_at]."""
    return [push.push_id, push.ts, push.rule_id, push.store_id, push.category, push.outcome,
            push.opened_at]


def push_from_json(value: Any) -> PushRecord:
    push_id, ts, rule_id, store_id, category, outcome, opened_at = value
    return PushRecord(str(push_id), float(ts), str(rule_id), str(store_id), str(category),
                      outcome, float(opened_at) if opened_at is not None else None)


def encode_push(push: PushRecord) -> bytes:
    return orjson.dumps(push_to_json(push))


def decode_push(raw: bytes | str) -> PushRecord:
    return push_from_json(orjson.loads(raw))
