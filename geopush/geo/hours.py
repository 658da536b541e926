"""Store opening hours, parsed by the OSM `opening_hours` library (opening-hours-py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

from opening_hours import OpeningHours, State

from geopush.timeutil import zone

# Every evaluation gets a tz-aware datetime; the library wants ZoneInfo, not datetime.timezone.
_UTC = ZoneInfo("UTC")


class HoursSyntaxError(ValueError):
    """The expression is not valid OSM opening_hours syntax."""


@dataclass(frozen=True, slots=True)
class StoreHours:
    """Parsed opening hours of one store, evaluated in the store's time zone."""

    expression: str
    timezone: str
    _parsed: OpeningHours

    @classmethod
    def parse(cls, expression: str, timezone: str, lat: float, lon: float) -> StoreHours:
        # coords let the library pick the country's public and school holidays (`PH off`)
        # and the sun's times (`sunset`); without those words they change nothing, and the
        # many stores of a chain that share one expression share one parse
        lowered = expression.lower()
        placed = any(word in lowered for word in _PLACE_WORDS)
        return cls(expression, timezone, _parse(expression, timezone,
                                                (lat, lon) if placed else None))

    def is_open(self, epoch_s: float, *, for_at_least_s: float = 0.0) -> bool | None:
        """True/False when known at that moment (and still open `for_at_least_s` later);
        None when the expression says `unknown` there."""
        moment = _utc(epoch_s)
        state = self._parsed.state(moment)[0]
        if state == State.UNKNOWN:
            return None
        if state != State.OPEN:
            return False
        end = epoch_s + for_at_least_s
        # A change is not always a closing (a new comment, `Mo-Fr 08:00-12:00,12:00-18:00`
        # split by rules): walk the changes up to `end` and require open all along.
        for _ in range(_MAX_CHANGES):
            change = self._parsed.next_change(moment)
            if change is None or change.timestamp() >= end:
                return True
            moment = change
            if self._parsed.state(moment)[0] != State.OPEN:
                return False
        return True


_PLACE_WORDS = ("ph", "sh", "sunrise", "sunset", "dawn", "dusk")


@lru_cache(maxsize=4096)
def _parse(expression: str, timezone: str, coords: tuple[float, float] | None) -> OpeningHours:
    try:
        return OpeningHours(expression, timezone=zone(timezone), coords=coords)
    except Exception as exc:  # the library raises its own ParserError / SyntaxError
        raise HoursSyntaxError(_short_reason(str(exc))) from None


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC).replace(tzinfo=_UTC)


_MAX_CHANGES = 32  # more changes than this within a for_at_least window is not a real shop


def _short_reason(message: str) -> str:
    """The parser's multi-line report as one line: position and what it expected."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    found = re.search(r"-->\s*(\d+:\d+)", message)
    position = f"line:column {found.group(1)}" if found else ""
    expected = next((line[1:].strip() for line in lines if line.startswith("=")), "")
    parts = [p for p in (f"at {position}" if position else "", expected) if p]
    return ", ".join(parts) or (lines[0] if lines else "unparseable")
