"""The `webhook` sender (contract §7): each push is POSTed as JSON to `delivery.webhook.url`, for
teams that send through their own push provider.

The request:

    POST <delivery.webhook.url>
    Content-Type: application/json
    X-Geopush-Push-Id: <push_id>          the same on every attempt: deduplicate on it
    X-Geopush-TTL: <seconds>              the TTL left, whole seconds (at least 1): do not show
                                          the push after that
    X-Geopush-Signature: sha256=<hex>     only when delivery.webhook.secret is set

    {"push_id", "device_id", "push_token", "platform", "title", "body", "data", "rule_id",
     "store_id", "geofence_id", "event", "created_at"}      created_at: RFC 3339 UTC

The signature is the lowercase hex HMAC-SHA256, keyed with the secret's UTF-8 bytes, of the
exact body bytes as received (before any JSON parsing). Verify it over the raw body with a
constant-time comparison, e.g. in Python:

    expected = "sha256=" + hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()
    hmac.compare_digest(expected, request.headers["X-Geopush-Signature"])

Answers: 2xx is sent; 429 and 5xx are retried, after Retry-After when given (seconds or an HTTP
date); no answer (refused, reset, timeout) is retried; any other status fails the push. Sending is
at least once: a retry after a lost answer sends the same push_id again.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable

import aiohttp
import orjson

from geopush.delivery.senders._http import (
    DEFAULT_POOL_LIMIT,
    DEFAULT_TIMEOUT_S,
    HttpPool,
    transport_failure,
)
from geopush.delivery.senders.base import OutgoingPush, SendResult
from geopush.delivery.senders.retry_after import retry_after_s
from geopush.timeutil import format_ts

SIGNATURE_HEADER = "X-Geopush-Signature"
PUSH_ID_HEADER = "X-Geopush-Push-Id"
TTL_HEADER = "X-Geopush-TTL"


def signature(secret: str, body: bytes) -> str:
    """The X-Geopush-Signature value of a body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def webhook_body(push: OutgoingPush) -> bytes:
    return orjson.dumps({
        "push_id": push.push_id,
        "device_id": push.device_id,
        "push_token": push.push_token,
        "platform": push.platform,
        "title": push.title,
        "body": push.body,
        "data": push.data,
        "rule_id": push.rule_id,
        "store_id": push.store_id,
        "geofence_id": push.geofence_id,
        "event": push.event,
        "created_at": format_ts(push.created_at),
    })


class WebhookSender:
    """POSTs each push to one URL."""

    name = "webhook"

    def __init__(self, url: str, *, secret: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 pool_limit: int = DEFAULT_POOL_LIMIT, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self._secret = secret or None  # an empty secret signs nothing anyone could check
        self._pool = HttpPool(limit=pool_limit, timeout_s=timeout_s)
        self._clock = clock

    async def send(self, push: OutgoingPush) -> SendResult:
        body = webhook_body(push)
        headers = {"Content-Type": "application/json",
                   PUSH_ID_HEADER: push.push_id,
                   TTL_HEADER: str(max(1, math.ceil(push.ttl_left_s)))}
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = signature(self._secret, body)
        try:
            async with self._pool.session().post(self.url, data=body, headers=headers,
                                                 allow_redirects=False) as response:
                status = response.status
                retry_after = response.headers.get("Retry-After")
                # read to the end, so the connection goes back to the pool for the next push
                await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return transport_failure(exc, push.push_token)
        return classify(status, retry_after, now=self._clock())

    async def close(self) -> None:
        await self._pool.close()


def classify(status: int, retry_after: str | None, *, now: float) -> SendResult:
    """What the receiver's answer means. Its body is not read into the result: a receiver may
    echo the push back, token and all, and results end up in logs."""
    if 200 <= status < 300:
        return SendResult("sent")
    if status == 429 or status >= 500:
        return SendResult("retry", code=f"http_{status}", message=f"webhook answered HTTP {status}",
                          retry_after_s=retry_after_s(retry_after, now=now))
    return SendResult("failed", code=f"http_{status}", message=f"webhook answered HTTP {status}")
