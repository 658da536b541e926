"""The location apps teams already ship (contract §13): OwnTracks, Traccar Client / the
transistorsoft SDK, OsmAnd. Each payload is mapped onto §6's ping (geopush.clients) and goes
through the same Ingestor as `POST /v1/pings`: same validation, consent, device tokens and
limits.

Answers follow the apps' conventions, not the API's: these apps retry anything but a 2xx
forever and their queues stall behind it, so a request whose pings were rejected is still a
200 (the rejections are counted in `geopush_pings_rejected` and logged as
`client_pings_rejected`); 401/403 for credentials, 413 over the batch limit, 503 only when
nothing was committed. Phones send their own device token, never a server key: OwnTracks as
HTTP Basic auth (user = device id, password = token), Traccar Client and the SDK as a Bearer
header, OsmAnd as a Bearer header or, when `auth.query_tokens` allows it, a `key` parameter.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections import Counter

from aiohttp import web

from geopush.api.appstate import AUTH, INGESTOR, SETTINGS
from geopush.api.auth import Credential
from geopush.api.errors import TooLarge
from geopush.api.pings import raise_if_limited
from geopush.api.wire import MAX_BODY_BYTES, check_json_content_type, json_response, parse_json
from geopush.clients import Mapped, osmand, owntracks, traccar
from geopush.errors import Forbidden, GeopushError, InvalidInput, Problem, Unauthorized
from geopush.logs import fields
from geopush.pings import PingError
from geopush.service.ingest import IngestResult

log = logging.getLogger("geopush.api.clients")
routes = web.RouteTableDef()


class EncryptedPayload(GeopushError):
    code = "unsupported_payload"
    http_status = 422


class BasicUnauthorized(Unauthorized):
    challenge = 'Basic realm="geopush"'  # OwnTracks asks the user for a password on this


# -- OwnTracks ---------------------------------------------------------------------------------


@routes.post("/v1/clients/owntracks")
async def owntracks_http(request: web.Request) -> web.Response:
    credential = _basic_device_token(request)
    device_id = credential.device_id
    assert device_id is not None  # a device token's
    body = await _body(request)
    if not body.strip():
        return json_response([])  # sent when a friend is deleted: nothing to do
    check_json_content_type(request)
    try:
        items = owntracks.location(parse_json(body), device_id)
    except owntracks.Encrypted as exc:
        raise EncryptedPayload(str(exc)) from None
    if items:
        await _ingest(request, "owntracks", items, credential)
    return json_response([])  # the app reads a JSON array of messages for it: none


def _basic_device_token(request: web.Request) -> Credential:
    """HTTP Basic auth whose password is the device token of the user's device id. A device
    id may hold ':', so the split is the one whose password is a token of that very id."""
    header = request.headers.get("Authorization", "")
    kind, _, encoded = header.partition(" ")
    if kind.lower() != "basic" or not encoded.strip():
        raise BasicUnauthorized("expected HTTP Basic auth: user = the device id, password = "
                                "its device token (POST /v1/devices/{id}/token)")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise BasicUnauthorized("Authorization: Basic credentials are not base64 of "
                                "user:password") from None
    auth = request.app[AUTH]
    refusal: Unauthorized | None = None
    start = 0
    while (colon := decoded.find(":", start)) != -1:
        user, password = decoded[:colon], decoded[colon + 1:]
        start = colon + 1
        try:
            credential = auth.credential(password, server_keys=False)
        except Unauthorized as exc:
            refusal = exc
            continue
        if credential.device_id == user:
            return credential
        raise Forbidden(f"the device token is not the one of user {user[:128]!r}: OwnTracks' "
                        "user must be the device id the token was issued to")
    raise BasicUnauthorized(refusal.message if refusal is not None
                            else "Basic auth: expected user:password") from None


# -- Traccar Client ≥ 9 and the transistorsoft SDK --------------------------------------------


@routes.post("/v1/clients/traccar")
async def traccar_json(request: web.Request) -> web.Response:
    credential = request.app[AUTH].ping_credential(request)
    body = await _body(request)
    check_json_content_type(request)
    try:
        locations, claimed = traccar.locations(parse_json(body))
    except PingError as exc:
        raise InvalidInput(exc.message, [Problem("body", exc.message, field=exc.field,
                                                 expected=exc.expected)]) from None
    _at_most(request, len(locations))
    if claimed is not None and not isinstance(claimed, str):
        raise InvalidInput(f"device_id = {claimed!r}: expected a string",
                           [Problem("body", "device_id is not a string", field="device_id",
                                    value=repr(claimed)[:200], expected="a device id")])
    device_id = claimed or credential.device_id
    if device_id is None:
        raise InvalidInput("device_id missing: send it in the body, or use the device's token",
                           [Problem("body", "no device id", field="device_id", value=None,
                                    expected="a device id, or a device token")])
    items = [traccar.ping(location, device_id) for location in locations]
    result = await _ingest(request, "traccar", items, credential)
    return json_response(result.as_json())


# -- OsmAnd / Traccar's query protocol ----------------------------------------------------------


@routes.get("/v1/clients/osmand")
@routes.post("/v1/clients/osmand")
async def osmand_query(request: web.Request) -> web.Response:
    params: dict[str, str] = dict(request.query)
    if request.method == "POST" and request.can_read_body:
        await _body(request)  # bounded read before the form is parsed
        form = await request.post()
        params.update({k: v for k, v in form.items() if isinstance(v, str)})
    credential = _osmand_token(request, params)
    device_id = credential.device_id
    assert device_id is not None
    claimed = osmand.device_of(params)
    # the id parameter must name the token's device; a forged one is refused like any
    # other device's ping, before anything is read
    item: Mapped = osmand.ping(params, device_id)
    if claimed is not None and claimed != device_id and isinstance(item, dict):
        item["device_id"] = claimed
    result = await _ingest(request, "osmand", [item], credential)
    return json_response(result.as_json())


def _osmand_token(request: web.Request, params: dict[str, str]) -> Credential:
    """Never keyless: a GET that any web page could make with an image tag must carry a
    device token (Bearer; or `key` when auth.query_tokens: query strings end up in logs)."""
    auth = request.app[AUTH]
    key = params.pop("key", None)
    if "Authorization" in request.headers:
        return auth.ping_credential(request, server_keys=False)
    if key is not None:
        if not request.app[SETTINGS].auth.query_tokens:
            raise Unauthorized("a token in the query string is refused (auth.query_tokens is "
                               "off: query strings end up in proxy logs); send "
                               "'Authorization: Bearer <device token>'")
        return auth.credential(key, server_keys=False)
    raise Unauthorized("this endpoint needs the device's token: 'Authorization: Bearer "
                       "<device token>' (or key=<token> where auth.query_tokens allows it)")


# -- shared ------------------------------------------------------------------------------------


async def _body(request: web.Request) -> bytes:
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise TooLarge(f"request body of {length} bytes is larger than the limit of "
                       f"{MAX_BODY_BYTES} bytes (1 MiB)")
    return await request.read()


def _at_most(request: web.Request, count: int) -> None:
    limit = request.app[SETTINGS].server.max_batch
    if count > limit:
        raise TooLarge(f"{count} locations in one request: at most {limit} are allowed",
                       [Problem("body", "too many locations", field="location", value=count,
                                expected=f"at most {limit} locations")])


async def _ingest(request: web.Request, client: str, items: list[Mapped],
                  credential: Credential) -> IngestResult:
    raise_if_limited(request.app, credential)
    result = await request.app[INGESTOR].ingest(items, time.time(), credential.identity,
                                                token=credential.token)
    if result.rejected:
        # the app is told 200 (else it retries forever): the log and the metrics say why
        codes = Counter(r.code for r in result.rejected)
        log.info("client_pings_rejected", extra=fields(
            client=client, device_id=credential.device_id, accepted=result.accepted,
            rejected=dict(codes), first=_without_ids(result.rejected[0].message, items)))
    return result



def _without_ids(message: str, items: list[Mapped]) -> str:
    """A rejection's message for the log: device ids appear in logs only pseudonymised (the
    `device_id` field), so the ids a message may quote are cut out of it."""
    for item in items:
        device_id = item.get("device_id") if isinstance(item, dict) else None
        if isinstance(device_id, str) and device_id:
            message = message.replace(device_id, "<device>")
    return message[:200]
