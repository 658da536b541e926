"""Ops and marketers on delivery (contract §6 stats, §8): the real app, a rule with a holdout
on the stores of a real GPS trace (the Munich drive), many phones driving it. The stats count
decisions, pushes' states, conversions of each group and lift; a pause holds marketing pushes
on every instance until resumed; a kill switch cancels a rule's queued pushes and says who; a
test push goes through the real sender, outside caps and stats."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from geopush.api import ops
from geopush.api.appstate import STATE
from geopush.rules.decide import in_holdout
from tests.api_support import DEVICES, INGEST, ping
from tests.fakefcm import FakeFcm, Reply
from tests.test_api_decisions import (
    BAKERY_ENTER,
    MEMORY,
    Backend,
    Client,
    MakeClient,
    _app,
    _fresh_trace,
    backend,
)
from tests.test_api_delivery import PROJECT, _until, fcm

__all__ = ["backend", "fcm"]  # the fixtures, shared

ADMIN = {"Authorization": "Bearer admin-key-0123456789abc"}
HALVES = """
id: bakery-halves
trigger: {on: enter, geofences: {ids: [bakery-300]}}
holdout: 0.5
message: {title: "Hello", body: "Fresh bread at {{ store.name }}"}
"""


async def _register(api: Client, device_id: str, token: str = "fcm-1") -> None:
    resp = await api.put(f"/v1/devices/{device_id}", headers=DEVICES, json={
        "push_token": token, "platform": "android",
        "consent": {"location": True, "marketing": True}})
    assert resp.status == 200, await resp.text()


async def _drive(api: Client, device_id: str, trace: list[Any], start: int, end: int) -> None:
    resp = await api.post("/v1/pings", headers=INGEST,
                          json={"pings": [ping(device_id, p) for p in trace[start:end]]})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["accepted"] == end - start, body


async def test_stats_count_both_groups_their_conversions_and_the_lift(
        aiohttp_client: MakeClient, tmp_path: Path, backend: Backend) -> None:
    api = await _app(aiohttp_client, tmp_path, backend, {"halves.yaml": HALVES})
    devices = [f"phone-{n}" for n in range(70)]
    trace = _fresh_trace(ago_s=120.0)
    converting = set(devices[::2])
    for device_id in devices:
        await _register(api, device_id)
        # every other phone stays at the bakery (a visit under way converts); the others
        # drive through in seconds (no visit: visits.min_dwell is 5 minutes)
        end = BAKERY_ENTER + 1 if device_id in converting else BAKERY_ENTER + 20
        await _drive(api, device_id, trace, 250, end)
    held = {d for d in devices if in_holdout("bakery-halves", d, 0.5)}
    assert 25 < len(held) < 45  # the hash splits them about evenly
    resp = await api.get("/v1/stats", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    stats = await resp.json()
    rule = stats["rules"]["bakery-halves"]
    assert rule["decided"] == len(devices) - len(held)
    assert rule["holdout"] == len(held)
    assert stats["totals"]["decided"] == rule["decided"]
    pushed_conv = len((set(devices) - held) & converting)
    held_conv = len(held & converting)
    assert rule["conversions"] == {"push": pushed_conv, "holdout": held_conv}
    assert rule["sent"] + rule["queued"] == rule["decided"]  # the log sender
    if min(rule["decided"], rule["holdout"]) >= 30:
        assert rule["lift"]["value"] == pytest.approx(
            pushed_conv / rule["decided"] - held_conv / rule["holdout"])
        low, high = rule["lift"]["ci95"]
        assert low < rule["lift"]["value"] < high
    else:
        assert rule["lift"] == {"value": None, "ci95": None}
    # a window that ends before the decisions counts none of them
    resp = await api.get("/v1/stats", headers=ADMIN,
                         params={"to": str(round((time.time() - 3600) * 1000))})
    assert (await resp.json())["totals"]["decided"] == 0
    resp = await api.get("/v1/stats", headers=ADMIN, params={"from": "yesterday"})
    assert resp.status == 400
    assert (await resp.json())["error"]["details"][0]["field"] == "from"


async def test_stats_count_a_page_of_devices_at_a_time_and_let_pings_in_between(
        aiohttp_client: MakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory store answers without waiting: the handler gives the loop a turn after each
    page, or pings would wait for every device of the deployment to be counted."""
    api = await _app(aiohttp_client, tmp_path, MEMORY, {"halves.yaml": HALVES})
    trace = _fresh_trace(ago_s=120.0)
    for n in range(12):
        await _register(api, f"phone-{n}")
        await _drive(api, f"phone-{n}", trace, 250, BAKERY_ENTER + 1 + n % 2 * 20)
    whole = await (await api.get("/v1/stats", headers=ADMIN)).json()
    assert whole["totals"]["decided"] + whole["totals"]["holdout"] == 12
    store = api.app[STATE]
    turns = 0
    seen: list[int] = []
    records = store.records

    async def watched(device_ids: Any) -> Any:
        seen.append(turns)
        return await records(device_ids)

    async def ticking() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    monkeypatch.setattr(store, "records", watched)
    monkeypatch.setattr(ops, "STATS_PAGE", 5)
    ticker = asyncio.create_task(ticking())
    try:
        paged = await (await api.get("/v1/stats", headers=ADMIN)).json()
    finally:
        ticker.cancel()
    assert paged == whole
    assert len(seen) == 3 and seen[0] < seen[1] < seen[2]  # other tasks ran between pages


