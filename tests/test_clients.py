"""The client formats of contract §13 map onto §6's ping: units, unknowns, activity names, and
what cannot be read named by the client's own field."""

from __future__ import annotations

from typing import Any

import pytest

from geopush.clients import activity_of, osmand, owntracks, traccar
from geopush.pings import PingError

# OwnTracks' documented location message (booklet, "JSON": _type=location), as the app sends it
OWNTRACKS_LOCATION = (b'{"_type":"location","acc":13,"alt":30,"batt":88,"bs":1,"conn":"w",'
                      b'"created_at":1780300805,"lat":46.36623,"lon":14.16148,"m":1,"t":"u",'
                      b'"tid":"p1","tst":1780300800,"vac":3,"vel":18,"cog":93}')
# Traccar Client ≥ 9 / transistorsoft SDK (traccar.org/osmand, "JSON format")
TRACCAR_LOCATION = {
    "location": {
        "timestamp": "2026-06-01T10:00:00.000Z",
        "coords": {"latitude": 46.36623, "longitude": 14.16148, "accuracy": 8, "speed": 1.2,
                   "heading": 270, "altitude": 501},
        "is_moving": True, "odometer": 0, "event": "motionchange",
        "battery": {"level": 1, "is_charging": False},
        "activity": {"type": "walking"}, "extras": {},
    },
    "device_id": "48241179",
}


def test_an_owntracks_location_is_a_ping_in_si_units() -> None:
    import orjson

    [got] = owntracks.location(orjson.loads(OWNTRACKS_LOCATION), "phone-1")
    assert got == {"device_id": "phone-1", "lat": 46.36623, "lon": 14.16148,
                   "ts": 1_780_300_800_000, "accuracy_m": 13.0, "speed_mps": 5.0,
                   "heading_deg": 93.0, "altitude_m": 30.0}


@pytest.mark.parametrize("kind", ["transition", "waypoint", "waypoints", "lwt", "card",
                                  "status", "cmd", "steps", "beacon", None])
def test_other_owntracks_messages_are_ignored(kind: str | None) -> None:
    assert owntracks.location({"_type": kind, "lat": 1, "lon": 2, "tst": 1}, "p") == []


def test_an_encrypted_owntracks_message_is_refused_clearly() -> None:
    with pytest.raises(owntracks.Encrypted, match="encryption is not supported"):
        owntracks.location({"_type": "encrypted", "data": "aGVsbG8="}, "p")


@pytest.mark.parametrize(("message", "field", "expected"), [
    ({"tst": 1_780_300_800_000}, "tst", "not milliseconds"),
    ({"tst": "1780300800"}, "tst", "epoch seconds"),
    ({"tst": -5}, "tst", "epoch seconds"),
    ({"tst": 1_780_300_800, "acc": "ten"}, "acc", "a number"),
    ({"tst": 1_780_300_800, "alt": True}, "alt", "metres"),
])
def test_what_owntracks_sent_wrong_is_named_by_its_own_field(
        message: dict[str, Any], field: str, expected: str) -> None:
    [got] = owntracks.location({"_type": "location", "lat": 1, "lon": 2, **message}, "p")
    assert isinstance(got, PingError)
    assert got.field == field and expected in got.expected


def test_a_traccar_location_and_a_batch_map_with_unknowns_left_out() -> None:
    items, device = traccar.locations(TRACCAR_LOCATION)
    assert device == "48241179"
    assert [traccar.ping(i, device) for i in items] == [{
        "device_id": "48241179", "lat": 46.36623, "lon": 14.16148,
        "ts": "2026-06-01T10:00:00.000Z", "accuracy_m": 8.0, "speed_mps": 1.2,
        "heading_deg": 270.0, "altitude_m": 501.0, "activity": "walking"}]
    unknown = {"timestamp": "2026-06-01T10:00:05.000Z",
               "coords": {"latitude": 1, "longitude": 2, "accuracy": 5, "speed": -1,
                          "heading": -1}}
    items, device = traccar.locations({"location": [unknown, unknown]})
    assert device is None and len(items) == 2
    got = traccar.ping(items[0], "d")
    assert isinstance(got, dict)
    assert "speed_mps" not in got and "heading_deg" not in got and "activity" not in got


