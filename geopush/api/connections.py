"""The HTTP server's bounds on slow and numerous clients (contract §12).

aiohttp's server has no header read timeout and no connection cap of its own, and by default
keeps an idle connection for an hour. Here:

- every accepted connection goes through `_Connection`, a thin protocol in front of aiohttp's
  RequestHandler. It counts open connections, and closes one whose first request head is not
  in within `server.header_timeout` (408). Above `server.max_connections` a new connection is
  answered 503 and closed at once by `_Refused`, and one log line a while says so;
- `slow_client_middleware` clears that deadline once a request reaches the app and reads the
  body under `server.body_timeout`: a stalled body raises RequestTimeout in the handler's read,
  answered 408 in the JSON envelope;
- after a response, aiohttp's own keepalive_timeout (`server.keepalive_timeout`) closes the
  connection if no next request head is in by then. A WebSocket turns that off for its
  connection (it has its own heartbeat) and its head deadline is cleared like any request's;
- asyncio logs every accept() that fails for want of file descriptors, up to backlog times a
  loop pass (cpython#151615): those become one line a while, and `raise_open_files_limit`
  lifts the soft RLIMIT_NOFILE to the hard one at start, below which the cap is kept;
- a request aiohttp's parser refuses (400) is a debug line and a count (`ServerLog`), not an
  error-level traceback quoting the refused bytes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import resource
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from geopush.api.appstate import METRICS, SETTINGS
from geopush.api.errors import Handler, RequestTimeout, error_body
from geopush.logs import fields
from geopush.metrics import Metrics

log = logging.getLogger("geopush.http")

LOG_EVERY_S = 10.0  # at most one line this often about refused connections or failed accepts
RESUME_FRACTION = 0.9  # the limit episode ends (one line) when open connections fall below this
BACKLOG = 128  # aiohttp's default; asyncio accepts up to this many in one loop pass
MIN_BACKLOG = 8
# Descriptors kept for all but client connections: listening sockets, Redis, the journal,
# outbound HTTP, and the connections accepted above the cap before they are closed.
FD_HEADROOM = 256
OWN_FDS = 64  # listening sockets, Redis, the journal, outbound HTTP, the loop's own
# A connection refused above the cap holds its descriptor from the loop pass that accepts it
# until the third pass after (task → transport → connection_made → close): the passes in
# between accept a backlog's worth each when clients pile up while the process is busy.
REFUSED_PASSES_IN_FLIGHT = 3
_UNLIMITED_NOFILE = 65_536  # the soft limit to ask for when the hard one is unlimited
_ACCEPT_OUT_OF_RESOURCE = "socket.accept() out of system resource"
_RETRY_AFTER_S = 1


def raise_open_files_limit() -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard limit; the (soft, hard) limits then in effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_NOFILE if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # e.g. macOS refuses more than OPEN_MAX
            pass
    return soft, hard


def accept_backlog(open_files: int) -> int:
    """The listen backlog, which is also how many connections asyncio accepts in one loop
    pass: smaller when descriptors are few, so that those accepted only to be refused fit."""
    if open_files == resource.RLIM_INFINITY or open_files < 0:
        return BACKLOG
    return min(BACKLOG, max(MIN_BACKLOG, open_files // 32))


def connection_cap(configured: int, open_files: int) -> int:
    """server.max_connections, lowered so that client connections never use up the process's
    file descriptors: accept() failing with EMFILE would stall every client, not just one.
    The headroom holds the process's own descriptors and the connections accepted above the
    cap in the passes before they are closed (`accept_backlog` each)."""
    if open_files == resource.RLIM_INFINITY or open_files < 0:
        return configured
    in_flight = REFUSED_PASSES_IN_FLIGHT * accept_backlog(open_files)
    headroom = min(open_files // 2, max(FD_HEADROOM, OWN_FDS + in_flight))
    return max(1, min(configured, open_files - headroom))


def _raw_answer(status: HTTPStatus, code: str, message: str,
                headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP response in the JSON envelope, for when no request reached the app."""
    body = orjson.dumps(error_body(code, message))
    head = [f"HTTP/1.1 {status.value} {status.phrase}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


class ConnectionGuard:
    """Counts the connections of one listening server, refuses those above the cap, and keeps
    the log to one line a while about refusals and about accept() failures."""

    def __init__(self, *, max_connections: int, header_timeout: float,
                 metrics: Metrics | None = None, log_every_s: float = LOG_EVERY_S) -> None:
        self.limit = max_connections
        self.header_timeout = header_timeout
        self.open = 0
        self.refused = 0
        self._metrics = metrics
        self._log_every_s = log_every_s
        self._saturated_since: float | None = None
        self._refused_unlogged = 0
        self._limit_logged_at = -math.inf
        self._accept_failures_unlogged = 0
        self._accept_logged_at = -math.inf
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_handler: Any = None
        self.timeout_answer = _raw_answer(
            HTTPStatus.REQUEST_TIMEOUT, "timeout",
            f"request line and headers did not arrive within {header_timeout:g} s "
            "(server.header_timeout)")
        self.busy_answer = _raw_answer(
            HTTPStatus.SERVICE_UNAVAILABLE, "unavailable",
            f"too many open connections (server.max_connections {max_connections}); retry",
            {"Retry-After": str(_RETRY_AFTER_S)})

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        def connection() -> asyncio.Protocol:
            # Counted here, not in connection_made: one loop pass creates the protocols of
            # up to a backlog of accepted sockets before any of them is told it is connected.
            if self.open >= self.limit:
                self._refuse()
                return _Refused(self.busy_answer)
            return _Connection(self, server())

        return connection

    # -- counting ---------------------------------------------------------------------------

    def _opened(self) -> None:
        self.open += 1
        if self._metrics is not None:
            self._metrics.connections.inc()

    def _closed(self) -> None:
        self.open -= 1
        if self._metrics is not None:
            self._metrics.connections.dec()
        if self._saturated_since is not None and self.open < self.limit * RESUME_FRACTION:
            lasted = time.monotonic() - self._saturated_since
            self._saturated_since = None
            log.info("connection_limit_cleared", extra=fields(
                limit=self.limit, open=self.open, refused=self._refused_unlogged,
                lasted_s=round(lasted, 3)))
            self._refused_unlogged = 0

    def _refuse(self) -> None:
        self.refused += 1
        self._refused_unlogged += 1
        if self._metrics is not None:
            self._metrics.connections_refused.inc()
        now = time.monotonic()
        if self._saturated_since is None:
            self._saturated_since = now
        if now - self._limit_logged_at >= self._log_every_s:
            self._limit_logged_at = now
            log.warning("connection_limit_reached", extra=fields(
                message=f"{self.open} connections open, server.max_connections is "
                        f"{self.limit}: new connections are answered 503 and closed "
                        f"(at most one line every {self._log_every_s:g} s)",
                limit=self.limit, open=self.open, refused=self._refused_unlogged))
            self._refused_unlogged = 0

    def _header_timed_out(self) -> None:
        if self._metrics is not None:
            self._metrics.slow_headers.inc()

    # -- accept() out of file descriptors ---------------------------------------------------

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take over the loop's logging of failed accepts (the rest goes where it went)."""
        self._loop = loop
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_exception)

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.set_exception_handler(self._previous_handler)
            self._loop = None

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != _ACCEPT_OUT_OF_RESOURCE:
            if self._previous_handler is not None:
                self._previous_handler(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self._accept_failures_unlogged += 1
        now = time.monotonic()
        if now - self._accept_logged_at < self._log_every_s:
            return
        self._accept_logged_at = now
        exc = context.get("exception")
        code = getattr(exc, "errno", None)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.error("accept_failed", extra=fields(
            message=f"cannot accept connections: {exc} (open-files limit {soft}); lower "
                    f"server.max_connections (at most one line every {self._log_every_s:g} s)",
            error=errno.errorcode.get(code, str(code)) if isinstance(code, int) else None,
            failures=self._accept_failures_unlogged, open=self.open, limit=soft))
        self._accept_failures_unlogged = 0


class _Connection(asyncio.Protocol):
    """aiohttp's protocol behind a counter and the deadline of the first request head."""

    __slots__ = ("_guard", "_handler", "_head_deadline", "_received", "_transport")

    def __init__(self, guard: ConnectionGuard, handler: web.RequestHandler) -> None:
        self._guard = guard
        self._handler = handler
        self._transport: asyncio.Transport | None = None
        self._head_deadline: asyncio.TimerHandle | None = None
        self._received = False
        guard._opened()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._head_deadline = loop.call_later(self._guard.header_timeout, self._head_timed_out)
        self._handler.connection_made(transport)
        # aiohttp arms its keep-alive timer on connect too; until the first head is in, the
        # head deadline is the one that counts (keep_alive() cancels aiohttp's timer)
        self._handler.keep_alive(True)

    def data_received(self, data: bytes) -> None:
        self._received = True
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        self._handler.eof_received()
        return None  # as aiohttp: the transport closes itself after a half-close

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.head_received()
        self._handler.connection_lost(exc)
        self._guard._closed()

    def head_received(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        self._guard._header_timed_out()
        if self._transport is None or self._transport.is_closing():
            return
        if self._received:  # a connection that sent nothing (a preconnect) is just closed
            self._transport.write(self._guard.timeout_answer)
        self._transport.close()


class _Refused(asyncio.Protocol):
    """Above the cap: the 503 is written and the socket closed without reading the request."""

    __slots__ = ("_answer",)

    def __init__(self, answer: bytes) -> None:
        self._answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self._answer)
        transport.close()


@web.middleware
async def slow_client_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The request head is in: clear its deadline; read the body under server.body_timeout."""
    transport = request.transport
    if transport is not None:
        connection = transport.get_protocol()
        if isinstance(connection, _Connection):
            connection.head_received()
    body = request.content
    if body.is_eof():  # no body, or all of it is in already (every GET, every WebSocket)
        return await handler(request)
    timeout = request.app[SETTINGS].server.body_timeout
    deadline = asyncio.get_running_loop().call_later(timeout, _body_timed_out, request, timeout)
    body.on_eof(deadline.cancel)
    try:
        return await handler(request)
    finally:
        # a handler that answered without reading it all: aiohttp reads and drops the rest
        # for at most lingering_time (10 s), then closes the connection
        deadline.cancel()


def _body_timed_out(request: web.Request, timeout: float) -> None:
    if request.content.is_eof():
        return
    request.app[METRICS].slow_bodies.inc()
    request.content.set_exception(RequestTimeout(
        f"the request body did not arrive within {timeout:g} s (server.body_timeout)"))


class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger. A request its parser refuses (a 400 before the app sees it) is
    the client's mistake: aiohttp logs each at error level with a traceback quoting the refused
    bytes (which may hold a header's token or a device id), so anyone could flood the log or
    plant a credential in it. Here each is a debug line naming the kind of mistake, and a
    count; anything else aiohttp logs goes through as it was."""

    def __init__(self, metrics: Metrics | None) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self._metrics = metrics

    def exception(self, msg: object, *args: object, exc_info: Any = True,
                  **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError) and exc_info.code < 500:
            self._refused(exc_info)
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)

    def debug(self, msg: object, *args: object, exc_info: Any = None, **kwargs: Any) -> None:
        # non-HTTP bytes as the first request (TLS to a plain port) come here, with a traceback
        if isinstance(exc_info, HttpProcessingError):
            self._refused(exc_info)
            return
        super().debug(msg, *args, exc_info=exc_info, **kwargs)

    def _refused(self, error: HttpProcessingError) -> None:
        if self._metrics is not None:
            self._metrics.bad_requests.inc()
        log.debug("request_refused", extra=fields(status=error.code,
                                                  reason=type(error).__name__))