async def test_a_pause_holds_marketing_pushes_until_resumed(
        aiohttp_client: MakeClient, tmp_path: Path, backend: Backend, fcm: FakeFcm,
        caplog: pytest.LogCaptureFixture) -> None:
    api = await _fcm_app(aiohttp_client, tmp_path, backend, fcm)
    await _register(api, "ana")
    with caplog.at_level(logging.WARNING, logger="geopush.api.ops"):
        resp = await api.post("/v1/admin/marketing/pause", headers=ADMIN)
    assert resp.status == 200 and (await resp.json())["by"] == "ops"
    assert any(r.getMessage() == "marketing_paused" and _fields(r).get("credential") == "ops"
               for r in caplog.records)
    await asyncio.sleep(1.2)  # every instance reads the pause within a second
    await _drive(api, "ana", _fresh_trace(), 250, BAKERY_ENTER + 2)
    await asyncio.sleep(1.5)
    assert fcm.requests == []
    [entry] = (await _export(api, "ana"))["outbox"]
    assert entry["state"] == "queued" and "paused by ops" in entry["reason"]
    resp = await api.post("/v1/admin/marketing/resume", headers=ADMIN)
    assert resp.status == 200
    await _until(lambda: _requests(fcm, 1), timeout_s=12.0)


async def test_a_kill_switch_cancels_a_rules_queued_pushes(
        aiohttp_client: MakeClient, tmp_path: Path, backend: Backend, fcm: FakeFcm,
        caplog: pytest.LogCaptureFixture) -> None:
    fcm.always(Reply.unavailable(retry_after="30"))  # every push waits for a retry
    api = await _fcm_app(aiohttp_client, tmp_path, backend, fcm)
    trace = _fresh_trace()
    for n in range(3):
        await _register(api, f"p{n}", token=f"tok-{n}")
        await _drive(api, f"p{n}", trace, 250, BAKERY_ENTER + 2)
    await _until(lambda: _requests(fcm, 3))
    with caplog.at_level(logging.WARNING, logger="geopush.api.ops"):
        resp = await api.post("/v1/admin/rules/bakery-welcome/cancel", headers=ADMIN)
    assert resp.status == 200
    assert await resp.json() == {"rule_id": "bakery-welcome", "cancelled": 3}
    [line] = [r for r in caplog.records if r.getMessage() == "rule_pushes_cancelled"]
    assert _fields(line) == {"credential": "ops", "rule_id": "bakery-welcome", "cancelled": 3}
    for n in range(3):
        [entry] = (await _export(api, f"p{n}"))["outbox"]
        assert entry["state"] == "cancelled"
        assert entry["reason"] == "rule bakery-welcome cancelled by ops"
    resp = await api.post("/v1/admin/rules/no-such-rule/cancel", headers=ADMIN)
    assert (await resp.json())["cancelled"] == 0


