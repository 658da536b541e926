"""Two instances on one Redis (or one Redis Cluster) share the work (contract §10): interleaved
pings of the same devices give exactly the events one instance gives, and timers fire once."""

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

pytestmark = pytest.mark.redis
DEVICES_ON_ROAD = {"a": 0, "b": 45, "c": 90}  # seconds behind the first car
STEP = 7  # pings per request


def _pings(device: str, delay_s: int) -> list[dict[str, Any]]:
    out = []
    for p in load_trace()[200:800]:
        body = ping(device, p)
        body["ts"] += delay_s * 1000
        out.append(body)
    return out


def _key(event: dict[str, Any]) -> tuple[str, str, str, str]:
    return (event["device_id"], event["geofence_id"], event["type"], event["ts"])


async def _register(client: Client, devices: list[str]) -> None:
    for d in devices:
        resp = await client.put(f"/v1/devices/{d}", headers=DEVICES,
                                json={"consent": {"location": True}})
        assert resp.status == 200


async def test_two_instances_give_exactly_the_events_of_one(
        tmp_path: Path, shared_redis: dict[str, Any], aiohttp_client: MakeClient) -> None:
    shared = settings_for(tmp_path, storage=shared_redis)
    instances = [await aiohttp_client(create_app(shared)) for _ in range(2)]
    (tmp_path / "alone").mkdir()
    alone = await aiohttp_client(create_app(settings_for(tmp_path / "alone")))
    await _register(instances[0], list(DEVICES_ON_ROAD))
    await _register(alone, list(DEVICES_ON_ROAD))
    streams = {d: _pings(d, delay) for d, delay in DEVICES_ON_ROAD.items()}

    expected: list[dict[str, Any]] = []
    for pings in streams.values():
        for i in range(0, len(pings), STEP):
            resp = await alone.post("/v1/pings", headers=INGEST,
                                    json={"pings": pings[i:i + STEP]})
            expected += (await resp.json())["events"]

    got: list[dict[str, Any]] = []
    accepted = 0
    for step, i in enumerate(range(0, len(streams["a"]), STEP)):
        # every device's next slice at once, each to the instance its turn says
        requests = [
            instances[(step + j) % 2].post("/v1/pings", headers=INGEST,
                                           json={"pings": pings[i:i + STEP]})
            for j, pings in enumerate(streams.values())
        ]
        for resp in await asyncio.gather(*requests):
            assert resp.status == 200
            body = await resp.json()
            assert body["rejected"] == []
            accepted += body["accepted"]
            got += body["events"]
    assert accepted == sum(len(p) for p in streams.values())
    assert len(expected) == 4 * len(DEVICES_ON_ROAD)
    assert sorted(map(_key, got)) == sorted(map(_key, expected))


async def test_the_same_batch_at_both_instances_at_once_gives_its_events_once(
        tmp_path: Path, shared_redis: dict[str, Any], aiohttp_client: MakeClient) -> None:
    shared = settings_for(tmp_path, storage=shared_redis)
    instances = [await aiohttp_client(create_app(shared)) for _ in range(2)]
    await _register(instances[0], ["a"])
    batch = {"pings": [ping("a", p) for p in load_trace()[290:420]]}
    responses = await asyncio.gather(*(
        c.post("/v1/pings", headers=INGEST, json=batch) for c in instances for _ in range(3)))
    events = [e for r in responses for e in (await r.json())["events"]]
    # six deliveries of one batch: without the per-device atomic update each would read
    # the empty state and report its own enter and exit
    assert [e["type"] for e in sorted(events, key=lambda e: e["ts"])] == ["enter", "exit"]


def _timer_exits(text: str) -> float:
    for line in text.splitlines():
        if line.startswith('geopush_events_total{source="timer",type="exit"}'):
            return float(line.split()[-1])
    return 0.0


async def test_a_timer_fires_once_across_instances(
        tmp_path: Path, shared_redis: dict[str, Any], aiohttp_client: MakeClient) -> None:
    shared = settings_for(tmp_path, storage=shared_redis,
                          geofence={"stale_after": "1s"})
    instances = [await aiohttp_client(create_app(shared, timer_interval_s=0.1))
                 for _ in range(2)]
    devices = [f"d{i}" for i in range(20)]
    await _register(instances[0], devices)
    at = load_trace()[300]
    now_ms = round(time.time() * 1000)
    pings = [{"device_id": d, "lat": at.lat, "lon": at.lon, "ts": now_ms} for d in devices]
    resp = await instances[1].post("/v1/pings", headers=INGEST, json={"pings": pings})
    assert len((await resp.json())["events"]) == len(devices)

    async def fired() -> float:
        total = 0.0
        for c in instances:
            total += _timer_exits(await (await c.get("/metrics")).text())
        return total

    deadline = time.monotonic() + 30
    while await fired() < len(devices) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # time for a duplicate to show up, if there were one
    assert await fired() == len(devices)


async def test_a_consent_revocation_racing_other_patches_is_never_reverted(
        tmp_path: Path, shared_redis: dict[str, Any], aiohttp_client: MakeClient) -> None:
    """Issue #8 finding 2: a PATCH that read the profile before a revocation and wrote it back
    after restored the consent (25 of 30 tries); profile writes are compare-and-set now."""
    shared = settings_for(tmp_path, storage=shared_redis)
    instances = [await aiohttp_client(create_app(shared)) for _ in range(2)]
    for attempt in range(10):
        device = f"racer-{attempt}"
        resp = await instances[0].put(f"/v1/devices/{device}", headers=DEVICES, json={
            "consent": {"location": True, "marketing": True}, "attributes": {"n": -1}})
        assert resp.status == 200
        revoke = instances[attempt % 2].patch(
            f"/v1/devices/{device}", headers=DEVICES,
            json={"consent": {"location": False, "marketing": False}})
        others = [instances[(attempt + k) % 2].patch(f"/v1/devices/{device}", headers=DEVICES,
                                                     json={"attributes": {"n": k}})
                  for k in range(3)]
        responses = await asyncio.gather(revoke, *others)
        assert [r.status for r in responses] == [200] * 4
        profile = await (await instances[1].get(f"/v1/devices/{device}", headers=DEVICES)).json()
        assert profile["consent"] == {"location": False, "marketing": False}
        export = await (await instances[0].get(f"/v1/devices/{device}/export",
                                               headers=DEVICES)).json()
        trail = [(c["location"], c["marketing"]) for c in export["consent_history"]]
        assert trail == [(True, True), (False, False)]  # each change recorded once
        resp = await instances[0].post("/v1/pings", headers=INGEST,
                                       json=ping(device, load_trace()[300]))
        assert [r["code"] for r in (await resp.json())["rejected"]] == ["no_consent"]
