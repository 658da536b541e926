"""OsmAnd and Traccar's query protocol: one location per request, as query parameters (GET) or
a form (POST): `id` or `deviceid`, `lat`, `lon`, `timestamp` (epoch seconds, or ISO 8601),
`speed` (knots), `accuracy` (metres), `hdop`, `bearing`, `altitude`, `batt`, `valid`.

`hdop` is not metres: with no `accuracy` it is turned into an estimate (hdop × 5 m, the usual
range error of a phone's GNSS) rather than leaving the fix unknown, which §5 would count as
accurate. A `timestamp` of 13 digits is milliseconds (OsmAnd sends seconds; some forks send
milliseconds); anything between is refused rather than guessed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from geopush.clients import KNOTS_TO_MPS, Mapped, put_optional
from geopush.pings import PingError

HDOP_TO_M = 5.0
_SECONDS_BELOW = 10_000_000_000  # 10 digits: epoch seconds (until the year 2286)
_MILLISECONDS_FROM = 100_000_000_000  # 12+ digits: epoch milliseconds (from 1973)


def device_of(params: Mapping[str, str]) -> str | None:
    return params.get("id") or params.get("deviceid") or None


def ping(params: Mapping[str, str], device_id: str) -> Mapped:
    try:
        return _ping(params, device_id)
    except PingError as exc:
        return exc


def _ping(params: Mapping[str, str], device_id: str) -> dict[str, Any]:
    if params.get("valid", "true").strip().lower() in ("false", "0"):
        raise PingError("valid", params["valid"], "a valid fix (the app marked this one invalid)")
    out: dict[str, Any] = {"device_id": device_id, "lat": _float(params, "lat", required=True),
                           "lon": _float(params, "lon", required=True),
                           "ts": _timestamp(params.get("timestamp"))}
    accuracy = _float(params, "accuracy")
    if accuracy is None:
        hdop = _float(params, "hdop")
        accuracy = None if hdop is None else hdop * HDOP_TO_M
    put_optional(out, "accuracy_m", accuracy if accuracy is None or accuracy >= 0 else None)
    speed = _float(params, "speed")
    put_optional(out, "speed_mps", None if speed is None or speed < 0 else speed * KNOTS_TO_MPS)
    bearing = _float(params, "bearing", alias="heading")
    put_optional(out, "heading_deg", None if bearing is None or bearing < 0 else bearing % 360.0)
    put_optional(out, "altitude_m", _float(params, "altitude"))
    return out


def _float(params: Mapping[str, str], key: str, *, required: bool = False,
           alias: str | None = None) -> float | None:
    text = params.get(key)
    if text is None and alias is not None:
        key, text = alias, params.get(alias)
    if text is None or text.strip() == "":
        if required:
            raise PingError(key, text, "a number")
        return None
    try:
        value = float(text)
    except ValueError:
        raise PingError(key, text, "a number") from None
    if not math.isfinite(value):
        raise PingError(key, text, "a finite number")
    return value


def _timestamp(text: str | None) -> str | int:
    """The ping's ts: ISO text as it is (the parser checks it), epoch seconds or milliseconds
    as epoch milliseconds."""
    if text is None or text.strip() == "":
        raise PingError("timestamp", text, "epoch seconds or an ISO 8601 time with offset")
    text = text.strip()
    if not text.isdigit():
        return text  # ISO 8601; the ping parser says what is wrong with it, if anything
    value = int(text)
    if value < _SECONDS_BELOW:
        return value * 1000
    if value >= _MILLISECONDS_FROM:
        return value
    raise PingError("timestamp", text, "epoch seconds (10 digits) or milliseconds (13 digits)")
