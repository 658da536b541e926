"""The one place errors become responses: `{"error": {"code", "message", "details": [...]}}`.

GeopushError subclasses carry their code and HTTP status; aiohttp's own HTTP errors (404, 405,
413 …) get the same shape; anything unexpected is logged and answered 500 without a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import redis.exceptions
from aiohttp import web

from geopush.api.wire import MAX_BODY_BYTES, json_response
from geopush.errors import Forbidden as Forbidden
from geopush.errors import GeopushError, Problem
from geopush.errors import Unauthorized as Unauthorized
from geopush.logs import fields
from geopush.state.base import StateUnavailable

log = logging.getLogger("geopush.api")

RETRY_AFTER_S = 5  # Redis comes back within seconds; clients retry sooner than 15 s

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class NotFound(GeopushError):
    code = "not_found"
    http_status = 404


class TooLarge(GeopushError):
    code = "too_large"
    http_status = 413


class TooManyRequests(GeopushError):
    """Over limits.key_requests_per_second (geopush.service.limits)."""

    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, retry_after_s: int,
                 details: list[Problem] | None = None) -> None:
        super().__init__(message, details)
        self.retry_after_s = retry_after_s


class RequestTimeout(GeopushError, TimeoutError):
    """A client that stopped sending its request body (server.body_timeout).

    A TimeoutError too: aiohttp reads what is left of an unread body after the answer and
    takes a TimeoutError there as "close the connection", anything else as a crash to log.
    """

    code = "timeout"
    http_status = 408


_HTTP_CODES = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def error_body(code: str, message: str, details: list[Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or []}}


def error_response(code: str, message: str, status: int, details: list[Any] | None = None,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    return json_response(error_body(code, message, details), status=status, headers=headers)


def problem_details(problems: list[Problem]) -> list[dict[str, Any]]:
    return [p.as_dict() for p in problems]


def from_geopush_error(exc: GeopushError) -> web.Response:
    headers: dict[str, str] = {}
    if isinstance(exc, StateUnavailable):
        headers["Retry-After"] = str(RETRY_AFTER_S)
    elif isinstance(exc, TooManyRequests):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = exc.challenge
    response = error_response(exc.code, exc.message, exc.http_status,
                              problem_details(exc.details), headers)
    if isinstance(exc, RequestTimeout):
        response.force_close()  # the rest of the body may never come: nothing to read after it
    return response


def _from_http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    status = exc.status
    headers: dict[str, str] = {}
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = sorted(exc.allowed_methods)
        headers["Allow"] = ",".join(allowed)
        message = (f"method {request.method} is not allowed on {request.path}; allowed: "
                   + ", ".join(allowed))
    elif status == 404:
        message = f"no such resource: {request.path}"
    elif isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = MAX_BODY_BYTES
        message = (f"request body is larger than the limit of {limit} bytes "
                   f"({limit / 1048576:g} MiB)")
    else:
        message = exc.text or exc.reason
    return error_response(_HTTP_CODES.get(status, "http_error"), message, status, None, headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GeopushError as exc:
        return from_geopush_error(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _from_http_error(request, exc)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        # a backend that let a connection error through: still a 503, never a 500
        return from_geopush_error(StateUnavailable(f"state store unreachable: {exc}"))
    except Exception:
        # the route, not the path: a path holds the device id, which logs only show
        # pseudonymised (contract §8, §12); the formatter pseudonymises `device_id`
        resource = request.match_info.route.resource
        log.exception("unexpected_error", extra=fields(
            method=request.method,
            route=resource.canonical if resource is not None else "unmatched",
            device_id=request.match_info.get("device_id")))
        return error_response("internal", "internal error; it has been logged", 500)
