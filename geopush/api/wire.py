"""JSON in and out of handlers (orjson: the ping path is hot)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from geopush.errors import GeopushError, InvalidInput, Problem

JSON = "application/json"
MAX_BODY_BYTES = 1024 * 1024  # contract §6: a request body is at most 1 MiB
_UTF8 = frozenset({"utf-8", "utf8"})


class UnsupportedMediaType(GeopushError):
    code = "unsupported_media_type"
    http_status = 415


def json_response(body: Any, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=JSON,
                        headers=headers)


def parse_json(data: bytes | str, what: str = "body") -> Any:
    """Decode JSON or raise InvalidInput naming where decoding failed."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None


async def read_json(request: web.Request) -> Any:
    """The request body as JSON. Bodies over the app's client_max_size raise 413 in read().

    Only with `Content-Type: application/json`: a web page can make a browser POST
    text/plain or a form to any address without asking (no CORS preflight), and a keyless
    geopush on loopback would take it; application/json it cannot send without one."""
    check_json_content_type(request)
    body = await request.read()
    if not body:
        raise InvalidInput("body is empty: expected a JSON document")
    return parse_json(body)


def check_json_content_type(request: web.Request) -> None:
    """Raise UnsupportedMediaType unless the body is declared JSON (in UTF-8, RFC 8259)."""
    declared = request.headers.get("Content-Type")
    if request.content_type == JSON and (request.charset or "utf-8").lower() in _UTF8:
        return
    shown = "none" if declared is None else repr(declared[:100])
    raise UnsupportedMediaType(
        f"Content-Type {shown}: expected application/json (optionally with charset=utf-8)",
        [Problem("header", "unsupported media type", field="Content-Type",
                 value=None if declared is None else declared[:200],
                 expected="application/json")])


def type_name(value: Any) -> str:
    """What a JSON value is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
