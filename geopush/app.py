"""The running service (`geopush serve`): the aiohttp app and everything it opens and closes.

Every resource is opened and closed in one `cleanup_ctx` generator each, in order: the stores
and the engine built from them (startup fails on store errors), the state store (the memory
backend writes its snapshot in close()), the weather copy's client, the timer claimer, the
sender and the delivery worker (attempts in flight end before the store closes), the periodic
jobs under their leases (geopush.service.jobs), the follower of reloads published by other
instances. A shutdown stops listening, closes WebSockets with 1001, lets in-flight
requests finish, then closes the resources in reverse.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import suppress

from aiohttp import WSCloseCode, web

from geopush.api import admin, clients, devices, health, openapi, ops, pings, pushes
from geopush.api.admin import install_geofencing
from geopush.api.appstate import (
    AUTH,
    DELIVERY,
    INGESTOR,
    LIMITER,
    LIVE,
    METRICS,
    RELOADER,
    SETTINGS,
    STATE,
    WEATHER,
    WEBSOCKETS,
    Live,
)
from geopush.api.auth import Authenticator
from geopush.api.connections import (
    HttpServer,
    accept_backlog,
    connection_cap,
    raise_open_files_limit,
    slow_client_middleware,
)
from geopush.api.errors import Handler, error_middleware
from geopush.api.wire import MAX_BODY_BYTES
from geopush.collector import tune_for_service
from geopush.config import Settings
from geopush.delivery.counts import ReportCounts
from geopush.delivery.process import DeliveryProcess, separate_delivery
from geopush.delivery.senders.base import Sender
from geopush.delivery.senders.build import build_sender
from geopush.delivery.worker import Delivery, DeliveryWorker
from geopush.errors import GeopushError
from geopush.logs import configure_logging, fields
from geopush.metrics import Metrics
from geopush.rules.decide import Decision
from geopush.service.active import load_geofencing
from geopush.service.decisions import OnDecided
from geopush.service.ingest import REDIS_SHARE_PINGS, Ingestor
from geopush.service.jobs import Jobs, service_jobs
from geopush.service.limits import RequestLimiter
from geopush.service.reloading import Reloader
from geopush.service.timers import INTERVAL_S, TimerClaimer
from geopush.state.base import StateStore, StateUnavailable
from geopush.state.factory import make_store
from geopush.weather.cells import cell_of
from geopush.weather.source import weather_source

log = logging.getLogger("geopush.app")

LOOPBACK = "127.0.0.1"
TIMERS_STOP_S = 5.0  # a round in progress finishes; a state store call times out sooner

# metric labels take only these: a client inventing methods must not invent time series
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_Ctx = Callable[[web.Application], AsyncIterator[None]]


def create_app(settings: Settings, *, store: StateStore | None = None,
               timer_interval_s: float = INTERVAL_S,
               delivery_process: bool = False) -> web.Application:
    """The app, not started; `store` replaces the one the settings describe (tests).
    `delivery_process`: send from a process of its own (geopush.delivery.process), as `geopush
    serve` does when delivery.process says so; else in this one, as the app's tests do."""
    app = web.Application(middlewares=[slow_client_middleware, _metrics_middleware,
                                       error_middleware],
                          client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[AUTH] = Authenticator(settings.auth)
    app[LIMITER] = RequestLimiter(settings.limits.key_requests_per_second)
    app[LIVE] = Live()
    app[WEBSOCKETS] = weakref.WeakSet()
    if store is None:
        store = make_store(settings)
    app[STATE] = store
    live = app[LIVE]
    app[WEATHER] = weather_source(settings.weather, store, lambda: _store_cells(live))
    counts = ReportCounts(settings.logging.delivery_report_every)
    senders: list[Sender] = []  # built at start (a bad service account stops it there)
    ingestors: list[Ingestor] = []
    worker: Delivery
    if delivery_process:
        # sends go out from a process of its own: this loop only answers and decides
        worker = DeliveryProcess(settings)
        app[METRICS].added_from = worker.metrics_file
    else:
        worker = DeliveryWorker(store, lambda: senders[0], app[METRICS], counts,
                                lambda: settings.policy,
                                max_in_flight=settings.delivery.max_in_flight,
                                lease_s=settings.delivery.send_lease,
                                backlog=lambda: ingestors[0].backlog if ingestors else 0)
    app[DELIVERY] = worker

    def decided(decisions: Sequence[Decision]) -> None:
        counts.decisions(decisions)
        if any(d.outcome == "push" for d in decisions):
            worker.wake()  # the commit queued them: send now, not at the next poll

    app[INGESTOR] = Ingestor(store, lambda: live.engine, app[METRICS],
                             share_pings=(REDIS_SHARE_PINGS if settings.storage.backend == "redis"
                                          else None),
                             weather=app[WEATHER].at, on_decided=decided)
    ingestors.append(app[INGESTOR])
    app[RELOADER] = Reloader(settings, store, lambda: live.geofencing,
                             lambda geofencing: install_geofencing(app, geofencing))
    app.cleanup_ctx.append(_geofencing_ctx)
    app.cleanup_ctx.append(_state_ctx)
    app.cleanup_ctx.append(_weather_ctx)  # closed after the jobs that refresh it
    app.cleanup_ctx.append(_timers_ctx(timer_interval_s, decided))
    app.cleanup_ctx.append(_delivery_ctx(senders))
    app.cleanup_ctx.append(_jobs_ctx(counts))
    app.cleanup_ctx.append(_reloading_ctx)
    app.on_shutdown.append(_close_websockets)
    for module in (pings, clients, devices, pushes, admin, ops, health, openapi):
        app.router.add_routes(module.routes)
    return app


async def _geofencing_ctx(app: web.Application) -> AsyncIterator[None]:
    install_geofencing(app, load_geofencing(app[SETTINGS]))
    yield


async def _state_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[STATE]
    try:
        await store.open()
    except StateUnavailable as exc:
        # Start anyway: /readyz fails and requests get 503 until the store answers.
        log.warning("state_store_unreachable_at_start", extra=fields(reason=str(exc)))
    yield
    await store.close()


def _timers_ctx(interval_s: float, decided: OnDecided) -> _Ctx:
    async def timers(app: web.Application) -> AsyncIterator[None]:
        live = app[LIVE]
        claimer = TimerClaimer(app[STATE], lambda: live.engine, app[METRICS],
                               stale_after_s=app[SETTINGS].geofence.stale_after,
                               interval_s=interval_s, weather=app[WEATHER].at,
                               on_decided=decided)
        task = asyncio.create_task(claimer.run(), name="geopush-timers")
        yield
        claimer.stop()
        try:
            await asyncio.wait_for(task, TIMERS_STOP_S)
        except TimeoutError:
            log.warning("timers_stop_timeout")
        with suppress(asyncio.CancelledError):
            await task

    return timers


def _delivery_ctx(senders: list[Sender]) -> _Ctx:
    """The sender and the delivery worker (geopush.delivery.worker) on every instance, in
    this process or in one of its own (geopush.delivery.process)."""

    async def delivery(app: web.Application) -> AsyncIterator[None]:
        delivery_settings = app[SETTINGS].delivery
        process = app[DELIVERY]
        if isinstance(process, DeliveryProcess):  # it stops its child, which stops sending
            supervising = asyncio.create_task(process.run(), name="geopush-delivery-process")
            yield
            process.stop()
            await supervising
            return
        sender = build_sender(delivery_settings, timeout_s=delivery_settings.timeout,
                              pool_limit=min(delivery_settings.max_in_flight, 1000))
        senders[:] = [sender]
        worker = app[DELIVERY]
        task = asyncio.create_task(worker.run(), name="geopush-delivery")
        yield
        worker.stop()
        try:
            # attempts in flight end within the sender's timeout; what does not is `sending`
            # and is sent again after its lease, by this instance or another
            await asyncio.wait_for(asyncio.shield(task), delivery_settings.timeout + 2.0)
        except TimeoutError:
            log.warning("delivery_stop_timeout")
            task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        await sender.close()

    return delivery


def _jobs_ctx(counts: ReportCounts) -> _Ctx:
    """The periodic jobs that run once per cluster (geopush.service.jobs)."""

    async def periodic(app: web.Application) -> AsyncIterator[None]:
        jobs = Jobs(app[STATE], app[METRICS])
        service_jobs(jobs, app[STATE], app[SETTINGS], counts, app[WEATHER])
        jobs.start()
        yield
        await jobs.shutdown()

    return periodic


async def _reloading_ctx(app: web.Application) -> AsyncIterator[None]:
    """Follow the reloads published by any instance (geopush.service.reloading)."""
    reloader = app[RELOADER]
    with suppress(StateUnavailable):
        await reloader.follow_once()  # the serial this instance starts at, when Redis answers
    task = asyncio.create_task(reloader.run(), name="geopush-reloading")
    yield
    reloader.stop()
    with suppress(asyncio.CancelledError):
        await task


async def _weather_ctx(app: web.Application) -> AsyncIterator[None]:
    """The weather copy's HTTP client (its refresh is a periodic job, geopush.service.jobs)."""
    yield
    await app[WEATHER].close()


def _store_cells(live: Live) -> set[str]:
    """The weather cells of the active stores: what the weather is preloaded for."""
    if live.geofencing is None:
        return set()
    return {cell_of(g.lat, g.lon) for g in live.geofencing.stores.geofences}


async def _close_websockets(app: web.Application) -> None:
    open_sockets = app[WEBSOCKETS]
    await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
                           for ws in list(open_sockets)), return_exceptions=True)


