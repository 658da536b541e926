"""Decided pushes reach phones (contract §7): the real app on memory and on Redis, the `fcm`
sender pointed at a local fake FCM answering with Firebase's real bodies, a marketer's rule on
the stores of a real GPS trace (the Munich drive). A visit sends exactly one FCM message, with
the rule's text, its push_id as data and as collapse tag, the channel of its category and the
ttl left; a revoked consent or an erasure cancels what waits for a retry; a dead token is
removed; ops see sends in Prometheus and support sees the delivery in the export."""

from __future__ import annotations

import asyncio
import logging
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
                   fcm: FakeFcm, rules: dict[str, str] | None = None,
                   delivery_timeout: str = "10s", send_lease: str = "60s",
                   **sections: Any) -> Client:
    delivery = {"sender": "fcm", "timeout": delivery_timeout, "send_lease": send_lease,
                "fcm": {"project_id": PROJECT, "endpoint": fcm.endpoint,
                        "static_token": "test-access-token",
                        "android_channels": {"marketing": "offers", "service": "orders"}}}
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


# -- faults: FCM misbehaving, Redis restarting mid-burst --------------------------------------


async def test_fcm_misbehaving_loses_nothing_and_every_failure_is_counted(
        aiohttp_client: MakeClient, tmp_path: Path, fcm: FakeFcm) -> None:
    """Four phones' pushes meet a timeout, a dropped connection, garbage and a 503 on their
    first attempt: each is retried (same push_id) and sent, and every failure shows in the send
    metrics. (A 429 waits at least 60 s, FCM's guidance: tests/test_senders_fcm.py.)"""
    replies = [Reply.hang(5.0), Reply.dropped(), Reply.garbage(), Reply.unavailable("1")]
    for n, reply in enumerate(replies):
        fcm.then(reply, token=f"tok-{n}")
    api = await _fcm_app(aiohttp_client, tmp_path, ("memory", None), fcm,
                         delivery_timeout="1s")
    trace = _fresh_trace()
    for n in range(len(replies)):
        await _register_as(api, f"p{n}", f"tok-{n}")
        await _drive_as(api, f"p{n}", trace)
    await _until(lambda: _all_sent(api, len(replies)), timeout_s=100.0)
    by_token: dict[str, set[str]] = {}
    for request in fcm.requests:
        by_token.setdefault(request.message["token"], set()).add(
            request.message["data"]["push_id"])
    assert all(len(ids) == 1 for ids in by_token.values())  # retried under the same id
    assert len(by_token) == len(replies)
    sends = await _metric(api, "geopush_push_sends_total")
    retried = {k: v for k, v in sends.items() if 'result="retry"' in k}
    assert sum(retried.values()) == len(replies)
    assert sends['{code="",result="sent"}'] == len(replies)
    assert {'{code="timeout",result="retry"}', '{code="connection",result="retry"}'} \
        <= set(retried)


async def test_redis_restarting_mid_burst_loses_no_push(
        aiohttp_client: MakeClient, tmp_path: Path, fcm: FakeFcm) -> None:
    """Redis (append-only, fsync always) is restarted while pushes are queued and being sent:
    the service keeps running, and once Redis is back every push decided is sent, each under
    its own push_id."""
    from tests.conftest import PrivateRedis

    redis_server = PrivateRedis(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    redis_server.start()
    try:
        fcm.always(Reply(delay_s=0.3))  # slow enough that the burst is still going on
        # an attempt whose end could not be written is sent again after the lease
        api = await _fcm_app(aiohttp_client, tmp_path, ("redis", redis_server.url), fcm,
                             delivery_timeout="2s", send_lease="3s")
        trace = _fresh_trace()
        phones = 12
        for n in range(phones):
            await _register_as(api, f"p{n}", f"tok-{n}")
            await _drive_as(api, f"p{n}", trace)
        await _until(lambda: _requests_at_least(fcm, 2))
        redis_server.stop()
        await asyncio.sleep(1.0)
        redis_server.start()
        await _until(lambda: _all_sent(api, phones), timeout_s=90.0)
        ids = {r.message["data"]["push_id"] for r in fcm.requests}
        tokens = {r.message["token"] for r in fcm.requests}
        assert len(ids) == len(tokens) == phones
        resp = await api.get("/readyz")
        assert resp.status == 200
    finally:
        redis_server.stop()


async def _register_as(api: Client, device_id: str, token: str) -> None:
    resp = await api.put(f"/v1/devices/{device_id}", headers=DEVICES, json={
        "push_token": token, "platform": "android",
        "consent": {"location": True, "marketing": True}})
    assert resp.status == 200, await resp.text()


async def _drive_as(api: Client, device_id: str, trace: list[Any]) -> None:
    from tests.api_support import INGEST, ping

    resp = await api.post("/v1/pings", headers=INGEST, json={
        "pings": [ping(device_id, p) for p in trace[250:BAKERY_ENTER + 2]]})
    assert resp.status == 200, await resp.text()


async def _all_sent(api: Client, devices: int) -> bool:
    try:
        for n in range(devices):
            resp = await api.get(f"/v1/devices/p{n}/export", headers=DEVICES)
            if resp.status != 200:
                return False
            outbox = (await resp.json())["outbox"]
            if len(outbox) != 1 or outbox[0]["state"] != "sent":
                return False
    except (TimeoutError, OSError):
        return False
    return True


async def _requests_at_least(fcm: FakeFcm, n: int) -> bool:
    return len(fcm.requests) >= n


async def test_the_running_service_writes_a_delivery_report_each_window(
        aiohttp_client: MakeClient, tmp_path: Path, fcm: FakeFcm,
        caplog: pytest.LogCaptureFixture) -> None:
    """The report job on the app's own scheduler: a push decided and sent shows in the
    `delivery_report` lines of the windows that follow (its decision and its send may fall in
    two)."""
    api = await _fcm_app(aiohttp_client, tmp_path, ("memory", None), fcm,
                         logging={"delivery_report_every": "2s"})
    await _register(api)
    with caplog.at_level(logging.INFO, logger="geopush.delivery.counts"):
        await _drive(api, _fresh_trace(), 250, BAKERY_ENTER + 2)
        await _until(lambda: _sent(api))
        await _until(lambda: _reported(caplog), timeout_s=8.0)
    from geopush.logs import _FIELDS_ATTR

    reports = [getattr(r, _FIELDS_ATTR) for r in caplog.records
               if r.getMessage() == "delivery_report"]
    assert sum(r["decided"] for r in reports) == 1
    report = next(r for r in reports if r["sent"])
    assert (report["sent"], report["failed"], report["delivery_rate"]) == (1, 0, 1.0)
    assert report["window_s"] == 2.0 and report["by_rule"]["bakery-welcome"]["sent"] == 1


async def _reported(caplog: pytest.LogCaptureFixture) -> bool:
    from geopush.logs import _FIELDS_ATTR

    reports = [getattr(r, _FIELDS_ATTR) for r in caplog.records
               if r.getMessage() == "delivery_report"]
    return sum(r["sent"] for r in reports) >= 1 and sum(r["decided"] for r in reports) >= 1
