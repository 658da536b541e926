"""Timestamps on the wire: RFC 3339 strings or epoch milliseconds; inside, float epoch seconds.

Only instants from 2000-01-01 to 9999-12-31 UTC are taken (contract §6): every time geopush
stores must be one it can write back as RFC 3339, and an offset can move a valid-looking local
time out of the years datetime knows (0001-01-01T00:00:00+23:59 is in year 0 in UTC).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

MIN_EPOCH_S = 946_684_800.0  # 2000-01-01T00:00:00Z
END_EPOCH_S = 253_402_300_800.0  # 10000-01-01T00:00:00Z, the first instant past 9999
MIN_EPOCH_MS = MIN_EPOCH_S * 1000.0
END_EPOCH_MS = END_EPOCH_S * 1000.0
RANGE_TEXT = "from 2000-01-01 to 9999-12-31 UTC"

# RFC 3339 §5.6 date-time, nothing more of ISO 8601 (no basic format, week or ordinal dates,
# no missing seconds); 't', 'z' and a space for 'T' are RFC 3339's own allowances (§5.6 note).
# The offset is optional here and required by parse_ts unless naive_is_utc.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))?",
    re.ASCII)
_EXPECTED_TEXT = "RFC 3339 time like 2026-06-01T12:00:00Z or 2026-06-01T14:00:00+02:00"


def parse_ts(value: Any, *, naive_is_utc: bool = False) -> float:
    """Epoch seconds from RFC 3339 text or epoch milliseconds.

    The API requires an offset (RFC 3339); replay files from GPS loggers often have none, so
    `naive_is_utc` lets the replay reader take those as UTC.
    Raises ValueError with a message naming the value and what was expected.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected RFC 3339 text or epoch milliseconds, got {value!r}")
    if isinstance(value, int | float):
        # the comparison is false for NaN, so NaN is refused too
        if not MIN_EPOCH_MS <= value < END_EPOCH_MS:
            raise ValueError(f"expected epoch milliseconds {RANGE_TEXT} ({MIN_EPOCH_MS:.0f} "
                             f"to {END_EPOCH_MS - 1:.0f}), got {value!r}")
        return float(value) / 1000.0
    if isinstance(value, str):
        return _parse_text(value, naive_is_utc)
    raise ValueError(f"expected RFC 3339 text or epoch milliseconds, got {value!r}")


def _parse_text(value: str, naive_is_utc: bool) -> float:
    match = _RFC3339.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"expected {_EXPECTED_TEXT}, got {value!r}")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    if zulu is None and sign is None and not naive_is_utc:
        raise ValueError(f"expected RFC 3339 time with a UTC offset (Z or ±HH:MM), got {value!r}")
    try:
        # datetime checks the calendar (no 2026-02-30, no 24:00, no leap second 60)
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                          tzinfo=UTC)
    except ValueError as exc:
        raise ValueError(f"expected {_EXPECTED_TEXT}, got {value!r} ({exc})") from None
    offset_s = 0
    if sign is not None:
        hours, minutes = int(off_h), int(off_m)
        if hours > 23 or minutes > 59:
            raise ValueError(f"expected a UTC offset from -23:59 to +23:59, got {value!r}")
        offset_s = (hours * 3600 + minutes * 60) * (-1 if sign == "-" else 1)
    # whole microseconds, as datetime.fromisoformat gives them (digits beyond are dropped)
    micros = int(fraction[:6].ljust(6, "0")) if fraction else 0
    epoch = moment.timestamp() - offset_s + micros / 1e6
    if not MIN_EPOCH_S <= epoch < END_EPOCH_S:
        raise ValueError(f"expected a time {RANGE_TEXT}, got {value!r}")
    return epoch


# Four hundred Gregorian years are exactly 146097 days: shifting a time by whole cycles keeps
# its month, day and time of day, so years outside datetime's 1-9999 can still be written.
_CYCLE_S = 146_097 * 86_400
_CYCLE_YEARS = 400
_DATETIME_MIN_S = -62_135_596_800  # 0001-01-01T00:00:00Z
_DATETIME_END_S = 253_402_300_800  # 10000-01-01T00:00:00Z
_FAR_S = 1e15  # some 30 million years: no clock wrote that, not worth a many-digit year


def format_ts(epoch_s: float) -> str:
    """RFC 3339 UTC with millisecond precision when there is any: 2026-06-01T12:00:00.250Z.

    Total: never raises. Everything parsed today is within 2000-9999, but a time stored by an
    earlier release may not be, and an answer that cannot be written after its commit is the
    worst kind of 500. Years outside 1-9999 are written with ISO 8601's signed expanded year
    (`-0001-…`, `+10000-…`); a non-finite or absurd value (never stored) as `invalid:<value>`."""
    if not -_FAR_S < epoch_s < _FAR_S:  # also NaN and the infinities
        return f"invalid:{epoch_s!r}"
    # whole milliseconds in integers: exact, and 23:59:59.999 stays .999
    seconds, millis = divmod(round(epoch_s * 1000), 1000)
    cycles = 0
    if not _DATETIME_MIN_S <= seconds < _DATETIME_END_S:
        cycles, seconds = divmod(seconds - _DATETIME_MIN_S, _CYCLE_S)
        seconds += _DATETIME_MIN_S
    moment = datetime.fromtimestamp(seconds, UTC)
    year = moment.year + cycles * _CYCLE_YEARS
    text = (f"{year:04d}-" if 0 <= year <= 9999 else f"{year:+05d}-") + moment.strftime(
        "%m-%dT%H:%M:%S")
    return f"{text}.{millis:03d}Z" if millis else f"{text}Z"


@cache
def zone(name: str) -> ZoneInfo:
    """A time zone by its IANA name, loaded once: ZoneInfo keeps few alive by itself, and a
    store's hours and a rule's local time look the same zones up again and again."""
    return ZoneInfo(name)
