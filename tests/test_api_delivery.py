"""Decided pushes reach phones (contract §7): the real app on memory and on Redis, the `fcm`
sender pointed at a local fake FCM answering with Firebase's real bodies, a marketer's rule on
the stores of a real GPS trace (the Munich drive). A visit sends exactly one FCM message, with
the rule's text, its push_id as data and as collapse tag, the channel of its category and the
ttl left; a revoked consent or an erasure cancels what waits for a retry; a dead token is
removed; ops see sends in Prometheus and support sees the delivery in the export."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.api_support import DEVICES
from tests.fakefcm import FakeFcm, Reply
from tests.test_api_decisions import (
    BAKERY_ENTER,
    DEVICE,
    WELCOME,
    Backend,
    Client,
    MakeClient,
    _app,
    _drive,
    _export,
    _fresh_trace,
    _metric,
    _register,
    backend,
)

__all__ = ["backend"]  # the fixture, shared

PROJECT = "geopush-test"
SERVICE = """
id: order-ready
category: service
trigger: {on: enter, geofences: {ids: [bakery-300]}}
message: {title: "Your order", body: "is ready at {{ store.name }}", ttl: 10m}
"""


@pytest.fixture
async def fcm() -> AsyncIterator[FakeFcm]:
    async with FakeFcm() as fake:
        yield fake


async def _fcm_app(aiohttp_client: MakeClient, tmp_path: Path, backend: Backend,
                   fcm: FakeFcm, rules: dict[str, str] | None = None, **sections: Any) -> Client:
    delivery = {"sender": "fcm", "fcm": {"project_id": PROJECT, "endpoint": fcm.endpoint,
                                          "static_token": "test-access-token",
                                          "android_channels": {"marketing": "offers",
                                                               "service": "orders"}}}
    return await _app(aiohttp_client, tmp_path, backend, rules or {"welcome.yaml": WELCOME},
                      delivery=delivery, **sections)


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def _state(api: Client) -> str | None:
    outbox = (await _export(api))["outbox"]
    return outbox[0]["state"] if outbox else None


async def test_a_visit_sends_exactly_one_fcm_message_with_its_push_id_and_channel(
        aiohttp_client: MakeClient, tmp_path: Path, backend: Backend, fcm: FakeFcm) -> None:
    api = await _fcm_app(aiohttp_client, tmp_path, backend, fcm)
    await _register(api)
    trace = _fresh_trace()
    await _drive(api, trace, 250, BAKERY_ENTER + 20)  # in and out of the bakery
    await _until(lambda: _sent(api))
    await asyncio.sleep(0.3)  # nothing more comes
    [request] = fcm.requests
    assert request.path == f"/v1/projects/{PROJECT}/messages:send"
    assert request.bearer == "test-access-token"
    message = request.message
    export = await _export(api)
    [push] = export["pushes"]
    [entry] = export["outbox"]
    assert message["token"] == "fcm-1"
    assert message["notification"]["title"] == "Hello Ana"
    assert re.fullmatch(r"Fresh bread at bakery-300, \d+ m away", message["notification"]["body"])
    assert message["data"]["push_id"] == push["push_id"] == entry["push_id"]
    android = message["android"]
    assert android["notification"]["tag"] == push["push_id"]
    assert android["notification"]["channel_id"] == "offers"
    # the ttl left (15 minutes from the event a few seconds ago), on every platform
    ttl = int(android["ttl"].removesuffix("s"))
    assert 880 <= ttl <= 900
    assert message["apns"]["headers"]["apns-collapse-id"] == push["push_id"]
    assert abs(int(message["apns"]["headers"]["apns-expiration"]) - (time.time() + ttl)) <= 5
    assert 880 <= int(message["webpush"]["headers"]["TTL"]) <= 900
    assert (entry["state"], entry["attempts"]) == ("sent", 1)
    assert (await _metric(api, "geopush_push_sends_total")) == {'{code="",result="sent"}': 1.0}


async def _sent(api: Client) -> bool:
    return await _state(api) == "sent"


async def test_a_service_push_goes_to_its_own_channel(
        aiohttp_client: MakeClient, tmp_path: Path, fcm: FakeFcm) -> None:
    api = await _fcm_app(aiohttp_client, tmp_path, ("memory", None), fcm,
                         {"order.yaml": SERVICE})
    await _register(api, marketing=False)  # service pushes need no marketing consent
    await _drive(api, _fresh_trace(), 250, BAKERY_ENTER + 2)
    await _until(lambda: _sent(api))
    [request] = fcm.requests
    assert request.message["android"]["notification"]["channel_id"] == "orders"


async def test_revoking_marketing_consent_cancels_a_push_waiting_for_a_retry(
        aiohttp_client: MakeClient, tmp_path: Path, backend: Backend, fcm: FakeFcm) -> None:
    fcm.then(Reply.unavailable(retry_after="2"))
    api = await _fcm_app(aiohttp_client, tmp_path, backend, fcm)
    await _register(api)
    await _drive(api, _fresh_trace(), 250, BAKERY_ENTER + 2)
    await _until(lambda: _has_error(api, "UNAVAILABLE", "http_503"))
    resp = await api.patch(f"/v1/devices/{DEVICE}", headers=DEVICES,
                           json={"consent": {"marketing": False}})
    assert resp.status == 200
    [entry] = (await _export(api))["outbox"]
    assert (entry["state"], entry["reason"]) == ("cancelled", "marketing consent was revoked")
    await asyncio.sleep(2.5)  # past the retry it waited for: no second attempt
    assert len(fcm.requests) == 1


async def _has_error(api: Client, *codes: str) -> bool:
    outbox = (await _export(api))["outbox"]
    return bool(outbox) and outbox[0]["state"] == "queued" and outbox[0]["error"] in codes


async def test_deleting_the_device_cancels_its_queued_push(
        aiohttp_client: MakeClient, tmp_path: Path, backend: Backend, fcm: FakeFcm) -> None:
    fcm.then(Reply.unavailable(retry_after="2"))
    api = await _fcm_app(aiohttp_client, tmp_path, backend, fcm)
    await _register(api)
    await _drive(api, _fresh_trace(), 250, BAKERY_ENTER + 2)
    await _until(lambda: _has_error(api, "UNAVAILABLE", "http_503"))
    resp = await api.delete(f"/v1/devices/{DEVICE}", headers=DEVICES)
    assert resp.status == 204
    await asyncio.sleep(2.5)
    assert len(fcm.requests) == 1


async def test_an_unregistered_token_is_removed_and_the_push_fails(
        aiohttp_client: MakeClient, tmp_path: Path, backend: Backend, fcm: FakeFcm) -> None:
    fcm.then(Reply.real("fcm_v1_404_UNREGISTERED.json"))
    api = await _fcm_app(aiohttp_client, tmp_path, backend, fcm)
    await _register(api)
    await _drive(api, _fresh_trace(), 250, BAKERY_ENTER + 2)
    await _until(lambda: _failed(api))
    export = await _export(api)
    assert export["profile"]["push_token"] is None
    [entry] = export["outbox"]
    assert (entry["state"], entry["error"]) == ("failed", "UNREGISTERED")
    assert len(fcm.requests) == 1
    assert (await _metric(api, "geopush_push_tokens_removed_total")) == {"": 1.0}
    sends = await _metric(api, "geopush_push_sends_total")
    assert sends == {'{code="UNREGISTERED",result="failed"}': 1.0}


async def _failed(api: Client) -> bool:
    return await _state(api) == "failed"
