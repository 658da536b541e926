"""Ops endpoints of delivery (scope admin, contract §6 and §8): the stats marketers read, and
the controls ops reach for when a campaign goes wrong.

- `GET /v1/stats?from=&to=`: totals and per rule, with conversions and lift
  (geopush.delivery.stats), read from every device's records.
- `POST /v1/admin/marketing/pause` and `/resume`: every instance holds marketing pushes while
  paused (they stay queued within their ttl); service pushes go on.
- `POST /v1/admin/rules/{rule_id}/cancel`: a rule's queued pushes are cancelled (a kill
  switch), with a log line saying who.
- `POST /v1/admin/test-push`: one push to one device through the real sender, marked as a test:
  outside caps, the delivery report and the stats.
Each control leaves a JSON log line with the credential's name.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from typing import Any

from aiohttp import web

from geopush.api.appstate import AUTH, DELIVERY, SETTINGS, STATE
from geopush.api.errors import NotFound
from geopush.api.wire import json_response, read_json, type_name
from geopush.config_problems import PATTERN_MEANINGS
from geopush.delivery.outbox import OutboxEntry
from geopush.delivery.stats import DeviceFacts, StatsTally
from geopush.delivery.worker import MARKETING_PAUSED
from geopush.errors import InvalidInput, Problem
from geopush.logs import fields
from geopush.pings import DEVICE_ID, DEVICE_ID_EXPECTED
from geopush.rules.decide import ulid
from geopush.rules.schema import RULE_ID
from geopush.state.base import DeviceRecords
from geopush.timeutil import format_ts, parse_ts

log = logging.getLogger("geopush.api.ops")
RULE_ID_MEANING = PATTERN_MEANINGS[RULE_ID]  # as rule files are told
routes = web.RouteTableDef()

TEST_TTL_S = 600.0
MAX_TEST_TEXT = 256
MAX_BOUND_CHARS = 40  # from= and to=: longer is no time
CANCEL_SCAN = 100_000  # pending pushes looked at by one kill switch call
STATS_PAGE = 500  # devices read and counted between two turns of the event loop


@routes.get("/v1/stats")
async def stats(request: web.Request) -> web.Response:
    app = request.app
    app[AUTH].check(request, "admin")
    start = _bound(request, "from")
    end = _bound(request, "to")
    if start is not None and end is not None and end <= start:
        raise InvalidInput(f"to {format_ts(end)} is not after from {format_ts(start)}",
                           [Problem("query", "to is not after from", field="to",
                                    value=request.query["to"], expected="a time after `from`")])
    store = app[STATE]
    tally = StatsTally(window_s=app[SETTINGS].attribution.window, start=start, end=end)
    async for device_ids in store.device_ids(STATS_PAGE):
        for records in await store.records(device_ids):
            tally.add(_facts(records))
        # the memory store answers without waiting: without a turn of the loop here, pings
        # would wait for every device of the deployment to be counted (seconds at 100,000)
        await asyncio.sleep(0)
    return json_response(tally.answer())


def _bound(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    expected = "RFC 3339 (with an offset) or epoch milliseconds"
    try:
        if len(raw) > MAX_BOUND_CHARS:
            raise ValueError(f"{len(raw)} characters")
        # ASCII digits only: str.isdigit() takes any script's digits, and int() of them
        return parse_ts(int(raw) if raw.isascii() and raw.isdigit() else raw)
    except ValueError:
        shown = raw if len(raw) <= MAX_BOUND_CHARS else raw[:MAX_BOUND_CHARS] + "…"
        raise InvalidInput(f"{name} = {shown!r}: expected {expected}",
                           [Problem("query", f"{name} is not a time", field=name, value=shown,
                                    expected=expected)]) from None


def _facts(records: DeviceRecords) -> DeviceFacts:
    visits: list[tuple[str, float, float | None]] = [
        (v.store_id, v.start, v.end) for v in records.history.visits]
    visits += [(store_id, entered, None) for store_id, entered in records.stays]
    return DeviceFacts(records.device_id, records.history.pushes, records.decisions,
                       {e.push_id: e.state for e in records.outbox}, visits,
                       {e.push_id for e in records.outbox if e.test})


@routes.post("/v1/admin/marketing/pause")
async def pause_marketing(request: web.Request) -> web.Response:
    who = request.app[AUTH].check(request, "admin")
    await request.app[STATE].set_flag(MARKETING_PAUSED, who)
    log.warning("marketing_paused", extra=fields(credential=who))
    return json_response({"marketing": "paused", "by": who})


@routes.post("/v1/admin/marketing/resume")
async def resume_marketing(request: web.Request) -> web.Response:
    who = request.app[AUTH].check(request, "admin")
    await request.app[STATE].set_flag(MARKETING_PAUSED, None)
    log.warning("marketing_resumed", extra=fields(credential=who))
    return json_response({"marketing": "running", "by": who})


@routes.post("/v1/admin/rules/{rule_id}/cancel")
async def cancel_rule(request: web.Request) -> web.Response:
    app = request.app
    who = app[AUTH].check(request, "admin")
    rule_id = request.match_info["rule_id"]
    if len(rule_id) > 64 or not re.fullmatch(RULE_ID, rule_id):
        # a typo during an incident must not look like a kill switch that found nothing
        raise InvalidInput(f"rule_id {rule_id[:64]!r}: expected a rule id ({RULE_ID_MEANING})",
                           [Problem("path", "not a rule id", field="rule_id",
                                    value=rule_id[:64], expected=RULE_ID_MEANING)])
    store = app[STATE]
    now = time.time()
    devices = dict.fromkeys(d for _, d in await store.pending_pushes(CANCEL_SCAN))
    cancelled = 0
    for device_id in devices:
        cancelled += len(await store.cancel_pushes(
            device_id, rule_id=rule_id, reason=f"rule {rule_id} cancelled by {who}", now=now))
    log.warning("rule_pushes_cancelled", extra=fields(credential=who, rule_id=rule_id,
                                                      cancelled=cancelled))
    return json_response({"rule_id": rule_id, "cancelled": cancelled})


@routes.post("/v1/admin/test-push")
async def test_push(request: web.Request) -> web.Response:
    app = request.app
    who = app[AUTH].check(request, "admin")
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidInput(f"expected a JSON object {{device_id, title?, body?}}, got "
                           f"{type_name(body)}")
    device_id = body.get("device_id")
    if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
        raise InvalidInput(f"device_id {device_id!r}: expected {DEVICE_ID_EXPECTED}",
                           [Problem("body", "bad device_id", field="device_id", value=device_id,
                                    expected=DEVICE_ID_EXPECTED)])
    texts = {}
    for name, default in (("title", "geopush test"), ("body", "A test push from ops")):
        value = body.get(name, default)
        if not isinstance(value, str) or not 0 < len(value) <= MAX_TEST_TEXT:
            raise InvalidInput(f"{name}: expected text of 1 to {MAX_TEST_TEXT} characters",
                               [Problem("body", f"bad {name}", field=name, value=value,
                                        expected=f"text of 1 to {MAX_TEST_TEXT} characters")])
        texts[name] = value
    store = app[STATE]
    profile = await store.get_profile(device_id)
    if profile is None:
        raise NotFound(f"device {device_id!r} is not registered")
    now = time.time()
    push_id = _new_push_id(now)
    entry = OutboxEntry(push_id, device_id, "ops-test", "", "", "test", "service", "UTC",
                        texts["title"], texts["body"], {"test": "true"}, now, now + TEST_TTL_S,
                        next_attempt_at=now, updated_at=now, test=True)
    if not await store.put_push(entry):  # erased meanwhile
        raise NotFound(f"device {device_id!r} is not registered")
    app[DELIVERY].wake()
    log.warning("test_push_queued", extra=fields(credential=who, device_id=device_id,
                                                 push_id=push_id))
    answer: dict[str, Any] = {"push_id": push_id, "device_id": device_id, "state": "queued",
                              "push_token": bool(profile.push_token)}
    return json_response(answer, status=202)


def _new_push_id(now: float) -> str:
    """A ULID of now and 80 random bits (a test push answers no moment)."""
    return ulid(now, secrets.randbits(80))