@pytest.mark.parametrize(("location", "field"), [
    ({"timestamp": 1780300800000, "coords": {"latitude": 1, "longitude": 2}},
     "location.timestamp"),
    ({"timestamp": "2026-06-01T10:00:00Z", "coords": {"latitude": "1", "longitude": 2}},
     "location.coords.latitude"),
    ({"timestamp": "2026-06-01T10:00:00Z"}, "location.coords"),
    ({"timestamp": "2026-06-01T10:00:00Z",
      "coords": {"latitude": 1, "longitude": 2, "speed": "fast"}}, "location.coords.speed"),
    ("not a location", "location"),
])
def test_what_the_sdk_sent_wrong_is_named_by_its_own_field(location: Any, field: str) -> None:
    got = traccar.ping(location, "d")
    assert isinstance(got, PingError) and got.field == field


def test_a_traccar_body_without_location_is_refused_whole() -> None:
    with pytest.raises(PingError, match="location"):
        traccar.locations({"device_id": "x"})


def test_osmand_query_parameters_map_with_knots_and_seconds() -> None:
    params = {"id": "123456", "lat": "46.36623", "lon": "14.16148", "timestamp": "1780300800",
              "speed": "10", "bearing": "370", "altitude": "501.5", "accuracy": "12",
              "batt": "80"}
    assert osmand.device_of(params) == "123456"
    assert osmand.ping(params, "123456") == {
        "device_id": "123456", "lat": 46.36623, "lon": 14.16148, "ts": 1_780_300_800_000,
        "accuracy_m": 12.0, "speed_mps": pytest.approx(5.144, abs=1e-3), "heading_deg": 10.0,
        "altitude_m": 501.5}


@pytest.mark.parametrize(("timestamp", "ts"), [
    ("1780300800", 1_780_300_800_000),  # seconds
    ("1780300800123", 1_780_300_800_123),  # milliseconds
    ("2026-06-01T10:00:00Z", "2026-06-01T10:00:00Z"),  # ISO: checked by the ping parser
])
def test_osmand_timestamps_in_seconds_milliseconds_or_iso(timestamp: str, ts: Any) -> None:
    got = osmand.ping({"lat": "1", "lon": "2", "timestamp": timestamp}, "d")
    assert isinstance(got, dict) and got["ts"] == ts


def test_hdop_alone_becomes_an_accuracy_estimate_never_an_unknown() -> None:
    got = osmand.ping({"lat": "1", "lon": "2", "timestamp": "1780300800", "hdop": "4"}, "d")
    assert isinstance(got, dict) and got["accuracy_m"] == 20.0


@pytest.mark.parametrize(("params", "field"), [
    ({"lat": "north", "lon": "2", "timestamp": "1780300800"}, "lat"),
    ({"lon": "2", "timestamp": "1780300800"}, "lat"),
    ({"lat": "1", "lon": "2", "timestamp": "17803008001"}, "timestamp"),  # 11 digits: which?
    ({"lat": "1", "lon": "2"}, "timestamp"),
    ({"lat": "1", "lon": "2", "timestamp": "1780300800", "speed": "nan"}, "speed"),
    ({"lat": "1", "lon": "2", "timestamp": "1780300800", "valid": "false"}, "valid"),
])
def test_what_osmand_sent_wrong_is_named_by_its_own_parameter(
        params: dict[str, str], field: str) -> None:
    got = osmand.ping(params, "d")
    assert isinstance(got, PingError) and got.field == field


@pytest.mark.parametrize(("name", "activity"), [
    ("still", "still"), ("ON_FOOT", "on_foot"), ("in_vehicle", "in_vehicle"),
    ("automotive", "in_vehicle"), ("cycling", "on_bicycle"), ("tilting", "unknown"),
    (3, "unknown"), (None, None), ("", None),
])
def test_activities_map_onto_the_contracts_names(name: Any, activity: str | None) -> None:
    assert activity_of(name) == activity
