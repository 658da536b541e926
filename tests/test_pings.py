"""The one ping parser: its fast path (`parse`) agrees with `parse_ping` on anything."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geopush import pings
from geopush.geo.model import Ping
from geopush.pings import PingError, parse, parse_ping

NOW = 1_800_000_000.0

_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**15, 10**15),
    st.booleans(), st.none(), st.text(max_size=5),
    st.sampled_from([0, -0.0, 90, -90, 90.0001, 180, -180.5, 1e14, 1e14 - 1,
                     (NOW + 299) * 1000, (NOW + 301) * 1000, "2027-01-15T08:00:00Z"]))
_ids = st.one_of(st.sampled_from(["phone-1", "a.b:c@d_e-f", "", "bad id", "x" * 129]),
                 st.text(max_size=8), st.integers())
_anything = st.dictionaries(
    st.sampled_from(["device_id", "lat", "lon", "ts", "accuracy_m", "speed_mps", "alt"]),
    st.one_of(_numbers, _ids), max_size=7)
# mostly valid pings, each field now and then replaced by anything
_near_valid = st.fixed_dictionaries(
    {"device_id": st.one_of(st.sampled_from(["phone-1", "a.b:c@d_e-f"]), _ids),
     "lat": st.one_of(st.floats(-90, 90), _numbers), "lon": st.one_of(st.floats(-180, 180),
                                                                      _numbers),
     "ts": st.one_of(st.integers(0, int(NOW * 1000)), st.floats(0, NOW * 1000), _numbers)},
    optional={"accuracy_m": st.one_of(st.floats(0, 1e6), _numbers),
              "speed_mps": st.one_of(st.floats(0, 100), _numbers), "alt": _numbers})
_pings = st.one_of(_anything, _near_valid)


def _outcome(obj: Any) -> Any:
    try:
        return parse_ping(obj, now=NOW)
    except PingError as exc:
        return ("error", exc.message)


def _fast(obj: Any) -> Any:
    try:
        return parse(obj, NOW)
    except PingError as exc:
        return ("error", exc.message)


@settings(max_examples=1500, deadline=None)
@given(_pings)
def test_the_fast_parser_agrees_with_parse_ping(obj: dict[str, Any]) -> None:
    expected, got = _outcome(obj), _fast(obj)
    assert got == expected
    if not isinstance(got, tuple):
        assert all(type(v) is float or v is None
                   for v in (got.ts, got.lat, got.lon, got.accuracy_m, got.speed_mps))


@pytest.mark.parametrize("obj", [
    {"device_id": "d", "lat": 1, "lon": 2, "ts": 1000},
    {"device_id": "d", "lat": 1.5, "lon": -2, "ts": 1000.5, "accuracy_m": 0, "speed_mps": None},
    {"device_id": "d", "lat": 1, "lon": 2, "ts": "2026-01-01T00:00:00+01:00"},
])
def test_the_fast_parser_gives_floats_like_parse_ping(obj: dict[str, Any]) -> None:
    got = parse(obj, NOW)
    assert got == parse_ping(obj, now=NOW)
    assert all(isinstance(v, float) for v in (got.ts, got.lat, got.lon))
    assert not math.isnan(got.ts)


def test_the_fast_parser_builds_a_whole_ping() -> None:
    got = parse({"device_id": "d", "lat": 1, "lon": 2, "ts": 1500, "speed_mps": 3}, NOW)
    expected = Ping("d", 1.5, 1.0, 2.0, None, 3.0)
    assert type(got) is Ping
    assert got == expected and hash(got) == hash(expected) and repr(got) == repr(expected)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.lat = 5.0  # type: ignore[misc]


def test_device_ids_seen_valid_are_remembered_within_a_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pings, "_valid_ids", set())
    monkeypatch.setattr(pings, "MAX_REMEMBERED_IDS", 3)
    for i in range(5):
        assert parse({"device_id": f"d{i}", "lat": 1, "lon": 2, "ts": 1000}, NOW).device_id
    assert pings._valid_ids == {"d3", "d4"}  # cleared when full, then filled again
    for bad in ("bad id", "", "x" * 129):
        with pytest.raises(PingError, match="device_id"):
            parse({"device_id": bad, "lat": 1, "lon": 2, "ts": 1000}, NOW)
        with pytest.raises(PingError, match="device_id"):  # twice: never remembered
            parse({"device_id": bad, "lat": 1, "lon": 2, "ts": 1000}, NOW)
    assert pings._valid_ids == {"d3", "d4"}
