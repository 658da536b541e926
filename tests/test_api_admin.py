"""POST /v1/admin/reload (contract §2, §6): a new stores file is swapped in whole; a file with
errors is refused with every error (422) and the previous stores stay active."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from geopush.app import create_app
from tests.api_support import ADMIN_KEY, DEVICES, INGEST, load_trace, ping, settings_for

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
async def api(tmp_path: Path, aiohttp_client: MakeClient) -> Client:
    client = await aiohttp_client(create_app(settings_for(tmp_path)))
    resp = await client.put("/v1/devices/car", headers=DEVICES,
                            json={"consent": {"location": True, "marketing": True}})
    assert resp.status == 200
    return client


def _stores_file(api: Client) -> Path:
    from geopush.api.appstate import SETTINGS

    path = api.app[SETTINGS].stores_file
    assert path is not None
    return Path(path)


async def _enters_at(api: Client, lat: float, lon: float, ts_ms: int) -> list[str]:
    resp = await api.post("/v1/pings", headers=INGEST,
                          json={"device_id": "car", "lat": lat, "lon": lon, "ts": ts_ms})
    assert resp.status == 200, await resp.text()
    return [e["geofence_id"] for e in (await resp.json())["events"] if e["type"] == "enter"]


def _write_one_store(path: Path, fid: str, lat: float, lon: float, radius: Any = 50) -> None:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "id": fid, "properties": {"name": fid, "radius_m": radius},
        "geometry": {"type": "Point", "coordinates": [lon, lat]}}]}))


async def test_a_reload_makes_the_new_stores_active(api: Client) -> None:
    trace = load_trace()
    far = trace[1000]  # well away from the two test stores on the route
    _write_one_store(_stores_file(api), "new-store", far.lat, far.lon)

    resp = await api.post("/v1/admin/reload", headers=ADMIN)

    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "reloaded" and body["geofences"] == 1
    assert await _enters_at(api, far.lat, far.lon, round(far.ts * 1000)) == ["new-store"]
    ready = await (await api.get("/readyz")).json()
    assert ready["checks"]["stores"]["geofences"] == 1


async def test_a_reload_with_errors_is_refused_whole_and_the_old_stores_stay(api: Client) -> None:
    trace = load_trace()
    stores = _stores_file(api)
    stores.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "ok", "properties": {},
         "geometry": {"type": "Point", "coordinates": [11.5, 48.1]}},
        {"type": "Feature", "id": "bad-radius", "properties": {"radius_m": -5},
         "geometry": {"type": "Point", "coordinates": [11.5, 48.1]}},
        {"type": "Feature", "id": "bad-lat", "properties": {},
         "geometry": {"type": "Point", "coordinates": [11.5, 95.0]}},
    ]}))

    resp = await api.post("/v1/admin/reload", headers=ADMIN)

    assert resp.status == 422
    error = (await resp.json())["error"]
    fields = {(d["field"], d["value"]) for d in error["details"]}
    assert ("radius_m", -5) in fields
    assert any(d["value"] == 95.0 and "latitude" in d["message"] for d in error["details"])
    assert all("stores.geojson" in d["where"] for d in error["details"])
    # the previous stores (two on the route) are still the active ones
    on_route = ping("car", trace[300])
    assert await _enters_at(api, on_route["lat"], on_route["lon"], on_route["ts"]) == [
        "bakery-300"]


async def test_reload_needs_the_admin_scope(api: Client) -> None:
    assert (await api.post("/v1/admin/reload", headers=INGEST)).status == 403
    assert (await api.post("/v1/admin/reload")).status == 401
