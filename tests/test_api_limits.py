"""Limits on the real app (contract §13): the per-device ping bucket, per ping `rate_limited`, held
across requests, instances on one Redis and restarts; the per-credential request limit, 429 with
Retry-After, and on the stream an error answer that keeps the stream open."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from geopush.app import create_app
from tests.api_support import DEVICES, INGEST, load_trace, ping, settings_for

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "redis":
        return {"backend": "redis", "redis_url": request.getfixturevalue("redis_url")}
    return {"backend": "memory"}


async def _register(client: Client, device: str) -> None:
    resp = await client.put(f"/v1/devices/{device}", headers=DEVICES,
                            json={"consent": {"location": True}})
    assert resp.status == 200, await resp.text()


def _same_instant(device: str, n: int, ts_ms: int | None = None) -> list[dict[str, Any]]:
    """n pings of one device stamped within one second: a flood, not a backlog."""
    at = load_trace()[0]
    ts_ms = ts_ms if ts_ms is not None else round(time.time() * 1000) - 60_000
    return [{"device_id": device, "lat": at.lat, "lon": at.lon, "ts": ts_ms + i} for i in range(n)]


async def _post(client: Client, pings: list[dict[str, Any]]) -> dict[str, Any]:
    resp = await client.post("/v1/pings", headers=INGEST, json={"pings": pings})
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


def _rejected_metric(text: str, code: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'geopush_pings_rejected_total{{code="{code}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"no rejected counter for {code}")


# -- per device ----------------------------------------------------------------------------------

async def test_a_flood_is_cut_per_ping_at_the_default_limit(
        tmp_path: Path, backend: dict[str, Any], aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_app(settings_for(tmp_path, **backend)))
    await _register(client, "flooder")
    await _register(client, "quiet")
    pings = _same_instant("flooder", 150)
    pings.insert(75, _same_instant("quiet", 1)[0])  # another device in the same request
    body = await _post(client, pings)
    assert body["accepted"] == 121  # the flooder's 120 of a minute, and the quiet phone's
    limited = [r for r in body["rejected"] if r["code"] == "rate_limited"]
    assert len(limited) == len(body["rejected"]) == 30
    assert [r["index"] for r in limited] == list(range(121, 151))  # the flood's last 30
    assert "limits.device_pings_per_minute" in limited[0]["message"]
    metrics = await (await client.get("/metrics")).text()
    assert _rejected_metric(metrics, "rate_limited") == 30


async def test_an_offline_backlog_uploaded_at_once_passes(
        tmp_path: Path, backend: dict[str, Any], aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_app(settings_for(tmp_path, **backend)))
    await _register(client, "phone")
    trace = load_trace()  # 1 Hz, recorded over a quarter of an hour
    for start in range(0, len(trace), 1000):
        body = await _post(client, [ping("phone", p) for p in trace[start:start + 1000]])
        assert body["rejected"] == []
        assert body["accepted"] == len(trace[start:start + 1000])


async def test_the_bucket_holds_across_requests_and_rejected_pings_do_not_consume(
        tmp_path: Path, backend: dict[str, Any], aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_app(settings_for(
        tmp_path, **backend, limits={"device_pings_per_minute": 10})))
    await _register(client, "phone")
    flood = _same_instant("phone", 14)
    accepted = 0
    for i in range(0, 14, 2):
        accepted += (await _post(client, flood[i:i + 2]))["accepted"]
    assert accepted == 10
    # out_of_order and invalid pings are turned away before the bucket: they take nothing
    older = _same_instant("phone", 3, flood[0]["ts"] - 10_000)
    body = await _post(client, [*older, {"device_id": "phone", "lat": 91, "lon": 0,
                                         "ts": flood[-1]["ts"]}])
    assert sorted(r["code"] for r in body["rejected"]) == ["invalid"] + ["out_of_order"] * 3
    later = _same_instant("phone", 2, flood[-1]["ts"] + 6_000)  # one ping's worth refilled
    assert [r["code"] for r in (await _post(client, later))["rejected"]] == ["rate_limited"]


async def test_without_a_limit_a_flood_is_accepted(
        tmp_path: Path, aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_app(settings_for(
        tmp_path, limits={"device_pings_per_minute": 0})))
    await _register(client, "phone")
    assert (await _post(client, _same_instant("phone", 500)))["accepted"] == 500


@pytest.mark.redis
async def test_the_bucket_holds_across_instances_on_one_redis(
        tmp_path: Path, shared_redis: dict[str, Any], aiohttp_client: MakeClient) -> None:
    shared = settings_for(tmp_path, storage=shared_redis, limits={"device_pings_per_minute": 20})
    instances = [await aiohttp_client(create_app(shared)) for _ in range(2)]
    await _register(instances[0], "phone")
    flood = _same_instant("phone", 60)
    # the flood's slices at both instances at once, then one after the other
    first = await asyncio.gather(*(_post(instances[k % 2], flood[k * 5:(k + 1) * 5])
                                   for k in range(6)))
    rest = [await _post(instances[k % 2], flood[k * 5:(k + 1) * 5]) for k in range(6, 12)]
    bodies = [*first, *rest]
    # concurrent slices may commit in any order (an earlier one after a later one is
    # out_of_order), but the one bucket lets 20 through in all
    assert sum(b["accepted"] for b in bodies) == 20
    assert {r["code"] for b in bodies for r in b["rejected"]} <= {"rate_limited", "out_of_order"}
    assert {r["code"] for b in rest for r in b["rejected"]} == {"rate_limited"}


async def test_the_bucket_survives_a_restart_of_the_memory_backend(
        tmp_path: Path, aiohttp_client: MakeClient) -> None:
    settings = settings_for(tmp_path, limits={"device_pings_per_minute": 10})
    flood = _same_instant("phone", 20)
    client = await aiohttp_client(create_app(settings))
    await _register(client, "phone")
    assert (await _post(client, flood[:8]))["accepted"] == 8
    await client.close()  # the journal and snapshot carry the track
    client = await aiohttp_client(create_app(settings))
    assert (await _post(client, flood[8:]))["accepted"] == 2


# -- per credential ------------------------------------------------------------------------------

OPS = {"Authorization": "Bearer admin-key-0123456789abc"}  # another credential with ingest


def _limited(tmp_path: Path, per_second: float, **kw: Any) -> Any:
    return create_app(settings_for(tmp_path, limits={"key_requests_per_second": per_second}, **kw))


async def test_a_credential_over_its_rate_gets_429_with_retry_after(
        tmp_path: Path, aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(_limited(tmp_path, 0.2))  # one request every 5 s, burst 1
    await _register(client, "phone")
    one = _same_instant("phone", 1)
    first = await client.post("/v1/pings", headers=INGEST, json=one[0])
    assert first.status == 200
    resp = await client.post("/v1/pings", headers=INGEST, json=one[0])
    assert resp.status == 429
    assert resp.headers["Retry-After"] in {"4", "5"}
    error = (await resp.json())["error"]
    assert error["code"] == "rate_limited"
    assert "limits.key_requests_per_second" in error["message"]
    assert error["details"][0]["field"] == "retry_after_s"
    # per credential: another key is not held back by this one
    other = await client.post("/v1/pings", headers=OPS, json=one[0])
    assert other.status == 200
    # the endpoints that do not take pings are not limited
    assert (await client.get("/v1/devices/phone", headers=DEVICES)).status == 200


async def test_without_keys_every_request_is_one_credential(
        tmp_path: Path, aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(_limited(tmp_path, 0.2, keys=[]))
    await client.put("/v1/devices/phone", json={"consent": {"location": True}})
    one = _same_instant("phone", 1)[0]
    assert (await client.post("/v1/pings", json=one)).status == 200
    assert (await client.post("/v1/pings", json=one)).status == 429


async def test_on_the_stream_each_message_counts_and_is_answered_with_the_error(
        tmp_path: Path, aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(_limited(tmp_path, 1))  # burst 1: the upgrade takes it
    await _register(client, "phone")
    pings = _same_instant("phone", 3)
    async with client.ws_connect("/v1/stream", headers=INGEST) as ws:
        await ws.send_json(pings[0])
        answer = await ws.receive_json(timeout=10)
        assert answer["seq"] == 1 and answer["error"]["code"] == "rate_limited"
        assert answer["accepted"] == 0 and answer["rejected"] == [] and answer["events"] == []
        await ws.send_str("not json either")  # limited before it is read
        assert (await ws.receive_json(timeout=10))["error"]["code"] == "rate_limited"
        await asyncio.sleep(1.1)  # refilled: the stream is still open and takes pings
        await ws.send_json(pings[1])
        answer = await ws.receive_json(timeout=10)
        assert answer["seq"] == 3 and answer["accepted"] == 1 and "error" not in answer
    # the upgrade is a request too
    await asyncio.sleep(1.1)
    async with client.ws_connect("/v1/stream", headers=INGEST) as ws:
        await ws.send_json(pings[2])
        assert (await ws.receive_json(timeout=10))["error"]["code"] == "rate_limited"
    resp = await client.get("/v1/stream", headers=INGEST)  # at once: refused before upgrading
    assert resp.status == 429 and "Retry-After" in resp.headers


async def test_without_a_rate_limit_requests_are_not_counted(
        tmp_path: Path, aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_app(settings_for(tmp_path)))
    await _register(client, "phone")
    one = _same_instant("phone", 1)[0]
    statuses = [(await client.post("/v1/pings", headers=INGEST, json=one)).status
                for _ in range(30)]
    assert statuses == [200] * 30
