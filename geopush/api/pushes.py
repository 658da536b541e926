"""The app reports that its user opened a push (contract §6): POST /v1/pushes/{push_id}/opened.

Fatigue reads opens (contract §4): an open ends a pause, and fatigue applies only to devices
that have ever reported one. A device token implies its device (and must still be the device's
current one); a server key with the `ingest` scope names it in the body. The answer says nothing
of another device: a push that is not the device's is 404 whether or not it exists elsewhere.
"""

from __future__ import annotations

import time

from aiohttp import web

from geopush.api.appstate import AUTH, METRICS, STATE
from geopush.api.auth import bearer
from geopush.api.errors import NotFound
from geopush.api.wire import json_response, read_json, type_name
from geopush.engine import REVOKED
from geopush.errors import InvalidInput, Problem, Unauthorized
from geopush.pings import DEVICE_ID, DEVICE_ID_EXPECTED
from geopush.rules.decide import is_push_id
from geopush.timeutil import format_ts
from geopush.tokens import looks_like_token

routes = web.RouteTableDef()

_PUSH_ID_EXPECTED = "a push_id: a ULID of 26 characters (0-9, A-Z without I, L, O, U)"


@routes.post("/v1/pushes/{push_id}/opened")
async def push_opened(request: web.Request) -> web.Response:
    app = request.app
    auth = app[AUTH]
    store = app[STATE]
    presented = _presented(request)
    if presented is not None and looks_like_token(presented):
        token = auth.credential(presented).token
        assert token is not None
        device_id = token.device_id
        stored = await store.stored_token(device_id)
        if stored is None or stored.nonce != token.nonce:
            raise Unauthorized(REVOKED)
    else:
        auth.check(request, "ingest")
        device_id = await _device_of(request)
    push_id = request.match_info["push_id"]
    if not is_push_id(push_id):
        raise InvalidInput(f"push_id = {push_id[:80]!r}: expected {_PUSH_ID_EXPECTED}",
                           [Problem("path", "bad push id", field="push_id",
                                    value=push_id[:200], expected=_PUSH_ID_EXPECTED)])
    now = time.time()
    opened_at = await store.record_open(device_id, push_id, now)
    if opened_at is None:
        raise NotFound(f"push {push_id} was not sent to this device (or is older than "
                       "retention.history)")
    if opened_at == now:  # an app reporting the same open again is not another open
        app[METRICS].opens.inc()
    return json_response({"push_id": push_id, "opened_at": format_ts(opened_at)})


def _presented(request: web.Request) -> str | None:
    try:
        return bearer(request)
    except Unauthorized:
        return None  # auth.check says why, or lets a keyless loopback server through


async def _device_of(request: web.Request) -> str:
    expected = '{"device_id": "..."}: a server key names the device whose user opened the push'
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidInput(f"expected a JSON object {{\"device_id\": ...}}, got {type_name(body)}",
                           [Problem("body", "wrong shape", field="device_id",
                                    value=type_name(body), expected=expected)])
    device_id = body.get("device_id")
    if not isinstance(device_id, str) or not DEVICE_ID.match(device_id):
        shown = device_id if isinstance(device_id, str) else repr(device_id)
        raise InvalidInput(f"device_id = {str(shown)[:80]!r}: expected {DEVICE_ID_EXPECTED}",
                           [Problem("body", "bad device id", field="device_id",
                                    value=str(shown)[:200], expected=expected)])
    return device_id
