"""The one ping parser: its fast path (`parse`) agrees with `parse_ping` on anything."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geopush import pings
from geopush.geo.model import ACTIVITIES, Ping
from geopush.pings import PingError, parse, parse_ping

NOW = 1_800_000_000.0
MIN_MS = 946_684_800_000.0  # 2000-01-01T00:00:00Z
END_MS = 253_402_300_800_000.0  # 10000-01-01T00:00:00Z
T = 1_780_000_000_000  # a valid epoch-ms ts (2026)

_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**15, 10**15),
    st.booleans(), st.none(), st.text(max_size=5),
    st.sampled_from([0, -0.0, 90, -90, 90.0001, 180, -180.5, 360, 360.5, 1e14, 1e14 - 1,
                     MIN_MS, MIN_MS - 1, END_MS, END_MS - 1, (NOW + 299) * 1000,
                     (NOW + 301) * 1000, "2027-01-15T08:00:00Z"]))
_ids = st.one_of(st.sampled_from(["phone-1", "a.b:c@d_e-f", "", "bad id", "x" * 129, ".", "..",
                                  "...", "phone-1\n", ".hidden"]),
                 st.text(max_size=8), st.integers())
# RFC 3339 and near misses: every offset, years 0001-9999 (datetime's) and beyond, the
# ISO 8601 forms RFC 3339 leaves out, and times an offset pushes out of 2000-9999 UTC
_offsets = st.one_of(
    st.sampled_from(["Z", "z", "", "+00:00", "-00:00", "+23:59", "-23:59", "+24:00", "+0100",
                     "+01", "+01:60"]),
    st.builds(lambda sign, h, m: f"{sign}{h:02d}:{m:02d}", st.sampled_from("+-"),
              st.integers(0, 23), st.integers(0, 59)))
_rfc3339 = st.builds(
    lambda y, mo, d, h, mi, s, frac, sep, off: (
        f"{y:04d}-{mo:02d}-{d:02d}{sep}{h:02d}:{mi:02d}:{s:02d}{frac}{off}"),
    st.one_of(st.integers(1, 9999), st.sampled_from([1, 1999, 2000, 9999, 10000, 12345])),
    st.integers(1, 12), st.integers(1, 31), st.integers(0, 24), st.integers(0, 59),
    st.integers(0, 60), st.sampled_from(["", ".5", ".123", ".1234567", "."]),
    st.sampled_from(["T", "t", " ", "_"]), _offsets)
_timestamps = st.one_of(
    _rfc3339,
    st.sampled_from(["20260601T100000Z", "2026-W23-1T10:00Z", "2026-152T10:00:00Z",
                     "2026-06-01T10:00Z", "2026-06-01", "0001-01-01T00:00:00+23:59",
                     "9999-12-31T23:59:59-23:59", "1999-12-31T23:59:59-00:01",
                     " 2026-06-01T10:00:00Z ", "2026-06-01T10:00:00Z\n"]),
    st.integers(0, 2 * int(END_MS)), st.floats(MIN_MS, NOW * 1000))
_activities = st.one_of(st.sampled_from(sorted(ACTIVITIES)),
                        st.sampled_from(["Walking", "", "flying", None]), _numbers)
_anything = st.dictionaries(
    st.sampled_from(["device_id", "lat", "lon", "ts", "accuracy_m", "speed_mps", "heading_deg",
                     "altitude_m", "activity", "alt"]),
    st.one_of(_numbers, _ids, _timestamps), max_size=10)
# mostly valid pings, each field now and then replaced by anything
_near_valid = st.fixed_dictionaries(
    {"device_id": st.one_of(st.sampled_from(["phone-1", "a.b:c@d_e-f"]), _ids),
     "lat": st.one_of(st.floats(-90, 90), _numbers), "lon": st.one_of(st.floats(-180, 180),
                                                                      _numbers),
     "ts": st.one_of(st.integers(int(MIN_MS), int(NOW * 1000)), st.floats(MIN_MS, NOW * 1000),
                     _timestamps, _numbers)},
    optional={"accuracy_m": st.one_of(st.floats(0, 1e6), _numbers),
              "speed_mps": st.one_of(st.floats(0, 100), _numbers),
              "heading_deg": st.one_of(st.floats(0, 360), _numbers),
              "altitude_m": st.one_of(st.floats(-500, 9000), _numbers),
              "activity": _activities, "alt": _numbers})
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
                   for v in (got.ts, got.lat, got.lon, got.accuracy_m, got.speed_mps,
                             got.heading_deg, got.altitude_m))
        assert MIN_MS / 1000 <= got.ts < END_MS / 1000


@pytest.mark.parametrize("obj", [
    {"device_id": "d", "lat": 1, "lon": 2, "ts": T},
    {"device_id": "d", "lat": 1.5, "lon": -2, "ts": T + 0.5, "accuracy_m": 0, "speed_mps": None},
    {"device_id": "d", "lat": 1, "lon": 2, "ts": T, "heading_deg": 360, "altitude_m": -12,
     "activity": "on_bicycle"},
    {"device_id": "d", "lat": 1, "lon": 2, "ts": "2026-01-01T00:00:00+01:00"},
])
def test_the_fast_parser_gives_floats_like_parse_ping(obj: dict[str, Any]) -> None:
    got = parse(obj, NOW)
    assert got == parse_ping(obj, now=NOW)
    assert all(isinstance(v, float) for v in (got.ts, got.lat, got.lon))
    assert not math.isnan(got.ts)


def test_the_fast_parser_builds_a_whole_ping() -> None:
    got = parse({"device_id": "d", "lat": 1, "lon": 2, "ts": T + 500, "speed_mps": 3}, NOW)
    expected = Ping("d", T / 1000 + 0.5, 1.0, 2.0, None, 3.0)
    assert type(got) is Ping
    assert got == expected and hash(got) == hash(expected) and repr(got) == repr(expected)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.lat = 5.0  # type: ignore[misc]


def test_device_ids_seen_valid_are_remembered_within_a_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pings, "_valid_ids", set())
    monkeypatch.setattr(pings, "MAX_REMEMBERED_IDS", 3)
    for i in range(5):
        assert parse({"device_id": f"d{i}", "lat": 1, "lon": 2, "ts": T}, NOW).device_id
    assert pings._valid_ids == {"d3", "d4"}  # cleared when full, then filled again
    for bad in ("bad id", "", "x" * 129, ".", "..", "d1\n"):
        with pytest.raises(PingError, match="device_id"):
            parse({"device_id": bad, "lat": 1, "lon": 2, "ts": T}, NOW)
        with pytest.raises(PingError, match="device_id"):  # twice: never remembered
            parse({"device_id": bad, "lat": 1, "lon": 2, "ts": T}, NOW)
    assert pings._valid_ids == {"d3", "d4"}


def _error(obj: dict[str, Any]) -> PingError:
    with pytest.raises(PingError) as slow:
        parse_ping(obj, now=NOW)
    with pytest.raises(PingError) as fast:
        parse(obj, NOW)
    assert fast.value.message == slow.value.message
    return slow.value


_BASE = {"device_id": "d", "lat": 1, "lon": 2}


@pytest.mark.parametrize("ts", [
    "0001-01-01T00:00:00+23:59",  # year 0 in UTC: after the commit, format_ts used to raise
    "20260601T100000Z", "2026-W23-1T10:00Z", "2026-152T10:00:00Z", "2026-06-01T10:00Z",
    "2026-06-01", "2026-06-01T10:00:00", "2026-06-01T10:00:00+0100", "2026-06-01T10:00:00+01",
    "2026-06-01T10:00:00+24:00", "2026-02-30T10:00:00Z", "2026-06-01T24:00:00Z",
    "2026-06-01T10:00:60Z", "1999-12-31T23:59:59Z", "2000-01-01T00:00:00+00:01",
    "10000-01-01T00:00:00Z", "２０２６-06-01T10:00:00Z",
    MIN_MS - 1, END_MS, 0, 1000, -1, 1e16,  # epoch ms before 2000 and after 9999
])
def test_a_ts_that_is_not_strict_rfc3339_in_2000_to_9999_is_invalid(ts: Any) -> None:
    error = _error({**_BASE, "ts": ts})
    assert error.field == "ts" and error.value == ts
    assert "RFC 3339" in error.expected and "2000" in error.expected


@pytest.mark.parametrize(("ts", "epoch_s"), [
    ("2026-06-01T10:00:00Z", 1_780_308_000.0),
    ("2026-06-01t10:00:00z", 1_780_308_000.0),  # RFC 3339 §5.6 allows lower case
    ("2026-06-01 12:00:00+02:00", 1_780_308_000.0),  # and a space for T
    ("2026-06-01T10:00:00.250-00:00", 1_780_308_000.25),
    ("2000-01-01T00:00:00Z", MIN_MS / 1000),
    ("2000-01-01T01:00:00+01:00", MIN_MS / 1000),
    (MIN_MS, MIN_MS / 1000),
])
def test_strict_rfc3339_and_epoch_ms_from_2000_are_taken(ts: Any, epoch_s: float) -> None:
    assert parse_ping({**_BASE, "ts": ts}, now=None).ts == epoch_s
    assert parse({**_BASE, "ts": ts}, 2e9).ts == epoch_s


def test_naive_times_are_still_utc_for_replay_files() -> None:
    ping = parse_ping({**_BASE, "ts": "2019-01-25T20:00:16.178"}, now=None, naive_is_utc=True)
    assert ping.ts == 1_548_446_416.178
    with pytest.raises(PingError, match="ts"):
        parse_ping({**_BASE, "ts": "2019-01-25T20:00"}, now=None, naive_is_utc=True)


def test_heading_altitude_and_activity_are_carried_on_the_ping() -> None:
    obj = {**_BASE, "ts": T, "heading_deg": 271.5, "altitude_m": -3, "activity": "in_vehicle"}
    ping = parse(obj, NOW)
    assert (ping.heading_deg, ping.altitude_m, ping.activity) == (271.5, -3.0, "in_vehicle")
    assert ping == parse_ping(obj, now=NOW)
    nulls = parse({**_BASE, "ts": T, "heading_deg": None, "altitude_m": None, "activity": None},
                  NOW)
    assert (nulls.heading_deg, nulls.altitude_m, nulls.activity) == (None, None, None)


@pytest.mark.parametrize(("field", "value", "says"), [
    ("heading_deg", 360.5, "from 0 to 360"), ("heading_deg", -1, "from 0 to 360"),
    ("heading_deg", "north", "from 0 to 360"), ("heading_deg", True, "from 0 to 360"),
    ("altitude_m", math.inf, "finite number"), ("altitude_m", "12", "finite number"),
    ("activity", "flying", "on_bicycle"), ("activity", "Walking", "walking"),
    ("activity", ["still"], "still"), ("activity", 1, "unknown"),
])
def test_a_bad_optional_field_is_invalid_naming_it(field: str, value: Any, says: str) -> None:
    error = _error({**_BASE, "ts": T, field: value})
    assert error.field == field and error.value == value and says in error.expected