async def test_a_test_push_goes_through_the_sender_outside_caps_and_stats(
        aiohttp_client: MakeClient, tmp_path: Path, backend: Backend, fcm: FakeFcm) -> None:
    api = await _fcm_app(aiohttp_client, tmp_path, backend, fcm)
    await _register(api, "ana")
    for n in range(3):  # past any cap a rule would meet
        resp = await api.post("/v1/admin/test-push", headers=ADMIN,
                              json={"device_id": "ana", "title": f"Test {n}"})
        assert resp.status == 202, await resp.text()
    await _until(lambda: _requests(fcm, 3))
    titles = sorted(r.message["notification"]["title"] for r in fcm.requests)
    assert titles == ["Test 0", "Test 1", "Test 2"]
    assert all(r.message["data"]["test"] == "true" for r in fcm.requests)
    stats = await (await api.get("/v1/stats", headers=ADMIN)).json()
    assert stats["totals"]["decided"] == 0 and stats["rules"] == {}
    export = await _export(api, "ana")
    assert export["pushes"] == [] and len(export["outbox"]) == 3
    resp = await api.post("/v1/admin/test-push", headers=ADMIN, json={"device_id": "nobody"})
    assert resp.status == 404
    resp = await api.post("/v1/admin/test-push", headers=ADMIN, json={"device_id": "../x"})
    assert resp.status == 400
    assert (await resp.json())["error"]["details"][0]["field"] == "device_id"


async def _fcm_app(aiohttp_client: MakeClient, tmp_path: Path, backend: Backend,
                   fcm: FakeFcm) -> Client:
    from tests.test_api_decisions import WELCOME

    delivery = {"sender": "fcm", "fcm": {"project_id": PROJECT, "endpoint": fcm.endpoint,
                                          "static_token": "test-access-token"}}
    return await _app(aiohttp_client, tmp_path, backend, {"welcome.yaml": WELCOME},
                      delivery=delivery)


async def _export(api: Client, device_id: str) -> dict[str, Any]:
    resp = await api.get(f"/v1/devices/{device_id}/export", headers=DEVICES)
    assert resp.status == 200
    export: dict[str, Any] = await resp.json()
    return export


async def _requests(fcm: FakeFcm, n: int) -> bool:
    return len(fcm.requests) >= n


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    from geopush.logs import _FIELDS_ATTR

    found: dict[str, Any] = getattr(record, _FIELDS_ATTR, {})
    return found


@pytest.mark.parametrize("value", ["yesterday", "١٢٣٤٥٦٧٨٩٠١٢٣", "１２", "²", "9" * 5001,
                                   "2026-13-01T00:00:00Z"])
async def test_stats_bounds_that_are_no_time_are_400_naming_the_field(
        aiohttp_client: MakeClient, tmp_path: Path, value: str) -> None:
    api = await _app(aiohttp_client, tmp_path, ("memory", None), {"halves.yaml": HALVES})
    resp = await api.get("/v1/stats", headers=ADMIN, params={"from": value})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["details"][0]["field"] == "from"
    assert "invalid literal" not in error["message"] and "sys." not in error["message"]


@pytest.mark.parametrize("rule_id", ["Bakery", "x" * 65, "a b", "..", "x\ny"])
async def test_a_kill_switch_for_what_is_no_rule_id_is_400(
        aiohttp_client: MakeClient, tmp_path: Path, rule_id: str) -> None:
    from urllib.parse import quote

    api = await _app(aiohttp_client, tmp_path, ("memory", None), {"halves.yaml": HALVES})
    resp = await api.post(f"/v1/admin/rules/{quote(rule_id, safe='')}/cancel", headers=ADMIN)
    assert resp.status in (400, 404)  # ".." never reaches the route
    if resp.status == 400:
        assert (await resp.json())["error"]["details"][0]["field"] == "rule_id"
