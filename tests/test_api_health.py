"""Probes, metrics, the OpenAPI document and the one error shape (404, 405, 500)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from geopush.app import create_app
from geopush.devices import DeviceProfile
from geopush.logs import make_formatter, pseudonym
from geopush.state.memory import MemoryStore
from tests.api_support import DEVICES, INGEST, load_trace, ping, settings_for

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
async def api(tmp_path: Path, aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(create_app(settings_for(tmp_path)))


async def test_healthz_and_readyz(api: Client) -> None:
    assert await (await api.get("/healthz")).json() == {"status": "ok"}
    resp = await api.get("/readyz")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ready"
    assert body["checks"]["state_store"]["ok"] is True
    assert body["checks"]["stores"]["geofences"] == 2


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_count_pings_rejections_events_and_latency(api: Client) -> None:
    await api.put("/v1/devices/phone-1", headers=DEVICES, json={"consent": {"location": True}})
    trace = load_trace()
    pings = [ping("phone-1", p) for p in trace[290:320]]
    pings += [{**pings[0], "lat": 95}, ping("stranger", trace[0])]
    resp = await api.post("/v1/pings", headers=INGEST, json={"pings": pings})
    assert resp.status == 200
    text = await (await api.get("/metrics")).text()
    families = [f.name for f in text_string_to_metric_families(text)]
    assert families and all(name.startswith("geopush_") for name in families), families
    samples = _samples(text)
    assert samples[("geopush_pings_accepted_total", ())] == 30
    assert samples[("geopush_pings_rejected_total", (("code", "invalid"),))] == 1
    assert samples[("geopush_pings_rejected_total", (("code", "no_consent"),))] == 1
    assert samples[("geopush_events_total", (("source", "ping"), ("type", "enter")))] == 1
    assert samples[("geopush_events_total", (("source", "ping"), ("type", "exit")))] == 1
    assert samples[("geopush_request_duration_seconds_count",
                    (("method", "POST"), ("route", "/v1/pings")))] == 1
    assert samples[("geopush_geofences_loaded", ())] == 2


async def test_openapi_describes_every_route(api: Client) -> None:
    doc = await (await api.get("/openapi.json")).json()
    assert doc["openapi"] == "3.1.0"
    app = api.app
    assert app is not None
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        assert path in doc["paths"], path
        assert route.method.lower() in doc["paths"][path], (route.method, path)
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    pings = doc["paths"]["/v1/pings"]["post"]["responses"]
    assert {"200", "400", "401", "403", "413", "503"} <= set(pings)


async def test_404_and_405_have_the_error_shape(api: Client) -> None:
    resp = await api.get("/v1/nothing-here")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"
    resp = await api.post("/healthz")
    assert resp.status == 405
    assert "GET" in resp.headers["Allow"]
    error = (await resp.json())["error"]
    assert error["code"] == "method_not_allowed" and "POST" in error["message"]


class _Broken(MemoryStore):
    async def get_profile(self, device_id: str) -> DeviceProfile | None:
        raise RuntimeError("secret internals /etc/passwd")


async def test_an_unexpected_error_is_500_without_traceback_and_logged(
        tmp_path: Path, aiohttp_client: MakeClient, caplog: pytest.LogCaptureFixture) -> None:
    api = await aiohttp_client(create_app(settings_for(tmp_path), store=_Broken()))
    with caplog.at_level(logging.ERROR, logger="geopush.api"):
        resp = await api.get("/v1/devices/d1", headers=DEVICES)
    assert resp.status == 500
    text = await resp.text()
    assert "secret" not in text and "Traceback" not in text
    assert (await resp.json())["error"]["code"] == "internal"
    assert any(r.getMessage() == "unexpected_error" and r.exc_info for r in caplog.records)
    assert (await api.get("/healthz")).status == 200


class _LeakyBroken(MemoryStore):
    async def get_profile(self, device_id: str) -> DeviceProfile | None:
        raise KeyError(f"profile of {device_id} is corrupt")


async def test_a_500_never_logs_the_raw_device_id(
        tmp_path: Path, aiohttp_client: MakeClient, caplog: pytest.LogCaptureFixture) -> None:
    # the path (/v1/devices/<id>) was logged as it was, and the exception quoted the id
    settings = settings_for(tmp_path)
    api = await aiohttp_client(create_app(settings, store=_LeakyBroken()))
    with caplog.at_level(logging.ERROR, logger="geopush.api"):
        for path in ("/v1/devices/alice@example.com", "/v1/devices/alice@example.com/export"):
            resp = await api.get(path, headers=DEVICES)
            assert resp.status == 500
            assert "alice" not in await resp.text()
    records = [r for r in caplog.records if r.getMessage() == "unexpected_error"]
    assert len(records) == 2
    for format_ in ("json", "text"):
        formatter = make_formatter(settings.logging.model_copy(update={"format": format_}))
        lines = [formatter.format(r) for r in records]
        assert all("alice@example.com" not in line for line in lines), lines
        expected = pseudonym("alice@example.com", settings.logging.pseudonym_key)
        assert all(expected in line for line in lines)
        assert all("/v1/devices/{device_id}" in line for line in lines)


async def test_invented_methods_do_not_invent_metric_series(api: Client) -> None:
    for method in ("PROPFIND", "MKCOL", "TRACE"):
        resp = await api.request(method, "/v1/pings")
        assert resp.status == 405
    text = await (await api.get("/metrics")).text()
    assert "PROPFIND" not in text and 'method="other"' in text
