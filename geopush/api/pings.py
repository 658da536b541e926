"""Pings in, events out (contract §6): POST /v1/pings and the /v1/stream WebSocket.

Both check the shape of what came in, then hand the ping objects to the app's Ingestor
(geopush.service.ingest), which validates each ping and runs the valid ones through the engine.
The credential (geopush.api.auth.Authenticator.ping_credential) is a server key with the
`ingest` or `relay` scope, or a device token, which binds every ping to its own device; the
stream checks it once, at the upgrade, and each message's pings against it.
"""

from __future__ import annotations

import logging
import time
from contextlib import suppress
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from geopush.api.appstate import AUTH, INGESTOR, LIMITER, METRICS, SETTINGS, WEBSOCKETS
from geopush.api.auth import Credential
from geopush.api.errors import TooLarge, TooManyRequests, error_body
from geopush.api.wire import MAX_BODY_BYTES, json_response, parse_json, read_json, type_name
from geopush.errors import GeopushError, InvalidInput, Problem, Unauthorized
from geopush.logs import fields
from geopush.service.limits import retry_after_s

log = logging.getLogger("geopush.api.pings")
routes = web.RouteTableDef()

WS_HEARTBEAT_S = 30.0  # ping frames keep NATs open and find dead phones
_INTERNAL = "internal error; it has been logged"
_SHAPE = 'a ping object {device_id, lat, lon, ts, …} or {"pings": [ping, …]}'


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


@routes.post("/v1/pings")
async def post_pings(request: web.Request) -> web.Response:
    app = request.app
    credential = app[AUTH].ping_credential(request)
    raise_if_limited(app, credential)
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise TooLarge(f"request body of {length} bytes is larger than the limit of "
                       f"{MAX_BODY_BYTES} bytes (1 MiB)")
    items = ping_items(await read_json(request), app[SETTINGS].server.max_batch,
                       allow_list=False)
    result = await app[INGESTOR].ingest(items, time.time(), credential.identity,
                                        token=credential.token)
    return json_response(result.as_json())


@routes.get("/v1/stream")
async def stream(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    credential = app[AUTH].ping_credential(request)  # 401 / 403 before the upgrade
    raise_if_limited(app, credential)
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
            revoked = False
            if message.type is WSMsgType.TEXT:
                seq += 1
                limited = _limited_answer(app, credential, seq)
                if limited is not None:
                    answer = limited
                else:
                    answer, revoked = await _answer(app, message.data, seq, credential)
            elif message.type is WSMsgType.BINARY:
                seq += 1
                answer = _limited_answer(app, credential, seq) or _error_answer(seq, InvalidInput(
                    "binary messages are not accepted: send a ping or a list of pings as a "
                    "JSON text message"))
            else:
                continue
            try:
                await ws.send_json(answer, dumps=_dumps)
            except ConnectionResetError:
                break  # the phone went away mid-answer: nothing left to tell it
            if revoked:
                # the answer said why; nothing this socket sends will be accepted any more
                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"device token revoked")
                break
    except Exception:
        # After the upgrade the connection speaks WebSocket: an exception left to the error
        # middleware would become an HTTP 500 written into the stream. Say it in a message
        # the client can read, then close.
        log.exception("stream_failed", extra=fields(seq=seq))
        with suppress(Exception):
            await ws.send_json(_error_answer(seq, GeopushError(_INTERNAL), code="internal"),
                               dumps=_dumps)
        with suppress(Exception):
            await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"internal error")
    finally:
        sockets.discard(ws)
        metrics.websockets.dec()
    return ws


async def _answer(app: web.Application, text: str, seq: int, credential: Credential
                  ) -> tuple[dict[str, Any], bool]:
    """The answer to one message, and whether the socket's device token turned out revoked;
    never raises (an unexpected error is an `internal` one)."""
    try:
        items = ping_items(parse_json(text, "message"), app[SETTINGS].server.max_batch,
                           allow_list=True)
        result = await app[INGESTOR].ingest(items, time.time(), credential.identity,
                                            token=credential.token)
        # inside the try: an answer that cannot be written is an error answer too
        return {"seq": seq, **result.as_json()}, False
    except Unauthorized as exc:
        return _error_answer(seq, exc), True
    except GeopushError as exc:
        return _error_answer(seq, exc), False
    except Exception:
        log.exception("stream_message_failed", extra=fields(seq=seq))
        return _error_answer(seq, GeopushError(_INTERNAL), code="internal"), False


def _error_answer(seq: int, exc: GeopushError, code: str | None = None) -> dict[str, Any]:
    error = error_body(code or exc.code, exc.message, [p.as_dict() for p in exc.details])
    return {"seq": seq, "accepted": 0, "rejected": [], "events": [], **error}


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def _over_limit(app: web.Application, credential: Credential) -> TooManyRequests | None:
    """limits.key_requests_per_second, per credential: a request, or a stream message."""
    limiter = app[LIMITER]
    if not limiter.enabled:
        return None
    wait = limiter.admit(credential.identity, time.monotonic())
    if not wait:
        return None
    retry = retry_after_s(wait)
    return TooManyRequests(
        f"more than {limiter.per_second:g} requests a second with this credential "
        f"(limits.key_requests_per_second; a stream message is a request): retry after "
        f"{retry} s", retry,
        [Problem("limits.key_requests_per_second", "too many requests", field="retry_after_s",
                 value=retry, expected=f"at most {limiter.per_second:g} requests a second")])


def raise_if_limited(app: web.Application, credential: Credential) -> None:
    limited = _over_limit(app, credential)
    if limited is not None:
        raise limited


def _limited_answer(app: web.Application, credential: Credential, seq: int
                    ) -> dict[str, Any] | None:
    """The stream's error answer to a message over the limit; the stream stays open."""
    limited = _over_limit(app, credential)
    return None if limited is None else _error_answer(seq, limited)
