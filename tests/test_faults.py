"""Redis faults (contract §10): with Redis stopped, pings and device calls get 503 with
Retry-After, /readyz fails, nothing crashes, and the service recovers by itself when Redis is
back. Each test runs its own redis-server on a free port and stops and starts it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from geopush.app import create_app
from tests.api_support import DEVICES, INGEST, load_trace, ping, settings_for
from tests.conftest import PrivateRedis

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
RECOVERY_S = 15.0  # contract §10




async def _register(api: Client) -> aiohttp.ClientResponse:
    return await api.put("/v1/devices/phone-1", headers=DEVICES,
                         json={"consent": {"location": True}})


async def _wait_ready(api: Client, within_s: float) -> float:
    started = time.monotonic()
    while (await api.get("/readyz")).status != 200:
        assert time.monotonic() - started < within_s, f"not ready within {within_s} s"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def _assert_unavailable(resp: aiohttp.ClientResponse) -> None:
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) > 0
    error = (await resp.json())["error"]
    assert error["code"] == "unavailable" and "Redis" in error["message"]


async def test_redis_down_means_503_and_the_service_recovers_by_itself(
        tmp_path: Path, private_redis: PrivateRedis, aiohttp_client: MakeClient) -> None:
    private_redis.start()
    settings = settings_for(tmp_path, backend="redis", redis_url=private_redis.url)
    api = await aiohttp_client(create_app(settings, timer_interval_s=0.2))
    trace = load_trace()
    assert (await _register(api)).status == 200
    assert (await api.post("/v1/pings", headers=INGEST, json=ping("phone-1", trace[0]))
            ).status == 200
    ws = await api.ws_connect("/v1/stream", headers=INGEST)

    private_redis.stop()
    await _assert_unavailable(await api.post("/v1/pings", headers=INGEST,
                                             json=ping("phone-1", trace[1])))
    await _assert_unavailable(await _register(api))
    await _assert_unavailable(await api.get("/v1/devices/phone-1", headers=DEVICES))
    await _assert_unavailable(await api.delete("/v1/devices/phone-1", headers=DEVICES))
    ready = await api.get("/readyz")
    assert ready.status == 503 and "Retry-After" in ready.headers
    assert (await ready.json())["error"]["details"][0]["field"] == "state_store"
    assert (await api.get("/healthz")).status == 200
    await ws.send_json(ping("phone-1", trace[2]))
    answer = await ws.receive_json(timeout=10)
    assert answer["seq"] == 1 and answer["error"]["code"] == "unavailable"
    await asyncio.sleep(0.5)  # the timer job meets the outage too, and must survive it

    private_redis.start()  # empty: started without persistence
    await _wait_ready(api, RECOVERY_S)
    assert (await _register(api)).status == 200
    resp = await api.post("/v1/pings", headers=INGEST,
                          json={"pings": [ping("phone-1", p) for p in trace[280:420]]})
    assert resp.status == 200
    assert [e["type"] for e in (await resp.json())["events"]] == ["enter", "exit"]
    await ws.send_json(ping("phone-1", trace[421]))
    answer = await ws.receive_json(timeout=10)
    assert answer["seq"] == 2 and answer["accepted"] == 1
    await ws.close()
    metrics = await (await api.get("/metrics")).text()
    assert 'geopush_state_unavailable_total{operation="track"}' in metrics
    assert 'geopush_state_unavailable_total{operation="timers"}' in metrics


async def test_the_service_starts_while_redis_is_down_and_becomes_ready(
        tmp_path: Path, private_redis: PrivateRedis, aiohttp_client: MakeClient) -> None:
    settings = settings_for(tmp_path, backend="redis", redis_url=private_redis.url)
    api = await aiohttp_client(create_app(settings))
    assert (await api.get("/readyz")).status == 503
    await _assert_unavailable(await _register(api))
    private_redis.start()
    await _wait_ready(api, RECOVERY_S)
    assert (await _register(api)).status == 200


async def test_a_redis_stall_never_loses_the_events_of_an_answered_batch(
        tmp_path: Path, aiohttp_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #8 finding 1: a batch of exits in flight while Redis sleeps past the socket
    timeout is answered with its events, or 503 and then its retry gets them."""
    from geopush.app import STATE
    from geopush.state.redis_scripts import COMMIT
    from tests.conftest import _need_redis_server
    from tests.test_redis_stalls import Staller, _connection_class, _stall_when_sent

    _need_redis_server()
    stallable = PrivateRedis(tmp_path, "--enable-debug-command", "local")
    stallable.start()
    try:
        settings = settings_for(tmp_path, backend="redis", redis_url=stallable.url,
                                storage={"redis_timeout": 0.3})
        api = await aiohttp_client(create_app(settings, timer_interval_s=60))
        trace = load_trace()
        devices = [f"phone-{n}" for n in range(20)]
        for device_id in devices:
            assert (await api.put(f"/v1/devices/{device_id}", headers=DEVICES,
                                  json={"consent": {"location": True}})).status == 200
        inside = {"pings": [ping(d, p) for d in devices for p in trace[280:300]]}
        entered = await (await api.post("/v1/pings", headers=INGEST, json=inside)).json()
        assert [e["type"] for e in entered["events"]] == ["enter"] * len(devices)
        exits = {"pings": [ping(d, p) for d in devices for p in trace[300:340]]}
        staller = Staller(stallable.port)
        lost = 0
        try:
            # Redis sleeps right after the commit is sent: it has run it, or runs it after
            _stall_when_sent(_connection_class(api.app[STATE]), staller, COMMIT.sha, monkeypatch)
            resp = await api.post("/v1/pings", headers=INGEST, json=exits)
            if resp.status == 503:
                await _assert_unavailable(resp)
                await asyncio.sleep(1.2)
                resp = await api.post("/v1/pings", headers=INGEST, json=exits)
            assert resp.status == 200
            body = await resp.json()
            assert body["accepted"] == len(exits["pings"]), body["rejected"][:3]
            got = sorted((e["device_id"], e["type"]) for e in body["events"])
            lost = len(devices) - len(got)
            assert got == sorted((d, "exit") for d in devices)
        finally:
            staller.close()
        assert lost == 0, f"{lost} exit events lost"
    finally:
        stallable.stop()
