"""OwnTracks (iOS and Android) in HTTP mode: the app POSTs each of its JSON messages.

Only `_type: location` is a position; every other message (transition, waypoint, lwt, card,
status, a zero-length body after a friend is deleted …) is answered `[]` and ignored, because
the app waits for a 200 before it sends its next message. `tst` is epoch seconds, `acc` metres,
`vel` km/h, `cog` degrees, `alt` metres. The device is the one the credentials name (HTTP Basic:
user = device id), never a field of the payload: `tid` is a two-letter label the user picks.
"""

from __future__ import annotations

from typing import Any

from geopush.clients import (
    KMH_TO_MPS,
    Mapped,
    altitude,
    heading,
    number,
    optional_measure,
    put_optional,
)
from geopush.pings import PingError

# epoch seconds up to the year 9999; a bigger `tst` is milliseconds sent by mistake
_MAX_EPOCH_S = 253_402_300_799


class Encrypted(ValueError):
    """An `_type: encrypted` message: its payload cannot be read without the user's secret."""


def location(message: Any, device_id: str) -> list[Mapped]:
    """The pings of one OwnTracks message: one for a location, none for anything else.
    Raises Encrypted for an encrypted message (the app is set to encrypt: a clear 4xx)."""
    if not isinstance(message, dict):
        return [PingError(None, message, "an OwnTracks JSON message object {_type, …}")]
    kind = message.get("_type")
    if kind == "encrypted":
        raise Encrypted("OwnTracks payload encryption is not supported: turn off "
                        "'Encryption key' in the app's settings (use HTTPS instead)")
    if kind != "location":
        return []
    try:
        return [_ping(message, device_id)]
    except PingError as exc:
        return [exc]


def _ping(message: dict[str, Any], device_id: str) -> dict[str, Any]:
    tst = message.get("tst")
    seconds = number(tst)
    if seconds is None or seconds < 0:
        raise PingError("tst", tst, "epoch seconds (a whole number)")
    if seconds > _MAX_EPOCH_S:
        raise PingError("tst", tst, "epoch seconds, not milliseconds")
    ping: dict[str, Any] = {"device_id": device_id, "lat": message.get("lat"),
                            "lon": message.get("lon"), "ts": round(seconds * 1000)}
    put_optional(ping, "accuracy_m", optional_measure(message.get("acc"), "acc"))
    put_optional(ping, "speed_mps",
                 optional_measure(message.get("vel"), "vel", scale=KMH_TO_MPS))
    put_optional(ping, "heading_deg", heading(message.get("cog"), "cog"))
    put_optional(ping, "altitude_m", altitude(message.get("alt"), "alt"))
    return ping
