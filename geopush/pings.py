"""Ping objects from the outside world (HTTP, WebSocket, replay files) → validated `Ping`s.

Each bad ping is rejected on its own with a message naming the field, the value and what was
expected; the rest of a batch goes on. The one parser of pings: `parse` is the service's entry,
a fast path for the common wire form beside `parse_ping`, which handles everything else and
every error; a property test holds that the two agree (tests/test_pings.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, cast

from geopush.geo.model import ACTIVITIES, Activity, Ping
from geopush.timeutil import END_EPOCH_MS, MIN_EPOCH_MS, parse_ts

MAX_FUTURE_S = 300.0  # a ping more than 5 min ahead of the clock is invalid (contract §5)
# Device ids (contract §6). Not "." or "..": a client normalises /v1/devices/./export to
# /v1/devices/export, so such a device could never be exported or erased. `\Z`, not `$`,
# which would let "phone-1\n" through; DEVICE_ID_SCHEMA is the same rule for JSON Schema,
# whose `$` has no such exception.
DEVICE_ID = re.compile(r"(?!\.\.?\Z)[A-Za-z0-9._:@-]{1,128}\Z")
DEVICE_ID_SCHEMA = r"^(?!\.\.?$)[A-Za-z0-9._:@-]{1,128}$"
DEVICE_ID_EXPECTED = "1–128 characters of A-Z a-z 0-9 . _ : @ -, not . or .."
PING_FIELDS = frozenset({"device_id", "lat", "lon", "ts", "accuracy_m", "speed_mps",
                         "heading_deg", "altitude_m", "activity"})
ACTIVITY_EXPECTED = "one of " + ", ".join(sorted(ACTIVITIES)) + ", or null"


# Not frozen: Python sets an exception's __traceback__ as it passes through a `with` block,
# which a frozen dataclass refuses (with a TypeError in place of the PingError).
@dataclass(slots=True, eq=False)
class PingError(Exception):
    field: str | None
    value: Any
    expected: str

    @property
    def message(self) -> str:
        if self.field is None:
            return f"expected {self.expected}, got {_show(self.value)}"
        return f"{self.field} = {_show(self.value)}: expected {self.expected}"

    def __str__(self) -> str:
        return self.message


def parse_ping(obj: Any, *, now: float | None, naive_is_utc: bool = False,
               device_id: str | None = None) -> Ping:
    """Validate one ping object; `now` (epoch s) rejects pings from the future, None skips that.

    `device_id` fills in a missing device_id (replay of a single-device CSV)."""
    if isinstance(obj, PingError):
        raise obj  # a client format's location that could not be read (geopush.clients)
    if not isinstance(obj, dict):
        raise PingError(None, obj, "a ping object {device_id, lat, lon, ts, accuracy_m?, "
                        "speed_mps?, heading_deg?, altitude_m?, activity?}")
    unknown = sorted(set(obj) - PING_FIELDS)
    if unknown:
        raise PingError(unknown[0], obj[unknown[0]], "only known fields ("
                        + ", ".join(sorted(PING_FIELDS)) + ")")
    dev = obj.get("device_id", device_id)
    if not isinstance(dev, str) or not DEVICE_ID.match(dev):
        raise PingError("device_id", dev, DEVICE_ID_EXPECTED)
    lat = _number(obj, "lat", -90.0, 90.0)
    lon = _number(obj, "lon", -180.0, 180.0)
    if "ts" not in obj:
        raise PingError("ts", None, "RFC 3339 time or epoch milliseconds")
    try:
        ts = parse_ts(obj["ts"], naive_is_utc=naive_is_utc)
    except ValueError:
        raise PingError("ts", obj["ts"], "RFC 3339 time with offset, or epoch milliseconds, "
                        "from 2000-01-01 to 9999-12-31 UTC") from None
    if now is not None and ts > now + MAX_FUTURE_S:
        raise PingError("ts", obj["ts"], f"a time at most {MAX_FUTURE_S:g} s after the server's "
                        "clock (the ping is from the future)")
    accuracy = _optional(obj, "accuracy_m")
    speed = _optional(obj, "speed_mps")
    heading = obj.get("heading_deg")
    if heading is not None:
        heading = _number(obj, "heading_deg", 0.0, 360.0, nullable=True)
    altitude = obj.get("altitude_m")
    if altitude is not None:
        altitude = _number(obj, "altitude_m", -math.inf, math.inf, nullable=True)
    activity = obj.get("activity")
    if activity is not None and (type(activity) is not str or activity not in ACTIVITIES):
        raise PingError("activity", activity, ACTIVITY_EXPECTED)
    return Ping(dev, ts, lat, lon, accuracy, speed, heading, altitude,
                cast(Activity | None, activity))


def _number(obj: dict[str, Any], key: str, low: float, high: float, *,
            nullable: bool = False) -> float:
    value = obj.get(key)
    expected = (f"a number from {low:g} to {high:g}" if math.isfinite(low)
                else "a finite number") + (", or null" if nullable else "")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PingError(key, value, expected)
    if not low <= value <= high:
        raise PingError(key, value, expected)
    return float(value)


def _optional(obj: dict[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value < 0):
        raise PingError(key, value, "a number ≥ 0, or null")
    return float(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


def parse(obj: Any, now: float) -> Ping:
    """parse_ping for the common wire form (numbers, epoch-ms ts) at a fraction of its cost;
    anything else, and every error, is left to parse_ping itself."""
    if type(obj) is dict:
        get = obj.get
        device_id: Any = get("device_id")
        lat: Any = get("lat")
        lon: Any = get("lon")
        ts: Any = get("ts")
        accuracy: Any = get("accuracy_m")
        speed: Any = get("speed_mps")
        # `type(x) in _NUMBER` leaves bools (and strings: RFC 3339 ts) to parse_ping. The four
        # required fields are there, so the length tells whether any field is not a ping's.
        size = len(obj)
        if (type(device_id) is str and type(lat) in _NUMBER and type(lon) in _NUMBER
                and type(ts) in _NUMBER
                and -90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0
                and MIN_EPOCH_MS <= ts < END_EPOCH_MS and ts / 1000.0 <= now + MAX_FUTURE_S
                and (accuracy is None or (type(accuracy) in _NUMBER and 0 <= accuracy < math.inf))
                and (speed is None or (type(speed) in _NUMBER and 0 <= speed < math.inf))
                and (device_id in _valid_ids or _new_valid_id(device_id))):
            optional = ("accuracy_m" in obj) + ("speed_mps" in obj)
            if size == 4 + optional:
                return Ping(device_id, ts / 1000.0, float(lat), float(lon),
                            None if accuracy is None else float(accuracy),
                            None if speed is None else float(speed))
            # heading, altitude, activity: fewer phones send them, so they are looked at only
            # when the ping has more fields than the common ones
            heading: Any = get("heading_deg")
            altitude: Any = get("altitude_m")
            activity: Any = get("activity")
            if (size == 4 + optional + ("heading_deg" in obj) + ("altitude_m" in obj)
                    + ("activity" in obj)
                    and (heading is None or (type(heading) in _NUMBER and 0 <= heading <= 360))
                    and (altitude is None or (type(altitude) in _NUMBER
                                              and -math.inf < altitude < math.inf))
                    and (activity is None or (type(activity) is str and activity in ACTIVITIES))):
                return Ping(device_id, ts / 1000.0, float(lat), float(lon),
                            None if accuracy is None else float(accuracy),
                            None if speed is None else float(speed),
                            None if heading is None else float(heading),
                            None if altitude is None else float(altitude),
                            cast(Activity | None, activity))
    return parse_ping(obj, now=now)


# Device ids seen valid, so that a device's every ping is not matched against DEVICE_ID again
# (the match costs more than a set lookup several times over). Bounded: ids are client input.
_valid_ids: set[str] = set()
MAX_REMEMBERED_IDS = 100_000


def _new_valid_id(device_id: str) -> bool:
    if DEVICE_ID.match(device_id) is None:
        return False
    if len(_valid_ids) >= MAX_REMEMBERED_IDS:
        _valid_ids.clear()
    _valid_ids.add(device_id)
    return True


_NUMBER = (int, float)