@web.middleware
async def _metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    response = await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    method = request.method if request.method in _METHODS else "other"
    request.app[METRICS].observe_request(route, method, response.status,
                                         time.perf_counter() - started)
    return response


# -- serve -------------------------------------------------------------------------------------


def listen_host(settings: Settings) -> str:
    """server.host, or loopback when no keys are configured (anyone could call the API)."""
    if settings.auth.keys:
        return settings.server.host
    log.warning("no_auth_keys", extra=fields(
        message=f"no API keys configured (auth.keys): every request is allowed, so geopush "
                f"listens on {LOOPBACK} only (server.host {settings.server.host!r} is ignored)"))
    return LOOPBACK


async def serve(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    host = listen_host(settings)
    app = create_app(settings, delivery_process=separate_delivery(settings))
    max_connections, backlog = _connection_limits(settings)
    server = HttpServer(app, host, settings.server.port,
                        max_connections=max_connections, backlog=backlog)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await server.start()
        except OSError as exc:
            raise GeopushError(f"cannot listen on {host}:{settings.server.port} "
                               f"(server.host, server.port): {exc.strerror or exc}") from None
        tune_for_service()
        urls = [f"http://{a[0]}:{a[1]}" for a in server.addresses if isinstance(a, tuple)]
        log.info("listening", extra=fields(urls=urls, backend=settings.storage.backend,
                                           auth=app[AUTH].enabled))
        await stop.wait()
        log.info("shutting_down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()
    log.info("stopped")


def _connection_limits(settings: Settings) -> tuple[int, int]:
    """server.max_connections and the listen backlog, within the open-files limit (raised to
    the hard limit first)."""
    soft, hard = raise_open_files_limit()
    configured = settings.server.max_connections
    cap = connection_cap(configured, soft)
    backlog = accept_backlog(soft)
    log.info("open_files_limit", extra=fields(soft=soft, hard=hard, max_connections=cap,
                                              backlog=backlog))
    if cap < configured:
        log.warning("max_connections_lowered", extra=fields(
            message=f"server.max_connections {configured} is lowered to {cap}: the process may "
                    f"open {soft} files (RLIMIT_NOFILE) and needs some for itself; raise "
                    f"`ulimit -n` to allow more", configured=configured, max_connections=cap))
    return cap, backlog


def run(settings: Settings) -> int:
    """`geopush serve`: 0 after a clean shutdown, 1 when it cannot start (message on stderr)."""
    configure_logging(settings.logging)
    try:
        asyncio.run(serve(settings))
    except GeopushError as exc:
        # the lines `geopush check` prints for the same problems
        print(f"error: geopush serve cannot start: {exc.message}", file=sys.stderr)
        for problem in exc.details:
            print(problem.line(), file=sys.stderr)
        return 1
    return 0

