"""GET /openapi.json: the OpenAPI 3.1 description of the HTTP API (contract §6).

Written by hand next to the handlers it describes; the device body schemas come from the
pydantic models the handlers validate with, so they cannot drift. tests/test_openapi_fuzz.py
runs schemathesis against the real app with it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import orjson
from aiohttp import web

import geopush
from geopush.api.wire import JSON
from geopush.devices import Consent, DeviceUpdate
from geopush.geo.model import ACTIVITIES
from geopush.metrics import REJECT_CODES
from geopush.pings import DEVICE_ID_SCHEMA
from geopush.rules.decide import REASONS
from geopush.timeutil import END_EPOCH_MS, MIN_EPOCH_MS

routes = web.RouteTableDef()

MAX_PINGS = 1000


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response = _json(_ref("Error"), description)
    if headers:
        response["headers"] = headers
    return response


_PUSH_ID = {"type": "string", "pattern": "^[0-7][0-9A-HJKMNP-TV-Z]{25}$",
            "description": "a ULID (26 characters: fits the 64-byte APNs collapse id)"}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying",
                                "schema": {"type": "string", "pattern": "^[0-9]+$"}}}

_GROUPS = {"type": "object", "required": ["push", "holdout"],
           "properties": {"push": {"type": ["number", "null"]},
                          "holdout": {"type": ["number", "null"]}}}
_STATS_BLOCK = {
    "type": "object",
    "required": ["decided", "holdout", "sent", "failed", "expired", "cancelled", "queued",
                 "suppressed", "opened", "conversions", "conversion_rate", "lift"],
    "properties": {
        **{name: {"type": "integer", "minimum": 0} for name in (
            "decided", "holdout", "sent", "failed", "expired", "cancelled", "queued", "opened")},
        "suppressed": {"type": "object", "additionalProperties": {"type": "integer"}},
        "conversions": _GROUPS, "conversion_rate": _GROUPS,
        "lift": {"type": "object", "required": ["value", "ci95"],
                 "properties": {"value": {"type": ["number", "null"]},
                                "ci95": {"type": ["array", "null"],
                                         "items": {"type": "number"}}}}}}
_CONTROL = {"type": "object", "required": ["marketing", "by"],
            "properties": {"marketing": {"enum": ["paused", "running"]},
                           "by": {"type": "string"}}}

_RESPONSES = {
    "BadRequest": _error("The body or a parameter is not what was expected; the message names "
                         "the field, the value and what was expected"),
    "Unauthorized": _error("No API key, or an unknown one; a device token that is not valid, or "
                           "(ping endpoints) was revoked"),
    "Forbidden": _error("The key does not have the scope this endpoint needs; a device token "
                        "outside its device's pings and stream; with auth.device_tokens: "
                        "required, a key without the relay scope on a ping endpoint; a device "
                        "token's request of only other devices' pings"),
    "NotFound": _error("No such device (or path)"),
    "TooLarge": _error(f"Body over 1 MiB, or more than {MAX_PINGS} pings"),
    "UnsupportedMediaType": _error("The body is not declared Content-Type: application/json"),
    "Unavailable": _error("The state store is unreachable; retry after Retry-After seconds",
                          _RETRY_AFTER),
    "NotConfigured": _error("Device tokens are off: auth.device_token_secret is empty"),
    "TooManyRequests": _error("Over limits.key_requests_per_second for this credential (a "
                              "stream message counts as a request); retry after Retry-After "
                              "seconds", _RETRY_AFTER),
    "Unprocessable": _error("The new stores have errors (every one in details, with file:line, "
                            "feature, field and value); the previous stores stay active"),
}


def _responses(ok: dict[str, Any], *extra: str) -> dict[str, Any]:
    """ok + the error responses every authenticated endpoint may give, + `extra` ones."""
    out: dict[str, Any] = dict(ok)
    names = {"400": "BadRequest", "401": "Unauthorized", "403": "Forbidden",
             "404": "NotFound", "413": "TooLarge", "415": "UnsupportedMediaType",
             "429": "TooManyRequests", "503": "Unavailable"}
    for status in ("400", "401", "403", *extra, "413", "503"):
        out[status] = {"$ref": f"#/components/responses/{names[status]}"}
    return out


def _pydantic_schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (DeviceUpdate, Consent):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def _schemas() -> dict[str, Any]:
    nullable_number = {"type": ["number", "null"], "minimum": 0}
    timestamp = {"type": "string", "format": "date-time"}
    nullable_time = {"type": ["string", "null"], "format": "date-time"}
    push_id = _PUSH_ID
    device_id = {"type": "string", "pattern": DEVICE_ID_SCHEMA}
    problem = {
        "type": "object",
        "required": ["where", "message"],
        "properties": {
            "where": {"type": "string"}, "message": {"type": "string"},
            "field": {"type": ["string", "null"]}, "value": {},
            "expected": {"type": ["string", "null"]},
            "severity": {"type": "string", "enum": ["error", "warning"]},
        },
    }
    error_object = {
        "type": "object",
        "required": ["code", "message", "details"],
        "properties": {
            "code": {"type": "string"},
            "message": {"type": "string"},
            "details": {"type": "array", "items": _ref("Problem")},
        },
    }
    ping = {
        "type": "object",
        "required": ["device_id", "lat", "lon", "ts"],
        "additionalProperties": False,
        "properties": {
            "device_id": device_id,
            "lat": {"type": "number", "minimum": -90, "maximum": 90},
            "lon": {"type": "number", "minimum": -180, "maximum": 180},
            "ts": {"description": "RFC 3339 with offset (YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)), "
                                  "or epoch milliseconds; from 2000-01-01 to 9999-12-31 UTC "
                                  "and at most 5 min after the server's clock",
                   "anyOf": [timestamp, {"type": "number", "minimum": MIN_EPOCH_MS,
                                         "exclusiveMaximum": END_EPOCH_MS}]},
            "accuracy_m": nullable_number,
            "speed_mps": nullable_number,
            "heading_deg": {"type": ["number", "null"], "minimum": 0, "maximum": 360},
            "altitude_m": {"type": ["number", "null"]},
            "activity": {"enum": [*sorted(ACTIVITIES), None]},
        },
    }
    ingest_result = {
        "type": "object",
        "required": ["accepted", "rejected", "events"],
        "properties": {
            "accepted": {"type": "integer", "minimum": 0},
            "rejected": {"type": "array", "items": _ref("Rejection"),
                         "description": "In order of index"},
            "events": {"type": "array", "items": _ref("Event"), "description": "In time order"},
        },
    }
    profile = {
        "type": "object",
        "required": ["device_id", "consent", "attributes", "segments"],
        "properties": {
            "device_id": device_id,
            "push_token": {"type": ["string", "null"]},
            "platform": {"enum": ["android", "ios", "web", None]},
            "locale": {"type": ["string", "null"]},
            "timezone": {"type": ["string", "null"]},
            "attributes": {"type": "object"},
            "segments": {"type": "array", "items": {"type": "string"}},
            "consent": _ref("Consent"),
            "created_at": {"type": ["string", "null"], "format": "date-time"},
            "updated_at": {"type": ["string", "null"], "format": "date-time"},
        },
    }
    export = {
        "type": "object",
        "required": ["device_id", "profile", "consent_history", "visits", "tracking",
                     "device_token", "decisions", "pushes"],
        "properties": {
            "device_id": device_id,
            "profile": _ref("DeviceProfile"),
            "consent_history": {"type": "array", "items": {
                "type": "object", "required": ["at", "location", "marketing", "source"],
                "properties": {"at": timestamp, "location": {"type": "boolean"},
                               "marketing": {"type": "boolean"}, "source": {"type": "string"}},
            }},
            "visits": {"type": "array", "items": {
                "type": "object", "required": ["store_id", "geofence_id", "start", "end"],
                "properties": {"store_id": {"type": "string"}, "geofence_id": {"type": "string"},
                               "start": timestamp, "end": timestamp},
            }},
            "device_token": {
                "type": ["object", "null"], "required": ["issued_at", "fingerprint"],
                "description": "The device's current device token, null when it has none. Not "
                               "the token: when it was issued, and the first 16 hex digits of "
                               "the SHA-256 of its nonce (the token's third part)",
                "properties": {"issued_at": timestamp,
                               "fingerprint": {"type": "string", "pattern": "^[0-9a-f]{16}$"}}},
            "tracking": {"type": "object", "required": [
                "last_ping", "stays", "recent_pings", "next_due", "timer_due", "record_version",
                "rate_bucket_empty_at"],
                "properties": {
                "last_ping": nullable_time,
                "stays": {"type": "array", "items": {
                    "type": "object",
                    "required": ["geofence_id", "store_id", "entered", "last_seen", "lat", "lon",
                                 "distance_m", "speed_mps", "dwells_fired_s"],
                    "properties": {
                        "geofence_id": {"type": "string"}, "store_id": {"type": "string"},
                        "entered": timestamp, "last_seen": timestamp,
                        "lat": {"type": "number"}, "lon": {"type": "number"},
                        "distance_m": {"type": "number"},
                        "speed_mps": {"type": ["number", "null"]},
                        "dwells_fired_s": {"type": "array", "items": {"type": "number"}}}}},
                "recent_pings": {"type": "array", "items": {
                    "type": "object", "required": ["ts", "lat", "lon"],
                    "properties": {"ts": timestamp, "lat": {"type": "number"},
                                   "lon": {"type": "number"}}}},
                "next_due": nullable_time,
                "timer_due": nullable_time,
                "record_version": {"type": ["integer", "null"]},
                "rate_bucket_empty_at": nullable_time,
            }},
            "decisions": {"type": "array", "description": "The latest decisions, oldest "
                          "first: every candidate rule of a moment, with the policy step that "
                          "stopped it", "items": {
                "type": "object",
                "required": ["ts", "device_id", "geofence_id", "store_id", "event", "rule_id",
                             "outcome", "reason", "title", "body", "push_id"],
                "properties": {
                    "ts": timestamp, "device_id": device_id,
                    "geofence_id": {"type": "string"}, "store_id": {"type": "string"},
                    "event": {"type": "string", "enum": ["enter", "dwell", "exit"]},
                    "rule_id": {"type": "string"},
                    "outcome": {"type": "string", "enum": ["push", "suppressed", "holdout"]},
                    "reason": {"type": ["string", "null"], "enum": [*REASONS, None]},
                    "title": {"type": ["string", "null"]}, "body": {"type": ["string", "null"]},
                    "push_id": {"type": ["string", "null"]}}}},
            "pushes": {"type": "array", "description": "Pushes and holdouts decided (what "
                       "caps, gaps and fatigue count), within retention.history", "items": {
                "type": "object",
                "required": ["push_id", "ts", "rule_id", "store_id", "category", "outcome",
                             "opened_at"],
                "properties": {
                    "push_id": push_id, "ts": timestamp, "rule_id": {"type": "string"},
                    "store_id": {"type": "string"},
                    "category": {"type": "string", "enum": ["marketing", "service"]},
                    "outcome": {"type": "string", "enum": ["push", "holdout"]},
                    "opened_at": nullable_time}}},
        },
    }
    return {
        "Problem": problem,
        "Error": {"type": "object", "required": ["error"],
                  "properties": {"error": error_object}},
        "Ping": ping,
        "PingBatch": {
            "type": "object", "required": ["pings"], "additionalProperties": False,
            "properties": {"pings": {"type": "array", "maxItems": MAX_PINGS,
                                     "items": _ref("Ping")}},
        },
        "Rejection": {
            "type": "object", "required": ["index", "code", "message"],
            "properties": {
                "index": {"type": "integer", "minimum": 0},
                "code": {"type": "string", "enum": list(REJECT_CODES)},
                "message": {"type": "string"},
            },
        },
        "Event": {
            "type": "object", "required": ["device_id", "geofence_id", "store_id", "type", "ts"],
            "properties": {
                "device_id": device_id, "geofence_id": {"type": "string"},
                "store_id": {"type": "string"},
                "type": {"type": "string", "enum": ["enter", "dwell", "exit"]},
                "ts": timestamp,
            },
        },
        "IngestResult": ingest_result,
        "StreamAnswer": {
            "description": "Answer to the n-th message of /v1/stream; `error` when the message "
                           "as a whole was refused (not JSON, wrong shape, state unavailable)",
            "allOf": [ingest_result],
            "properties": {"seq": {"type": "integer", "minimum": 1},
                           "error": error_object},
            "required": ["seq"],
        },
        "DeviceProfile": profile,
        "DeviceExport": export,
        **_pydantic_schemas(),
    }


def _operations() -> dict[str, Any]:
    device_param = {"name": "device_id", "in": "path", "required": True,
                    "schema": {"type": "string", "pattern": DEVICE_ID_SCHEMA}}
    pings = [{"bearer": ["ingest"]}, {"bearer": ["relay"]}, {"deviceToken": []}]
    devices = [{"bearer": ["devices"]}]
    update_body = {"required": True, "content": {JSON: {"schema": _ref("DeviceUpdate")}}}
    profile_ok = {"200": _json(_ref("DeviceProfile"), "The stored profile")}
    return {
        "/v1/pings": {"post": {
            "operationId": "postPings",
            "summary": "Ingest one ping or a batch",
            "description": "Each ping is validated on its own: a bad ping is rejected "
                           "`invalid` with a message naming the field, the rest is processed. "
                           "Pings of unknown devices or devices without location consent are "
                           "rejected `no_consent` and not stored. Under a device token, pings "
                           "for another device are rejected `forbidden` (all of them: 403), and "
                           "so are the device's own when the token was revoked (nothing "
                           "accepted: 401).",
            "security": pings,
            "requestBody": {"required": True, "content": {JSON: {"schema": {
                "oneOf": [_ref("Ping"), _ref("PingBatch")]}}}},
            "responses": _responses({"200": _json(_ref("IngestResult"), "What was done")},
                                    "415", "429"),
        }},
        "/v1/stream": {"get": {
            "operationId": "stream",
            "summary": "WebSocket stream of pings",
            "description": "Upgrade to a WebSocket. Each text message is a ping, a list of "
                           "pings or {\"pings\": [...]}; each is answered, in order, with a "
                           "StreamAnswer. A bad message, or one over "
                           "limits.key_requests_per_second (error code `rate_limited`), gets an "
                           "answer with `error` and the socket stays open. Closed with 1001 when "
                           "the server shuts down. A "
                           "device token is checked at the upgrade and binds every message's "
                           "pings to its device; once it turns out revoked, the message's "
                           "answer carries the error and the socket is closed with 1008.",
            "security": pings,
            "responses": {
                "101": {"description": "Switching to the WebSocket protocol; messages are "
                                       "answered with StreamAnswer",
                        "content": {JSON: {"schema": _ref("StreamAnswer")}}},
                **{k: v for k, v in _responses({}, "429").items() if k not in ("413",)},
            },
        }},
        "/v1/clients/owntracks": {"post": {
            "operationId": "postOwnTracks",
            "summary": "OwnTracks (iOS, Android) in HTTP mode",
            "description": "A message of the OwnTracks app as it posts it: `_type: location` "
                           "(`tst` s, `acc` m, `vel` km/h, `cog`, `alt`) is a ping of the "
                           "device named by Basic auth's user; other types and empty bodies "
                           "are ignored. Answered `[]` (200) even when the ping is rejected; "
                           "`_type: encrypted` is 422.",
            "security": [{"basicDeviceToken": []}],
            "requestBody": {"required": False, "content": {JSON: {"schema": {
                "type": "object", "properties": {"_type": {"type": "string"}}}}}},
            "responses": {**_responses({"200": _json({"type": "array", "maxItems": 0},
                                                     "Nothing for the app")}, "415"),
                          "422": {"$ref": "#/components/responses/BadRequest"}},
        }},
        "/v1/clients/traccar": {"post": {
            "operationId": "postTraccar",
            "summary": "Traccar Client ≥ 9 and the transistorsoft background-geolocation SDK",
            "description": "`{\"location\": {...} | [...], \"device_id\"?}` with "
                           "`timestamp` ISO 8601 and `coords.latitude/longitude/accuracy/"
                           "speed/heading/altitude` (-1: unknown), `activity.type`. 200 with "
                           "what was done, even when locations are rejected.",
            "security": [{"deviceToken": []}, {"bearer": ["ingest"]}, {"bearer": ["relay"]}],
            "requestBody": {"required": True, "content": {JSON: {"schema": {
                "type": "object", "required": ["location"],
                "properties": {"location": {"oneOf": [{"type": "object"},
                                                      {"type": "array",
                                                       "items": {"type": "object"}}]},
                               "device_id": {"type": "string"}}}}}},
            "responses": _responses({"200": _json(_ref("IngestResult"), "What was done")},
                                    "415"),
        }},
        "/v1/clients/osmand": {
            "parameters": [
                {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
                for name in ("id", "deviceid", "lat", "lon", "timestamp", "speed", "accuracy",
                             "hdop", "bearing", "altitude", "batt", "valid", "key")],
            **{method: {
                "operationId": f"{method}OsmAnd",
                "summary": "OsmAnd / Traccar's query protocol (one location per request)",
                "description": "Query parameters (or a form): `timestamp` epoch seconds, "
                               "milliseconds or ISO 8601, `speed` knots, `accuracy` m (else "
                               "`hdop` × 5 m). Always needs the device's token: Bearer, or "
                               "`key` where auth.query_tokens allows it. 200 with what was "
                               "done, even when the location is rejected.",
                "security": [{"deviceToken": []}],
                "responses": _responses({"200": _json(_ref("IngestResult"), "What was done")}),
            } for method in ("get", "post")},
        },
        "/v1/devices/{device_id}": {
            "parameters": [device_param],
            "put": {"operationId": "putDevice", "summary": "Register or replace a device",
                    "description": "Fields left out take their defaults; consent left out "
                                   "means no consent. A consent change is recorded with its "
                                   "time and takes effect at once.",
                    "security": devices, "requestBody": update_body,
                    "responses": _responses(profile_ok, "404", "415")},
            "patch": {"operationId": "patchDevice", "summary": "Update the given fields",
                      "description": "Only the fields given change; in `consent`, only the "
                                     "consents given change.",
                      "security": devices, "requestBody": update_body,
                      "responses": _responses(profile_ok, "404", "415")},
            "get": {"operationId": "getDevice", "summary": "The stored profile",
                    "security": devices, "responses": _responses(profile_ok, "404")},
            "delete": {"operationId": "deleteDevice",
                       "summary": "Erase everything about the device",
                       "description": "Only an erasure record stays: a keyed hash of the id, "
                                      "the time and the last consent.",
                       "security": devices,
                       "responses": _responses({"204": {"description": "Erased"}}, "404")},
        },
        "/v1/devices/{device_id}/token": {
            "parameters": [device_param],
            "post": {"operationId": "issueDeviceToken",
                     "summary": "Issue the device's device token, revoking the one before",
                     "description": "The token speaks for this device's pings, stream and "
                                    "opens only; hand it to the app (after you authenticated "
                                    "its user) in place of a server key. A new token revokes "
                                    "the previous one; PUT and PATCH of the profile do not.",
                     "security": devices,
                     "responses": {
                         **_responses({"200": _json(
                             {"type": "object", "required": ["token"],
                              "properties": {"token": {
                                  "type": "string",
                                  "description": "gpd1.<device_id>.<nonce>.<mac>"}}},
                             "The new token")}, "404"),
                         "409": {"$ref": "#/components/responses/NotConfigured"}}},
            "delete": {"operationId": "revokeDeviceToken",
                       "summary": "Revoke the device's device token",
                       "security": devices,
                       "responses": _responses({"204": {"description": "Revoked (or there "
                                                        "was none)"}}, "404")},
        },
        "/v1/pushes/{push_id}/opened": {
            "parameters": [{"name": "push_id", "in": "path", "required": True,
                            "schema": _PUSH_ID}],
            "post": {"operationId": "pushOpened",
                     "summary": "The app reports that its user opened a push",
                     "description": "Fatigue reads opens: an open ends a pause, and fatigue "
                                    "applies only to devices that have ever reported one. "
                                    "With a device token the device is the token's; a server "
                                    "key with the `ingest` scope names it in the body. The "
                                    "first open reported is kept. 404 when the device has no "
                                    "such push.",
                     "security": [{"deviceToken": []}, {"bearer": ["ingest"]}],
                     "requestBody": {"required": False, "content": {"application/json": {
                         "schema": {"type": "object", "properties": {"device_id": {
                             "type": "string", "description": "with a server key"}}}}}},
                     "responses": _responses({"200": _json(
                         {"type": "object", "required": ["push_id", "opened_at"],
                          "properties": {"push_id": _PUSH_ID,
                                         "opened_at": {"type": "string",
                                                       "format": "date-time"}}},
                         "The open as recorded")}, "404", "415")},
        },
        "/v1/devices/{device_id}/export": {
            "parameters": [device_param],
            "get": {"operationId": "exportDevice",
                    "summary": "Everything stored about the device",
                    "security": devices,
                    "responses": _responses(
                        {"200": _json(_ref("DeviceExport"), "The device's data")}, "404")},
        },
        "/v1/rules": {"get": {
            "operationId": "listRules",
            "summary": "The rules in effect, their warnings, and the errors of the last "
                       "refused reload",
            "description": "Each rule as loaded (defaults filled in, durations as `5m`), with "
                           "`where` (file:line). `errors` lists what the last reload this "
                           "instance refused said; a successful reload clears it.",
            "security": [{"bearer": ["admin"]}],
            "responses": {
                "200": _json({"type": "object",
                              "required": ["version", "loaded_at", "rules", "warnings",
                                           "errors"],
                              "properties": {"version": {"type": "string"},
                                             "loaded_at": {"type": "string"},
                                             "rules": {"type": "array",
                                                       "items": {"type": "object"}},
                                             "warnings": {"type": "array"},
                                             "errors": {"type": "array"}}},
                             "The rules in effect"),
                "401": {"$ref": "#/components/responses/Unauthorized"},
                "403": {"$ref": "#/components/responses/Forbidden"},
                "503": _error("The stores and rules are not loaded yet", _RETRY_AFTER),
            },
        }},
        "/v1/admin/reload": {"post": {
            "operationId": "reload",
            "summary": "Reload the stores and rules and swap them in atomically, on every "
                       "instance",
            "description": "Loads and validates stores_file and the rules of rules_dir "
                           "whole, publishes them through the state store and swaps them in; "
                           "every other instance sharing the store swaps to them within 5 s. "
                           "On errors nothing changes and the answer lists every error.",
            "security": [{"bearer": ["admin"]}],
            "responses": {
                "200": _json({"type": "object",
                              "required": ["status", "version", "geofences", "rules",
                                           "loaded_at", "warnings"],
                              "properties": {"status": {"const": "reloaded"},
                                             "version": {"type": "string"},
                                             "geofences": {"type": "integer", "minimum": 0},
                                             "rules": {"type": "integer", "minimum": 0},
                                             "loaded_at": {"type": "string"},
                                             "warnings": {"type": "array"}}},
                             "The new stores and rules are active"),
                "401": {"$ref": "#/components/responses/Unauthorized"},
                "403": {"$ref": "#/components/responses/Forbidden"},
                "422": {"$ref": "#/components/responses/Unprocessable"},
                "503": _error("The state store cannot take the publish; nothing changed",
                              _RETRY_AFTER),
            },
        }},
        "/v1/stats": {"get": {
            "operationId": "stats",
            "summary": "What was decided and sent, and whether pushing brought people in",
            "description": "Totals and per rule, over the decisions whose event is in "
                           "[from, to): decided (push decisions), holdout, their pushes' "
                           "states, suppressed by reason, opened, conversions (a visit to the "
                           "decision's store that starts or is under way within "
                           "attribution.window after it) for the push and holdout groups, and "
                           "lift = conversion(push) - conversion(holdout) with its 95 % "
                           "interval (Newcombe), null while a group has fewer than 30 "
                           "decisions. Ops test pushes are left out.",
            "security": [{"bearer": ["admin"]}],
            "parameters": [
                {"name": "from", "in": "query", "required": False,
                 "schema": {"type": "string"},
                 "description": "RFC 3339 or epoch ms; decisions from then on"},
                {"name": "to", "in": "query", "required": False,
                 "schema": {"type": "string"},
                 "description": "RFC 3339 or epoch ms; decisions before then"}],
            "responses": _responses({"200": _json(
                {"type": "object",
                 "required": ["from", "to", "attribution_window_s", "totals", "rules"],
                 "properties": {"from": {"type": ["number", "null"]},
                                "to": {"type": ["number", "null"]},
                                "attribution_window_s": {"type": "number"},
                                "totals": _STATS_BLOCK,
                                "rules": {"type": "object",
                                          "additionalProperties": _STATS_BLOCK}}},
                "The stats")}),
        }},
        "/v1/admin/marketing/pause": {"post": {
            "operationId": "pauseMarketing",
            "summary": "Hold every marketing push, on every instance, until resumed",
            "description": "Marketing pushes stay queued (within their ttl) while paused; "
                           "service pushes go on. Logged with the credential's name.",
            "security": [{"bearer": ["admin"]}],
            "responses": _responses({"200": _json(_CONTROL, "Paused")}),
        }},
        "/v1/admin/marketing/resume": {"post": {
            "operationId": "resumeMarketing",
            "summary": "Send marketing pushes again",
            "security": [{"bearer": ["admin"]}],
            "responses": _responses({"200": _json(_CONTROL, "Resumed")}),
        }},
        "/v1/admin/rules/{rule_id}/cancel": {
            "parameters": [{"name": "rule_id", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "post": {
                "operationId": "cancelRulePushes",
                "summary": "Cancel a rule's queued pushes (a kill switch)",
                "description": "Pushes of the rule that wait to be sent are cancelled; one "
                               "being sent at this moment is not recalled. Logged with the "
                               "credential's name.",
                "security": [{"bearer": ["admin"]}],
                "responses": _responses({"200": _json(
                    {"type": "object", "required": ["rule_id", "cancelled"],
                     "properties": {"rule_id": {"type": "string"},
                                    "cancelled": {"type": "integer", "minimum": 0}}},
                    "How many were cancelled")}),
            }},
        "/v1/admin/test-push": {"post": {
            "operationId": "testPush",
            "summary": "Send one test push to one device through the real sender",
            "description": "Marked as a test: outside caps, the delivery report and the "
                           "stats; data.test = \"true\". The export shows how it went.",
            "security": [{"bearer": ["admin"]}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["device_id"],
                "properties": {"device_id": {"type": "string"},
                               "title": {"type": "string", "minLength": 1, "maxLength": 256},
                               "body": {"type": "string", "minLength": 1,
                                        "maxLength": 256}}}}}},
            "responses": _responses({"202": _json(
                {"type": "object", "required": ["push_id", "device_id", "state", "push_token"],
                 "properties": {"push_id": _PUSH_ID, "device_id": {"type": "string"},
                                "state": {"const": "queued"},
                                "push_token": {"type": "boolean",
                                               "description": "whether the device has one "
                                                              "(without, it is cancelled)"}}},
                "Queued")}, "404", "415"),
        }},
        "/healthz": {"get": {"operationId": "healthz", "summary": "The process is alive",
                             "security": [], "responses": {"200": _json(
                                 {"type": "object", "properties": {"status": {"const": "ok"}}},
                                 "Alive")}}},
        "/readyz": {"get": {"operationId": "readyz",
                            "summary": "State store reachable and stores loaded",
                            "security": [], "responses": {
                                "200": _json({"type": "object",
                                              "required": ["status", "version"],
                                              "properties": {"status": {"const": "ready"},
                                                             "version": {"type": "string"},
                                                             "checks": {"type": "object"}}},
                                             "Ready"),
                                "503": _error("Not ready: the details name the failing check",
                                              _RETRY_AFTER)}}},
        "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics",
                             "security": [], "responses": {"200": {
                                 "description": "Prometheus text exposition format",
                                 "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
                                  "security": [], "responses": {"200": _json(
                                      {"type": "object"}, "OpenAPI 3.1")}}},
    }


@lru_cache(maxsize=1)
def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "geopush",
            "version": geopush.__version__,
            "description": "Location pings in, geofence events out. Errors are always "
                           '{"error": {"code", "message", "details"}}.',
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": _operations(),
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http", "scheme": "bearer",
                    "description": "Authorization: Bearer <key>; keys in config auth.keys with "
                                   "scopes ingest, devices, admin, relay"},
                "basicDeviceToken": {
                    "type": "http", "scheme": "basic",
                    "description": "HTTP Basic: user = the device id, password = its device "
                                   "token (OwnTracks)"},
                "deviceToken": {
                    "type": "http", "scheme": "bearer", "bearerFormat": "gpd1.<id>.<nonce>.<mac>",
                    "description": "Authorization: Bearer <device token> (POST "
                                   "/v1/devices/{id}/token): one device's pings, stream and "
                                   "opens"}},
            "schemas": _schemas(),
            "responses": _RESPONSES,
        },
    }


@lru_cache(maxsize=1)
def _document_bytes() -> bytes:
    return orjson.dumps(openapi_document())


@routes.get("/openapi.json")
async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=_document_bytes(), content_type=JSON)
