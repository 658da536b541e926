"""The location apps of contract §13 on the real app: each client's documented payload as the app
sends it, its credentials, its answer convention (200 even when pings are rejected), and a real
GPS trace sent in each format gives the events `/v1/pings` gives."""

from __future__ import annotations

import base64
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from aiohttp.test_utils import TestClient

from geopush.app import create_app
from geopush.config import LoggingSettings
from geopush.logs import make_formatter
from tests.api_support import DEVICES, INGEST, INGEST_KEY, load_trace, ping, settings_for

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]

TRACE = load_trace()
ROUTE = TRACE[200:800]  # passes through both fences on the route: 2 enters, 2 exits
JSON_TYPE = {"Content-Type": "application/json"}


def _basic(user: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _device(api: Client, device_id: str) -> str:
    """Registered with location consent; its device token."""
    resp = await api.put(f"/v1/devices/{device_id}", headers=DEVICES,
                         json={"consent": {"location": True, "marketing": True}})
    assert resp.status == 200
    resp = await api.post(f"/v1/devices/{device_id}/token", headers=DEVICES)
    assert resp.status == 200
    token: str = (await resp.json())["token"]
    return token


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


async def _events_counted(api: Client) -> dict[str, float]:
    text = await (await api.get("/metrics")).text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("geopush_events_total{") and 'source="ping"' in line:
            kind = line.split('type="')[1].split('"')[0]
            out[kind] = float(line.split()[-1])
    return out


@pytest.fixture
async def api(tmp_path: Path, aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(create_app(settings_for(tmp_path)))


# -- the same trace in every format gives the same events ----------------------------------


async def test_a_real_trace_in_each_client_format_gives_the_events_of_v1_pings(
        tmp_path: Path, aiohttp_client: MakeClient) -> None:
    runs: dict[str, dict[str, float]] = {}
    for name in ("pings", "owntracks", "traccar", "traccar-batch", "osmand"):
        (tmp_path / name).mkdir()
        api = await aiohttp_client(create_app(settings_for(tmp_path / name)))
        token = await _device(api, "phone-1")
        if name == "pings":
            for p in ROUTE:
                resp = await api.post("/v1/pings", headers=INGEST, json=ping("phone-1", p))
                assert resp.status == 200 and (await resp.json())["accepted"] == 1
        elif name == "owntracks":
            for p in ROUTE:
                body = {"_type": "location", "tid": "p1", "lat": p.lat, "lon": p.lon,
                        "tst": round(p.ts), "acc": 5, "vel": 0, "t": "u", "conn": "m"}
                resp = await api.post("/v1/clients/owntracks", data=orjson.dumps(body),
                                      headers={**_basic("phone-1", token), **JSON_TYPE,
                                               "X-Limit-U": "user", "X-Limit-D": "phone-1"})
                assert resp.status == 200 and await resp.json() == []
        elif name == "traccar":
            for p in ROUTE:
                body = {"location": {"timestamp": _iso(p.ts), "is_moving": True,
                                     "coords": {"latitude": p.lat, "longitude": p.lon,
                                                "accuracy": 5, "speed": -1, "heading": -1,
                                                "altitude": 520},
                                     "activity": {"type": "in_vehicle"}},
                        "device_id": "phone-1"}
                resp = await api.post("/v1/clients/traccar", json=body, headers=_bearer(token))
                assert resp.status == 200 and (await resp.json())["accepted"] == 1
        elif name == "traccar-batch":
            locations = [{"timestamp": _iso(p.ts),
                          "coords": {"latitude": p.lat, "longitude": p.lon, "accuracy": 5}}
                         for p in ROUTE]
            resp = await api.post("/v1/clients/traccar", json={"location": locations},
                                  headers=_bearer(token))
            assert resp.status == 200 and (await resp.json())["accepted"] == len(ROUTE)
        else:
            for p in ROUTE:
                query = urlencode({"id": "phone-1", "lat": p.lat, "lon": p.lon,
                                   "timestamp": round(p.ts), "accuracy": 5, "speed": 0})
                resp = await api.get(f"/v1/clients/osmand?{query}", headers=_bearer(token))
                assert resp.status == 200 and (await resp.json())["accepted"] == 1
        runs[name] = await _events_counted(api)
        await api.close()
    assert runs["pings"] == {"enter": 2.0, "dwell": 0.0, "exit": 2.0}
    assert all(counted == runs["pings"] for counted in runs.values()), runs


# -- OwnTracks -------------------------------------------------------------------------------


async def test_owntracks_ignores_other_messages_and_empty_bodies_with_an_empty_array(
        api: Client) -> None:
    token = await _device(api, "phone-1")
    auth = {**_basic("phone-1", token), **JSON_TYPE}
    for body in (b"", b'{"_type":"transition","event":"enter","tst":1780300800}',
                 b'{"_type":"lwt","tst":1780300800}'):
        resp = await api.post("/v1/clients/owntracks", data=body, headers=auth)
        assert resp.status == 200 and await resp.json() == []
    export = await (await api.get("/v1/devices/phone-1/export", headers=DEVICES)).json()
    assert export["tracking"]["last_ping"] is None


async def test_a_rejection_logged_for_a_client_names_no_device(
        api: Client, caplog: pytest.LogCaptureFixture) -> None:
    """The log says why an app's pings were refused (the app is told 200), with the device
    pseudonymised everywhere: also inside the rejection's message."""
    token = await _device(api, "leak-check-7")
    resp = await api.patch("/v1/devices/leak-check-7", headers=DEVICES,
                           json={"consent": {"location": False}})
    assert resp.status == 200
    body = {"_type": "location", "lat": 46.1, "lon": 14.0, "tst": int(TRACE[-1].ts), "acc": 5}
    with caplog.at_level(logging.INFO, logger="geopush.api.clients"):
        resp = await api.post("/v1/clients/owntracks", data=orjson.dumps(body),
                              headers={**_basic("leak-check-7", token), **JSON_TYPE})
    assert resp.status == 200
    formatter = make_formatter(LoggingSettings(pseudonym_key="test-pseudonym-key"))
    [line] = [formatter.format(r) for r in caplog.records
              if r.getMessage() == "client_pings_rejected"]
    assert "leak-check-7" not in line
    assert "<device>" in orjson.loads(line)["first"]


async def test_owntracks_answers_200_even_when_its_ping_is_rejected(api: Client) -> None:
    token = await _device(api, "phone-1")
    body = {"_type": "location", "lat": 95.0, "lon": 11.5, "tst": round(TRACE[0].ts)}
    resp = await api.post("/v1/clients/owntracks", data=orjson.dumps(body),
                          headers={**_basic("phone-1", token), **JSON_TYPE})
    assert resp.status == 200 and await resp.json() == []  # else the app retries it forever
    metrics = await (await api.get("/metrics")).text()
    assert 'geopush_pings_rejected_total{code="invalid"} 1.0' in metrics


async def test_an_encrypted_owntracks_payload_is_a_clear_422(api: Client) -> None:
    token = await _device(api, "phone-1")
    resp = await api.post("/v1/clients/owntracks",
                          data=b'{"_type":"encrypted","data":"c2VjcmV0"}',
                          headers={**_basic("phone-1", token), **JSON_TYPE})
    assert resp.status == 422
    assert "encryption is not supported" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize("case", ["server key", "other device's token", "no auth",
                                  "bearer only", "not base64"])
async def test_owntracks_takes_only_the_device_s_own_token_as_password(
        api: Client, case: str) -> None:
    token = await _device(api, "phone-1")
    other = await _device(api, "phone-2")
    headers = {
        "server key": _basic("phone-1", INGEST_KEY),
        "other device's token": _basic("phone-1", other),
        "no auth": {},
        "bearer only": _bearer(token),
        "not base64": {"Authorization": "Basic %%%"},
    }[case]
    body = {"_type": "location", "lat": TRACE[300].lat, "lon": TRACE[300].lon,
            "tst": round(TRACE[300].ts)}
    resp = await api.post("/v1/clients/owntracks", data=orjson.dumps(body),
                          headers={**headers, **JSON_TYPE})
    assert resp.status == (403 if case == "other device's token" else 401)
    if resp.status == 401:
        assert resp.headers["WWW-Authenticate"].startswith("Basic")
    export = await (await api.get("/v1/devices/phone-1/export", headers=DEVICES)).json()
    assert export["tracking"]["last_ping"] is None  # nothing accepted from anyone else


async def test_an_owntracks_device_id_may_hold_colons(api: Client) -> None:
    token = await _device(api, "shop:phone:1")
    body = {"_type": "location", "lat": TRACE[300].lat, "lon": TRACE[300].lon,
            "tst": round(TRACE[300].ts)}
    resp = await api.post("/v1/clients/owntracks", data=orjson.dumps(body),
                          headers={**_basic("shop:phone:1", token), **JSON_TYPE})
    assert resp.status == 200
    export = await (await api.get("/v1/devices/shop:phone:1/export", headers=DEVICES)).json()
    assert export["tracking"]["last_ping"] is not None


# -- Traccar Client / transistorsoft ---------------------------------------------------------


async def test_traccar_s_documented_payload_with_unknown_speed_and_heading(api: Client) -> None:
    token = await _device(api, "48241179")
    p = TRACE[300]
    body = (b'{"location":{"timestamp":"' + _iso(p.ts).encode() + b'","coords":{"latitude":'
            + str(p.lat).encode() + b',"longitude":' + str(p.lon).encode()
            + b',"accuracy":0,"speed":-1,"heading":-1,"altitude":0},"is_moving":false,'
            b'"odometer":0,"event":"motionchange","battery":{"level":1,"is_charging":false},'
            b'"activity":{"type":"still"},"extras":{}},"device_id":"48241179"}')
    resp = await api.post("/v1/clients/traccar", data=body,
                          headers={**_bearer(token), **JSON_TYPE})
    assert resp.status == 200
    answer = await resp.json()
    assert answer["accepted"] == 1 and [e["type"] for e in answer["events"]] == ["enter"]
    export = await (await api.get("/v1/devices/48241179/export", headers=DEVICES)).json()
    [stay] = export["tracking"]["stays"]
    assert stay["speed_mps"] is None  # -1 is unknown, never a speed


async def test_traccar_pings_for_another_device_are_forbidden(api: Client) -> None:
    token = await _device(api, "phone-1")
    await _device(api, "phone-2")
    location = {"timestamp": _iso(TRACE[300].ts),
                "coords": {"latitude": TRACE[300].lat, "longitude": TRACE[300].lon}}
    resp = await api.post("/v1/clients/traccar", headers=_bearer(token),
                          json={"location": location, "device_id": "phone-2"})
    assert resp.status == 403


async def test_a_traccar_batch_over_the_limit_is_413(api: Client) -> None:
    token = await _device(api, "phone-1")
    location = {"timestamp": _iso(TRACE[0].ts), "coords": {"latitude": 1, "longitude": 2}}
    resp = await api.post("/v1/clients/traccar", headers=_bearer(token),
                          json={"location": [location] * 1001})
    assert resp.status == 413


async def test_traccar_locations_the_sdk_got_wrong_are_rejected_each_naming_the_field(
        api: Client) -> None:
    token = await _device(api, "phone-1")
    good = {"timestamp": _iso(TRACE[300].ts),
            "coords": {"latitude": TRACE[300].lat, "longitude": TRACE[300].lon}}
    in_ms = {"timestamp": round(TRACE[301].ts * 1000),
             "coords": {"latitude": TRACE[301].lat, "longitude": TRACE[301].lon}}
    resp = await api.post("/v1/clients/traccar", headers=_bearer(token),
                          json={"location": [good, in_ms]})
    assert resp.status == 200
    answer = await resp.json()
    assert answer["accepted"] == 1
    [rejected] = answer["rejected"]
    assert rejected["index"] == 1 and rejected["code"] == "invalid"
    assert rejected["message"].startswith("location.timestamp")


# -- OsmAnd ----------------------------------------------------------------------------------


async def test_osmand_needs_a_device_token_even_without_keys(
        tmp_path: Path, aiohttp_client: MakeClient) -> None:
    keyless = await aiohttp_client(create_app(settings_for(tmp_path, keys=[])))
    await keyless.put("/v1/devices/phone-1", json={"consent": {"location": True}})
    query = urlencode({"id": "phone-1", "lat": TRACE[300].lat, "lon": TRACE[300].lon,
                       "timestamp": round(TRACE[300].ts)})
    # a web page's <img src> could make this GET: no token, no ping
    assert (await keyless.get(f"/v1/clients/osmand?{query}")).status == 401
    token = (await (await keyless.post("/v1/devices/phone-1/token")).json())["token"]
    resp = await keyless.get(f"/v1/clients/osmand?{query}", headers=_bearer(token))
    assert resp.status == 200 and (await resp.json())["accepted"] == 1


async def test_an_osmand_key_parameter_is_taken_only_when_query_tokens_are_on(
        tmp_path: Path, aiohttp_client: MakeClient) -> None:
    for allowed in (False, True):
        (tmp_path / str(allowed)).mkdir()
        api = await aiohttp_client(create_app(settings_for(
            tmp_path / str(allowed), auth={"query_tokens": allowed})))
        token = await _device(api, "phone-1")
        query = urlencode({"id": "phone-1", "lat": TRACE[300].lat, "lon": TRACE[300].lon,
                           "timestamp": round(TRACE[300].ts), "key": token})
        resp = await api.get(f"/v1/clients/osmand?{query}")
        assert resp.status == (200 if allowed else 401)
        await api.close()


async def test_osmand_form_posts_and_forged_ids(api: Client) -> None:
    token = await _device(api, "phone-1")
    await _device(api, "phone-2")
    form = {"deviceid": "phone-1", "lat": str(TRACE[300].lat), "lon": str(TRACE[300].lon),
            "timestamp": str(round(TRACE[300].ts * 1000)), "hdop": "2", "speed": "10"}
    resp = await api.post("/v1/clients/osmand", data=form, headers=_bearer(token))
    assert resp.status == 200 and (await resp.json())["accepted"] == 1
    forged = {**form, "deviceid": "phone-2", "timestamp": str(round(TRACE[301].ts))}
    assert (await api.post("/v1/clients/osmand", data=forged,
                           headers=_bearer(token))).status == 403
    export = await (await api.get("/v1/devices/phone-2/export", headers=DEVICES)).json()
    assert export["tracking"]["last_ping"] is None
