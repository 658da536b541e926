"""POST /v1/pings on the real app (memory and Redis backends): events from a real trace,
per-ping rejections, batch and body limits, bad input."""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from geopush.app import create_app
from geopush.timeutil import format_ts
from tests.api_support import (
    DEVICES,
    INGEST,
    chunks,
    event_tuples,
    expected_events,
    load_trace,
    ping,
    settings_for,
)

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture(params=["memory", "redis"])
async def api(request: pytest.FixtureRequest, tmp_path: Path, aiohttp_client: MakeClient
              ) -> Client:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    settings = settings_for(tmp_path, backend=request.param, redis_url=redis_url)
    return await aiohttp_client(create_app(settings))


async def register(api: Client, device_id: str, *, location: bool = True) -> None:
    resp = await api.put(f"/v1/devices/{device_id}", headers=DEVICES,
                         json={"platform": "android", "push_token": "tok",
                               "consent": {"location": location, "marketing": True}})
    assert resp.status == 200, await resp.text()


async def post(api: Client, body: Any, **kw: Any) -> tuple[int, Any]:
    resp = await api.post("/v1/pings", headers=INGEST, json=body, **kw)
    return resp.status, await resp.json()


async def test_real_trace_through_two_stores_gives_enter_and_exit_events(api: Client) -> None:
    await register(api, "phone-1")
    trace = load_trace()
    events: list[dict[str, Any]] = []
    accepted = 0
    for batch in chunks([ping("phone-1", p) for p in trace], 200):
        status, body = await post(api, {"pings": batch})
        assert status == 200, body
        assert body["rejected"] == []
        accepted += body["accepted"]
        events += body["events"]
    assert accepted == len(trace)
    assert event_tuples(events) == expected_events("phone-1", trace)
    assert [e["type"] for e in events] == ["enter", "exit", "enter", "exit"]
    assert {e["store_id"] for e in events} == {"bakery-300", "pharmacy-700"}
    assert all(e["device_id"] == "phone-1" for e in events)


async def test_single_ping_objects_give_the_same_events_as_batches(api: Client) -> None:
    await register(api, "phone-1")
    trace = load_trace()[250:360]
    events = []
    for p in trace:
        status, body = await post(api, ping("phone-1", p))
        assert status == 200 and body["accepted"] == 1
        events += body["events"]
    assert [(e["geofence_id"], e["type"]) for e in events] == [
        ("bakery-300", "enter"), ("bakery-300", "exit")]


async def test_events_of_several_devices_are_in_time_order(api: Client) -> None:
    trace = load_trace()
    await register(api, "a")
    await register(api, "b")
    # b is 30 s behind a on the same road: its enter comes later though it is listed first
    window = trace[280:330]
    pings = [ping("b", p) for p in window[:-30]] + [ping("a", p) for p in window]
    for p in pings:
        if p["device_id"] == "b":
            p["ts"] += 30_000
    status, body = await post(api, {"pings": pings})
    assert status == 200
    stamps = [e["ts"] for e in body["events"]]
    assert stamps == sorted(stamps)
    assert [e["device_id"] for e in body["events"] if e["type"] == "enter"] == ["a", "b"]


async def test_pings_of_unknown_or_unconsenting_devices_are_rejected_no_consent(api: Client
                                                                               ) -> None:
    await register(api, "no-location", location=False)
    p = load_trace()[300]
    status, body = await post(api, {"pings": [ping("stranger", p), ping("no-location", p)]})
    assert status == 200
    assert body["accepted"] == 0
    assert [(r["index"], r["code"]) for r in body["rejected"]] == [
        (0, "no_consent"), (1, "no_consent")]
    assert body["events"] == []
    # nothing was stored: after consent the same ping is the device's first, and enters
    await register(api, "stranger")
    status, body = await post(api, ping("stranger", p))
    assert body["accepted"] == 1 and [e["type"] for e in body["events"]] == ["enter"]


