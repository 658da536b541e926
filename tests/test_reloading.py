"""A reload reaches every instance (contract §6): the validated set is published through the
state store with a version, every instance swaps to it within 5 s, /readyz shows the version
in use; a set with errors, or a publish the store cannot take, changes nothing anywhere."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from geopush.api.appstate import LIVE, SETTINGS
from geopush.app import create_app
from geopush.config import Settings
from geopush.service.active import ConfigSet, geofencing_of, read_config_set
from geopush.service.reloading import Reloader
from geopush.state.memory import MemoryStore
from tests.api_support import ADMIN_KEY, DEVICES, INGEST, load_trace, settings_for
from tests.conftest import PrivateRedis

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SWAP_WITHIN_S = 5.0  # the contract's bound


def _write_one_store(path: Path, fid: str, lat: float, lon: float) -> None:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "id": fid, "properties": {"name": fid, "radius_m": 50},
        "geometry": {"type": "Point", "coordinates": [lon, lat]}}]}))


async def _instance(aiohttp_client: MakeClient, workdir: Path, storage: dict[str, Any]
                    ) -> Client:
    workdir.mkdir(exist_ok=True)
    client = await aiohttp_client(create_app(settings_for(workdir, storage=storage)))
    resp = await client.put("/v1/devices/car", headers=DEVICES,
                            json={"consent": {"location": True}})
    assert resp.status == 200
    return client


async def _version(client: Client) -> str:
    version: str = client.app[LIVE].geofencing.version
    ready = await client.get("/readyz")
    if ready.status == 200:  # /readyz shows the version in use (the one before its request,
        # or, when the instance followed a reload meanwhile, the one after)
        assert (await ready.json())["version"] in (version, client.app[LIVE].geofencing.version)
    return version


async def _wait_for_version(client: Client, version: str) -> float:
    """Seconds until the instance runs `version`; fails after the contract's 5 s."""
    started = time.monotonic()
    while await _version(client) != version:
        assert time.monotonic() - started < SWAP_WITHIN_S, "not swapped within 5 s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _enters(client: Client, lat: float, lon: float, ts_ms: int) -> list[str]:
    resp = await client.post("/v1/pings", headers=INGEST,
                             json={"device_id": "car", "lat": lat, "lon": lon, "ts": ts_ms})
    assert resp.status == 200, await resp.text()
    return [e["geofence_id"] for e in (await resp.json())["events"] if e["type"] == "enter"]


def _stores_file(client: Client) -> Path:
    return Path(client.app[SETTINGS].stores_file)


async def test_a_reload_on_one_instance_reaches_the_other_within_5_s(
        tmp_path: Path, shared_redis: dict[str, Any], aiohttp_client: MakeClient) -> None:
    a = await _instance(aiohttp_client, tmp_path / "a", shared_redis)
    b = await _instance(aiohttp_client, tmp_path / "b", shared_redis)
    before = await _version(a)
    assert await _version(b) == before  # the same files: the same version
    far = load_trace()[1000]
    _write_one_store(_stores_file(a), "new-store", far.lat, far.lon)  # a's file only

    resp = await a.post("/v1/admin/reload", headers=ADMIN)

    assert resp.status == 200, await resp.text()
    version = (await resp.json())["version"]
    assert version != before and await _version(a) == version
    await _wait_for_version(b, version)
    # b runs the published set, although its own file still holds the old stores
    assert "new-store" not in _stores_file(b).read_text()
    assert await _enters(b, far.lat, far.lon, round(far.ts * 1000)) == ["new-store"]


async def test_a_reload_with_errors_publishes_nothing(
        tmp_path: Path, redis_url: str, aiohttp_client: MakeClient) -> None:
    storage = {"backend": "redis", "redis_url": redis_url}
    a = await _instance(aiohttp_client, tmp_path / "a", storage)
    b = await _instance(aiohttp_client, tmp_path / "b", storage)
    before = await _version(b)
    _stores_file(a).write_text('{"type": "FeatureCollection", "features": [{"type": "Feature"')

    resp = await a.post("/v1/admin/reload", headers=ADMIN)

    assert resp.status == 422
    await asyncio.sleep(2.5)  # more than two polls
    assert await _version(a) == before and await _version(b) == before


async def test_a_reload_the_state_store_cannot_publish_changes_nothing(
        tmp_path: Path, private_redis: PrivateRedis, aiohttp_client: MakeClient) -> None:
    private_redis.start()
    a = await _instance(aiohttp_client, tmp_path / "a",
                        {"backend": "redis", "redis_url": private_redis.url})
    before = await _version(a)
    far = load_trace()[1000]
    _write_one_store(_stores_file(a), "new-store", far.lat, far.lon)
    private_redis.stop()

    resp = await a.post("/v1/admin/reload", headers=ADMIN)

    assert resp.status == 503
    assert resp.headers["Retry-After"].isdigit()
    assert await _version(a) == before  # not swapped here either: no instance runs it alone


async def test_an_instance_starts_on_its_own_files_and_follows_later_reloads(
        tmp_path: Path, redis_url: str, aiohttp_client: MakeClient) -> None:
    storage = {"backend": "redis", "redis_url": redis_url}
    a = await _instance(aiohttp_client, tmp_path / "a", storage)
    trace = load_trace()
    first, second = trace[1000], trace[1100]
    _write_one_store(_stores_file(a), "first", first.lat, first.lon)
    assert (await a.post("/v1/admin/reload", headers=ADMIN)).status == 200

    # started after that publish, on files of its own: it runs them, not the earlier publish
    late = await _instance(aiohttp_client, tmp_path / "late", storage)
    own = read_config_set(late.app[SETTINGS]).version
    await asyncio.sleep(1.5)
    assert await _version(late) == own != await _version(a)

    _write_one_store(_stores_file(a), "second", second.lat, second.lon)
    resp = await a.post("/v1/admin/reload", headers=ADMIN)
    await _wait_for_version(late, (await resp.json())["version"])
    assert await _enters(late, second.lat, second.lon, round(second.ts * 1000)) == ["second"]


# -- the follower alone, on the memory store ------------------------------------------------


def _reloader(settings: Settings, store: MemoryStore, installed: list[str]) -> Reloader:
    current: list[Any] = [geofencing_of(read_config_set(settings), settings)]

    def install(geofencing: Any) -> None:
        current[0] = geofencing
        installed.append(geofencing.version)

    return Reloader(settings, store, lambda: current[0], install)


async def test_a_published_set_that_cannot_be_built_is_refused_once_and_kept_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_for(tmp_path)
    store = MemoryStore()
    installed: list[str] = []
    follower = _reloader(settings, store, installed)
    assert await follower.follow_once() is False  # learns the serial it starts at
    bad = ConfigSet("elsewhere.geojson", '{"type": "FeatureCollection", "features": [1]}')
    await store.publish_config(bad.to_bytes())
    assert await follower.follow_once() is False
    assert await follower.follow_once() is False  # not tried again
    assert installed == []
    assert [r.getMessage() for r in caplog.records].count("published_config_rejected") == 1
    good = read_config_set(settings)
    changed = ConfigSet(good.stores_source, good.stores_text.replace("bakery", "bake-shop"))
    await store.publish_config(changed.to_bytes())
    assert await follower.follow_once() is True
    assert installed == [changed.version]
