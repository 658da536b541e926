"""RFC 3339 in and out: parse_ts takes only strict RFC 3339 or epoch ms in 2000-9999 UTC;
format_ts writes any float without raising."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from geopush.timeutil import END_EPOCH_S, MIN_EPOCH_S, format_ts, parse_ts


@pytest.mark.parametrize(("epoch_s", "text"), [
    (1_780_308_000.0, "2026-06-01T10:00:00Z"),
    (1_780_308_000.25, "2026-06-01T10:00:00.250Z"),
    (END_EPOCH_S - 0.001, "9999-12-31T23:59:59.999Z"),
    (MIN_EPOCH_S, "2000-01-01T00:00:00Z"),
    (0.0, "1970-01-01T00:00:00Z"),
    # what an earlier release could store: 0001-01-01T00:00:00+23:59, and beyond 9999
    (-62_135_683_140.0, "0000-12-31T00:01:00Z"),
    (-62_135_596_800.0 - 366 * 86400, "0000-01-01T00:00:00Z"),  # year 0 is a leap year
    (-62_135_596_800.0 - 731 * 86400, "-0001-01-01T00:00:00Z"),
    (END_EPOCH_S, "+10000-01-01T00:00:00Z"),
    (math.nan, "invalid:nan"), (math.inf, "invalid:inf"), (-math.inf, "invalid:-inf"),
    (1e300, "invalid:1e+300"),
])
def test_format_ts_writes_any_time_without_raising(epoch_s: float, text: str) -> None:
    assert format_ts(epoch_s) == text


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_format_ts_is_total(epoch_s: float) -> None:
    assert isinstance(format_ts(epoch_s), str)


@given(st.integers(int(MIN_EPOCH_S * 1000), int(END_EPOCH_S * 1000) - 1))
def test_every_time_taken_is_written_back_to_the_millisecond(epoch_ms: int) -> None:
    text = format_ts(parse_ts(epoch_ms))
    assert round(parse_ts(text) * 1000) == epoch_ms