async def test_bad_pings_are_rejected_one_by_one_and_the_rest_is_processed(api: Client
                                                                          ) -> None:
    await register(api, "phone-1")
    good = ping("phone-1", load_trace()[300])
    future_ms = good["ts"] + 3_600_000 * 24 * 365 * 20
    bad: list[tuple[Any, str]] = [
        ({**good, "lat": 95}, "lat = 95: expected a number from -90 to 90"),
        ({**good, "ts": "yesterday"}, "ts = 'yesterday'"),
        ({**good, "ts": 9_999_999_999_999}, "from the future"),
        ({**good, "ts": "2999-01-01T00:00:00Z"}, "from the future"),
        ({**good, "accuracy_m": -3}, "accuracy_m = -3: expected a number ≥ 0"),
        ({**good, "altitude": 3}, "altitude = 3: expected only known fields"),
        ({**good, "device_id": "bad id!"}, "device_id = 'bad id!'"),
        ("not a ping", "expected a ping object"),
        ({k: v for k, v in good.items() if k != "lon"}, "lon = None"),
    ]
    assert future_ms  # (the epoch-ms future case above is far beyond 5 minutes)
    status, body = await post(api, {"pings": [b for b, _ in bad] + [good]})
    assert status == 200
    assert body["accepted"] == 1
    assert [r["index"] for r in body["rejected"]] == list(range(len(bad)))
    for rejection, (_, expected) in zip(body["rejected"], bad, strict=True):
        assert rejection["code"] == "invalid"
        assert expected in rejection["message"], rejection
    assert [e["type"] for e in body["events"]] == ["enter"]


async def test_a_ping_older_than_the_last_one_is_out_of_order(api: Client) -> None:
    await register(api, "phone-1")
    trace = load_trace()
    _, body = await post(api, ping("phone-1", trace[10]))
    assert body["accepted"] == 1
    _, body = await post(api, {"pings": [ping("phone-1", trace[11]),
                                              ping("phone-1", trace[5])]})
    assert body["accepted"] == 1
    assert [(r["index"], r["code"]) for r in body["rejected"]] == [(1, "out_of_order")]
    # in RFC 3339, like every other time in the API; pings are taken in time order, so the
    # device's last one then was trace[10]
    newest = format_ts(trace[10].ts)
    assert body["rejected"][0]["message"] == (
        f"ts {format_ts(trace[5].ts)} is older than this device's last processed ping "
        f"({newest})")


@pytest.mark.parametrize(
    ("body", "status", "code", "says"),
    [
        (b"{not json", 400, "invalid", "not valid JSON"),
        (b"", 400, "invalid", "body is empty"),
        (b"[1, 2]", 400, "invalid", "got a list"),
        (b'"ping"', 400, "invalid", "got a string"),
        (b'{"pings": {"device_id": "x"}}', 400, "invalid", "pings: expected a list"),
        (b'{"pings": [], "extra": 1}', 400, "invalid", "unknown field 'extra'"),
    ],
)
async def test_a_body_of_the_wrong_shape_is_a_400_naming_the_problem(
        api: Client, body: bytes, status: int, code: str, says: str) -> None:
    resp = await api.post("/v1/pings", headers={**INGEST, "Content-Type": "application/json"},
                          data=body)
    assert resp.status == status
    error = (await resp.json())["error"]
    assert error["code"] == code
    assert says in error["message"]
    assert set(error) == {"code", "message", "details"}


async def test_batch_of_1000_is_fine_and_1001_is_413(api: Client) -> None:
    await register(api, "phone-1")
    trace = load_trace()
    status, body = await post(api, {"pings": [ping("phone-1", p) for p in trace[:1000]]})
    assert status == 200 and body["accepted"] == 1000
    status, body = await post(api, {"pings": [ping("phone-2", trace[0])] * 1001})
    assert status == 413
    assert body["error"]["code"] == "too_large"
    assert "1001 pings" in body["error"]["message"] and "at most 1000" in body["error"]["message"]


async def test_body_over_1_mib_is_413_naming_the_limit(api: Client) -> None:
    big = io.BytesIO(b'{"pings": [' + b" " * (1024 * 1024) + b"]}")
    resp = await api.post("/v1/pings", headers={**INGEST, "Content-Type": "application/json"},
                          data=big)
    assert resp.status == 413
    error = (await resp.json())["error"]
    assert error["code"] == "too_large"
    assert "1048576 bytes" in error["message"]


async def test_chunked_body_over_1_mib_is_413_too(api: Client) -> None:
    async def body() -> Any:
        for _ in range(20):
            yield b" " * 65536

    resp = await api.post("/v1/pings", headers={**INGEST, "Content-Type": "application/json"},
                          data=body())
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "too_large"


