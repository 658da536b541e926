"""Timestamps on the wire: RFC 3339 strings or epoch milliseconds; inside, float epoch seconds."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def parse_ts(value: Any, *, naive_is_utc: bool = False) -> float:
    """Epoch seconds from RFC 3339 text or epoch milliseconds.

    The API requires an offset (RFC 3339); replay files from GPS loggers often have none, so
    `naive_is_utc` lets the replay reader take those as UTC.
    Raises ValueError with a message naming the value and what was expected.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected RFC 3339 text or epoch milliseconds, got {value!r}")
    if isinstance(value, int | float):
        if not 0 <= value < 1e14 or value != value:
            raise ValueError(f"expected epoch milliseconds, got {value!r}")
        return float(value) / 1000.0
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed = datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError:
            raise ValueError(
                f"expected RFC 3339 time like 2026-06-01T12:00:00Z, got {value!r}"
            ) from None
        if parsed.tzinfo is None:
            if not naive_is_utc:
                raise ValueError(f"expected RFC 3339 time with a UTC offset, got {value!r}")
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    raise ValueError(f"expected RFC 3339 text or epoch milliseconds, got {value!r}")


def format_ts(epoch_s: float) -> str:
    """RFC 3339 UTC with millisecond precision when there is any: 2026-06-01T12:00:00.250Z."""
    moment = datetime.fromtimestamp(epoch_s, UTC)
    if moment.microsecond:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
