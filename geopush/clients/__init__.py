"""The location apps and SDKs that teams already ship (contract §13), mapped onto geopush's ping.

Each module turns one client's payload, as the app sends it, into the ping objects of §6
(`{device_id, lat, lon, ts, accuracy_m?, speed_mps?, heading_deg?, altitude_m?, activity?}`),
which then go through the one ping parser (geopush.pings) with the same validation, consent and
limits as `POST /v1/pings`. Pure: no I/O. A location the mapping itself cannot read (a field of
the wrong type, a unit that cannot be right) becomes a `PingError` in its place, naming the
client's own field, so the ingestor rejects it `invalid` on its own and the rest goes on.
"""

from __future__ import annotations

import math
from typing import Any

from geopush.pings import PingError

Mapped = dict[str, Any] | PingError
"""A ping object for the parser, or why this location could not be read."""

# transistorsoft's activity types (Traccar Client ≥ 9 uses that SDK) are those of §13 already;
# a platform's own name for the same thing is mapped onto them, anything else is `unknown`
ACTIVITIES = frozenset({"still", "on_foot", "walking", "running", "on_bicycle", "in_vehicle",
                        "unknown"})
_ACTIVITY_ALIASES = {"in_car": "in_vehicle", "automotive": "in_vehicle", "driving": "in_vehicle",
                     "cycling": "on_bicycle", "bicycle": "on_bicycle", "stationary": "still",
                     "foot": "on_foot", "walk": "walking", "run": "running"}

KMH_TO_MPS = 1 / 3.6
KNOTS_TO_MPS = 1852 / 3600


def activity_of(name: Any) -> str | None:
    """§13's name for a client's motion activity; None when the client reported none."""
    if name is None or name == "":
        return None
    if not isinstance(name, str):
        return "unknown"
    key = name.strip().lower()
    if key in ACTIVITIES:
        return key
    return _ACTIVITY_ALIASES.get(key, "unknown")


def number(value: Any) -> float | None:
    """A finite JSON number, or None (also for booleans, which JSON keeps apart)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def optional_measure(value: Any, field: str, *, scale: float = 1.0) -> float | None:
    """An optional non-negative measurement: absent or negative (the SDKs' -1) is unknown.
    Raises PingError for what is not a number at all."""
    if value is None:
        return None
    got = number(value)
    if got is None:
        raise PingError(field, value, "a number (negative for unknown), or null")
    return None if got < 0 else got * scale


def put_optional(ping: dict[str, Any], key: str, value: float | str | None) -> None:
    if value is not None:
        ping[key] = value


def heading(value: Any, field: str) -> float | None:
    """Degrees from north in [0, 360); negative (the SDKs' -1) or absent is unknown."""
    degrees = optional_measure(value, field)
    return None if degrees is None else degrees % 360.0


def altitude(value: Any, field: str) -> float | None:
    """Metres; may be negative (below sea level); absent is unknown."""
    if value is None:
        return None
    metres = number(value)
    if metres is None:
        raise PingError(field, value, "metres above sea level, or null")
    return metres
