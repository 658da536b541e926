"""Durations as marketers and ops write them: `30s`, `5m`, `2h`, `7d`, `1h30m`, or seconds."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_WHOLE = re.compile(r"^(?:\d+(?:\.\d+)?[smhdw])+$")


def parse_duration(value: Any) -> float:
    """Seconds from `30s`, `5m`, `2h`, `7d`, `1h30m` or a plain non-negative number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s, 5m, 2h or 7d, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"expected a non-negative duration, got {value!r}")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if _WHOLE.match(text):
            return sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))
    raise ValueError(f"expected a duration like 30s, 5m, 2h or 7d, got {value!r}")


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: 300 -> '5m', 5400 -> '90m', 7.5 -> '7.5s'."""
    for unit in ("w", "d", "h", "m"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


DURATION_PATTERN = r"^\s*(\d+(\.\d+)?\s*[smhdwSMHDW]\s*)+$"

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    # what a file may hold (`5m` or seconds), not the float it becomes
    WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0},
                              {"type": "string", "pattern": DURATION_PATTERN}],
                    "description": "a duration: 30s, 5m, 2h, 7d, 1h30m, or seconds"}),
]
"""A duration field: accepts `5m` etc., holds seconds, prints back as `5m` in JSON."""
