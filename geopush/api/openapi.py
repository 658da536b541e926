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
from geopush.pings import DEVICE_ID_SCHEMA
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


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying",
                                "schema": {"type": "string", "pattern": "^[0-9]+$"}}}

_RESPONSES = {
    "BadRequest": _error("The body or a parameter is not what was expected; the message names "
                         "the field, the value and what was expected"),
    "Unauthorized": _error("No API key, or an unknown one"),
    "Forbidden": _error("The key does not have the scope this endpoint needs"),
    "NotFound": _error("No such device (or path)"),
    "TooLarge": _error(f"Body over 1 MiB, or more than {MAX_PINGS} pings"),
    "UnsupportedMediaType": _error("The body is not declared Content-Type: application/json"),
    "Unavailable": _error("The state store is unreachable; retry after Retry-After seconds",
                          _RETRY_AFTER),
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
                     "decisions", "pushes"],
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
            "decisions": {"type": "array", "items": {"type": "object"}},
            "pushes": {"type": "array", "items": {"type": "object"}},
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
                "code": {"type": "string", "enum": ["invalid", "no_consent", "out_of_order",
                                                    "rate_limited", "unavailable"]},
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
    ingest = [{"bearer": ["ingest"]}]
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
                           "rejected `no_consent` and not stored.",
            "security": ingest,
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
                           "answer with `error` and the socket stays open. Closed with 1001 "
                           "when the server shuts down.",
            "security": ingest,
            "responses": {
                "101": {"description": "Switching to the WebSocket protocol; messages are "
                                       "answered with StreamAnswer",
                        "content": {JSON: {"schema": _ref("StreamAnswer")}}},
                **{k: v for k, v in _responses({}, "429").items() if k not in ("413",)},
            },
        }},
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
        "/v1/devices/{device_id}/export": {
            "parameters": [device_param],
            "get": {"operationId": "exportDevice",
                    "summary": "Everything stored about the device",
                    "security": devices,
                    "responses": _responses(
                        {"200": _json(_ref("DeviceExport"), "The device's data")}, "404")},
        },
        "/v1/admin/reload": {"post": {
            "operationId": "reload",
            "summary": "Reload the stores file and swap it in atomically, on every instance",
            "description": "Loads and validates stores_file whole, publishes it through the "
                           "state store and swaps it in; every other instance sharing the "
                           "store swaps to it within 5 s. On errors nothing changes and the "
                           "answer lists every error.",
            "security": [{"bearer": ["admin"]}],
            "responses": {
                "200": _json({"type": "object",
                              "required": ["status", "version", "geofences", "loaded_at",
                                           "warnings"],
                              "properties": {"status": {"const": "reloaded"},
                                             "version": {"type": "string"},
                                             "geofences": {"type": "integer", "minimum": 0},
                                             "loaded_at": {"type": "string"},
                                             "warnings": {"type": "array"}}},
                             "The new stores are active"),
                "401": {"$ref": "#/components/responses/Unauthorized"},
                "403": {"$ref": "#/components/responses/Forbidden"},
                "422": {"$ref": "#/components/responses/Unprocessable"},
                "503": _error("The state store cannot take the publish; nothing changed",
                              _RETRY_AFTER),
            },
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
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "Authorization: Bearer <key>; keys in config auth.keys with "
                               "scopes ingest, devices, admin"}},
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