async def test_the_server_keeps_serving_after_bad_input(api: Client) -> None:
    for data in (b"\xff\xfe", b"{" * 10_000, b'{"pings": [' + b"[" * 5000 + b"]}"):
        resp = await api.post("/v1/pings", headers={**INGEST, "Content-Type": "application/json"},
                              data=data)
        assert resp.status == 400
    assert (await api.get("/healthz")).status == 200


# -- issue #8: the ground holds --------------------------------------------------------------


async def test_a_ts_outside_2000_to_9999_in_utc_is_invalid_not_a_500(api: Client) -> None:
    # 0001-01-01T00:00:00+23:59 parsed, was committed, and its answer could not be written
    # (year 0 in UTC): a 500 after the batch's other devices were committed
    await register(api, "phone-1")
    await register(api, "phone-2")
    good = ping("phone-1", load_trace()[300])
    odd = [{**good, "device_id": "phone-2", "ts": ts} for ts in (
        "0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "20260601T100000Z",
        "2026-W23-1T10:00Z", "2026-06-01T10:00Z", 946_684_799_999, 0)]
    status, body = await post(api, {"pings": [good, *odd]})
    assert status == 200, body
    assert body["accepted"] == 1
    assert [(r["index"], r["code"]) for r in body["rejected"]] == [
        (i, "invalid") for i in range(1, len(odd) + 1)]
    assert all("ts = " in r["message"] and "RFC 3339" in r["message"]
               for r in body["rejected"])
    export = await api.get("/v1/devices/phone-2/export", headers=DEVICES)
    assert export.status == 200
    assert (await export.json())["tracking"]["last_ping"] is None


async def test_heading_altitude_and_activity_are_accepted(api: Client) -> None:
    await register(api, "phone-1")
    trace = load_trace()
    status, body = await post(api, {"pings": [
        ping("phone-1", trace[290], heading_deg=87.5, altitude_m=519.2, activity="in_vehicle"),
        ping("phone-1", trace[300], heading_deg=None, altitude_m=-1, activity="unknown"),
        ping("phone-1", trace[301], activity="flying"),
    ]})
    assert status == 200, body
    assert body["accepted"] == 2
    assert [(r["index"], r["code"]) for r in body["rejected"]] == [(2, "invalid")]
    assert "activity = 'flying'" in body["rejected"][0]["message"]


@pytest.mark.parametrize("device_id", [".", "..", "phone-1\n", "x" * 129, "", "a/b", "é"])
async def test_a_device_id_outside_the_charset_or_a_dot_path_is_invalid(
        api: Client, device_id: str) -> None:
    status, body = await post(api, ping(device_id, load_trace()[300]))
    assert status == 200
    assert [r["code"] for r in body["rejected"]] == ["invalid"]
    assert "device_id = " in body["rejected"][0]["message"]
    assert "not . or .." in body["rejected"][0]["message"]


@pytest.mark.parametrize("content_type", [
    None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/json; charset=latin-1", "application/jsonp", "text/json",
])
async def test_a_body_not_declared_json_is_415_in_the_json_envelope(
        api: Client, content_type: str | None) -> None:
    # a web page can make a browser post text/plain or a form to a keyless loopback geopush
    # without asking; it cannot post application/json without a CORS preflight
    await register(api, "phone-1")
    body = json_bytes(ping("phone-1", load_trace()[300]))
    headers = {**INGEST, **({"Content-Type": content_type} if content_type else {})}
    resp = await api.post("/v1/pings", headers=headers, data=body,
                          skip_auto_headers=["Content-Type"])
    assert resp.status == 415
    assert resp.content_type == "application/json"
    error = (await resp.json())["error"]
    assert error["code"] == "unsupported_media_type"
    assert "expected application/json" in error["message"]
    assert error["details"][0]["field"] == "Content-Type"
    export = await api.get("/v1/devices/phone-1/export", headers=DEVICES)
    assert (await export.json())["tracking"]["last_ping"] is None  # nothing was taken


@pytest.mark.parametrize("content_type", [
    "application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"])
async def test_application_json_with_or_without_charset_is_taken(
        api: Client, content_type: str) -> None:
    await register(api, "phone-1")
    resp = await api.post("/v1/pings", headers={**INGEST, "Content-Type": content_type},
                          data=json_bytes(ping("phone-1", load_trace()[300])))
    assert resp.status == 200
    assert (await resp.json())["accepted"] == 1


def json_bytes(value: Any) -> bytes:
    import json

    return json.dumps(value).encode()
