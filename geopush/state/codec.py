"""How device state is written as JSON, shared by the Redis values and the memory snapshot."""

from __future__ import annotations

from typing import Any

import orjson

from geopush.geo.transitions import DeviceState, Visit


def track_to_json(state: DeviceState, next_due: float | None) -> dict[str, Any]:
    # next_due is kept with the state so a store can tell whether its timers entry is current
    return {"state": state.to_dict(), "next_due": next_due}


def track_from_json(data: Any) -> tuple[DeviceState, float | None]:
    return DeviceState.from_dict(data["state"]), data.get("next_due")


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