class _GuardedSite(web.BaseSite):
    """A TCP site whose connections are made by the guard's protocol factory."""

    __slots__ = ("_guard", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, guard: ConnectionGuard, host: str,
                 port: int, backlog: int) -> None:
        super().__init__(runner, backlog=backlog)
        self._guard = guard
        self._host = host
        self._port = port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._guard.protocol_factory(server),
                                                self._host, self._port, backlog=self._backlog)


class HttpServer:
    """The app listening on host:port within the bounds of its `server:` settings."""

    def __init__(self, app: web.Application, host: str, port: int, *,
                 max_connections: int | None = None, backlog: int = BACKLOG) -> None:
        settings = app[SETTINGS].server
        self.guard = ConnectionGuard(
            max_connections=max_connections or settings.max_connections,
            header_timeout=settings.header_timeout, metrics=app[METRICS])
        self._runner = web.AppRunner(app, access_log=None,
                                     shutdown_timeout=settings.shutdown_timeout,
                                     keepalive_timeout=settings.keepalive_timeout,
                                     logger=ServerLog(app[METRICS]))
        self._host = host
        self._port = port
        self._backlog = backlog

    @property
    def addresses(self) -> list[Any]:
        return self._runner.addresses

    async def start(self) -> None:
        """Start the app (its cleanup_ctx), then listen; OSError when it cannot listen."""
        await self._runner.setup()
        await _GuardedSite(self._runner, self.guard, self._host, self._port,
                          self._backlog).start()
        self.guard.install(asyncio.get_running_loop())

    async def stop(self) -> None:
        """Stop listening, let in-flight requests finish, close the app's resources."""
        self.guard.uninstall()
        await self._runner.cleanup()
