"""The webhook sender (contract §7) against a local receiver: the body and its signature, the
headers, and what each answer means; and Retry-After in both of its forms.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import pytest
from aiohttp import web

from geopush.config import DeliverySettings
from geopush.delivery.senders.base import OutgoingPush
from geopush.delivery.senders.build import build_sender
from geopush.delivery.senders.retry_after import retry_after_s
from geopush.delivery.senders.webhook import WebhookSender
from geopush.timeutil import format_ts

SECRET = "whsec-5f1c0d2e9a7b4c3d"
PUSH_TOKEN = "fcm-token-of-phone-1-do-not-log"
NOW = 1_780_000_000.0
TIMEOUT_S = 0.2


def push(**changes: Any) -> OutgoingPush:
    values: dict[str, Any] = dict(
        push_id="p-7f3a", device_id="phone-1", push_token=PUSH_TOKEN, platform="ios",
        title="Fresh bread at Lidl Bled", body="Two for one — until 18:00",
        data={"deeplink": "app://offers/42"}, category="marketing", rule_id="bread",
        store_id="s-1", geofence_id="g-1", event="dwell", created_at=NOW - 5.25, ttl_left_s=599.2)
    values.update(changes)
    return OutgoingPush(**values)


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    peer: Any = None  # the client's (address, port): one per connection


@dataclass
class Receiver:
    """A webhook endpoint: records each POST and answers from `replies` (status, headers),
    then 200. `hang` answers after `TIMEOUT_S` is long past; `drop` closes the connection."""

    url: str = ""
    seen: list[Received] = field(default_factory=list)
    replies: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    hang: bool = False
    drop: bool = False
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append(Received(dict(request.headers), await request.read(), peer))
        if self.hang:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), 5.0)
        if self.drop and request.transport is not None:
            request.transport.abort()
            return web.Response()
        status, headers = self.replies.pop(0) if self.replies else (200, {})
        if 300 <= status < 400:
            headers = {"Location": "/elsewhere", **headers}
        return web.Response(status=status, headers=headers, text="whatever the receiver says")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/push", found.handle)
    app.router.add_route("*", "/elsewhere", found.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    found.url = f"http://{host}:{port}/hooks/push"
    try:
        yield found
    finally:
        found.released.set()
        await runner.cleanup()


@pytest.fixture
async def signed(receiver: Receiver) -> AsyncIterator[WebhookSender]:
    sender = WebhookSender(receiver.url, secret=SECRET, timeout_s=TIMEOUT_S, clock=lambda: NOW)
    yield sender
    await sender.close()


async def test_the_push_is_posted_as_json(receiver: Receiver, signed: WebhookSender) -> None:
    result = await signed.send(push())
    assert result.outcome == "sent" and result.code is None
    [got] = receiver.seen
    assert got.headers["Content-Type"] == "application/json"
    assert json.loads(got.body) == {
        "push_id": "p-7f3a", "device_id": "phone-1", "push_token": PUSH_TOKEN, "platform": "ios",
        "title": "Fresh bread at Lidl Bled", "body": "Two for one — until 18:00",
        "data": {"deeplink": "app://offers/42"}, "rule_id": "bread", "store_id": "s-1",
        "geofence_id": "g-1", "event": "dwell", "created_at": format_ts(NOW - 5.25)}
    assert json.loads(got.body)["created_at"] == "2026-05-28T20:26:34.750Z"
    assert got.headers["X-Geopush-Push-Id"] == "p-7f3a"
    assert got.headers["X-Geopush-TTL"] == "600"  # 599.2 s left, whole seconds up


async def test_the_signature_is_hmac_sha256_of_the_exact_body(receiver: Receiver,
                                                              signed: WebhookSender) -> None:
    await signed.send(push())
    await signed.send(push(title="Other title"))
    for got in receiver.seen:
        expected = "sha256=" + hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(got.headers["X-Geopush-Signature"], expected)
        wrong = "sha256=" + hmac.new(b"another secret", got.body, hashlib.sha256).hexdigest()
        assert got.headers["X-Geopush-Signature"] != wrong
    assert receiver.seen[0].headers["X-Geopush-Signature"] != receiver.seen[1].headers["X-Geopush-Signature"]


@pytest.mark.parametrize("secret", [None, ""])
async def test_no_secret_no_signature(receiver: Receiver, secret: str | None) -> None:
    sender = WebhookSender(receiver.url, secret=secret, timeout_s=TIMEOUT_S)
    try:
        assert (await sender.send(push())).outcome == "sent"
    finally:
        await sender.close()
    assert "X-Geopush-Signature" not in receiver.seen[0].headers
    assert receiver.seen[0].headers["X-Geopush-Push-Id"] == "p-7f3a"


@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_any_2xx_is_sent(receiver: Receiver, signed: WebhookSender, status: int) -> None:
    receiver.replies.append((status, {}))
    assert (await signed.send(push())).outcome == "sent"


@pytest.mark.parametrize(("status", "headers", "wait"), [
    (429, {"Retry-After": "17"}, 17.0),
    (429, {"Retry-After": formatdate(NOW + 120, usegmt=True)}, 120.0),
    (429, {}, None),
    (503, {"Retry-After": "5"}, 5.0),
    (503, {}, None),
    (500, {"Retry-After": "soon"}, None),  # unreadable: as if absent
    (502, {}, None),
])
async def test_429_and_5xx_are_retried_after_retry_after(receiver: Receiver, signed: WebhookSender,
                                                         status: int, headers: dict[str, str],
                                                         wait: float | None) -> None:
    receiver.replies.append((status, headers))
    result = await signed.send(push())
    assert (result.outcome, result.code, result.retry_after_s) == ("retry", f"http_{status}", wait)
    assert not result.remove_token


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422])
async def test_other_4xx_fail(receiver: Receiver, signed: WebhookSender, status: int) -> None:
    receiver.replies.append((status, {"Retry-After": "5"}))
    result = await signed.send(push())
    assert (result.outcome, result.code, result.retry_after_s) == ("failed", f"http_{status}", None)
    assert len(receiver.seen) == 1


async def test_a_redirect_is_not_followed(receiver: Receiver, signed: WebhookSender) -> None:
    receiver.replies.append((302, {}))
    result = await signed.send(push())
    assert (result.outcome, result.code) == ("failed", "http_302")
    assert len(receiver.seen) == 1


def _unused_port() -> int:
    with socket.socket() as probe:  # bound, never listening, closed: nobody is there
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_refused_connection_is_retried() -> None:
    sender = WebhookSender(f"http://127.0.0.1:{_unused_port()}/hooks/push", timeout_s=TIMEOUT_S)
    try:
        result = await sender.send(push())
    finally:
        await sender.close()
    assert (result.outcome, result.code) == ("retry", "connection")
    assert PUSH_TOKEN not in result.message


async def test_a_timeout_is_retried(receiver: Receiver, signed: WebhookSender) -> None:
    receiver.hang = True
    started = time.monotonic()
    result = await signed.send(push())
    assert (result.outcome, result.code) == ("retry", "timeout")
    assert time.monotonic() - started < 2.0


async def test_a_dropped_connection_is_retried(receiver: Receiver, signed: WebhookSender) -> None:
    receiver.drop = True
    result = await signed.send(push())
    assert (result.outcome, result.code) == ("retry", "connection")


async def test_the_connection_is_kept_alive(receiver: Receiver, signed: WebhookSender) -> None:
    for _ in range(3):
        await signed.send(push())
    assert len({got.peer for got in receiver.seen}) == 1


def test_build_sender_makes_the_configured_webhook() -> None:
    settings = DeliverySettings(sender="webhook", webhook={"url": "https://hooks.example.com/push",
                                                           "secret": SECRET})
    sender = build_sender(settings)
    assert isinstance(sender, WebhookSender)
    assert sender.url == "https://hooks.example.com/push"


# -- Retry-After ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (None, None),
    ("", None),
    ("120", 120.0),
    ("  7 ", 7.0),
    ("0", 0.0),
    ("1.5", 1.5),
    ("-3", None),
    ("nan", None),
    ("inf", None),
    ("soon", None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", max(0.0, 1445412480.0 - NOW)),  # RFC 9110's example: past
    (formatdate(NOW + 90, usegmt=True), 90.0),  # IMF-fixdate
    (formatdate(NOW + 90), 90.0),  # "-0000": the obsolete form, UTC
    ("Sunday, 06-Nov-94 08:49:37 GMT", 0.0),  # RFC 850 form, long past
    ("Thu, 31 Dec 9999 23:59:59 GMT", 253402300799.0 - NOW),
    ("Thu, 32 Dec 2026 25:00:00 GMT", None),
])
def test_retry_after_is_seconds_or_an_http_date(value: str | None, expected: float | None) -> None:
    assert retry_after_s(value, now=NOW) == expected
