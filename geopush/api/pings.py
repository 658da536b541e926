"""Pings in, events out (contract §6): POST /v1/pings and the /v1/stream WebSocket.

Both run the same `ingest`: each ping is validated on its own (a bad one is rejected `invalid`
and the rest of the batch goes on), then the valid ones go through the state store's atomic
per-device `track` with the pure engine as the computation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from geopush.api.appstate import AUTH, LIVE, METRICS, SETTINGS, STATE, WEBSOCKETS
from geopush.api.errors import TooLarge, error_body
from geopush.api.wire import MAX_BODY_BYTES, json_response, parse_json, read_json, type_name
from geopush.engine import DeviceOutcome, DeviceSnapshot, Rejected
from geopush.errors import GeopushError, InvalidInput, Problem
from geopush.geo.transitions import Event, Ping
from geopush.logs import fields
from geopush.pings import PingError, parse_ping
from geopush.state.base import StateUnavailable
from geopush.timeutil import format_ts

log = logging.getLogger("geopush.api.pings")
routes = web.RouteTableDef()

WS_HEARTBEAT_S = 30.0  # ping frames keep NATs open and find dead phones
_SHAPE = 'a ping object {device_id, lat, lon, ts, …} or {"pings": [ping, …]}'


@dataclass(slots=True)
class IngestResult:
    accepted: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "rejected": [{"index": r.index, "code": r.code, "message": r.message}
                         for r in self.rejected],
            "events": [event_json(e) for e in self.events],
        }


def event_json(event: Event) -> dict[str, Any]:
    return {"device_id": event.device_id, "geofence_id": event.geofence_id,
            "store_id": event.store_id, "type": event.type, "ts": format_ts(event.ts)}


def ping_items(payload: Any, max_batch: int, *, allow_list: bool) -> list[Any]:
    """The ping objects of a request (or a stream message); raise naming what is wrong."""
    if isinstance(payload, dict) and "pings" in payload:
        extra = sorted(set(payload) - {"pings"})
        if extra:
            raise InvalidInput(
                f"unknown field {extra[0]!r} next to 'pings': expected {_SHAPE}",
                [Problem("body", "unknown field", field=extra[0], value=None, expected=_SHAPE)])
        items = payload["pings"]
        if not isinstance(items, list):
            raise InvalidInput(
                f"pings: expected a list of ping objects, got {type_name(items)}",
                [Problem("body", "pings is not a list", field="pings",
                         value=type_name(items), expected="a list of ping objects")])
    elif isinstance(payload, dict):
        items = [payload]
    elif allow_list and isinstance(payload, list):
        items = payload
    else:
        expected = _SHAPE + (" or a list of pings" if allow_list else "")
        raise InvalidInput(f"expected {expected}, got {type_name(payload)}",
                           [Problem("body", "wrong shape", value=type_name(payload),
                                    expected=expected)])
    if len(items) > max_batch:
        raise TooLarge(f"{len(items)} pings in one request: at most {max_batch} are allowed",
                       [Problem("body", "too many pings", field="pings", value=len(items),
                                expected=f"at most {max_batch} pings")])
    return items


async def ingest(app: web.Application, items: Sequence[Any], now: float) -> IngestResult:
    """Validate, then track; StateUnavailable propagates (503 for HTTP, an error answer on WS)."""
    result = IngestResult()
    valid: list[Ping] = []
    positions: list[int] = []
    for i, obj in enumerate(items):
        try:
            valid.append(parse_ping(obj, now=now))
            positions.append(i)
        except PingError as exc:
            result.rejected.append(Rejected(i, "invalid", exc.message))
    metrics = app[METRICS]
    if valid:
        engine = app[LIVE].engine
        devices = dict.fromkeys(p.device_id for p in valid)

        def compute(snapshots: Mapping[str, DeviceSnapshot]) -> Mapping[str, DeviceOutcome]:
            # the store may call again for only the devices that changed meanwhile
            if snapshots.keys() >= devices.keys():
                return engine.ingest(valid, snapshots, positions=positions)
            keep = [k for k, p in enumerate(valid) if p.device_id in snapshots]
            return engine.ingest([valid[k] for k in keep], snapshots,
                                 positions=[positions[k] for k in keep])

        try:
            outcomes = await app[STATE].track(devices.keys(), compute)
        except StateUnavailable:
            metrics.state_unavailable.labels("track").inc()
            raise
        for outcome in outcomes.values():
            result.accepted += outcome.accepted
            result.rejected.extend(outcome.rejected)
            result.events.extend(outcome.events)
        result.rejected.sort(key=lambda r: r.index)
        result.events.sort(key=lambda e: e.ts)
        metrics.count_events(result.events, "ping")
        if result.events and log.isEnabledFor(logging.DEBUG):
            for e in result.events:
                log.debug("event", extra=fields(device_id=e.device_id, type=e.type,
                                                geofence_id=e.geofence_id, ts=format_ts(e.ts),
                                                source="ping"))
    metrics.count_pings(result.accepted, result.rejected)
    return result


@routes.post("/v1/pings")
async def post_pings(request: web.Request) -> web.Response:
    app = request.app
    app[AUTH].check(request, "ingest")
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise TooLarge(f"request body of {length} bytes is larger than the limit of "
                       f"{MAX_BODY_BYTES} bytes (1 MiB)")
    items = ping_items(await read_json(request), app[SETTINGS].server.max_batch,
                       allow_list=False)
    result = await ingest(app, items, time.time())
    return json_response(result.as_json())


@routes.get("/v1/stream")
async def stream(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    app[AUTH].check(request, "ingest")
    ws = web.WebSocketResponse(heartbeat=WS_HEARTBEAT_S, max_msg_size=MAX_BODY_BYTES)
    if not ws.can_prepare(request).ok:
        raise InvalidInput("GET /v1/stream is a WebSocket: expected an upgrade request "
                           "(Connection: Upgrade, Upgrade: websocket)")
    await ws.prepare(request)
    sockets = app[WEBSOCKETS]
    metrics = app[METRICS]
    sockets.add(ws)
    metrics.websockets.inc()
    seq = 0
    try:
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                seq += 1
                answer = await _answer(app, message.data, seq)
            elif message.type is WSMsgType.BINARY:
                seq += 1
                answer = _error_answer(seq, InvalidInput(
                    "binary messages are not accepted: send a ping or a list of pings as a "
                    "JSON text message"))
            else:
                continue
            await ws.send_json(answer, dumps=_dumps)
    finally:
        sockets.discard(ws)
        metrics.websockets.dec()
    return ws


async def _answer(app: web.Application, text: str, seq: int) -> dict[str, Any]:
    try:
        items = ping_items(parse_json(text, "message"), app[SETTINGS].server.max_batch,
                           allow_list=True)
        result = await ingest(app, items, time.time())
    except GeopushError as exc:
        return _error_answer(seq, exc)
    except Exception:
        log.exception("stream_message_failed", extra=fields(seq=seq))
        return _error_answer(seq, GeopushError("internal error; it has been logged"),
                             code="internal")
    return {"seq": seq, **result.as_json()}


def _error_answer(seq: int, exc: GeopushError, code: str | None = None) -> dict[str, Any]:
    error = error_body(code or exc.code, exc.message, [p.as_dict() for p in exc.details])
    return {"seq": seq, "accepted": 0, "rejected": [], "events": [], **error}


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()
