"""Bearer keys and scopes (contract §6): 401 without or with an unknown key, 403 with the wrong
scope, probes and docs open to all, and no keys → everything allowed (on loopback only)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, make_mocked_request

from geopush.api.auth import Authenticator
from geopush.api.errors import Unauthorized
from geopush.app import LOOPBACK, create_app, listen_host
from geopush.config import AuthKey, AuthSettings
from tests.api_support import ADMIN_KEY, DEVICES, DEVICES_KEY, INGEST, settings_for

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]

PROTECTED = [
    ("POST", "/v1/pings", "ingest"),
    ("GET", "/v1/stream", "ingest"),
    ("PUT", "/v1/devices/d1", "devices"),
    ("PATCH", "/v1/devices/d1", "devices"),
    ("GET", "/v1/devices/d1", "devices"),
    ("GET", "/v1/devices/d1/export", "devices"),
    ("DELETE", "/v1/devices/d1", "devices"),
    ("POST", "/v1/devices/d1/token", "devices"),
    ("DELETE", "/v1/devices/d1/token", "devices"),
]


@pytest.fixture
async def api(tmp_path: Path, aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(create_app(settings_for(tmp_path)))


@pytest.mark.parametrize(("method", "path", "scope"), PROTECTED)
@pytest.mark.parametrize(
    ("header", "says"),
    [
        (None, "missing Authorization header"),
        ("Bearer not-a-key-at-all-000", "unknown API key"),
        (f"Basic {DEVICES_KEY}", "expected 'Bearer <key>'"),
        ("Bearer ", "expected 'Bearer <key>'"),
        (f"Bearer {DEVICES_KEY}x", "unknown API key"),
    ],
)
async def test_no_key_or_an_unknown_key_is_401(api: Client, method: str, path: str, scope: str,
                                              header: str | None, says: str) -> None:
    headers = {"Authorization": header} if header is not None else {}
    resp = await api.request(method, path, headers=headers, json={})
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    error = (await resp.json())["error"]
    assert error["code"] == "unauthorized" and says in error["message"]


@pytest.mark.parametrize(("method", "path", "scope"), PROTECTED)
async def test_a_key_without_the_scope_is_403_naming_it(api: Client, method: str, path: str,
                                                        scope: str) -> None:
    wrong = DEVICES if scope == "ingest" else INGEST
    resp = await api.request(method, path, headers=wrong, json={})
    assert resp.status == 403
    error = (await resp.json())["error"]
    assert error["code"] == "forbidden" and f"'{scope}' scope" in error["message"]


async def test_a_key_with_several_scopes_may_use_each(api: Client) -> None:
    ops = {"Authorization": f"Bearer {ADMIN_KEY}"}
    resp = await api.put("/v1/devices/d1", headers=ops, json={"consent": {"location": True}})
    assert resp.status == 200
    resp = await api.post("/v1/pings", headers=ops,
                          json={"device_id": "d1", "lat": 1, "lon": 1, "ts": 1_000})
    assert resp.status == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json"])
async def test_probes_metrics_and_docs_need_no_key(api: Client, path: str) -> None:
    assert (await api.get(path)).status == 200


async def test_without_keys_every_request_is_allowed(tmp_path: Path,
                                                     aiohttp_client: MakeClient) -> None:
    api = await aiohttp_client(create_app(settings_for(tmp_path, keys=[])))
    resp = await api.put("/v1/devices/d1", json={"consent": {"location": True}})
    assert resp.status == 200
    resp = await api.post("/v1/pings", json={"device_id": "d1", "lat": 1, "lon": 1, "ts": 1})
    assert resp.status == 200


def test_without_keys_the_server_listens_on_loopback_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_for(tmp_path, keys=[], server={"host": "0.0.0.0"})
    with caplog.at_level(logging.WARNING, logger="geopush.app"):
        assert listen_host(settings) == LOOPBACK
    assert [r.getMessage() for r in caplog.records] == ["no_auth_keys"]
    message = vars(caplog.records[0])["geopush_fields"]["message"]
    assert "127.0.0.1 only" in message and "'0.0.0.0'" in message


def test_with_keys_the_server_listens_where_configured(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, server={"host": "0.0.0.0"})
    assert listen_host(settings) == "0.0.0.0"


def test_keys_are_compared_whole() -> None:
    auth = Authenticator(AuthSettings(keys=[AuthKey(name="a", key="k" * 16, scopes=["ingest"])]))
    assert auth.enabled

    request = make_mocked_request("GET", "/", headers={"Authorization": "Bearer " + "k" * 15})
    with pytest.raises(Unauthorized, match="unknown API key"):
        auth.check(request, "ingest")
    request = make_mocked_request("GET", "/", headers={"Authorization": "Bearer " + "k" * 16})
    assert auth.check(request, "ingest") == "a"


async def test_every_route_but_the_probes_refuses_a_request_without_credentials(
        api: Client) -> None:
    """A route added later without its auth check fails here, not in production."""
    open_paths = {"/healthz", "/readyz", "/metrics", "/openapi.json"}
    checked = 0
    for route in api.app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path in open_paths or route.method in ("HEAD", "OPTIONS") or not path:
            continue
        resp = await api.request(route.method, path.replace("{device_id}", "d1")
                                 .replace("{push_id}", "01KBZ0000000000000000000AB")
                                 .replace("{rule_id}", "a-rule"),
                                 json={}, headers={})
        assert resp.status == 401, (route.method, path, resp.status)
        checked += 1
    assert checked >= 12
