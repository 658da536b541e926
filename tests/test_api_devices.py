"""Device profiles, consent trail, export and erasure on the real app (memory and Redis)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient
from yarl import URL

from geopush.app import create_app
from geopush.devices import erasure_hash
from geopush.timeutil import parse_ts
from tests.api_support import DEVICES, INGEST, load_trace, ping, settings_for

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]

PROFILE = {
    "push_token": "fcm-token-1",
    "platform": "ios",
    "locale": "fr-CA",
    "timezone": "America/Toronto",
    "attributes": {"first_name": "Zoé", "loyalty_tier": "gold"},
    "segments": ["regular"],
    "consent": {"location": True, "marketing": False},
}


class Backend:
    def __init__(self, name: str, tmp_path: Path, redis_url: str | None) -> None:
        self.name = name
        self.settings = settings_for(tmp_path, backend=name, redis_url=redis_url)
        self.redis_url = redis_url


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    return Backend(request.param, tmp_path, redis_url)


@pytest.fixture
async def api(backend: Backend, aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(create_app(backend.settings))


async def test_put_stores_and_returns_the_profile(api: Client) -> None:
    resp = await api.put("/v1/devices/phone-1", headers=DEVICES, json=PROFILE)
    assert resp.status == 200
    body = await resp.json()
    assert {k: body[k] for k in PROFILE} == PROFILE
    assert body["device_id"] == "phone-1"
    assert parse_ts(body["created_at"]) == parse_ts(body["updated_at"])
    got = await api.get("/v1/devices/phone-1", headers=DEVICES)
    assert got.status == 200 and await got.json() == body


async def test_put_replaces_every_field_and_consent_left_out_means_none(api: Client) -> None:
    await api.put("/v1/devices/phone-1", headers=DEVICES, json=PROFILE)
    resp = await api.put("/v1/devices/phone-1", headers=DEVICES, json={"platform": "web"})
    body = await resp.json()
    assert body["platform"] == "web"
    assert body["push_token"] is None and body["segments"] == [] and body["attributes"] == {}
    assert body["consent"] == {"location": False, "marketing": False}


async def test_patch_changes_only_the_given_fields_and_consents(api: Client) -> None:
    await api.put("/v1/devices/phone-1", headers=DEVICES, json=PROFILE)
    resp = await api.patch("/v1/devices/phone-1", headers=DEVICES,
                           json={"segments": ["loyal"], "consent": {"marketing": True}})
    assert resp.status == 200
    body = await resp.json()
    assert body["segments"] == ["loyal"]
    assert body["consent"] == {"location": True, "marketing": True}
    assert body["push_token"] == PROFILE["push_token"]
    assert body["attributes"] == PROFILE["attributes"]
    resp = await api.patch("/v1/devices/phone-1", headers=DEVICES, json={"push_token": None})
    assert (await resp.json())["push_token"] is None


async def test_patch_of_an_unknown_device_is_404(api: Client) -> None:
    resp = await api.patch("/v1/devices/ghost", headers=DEVICES, json={"locale": "de"})
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"
    assert (await api.get("/v1/devices/ghost", headers=DEVICES)).status == 404
    assert (await api.get("/v1/devices/ghost/export", headers=DEVICES)).status == 404
    assert (await api.delete("/v1/devices/ghost", headers=DEVICES)).status == 404


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"platform": "blackberry"}, "platform", "'android', 'ios' or 'web'"),
        ({"consent": {"location": "yes"}}, "consent.location", "valid boolean"),
        ({"consent": {"location": True, "sms": True}}, "consent.sms", "unknown field"),
        ({"colour": "red"}, "colour", "unknown field"),
        ({"locale": "not a locale"}, "locale", "pattern"),
        ({"timezone": "Mars/Olympus"}, "timezone", "IANA time zone"),
        ({"segments": "regular"}, "segments", "valid list"),
    ],
)
async def test_a_bad_device_body_is_400_naming_field_and_value(
        api: Client, body: dict[str, Any], field: str, says: str) -> None:
    resp = await api.put("/v1/devices/phone-1", headers=DEVICES, json=body)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "invalid"
    assert error["details"][0]["field"] == field
    assert says in error["message"] or says in (error["details"][0]["expected"] or "")


async def test_a_bad_device_id_is_400(api: Client) -> None:
    resp = await api.put("/v1/devices/" + "x" * 129, headers=DEVICES, json=PROFILE)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["details"][0]["field"] == "device_id"
    resp = await api.put("/v1/devices/a%20b", headers=DEVICES, json=PROFILE)
    assert resp.status == 400


@pytest.mark.parametrize("encoded", ["%2E", "%2e%2E", "a%0A", "%2E%2E%2Fx"])
async def test_a_device_id_that_is_a_dot_path_or_has_a_newline_is_400(api: Client,
                                                                      encoded: str) -> None:
    # percent-encoded, these reach the handler; such a device could be stored but never
    # addressed again by a client that normalises the path (/v1/devices/./export)
    for method, suffix in (("PUT", ""), ("GET", ""), ("GET", "/export"), ("DELETE", "")):
        resp = await api.request(method, URL(f"/v1/devices/{encoded}{suffix}", encoded=True),
                                 headers=DEVICES, json=PROFILE if method == "PUT" else None)
        assert resp.status == 400, (method, suffix)
        error = (await resp.json())["error"]
        assert error["details"][0]["field"] == "device_id"
        assert "not . or .." in error["details"][0]["expected"]


async def test_every_consent_change_is_kept_with_its_time(api: Client) -> None:
    await api.put("/v1/devices/phone-1", headers=DEVICES, json=PROFILE)
    await api.patch("/v1/devices/phone-1", headers=DEVICES, json={"locale": "de"})  # no change
    await api.patch("/v1/devices/phone-1", headers=DEVICES, json={"consent": {"marketing": True}})
    await api.patch("/v1/devices/phone-1", headers=DEVICES, json={"consent": {"location": False}})
    export = await (await api.get("/v1/devices/phone-1/export", headers=DEVICES)).json()
    trail = export["consent_history"]
    assert [(c["location"], c["marketing"], c["source"]) for c in trail] == [
        (True, False, "PUT"), (True, True, "PATCH"), (False, True, "PATCH")]
    stamps = [parse_ts(c["at"]) for c in trail]
    assert stamps == sorted(stamps)


async def test_revoking_location_consent_ends_stays_without_events_at_once(api: Client
                                                                           ) -> None:
    await api.put("/v1/devices/phone-1", headers=DEVICES, json=PROFILE)
    trace = load_trace()
    resp = await api.post("/v1/pings", headers=INGEST,
                          json={"pings": [ping("phone-1", p) for p in trace[296:301]]})
    assert [e["type"] for e in (await resp.json())["events"]] == ["enter"]
    export = await (await api.get("/v1/devices/phone-1/export", headers=DEVICES)).json()
    assert [s["geofence_id"] for s in export["tracking"]["stays"]] == ["bakery-300"]

    await api.patch("/v1/devices/phone-1", headers=DEVICES, json={"consent": {"location": False}})
    export = await (await api.get("/v1/devices/phone-1/export", headers=DEVICES)).json()
    assert export["tracking"]["stays"] == []
    resp = await api.post("/v1/pings", headers=INGEST, json=ping("phone-1", trace[301]))
    assert [r["code"] for r in (await resp.json())["rejected"]] == ["no_consent"]
    # consent back while far away: the old stay is gone, so no exit event appears
    await api.patch("/v1/devices/phone-1", headers=DEVICES, json={"consent": {"location": True}})
    resp = await api.post("/v1/pings", headers=INGEST, json=ping("phone-1", trace[500]))
    body = await resp.json()
    assert body["accepted"] == 1 and body["events"] == []


async def test_export_holds_profile_consent_trail_visits_and_tracking(api: Client) -> None:
    await api.put("/v1/devices/phone-1", headers=DEVICES, json=PROFILE)
    trace = load_trace()
    # linger 6 minutes at the bakery (a visit needs 5 min), then drive away
    at = trace[300]
    stay = [{"device_id": "phone-1", "lat": at.lat, "lon": at.lon,
             "ts": round((at.ts - 400 + 60 * k) * 1000)} for k in range(7)]
    away = ping("phone-1", trace[500])
    resp = await api.post("/v1/pings", headers=INGEST, json={"pings": [*stay, away]})
    assert [e["type"] for e in (await resp.json())["events"]] == ["enter", "exit"]
    export = await (await api.get("/v1/devices/phone-1/export", headers=DEVICES)).json()
    assert export["profile"]["device_id"] == "phone-1"
    assert len(export["consent_history"]) == 1
    assert [(v["store_id"], v["geofence_id"]) for v in export["visits"]] == [
        ("bakery-300", "bakery-300")]
    visit = export["visits"][0]
    assert parse_ts(visit["start"]) == pytest.approx(at.ts - 400)
    assert parse_ts(visit["end"]) == pytest.approx(trace[500].ts)
    assert export["tracking"]["last_ping"] is not None
    assert export["decisions"] == [] and export["pushes"] == []


async def test_delete_erases_everything_but_the_erasure_record(
        api: Client, backend: Backend) -> None:
    await api.put("/v1/devices/phone-1", headers=DEVICES, json=PROFILE)
    await api.put("/v1/devices/phone-2", headers=DEVICES, json=PROFILE)
    trace = load_trace()
    for device in ("phone-1", "phone-2"):
        resp = await api.post("/v1/pings", headers=INGEST,
                              json={"pings": [ping(device, p) for p in trace[280:700]]})
        assert (await resp.json())["accepted"] == 420
    resp = await api.delete("/v1/devices/phone-1", headers=DEVICES)
    assert resp.status == 204
    assert (await api.get("/v1/devices/phone-1", headers=DEVICES)).status == 404
    assert (await api.get("/v1/devices/phone-2", headers=DEVICES)).status == 200
    # a ping after erasure is from an unknown device: rejected, nothing stored
    resp = await api.post("/v1/pings", headers=INGEST, json=ping("phone-1", trace[701]))
    assert [r["code"] for r in (await resp.json())["rejected"]] == ["no_consent"]

    key = backend.settings.logging.pseudonym_key
    record_hash = erasure_hash("phone-1", key)  # not the key of log pseudonyms
    app = api.app
    assert app is not None
    from geopush.api.appstate import STATE

    record = await app[STATE].erasure_record(record_hash)
    assert record is not None
    assert record.last_consent is not None and record.last_consent.location is True

    if backend.redis_url is not None:
        found = _redis_mentions(backend.redis_url, "phone-1")
        assert found == [], f"phone-1 still in Redis: {found}"
        assert _redis_mentions(backend.redis_url, "phone-2"), "the other device must stay"
    else:
        await api.close()  # shutdown writes the memory snapshot
        snapshot = Path(str(backend.settings.storage.snapshot_path)).read_text()
        assert "phone-1" not in snapshot
        assert "phone-2" in snapshot and record_hash in snapshot


def _redis_mentions(url: str, needle: str) -> list[str]:
    """Every key whose name or value mentions `needle`."""
    client = redis.Redis.from_url(url)
    found = []
    try:
        for raw_key in client.scan_iter(count=1000):
            key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
            kind_raw: Any = client.type(raw_key)
            kind = kind_raw.decode() if isinstance(kind_raw, bytes) else str(kind_raw)
            values: list[Any]
            if kind == "string":
                values = [client.get(raw_key)]
            elif kind == "hash":
                values = [*client.hgetall(raw_key).items()]
            elif kind == "list":
                values = client.lrange(raw_key, 0, -1)
            elif kind == "zset":
                values = client.zrange(raw_key, 0, -1)
            elif kind == "set":
                values = [*client.smembers(raw_key)]
            else:
                values = [client.dump(raw_key)]
            if needle in key or needle.encode() in repr(values).encode():
                found.append(key)
    finally:
        client.close()
    return found


def _nested(levels: int) -> dict[str, Any]:
    """attributes `levels` deep: {"k": {"k": ... 1}}, attributes itself being level 1."""
    value: Any = 1
    for _ in range(levels):
        value = {"k": value}
    return value  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "field", "value", "expected"),
    [
        # 255 levels: the PUT answered 500 and the memory backend kept the profile
        ({"attributes": _nested(255)}, "attributes",
         "attributes.k.k.k.k: nested more than 4 levels deep", "at most 4 levels deep"),
        ({"attributes": _nested(5)}, "attributes",
         "attributes.k.k.k.k: nested more than 4 levels deep", "at most 4 levels deep"),
        ({"attributes": {"tags": [[["a", ["b"]]]]}}, "attributes",
         "attributes.tags.0.0.1: nested more than 4 levels deep", "at most 4 levels deep"),
        ({"attributes": {f"k{i}": i for i in range(60_000)}}, "attributes",
         "at least 60000 keys, counting nested objects", "at most 64 keys"),
        ({"attributes": {f"k{i}": {"a": 1, "b": 2} for i in range(30)}}, "attributes",
         "at least 66 keys, counting nested objects", "at most 64 keys"),
        ({"attributes": {"bio": "x" * 8200}}, "attributes", "8210 bytes as JSON",
         "at most 8192 bytes as JSON"),
        ({"segments": [f"s{i}" for i in range(33)]}, "segments", "a list of 33 items",
         "at most 32 items"),
        ({"segments": ["x" * 65]}, "segments.0", "x" * 65, "at most 64 characters"),
        ({"segments": [""]}, "segments.0", "", "at least 1 character"),
    ],
)
async def test_a_profile_over_a_bound_is_400_naming_it_and_nothing_is_stored(
        api: Client, body: dict[str, Any], field: str, value: str, expected: str) -> None:
    for method in ("PUT", "PATCH"):
        if method == "PATCH":
            assert (await api.put("/v1/devices/phone-1", headers=DEVICES,
                                  json=PROFILE)).status == 200
        resp = await api.request(method, "/v1/devices/phone-1", headers=DEVICES, json=body)
        assert resp.status == 400, await resp.text()
        error = (await resp.json())["error"]
        assert error["code"] == "invalid"
        problem = error["details"][0]
        assert (problem["field"], problem["value"]) == (field, value)
        assert expected in problem["expected"] and expected in error["message"]
        got = await api.get("/v1/devices/phone-1", headers=DEVICES)
        if method == "PUT":
            assert got.status == 404  # not stored, not half-stored
        else:
            assert (await got.json())["attributes"] == PROFILE["attributes"]
            export = await api.get("/v1/devices/phone-1/export", headers=DEVICES)
            assert export.status == 200


async def test_a_profile_at_its_bounds_is_fine(api: Client) -> None:
    attributes: dict[str, Any] = {"deep": _nested(3), "list": [[["x"]]]}
    attributes.update({f"k{i}": "v" * 100 for i in range(64 - 5)})  # 5 in deep and list
    body = {"attributes": attributes, "segments": [f"s{i:02d}" + "x" * 61 for i in range(32)]}
    resp = await api.put("/v1/devices/phone-1", headers=DEVICES, json=body)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["attributes"] == attributes


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
async def test_a_device_body_not_declared_json_is_415(api: Client, method: str) -> None:
    await api.put("/v1/devices/phone-1", headers=DEVICES, json=PROFILE)
    body = '{"consent": {"location": false, "marketing": true}}'
    resp = await api.request(method, "/v1/devices/phone-1",
                             headers={**DEVICES, "Content-Type": "text/plain"}, data=body)
    assert resp.status == 415
    assert (await resp.json())["error"]["code"] == "unsupported_media_type"
    got = await (await api.get("/v1/devices/phone-1", headers=DEVICES)).json()
    assert got["consent"] == PROFILE["consent"]
