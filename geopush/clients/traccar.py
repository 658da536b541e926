"""Traccar Client ≥ 9 and the transistorsoft background-geolocation SDK (React Native, Flutter,
Capacitor, Cordova): `{"location": {...}, "device_id": ...}`, and the SDK's batch sync
`{"location": [{...}, …]}`.

A location: `timestamp` (ISO 8601 with its `Z`), `coords.latitude/longitude/accuracy/speed/
heading/altitude` (metres, m/s, degrees; the SDK sends -1 for a speed or heading it does not
know), `activity.type` (the SDK's names are §13's), `is_moving`, `battery`, `odometer`,
`extras` (ignored). The device is `device_id` when the body has one, else the credential's.
"""

from __future__ import annotations

from typing import Any

from geopush.clients import (
    Mapped,
    activity_of,
    altitude,
    heading,
    number,
    optional_measure,
    put_optional,
)
from geopush.pings import PingError


def locations(body: Any) -> tuple[list[Any], Any]:
    """The body's location objects (one, or the batch's list) and its `device_id` (None when
    absent). Raises PingError naming what is wrong with the body as a whole."""
    if not isinstance(body, dict) or "location" not in body:
        raise PingError(None, body, '{"location": {...} or [{...}, …], "device_id"?}')
    found = body["location"]
    items = found if isinstance(found, list) else [found]
    return items, body.get("device_id")


def ping(location: Any, device_id: str) -> Mapped:
    """One SDK location as a ping of `device_id`, or why it cannot be read."""
    try:
        return _ping(location, device_id)
    except PingError as exc:
        return exc


def _ping(location: Any, device_id: str) -> dict[str, Any]:
    if not isinstance(location, dict):
        raise PingError("location", location, "a location object {timestamp, coords, …}")
    coords = location.get("coords")
    if not isinstance(coords, dict):
        raise PingError("location.coords", coords,
                        "an object {latitude, longitude, accuracy, speed, heading, altitude}")
    timestamp = location.get("timestamp")
    if not isinstance(timestamp, str):
        # the SDK always sends ISO 8601; a number here is another client's epoch, whose unit
        # (seconds or milliseconds) cannot be told apart safely
        raise PingError("location.timestamp", timestamp,
                        "an ISO 8601 time with offset, like 2026-06-01T10:00:00.000Z")
    out: dict[str, Any] = {"device_id": device_id, "lat": _coordinate(coords, "latitude"),
                           "lon": _coordinate(coords, "longitude"), "ts": timestamp}
    put_optional(out, "accuracy_m", optional_measure(coords.get("accuracy"),
                                                     "location.coords.accuracy"))
    put_optional(out, "speed_mps", optional_measure(coords.get("speed"),
                                                    "location.coords.speed"))
    put_optional(out, "heading_deg", heading(coords.get("heading"), "location.coords.heading"))
    put_optional(out, "altitude_m", altitude(coords.get("altitude"), "location.coords.altitude"))
    activity = location.get("activity")
    if isinstance(activity, dict):
        put_optional(out, "activity", activity_of(activity.get("type")))
    return out


def _coordinate(coords: dict[str, Any], key: str) -> Any:
    value = coords.get(key)
    if number(value) is None:
        raise PingError(f"location.coords.{key}", value, "a number in degrees")
    return value
