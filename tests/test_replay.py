"""The replay engine: reading ping files, the virtual clock, consent, and the JSON document (§9)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from geopush.cli.ping_files import shard_of
from geopush.cli.replay import (
    BadLine,
    NoDeviceColumn,
    Replay,
    ReplayResult,
    load_devices,
    parse_weather,
    read_pings,
)
from geopush.devices import Consent, DeviceProfile
from geopush.engine import Engine
from geopush.errors import InvalidInput
from geopush.geo.index import GeofenceIndex
from geopush.geo.model import Ping
from geopush.geo.stores import parse_stores
from geopush.geo.transitions import Tracker
from geopush.timeutil import format_ts, parse_ts

STORE_LAT, STORE_LON = 46.0, 14.0
FAR_LAT = 46.01  # ~1.1 km north of the store
T0 = parse_ts("2026-06-01T10:00:00Z")
STALE_S = 7200.0


def _engine(dwells: Sequence[float] = ()) -> Engine:
    text = json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "node/1", "properties": {"name": "Corner Shop"},
         "geometry": {"type": "Point", "coordinates": [STORE_LON, STORE_LAT]}},
    ]})
    stores, report = parse_stores(text)
    assert stores is not None, report.problems
    index = GeofenceIndex.from_stores(stores, hysteresis_m=25.0)
    return Engine(Tracker(index, stale_after_s=STALE_S, min_visit_s=300.0,
                          dwell_plan=lambda _fid: dwells))


def _ping(device: str, minutes: float, *, inside: bool = True, **extra: Any) -> Ping:
    lat = STORE_LAT if inside else FAR_LAT
    return Ping(device, T0 + minutes * 60, lat, STORE_LON, **extra)


def _run(pings: Sequence[Ping | BadLine], *, chunk: int = 10_000, assume_consent: bool = True,
         devices: dict[str, DeviceProfile] | None = None,
         dwells: Sequence[float] = ()) -> ReplayResult:
    replay = Replay(_engine(dwells), devices=devices,
                    assume_consent=assume_consent, chunk=chunk)
    return replay.run((line, p) for line, p in enumerate(pings, start=2))


def _events(result: ReplayResult) -> list[tuple[str, str, str]]:
    return [(format_ts(e.ts)[11:19], e.device_id, e.type) for e in result.events]


# -- reading files ---------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_with_device_column_epoch_ms_and_empty_optionals(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.csv", "device_id,ts,lat,lon,accuracy_m,speed_mps\n"
                  "a,2026-06-01T10:00:00Z,46.0,14.0,12.5,1.5\n"
                  "\n"
                  "b,1780308000000,46.0,14.0,,\n")
    records = list(read_pings(path))
    assert records == [
        (2, Ping("a", T0, 46.0, 14.0, 12.5, 1.5)),
        (4, Ping("b", 1780308000.0, 46.0, 14.0, None, None)),
    ]


def test_trace_csv_takes_ts_iso_naive_times_as_utc_and_needs_a_device(tmp_path: Path) -> None:
    path = _write(tmp_path, "trace.csv", "ts_iso,lat,lon,accuracy_m,speed_mps\n"
                  "2026-06-01T10:00:00.250,46.0,14.0,0.0,\n")
    with pytest.raises(NoDeviceColumn, match="--device"):
        list(read_pings(path))
    [(line, ping)] = list(read_pings(path, device_id="car"))
    assert line == 2 and ping == Ping("car", T0 + 0.25, 46.0, 14.0, 0.0, None)


def test_columns_may_come_in_any_order(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.csv", "lon,lat,ts,device_id\n14.0,46.0,2026-06-01T10:00:00Z,a\n")
    assert list(read_pings(path)) == [(2, Ping("a", T0, 46.0, 14.0))]


@pytest.mark.parametrize(
    ("header", "message"),
    [("device_id,ts,lat,lon,altitude\n", "unknown column 'altitude'"),
     ("device_id,ts,lat\n", "no 'lon' column"),
     ("device_id,ts,lat,lon,lat\n", "named twice")],
)
def test_a_bad_header_stops_the_file(tmp_path: Path, header: str, message: str) -> None:
    path = _write(tmp_path, "p.csv", header + "a,1,2,3,4\n")
    with pytest.raises(InvalidInput, match=message):
        list(read_pings(path))


def test_bad_csv_lines_are_reported_each_and_the_rest_is_read(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.csv", "device_id,ts,lat,lon,accuracy_m,speed_mps\n"
                  "a,2026-06-01T10:00:00Z,46.0,14.0,,\n"
                  "a,2026-06-01T10:01:00Z,north,14.0,,\n"
                  "a,yesterday,46.0,14.0,,\n"
                  "a,2026-06-01T10:02:00Z,46.0,14.0\n"
                  "a,2026-06-01T10:03:00Z,46.0,194.0,,\n"
                  "a,2026-06-01T10:04:00Z,46.0,14.0,-3,\n"
                  "a b,2026-06-01T10:05:00Z,46.0,14.0,,\n"
                  "a,2026-06-01T10:06:00Z,46.0,14.0,,\n")
    records = list(read_pings(path))
    bad = {line: r.message for line, r in records if isinstance(r, BadLine)}
    assert bad == {
        3: "lat = 'north': expected a number from -90 to 90",
        4: "ts = 'yesterday': expected RFC 3339 time with offset, or epoch milliseconds, "
           "from 2000-01-01 to 9999-12-31 UTC",
        5: "4 fields: expected 6 (device_id,ts,lat,lon,accuracy_m,speed_mps)",
        6: "lon = 194.0: expected a number from -180 to 180",
        7: "accuracy_m = -3.0: expected a number ≥ 0, or null",
        8: "device_id = 'a b': expected 1–128 characters of A-Z a-z 0-9 . _ : @ -, not . or ..",
    }
    assert [line for line, r in records if isinstance(r, Ping)] == [2, 9]


@pytest.mark.parametrize("shard", [None, (0, 2), (1, 2)])
def test_a_line_the_csv_reader_refuses_is_one_invalid_line_said_once(
        tmp_path: Path, shard: tuple[int, int] | None) -> None:
    """A field over csv's size limit (a line of megabytes, an unterminated quote swallowing
    the rest of a file) is one invalid line, not the end of the replay; a split replay says
    it once, in shard 0."""
    header = "device_id,ts,lat,lon,accuracy_m,speed_mps\n"
    good = "a,2026-06-01T10:00:00Z,46.0,14.0,,\n"
    path = _write(tmp_path, "p.csv", header + good + "x" * 200_000 + ",1,2,3,4,5\n"
                  + "a,2026-06-01T10:01:00Z,46.0,14.0,,\n")
    records = list(read_pings(path, shard=shard))
    bad = {line: r.message for line, r in records if isinstance(r, BadLine)}
    pings = [line for line, r in records if isinstance(r, Ping)]
    if shard is None or shard[0] == 0:
        assert bad == {3: "not a CSV record: field larger than field limit (131072)"}
    else:
        assert bad == {}
    assert pings == ([2, 4] if shard is None or shard[0] == shard_of("a", 2) else [])


def test_a_byte_order_mark_before_the_header_is_not_part_of_it(tmp_path: Path) -> None:
    # what Excel writes at the start of a "CSV UTF-8" file
    path = tmp_path / "p.csv"
    path.write_bytes(b"\xef\xbb\xbfdevice_id,ts,lat,lon\na,2026-06-01T10:00:00Z,46.0,14.0\n")
    assert list(read_pings(path)) == [(2, Ping("a", T0, 46.0, 14.0))]
    ndjson = tmp_path / "p.ndjson"
    ndjson.write_bytes(b'\xef\xbb\xbf{"device_id": "a", "ts": 1780308000000, "lat": 46, '
                       b'"lon": 14}\n')
    assert list(read_pings(ndjson)) == [(1, Ping("a", T0, 46.0, 14.0))]


@pytest.mark.parametrize("name", ["pings.ndjson", "pings.jsonl", "pings.txt"])
def test_ndjson_by_extension_or_first_character(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, name, '\n{"device_id": "a", "ts": "2026-06-01T10:00:00Z", '
                  '"lat": 46.0, "lon": 14.0}\n'
                  '{"device_id": "a", "ts": 1780308060000, "lat": 46.0, "lon": 14.0, '
                  '"accuracy_m": null}\n'
                  '{"device_id": "a", "ts": "2026-06-01T10:02:00Z", "lat": 46.0}\n'
                  "[1, 2]\n"
                  '{"device_id": "a", "ts": "2026-06-01T10:0\n'
                  '{"ts": "2026-06-01T10:03:00", "lat": 46.0, "lon": 14.0, "floor": 2}\n')
    records = list(read_pings(path, device_id="fallback"))
    assert records[0] == (2, Ping("a", T0, 46.0, 14.0))
    assert records[1] == (3, Ping("a", T0 + 60, 46.0, 14.0))
    bad = {line: r.message for line, r in records if isinstance(r, BadLine)}
    assert bad[4] == "lon = None: expected a number from -180 to 180"
    assert bad[5].startswith("expected a ping object")
    assert bad[6].startswith("not valid JSON")
    assert bad[7].startswith("floor = 2: expected only known fields")


def test_missing_file_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read pings file"):
        list(read_pings(tmp_path / "nope.csv"))


# -- the virtual clock -----------------------------------------------------------------------


def test_enter_and_exit_with_a_far_ping() -> None:
    result = _run([_ping("a", 0, inside=False), _ping("a", 1), _ping("a", 2),
                   _ping("a", 3, inside=False)])
    assert _events(result) == [("10:01:00", "a", "enter"), ("10:03:00", "a", "exit")]
    assert not result.events[1].stale
    assert result.pings == 4 and sum(result.rejected.values()) == 0


def test_the_clock_runs_on_after_the_last_ping_so_stays_end_in_a_stale_exit() -> None:
    result = _run([_ping("a", 0), _ping("a", 7, accuracy_m=10.0)])
    assert _events(result) == [("10:00:00", "a", "enter"), ("10:07:00", "a", "exit")]
    exit_event = result.events[1]
    assert exit_event.stale  # dated at the last ping inside, not at the clock's end
    assert [(v.start, v.end) for v in result.visits] == [(T0, T0 + 420)]


def test_a_long_gap_inside_fires_the_stale_exit_before_the_next_ping_once() -> None:
    # 3 h without pings inside: the stay ended at its last ping (stale), the next ping re-enters
    pings = [_ping("a", 0), _ping("a", 180), _ping("a", 181, inside=False)]
    for chunk in (1, 2, 10_000):
        result = _run(pings, chunk=chunk)
        assert _events(result) == [
            ("10:00:00", "a", "enter"), ("10:00:00", "a", "exit"),
            ("13:00:00", "a", "enter"), ("13:01:00", "a", "exit"),
        ], chunk
        assert [e.stale for e in result.events] == [False, True, False, False]


def test_dwell_timers_fire_on_the_virtual_clock_also_without_a_later_ping() -> None:
    # enter at 10:00, one more ping at 10:10: the 5-min dwell is due at 10:05, before it
    result = _run([_ping("a", 0), _ping("a", 10)], dwells=[300.0])
    assert _events(result) == [("10:00:00", "a", "enter"), ("10:05:00", "a", "dwell"),
                               ("10:10:00", "a", "exit")]
    # a phone that goes silent inside still gets its dwell, then its stale exit
    result = _run([_ping("b", 0)], dwells=[300.0, 3600.0])
    assert _events(result) == [("10:00:00", "b", "enter"), ("10:00:00", "b", "exit"),
                               ("10:05:00", "b", "dwell"), ("11:00:00", "b", "dwell")]


def test_out_of_order_pings_are_rejected_in_file_order_whatever_the_chunk() -> None:
    pings = [_ping("a", 0, inside=False), _ping("a", 2), _ping("a", 1, inside=False),
             _ping("a", 3), _ping("a", 4, inside=False)]
    expected = [("10:02:00", "a", "enter"), ("10:04:00", "a", "exit")]
    for chunk in (1, 3, 10_000):
        result = _run(pings, chunk=chunk)
        assert _events(result) == expected, chunk
        assert result.rejections == [
            (4, "out_of_order", "ts 2026-06-01T10:01:00Z is older than this device's last "
             "ping (2026-06-01T10:02:00Z)")]


def test_events_of_several_devices_come_out_in_time_order() -> None:
    pings = [_ping("a", 0), _ping("a", 30, inside=False), _ping("b", 10), _ping("b", 20,
             inside=False)]
    assert _events(_run(pings, chunk=2)) == [
        ("10:00:00", "a", "enter"), ("10:10:00", "b", "enter"), ("10:20:00", "b", "exit"),
        ("10:30:00", "a", "exit")]


def test_invalid_lines_count_as_rejected_and_the_rest_replays() -> None:
    result = _run([_ping("a", 0), BadLine(3, "lat = 'x': expected a number"),
                   _ping("a", 1, inside=False)])
    assert result.pings == 3
    assert result.rejected == {"invalid": 1}
    assert result.rejections == [(3, "invalid", "lat = 'x': expected a number")]
    assert _events(result) == [("10:00:00", "a", "enter"), ("10:01:00", "a", "exit")]


# -- consent ----------------------------------------------------------------------------------


def _profile(device: str, *, location: bool) -> DeviceProfile:
    return DeviceProfile(device_id=device, consent=Consent(location=location, marketing=True))


def test_unknown_devices_are_rejected_no_consent_unless_assume_consent() -> None:
    pings = [_ping("known", 0), _ping("unknown", 0), _ping("refused", 0)]
    devices = {"known": _profile("known", location=True),
               "refused": _profile("refused", location=False)}
    strict = _run(pings, devices=devices, assume_consent=False)
    assert strict.rejected == {"no_consent": 2}
    assert [line for line, _, _ in strict.rejections] == [3, 4]
    assert {e.device_id for e in strict.events} == {"known"}
    # --assume-consent covers devices missing from --devices, not those that said no
    lenient = _run(pings, devices=devices, assume_consent=True)
    assert lenient.rejected == {"no_consent": 1}
    assert {e.device_id for e in lenient.events} == {"known", "unknown"}


def test_devices_file_in_yaml_and_json(tmp_path: Path) -> None:
    yaml_path = _write(tmp_path, "devices.yaml",
                       "- device_id: a\n  consent: {location: true, marketing: false}\n"
                       "  locale: fr-CA\n  segments: [regular]\n"
                       "- device_id: b\n")
    devices = load_devices(yaml_path)
    assert devices["a"].consent.location and devices["a"].locale == "fr-CA"
    assert not devices["b"].consent.location
    json_path = _write(tmp_path, "devices.json",
                       json.dumps({"devices": [{"device_id": "c", "platform": "ios"}]}))
    assert load_devices(json_path)["c"].platform == "ios"


def test_devices_file_errors_name_line_field_and_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "devices.yaml",
                  "- device_id: a\n"
                  "- device_id: b\n  platform: symbian\n"
                  "- device_id: a\n"
                  "- consent: {location: yes please}\n")
    with pytest.raises(InvalidInput) as raised:
        load_devices(path)
    problems = [(p.where, p.field) for p in raised.value.details]
    assert problems == [
        (f"{path}:3: device #1", "platform"),
        (f"{path}:4: device #2", "device_id"),
        (f"{path}:5: device #3", "device_id"),
        (f"{path}:5: device #3", "consent.location"),
    ]
    assert "symbian" in raised.value.details[0].message


def test_devices_file_errors_show_values_as_the_file_wrote_them(tmp_path: Path) -> None:
    """A marketer wrote YAML: dates, booleans and lists are shown as YAML, not Python."""
    path = _write(tmp_path, "devices.yaml",
                  "- device_id: b\n  created_at: 2026-01-01\n"
                  "- device_id: c\n  segments: {a: true}\n"
                  "- {consent: {location: true}}\n")
    with pytest.raises(InvalidInput) as raised:
        load_devices(path)
    messages = [p.message for p in raised.value.details]
    assert messages[0].startswith("created_at = 2026-01-01: ")
    assert messages[1].startswith('segments = {"a": true}: ')
    assert messages[2] == "device_id is missing"
    assert not any("datetime" in m or "True" in m or "NoneType" in m for m in messages)


def test_devices_file_refuses_a_key_given_twice(tmp_path: Path) -> None:
    # the second consent would silently replace the first: a revocation written above undone
    path = _write(tmp_path, "devices.yaml",
                  "- device_id: a\n  consent: {location: false}\n  consent: {location: true}\n")
    with pytest.raises(InvalidInput) as raised:
        load_devices(path)
    [problem] = raised.value.details
    assert problem.where == f"{path}:3"
    assert problem.message == "duplicate key 'consent' (first given on line 2)"


def test_devices_file_must_be_a_list(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="expected a list of device profiles"):
        load_devices(_write(tmp_path, "d.yaml", "device_id: a\n"))


# -- weather and the document -----------------------------------------------------------------


def test_weather_option() -> None:
    assert parse_weather("temperature_c=31,condition=clear") == {
        "temperature_c": 31.0, "condition": "clear"}
    for bad, message in [("temperature_c=hot", "expected a number"),
                         ("condition=sunny", "expected one of clear"),
                         ("humidity=3", "unknown weather key"), ("31", "expected key=value")]:
        with pytest.raises(ValueError, match=message):
            parse_weather(bad)


def test_document_shape_and_summary_only() -> None:
    result = _run([_ping("a", 0), _ping("a", 1, inside=False), _ping("z", 0)],
                  devices={"a": _profile("a", location=True)}, assume_consent=False)
    doc = result.document(names={"node/1": "Mercator"})
    assert set(doc) == {"summary", "events", "visits", "decisions"}
    summary = doc["summary"]
    assert {k: summary[k] for k in ("pings", "rejected", "events", "pushes", "suppressed")} == {
        "pings": 3, "rejected": 1, "events": {"enter": 1, "dwell": 0, "exit": 1},
        "pushes": 0, "suppressed": {}}
    assert summary["rejected_by_code"] == {"no_consent": 1}
    assert summary["elapsed_s"] >= 0 and summary["pings_per_s"] >= 0
    # contract §9: what the timeline shows, machine-readable
    assert doc["events"] == [
        {"ts": "2026-06-01T10:00:00Z", "device_id": "a", "geofence_id": "node/1",
         "store_id": "node/1", "type": "enter", "store_name": "Mercator", "distance_m": 0.0,
         "speed_mps": None, "stale": False},
        {"ts": "2026-06-01T10:01:00Z", "device_id": "a", "geofence_id": "node/1",
         "store_id": "node/1", "type": "exit", "store_name": "Mercator",
         "distance_m": 1112.0, "speed_mps": 18.53, "stale": False},  # derived: 1112 m in 60 s
    ]
    assert doc["decisions"] == []
    assert set(result.document(summary_only=True)) == {"summary"}


def test_devices_file_refuses_ids_pings_could_never_carry(tmp_path: Path) -> None:
    path = _write(tmp_path, "devices.yaml",
                  "- device_id: ok-1\n"
                  "- device_id: '..'\n"
                  "- device_id: \"a\\nb\"\n")
    with pytest.raises(InvalidInput) as raised:
        load_devices(path)
    assert [(p.where, p.field, p.value) for p in raised.value.details] == [
        (f"{path}:2: device #1", "device_id", ".."),
        (f"{path}:3: device #2", "device_id", "a\nb"),
    ]
    assert "not . or .." in raised.value.details[0].message
