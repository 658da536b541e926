"""Periodic jobs that run once per cluster (contract §8): the delivery report, the retention
purge, the weather refresh. APScheduler 3.x (`AsyncIOScheduler`) runs them on every instance;
each run first takes a lease in the state store named after the job and its period, so of all
the instances only one runs a job in a given period, whoever comes first.

Why a lease per period rather than one lease per job: an instance that finished the purge and
released a plain lease would let another instance, whose schedule fires a few seconds later,
run it again in the same period. The period's lease is kept after a run that went well (it
expires on its own); it is renewed while a long run lasts (longer than the run: a second
instance must not start meanwhile) and released in `finally` when the run failed or was
cancelled (shutdown cancels running jobs), so that another instance may still run it.

Timer claiming and reload following are not here: every instance does those, no lease, and
their loops (geopush.service.timers, geopush.service.reloading) are tuned for a 1 s cadence.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from geopush.config import Settings
from geopush.delivery.counts import ReportCounts, write_report
from geopush.logs import fields
from geopush.metrics import Metrics
from geopush.state.base import StateStore, StateUnavailable
from geopush.weather.source import WeatherSource

log = logging.getLogger("geopush.service.jobs")

# APScheduler's default of 1 s would skip a run whose start was a little late (a busy event
# loop): a skipped report or purge is a silent gap
MISFIRE_GRACE_S = 300
RENEW_EVERY = 1 / 3  # of the lease's length, while a run lasts
CATCH_UP_PERIODS = 3  # periods a late run goes back for; older ones are let go


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    every_s: float
    run: Callable[[float], Awaitable[None]]  # given the start of the period it runs for
    lease_s: float  # how long a run may take before another instance could start it
    offset_s: float = 0.0  # into each period: e.g. after the counts of the last one are in
    # what the instances that did not get the period's lease do meanwhile (None: nothing)
    elsewhere: Callable[[float], Awaitable[None]] | None = None
    at_start: bool = False  # also run once at start (for the period start-up falls in)


class Jobs:
    def __init__(self, store: StateStore, metrics: Metrics, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._metrics = metrics
        self._clock = clock
        # who holds a lease, in logs and in Redis: the host and a random part (two instances
        # on one host are two holders)
        self.holder = f"{socket.gethostname()}:{secrets.token_hex(4)}"
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._jobs: list[Job] = []
        self._running: set[asyncio.Task[object]] = set()
        self._done: dict[str, int] = {}  # job → the last period it ran here
        self._fired: dict[str, int] = {}  # job → the last period the scheduler ran it for

    def add(self, job: Job) -> None:
        self._jobs.append(job)
        now = self._clock()
        # aligned on the periods every instance counts the same way (epoch / every_s)
        first = (now // job.every_s + 1) * job.every_s + job.offset_s
        if first - job.every_s > now:
            first -= job.every_s
        self._scheduler.add_job(
            self._fire, "interval", args=[job], seconds=job.every_s, id=job.name,
            next_run_time=datetime.fromtimestamp(first, UTC), misfire_grace_time=MISFIRE_GRACE_S,
            coalesce=True, max_instances=1)
        if job.at_start:
            self._scheduler.add_job(self.run_once, "date", args=[job], id=f"{job.name}:start",
                                    misfire_grace_time=MISFIRE_GRACE_S)

    def start(self) -> None:
        self._scheduler.start()

    async def shutdown(self) -> None:
        """Stop scheduling, cancel the runs in progress and wait for their `finally` (which
        gives their lease back while the state store is still open)."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        running = list(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    async def _fire(self, job: Job) -> None:
        """The scheduler's run: for the period under way, and for those since the last run
        that a late start skipped (up to CATCH_UP_PERIODS). A run that starts after its
        period ended (a busy loop, a slow state store) would otherwise be taken for the next
        one, and its own period, a delivery report's window, never run anywhere."""
        current = int((self._clock() - job.offset_s) // job.every_s)
        last = self._fired.get(job.name)
        first = current if last is None else max(last + 1, current - CATCH_UP_PERIODS)
        self._fired[job.name] = max(current, last if last is not None else current)
        for period in range(first, current + 1):
            await self.run_once(job, period * job.every_s + job.offset_s)

    async def run_once(self, job: Job, now: float | None = None) -> bool:
        """Run `job` for the period `now` falls in, if no instance ran it yet; whether it
        ran here."""
        now = self._clock() if now is None else now
        period = int((now - job.offset_s) // job.every_s)
        lease = f"{job.name}:{period}"
        if self._done.get(job.name) == period:
            return False  # the lease is ours: taking it again would succeed
        try:
            taken = await self._store.take_lease(lease, self.holder, job.lease_s)
        except StateUnavailable as exc:
            self._metrics.jobs.labels(job.name, "unavailable").inc()
            log.warning("job_skipped", extra=fields(job=job.name, reason=str(exc)))
            taken = False
        if not taken:
            if job.elsewhere is not None:
                try:
                    await job.elsewhere(period * job.every_s + job.offset_s)
                except Exception:  # the schedule outlives any one run
                    log.exception("job_failed", extra=fields(job=job.name, part="elsewhere"))
            return False
        renewing = asyncio.create_task(self._renew(lease, job.lease_s))
        current = asyncio.current_task()
        if current is not None:
            self._running.add(current)
        done = False
        try:
            await job.run(period * job.every_s + job.offset_s)
            done = True
            self._done[job.name] = period
            self._metrics.jobs.labels(job.name, "ok").inc()
        except StateUnavailable as exc:
            self._metrics.jobs.labels(job.name, "unavailable").inc()
            log.warning("job_failed", extra=fields(job=job.name, reason=str(exc)))
        except Exception:
            self._metrics.jobs.labels(job.name, "failed").inc()
            log.exception("job_failed", extra=fields(job=job.name))
        finally:
            if current is not None:
                self._running.discard(current)
            renewing.cancel()
            with suppress(asyncio.CancelledError):
                await renewing
            with suppress(StateUnavailable):
                if done:  # kept to the period's end: nobody runs it again in this period
                    end = (period + 1) * job.every_s + job.offset_s
                    await self._store.take_lease(lease, self.holder,
                                                 max(end - self._clock(), 0.0) + job.lease_s)
                else:  # another instance may still run it in this period
                    await self._store.release_lease(lease, self.holder)
        return done

    async def _renew(self, lease: str, lease_s: float) -> None:
        while True:
            await asyncio.sleep(lease_s * RENEW_EVERY)
            with suppress(StateUnavailable):
                await self._store.take_lease(lease, self.holder, lease_s)


RETENTION_EVERY_S = 3600.0
RETENTION_LEASE_S = 600.0


def service_jobs(jobs: Jobs, store: StateStore, settings: Settings, counts: ReportCounts,
                 weather: WeatherSource | None = None,
                 clock: Callable[[], float] = time.time) -> None:
    """The jobs `geopush serve` runs once per cluster."""
    every = settings.logging.delivery_report_every

    async def delivery_report(period_start: float) -> None:
        await write_report(store, counts, period_start, settings.logging.delivery_rate_alert)

    async def retention_purge(period_start: float) -> None:
        started = time.monotonic()
        gone = await store.purge(clock() - settings.retention.history)
        log.info("retention_purged", extra=fields(records=gone,
                                                  seconds=round(time.monotonic() - started, 3)))

    jobs.add(Job("delivery_report", every, delivery_report, lease_s=max(every, 30.0),
                 offset_s=counts.report_offset_s))
    jobs.add(Job("retention_purge", RETENTION_EVERY_S, retention_purge,
                 lease_s=RETENTION_LEASE_S))
    tick = weather.tick_every() if weather is not None else None
    if weather is not None and tick is not None:
        source = weather

        async def fetch_weather(period_start: float) -> None:
            await source.tick(period_start, fetching=True)

        async def copy_weather(period_start: float) -> None:
            await source.tick(period_start, fetching=False)

        # at start too: the stores' cells are preloaded, not left unknown for a whole tick
        jobs.add(Job("weather_refresh", tick, fetch_weather, lease_s=tick,
                     elsewhere=copy_weather, at_start=True))
